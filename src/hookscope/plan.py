"""From an :class:`ExtractionConfig` to a plan: which points module hooks capture, which layers
the attention function reads, and which running means to keep."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .archs import ModelMap
from .attention import LayerRequest, output_projection_block
from .config import HEAD_FLAGS, LAYER_FLAGS, MODEL_FLAGS, RUNNING_MEAN_FLAGS, ExtractionConfig
from .errors import ActivationPointError, HookscopeError
from .points import KINDS, Point, check_layer, point_key, tl_hooks

# Per-head kinds read inside the attention function -> their LayerRequest field.
_ATTENTION_KINDS = {k.name: k.request for k in KINDS.values() if k.request is not None}
# Per-head kinds read by module hooks (head columns of a projection's input or output).
_HOOKED_HEAD_KINDS = [
    k.name
    for k in KINDS.values()
    if k.scope == "head" and k.site.hook is not None and not k.is_vision
]


@dataclass
class ExtractionPlan:
    """What one forward must capture.

    Attributes:
        points: points captured by module hooks (including ``head_out`` / ``head_z``).
        attention: per-layer requests served by hookscope's attention function.
        running_means: ``(mean key, source key)`` pairs averaged over examples.
        temporary: source keys captured only to feed a running mean (dropped afterwards).
        tl_names: the TransformerLens hooks with an equal on this model -> (kind, head axis),
            recorded in the cache so that it reads those names as this family means them.
        features: the dictionaries whose features / reconstruction errors are captured
            (``hookscope.dictionaries.features.FeatureRequest``).
    """

    points: list[Point] = field(default_factory=list)
    attention: list[LayerRequest] = field(default_factory=list)
    running_means: list[tuple[str, str]] = field(default_factory=list)
    temporary: set[str] = field(default_factory=set)
    tl_names: dict[str, tuple[str, int | None]] = field(default_factory=dict)
    features: list = field(default_factory=list)

    def last_layer(self) -> int | None:
        """The last layer anything is read from, or None when a model-level point after the
        layers (the final norm) is needed. Used to stop the forward early."""
        points = self.points + [p for r in self.features for p in (r.reads, r.writes)]
        if any(p.layer is None and p.kind != "input_embeddings" for p in points):
            return None
        layers = [p.layer or 0 for p in points] + [r.layer for r in self.attention]
        return max(layers) if layers else None

    def is_empty(self) -> bool:
        return not self.points and not self.attention and not self.features

    def captures_modules(self) -> bool:
        """Whether module hooks capture anything (points or dictionary features)."""
        return bool(self.points or self.features)


def selected_heads(config: ExtractionConfig, model_map: ModelMap) -> dict[int, list[int]]:
    """``attn_heads`` ("all", or a list of ``{"layer": l, "head": h}``) as ``{layer: [heads]}``,
    restricted to ``config.layers`` when that is set.

    Raises:
        ActivationPointError: for a malformed entry, or a layer or head out of range.
    """
    layers = range(model_map.n_layers) if config.layers is None else config.layers
    if config.attn_heads == "all":
        return {layer: list(range(model_map.n_heads)) for layer in layers}
    if not isinstance(config.attn_heads, list):
        raise ActivationPointError(
            f"attn_heads must be 'all' or a list of {{'layer': l, 'head': h}}, got {config.attn_heads!r}."
        )
    heads: dict[int, list[int]] = {}
    for entry in config.attn_heads:
        if not isinstance(entry, dict) or set(entry) != {"layer", "head"}:
            raise ActivationPointError(
                f"attn_heads entry {entry!r} must be a dict with exactly the keys 'layer' and 'head'."
            )
        check_layer(entry["layer"], model_map.n_layers, "attn_heads layer")
        head = entry["head"]
        if isinstance(head, bool) or not isinstance(head, int) or not 0 <= head < model_map.n_heads:
            raise ActivationPointError(
                f"attn_heads head {head!r} is out of range: layer {entry['layer']} has "
                f"{model_map.n_heads} heads (valid 0..{model_map.n_heads - 1})."
            )
        if config.layers is None or entry["layer"] in config.layers:
            heads.setdefault(entry["layer"], [])
            if head not in heads[entry["layer"]]:
                heads[entry["layer"]].append(head)
    return heads


def plan_extraction(
    config: ExtractionConfig, model_map: ModelMap, dictionaries: Mapping[str, Any] | None = None
) -> ExtractionPlan:
    """Build the :class:`ExtractionPlan` for ``config`` on this model; ``dictionaries`` are the
    model's attached dictionaries (by name), for ``extract_features``.

    Raises:
        ActivationPointError: for layers or heads out of range.
        HookscopeError: for combinations that have no meaning (see the messages).
    """
    from .dictionaries.features import plan_features

    plan = ExtractionPlan(tl_names=tl_hooks(model_map))
    plan.features = plan_features(config, dictionaries, model_map)
    layers = range(model_map.n_layers) if config.layers is None else config.layers
    for layer in layers:
        check_layer(layer, model_map.n_layers, "ExtractionConfig.layers entry")
    plan.points = [Point(kind) for flag, kind in MODEL_FLAGS.items() if getattr(config, flag)]
    for flag, kind in LAYER_FLAGS.items():
        if getattr(config, flag):
            plan.points += [Point(kind, layer) for layer in layers]

    head_kinds = [kind for flag, kind in HEAD_FLAGS.items() if getattr(config, flag)]
    for flag, (mean_kind, source_kind) in RUNNING_MEAN_FLAGS.items():
        if getattr(config, flag):
            if source_kind not in head_kinds:
                head_kinds.append(source_kind)
                plan.temporary.add(source_kind)
            plan.running_means.append((mean_kind, source_kind))
    _check_pattern_blocks(config, "pattern" in head_kinds)
    if not head_kinds:
        return plan
    _check_head_options(config, head_kinds)

    for layer, heads in selected_heads(config, model_map).items():
        wanted = {kind: kind in head_kinds for kind in _ATTENTION_KINDS}
        if any(wanted.values()):
            request = LayerRequest(
                layer, heads, **{_ATTENTION_KINDS[k]: v for k, v in wanted.items()}
            )
            if request.projected_values:
                request.output_blocks = {
                    h: output_projection_block(model_map, layer, h) for h in heads
                }
            plan.attention.append(request)
        for kind in _HOOKED_HEAD_KINDS:
            if kind in head_kinds:
                plan.points += [Point(kind, layer, head) for head in heads]
    plan.running_means = [
        (point_key(mean, r.layer, h), point_key(source, r.layer, h))
        for mean, source in plan.running_means
        for r in plan.attention
        for h in r.heads
    ]
    plan.temporary = {
        point_key(kind, r.layer, h)
        for kind in plan.temporary
        for r in plan.attention
        for h in r.heads
    }
    return plan


def _check_pattern_blocks(config: ExtractionConfig, patterns: bool) -> None:
    """``attn_pattern_avg`` needs per-example patterns laid out by position items."""
    if config.attn_pattern_avg not in ("none", "mean", "sum", "baseline_ratio"):
        raise HookscopeError(
            f"attn_pattern_avg must be 'none', 'mean', 'sum' or 'baseline_ratio', got "
            f"{config.attn_pattern_avg!r}."
        )
    if config.attn_pattern_avg == "none":
        return
    if not (patterns and config.extract_attn_pattern):
        raise HookscopeError(
            f"attn_pattern_avg={config.attn_pattern_avg!r} reduces extracted attention patterns; "
            "set extract_attn_pattern=True to use it."
        )
    if config.attn_pattern_all_keys:
        raise HookscopeError(
            "attn_pattern_avg groups the pattern's columns by target position item; it cannot be "
            "combined with attn_pattern_all_keys (whose columns are every key)."
        )


def _check_head_options(config: ExtractionConfig, head_kinds: list[str]) -> None:
    patterns = "pattern" in head_kinds
    if config.extract_avg and patterns:
        raise HookscopeError(
            "extract_avg averages each position item's vectors; it has no meaning for attention "
            "patterns. Extract patterns without extract_avg (or use extract_avg_attn_pattern to "
            "average over examples)."
        )
    if config.attn_pattern_all_keys and config.extract_avg_attn_pattern:
        raise HookscopeError(
            "extract_avg_attn_pattern needs the same columns in every batch; it cannot be combined "
            "with attn_pattern_all_keys (whose columns follow each batch's sequence length)."
        )
    if config.attn_pattern_row_positions is not None and not patterns:
        raise HookscopeError(
            "attn_pattern_row_positions selects the query rows of attention patterns; set "
            "extract_attn_pattern (or extract_avg_attn_pattern) to use it."
        )
