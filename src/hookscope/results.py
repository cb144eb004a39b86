"""Results as report sections, and saved results (``PatchingResult`` and lens summaries as JSON).

:func:`section_of` turns a result into one section of a :class:`~hookscope.report.Report`;
:func:`save_patching`, :func:`save_lens` and :func:`load_result` write and read the files that
``hookscope patch`` / ``hookscope lens`` save and ``hookscope report`` renders. A saved file is
untrusted input: every field is checked (type, shape) and a bad one raises a
:class:`~hookscope.errors.HookscopeError` naming the file and the field; nothing is unpickled.

The files are strict JSON (any JSON parser reads them). JSON has no literal for NaN or
infinity, so a non-finite number is written as the string ``"NaN"``, ``"Infinity"`` or
``"-Infinity"``; in the number grids (values, metrics, probabilities, KL...) these strings are
read back as the float they stand for, so a round trip keeps NaN and +/-inf exactly. (In
``context``, free-form metadata, such a float is saved as that string and read back as the
string.) Files written by older versions with bare ``NaN`` / ``Infinity`` literals still load.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import HookscopeError
from .report import (
    Plain,
    _e,
    _fmt,
    attention_view,
    bar_chart,
    heatmap,
    key_values,
    section,
)

PATCHING_FORMAT = "hookscope.PatchingResult/1"
LENS_FORMAT = "hookscope.LensSummary/1"


# -- patching ----------------------------------------------------------------------------------
def _metric_label(result: Any) -> str:
    if result.normalized:
        what = "restored fraction" if result.method == "activation" else "estimated restored"
        return f"{what} ({result.metric}; clean = 1, corrupt = 0)"
    return result.metric


def _patching_title(result: Any) -> tuple[str, str]:
    """(title, subtitle naming the prompts and answers) of a patching result."""
    context = getattr(result, "context", None) or {}
    point = f" of {context['point']}" if context.get("point") else ""
    grid = " x ".join(result.axes)
    title = f"{result.method.capitalize()} patching{point} per {grid}: {result.metric}"
    lines = []
    if context.get("model"):
        lines.append(f"model: {context['model']}")
    if context.get("clean") is not None:
        lines.append(f"clean:   {context['clean']!r}")
    if context.get("corrupt") is not None:
        lines.append(f"corrupt: {context['corrupt']!r}")
    if context.get("correct") is not None:
        wrong = f" vs wrong {context['wrong']!r}" if context.get("wrong") is not None else ""
        lines.append(f"answer: correct {context['correct']!r}{wrong}")
    return title, "\n".join(lines)


def _axis(result: Any, name: str) -> tuple[str, list]:
    labels = list(result.labels.get(name, range(result.values.shape[result.axes.index(name)])))
    if name != "position":
        labels = [Plain(str(label)) for label in labels]
    return name, labels


def patching_figures(result: Any) -> list[str]:
    """Figures of a patching grid: a bar chart (1-D), a heatmap (2-D), or one heatmap per
    head (3-D, ``layer x head x position``)."""
    values, label = result.values, _metric_label(result)
    if values.dim() == 1:
        short = "restored fraction" if result.normalized else result.metric
        return [bar_chart(values, _axis(result, result.axes[0]), short)]
    if values.dim() == 2:
        rows, cols = (_axis(result, a) for a in result.axes)
        return [heatmap(values, rows, cols, label, diverging=True)]
    if values.dim() == 3:
        rows, middle, cols = (_axis(result, a) for a in result.axes)
        return [
            f'<h3 class="hs-sub">{_e(middle[0])} {_e(m)}</h3>'
            + heatmap(values[:, i], rows, cols, label, diverging=True)
            for i, m in enumerate(middle[1])
        ]
    raise HookscopeError(f"cannot draw a patching result with axes {result.axes}.")


def _strongest(result: Any, count: int = 5) -> list[tuple[str, float]]:
    """The ``count`` sites with the largest |value|: (where, value)."""
    values = result.values.float()
    flat = values.nan_to_num(0).abs().flatten()
    where = []
    for index in flat.topk(min(count, flat.numel())).indices.tolist():
        coords = list(torch.unravel_index(torch.tensor(index), values.shape))
        parts = []
        for axis, coord in zip(result.axes, coords, strict=True):
            labels = result.labels.get(axis)
            label = labels[int(coord)] if labels is not None else int(coord)
            parts.append(
                f"{axis} {int(coord)} {label!r}" if axis == "position" else f"{axis} {label}"
            )
        where.append((", ".join(parts), float(values.flatten()[index])))
    return where


def patching_numbers(result: Any) -> str:
    """The numbers the terminal prints for a sweep: baselines, cost, strongest sites."""
    clean, corrupt = result.clean_metric.float(), result.corrupt_metric.float()
    rows = [
        ("metric", _metric_label(result)),
        (f"clean {result.metric}", _per_example(clean)),
        (f"corrupt {result.metric}", _per_example(corrupt)),
        ("examples", len(clean)),
        ("sites", result.values.numel()),
        ("forwards", result.forwards),
    ]
    strongest = [(where, _fmt(value)) for where, value in _strongest(result)]
    return key_values(rows) + "<br>" + key_values(strongest, ["strongest sites", "value"])


def _per_example(values: torch.Tensor) -> str:
    if len(values) == 1:
        return _fmt(float(values[0]))
    shown = ", ".join(_fmt(v) for v in values[:4].tolist()) + (", …" if len(values) > 4 else "")
    return f"mean {_fmt(float(values.mean()))} ({shown})"


def patching_section(result: Any, title: str | None = None, options: dict | None = None) -> str:
    options = options or {}
    if options:
        result = _with_context(result, options)
    auto_title, subtitle = _patching_title(result)
    return section(
        title or auto_title, subtitle, patching_figures(result), patching_numbers(result)
    )


def _with_context(result: Any, options: dict) -> Any:
    """A shallow copy of ``result`` whose context holds ``prompts=(clean, corrupt)``,
    ``answers=(correct, wrong)``, ``model`` and ``point`` given to :meth:`Report.add`."""
    import copy

    unknown = set(options) - {"prompts", "answers", "model", "point"}
    if unknown:
        raise HookscopeError(
            f"Report.add(PatchingResult) takes prompts, answers, model, point; got {sorted(unknown)}."
        )
    context = dict(getattr(result, "context", None) or {})
    if "prompts" in options:
        context["clean"], context["corrupt"] = _pair_of(options["prompts"], "prompts")
    if "answers" in options:
        context["correct"], context["wrong"] = _pair_of(options["answers"], "answers")
    context.update({k: options[k] for k in ("model", "point") if k in options})
    result = copy.copy(result)
    result.context = context
    return result


def _pair_of(value: Any, name: str) -> tuple[Any, Any]:
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise HookscopeError(
            f"{name} must be a pair (clean/correct, corrupt/wrong), got {value!r}."
        )
    return value[0], value[1]


# -- logit lens --------------------------------------------------------------------------------
@dataclass
class LensSummary:
    """What a report shows of a logit lens, small enough to save as JSON.

    Attributes:
        layers: ``[L]`` the layer of each row; tokens: ``[P]`` the token of each position.
        top_tokens / top_probs: ``[L][P][k]`` the k most likely tokens and their probability.
        kl: ``[L][P]`` KL(final || layer); target_prob / target_rank: ``[L][P]`` or None.
    """

    point: str
    layers: list[int]
    tokens: list[str]
    top_tokens: list[list[list[str]]]
    top_probs: list[list[list[float]]]
    kl: list[list[float]]
    target: str | None = None
    target_prob: list[list[float]] | None = None
    target_rank: list[list[int]] | None = None
    context: dict = field(default_factory=dict)

    def _repr_html_(self) -> str:
        from .report import notebook_view

        return notebook_view(self)


def lens_summary(
    lens: Any, example: int = 0, k: int = 3, target: int | None = None, context: dict | None = None
) -> LensSummary:
    """The :class:`LensSummary` of one example of a ``LensResult`` (``target``: a token id
    whose probability and rank are kept)."""
    examples = lens.logits.shape[1]
    if not -examples <= example < examples:
        raise HookscopeError(f"example {example!r} is out of range: the lens holds {examples}.")
    probs = lens.probs[:, example]  # [L, P, vocab]
    top_p, top_id = probs.topk(k, dim=-1)
    summary = LensSummary(
        point=lens.point,
        layers=list(lens.layers),
        tokens=list(lens.tokens[example]),
        top_tokens=[[lens.to_string(ids) for ids in layer.tolist()] for layer in top_id],
        top_probs=top_p.tolist(),
        kl=lens.kl_to_final()[:, example].tolist(),
        context=dict(context or {}),
    )
    if target is not None:
        summary.target = lens.to_string([target])[0]
        summary.target_prob = lens.prob(target)[:, example].tolist()
        summary.target_rank = lens.rank(target)[:, example].tolist()
    return summary


def lens_section(summary: LensSummary, title: str | None = None) -> str:
    """A heatmap layers x positions (colour: top-token probability, text: the top token) and
    the last position's readout per layer beside it."""
    prompt = summary.context.get("prompt") or "".join(summary.tokens)
    title = title or f"Logit lens on {summary.point}: {prompt!r}"
    sub = [f"model: {summary.context['model']}"] if summary.context.get("model") else []
    if summary.target is not None:
        sub.append(f"target: {summary.target!r} (its probability and rank in each tooltip)")
    top1 = torch.tensor([[p[0] for p in row] for row in summary.top_probs])
    text = [[t[0] for t in row] for row in summary.top_tokens]
    figure = heatmap(
        top1,
        ("layer", [Plain(str(layer)) for layer in summary.layers]),
        ("position", summary.tokens),
        "top-token probability",
        cell_text=text,
        cell_tips=_lens_tips(summary),
    )
    return section(title, "\n".join(sub), [figure], _lens_numbers(summary))


