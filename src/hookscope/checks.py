"""Self-checks: verify on the loaded model that hookscope's numbers are the model's numbers.

``hm.self_check()`` runs, in seconds, on a small synthetic padded batch, every check in
:data:`CHECKS` (a registry of named checks, each a small function with a one-line description,
run in the order they are defined): every activation point fires with its documented shape; the
identities hold (``resid_out_l == resid_in_{l+1}``, HF hidden states, the residual
decomposition, heads summing to the attention output, pattern rows summing to 1); a padded batch
equals one-by-one; a hooked forward with nothing requested is bit-identical to the plain one; a
write at each kind of point changes the output and a no-op write changes nothing.

Remembered results
------------------
``self_check(remember=True)`` (the default) stores each check's outcome in one JSON file,
``$HOOKSCOPE_CACHE/self_checks.json`` (default ``~/.cache/hookscope/self_checks.json``; see
:func:`records_path`), one entry per ``"model_type|transformers version|dtype"``, and warns when
an outcome differs from the stored one. Nothing else reads that file: loading a model reads only
the model. Read the stored outcomes with :func:`remembered_results`. Turn remembering off for one
call with ``remember=False``, or for the whole process with ``HOOKSCOPE_REMEMBER_CHECKS=0``
(also ``false``, ``no``, ``off``); then ``self_check`` neither reads nor writes the file.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import transformers

from .config import ExtractionConfig
from .errors import HookscopeError
from .interventions import Ablation, PatternEdit, Steer
from .loading import cache_dir
from .points import parse_point, point_key, width_of

#: the environment variable that turns remembering off for the process (``0``/``false``/...)
REMEMBER_ENV = "HOOKSCOPE_REMEMBER_CHECKS"
_ON, _OFF = ("", "1", "true", "yes", "on"), ("0", "false", "no", "off")


@dataclass
class CheckRow:
    name: str
    passed: bool
    detail: str
    seconds: float


@dataclass
class CheckReport:
    """The outcome of :func:`self_check`; ``str(report)`` is a table."""

    model_type: str
    transformers_version: str
    dtype: str
    device: str
    rows: list[CheckRow] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(row.passed for row in self.rows)

    @property
    def key(self) -> str:
        return f"{self.model_type}|{self.transformers_version}|{self.dtype}"

    def __str__(self) -> str:
        width = max(len(r.name) for r in self.rows) if self.rows else 10
        lines = [
            f"hookscope self-check: {self.model_type}, {self.dtype} on {self.device}, transformers {self.transformers_version}"
        ]
        for row in self.rows:
            lines.append(f"  {'ok  ' if row.passed else 'FAIL'}  {row.name:<{width}}  {row.detail}")
        lines.append(f"  {sum(r.passed for r in self.rows)}/{len(self.rows)} checks passed")
        return "\n".join(lines)


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-4 if dtype == torch.float32 else 5e-2 if dtype == torch.bfloat16 else 2e-2


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float) -> tuple[bool, float]:
    """|a - b| <= rtol * max|b| (relative to the tensor's scale); returns (ok, max diff)."""
    a, b = a.detach().float(), b.detach().float()
    worst = float((a - b).abs().max()) if a.numel() else 0.0
    return worst <= rtol * float(b.abs().max()) + 1e-6, worst


def _synthetic_batch(hm: Any, lengths=(7, 4)) -> dict[str, torch.Tensor]:
    """Random token ids, left-padded rows of different lengths: ``input_ids`` and
    ``attention_mask``, each ``[len(lengths), max(lengths)]``."""
    vocab = hm.hf_model.config.get_text_config().vocab_size
    generator = torch.Generator().manual_seed(0)
    total = max(lengths)
    ids = torch.randint(min(10, vocab - 1), vocab, (len(lengths), total), generator=generator)
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, total - n :] = 1
    pad = getattr(hm.get_text_tokenizer(), "pad_token_id", None) or 0
    return {"input_ids": ids.masked_fill(mask == 0, pad), "attention_mask": mask}


# -- the registry ------------------------------------------------------------------------------


