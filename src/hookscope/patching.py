"""Activation patching: batched sweeps over layers x positions / heads, a one-forward-per-site
loop (the slow reference), and attribution patching. (The reference design's
``compute_patching`` is in :mod:`hookscope.compat`.)

Sweeps use "clean" for the run whose activations are copied and "corrupt" for the run they are
copied into. The metric is read at each example's last real token; with ``normalize`` it is
``(patched - corrupt) / (clean - corrupt)``: 1 means the patch restores the clean behaviour.

Batched sweeps expand the corrupt batch so that each row carries one (example, site) pair; a
hook per layer writes the clean value into the rows whose site is in that layer. A sweep costs
``ceil(sites x examples / batch_size)`` forwards instead of one forward per site. By default
(``skip_unchanged``) each row also skips what its patch cannot change: it starts at the patched
layer from the corrupt run's residual stream and at the patched position from the corrupt run's
KV cache (:mod:`hookscope.sweep_reuse`), so rows that start late share a forward.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from .capture import PointSite, locate
from .config import ExtractionConfig
from .errors import HookscopeError, InputError, PositionError
from .hooks import ModuleHook, reading_hook, replacing_hook
from .interventions import Patch
from .points import Point
from .positions import resolve_positions
from .progress import ProgressBar
from .sweep_reuse import CorruptRun, SweepRow, record_corrupt_run, reuse_blocker, run_rows

Metric = Literal["logit_diff", "prob", "kl"]
SweepPoint = Literal["resid_in", "resid_out", "attn_out", "mlp_out", "head"]
_POINT_KIND = {
    "resid_in": "resid_in",
    "resid_out": "resid_out",
    "attn_out": "attn_out",
    "mlp_out": "mlp_out",
    "head": "head_z",
}


@dataclass
class PatchingResult:
    """A patching grid.

    Attributes:
        values: ``[*grid]``, the metric averaged over examples.
        per_example: ``[examples, *grid]``.
        axes: the grid's axis names, e.g. ``["layer", "position"]`` or ``["layer", "head"]``.
        labels: per axis, the label of each index (layers, heads, or example 0's tokens).
        clean_metric / corrupt_metric: ``[examples]``, the metric of the unpatched runs.
        metric, normalized, method: what the values mean (``method``: "activation" or "attribution").
        forwards: the sweep's forwards (not counting the baselines).
        path, fallback: how the sweep ran, and why it did not skip unchanged work when it could not.
    """

    values: torch.Tensor
    per_example: torch.Tensor
    axes: list[str]
    labels: dict[str, list]
    clean_metric: torch.Tensor
    corrupt_metric: torch.Tensor
    metric: str
    normalized: bool
    method: str = "activation"
    forwards: int = field(default=0)
    # what the sweep ran on, for reports: model, point, clean, corrupt, correct, wrong
    context: dict = field(default_factory=dict, repr=False, compare=False)

    def save(self, path: Any) -> Any:
        """Write this result as JSON (``hookscope report`` renders it); returns the path."""
        from .results import save_patching

        return save_patching(self, path)

    @staticmethod
    def load(path: Any) -> PatchingResult:
        """A result written by :meth:`save` (the file is checked field by field)."""
        from .results import load_result

        result = load_result(path)
        if not isinstance(result, PatchingResult):
            raise HookscopeError(f"{path} holds a {type(result).__name__}, not a PatchingResult.")
        return result

    def _repr_html_(self) -> str:
        from .report import notebook_view

        return notebook_view(self)

    #: how the sweep ran: "skip_unchanged" (rows start at their first changed layer and
    #: position, replaying the corrupt run below), "batched", "looped", or "attribution"
    path: str = "batched"
    #: why a sweep that could skip unchanged work ran the full batched path (None otherwise)
    fallback: str | None = None

    def __repr__(self) -> str:
        shape = " x ".join(f"{a} {n}" for a, n in zip(self.axes, self.values.shape, strict=True))
        return (
            f"PatchingResult({self.method} patching, {self.metric}"
            f"{' normalised' if self.normalized else ''}, {shape}, {self.forwards} forwards)"
        )


# -- inputs and metrics ------------------------------------------------------------------------
def _pair(hm, clean: Any, corrupt: Any) -> tuple[dict, dict]:
    clean, corrupt = hm.prepare_inputs(clean), hm.prepare_inputs(corrupt)
    if clean["input_ids"].shape != corrupt["input_ids"].shape or not torch.equal(
        clean["attention_mask"], corrupt["attention_mask"]
    ):
        raise InputError(
            f"clean and corrupt batches must align token by token: shapes {list(clean['input_ids'].shape)} "
            f"and {list(corrupt['input_ids'].shape)}, masks {'equal' if clean['attention_mask'].shape == corrupt['attention_mask'].shape and torch.equal(clean['attention_mask'], corrupt['attention_mask']) else 'different'}. "
            "Use prompt pairs of the same token length (pad both the same way)."
        )
    return clean, corrupt


def _answer_ids(
    answers: Any, examples: int, metric: str, tokenizer: Any = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``answers`` as ``(correct [examples], wrong [examples] or None)`` token ids.

    Each side is one token id or answer string for every example, or one per example; strings
    (``" Paris"``) must be exactly one token of the model's tokenizer.
    """
    if metric == "kl":
        return torch.zeros(examples, dtype=torch.long), None
    if answers is None:
        raise HookscopeError(
            f"metric {metric!r} needs answers=(correct, wrong): token ids or one-token strings, "
            "one per example or one for all."
        )
    correct, wrong = (
        answers if isinstance(answers, tuple | list) and len(answers) == 2 else (answers, None)
    )
    if metric == "logit_diff" and wrong is None:
        raise HookscopeError("metric 'logit_diff' needs answers=(correct, wrong).")
    correct = _answer_side(correct, examples, tokenizer, "correct")
    wrong = _answer_side(wrong, examples, tokenizer, "wrong") if wrong is not None else None
    return correct, wrong


def _answer_side(side: Any, examples: int, tokenizer: Any, what: str) -> torch.Tensor:
    """One side of ``answers`` -> ``[examples]`` token ids."""
    if isinstance(side, str) or (
        isinstance(side, list | tuple) and side and all(isinstance(a, str) for a in side)
    ):
        side = [one_token_id(tokenizer, a) for a in ([side] if isinstance(side, str) else side)]
    try:
        ids = torch.as_tensor(side).reshape(-1)
    except (TypeError, ValueError, RuntimeError) as error:
        raise HookscopeError(
            f"answers ({what}) must be token ids or one-token strings, got {side!r} ({error})."
        ) from None
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise HookscopeError(f"answers ({what}) must be integer token ids, got {side!r}.")
    if ids.numel() == 1:
        ids = ids.expand(examples)
    if ids.numel() != examples:
        raise HookscopeError(
            f"answers ({what}) need one token per example or one for all: got {ids.numel()} "
            f"for {examples} examples."
        )
    return ids.long()


def one_token_id(tokenizer: Any, text: str) -> int:
    """The id of ``text`` when it is exactly one token (no special tokens added).

    Raises:
        HookscopeError: for text of several tokens (naming them) or a model without a tokenizer.
    """
    if tokenizer is None:
        raise HookscopeError(f"answer {text!r} is a string but this model has no tokenizer.")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        pieces = [tokenizer.decode([i]) for i in ids]
        raise HookscopeError(
            f"answer {text!r} is {len(ids)} tokens {pieces}; answers must be single tokens "
            "(mind the leading space: ' Paris', not 'Paris')."
        )
    return int(ids[0])


def _metric(logits: torch.Tensor, metric: str, correct, wrong, clean_logprobs=None) -> torch.Tensor:
    """``logits [rows, vocab]`` at the last real token -> ``[rows]``."""
    logits = logits.float()
    rows = torch.arange(len(logits))
    if metric == "logit_diff":
        return logits[rows, correct] - logits[rows, wrong]
    if metric == "prob":
        return logits.softmax(-1)[rows, correct]
    logprobs = logits.log_softmax(-1)  # KL(clean || patched)
    return (clean_logprobs.exp() * (clean_logprobs - logprobs)).sum(-1)


def _last_logits(
    hm, inputs: dict, hooks: list[ModuleHook] | None = None, keep_gradient: bool = False
) -> torch.Tensor:
    """``[batch, vocab]`` logits at each example's last real token, from one call of the
    pipeline (so registered interventions apply, as in every other call); ``hooks`` run after
    the interventions on their modules."""
    config = ExtractionConfig(keep_gradient=keep_gradient)
    cache = hm.forward(inputs, ["last"], extraction_config=config, hooks=hooks or [])
    return cache["logits"][:, 0]


def _baselines(hm, clean: Any, corrupt: Any, answers: Any, metric: str):
    """Aligned clean / corrupt inputs, answer ids, and the metric of both unpatched runs:
    ``(clean, corrupt, correct, wrong, clean_logprobs or None, clean_metric, corrupt_metric)``."""
    clean, corrupt = _pair(hm, clean, corrupt)
    correct, wrong = _answer_ids(
        answers, clean["input_ids"].shape[0], metric, hm.get_text_tokenizer()
    )
    clean_logits, corrupt_logits = _last_logits(hm, clean), _last_logits(hm, corrupt)
    vocab = clean_logits.shape[-1]
    for what, ids in (("correct", correct), ("wrong", wrong)):
        if ids is not None and bool(((ids < 0) | (ids >= vocab)).any()):
            raise HookscopeError(  # a negative id would silently index from the vocabulary's end
                f"answers ({what}) hold token ids {ids.tolist()}; valid ids: 0..{vocab - 1}."
            )
    clean_logprobs = clean_logits.float().log_softmax(-1) if metric == "kl" else None
    clean_metric = _metric(clean_logits, metric, correct, wrong, clean_logprobs)
    corrupt_metric = _metric(corrupt_logits, metric, correct, wrong, clean_logprobs)
    return clean, corrupt, correct, wrong, clean_logprobs, clean_metric, corrupt_metric


# -- sites -------------------------------------------------------------------------------------
def _sites(
    hm, point: SweepPoint, per: str, layers, lengths: torch.Tensor
) -> tuple[list[tuple], list[str], dict]:
    m = hm.model_map
    layers = list(range(m.n_layers)) if layers is None else list(layers)
    if point == "head":
        if per not in ("head", "head_position"):
            raise HookscopeError(
                f"head sweeps take per='head' or per='head_position', got {per!r}."
            )
        if per == "head":
            return (
                [(layer, h, None) for layer in layers for h in range(m.n_heads)],
                ["layer", "head"],
                {"layer": layers, "head": list(range(m.n_heads))},
            )
    if per in ("position", "head_position"):
        if not bool((lengths == lengths[0]).all()):
            raise HookscopeError(
                f"a per-position sweep needs examples of one length (real tokens: {lengths.tolist()})."
            )
        n = int(lengths[0])
        if per == "head_position":
            return (
                [(layer, h, p) for layer in layers for h in range(m.n_heads) for p in range(n)],
                ["layer", "head", "position"],
                {"layer": layers, "head": list(range(m.n_heads)), "position": list(range(n))},
            )
        return (
            [(layer, None, p) for layer in layers for p in range(n)],
            ["layer", "position"],
            {"layer": layers, "position": list(range(n))},
        )
    if per == "layer":
        return [(layer, None, None) for layer in layers], ["layer"], {"layer": layers}
    raise HookscopeError(
        f"per={per!r} is not valid for point {point!r}; valid: 'position', 'layer' (and 'head', 'head_position' for heads)."
    )


def _site_of(hm, point: SweepPoint, layer: int, head: int | None) -> PointSite:
    return locate(Point(_POINT_KIND[point], layer, head), hm.model_map)


def _full_activations(
    hm, inputs: dict, point: SweepPoint, layers, heads: bool
) -> dict[tuple, torch.Tensor]:
    """Every needed module tensor of one run at every position: ``{(layer, head): [N, T, w]}``."""
    store: dict[tuple, torch.Tensor] = {}
    hooks = []
    for layer in layers:
        for head in range(hm.model_map.n_heads) if heads else [None]:
            site = _site_of(hm, point, layer, head)

            def keep(tensor, key=(layer, head), site=site):
                store[key] = site.read(tensor).detach()

            hooks.append(reading_hook(site.module, site.when, keep))
    _last_logits(hm, inputs, hooks)
    return store


def _chosen_positions(hm, clean: dict, items: Sequence[Any]) -> list[list[int]]:
    """Per row, the absolute indices ``items`` select, resolved on the clean inputs (clean and
    corrupt align token by token).

    Raises:
        PositionError: for an example where the items select no token (a sweep would patch
            nothing there and read the corrupt run as the patch's effect).
    """
    resolved = hm.position_context(clean).resolve(items)
    index, mask = resolved.index.cpu(), resolved.mask.cpu()
    chosen = [index[row][mask[row]].tolist() for row in range(len(index))]
    for row, positions in enumerate(chosen):
        if not positions:
            raise PositionError(
                f"positions={list(items)!r} select no token in example {row}: the sweep would "
                "patch nothing there. Give items every example has."
            )
    return chosen


def _write_hook(
    site: PointSite, rows: torch.Tensor, positions: torch.Tensor, values: torch.Tensor
) -> ModuleHook:
    """A hook that sets ``tensor[rows, positions, site columns] = values``; each row's position
    is an index, a list of indices, or < 0 for all of them."""

    def write(module, tensor: torch.Tensor) -> torch.Tensor:
        new = tensor.clone()
        columns = site.columns.to(tensor.device) if site.columns is not None else None
        for row, position, value in zip(rows.tolist(), positions, values, strict=True):
            where = slice(None) if isinstance(position, int) and position < 0 else position
            if columns is None:
                new[row, where] = value.to(new.dtype)
            else:
                new[row, where, columns[0] : columns[-1] + 1] = value.to(new.dtype)
        return new

    return replacing_hook(site.module, site.when, write)


# -- sweeps ------------------------------------------------------------------------------------
def activation_patching(
    hm: Any,
    clean: Any,
    corrupt: Any,
    answers: Any = None,
    point: SweepPoint = "resid_out",
    per: str = "position",
    layers: Sequence[int] | None = None,
    metric: Metric = "logit_diff",
    normalize: bool = True,
    batch_size: int = 16,
    batched: bool = True,
    progress: bool = False,
    positions: Sequence[Any] | None = None,
    skip_unchanged: bool | None = None,
) -> PatchingResult:
    """Patch clean activations into the corrupt run, one site at a time, and measure the metric.

    Args:
        hm: the HookedModel.
        clean, corrupt: aligned batches (same token length and padding), or lists of strings.
        answers: ``(correct_ids, wrong_ids)``, one token id per example, for ``logit_diff``
            (correct minus wrong) and ``prob`` (correct only).
        point: ``"resid_in"``, ``"resid_out"``, ``"attn_out"``, ``"mlp_out"``, or ``"head"``
            (a head's output, patched through its slice of the output-projection input).
        per: grid: ``"position"`` (layer x position, positions relative to the real tokens),
            ``"layer"`` (all positions at once), for heads ``"head"`` (layer x head, all
            positions) or ``"head_position"``.
        metric: ``"logit_diff"``, ``"prob"``, or ``"kl"`` (KL(clean || patched), not normalised).
        batch_size: rows per forward in the batched sweep.
        batched: False runs one forward per site through ``Patch`` interventions (slow; the
            reference the batched sweep is tested against).
        positions: with ``per="layer"`` or ``"head"``, patch only at these position items
            instead of every position, resolved per example on the clean inputs (e.g. the name
            token ``[{"text": " Mary"}]``, wherever it sits in each prompt).
        skip_unchanged: the batched sweep skips what a patch cannot change: each row starts at
            the patched layer from the corrupt run's residual stream and at the patched position
            from the corrupt run's KV cache (the same grid, several times faster). None (the
            default) does so where the model allows and otherwise runs the full batched sweep,
            saying why in ``result.fallback``; True requires it (raising where it cannot);
            False always runs the full batched sweep.

    Returns:
        A :class:`PatchingResult`.
    """
    _check_sweep_options(point, per, metric, batch_size)
    path, fallback = _sweep_path(hm, batched, skip_unchanged)
    if positions is not None and per not in ("layer", "head"):
        raise HookscopeError(
            f"positions= chooses where a per='layer' or per='head' sweep patches; per={per!r} "
            "already sweeps every position."
        )
    layers = [layers] if isinstance(layers, int) and not isinstance(layers, bool) else layers
    clean, corrupt, correct, wrong, clean_logprobs, clean_metric, corrupt_metric = _baselines(
        hm, clean, corrupt, answers, metric
    )
    examples = clean["input_ids"].shape[0]
    mask = clean["attention_mask"]
    slots = resolve_positions(["all"], mask)  # slot j of row i = its j-th real token
    sites, axes, labels = _sites(hm, point, per, layers, mask.sum(1))
    # each row's chosen absolute positions replace "every position" in per-layer / per-head sites
    chosen = _chosen_positions(hm, clean, positions) if positions is not None else None
    if "position" in labels:
        labels["position"] = hm.to_string_tokens(clean["input_ids"][0][slots.index[0]])

    def metric_fn(logits, ex):
        return _metric(
            logits,
            metric,
            correct[ex],
            wrong[ex] if wrong is not None else None,
            clean_logprobs[ex] if clean_logprobs is not None else None,
        )

    arguments = (hm, clean, corrupt, point, sites, slots, chosen, batch_size, progress, metric_fn)
    if path == "skip_unchanged":
        run = record_corrupt_run(hm, corrupt)
        if isinstance(run, str):
            if skip_unchanged:
                raise HookscopeError(f"skip_unchanged=True but {run}; pass skip_unchanged=False.")
            path, fallback = "batched", run
        else:
            patched, forwards = _reusing_sweep(*arguments, run)
    if path != "skip_unchanged":
        patched, forwards = (_batched_sweep if path == "batched" else _looped_sweep)(*arguments)
    per_example = patched.view(examples, *[len(labels[a]) for a in axes])
    result = _result(
        per_example,
        axes,
        labels,
        clean_metric,
        corrupt_metric,
        metric,
        normalize and metric != "kl",
        "activation",
        forwards,
    )
    result.path, result.fallback = path, fallback
    return result


def _sweep_path(hm: Any, batched: bool, skip_unchanged: bool | None) -> tuple[str, str | None]:
    """``(path, fallback reason)``: how an activation patching sweep runs.

    Raises:
        HookscopeError: for ``skip_unchanged=True`` where it cannot be honoured.
    """
    if skip_unchanged not in (None, True, False):
        raise HookscopeError(f"skip_unchanged must be None, True or False, got {skip_unchanged!r}.")
    if not batched:
        if skip_unchanged:
            raise HookscopeError(
                "skip_unchanged=True needs batched=True (batched=False is the one-forward-per-"
                "site reference)."
            )
        return "looped", None
    if skip_unchanged is False:
        return "batched", None
    blocker = reuse_blocker(hm)
    if blocker is None:
        return "skip_unchanged", None
    if skip_unchanged:
        raise HookscopeError(f"skip_unchanged=True but {blocker}; pass skip_unchanged=False.")
    return "batched", blocker


def _check_sweep_options(point: Any, per: Any, metric: Any, batch_size: Any) -> None:
    """The sweep's options name what exists (checked before any forward)."""
    if point not in _POINT_KIND:
        raise HookscopeError(f"point {point!r} cannot be swept; valid points: {list(_POINT_KIND)}.")
    valid_per = ("head", "head_position") if point == "head" else ("position", "layer")
    if per not in valid_per:
        raise HookscopeError(
            f"per={per!r} is not valid for point {point!r}; valid: {', '.join(map(repr, valid_per))}."
        )
    if metric not in ("logit_diff", "prob", "kl"):
        raise HookscopeError(f"metric {metric!r} is not one of 'logit_diff', 'prob', 'kl'.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise HookscopeError(f"batch_size must be a positive int, got {batch_size!r}.")


def _result(
    per_example, axes, labels, clean_metric, corrupt_metric, metric, normalize, method, forwards
):
    """Build a :class:`PatchingResult`; normalising maps the corrupt run to 0 and the clean run
    to 1 (attribution estimates a change, so it is only divided by clean - corrupt). When an
    example's clean and corrupt metrics are equal there is nothing to normalise by: the values
    come back unnormalised, with a warning that says so."""
    if normalize:
        gap = clean_metric - corrupt_metric
        flat = gap.abs() <= 1e-6 * clean_metric.abs().clamp(min=1.0)
        if bool(flat.any()):
            warnings.warn(
                f"patching: the clean and corrupt runs give the same {metric} for examples "
                f"{flat.nonzero().flatten().tolist()} (clean {clean_metric[flat].tolist()}), so "
                "(patched - corrupt) / (clean - corrupt) would divide by zero; the values are "
                "returned unnormalised (result.normalized is False). Check that the corrupt "
                "prompts really differ where it matters.",
                stacklevel=3,
            )
            normalize = False
    if normalize:
        shape = (len(per_example), *[1] * (per_example.dim() - 1))
        baseline = corrupt_metric.view(shape) if method == "activation" else 0
        per_example = (per_example - baseline) / gap.view(shape)
    return PatchingResult(
        per_example.mean(0),
        per_example,
        axes,
        labels,
        clean_metric,
        corrupt_metric,
        metric,
        normalize,
        method,
        forwards,
    )


def _site_position(
    slots: Any, chosen: list[list[int]] | None, example: int, slot: int | None
) -> int | list[int]:
    """Where a site patches in ``example``: its slot's position, the chosen positions of a
    ``positions=`` sweep, or -1 for every position."""
    if slot is not None:
        return int(slots.index[example, slot])
    return -1 if chosen is None else chosen[example]


def _rows_by_site(sites: Sequence[tuple], site_indices: Sequence[int]) -> dict[tuple, list[int]]:
    """The rows of one forward grouped by the ``(layer, head)`` they patch (one write hook
    each); ``site_indices[row]`` is the index in ``sites`` of that row's site."""
    by_site: dict[tuple, list[int]] = {}
    for row, site_index in enumerate(site_indices):
        layer, head, _ = sites[site_index]
        by_site.setdefault((layer, head), []).append(row)
    return by_site


def _batched_sweep(
    hm, clean, corrupt, point, sites, slots, chosen, batch_size, progress, metric_fn
):
    layers = sorted({s[0] for s in sites})
    heads = point == "head"
    clean_acts = _full_activations(hm, clean, point, layers, heads)
    examples = clean["input_ids"].shape[0]
    rows = [(ex, site) for ex in range(examples) for site in range(len(sites))]
    results = torch.empty(len(rows))
    forwards = math.ceil(len(rows) / batch_size)
    # real tokens per example on the host: the progress bar's counts without a device sync
    real_per_example = corrupt["attention_mask"].sum(1).cpu()
    with ProgressBar(len(rows), "patching sweep", progress, unit="row") as bar:
        for chunk_index in range(forwards):
            chunk = rows[chunk_index * batch_size : (chunk_index + 1) * batch_size]
            ex = torch.tensor([r[0] for r in chunk])
            batch = {k: v[ex] if isinstance(v, torch.Tensor) else v for k, v in corrupt.items()}
            hooks = []
            by_site = _rows_by_site(sites, [site_index for _, site_index in chunk])
            for (layer, head), site_rows in by_site.items():
                rows_t = torch.tensor(site_rows)
                positions, values = [], []
                for row in site_rows:
                    example = chunk[row][0]
                    position = _site_position(slots, chosen, example, sites[chunk[row][1]][2])
                    source = clean_acts[(layer, head)][example]
                    positions.append(position)
                    values.append(source if position == -1 else source[position])
                hooks.append(
                    _write_hook(_site_of(hm, point, layer, head), rows_t, positions, values)
                )
            logits = _last_logits(hm, batch, hooks)
            results[chunk_index * batch_size : chunk_index * batch_size + len(chunk)] = metric_fn(
                logits, ex
            )
            bar.update(len(chunk), int(real_per_example[ex].sum()))
    return results, forwards


def _reusing_rows(point, sites, slots, chosen, examples: int) -> list[tuple]:
    """Every (example, site) row as ``(SweepRow, site index, positions)``, sorted so that rows
    of one forward share their first position and are ordered by their first changed layer.
    A ``resid_out`` patch first changes layer ``l + 1`` (layer ``l`` is replayed, then
    written); every other point is inside layer ``l``."""
    shift = 1 if point == "resid_out" else 0
    slot_positions = slots.index.tolist()  # [N][P] absolute position of each slot
    if chosen is None:  # a site without a slot patches every real position (not padding)
        chosen = [slots.index[e][slots.mask[e]].tolist() for e in range(examples)]
    rows = []
    for example in range(examples):
        for index, (layer, _, slot) in enumerate(sites):
            positions = list(chosen[example]) if slot is None else [slot_positions[example][slot]]
            row = SweepRow(example, layer + shift, min(positions))
            rows.append((row, index, positions))
    order = sorted(range(len(rows)), key=lambda i: (rows[i][0].start, rows[i][0].first_layer))
    return [(*rows[i], i) for i in order]


def _reusing_sweep(
    hm, clean, corrupt, point, sites, slots, chosen, batch_size, progress, metric_fn,
    run: CorruptRun,
):  # fmt: skip
    """The batched sweep that skips unchanged work (:mod:`hookscope.sweep_reuse`): rows start
    at their first changed position from the corrupt KV cache and replay the corrupt run's
    layers below their first changed layer. Same grid as :func:`_batched_sweep`."""
    clean_acts = _full_activations(hm, clean, point, sorted({s[0] for s in sites}), point == "head")
    mask = corrupt["attention_mask"]
    last = resolve_positions(["last"], mask).index[:, 0]  # [N] last real token (absolute, CPU)
    real = mask.cpu()  # for the progress bar's token counts, without a device sync per forward
    rows = _reusing_rows(point, sites, slots, chosen, clean["input_ids"].shape[0])
    results = torch.empty(len(rows))
    chunks = _token_chunks(rows, batch_size, mask.shape[1])
    with ProgressBar(len(rows), "patching sweep", progress, unit="row") as bar:
        for chunk in chunks:
            chunk.sort(key=lambda item: item[0].first_layer)
            start = min(item[0].start for item in chunk)
            hooks = _window_writes(hm, point, sites, chunk, clean_acts, start)
            ex = torch.tensor([item[0].example for item in chunk])
            logits = run_rows(hm, corrupt, run, [item[0] for item in chunk], hooks, last[ex])
            results[torch.tensor([item[3] for item in chunk])] = metric_fn(logits, ex)
            # tokens actually fed: each row from the chunk's first start on
            fed = int(real[ex, start:].sum())
            bar.update(len(chunk), fed)
    return results, len(chunks)


def _token_chunks(rows: list[tuple], batch_size: int, seq: int) -> list[list[tuple]]:
    """``rows`` (sorted by first position) cut into forwards of at most ``batch_size`` full
    rows' worth of fed tokens and at most ``2 * batch_size`` rows: a forward feeds
    ``seq - start`` tokens per row from its first row's ``start``, so rows that start late share
    a forward with more rows (the activations of a layer as in the full batched sweep; the keys
    and values at most twice), never more forwards than the full sweep."""
    chunks: list[list[tuple]] = []
    for item in rows:
        if chunks and len(chunks[-1]) < 2 * batch_size:
            fed = seq - chunks[-1][0][0].start
            if (len(chunks[-1]) + 1) * fed <= batch_size * seq:
                chunks[-1].append(item)
                continue
        chunks.append([item])
    return chunks


def _window_writes(hm, point, sites, chunk, clean_acts, start: int) -> list[ModuleHook]:
    """One write hook per patched site of a chunk: the clean values at each row's positions,
    counted from ``start`` (the first position the forward feeds)."""
    hooks = []
    for (layer, head), site_rows in _rows_by_site(sites, [item[1] for item in chunk]).items():
        positions, values = [], []
        for row in site_rows:
            example, absolute = chunk[row][0].example, chunk[row][2]
            positions.append([p - start for p in absolute])
            values.append(clean_acts[(layer, head)][example, absolute])
        site = _site_of(hm, point, layer, head)
        hooks.append(_write_hook(site, torch.tensor(site_rows), positions, values))
    return hooks


def _looped_sweep(hm, clean, corrupt, point, sites, slots, chosen, batch_size, progress, metric_fn):
    if chosen is not None:
        return _looped_sweep_per_example(hm, clean, corrupt, point, sites, slots, chosen, metric_fn)
    examples = clean["input_ids"].shape[0]
    results = torch.empty(examples, len(sites))
    layers = sorted({s[0] for s in sites})
    clean_acts = _full_activations(hm, clean, point, layers, point == "head")
    for index, (layer, head, slot) in enumerate(sites):
        kind = _POINT_KIND[point]
        name = Point(kind, layer, head).name
        source = clean_acts[(layer, head)]  # [N, T, w] at absolute positions
        if slot is None:
            positions = ["all"]
            source = slots.select(source)
        else:
            positions = [slot]
            source = source[torch.arange(examples), slots.index[:, slot]].unsqueeze(1)
        patch = Patch(point=name, positions=positions, source=source)
        cache = hm.forward(corrupt, ["last"], interventions=[patch])
        results[:, index] = metric_fn(cache["logits"][:, 0], torch.arange(examples))
    return results.flatten(), len(sites)


def _looped_sweep_per_example(hm, clean, corrupt, point, sites, slots, chosen, metric_fn):
    """The reference for a ``positions=`` sweep: one forward per (example, site), each row
    alone with a ``Patch`` at its chosen positions (as offsets from its first real token)."""
    examples = clean["input_ids"].shape[0]
    results = torch.empty(examples, len(sites))
    clean_acts = _full_activations(hm, clean, point, sorted({s[0] for s in sites}), point == "head")
    for example in range(examples):
        row = {
            k: v[example : example + 1] if isinstance(v, torch.Tensor) else v
            for k, v in corrupt.items()
        }
        positions, first = chosen[example], int(slots.index[example, 0])
        for index, (layer, head, _) in enumerate(sites):
            source = clean_acts[(layer, head)][example, positions].unsqueeze(0)  # [1, P, w]
            name = Point(_POINT_KIND[point], layer, head).name
            patch = Patch(point=name, positions=[p - first for p in positions], source=source)
            logits = hm.forward(row, ["last"], interventions=[patch])["logits"][:, 0]
            results[example, index] = metric_fn(logits, torch.tensor([example]))[0]
    return results.flatten(), examples * len(sites)


def _corrupt_gradients(hm, corrupt, point, layers, metric_fn) -> dict[int, torch.Tensor]:
    """Each layer's point tensor ``[N, T, w]`` in the corrupt run, with ``.grad`` holding
    d(sum of the metric)/d(tensor) from one forward and one backward."""
    heads = point == "head"
    tensors: dict[int, torch.Tensor] = {}
    hooks = []
    for layer in layers:
        site = _site_of(hm, point, layer, 0 if heads else None)

        def keep(tensor, key=layer):
            tensor.retain_grad()
            tensors[key] = tensor

        hooks.append(reading_hook(site.module, site.when, keep))
    logits = _last_logits(hm, corrupt, hooks, keep_gradient=True)
    metric_fn(logits).sum().backward()
    hm.hf_model.zero_grad(set_to_none=True)
    return tensors


def _attribution_row(hm, point, layer, tensor, clean_acts, slots, mask) -> torch.Tensor:
    """One layer's attribution ``(clean - corrupt) . grad``: ``[N, heads]`` (summed over real
    positions) for head sweeps, else ``[N, P]`` per real position slot."""
    if point != "head":
        delta = clean_acts[(layer, None)] - tensor.detach()
        return slots.select((delta * tensor.grad).sum(-1, keepdim=True)).squeeze(-1)
    per_head = []
    for head in range(hm.model_map.n_heads):
        site = _site_of(hm, point, layer, head)
        delta = clean_acts[(layer, head)] - site.read(tensor.detach())
        grad = site.read(tensor.grad)
        per_head.append(((delta * grad).sum(-1) * mask).sum(-1))  # [N]
    return torch.stack(per_head, 1)


def attribution_patching(
    hm: Any,
    clean: Any,
    corrupt: Any,
    answers: Any = None,
    point: SweepPoint = "resid_out",
    layers: Sequence[int] | None = None,
    metric: Metric = "logit_diff",
    normalize: bool = True,
) -> PatchingResult:
    """The gradient approximation of :func:`activation_patching` per layer x position (heads:
    layer x head): ``(clean - corrupt) . d metric / d activation`` at the corrupt run, from one
    forward and one backward (plus one clean forward)."""
    if metric == "kl":
        raise HookscopeError(
            "attribution patching of KL is not supported (its gradient at the corrupt run is not the first-order effect)."
        )
    clean, corrupt, correct, wrong, _, clean_metric, corrupt_metric = _baselines(
        hm, clean, corrupt, answers, metric
    )
    m = hm.model_map
    layers = list(range(m.n_layers)) if layers is None else list(layers)
    heads = point == "head"
    clean_acts = _full_activations(hm, clean, point, layers, heads)

    tensors = _corrupt_gradients(hm, corrupt, point, layers, lambda logits: _metric(
        logits, metric, correct, wrong
    ))  # fmt: skip
    slots = resolve_positions(["all"], corrupt["attention_mask"])
    mask = corrupt["attention_mask"].bool()
    grids = [
        _attribution_row(hm, point, layer, tensors[layer], clean_acts, slots, mask)
        for layer in layers
    ]
    per_example = torch.stack(grids, 1)
    axes = ["layer", "head"] if heads else ["layer", "position"]
    labels = {"layer": layers}
    labels[axes[1]] = (
        list(range(m.n_heads))
        if heads
        else hm.to_string_tokens(clean["input_ids"][0][slots.index[0]])
    )
    result = _result(
        per_example, axes, labels, clean_metric, corrupt_metric, metric, normalize, "attribution", 2
    )
    result.path = "attribution"
    return result