def _lens_tips(summary: LensSummary) -> list[list[str]]:
    tips = []
    for r, row in enumerate(summary.top_tokens):
        tips.append([])
        for p, tops in enumerate(row):
            lines = [
                f"#{i + 1} {t!r} p={_fmt(q)}"
                for i, (t, q) in enumerate(zip(tops, summary.top_probs[r][p], strict=True))
            ]
            if summary.target is not None:
                lines.append(
                    f"target {summary.target!r}: p={_fmt(summary.target_prob[r][p])}, "
                    f"rank {summary.target_rank[r][p]}"
                )
            lines.append(f"KL(final || layer) = {_fmt(summary.kl[r][p])}")
            tips[-1].append("\n".join(lines))
    return tips


def _lens_numbers(summary: LensSummary) -> str:
    """Per layer, at the last position: the top token and its probability (and the target's)."""
    last = len(summary.tokens) - 1
    header = ["layer", "top token", "p"]
    if summary.target is not None:
        header += [f"p({summary.target!r})", "rank"]
    rows = []
    for r, layer in enumerate(summary.layers):
        row = [layer, repr(summary.top_tokens[r][last][0]), summary.top_probs[r][last][0]]
        if summary.target is not None:
            row += [summary.target_prob[r][last], summary.target_rank[r][last]]
        rows.append(row)
    note = f'<p class="hs-sub">last position: {_e(repr(summary.tokens[last]))}</p>'
    return note + key_values(rows, header)


