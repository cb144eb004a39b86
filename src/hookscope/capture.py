"""Hooks that read activations: which module to hook for each point, and the hooks themselves.

A :class:`CaptureSite` is one hook on one module (its input or its output) that writes one or
more cache keys. The hook selects the requested token positions *before* anything is copied, so
keeping ``[batch, 1, d]`` never clones ``[batch, seq, d]``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from .archs import ModelMap
from .attention import output_projection_block
from .errors import ActivationPointError, ArchitectureError
from .hooks import ModuleHook
from .points import Point, check_layer
from .positions import ResolvedPositions

Split = Callable[[torch.Tensor], torch.Tensor]


class StopForward(Exception):
    """Raised by a hook to end the forward once every requested activation has been read."""


@dataclass
class CaptureSite:
    """One hook: read ``module``'s input or output, then write each ``(key, split)`` to the sink.

    ``split`` (optional) takes a slice of the selected tensor, e.g. the keys of a fused qkv output.
    """

    module: nn.Module
    when: Literal["input", "output"]
    writes: list[tuple[str, Split | None]] = field(default_factory=list)


def _qkv_splits(model_map: ModelMap) -> dict[str, Split]:
    """How to cut a fused qkv projection output ``[..., qkv]`` into flat q, k and v."""
    h, kv, dh = model_map.n_heads, model_map.n_kv_heads, model_map.d_head
    if model_map.spec.qkv_layout == "neox":
        # GPT-NeoX interleaves per head: [q_0 k_0 v_0 | q_1 k_1 v_1 | ...], each d_head wide.
        def part(i: int) -> Split:
            return lambda t: t.unflatten(-1, (h, 3 * dh))[..., i * dh : (i + 1) * dh].flatten(-2)

        return {"queries": part(0), "keys": part(1), "values": part(2)}
    q, k = h * dh, kv * dh
    return {
        "queries": lambda t: t[..., :q].contiguous(),
        "keys": lambda t: t[..., q : q + k].contiguous(),
        "values": lambda t: t[..., q + k :].contiguous(),
    }


def _site_for(point: Point, model_map: ModelMap) -> tuple[nn.Module, str, Split | None]:
    """Which module to hook for ``point``, on its input or output, and any split to apply."""
    spec = model_map.spec
    if point.kind == "input_embeddings":
        return model_map.layers[0].block, "input", None
    if point.kind == "last_layernorm":
        return model_map.final_norm, "output", None
    check_layer(point.layer, model_map.n_layers)
    parts = model_map.layers[point.layer]
    if point.kind == "resid_in":
        return parts.block, "input", None
    if point.kind == "resid_out":
        return parts.block, "output", None
    if point.kind in ("attn_in", "resid_in_post_layernorm"):
        return parts.attention, "input", None
    if point.kind == "attn_out":
        return parts.attention, "output", None
    if point.kind == "mlp_out":
        return parts.mlp, "output", None
    if point.kind == "resid_mid":
        if model_map.parallel_residual:
            raise ActivationPointError(
                f"{point.name}: {model_map.model_type} layers use a parallel residual (attention "
                "and MLP both read resid_in), so there is no resid_mid. Use resid_in, attn_out "
                "and mlp_out: resid_out = resid_in + attn_out + mlp_out."
            )
        if parts.resid_mid_site is None:
            raise ArchitectureError(
                f"{point.name}: hookscope does not know where resid_mid lives in "
                f"{model_map.model_type} layers (no pre-MLP norm in {model_map.path_of(parts.block)})."
            )
        return parts.resid_mid_site, "input", None
    if point.kind in ("queries", "keys", "values"):
        separate = {"queries": spec.q_proj, "keys": spec.k_proj, "values": spec.v_proj}[point.kind]
        if separate:
            return (
                model_map.attention_child(point.layer, separate, f"{point.kind} projection"),
                "output",
                None,
            )
        fused = model_map.attention_child(point.layer, spec.qkv_proj, "q/k/v projection")
        return fused, "output", _qkv_splits(model_map)[point.kind]
    if point.kind in ("head_out", "head_z"):
        o_proj = model_map.attention_child(point.layer, spec.o_proj, "output projection")
        return o_proj, "input", _head_slice(model_map, point)
    raise ActivationPointError(f"{point.name} cannot be captured by a module hook.")


def _head_slice(model_map: ModelMap, point: Point) -> Split:
    """From the output-projection input ``z [..., n_heads * d_head]``: head h's slice
    (``head_z``), or that slice through head h's block of W_O (``head_out``, ``[..., d_model]``)."""
    columns = slice(point.head * model_map.d_head, (point.head + 1) * model_map.d_head)
    if point.kind == "head_z":
        return lambda z: z[..., columns].contiguous()
    block = output_projection_block(model_map, point.layer, point.head)  # [d_model, d_head]
    return lambda z: z[..., columns] @ block.T.to(z.dtype)


def plan_capture(points: list[Point], model_map: ModelMap) -> list[CaptureSite]:
    """Group ``points`` into one :class:`CaptureSite` per (module, input/output)."""
    sites: dict[tuple[int, str], CaptureSite] = {}
    for point in points:
        module, when, split = _site_for(point, model_map)
        site = sites.setdefault((id(module), when), CaptureSite(module, when))
        site.writes.append((point.name, split))
    return list(sites.values())


def _input_tensor(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    tensor = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(tensor, torch.Tensor):
        raise ArchitectureError(
            f"{type(module).__name__} was called without a hidden_states tensor "
            f"(positional args: {len(args)}, keyword args: {sorted(kwargs)})."
        )
    return tensor


def output_tensor(output: Any) -> torch.Tensor:
    """The main tensor of a module output: decoder layers return a tensor or a tuple."""
    return output[0] if isinstance(output, tuple | list) else output


def _make_hook(
    site: CaptureSite,
    positions: ResolvedPositions,
    sink: dict[str, torch.Tensor],
    average: bool,
    keep_gradient: bool,
) -> Callable[..., None]:
    def store(hidden: torch.Tensor) -> None:
        selected = positions.select(hidden)
        if not keep_gradient:
            selected = selected.detach()
        for key, split in site.writes:
            value = split(selected) if split else selected
            sink[key] = positions.average(value) if average else value

    if site.when == "input":
        return lambda module, args, kwargs: store(_input_tensor(module, args, kwargs))
    return lambda module, args, output: store(output_tensor(output))


def _raise_stop(module: nn.Module, args: tuple, output: Any) -> None:
    raise StopForward


def capture_hooks(
    sites: list[CaptureSite],
    positions: ResolvedPositions,
    sink: dict[str, torch.Tensor],
    *,
    average: bool = False,
    keep_gradient: bool = False,
    stop_after: nn.Module | None = None,
) -> list[ModuleHook]:
    """The hooks that write each site's selected activations into ``sink``.

    With ``stop_after``, a last hook ends the forward (``StopForward``) once that module ran.
    """
    hooks = [
        ModuleHook(
            site.module, _make_hook(site, positions, sink, average, keep_gradient), site.when
        )
        for site in sites
    ]
    if stop_after is not None:
        hooks.append(ModuleHook(stop_after, _raise_stop, "output"))
    return hooks
