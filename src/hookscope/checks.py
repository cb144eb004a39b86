"""Self-checks: verify on the loaded model that hookscope's numbers are the model's numbers.

``hm.self_check()`` runs, in seconds, on a small synthetic padded batch: every activation point
fires with its documented shape; the identities hold (``resid_out_l == resid_in_{l+1}``, HF
hidden states, the residual decomposition, heads summing to the attention output, pattern rows
summing to 1); a padded batch equals one-by-one; a write at each kind of point changes the output
and a no-op write changes nothing; a hooked forward with nothing requested is bit-identical to
the plain one. Results are remembered per (model_type, transformers version, dtype) in
hookscope's cache folder, and a later run (or load) warns when a check's outcome changed.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers

from .config import ExtractionConfig
from .interventions import Ablation, PatternEdit, Steer
from .loading import cache_dir
from .points import parse_point, point_key, width_of


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
    """Random token ids, left-padded rows of different lengths."""
    vocab = hm.hf_model.config.get_text_config().vocab_size
    generator = torch.Generator().manual_seed(0)
    total = max(lengths)
    ids = torch.randint(min(10, vocab - 1), vocab, (len(lengths), total), generator=generator)
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, total - n :] = 1
    pad = getattr(hm.get_text_tokenizer(), "pad_token_id", None) or 0
    return {"input_ids": ids.masked_fill(mask == 0, pad), "attention_mask": mask}


def self_check(hm: Any, remember: bool = True, print_report: bool = True) -> CheckReport:
    """Run every check on ``hm``'s model (see the module docstring) and return the report."""
    m = hm.model_map
    dtype = next(hm.hf_model.parameters()).dtype
    report = CheckReport(
        m.model_type, transformers.__version__, str(dtype).removeprefix("torch."), str(hm.device())
    )
    rtol = _tolerance(dtype)
    batch = _synthetic_batch(hm)
    last_layer = m.n_layers - 1
    heads = [{"layer": layer, "head": h} for layer in {0, last_layer} for h in range(m.n_heads)]
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
        attn_heads=heads,
    )
    state: dict[str, Any] = {}

    def run(name: str, check: Callable[[], tuple[bool, str]]) -> None:
        start = time.perf_counter()
        try:
            passed, detail = check()
        except Exception as error:  # noqa: BLE001 - a check that crashes is a failed check
            passed, detail = (
                False,
                f"raised {type(error).__name__}: {str(error).splitlines()[0][:120]}",
            )
        report.rows.append(CheckRow(name, passed, detail, time.perf_counter() - start))

    def points_fire():
        cache = hm.forward(batch, ["last", 0], extraction_config=everything)
        state["cache"] = cache
        wrong = []
        for key, value in cache.tensors().items():
            if key in ("position_mask", "logits"):
                continue
            point = parse_point(key)
            if point.kind == "pattern":
                ok = list(value.shape) == [2, 2, batch["input_ids"].shape[1]]
            else:  # the width the point table documents
                ok = list(value.shape) == [2, 2, width_of(point.kind, m)]
            if not ok:
                wrong.append(f"{key} {list(value.shape)}")
        count = len(cache.tensors())
        return not wrong, f"{count} tensors" if not wrong else "wrong shapes: " + ", ".join(
            wrong[:4]
        )

    def resid_chain():
        cache = state["cache"]
        bad = [
            layer
            for layer in range(last_layer)
            if not torch.equal(
                cache[point_key("resid_out", layer)], cache[point_key("resid_in", layer + 1)]
            )
        ]
        return (
            not bad,
            "resid_out_l == resid_in_{l+1} (exact)" if not bad else f"differs at layers {bad[:5]}",
        )

    def hidden_states():
        row = {k: v[:1, -7:] for k, v in batch.items()}
        cache = hm.forward(row, ["all"], extraction_config=ExtractionConfig(extract_resid_in=True))
        with torch.no_grad():
            reference = hm.hf_model(
                **{k: v.to(hm.device()) for k, v in row.items()}, output_hidden_states=True
            ).hidden_states
        results = [
            _close(cache[point_key("resid_in", layer)], reference[layer], rtol)
            for layer in range(m.n_layers)
        ]
        ok, worst = all(r[0] for r in results), max(r[1] for r in results)
        return ok, f"resid_in_l vs HF hidden_states[l], max diff {worst:.2e}"

    def residual_decomposition():
        cache = state["cache"]
        worst, ok = 0.0, True
        for layer, parts in enumerate(m.layers):
            with torch.no_grad():
                attn = cache[point_key("attn_out", layer)]
                attn = parts.attn_out_norm(attn) if parts.attn_out_norm is not None else attn
                mlp = cache[point_key("mlp_out", layer)]
                mlp = parts.mlp_out_norm(mlp) if parts.mlp_out_norm is not None else mlp
            resid_in, resid_out = (
                cache[point_key("resid_in", layer)],
                cache[point_key("resid_out", layer)],
            )
            if m.parallel_residual:
                pairs = [(resid_out, resid_in + attn + mlp)]
            else:
                resid_mid = cache[point_key("resid_mid", layer)]
                pairs = [(resid_mid, resid_in + attn), (resid_out, resid_mid + mlp)]
            for a, b in pairs:
                good, diff = _close(a, b, rtol)
                ok, worst = ok and good, max(worst, diff)
        shape = (
            "resid_in + attn + mlp"
            if m.parallel_residual
            else "resid_mid = resid_in + attn; resid_out = resid_mid + mlp"
        )
        return ok, f"{shape}, max diff {worst:.2e}"

    def heads_sum():
        cache = state["cache"]
        worst, ok = 0.0, True
        for layer in {0, last_layer}:
            o_proj = getattr(m.layers[layer].attention, m.spec.o_proj)
            bias = o_proj.bias if getattr(o_proj, "bias", None) is not None else 0
            total = sum(cache[point_key("head_out", layer, h)] for h in range(m.n_heads))
            good, diff = _close(total, cache[point_key("attn_out", layer)] - bias, rtol)
            ok, worst = ok and good, max(worst, diff)
        return ok, f"sum_h head_out == attn_out - bias, max diff {worst:.2e}"

    def pattern_rows():
        cache = state["cache"]
        sums = torch.stack(
            [cache[point_key("pattern", e["layer"], e["head"])].float().sum(-1) for e in heads]
        )
        worst = float((sums - 1).abs().max())
        return worst <= rtol * 10, f"rows sum to 1, max deviation {worst:.2e}"

    def padded_equals_alone():
        config = ExtractionConfig(extract_resid_out=True, layers=[last_layer])
        together = hm.forward(batch, ["last", 0], extraction_config=config)
        worst, ok = 0.0, True
        for row in range(2):
            real = batch["attention_mask"][row].bool()
            alone = hm.forward(
                {k: v[row : row + 1, real] for k, v in batch.items()},
                ["last", 0],
                extraction_config=config,
            )
            for key in (point_key("resid_out", last_layer), "logits"):
                good, diff = _close(together[key][row], alone[key][0], rtol)
                ok, worst = ok and good, max(worst, diff)
        return ok, f"left-padded batch vs each row alone, max diff {worst:.2e}"

    def bit_identical():
        row = {k: v[:1, -7:] for k, v in batch.items()}
        cache = hm.forward(row, ["all"])
        with torch.no_grad():
            plain = hm.hf_model(**{k: v.to(hm.device()) for k, v in row.items()}).logits
        return torch.equal(
            cache["logits"], plain
        ), "hooked forward with nothing requested == plain HF forward"

    def writes_matter():
        plain = hm.forward(batch, ["last"])["logits"]
        middle = m.n_layers // 2
        writes = {
            **{
                point_key(kind, middle): Ablation(point=point_key(kind, middle))
                for kind in ("resid_out", "attn_out", "mlp_out")
            },
            point_key("head_out", middle, 0): Ablation(point=point_key("head_out", middle, 0)),
            f"pattern L{middle}": PatternEdit(
                layer=middle, heads=[0], key_positions=[0], query_positions=["last"], op="zero"
            ),
        }
        inert = [
            f
            for f, iv in writes.items()
            if torch.equal(hm.forward(batch, ["last"], interventions=[iv])["logits"], plain)
        ]
        noops = [
            Ablation(point=point_key("resid_out", middle), method="scale", factor=1.0),
            Steer(point=point_key("mlp_out", middle), vector=torch.zeros(m.d_model)),
        ]
        moved = [
            iv.point
            for iv in noops
            if not torch.equal(hm.forward(batch, ["last"], interventions=[iv])["logits"], plain)
        ]
        ok = not inert and not moved
        detail = "each kind of write changes the logits; no-op writes change nothing"
        if inert:
            detail = f"writes with no effect: {inert}"
        if moved:
            detail += f"; no-op writes that changed the output: {moved}"
        return ok, detail

    run("activation points fire", points_fire)
    run("resid chain", resid_chain)
    run("HF hidden states", hidden_states)
    run("residual decomposition", residual_decomposition)
    run("heads sum to attn_out", heads_sum)
    run("pattern rows sum to 1", pattern_rows)
    run("padded == one-by-one", padded_equals_alone)
    run("plain forward bit-identical", bit_identical)
    run("writes change the output", writes_matter)
    if remember:
        _remember(report)
    if print_report:
        print(report)
    return report


def _records_path():
    return cache_dir() / "self_checks.json"


def _load_records() -> dict[str, dict[str, bool]]:
    path = _records_path()
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except (OSError, json.JSONDecodeError):
        return {}


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
    path = _records_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(records, indent=1, sort_keys=True))
    tmp.replace(path)


def warn_if_known_failures(model_type: str, dtype: torch.dtype) -> None:
    """At load: warn when an earlier self-check of this architecture failed some checks."""
    key = f"{model_type}|{transformers.__version__}|{str(dtype).removeprefix('torch.')}"
    failed = [name for name, passed in _load_records().get(key, {}).items() if not passed]
    if failed:
        warnings.warn(
            f"an earlier hookscope self-check of {key} failed: {failed}; run hm.self_check() for details.",
            stacklevel=3,
        )