# -- caches and stores -------------------------------------------------------------------------
def _slot_labels(mapping: Any, slots: int) -> list[Plain]:
    """Each position slot's name from a cache's ``mapping_index`` (``last``, ``0:2[1]``)."""
    labels = [Plain(f"slot {i}") for i in range(slots)]
    if isinstance(mapping, dict):
        for item, indices in mapping.items():
            for j, slot in enumerate(indices):
                if 0 <= slot < slots:
                    name = str(item) if len(indices) == 1 else f"{item}[{j}]"
                    labels[slot] = Plain(name)
    return labels


def activation_norms(cache: Any) -> dict[str, torch.Tensor]:
    """Per layer kind, ``[layers, P]`` the mean L2 norm over examples (real slots only), and
    the layers: ``{kind: (layers, norms)}``."""
    from .points import parse_point

    mask = cache.get("position_mask")
    by_kind: dict[str, dict[int, torch.Tensor]] = {}
    for key, value in cache.tensors().items():
        try:
            point = parse_point(key)
        except (HookscopeError, ValueError):
            continue
        if point.layer is None or point.head is not None or value.dim() != 3:
            continue
        norms = value.detach().float().norm(dim=-1)  # [batch, P]
        weight = (
            mask.float()
            if isinstance(mask, torch.Tensor) and mask.shape == norms.shape
            else torch.ones_like(norms)
        )
        by_kind.setdefault(point.kind, {})[point.layer] = (norms * weight).sum(0) / weight.sum(
            0
        ).clamp(min=1)
    return {
        kind: (sorted(layers), torch.stack([layers[layer] for layer in sorted(layers)]))
        for kind, layers in by_kind.items()
    }


