"""Activation points of the vision side: extraction and interventions.

``vision_resid_out_{l}`` (output of vision block l), ``vision_attn_out_{l}`` (output of its
attention module) and ``projector_out`` (the image features in the language model's space, what
replaces the image tokens' embeddings). The vision encoder sees images, not the text batch, so
these points have no position axis: each is the whole tensor as the module returns it,
``[images, patches, d_vision]`` for CLIP / SigLIP / Idefics3 towers (Llava-NeXt: one row per
crop; Idefics3: per tile), ``[1, patches of all images, d_vision]`` for Pixtral and
``[patches of all images, d_vision]`` for Qwen2-VL (Qwen2.5-VL blocks see the patches in its
window order). ``projector_out`` is ``[images, image_tokens, d_model]`` or, for Qwen2-VL,
``[image_tokens of all images, d_model]``; flattened, it equals ``resid_in_0`` at
``"all-image"``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .cache import ActivationCache, Axes
from .config import VISION_FLAGS, ExtractionConfig
from .errors import ActivationPointError, HookscopeError
from .hooks import ModuleHook, reading_hook, replacing_hook
from .interventions import Ablation, Custom, Intervention, InterventionContext, Patch, Steer
from .points import Point, check_layer, parse_point
from .vision import VisionMap

NO_POSITIONS = Axes(slots=())  # merged across batches by concatenating images


VISION_KINDS = frozenset(VISION_FLAGS.values())


def is_vision_point(name: object) -> bool:
    """True for the name of a vision point (``vision_resid_out_3``, ``projector_out``)."""
    try:
        return parse_point(name).kind in VISION_KINDS
    except ActivationPointError:
        return False


def _require(vision_map: VisionMap | None, what: str) -> VisionMap:
    if vision_map is None:
        raise ActivationPointError(
            f"{what}: this model has no vision tower (a text-only model, or an image encoder "
            "that is no transformer); vision points exist on vision-language models only."
        )
    return vision_map


def vision_module(point: Point, vision_map: VisionMap | None) -> nn.Module:
    """The module whose output is ``point``.

    Raises:
        ActivationPointError: for a text-only model or a vision layer out of range.
    """
    vmap = _require(vision_map, point.name)
    if point.kind == "projector_out":
        if vmap.projector is None:
            raise ActivationPointError(f"{point.name}: no projector found in this model.")
        return vmap.projector
    check_layer(point.layer, len(vmap.layers), "vision layer")
    if point.kind == "vision_resid_out":
        return vmap.layers[point.layer]
    module = vmap.attention[point.layer]
    if module is None:
        raise ActivationPointError(f"{point.name}: vision block {point.layer} has no attention.")
    return module


def vision_points(config: ExtractionConfig, vision_map: VisionMap | None) -> list[Point]:
    """The vision points ``config`` requests (``vision_layers`` restricts the per-layer ones)."""
    wanted = [kind for flag, kind in VISION_FLAGS.items() if getattr(config, flag)]
    if not wanted:
        return []
    vmap = _require(vision_map, ", ".join(f for f in VISION_FLAGS if getattr(config, f)))
    layers = range(len(vmap.layers)) if config.vision_layers is None else config.vision_layers
    points = []
    for kind in wanted:
        if kind == "projector_out":
            points.append(Point(kind))
        else:
            points += [Point(kind, layer) for layer in layers]
    return points


def vision_capture_hooks(
    points: list[Point],
    vision_map: VisionMap | None,
    sink: dict[str, torch.Tensor],
    keep_gradient: bool = False,
) -> list[ModuleHook]:
    """Hooks that store each point's whole output tensor in ``sink``."""

    def store(key: str) -> Callable[[torch.Tensor], None]:
        def fn(tensor: torch.Tensor) -> None:
            sink[key] = tensor if keep_gradient else tensor.detach()

        return fn

    return [reading_hook(vision_module(p, vision_map), "output", store(p.name)) for p in points]


def declare_vision_axes(cache: ActivationCache) -> None:
    """Vision tensors have no position axis: batches merge by concatenating images."""
    for key in list(cache.keys()):
        if is_vision_point(key):
            cache.set_axes(key, NO_POSITIONS)


def vision_intervention_hook(iv: Intervention, vision_map: VisionMap | None) -> ModuleHook:
    """The hook that applies ``iv`` to a whole vision tensor, through the intervention's own
    :meth:`~hookscope.interventions.Intervention.transform` (as for text points).

    Raises (before the forward):
        HookscopeError: for positions other than ``["all"]``, a cache without the point, or an
            intervention kind with no meaning here. The operand's shape against the tensor can
            only be checked once the encoder has seen this batch's images (in the forward).
    """
    point = parse_point(iv.point)
    module = vision_module(point, vision_map)
    if list(iv.positions) != ["all"]:
        raise HookscopeError(
            f"{iv.point} is a vision point: it has no token positions (the encoder sees images), "
            f"so an intervention covers the whole tensor; got positions={iv.positions!r}, "
            "valid: ['all']."
        )
    operand = _vision_operand(iv)

    def apply(module_, tensor):
        context = InterventionContext(iv.point, module_, None, "prompt", 0)
        if operand is None:
            return iv.transform(tensor, None, context)
        return iv.transform(tensor, _fit_vision(iv, operand, tensor), context)

    return replacing_hook(module, "output", apply)


def _vision_operand(iv: Intervention) -> torch.Tensor | None:
    """The tensor ``iv`` applies to a vision point (a source, a mean over images, a vector)."""
    if isinstance(iv, Patch):
        if torch.is_tensor(iv.source):
            return iv.source
        key = iv.source_key or iv.point
        if key not in iv.source:
            raise HookscopeError(f"Patch on {iv.point}: the source cache has no {key!r}.")
        return iv.source[key]
    if isinstance(iv, Ablation) and iv.method == "mean":
        if isinstance(iv.mean, dict | ActivationCache):  # a cache: its mean over images
            if iv.point not in iv.mean:
                raise HookscopeError(
                    f"Ablation mean for {iv.point}: the cache has no {iv.point!r}."
                )
            return iv.mean[iv.point].float().mean(0)
        return torch.as_tensor(iv.mean)
    if isinstance(iv, Steer):
        return torch.as_tensor(iv.vector)
    if isinstance(iv, Ablation | Custom):
        return None
    raise HookscopeError(f"{type(iv).__name__} cannot be applied to {iv.point}.")


def _fit_vision(iv: Intervention, operand: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """``operand`` as ``tensor``'s shape, device and dtype: a Patch source must match it
    exactly (same images), a mean or a vector must broadcast over it."""
    if isinstance(iv, Patch) and operand.shape != tensor.shape:
        raise HookscopeError(
            f"Patch on {iv.point}: the source has shape {list(operand.shape)} but this "
            f"forward's tensor has {list(tensor.shape)} (the same images and sizes are needed)."
        )
    if operand.shape[-1] != tensor.shape[-1]:
        raise HookscopeError(
            f"{type(iv).__name__} on {iv.point}: the {'vector' if isinstance(iv, Steer) else 'mean'} "
            f"has width {operand.shape[-1]} but the tensor has {tensor.shape[-1]}."
        )
    return operand.to(tensor.device, tensor.dtype).expand_as(tensor)