@dataclass
class CheckContext:
    """What every check reads: the model, the tolerance for its dtype and a synthetic batch
    (``input_ids`` / ``attention_mask`` ``[2, 7]``, left-padded rows of 7 and 4 tokens)."""

    hm: Any
    rtol: float
    batch: dict[str, torch.Tensor]

    @property
    def m(self) -> Any:
        return self.hm.model_map

    @property
    def last_layer(self) -> int:
        return self.m.n_layers - 1

    @property
    def heads(self) -> list[dict[str, int]]:
        """Every head of the first and last layer (the heads whose patterns are checked)."""
        layers = {0, self.last_layer}
        return [{"layer": layer, "head": h} for layer in layers for h in range(self.m.n_heads)]

    @property
    def first_row(self) -> dict[str, torch.Tensor]:
        """The first (unpadded) row alone: ``[1, 7]`` each."""
        return {k: v[:1, -7:] for k, v in self.batch.items()}

    @cached_property
    def full_cache(self) -> Any:
        """Every activation point at positions ``["last", 0]`` (computed once, then shared)."""
        m = self.m
        everything = ExtractionConfig(
            extract_embed=True,
            extract_resid_in=True,
            extract_resid_mid=not m.parallel_residual,
            extract_resid_out=True,
            extract_attn_in=True,
            extract_attn_out=True,
            extract_mlp_out=True,
            extract_queries=True,
            extract_keys=True,
            extract_values=True,
            extract_last_layernorm=True,
            extract_head_out=True,
            extract_head_z=True,
            extract_head_queries=True,
            extract_head_keys=True,
            extract_head_values=True,
            extract_attn_pattern=True,
            attn_pattern_all_keys=True,
            attn_heads=self.heads,
        )
        return self.hm.forward(self.batch, ["last", 0], extraction_config=everything)


CheckFunction = Callable[[CheckContext], tuple[bool, str]]


@dataclass(frozen=True)
class Check:
    """One named check: ``run(context) -> (passed, detail)``."""

    name: str
    description: str
    run: CheckFunction


#: every check, by name, in the order :func:`self_check` runs them
CHECKS: dict[str, Check] = {}


def check(name: str, description: str) -> Callable[[CheckFunction], CheckFunction]:
    """Register the decorated function as the check ``name`` (described in one line)."""

    def register(function: CheckFunction) -> CheckFunction:
        CHECKS[name] = Check(name, description, function)
        return function

    return register


def _expected_shape(ctx: CheckContext, key: str) -> list[int]:
    """The documented shape of ``key`` in :attr:`CheckContext.full_cache`: ``[2, 2, width]``
    (2 examples, 2 position slots), or ``[2, 2, seq]`` for patterns over all keys."""
    m, kind = ctx.m, parse_point(key).kind
    if kind == "pattern":
        return [2, 2, ctx.batch["input_ids"].shape[1]]
    return [2, 2, width_of(kind, m)]  # the width the point table documents


@check("activation points fire", "every activation point fires with its documented shape")
def _points_fire(ctx: CheckContext) -> tuple[bool, str]:
    tensors = ctx.full_cache.tensors()
    wrong = [
        f"{key} {list(value.shape)}"
        for key, value in tensors.items()
        if key not in ("position_mask", "logits") and list(value.shape) != _expected_shape(ctx, key)
    ]
    if wrong:
        return False, "wrong shapes: " + ", ".join(wrong[:4])
    return True, f"{len(tensors)} tensors"


@check("resid chain", "resid_out_l equals resid_in_{l+1} exactly")
def _resid_chain(ctx: CheckContext) -> tuple[bool, str]:
    cache = ctx.full_cache
    bad = [
        layer
        for layer in range(ctx.last_layer)
        if not torch.equal(
            cache[point_key("resid_out", layer)], cache[point_key("resid_in", layer + 1)]
        )
    ]
    if bad:
        return False, f"differs at layers {bad[:5]}"
    return True, "resid_out_l == resid_in_{l+1} (exact)"


@check("HF hidden states", "resid_in_l equals HF's output_hidden_states[l]")
def _hidden_states(ctx: CheckContext) -> tuple[bool, str]:
    hm, row = ctx.hm, ctx.first_row
    cache = hm.forward(row, ["all"], extraction_config=ExtractionConfig(extract_resid_in=True))
    with torch.no_grad():
        reference = hm.hf_model(
            **{k: v.to(hm.device()) for k, v in row.items()}, output_hidden_states=True
        ).hidden_states
    results = [
        _close(cache[point_key("resid_in", layer)], reference[layer], ctx.rtol)
        for layer in range(ctx.m.n_layers)
    ]
    ok, worst = all(r[0] for r in results), max(r[1] for r in results)
    return ok, f"resid_in_l vs HF hidden_states[l], max diff {worst:.2e}"