def _describe(value: Any) -> tuple[str, str]:
    if isinstance(value, torch.Tensor):
        return str(list(value.shape)), str(value.dtype).removeprefix("torch.")
    text = repr(value)
    return (text if len(text) <= 60 else f"{type(value).__name__}(…)"), ""


def cache_section(cache: Any, title: str | None = None) -> str:
    """A cache's keys, shapes and dtypes, and a heatmap of activation norms per layer kind."""
    from .cache import _human_bytes

    cache_keys = list(cache.keys())
    rows = [(key, *_describe(cache[key])) for key in cache_keys]
    figures = []
    slots_mapping = cache.get("mapping_index")
    for kind, (layers, norms) in activation_norms(cache).items():
        figures.append(
            f'<h3 class="hs-sub">{_e(kind)}: mean L2 norm over examples</h3>'
            + heatmap(
                norms,
                ("layer", [Plain(str(layer)) for layer in layers]),
                ("position slot", _slot_labels(slots_mapping, norms.shape[1])),
                f"mean ||{kind}||",
            )
        )
    title = title or f"ActivationCache: {len(cache_keys)} keys, {_human_bytes(cache.memory_size())}"
    return section(title, None, figures, key_values(rows, ["key", "shape", "dtype"]))


def store_section(store: Any, title: str | None = None) -> str:
    """A store's folder, size, completeness and keys with their shapes over every example."""
    from .cache import read_safetensors_header
    from .store import confined

    manifest = store.manifest
    shards = manifest.get("shards", [])
    size = sum(shard.get("bytes", 0) for shard in shards) / 2**20
    rows = [
        ("folder", str(store.folder)),
        ("examples", len(store)),
        ("complete", "yes" if store.complete else "no (a run stopped or is running)"),
        ("shards", f"{len(shards)} ({size:.1f} MB)"),
        ("model", manifest.get("model", "?")),
    ]
    keys = []
    if shards:
        entries = read_safetensors_header(confined(store.folder, shards[0]["file"], "a shard"))[0]
        for key, entry in entries.items():
            if key.startswith(("running_count/", "batch_saver/")):
                continue
            shape = [len(store), *entry["shape"][1:]]
            keys.append((key, str(shape), entry["dtype"].lower()))
    figures = [key_values(keys, ["key", "shape (all examples)", "dtype"])] if keys else []
    return section(title or "ActivationStore", None, figures, key_values(rows))


# -- attention ---------------------------------------------------------------------------------
def _patterns_of(patterns: Any, heads: Any, example: int) -> tuple[torch.Tensor, list[str]]:
    """``([heads, seq, seq], head labels)`` from a cache, a dict or a tensor."""
    from .points import parse_point

    if isinstance(patterns, torch.Tensor):
        if patterns.dim() != 3:
            raise HookscopeError(
                f"attention patterns must be [heads, seq, seq], got {list(patterns.shape)}."
            )
        labels = (
            [str(h) for h in heads]
            if heads is not None
            else [f"head {h}" for h in range(len(patterns))]
        )
        return patterns, labels
    if hasattr(patterns, "tensors"):  # an ActivationCache
        found = {}
        for key, value in patterns.tensors().items():
            if key.startswith("pattern_"):
                point = parse_point(key)
                found[(point.layer, point.head)] = value[example]
        wanted = [tuple(h) for h in heads] if heads is not None else sorted(found)
        missing = [h for h in wanted if h not in found]
        if missing or not wanted:
            raise HookscopeError(
                f"attention heads {missing or 'any'} are not in this cache; it holds "
                f"{sorted(found)} (extract them with extract_attn_pattern=True)."
            )
        return torch.stack([found[h] for h in wanted]), [
            f"L{layer}H{head}" for layer, head in wanted
        ]
    if isinstance(patterns, dict):
        return torch.stack([torch.as_tensor(v) for v in patterns.values()]), [
            str(k) for k in patterns
        ]
    raise HookscopeError(
        f"attention patterns must be an ActivationCache, a dict or a tensor, got {type(patterns).__name__}."
    )


