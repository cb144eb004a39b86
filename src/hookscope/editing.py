"""Internal: how interventions become hooks: validated before the forward, applied inside it.

A :class:`~hookscope.window.CallWindow` tells the hooks which absolute positions the current
model call covers (all of them in ``forward``; one new token per step under the KV cache in
``generate``), so the same hooks serve every path: prompt interventions touch prompt positions
only, ``generated`` ones every position at or after the prompt's end.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .archs import ModelMap
from .capture import PointSite, locate
from .errors import ActivationPointError, HookscopeError, InputError
from .hooks import ModuleHook, reading_hook, replacing_hook
from .interventions import (
    Ablation,
    AnyIntervention,
    Custom,
    Intervention,
    InterventionContext,
    Patch,
    PatternEdit,
    Steer,
    convert_foreign,
)
from .points import KINDS, Point, check_layer, parse_point, point_key, width_of
from .positions import PositionContext, ResolvedPositions
from .vision import VisionMap
from .vision_points import is_vision_point, vision_intervention_hook
from .window import CallWindow

SlotFn = Callable[[torch.Tensor, ResolvedPositions], torch.Tensor]


def write_slots(
    tensor: torch.Tensor, positions: ResolvedPositions, values: torch.Tensor
) -> torch.Tensor:
    """``tensor [batch, seq, *rest]`` with the real slots of ``positions`` set to ``values
    [batch, slots, *rest]`` (out of place: the module's own tensor is never modified)."""
    rows, slots, index = positions.real_slots(tensor.device)
    return tensor.index_put((rows, index), values[rows, slots].to(tensor.dtype))


def _point_width(point: Point, model_map: ModelMap) -> int:
    """Width of what an intervention on ``point`` writes (head_out is written as head_z)."""
    return width_of(KINDS[point.kind].write_kind, model_map)


def _source_key(point: Point, explicit: str | None) -> str:
    """The cache key a patch / mean source is read from (head_out's is head_z's)."""
    return explicit or point_key(KINDS[point.kind].write_kind, point.layer, point.head)


def _cache_mean(cache: Any, key: str, what: str, mapping: dict) -> torch.Tensor:
    """Mean over a cache's examples of ``key`` ``[N, P, *rest]`` (real slots only).

    The rule: a cache with one slot per example (``P == 1``) gives one mean ``[*rest]``, used at
    any positions; otherwise the cache's ``mapping_index`` must be the intervention's
    ``mapping`` (the same position items, each as wide) and the mean is ``[P, *rest]``, slot by
    slot. Raises a HookscopeError naming both layouts when they differ.
    """
    if key not in cache:
        raise HookscopeError(
            f"{what}: the cache has no {key!r}; its keys: {list(cache.keys())[:12]}."
        )
    value = cache[key]
    mask = (
        cache["position_mask"].to(value.device)
        if "position_mask" in cache
        else torch.ones(value.shape[:2], dtype=torch.bool)
    )
    weight = mask.view(*mask.shape, *([1] * (value.dim() - 2))).to(value.dtype)
    mean = (value * weight).sum(0) / weight.sum(0).clamp(min=1)
    if mean.shape[0] == 1:
        return mean[0]
    cached = cache.get("mapping_index")
    if cached is not None and cached != mapping:
        raise HookscopeError(
            f"{what}: the cache was extracted at positions {cached} but the ablation resolves to "
            f"{mapping}; extract the mean at the same position items, or with one slot per "
            "example (e.g. ['last'], or extract_avg=True over one item), which applies anywhere."
        )
    return mean


def checked_cache_source(
    source: Any, key: str, mapping_index: Any, rows: int, what: str, hint: str = ""
) -> torch.Tensor:
    """``source[key]`` (``[N, positions, *rest]``) from an :class:`ActivationCache` used as a
    patch source, after checking that it holds ``key``, was extracted at the same position
    items (``mapping_index``) and has at least ``rows`` examples; ``what`` names the caller in
    errors (e.g. ``"Patch on resid_out_3"``)."""
    if key not in source:
        raise HookscopeError(
            f"{what}: the source cache has no {key!r}{hint}; its keys: {list(source.keys())[:12]}."
        )
    mapping = source.get("mapping_index")
    if mapping is not None and mapping != mapping_index:
        raise HookscopeError(
            f"{what}: the source was extracted at positions {mapping} but the patch resolves to "
            f"{mapping_index}; extract the source at the same position items."
        )
    values = source[key]
    if values.shape[0] < rows:
        raise HookscopeError(
            f"{what}: the source holds {values.shape[0]} examples, the target needs rows "
            f"..{rows - 1}."
        )
    return values


class PreparedIntervention:
    """One point intervention, checked against the model and the batch, ready to apply.

    Raises (at construction, before any forward):
        ActivationPointError / PositionError / HookscopeError: unknown point, layer or head out
        of range, positions that do not fit an example, sources or vectors of the wrong shape.
    """

    def __init__(
        self,
        iv: Intervention,
        model_map: ModelMap,
        context: PositionContext,
        window: CallWindow,
    ):
        self.iv, self.window, self.model_map = iv, window, model_map
        self.custom_module = None
        if isinstance(iv, Custom) and iv.module is not None:
            self.point, self.site = None, None
            self.custom_module = iv.module
        else:
            self.point = parse_point(iv.point, model_map)
            if (reason := KINDS[self.point.kind].not_writable) is not None:
                raise ActivationPointError(f"{iv.point} cannot be intervened on: {reason}.")
            if self.point.head is not None and not 0 <= self.point.head < model_map.n_heads:
                raise ActivationPointError(
                    f"{iv.point}: head {self.point.head} is out of range (valid 0..{model_map.n_heads - 1})."
                )
            self.site = self._write_site()
        self.positions = context.resolve(iv.positions)
        self.batch = context.attention_mask.shape[0]
        if iv.apply_to != "prompt" and (
            isinstance(iv, Patch) or isinstance(iv, Ablation) and iv.method == "mean"
        ):
            raise HookscopeError(
                f"{type(iv).__name__} on {iv.point} takes values per prompt position; it applies to "
                "the prompt only (apply_to='prompt')."
            )
        self.slot_fn = None if isinstance(iv, Custom) else self._slot_fn()

    # -- where --------------------------------------------------------------------------------
    def _write_site(self) -> PointSite:
        point = self.point
        point = Point(KINDS[point.kind].write_kind, point.layer, point.head)  # head_out: as head_z
        site = locate(point, self.model_map)
        if point.kind == "resid_mid":
            # Writing the pre-MLP norm's input would leave the residual add untouched: instead the
            # module whose output joins the residual after attention absorbs the difference.
            parts = self.model_map.layers[point.layer]
            return PointSite(parts.attn_out_norm or parts.attention, "output")
        return site

    # -- what ---------------------------------------------------------------------------------
    def _fit(self, tensor: Any, what: str) -> torch.Tensor:
        """Check a vector / mean / source tensor against the point and the slots."""
        if not isinstance(tensor, torch.Tensor):
            tensor = torch.as_tensor(tensor)
        width, slots = _point_width(self.point, self.model_map), self.positions.index.shape[1]
        if self.iv.apply_to != "prompt" and tensor.dim() != 1:
            raise HookscopeError(
                f"{type(self.iv).__name__} on {self.iv.point} applies to generated tokens: {what} must "
                f"be one vector [{width}], got shape {list(tensor.shape)}."
            )
        first = self.window.example_offset  # a tensor of rows: this batch reads first..
        fits = {
            1: list(tensor.shape) == [width],
            2: list(tensor.shape) == [slots, width],
            3: tensor.shape[1:] == (slots, width) and tensor.shape[0] >= first + self.batch,
        }
        if not fits.get(tensor.dim(), False):
            raise HookscopeError(
                f"{type(self.iv).__name__} on {self.iv.point}: {what} has shape {list(tensor.shape)}; "
                f"expected [{width}], [{slots}, {width}] (per position slot of {self.iv.positions!r}) or "
                f"[batch={self.batch}, {slots}, {width}] (one row per example: this batch reads "
                f"rows {first}..{first + self.batch - 1})."
            )
        return tensor

    def _slot_fn(self) -> SlotFn:
        """``(selected [batch, slots, w], positions) -> new values``: the intervention's
        :meth:`~hookscope.interventions.Intervention.transform` with its operand checked now
        (before the forward) and broadcast per call."""
        iv = self.iv
        if hasattr(iv, "prepare_slots"):  # feature interventions: own operand, own broadcast
            return iv.prepare_slots(self)
        operand = self._operand()
        if operand is None:
            return lambda x, pos: iv.transform(x, None)
        # one row per example (a source, a vector or a mean alike): this batch's rows
        return lambda x, pos: iv.transform(x, self._broadcast(operand, x))

    def _operand(self) -> torch.Tensor | None:
        """The checked tensor the intervention applies: a mean, a source or a vector."""
        iv = self.iv
        if isinstance(iv, Ablation):
            if iv.method != "mean":
                return None
            mean = iv.mean
            if hasattr(mean, "tensors"):
                mean = _cache_mean(
                    mean,
                    _source_key(self.point, None),
                    f"Ablation mean for {iv.point}",
                    self.positions.mapping_index,
                )
            return self._fit(mean, "mean")
        if isinstance(iv, Steer):
            return self._fit(iv.vector, "vector")
        if isinstance(iv, Patch):
            return self._fit(self._patch_source(), "source")
        raise HookscopeError(f"unsupported intervention {type(iv).__name__}.")

    def _patch_source(self) -> Any:
        """A Patch's source as a tensor; a cache source is checked against this call."""
        iv, source = self.iv, self.iv.source
        if not hasattr(source, "tensors"):
            return source
        key = _source_key(self.point, iv.source_key)
        hint = " (extract it with extract_head_z=True)" if key.startswith("head_z") else ""
        return checked_cache_source(
            source,
            key,
            self.positions.mapping_index,
            self.window.example_offset + self.batch,
            f"Patch on {iv.point}",
            hint,
        )

    def _broadcast(self, value: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``value`` ([width], [slots, width] or [N, slots, width], one row per example of the
        dataset) as ``x``'s shape [B, S, width]: this batch's rows are cut out before anything
        moves to ``x``'s device (a dataset-wide source is never copied whole)."""
        if value.dim() == 3:
            start = self.window.example_offset
            value = value[start : start + x.shape[0]]
        return value.to(device=x.device, dtype=x.dtype).expand_as(x)

    # -- how ----------------------------------------------------------------------------------
    def apply(self, module, tensor: torch.Tensor) -> torch.Tensor:
        """The intervened point tensor ``[batch, seq, *rest]`` for the current call."""
        if not self.window.covers(self.iv.apply_to):
            return tensor
        if self.custom_module is not None or isinstance(self.iv, Custom):
            context = InterventionContext(
                self.iv.point, module, self.positions, self.window.phase, self.window.step
            )
            return self.iv.transform(tensor, None, context)
        positions = self._call_positions(tensor)
        if positions is None:
            return tensor
        return write_slots(tensor, positions, self.slot_fn(positions.select(tensor), positions))

    def _call_positions(self, tensor: torch.Tensor) -> ResolvedPositions | None:
        """The slots this call must change: prompt slots that fall in the call, generated
        positions of the call, or both, as ``apply_to`` says."""
        parts = []
        if self.iv.apply_to in ("prompt", "both"):
            parts.append(self.window.prompt_positions(self.positions))
        if self.iv.apply_to in ("generated", "both"):
            generated = self.window.generated_positions(tensor.shape[0], tensor.device)
            parts.append(generated if generated.index.shape[1] else None)
        parts = [p for p in parts if p is not None]
        if len(parts) < 2:
            return parts[0] if parts else None
        return ResolvedPositions(
            index=torch.cat([p.on(tensor.device)[0] for p in parts], 1),
            mask=torch.cat([p.on(tensor.device)[1] for p in parts], 1),
            mapping_index={},
            items=[],
            widths=[p.index.shape[1] for p in parts],
        )

    def hooks(self) -> list[ModuleHook]:
        """The module hooks that apply this intervention."""
        if self.custom_module is not None:
            return [replacing_hook(self.custom_module, "output", self.apply)]
        if self.point.kind == "resid_mid":
            return self._resid_mid_hooks(self.site)
        # what the intervention reads elsewhere in the call (a transcoder: the MLP's input)
        reads = self.iv.read_hooks(self) if hasattr(self.iv, "read_hooks") else []
        return [*reads, replacing_hook(self.site.module, self.site.when, self._on_point)]

    def _on_point(self, module, tensor: torch.Tensor) -> torch.Tensor:
        """Apply to the point's columns of a module tensor (all of it for most points)."""
        if self.site.columns is None:
            return self.apply(module, tensor)
        columns = self.site.columns.to(tensor.device)
        return tensor.index_copy(-1, columns, self.apply(module, tensor.index_select(-1, columns)))

    def _resid_mid_hooks(self, site: PointSite) -> list[ModuleHook]:
        layer = self.point.layer
        remember = reading_hook(
            self.model_map.layers[layer].block,
            "input",
            lambda tensor: self.window.resid_in.__setitem__(layer, tensor),
        )

        def shift_contribution(module, contribution):
            resid_mid = self.window.resid_in[layer] + contribution
            return contribution + (self.apply(module, resid_mid) - resid_mid)

        return [remember, replacing_hook(site.module, "output", shift_contribution)]


@dataclass
class ResolvedPatternEdit:
    """A :class:`PatternEdit` with its grid resolved for one batch: ``region [batch, seq, seq]``."""

    edit: PatternEdit
    heads: list[int]
    region: torch.Tensor
    query_positions: ResolvedPositions
    key_positions: ResolvedPositions
    source: torch.Tensor | None


def _resolve_grid(
    edit: PatternEdit, context: PositionContext
) -> tuple[ResolvedPositions, ResolvedPositions, torch.Tensor]:
    """The query and key positions of ``edit`` and their grid ``[batch, seq, seq]`` (True on
    the edited cells), built on the CPU and moved to the batch's device once."""
    rows = context.resolve(edit.query_positions)
    cols = context.resolve(edit.key_positions)
    batch, seq = context.attention_mask.shape
    region = torch.zeros(batch, seq, seq, dtype=torch.bool)
    for b in range(batch):
        q = rows.index[b][rows.mask[b]]
        k = cols.index[b][cols.mask[b]]
        region[b, q.unsqueeze(1), k.unsqueeze(0)] = True
    return rows, cols, region.to(context.attention_mask.device)


def resolve_pattern_edit(
    edit: PatternEdit,
    model_map: ModelMap,
    context: PositionContext,
    example_offset: int = 0,
    grids: dict[tuple[str, str], tuple] | None = None,
) -> ResolvedPatternEdit:
    """Check ``edit`` against the model and resolve its grid for this batch. ``grids`` shares
    the resolved grid of edits with the same query and key positions (one edit per layer, as
    :func:`hookscope.interventions.image_text_block` makes, needs one ``[batch, seq, seq]``
    region, not one per layer)."""
    check_layer(edit.layer, model_map.n_layers, "PatternEdit layer")
    heads = list(range(model_map.n_heads)) if edit.heads == "all" else list(edit.heads)
    for head in heads:
        if isinstance(head, bool) or not isinstance(head, int) or not 0 <= head < model_map.n_heads:
            raise ActivationPointError(
                f"PatternEdit head {head!r} is out of range: layer {edit.layer} has {model_map.n_heads} "
                f"heads (valid 0..{model_map.n_heads - 1})."
            )
    grids = {} if grids is None else grids
    key = (repr(edit.query_positions), repr(edit.key_positions))
    if key not in grids:
        grids[key] = _resolve_grid(edit, context)
    rows, cols, region = grids[key]
    batch = context.attention_mask.shape[0]
    source = None
    if edit.op == "patch":
        source = edit.source
        if hasattr(source, "tensors"):
            key = point_key("pattern", edit.layer, heads[0])
            if len(heads) != 1 or key not in source:
                raise HookscopeError(
                    f"PatternEdit patch from a cache needs one head and the cache key {key!r}."
                )
            source = source[key]
        source = torch.as_tensor(source)
        expected = (rows.index.shape[1], cols.index.shape[1])
        if (
            source.dim() != 3
            or tuple(source.shape[1:]) != expected
            or source.shape[0] < example_offset + batch
        ):
            raise HookscopeError(
                f"PatternEdit patch source has shape {list(source.shape)}; expected [batch={batch}, "
                f"{expected[0]}, {expected[1]}] (rows x columns of the edit's positions)."
            )
        source = source[example_offset : example_offset + batch]
    return ResolvedPatternEdit(edit, heads, region, rows, cols, source)


def prepare(
    interventions: list[AnyIntervention],
    model_map: ModelMap,
    context: PositionContext,
    window: CallWindow,
    vision_map: VisionMap | None = None,
) -> tuple[list[ModuleHook], dict[int, list[ResolvedPatternEdit]]]:
    """Validate every intervention for this batch (before any forward) and build its hooks.
    Interventions on vision points (``vision_resid_out_{l}``...) cover the whole tensor.

    Returns the module hooks, and the pattern edits by layer (for the attention function).
    """
    hooks: list[ModuleHook] = []
    edits: dict[int, list[ResolvedPatternEdit]] = {}
    grids: dict[tuple[str, str], tuple] = {}  # shared by edits with the same positions
    for iv in interventions:
        iv = convert_foreign(iv)
        if isinstance(iv, PatternEdit):
            resolved = resolve_pattern_edit(iv, model_map, context, window.example_offset, grids)
            edits.setdefault(iv.layer, []).append(resolved)
        elif callable(getattr(iv, "module_hooks", None)):
            # an intervention that builds its own hooks (hookscope.dictionaries.Splice)
            hooks += iv.module_hooks(model_map, context, window)
        elif isinstance(iv, Intervention) and is_vision_point(iv.point):
            hooks.append(vision_intervention_hook(iv, vision_map))
        elif isinstance(iv, Intervention):
            hooks += PreparedIntervention(iv, model_map, context, window).hooks()
        else:
            raise InputError(
                f"interventions must be hookscope interventions (Ablation, Patch, Steer, Custom, "
                f"PatternEdit), got {type(iv).__name__}; reference-design dicts convert with "
                "hookscope.compat.from_reference."
            )
    for hook in hooks:
        hook.first = True
    return hooks, edits
