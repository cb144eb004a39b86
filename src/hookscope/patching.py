"""Activation patching: the reference design's ``compute_patching``, batched sweeps over layers x
positions / heads, a one-forward-per-site loop (the slow reference), and attribution patching.

Sweeps use "clean" for the run whose activations are copied and "corrupt" for the run they are
copied into. The metric is read at each example's last real token; with ``normalize`` it is
``(patched - corrupt) / (clean - corrupt)``: 1 means the patch restores the clean behaviour.

Batched sweeps expand the corrupt batch so that each row carries one (example, site) pair; a
hook per layer writes the clean value into the rows whose site is in that layer. A sweep costs
``ceil(sites x examples / batch_size)`` forwards instead of one forward per site.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from .capture import PointSite, locate
from .config import ExtractionConfig
from .errors import HookscopeError, InputError
from .hooks import ModuleHook, installed, reading_hook, replacing_hook
from .inputs import model_input_names
from .interventions import Patch
from .points import Point
from .positions import resolve_positions

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
    answers: Any, examples: int, metric: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if metric == "kl":
        return torch.zeros(examples, dtype=torch.long), None
    if answers is None:
        raise HookscopeError(
            f"metric {metric!r} needs answers=(correct_ids, wrong_ids) (token ids per example)."
        )
    correct, wrong = (
        answers if isinstance(answers, tuple | list) and len(answers) == 2 else (answers, None)
    )
    correct = torch.as_tensor(correct).reshape(-1)
    wrong = torch.as_tensor(wrong).reshape(-1) if wrong is not None else None
    if correct.numel() != examples or (wrong is not None and wrong.numel() != examples):
        raise HookscopeError(f"answers need one token id per example ({examples}).")
    if metric == "logit_diff" and wrong is None:
        raise HookscopeError("metric 'logit_diff' needs answers=(correct_ids, wrong_ids).")
    return correct, wrong


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


def _last_index(inputs: dict) -> torch.Tensor:
    """``[batch]``: each example's last real token (the metric is read there)."""
    return resolve_positions(["last"], inputs["attention_mask"]).index[:, 0]


def _last_logits(hm, inputs: dict, hooks: list[ModuleHook] | None = None) -> torch.Tensor:
    last = _last_index(inputs)
    kwargs = dict(inputs)
    if "use_cache" in model_input_names(hm.hf_model):
        kwargs["use_cache"] = False
    with torch.no_grad(), installed(hm.hf_model, hooks or []):
        logits = hm.hf_model(**kwargs).logits
    return logits[torch.arange(len(logits), device=logits.device), last.to(logits.device)]


def _baselines(hm, clean: Any, corrupt: Any, answers: Any, metric: str):
    """Aligned clean / corrupt inputs, answer ids, and the metric of both unpatched runs:
    ``(clean, corrupt, correct, wrong, clean_logprobs or None, clean_metric, corrupt_metric)``."""
    clean, corrupt = _pair(hm, clean, corrupt)
    correct, wrong = _answer_ids(answers, clean["input_ids"].shape[0], metric)
    clean_logits, corrupt_logits = _last_logits(hm, clean), _last_logits(hm, corrupt)
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