def attention_section(
    patterns: Any, tokens: Sequence[str], heads: Any, title: str | None, example: int, report: Any
) -> str:
    """Heads side by side (:func:`~hookscope.report.attention_view`) and, beside them, where
    each head's last token attends most."""
    stacked, labels = _patterns_of(patterns, heads, example)
    seq = len(tokens)
    if stacked.shape[1:] != (seq, seq):
        raise HookscopeError(
            f"attention patterns of shape {list(stacked.shape[1:])} do not match {seq} tokens: "
            "extract every query position (['all']) and every key (attn_pattern_all_keys=True)."
        )
    element_id = f"hs-attn-{len(report.sections)}"
    figure = attention_view(stacked, tokens, labels, element_id)
    rows = []
    for label, pattern in zip(labels, stacked.float(), strict=True):
        weight, key = pattern[-1].max(-1)
        rows.append((label, f"position {int(key)}: {tokens[int(key)]!r}", float(weight)))
    numbers = key_values(rows, ["head", "last token attends most to", "weight"])
    prompt = "".join(tokens)
    return section(
        title or f"Attention on {prompt!r}", f"heads: {', '.join(labels)}", [figure], numbers
    )


# -- dispatch ----------------------------------------------------------------------------------
def section_of(result: Any, title: str | None, options: dict) -> str:
    """The report section of ``result`` (see :meth:`hookscope.report.Report.add`)."""
    from .cache import ActivationCache
    from .lens import LensResult
    from .patching import PatchingResult
    from .store import ActivationStore

    if isinstance(result, PatchingResult):
        return patching_section(result, title, options)
    if isinstance(result, LensResult):
        lens_options = {k: options.pop(k) for k in ("example", "target", "k") if k in options}
        context = {k: options.pop(k) for k in ("prompt", "model") if k in options}
        _no_options(options, "a LensResult")
        return lens_section(lens_summary(result, context=context, **lens_options), title)
    _no_options(options, type(result).__name__)
    if isinstance(result, LensSummary):
        return lens_section(result, title)
    if isinstance(result, ActivationCache):
        return cache_section(result, title)
    if isinstance(result, ActivationStore):
        return store_section(result, title)
    if isinstance(result, str):
        return section(title or "Note", result, [])
    if isinstance(result, dict | list | tuple):
        rows = (
            list(result.items())
            if isinstance(result, dict)
            else [tuple(r) if isinstance(r, list | tuple) else (r,) for r in result]
        )
        return section(title or "Table", None, [key_values(rows)])
    raise HookscopeError(
        f"Report.add does not know how to show a {type(result).__name__}; it takes a "
        "PatchingResult, LensResult, LensSummary, ActivationCache, ActivationStore, str, dict "
        "or list of rows (add_attention for patterns, add_html for your own HTML)."
    )


def _no_options(options: dict, what: str) -> None:
    if options:
        raise HookscopeError(f"Report.add({what}) takes no options {sorted(options)}.")


def notebook_section(result: Any) -> str:
    """The body of a notebook view (a compact section)."""
    from .lens import LensResult

    if isinstance(result, LensResult):
        return lens_section(lens_summary(result))
    return section_of(result, None, {})