def _decomposition_pairs(ctx: CheckContext, layer: int) -> list[tuple[torch.Tensor, ...]]:
    """(read, expected) pairs of one layer's residual decomposition, each ``[2, 2, d_model]``."""
    cache, parts = ctx.full_cache, ctx.m.layers[layer]
    with torch.no_grad():
        attn = cache[point_key("attn_out", layer)]
        attn = parts.attn_out_norm(attn) if parts.attn_out_norm is not None else attn
        mlp = cache[point_key("mlp_out", layer)]
        mlp = parts.mlp_out_norm(mlp) if parts.mlp_out_norm is not None else mlp
    resid_in, resid_out = cache[point_key("resid_in", layer)], cache[point_key("resid_out", layer)]
    if ctx.m.parallel_residual:
        return [(resid_out, resid_in + attn + mlp)]
    resid_mid = cache[point_key("resid_mid", layer)]
    return [(resid_mid, resid_in + attn), (resid_out, resid_mid + mlp)]


@check("residual decomposition", "each block adds its attention and MLP outputs to the stream")
def _residual_decomposition(ctx: CheckContext) -> tuple[bool, str]:
    results = [
        _close(read, expected, ctx.rtol)
        for layer in range(len(ctx.m.layers))
        for read, expected in _decomposition_pairs(ctx, layer)
    ]
    ok, worst = all(r[0] for r in results), max(r[1] for r in results)
    shape = (
        "resid_in + attn + mlp"
        if ctx.m.parallel_residual
        else "resid_mid = resid_in + attn; resid_out = resid_mid + mlp"
    )
    return ok, f"{shape}, max diff {worst:.2e}"


@check("heads sum to attn_out", "the per-head outputs sum to the attention output minus bias")
def _heads_sum(ctx: CheckContext) -> tuple[bool, str]:
    cache, m = ctx.full_cache, ctx.m
    results = []
    for layer in {0, ctx.last_layer}:
        o_proj = getattr(m.layers[layer].attention, m.spec.o_proj)
        bias = o_proj.bias if getattr(o_proj, "bias", None) is not None else 0
        total = sum(cache[point_key("head_out", layer, h)] for h in range(m.n_heads))
        results.append(_close(total, cache[point_key("attn_out", layer)] - bias, ctx.rtol))
    ok, worst = all(r[0] for r in results), max(r[1] for r in results)
    return ok, f"sum_h head_out == attn_out - bias, max diff {worst:.2e}"


@check("pattern rows sum to 1", "each attention pattern row is a probability distribution")
def _pattern_rows(ctx: CheckContext) -> tuple[bool, str]:
    cache = ctx.full_cache
    sums = torch.stack(
        [cache[point_key("pattern", e["layer"], e["head"])].float().sum(-1) for e in ctx.heads]
    )
    worst = float((sums - 1).abs().max())
    return worst <= ctx.rtol * 10, f"rows sum to 1, max deviation {worst:.2e}"


@check("padded == one-by-one", "a left-padded batch gives, row by row, what each row gives alone")
def _padded_equals_alone(ctx: CheckContext) -> tuple[bool, str]:
    hm, batch, last = ctx.hm, ctx.batch, ctx.last_layer
    config = ExtractionConfig(extract_resid_out=True, layers=[last])
    together = hm.forward(batch, ["last", 0], extraction_config=config)
    results = []
    for row in range(2):
        real = batch["attention_mask"][row].bool()
        alone = hm.forward(
            {k: v[row : row + 1, real] for k, v in batch.items()},
            ["last", 0],
            extraction_config=config,
        )
        for key in (point_key("resid_out", last), "logits"):
            results.append(_close(together[key][row], alone[key][0], ctx.rtol))
    ok, worst = all(r[0] for r in results), max(r[1] for r in results)
    return ok, f"left-padded batch vs each row alone, max diff {worst:.2e}"


@check("plain forward bit-identical", "a forward with nothing requested is the plain HF forward")
def _bit_identical(ctx: CheckContext) -> tuple[bool, str]:
    hm, row = ctx.hm, ctx.first_row
    cache = hm.forward(row, ["all"])
    with torch.no_grad():
        plain = hm.hf_model(**{k: v.to(hm.device()) for k, v in row.items()}).logits
    same = torch.equal(cache["logits"], plain)
    return same, "hooked forward with nothing requested == plain HF forward"


def _writes(ctx: CheckContext) -> tuple[dict[str, Any], list[Any]]:
    """One write of each kind at the middle layer (by label), and writes that change nothing."""
    middle = ctx.m.n_layers // 2
    writes = {
        point_key("resid_out", middle): Ablation(point=point_key("resid_out", middle)),
        point_key("attn_out", middle): Ablation(point=point_key("attn_out", middle)),
        point_key("mlp_out", middle): Ablation(point=point_key("mlp_out", middle)),
        point_key("head_out", middle, 0): Ablation(point=point_key("head_out", middle, 0)),
        f"pattern L{middle}": PatternEdit(
            layer=middle, heads=[0], key_positions=[0], query_positions=["last"], op="zero"
        ),
    }
    noops = [
        Ablation(point=point_key("resid_out", middle), method="scale", factor=1.0),
        Steer(point=point_key("mlp_out", middle), vector=torch.zeros(ctx.m.d_model)),
    ]
    return writes, noops