def _write_hook(
    site: PointSite, rows: torch.Tensor, positions: torch.Tensor, values: torch.Tensor
) -> ModuleHook:
    """A hook that sets ``tensor[rows, positions, site columns] = values`` (positions < 0: all)."""

    def write(module, tensor: torch.Tensor) -> torch.Tensor:
        new = tensor.clone()
        columns = site.columns.to(tensor.device) if site.columns is not None else None
        for row, position, value in zip(rows.tolist(), positions.tolist(), values, strict=True):
            where = slice(None) if position < 0 else position
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

    Returns:
        A :class:`PatchingResult`.
    """
    clean, corrupt, correct, wrong, clean_logprobs, clean_metric, corrupt_metric = _baselines(
        hm, clean, corrupt, answers, metric
    )
    examples = clean["input_ids"].shape[0]
    mask = clean["attention_mask"]
    slots = resolve_positions(["all"], mask)  # slot j of row i = its j-th real token
    sites, axes, labels = _sites(hm, point, per, layers, mask.sum(1))
    if "position" in labels:
        labels["position"] = hm.to_string_tokens(clean["input_ids"][0][slots.index[0]])
    run = _batched_sweep if batched else _looped_sweep
    patched, forwards = run(
        hm,
        clean,
        corrupt,
        point,
        sites,
        slots,
        batch_size,
        progress,
        lambda logits, ex: _metric(
            logits,
            metric,
            correct[ex],
            wrong[ex] if wrong is not None else None,
            clean_logprobs[ex] if clean_logprobs is not None else None,
        ),
    )
    per_example = patched.view(examples, *[len(labels[a]) for a in axes])
    return _result(
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


def _result(
    per_example, axes, labels, clean_metric, corrupt_metric, metric, normalize, method, forwards
):
    """Build a :class:`PatchingResult`; normalising maps the corrupt run to 0 and the clean run
    to 1 (attribution estimates a change, so it is only divided by clean - corrupt)."""
    if normalize:
        shape = (len(per_example), *[1] * (per_example.dim() - 1))
        baseline = corrupt_metric.view(shape) if method == "activation" else 0
        per_example = (per_example - baseline) / (clean_metric - corrupt_metric).view(shape)
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


def _batched_sweep(hm, clean, corrupt, point, sites, slots, batch_size, progress, metric_fn):
    layers = sorted({s[0] for s in sites})
    heads = point == "head"
    clean_acts = _full_activations(hm, clean, point, layers, heads)
    examples = clean["input_ids"].shape[0]
    rows = [(ex, site) for ex in range(examples) for site in range(len(sites))]
    results = torch.empty(len(rows))
    forwards = math.ceil(len(rows) / batch_size)
    for chunk_index in range(forwards):
        chunk = rows[chunk_index * batch_size : (chunk_index + 1) * batch_size]
        ex = torch.tensor([r[0] for r in chunk])
        batch = {k: v[ex] if isinstance(v, torch.Tensor) else v for k, v in corrupt.items()}
        hooks = []
        by_site: dict[tuple, list[int]] = {}
        for row, (_, site_index) in enumerate(chunk):
            layer, head, _ = sites[site_index]
            by_site.setdefault((layer, head), []).append(row)
        for (layer, head), site_rows in by_site.items():
            rows_t = torch.tensor(site_rows)
            positions, values = [], []
            for row in site_rows:
                example = chunk[row][0]
                slot = sites[chunk[row][1]][2]
                position = -1 if slot is None else int(slots.index[example, slot])
                source = clean_acts[(layer, head)][example]
                positions.append(position)
                values.append(source if position < 0 else source[position])
            hooks.append(
                _write_hook(
                    _site_of(hm, point, layer, head), rows_t, torch.tensor(positions), values
                )
            )
        logits = _last_logits(hm, batch, hooks)
        results[chunk_index * batch_size : chunk_index * batch_size + len(chunk)] = metric_fn(
            logits, ex
        )
        if progress:
            print(f"\rpatching sweep: {chunk_index + 1}/{forwards} forwards", end="", flush=True)
    if progress:
        print()
    return results, forwards


def _looped_sweep(hm, clean, corrupt, point, sites, slots, batch_size, progress, metric_fn):
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
    examples = clean["input_ids"].shape[0]
    m = hm.model_map
    layers = list(range(m.n_layers)) if layers is None else list(layers)
    heads = point == "head"
    clean_acts = _full_activations(hm, clean, point, layers, heads)

    tensors: dict[tuple, torch.Tensor] = {}
    hooks = []
    for layer in layers:
        site = _site_of(hm, point, layer, 0 if heads else None)

        def keep(tensor, key=layer):
            tensor.retain_grad()
            tensors[key] = tensor

        hooks.append(reading_hook(site.module, site.when, keep))
    last = _last_index(corrupt)
    with torch.enable_grad(), installed(hm.hf_model, hooks):
        logits = hm.hf_model(**corrupt, use_cache=False).logits
        _metric(
            logits[torch.arange(examples, device=logits.device), last.to(logits.device)],
            metric,
            correct,
            wrong,
        ).sum().backward()
    hm.hf_model.zero_grad(set_to_none=True)
    mask = corrupt["attention_mask"].bool()
    slots = resolve_positions(["all"], corrupt["attention_mask"])
    grids = []
    for layer in layers:
        tensor = tensors[layer]
        if heads:
            per_head = []
            for head in range(m.n_heads):
                site = _site_of(hm, point, layer, head)
                delta = clean_acts[(layer, head)] - site.read(tensor.detach())
                grad = site.read(tensor.grad)
                per_head.append(((delta * grad).sum(-1) * mask).sum(-1))  # [N]
            grids.append(torch.stack(per_head, 1))
        else:
            delta = clean_acts[(layer, None)] - tensor.detach()
            grids.append(
                slots.select((delta * tensor.grad).sum(-1, keepdim=True)).squeeze(-1)
            )  # [N, P]
    per_example = torch.stack(grids, 1)
    axes = ["layer", "head"] if heads else ["layer", "position"]
    labels = {"layer": layers}
    labels[axes[1]] = (
        list(range(m.n_heads))
        if heads
        else hm.to_string_tokens(clean["input_ids"][0][slots.index[0]])
    )
    return _result(
        per_example, axes, labels, clean_metric, corrupt_metric, metric, normalize, "attribution", 2
    )


# -- the reference design's entry point --------------------------------------------------------
def compute_patching(
    hm: Any,
    target_token_positions: Sequence[Any],
    base_dataloader: Any,
    target_dataloader: Any,
    patching_query: Sequence[dict[str, Any]] = (
        {"patching_elem": "@last", "layers_to_patch": [0], "activation_type": "resid_in_{}"},
    ),
    base_dictonary_idxs: Sequence[Any] | None = None,
    target_dictonary_idxs: Sequence[Any] | None = None,
    return_logit_diff: bool = False,
    batch_saver: Any = None,
    extraction_config: ExtractionConfig | None = None,
    **kwargs: Any,
):
    """Patch the base run's activations into the target run (batch by batch, examples aligned).

    ``patching_query`` entries: ``patching_elem`` (``"@last"``, ``"@0"``, a list of them),
    ``layers_to_patch`` and ``activation_type`` (``"resid_in_{}"``, ``"head_out_L{}H3"``...).
    ``base_dictonary_idxs`` / ``target_dictonary_idxs``: per batch, one token id (or a list,
    whose logits are averaged) per example.

    Returns an :class:`ActivationCache` of the patched target run (``extraction_config`` at
    ``target_token_positions``) and, with ``return_logit_diff``: ``logit_diff_in_clean``,
    ``logit_diff_in_patched`` (``[batch]``, logit(target) - logit(base) in the unpatched and
    patched target runs), ``logit_diff_variation`` (patched minus clean), and
    ``kl_clean_to_patched`` = KL(clean || patched) of the next-token distributions.
    """
    from .cache import ActivationCache

    queries = _parse_queries(patching_query)
    merged = ActivationCache(pad_token_id=hm._pad_token_id())
    base_batches, target_batches = list(base_dataloader), list(target_dataloader)
    if len(base_batches) != len(target_batches):
        raise HookscopeError(
            f"base and target dataloaders differ in length ({len(base_batches)} vs {len(target_batches)})."
        )
    if return_logit_diff and (base_dictonary_idxs is None or target_dictonary_idxs is None):
        raise HookscopeError(
            "return_logit_diff needs base_dictonary_idxs and target_dictonary_idxs."
        )
    for index, (base, target) in enumerate(zip(base_batches, target_batches, strict=True)):
        base_rows, target_rows = (
            len(hm.prepare_inputs(b, "cpu")["input_ids"]) for b in (base, target)
        )
        if base_rows != target_rows:
            raise InputError(
                f"compute_patching batch {index}: the base batch has {base_rows} examples, the target "
                f"batch {target_rows}; examples are patched row by row, so they must match."
            )
        interventions = []
        for positions, points in queries:
            config = ExtractionConfig(**_flags_for(points, hm.model_map), save_logits=False)
            source = hm.forward(base, positions, extraction_config=config)
            interventions += [Patch(point=p, positions=positions, source=source) for p in points]
        patched = hm.forward(
            target,
            list(target_token_positions),
            extraction_config=extraction_config,
            interventions=interventions,
            **kwargs,
        )
        if return_logit_diff:
            clean = hm.forward(target, ["last"])["logits"][:, 0]
            after = hm.forward(target, ["last"], interventions=interventions)["logits"][:, 0]
            base_ids, target_ids = base_dictonary_idxs[index], target_dictonary_idxs[index]
            in_clean = _logit_of(clean, target_ids) - _logit_of(clean, base_ids)
            in_patched = _logit_of(after, target_ids) - _logit_of(after, base_ids)
            patched["logit_diff_in_clean"] = in_clean
            patched["logit_diff_in_patched"] = in_patched
            patched["logit_diff_variation"] = in_patched - in_clean
            clean_lp, after_lp = clean.float().log_softmax(-1), after.float().log_softmax(-1)
            patched["kl_clean_to_patched"] = (clean_lp.exp() * (clean_lp - after_lp)).sum(-1)
        if batch_saver is not None and (payload := batch_saver(target)) is not None:
            patched["batch_saver"] = payload
        merged.cat(patched)
    return merged


def _logit_of(logits: torch.Tensor, ids: Any) -> torch.Tensor:
    """Per example: the logit of its token id, or the mean logit of its list of ids."""
    out = []
    for row, entry in enumerate(ids):
        entry = torch.as_tensor(entry).reshape(-1)
        out.append(logits[row, entry].float().mean())
    return torch.stack(out)


def _parse_queries(patching_query) -> list[tuple[list, list[str]]]:
    parsed = []
    for query in patching_query:
        missing = {"patching_elem", "layers_to_patch", "activation_type"} - set(query)
        if missing:
            raise HookscopeError(f"patching_query entry {query!r} lacks {sorted(missing)}.")
        elems = query["patching_elem"]
        elems = [elems] if isinstance(elems, str) else list(elems)
        positions = []
        for elem in elems:
            if not isinstance(elem, str) or not elem.startswith("@"):
                raise HookscopeError(f"patching_elem {elem!r} must look like '@last' or '@3'.")
            body = elem[1:]
            positions.append(int(body) if body.lstrip("-").isdigit() else body)
        points = [query["activation_type"].format(layer) for layer in query["layers_to_patch"]]
        parsed.append((positions, points))
    return parsed


def _flags_for(points: list[str], model_map: Any) -> dict[str, Any]:
    """ExtractionConfig flags that extract ``points`` (what the patches read from)."""
    from .config import FLAG_OF_KIND, HEAD_FLAGS, LAYER_FLAGS
    from .points import KINDS, parse_point

    flags: dict[str, Any] = {}
    heads = []
    for name in points:
        point = parse_point(name, model_map)
        kind = KINDS[point.kind].write_kind  # head_out's patch source is head_z
        if point.head is not None and kind in HEAD_FLAGS.values():
            flags[FLAG_OF_KIND[kind]] = True
            heads.append({"layer": point.layer, "head": point.head})
        elif point.head is None and kind in LAYER_FLAGS.values():
            flags[FLAG_OF_KIND[kind]] = True
        else:
            raise HookscopeError(f"activation_type {name!r} cannot be patched by compute_patching.")
    if heads:
        flags["attn_heads"] = heads
    return flags