# -- saved results -----------------------------------------------------------------------------
# strict JSON has no NaN / Infinity literals: non-finite numbers are saved as these strings
_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _finite_json(value: Any) -> Any:
    """``value`` (nested dicts / lists of JSON values) with every non-finite float replaced by
    its string in ``_NON_FINITE`` (what strict JSON can hold)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {key: _finite_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_json(item) for item in value]
    return value


def _numbers(value: Any) -> Any:
    """A number grid read from a file: the strings of ``_NON_FINITE`` back to their floats
    (anything else is left for the caller to refuse)."""
    if isinstance(value, str):
        return _NON_FINITE.get(value, value)
    if isinstance(value, list):
        return [_numbers(item) for item in value]
    return value


def _write_json(path: str | Path, data: dict) -> Path:
    """``data`` as strict JSON at ``path`` (written to a temporary file, then renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    text = json.dumps(_finite_json(data), indent=1, allow_nan=False)
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def save_patching(result: Any, path: str | Path) -> Path:
    """Write a ``PatchingResult`` as JSON (values, per-example values, baselines, context)."""
    return _write_json(
        path,
        {
            "format": PATCHING_FORMAT,
            "values": result.values.float().tolist(),
            "per_example": result.per_example.float().tolist(),
            "axes": list(result.axes),
            "labels": {axis: list(labels) for axis, labels in result.labels.items()},
            "clean_metric": result.clean_metric.float().tolist(),
            "corrupt_metric": result.corrupt_metric.float().tolist(),
            "metric": result.metric,
            "normalized": bool(result.normalized),
            "method": result.method,
            "forwards": int(result.forwards),
            "context": dict(getattr(result, "context", None) or {}),
        },
    )


def save_lens(summary: LensSummary, path: str | Path) -> Path:
    """Write a :class:`LensSummary` as JSON."""
    return _write_json(path, {"format": LENS_FORMAT, **summary.__dict__})


def load_result(path: str | Path) -> Any:
    """A ``PatchingResult`` or :class:`LensSummary` saved by :func:`save_patching` /
    :func:`save_lens` (checked field by field: the file is untrusted input)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise HookscopeError(f"cannot read the result file {str(path)!r}: {error}") from None
    kind = data.get("format") if isinstance(data, dict) else None
    if kind == PATCHING_FORMAT:
        return _patching_from(data, path)
    if kind == LENS_FORMAT:
        return _lens_from(data, path)
    raise HookscopeError(
        f"{str(path)!r} is not a saved hookscope result (format {kind!r}; expected "
        f"{PATCHING_FORMAT!r} or {LENS_FORMAT!r})."
    )


def _field(data: dict, name: str, kind: type | tuple, path: Path) -> Any:
    value = data.get(name)
    if not isinstance(value, kind):
        raise HookscopeError(f"{path}: field {name!r} is missing or not a {kind}: {value!r:.80}.")
    return value


#: a LensSummary's numbers are Python floats: read back at JSON's own (double) precision
_EXACT = torch.float64


def _tensor(
    data: dict,
    name: str,
    path: Path,
    shape: Sequence[int] | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Field ``name``: a grid of numbers (of ``shape`` when given) as a ``dtype`` tensor."""
    try:
        value = torch.tensor(_numbers(_field(data, name, list, path)), dtype=dtype)
    except (TypeError, ValueError) as error:
        raise HookscopeError(
            f"{path}: field {name!r} is not a grid of numbers ({error})."
        ) from None
    if shape is not None and list(value.shape) != list(shape):
        raise HookscopeError(
            f"{path}: field {name!r} has shape {list(value.shape)}, expected {list(shape)}."
        )
    return value


def _patching_from(data: dict, path: Path) -> Any:
    from .patching import PatchingResult

    axes = _field(data, "axes", list, path)
    labels = _field(data, "labels", dict, path)
    if not all(isinstance(labels.get(a), list) for a in axes):
        raise HookscopeError(f"{path}: field 'labels' must hold a list for each axis {axes}.")
    shape = [len(labels[a]) for a in axes]
    clean = _tensor(data, "clean_metric", path)
    result = PatchingResult(
        values=_tensor(data, "values", path, shape),
        per_example=_tensor(data, "per_example", path, [len(clean), *shape]),
        axes=axes,
        labels=labels,
        clean_metric=clean,
        corrupt_metric=_tensor(data, "corrupt_metric", path, [len(clean)]),
        metric=_field(data, "metric", str, path),
        normalized=_field(data, "normalized", bool, path),
        method=_field(data, "method", str, path),
        forwards=_field(data, "forwards", int, path),
    )
    result.context = _field(data, "context", dict, path)
    return result


def _lens_from(data: dict, path: Path) -> LensSummary:
    layers, tokens = _field(data, "layers", list, path), _field(data, "tokens", list, path)
    grid = [len(layers), len(tokens)]
    top_probs = _tensor(data, "top_probs", path, dtype=_EXACT)
    if list(top_probs.shape[:2]) != grid:
        raise HookscopeError(
            f"{path}: field 'top_probs' is not [layers {grid[0]}, positions {grid[1]}, k]."
        )
    target = data.get("target")
    summary = LensSummary(
        point=_field(data, "point", str, path),
        layers=[int(layer) for layer in layers],
        tokens=[str(t) for t in tokens],
        top_tokens=_field(data, "top_tokens", list, path),
        top_probs=top_probs.tolist(),
        kl=_tensor(data, "kl", path, grid, _EXACT).tolist(),
        target=None if target is None else str(target),
        context=_field(data, "context", dict, path),
    )
    if target is not None:
        summary.target_prob = _tensor(data, "target_prob", path, grid, _EXACT).tolist()
        summary.target_rank = _tensor(data, "target_rank", path, grid, _EXACT).long().tolist()
    if (
        not all(isinstance(row, list) and len(row) == grid[1] for row in summary.top_tokens)
        or len(summary.top_tokens) != grid[0]
    ):
        raise HookscopeError(f"{path}: field 'top_tokens' is not [layers, positions, k] strings.")
    return summary