@check("writes change the output", "each kind of write changes the logits; no-op writes do not")
def _writes_matter(ctx: CheckContext) -> tuple[bool, str]:
    hm, batch = ctx.hm, ctx.batch
    plain = hm.forward(batch, ["last"])["logits"]

    def unchanged(intervention: Any) -> bool:
        logits = hm.forward(batch, ["last"], interventions=[intervention])["logits"]
        return torch.equal(logits, plain)

    writes, noops = _writes(ctx)
    inert = [label for label, write in writes.items() if unchanged(write)]
    moved = [noop.point for noop in noops if not unchanged(noop)]
    detail = "each kind of write changes the logits; no-op writes change nothing"
    if inert:
        detail = f"writes with no effect: {inert}"
    if moved:
        detail += f"; no-op writes that changed the output: {moved}"
    return not inert and not moved, detail


# -- running -----------------------------------------------------------------------------------


def _run_check(entry: Check, ctx: CheckContext) -> CheckRow:
    """Run one check; a check that raises is a failed check whose detail is the error."""
    start = time.perf_counter()
    try:
        passed, detail = entry.run(ctx)
    except Exception as error:  # noqa: BLE001 - a check that crashes is a failed check
        first_line = (str(error).splitlines() or [""])[0][:120]
        passed, detail = False, f"raised {type(error).__name__}: {first_line}"
    return CheckRow(entry.name, passed, detail, time.perf_counter() - start)


def self_check(hm: Any, remember: bool = True, print_report: bool = True) -> CheckReport:
    """Run every check in :data:`CHECKS` on ``hm``'s model and return the report.

    Args:
        remember: store the outcomes in :func:`records_path` and warn when one changed since
            the last run (see the module docstring); ``HOOKSCOPE_REMEMBER_CHECKS=0`` overrides
            it to off. With remembering off nothing is read or written.
        print_report: print the report as a table.
    """
    dtype = next(hm.hf_model.parameters()).dtype
    report = CheckReport(
        hm.model_map.model_type,
        transformers.__version__,
        str(dtype).removeprefix("torch."),
        str(hm.device()),
    )
    ctx = CheckContext(hm, _tolerance(dtype), _synthetic_batch(hm))
    report.rows.extend(_run_check(entry, ctx) for entry in CHECKS.values())
    if remember and remembering_enabled():
        _remember(report)
    if print_report:
        print(report)
    return report


# -- remembered results ------------------------------------------------------------------------


def remembering_enabled() -> bool:
    """False when ``HOOKSCOPE_REMEMBER_CHECKS`` is ``0``, ``false``, ``no`` or ``off``.

    Raises:
        HookscopeError: for any other value than those and ``1``, ``true``, ``yes``, ``on``.
    """
    value = os.environ.get(REMEMBER_ENV, "").strip().lower()
    if value not in _ON + _OFF:
        raise HookscopeError(
            f"HOOKSCOPE_REMEMBER_CHECKS={os.environ[REMEMBER_ENV]!r} is not one of "
            "1/true/yes/on (remember self-check outcomes) or 0/false/no/off (do not)."
        )
    return value not in _OFF


def records_path() -> Path:
    """Where self-check outcomes are remembered: ``$HOOKSCOPE_CACHE/self_checks.json``."""
    return cache_dir() / "self_checks.json"


def _load_records() -> dict[str, dict[str, bool]]:
    path = records_path()
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def remembered_results(model_type: str | None = None) -> dict[str, dict[str, bool]]:
    """The remembered self-check outcomes, read from :func:`records_path` when called.

    Returns:
        ``{"model_type|transformers version|dtype": {check name: passed}}``, only the keys of
        ``model_type`` when given; empty when nothing was remembered.
    """
    records = _load_records()
    if model_type is None:
        return records
    return {key: rows for key, rows in records.items() if key.split("|")[0] == model_type}


def _remember(report: CheckReport) -> None:
    """Store the outcome; warn about checks whose outcome changed since the last run."""
    records = _load_records()
    previous = records.get(report.key)
    current = {row.name: row.passed for row in report.rows}
    if previous is not None:
        changed = [name for name, passed in current.items() if previous.get(name, passed) != passed]
        if changed:
            warnings.warn(
                f"hookscope self-check for {report.key}: outcome changed since the last run for {changed}",
                stacklevel=3,
            )
    records[report.key] = current
    path = records_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(records, indent=1, sort_keys=True))
    tmp.replace(path)
