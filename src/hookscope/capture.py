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
from .hooks import ModuleHook, reading_hook
from .points import KINDS, Point, check_layer
from .positions import ResolvedPositions


class StopForward(Exception):
    """Raised by a hook to end the forward once every requested activation has been read."""


@dataclass
class PointSite:
    """Where one activation point lives: a module's input or output, optionally a part of its
    last axis (``columns``), optionally mapped through ``project`` ``[d_out, len(columns)]``.

    ``read(t)`` takes the point out of the module tensor; writes use ``columns`` to put it back.
    """

    module: nn.Module
    when: Literal["input", "output"]
    columns: torch.Tensor | None = None
    project: torch.Tensor | None = None

    def read(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.columns is not None:
            tensor = tensor.index_select(-1, self.columns.to(tensor.device))
        if self.project is not None:
            tensor = tensor @ self.project.T.to(tensor.dtype)
        return tensor


@dataclass
class CaptureSite:
    """One hook: read ``module``'s input or output, then write each ``(key, site)`` to the sink."""

    module: nn.Module
    when: Literal["input", "output"]
    writes: list[tuple[str, PointSite]] = field(default_factory=list)


def _qkv_columns(model_map: ModelMap, kind: str) -> torch.Tensor:
    """The columns of a fused qkv projection output that hold flat q, k or v."""
    h, kv, dh = model_map.n_heads, model_map.n_kv_heads, model_map.d_head
    part = ("queries", "keys", "values").index(kind)
    if model_map.spec.qkv_layout == "neox":
        # GPT-NeoX interleaves per head: [q_0 k_0 v_0 | q_1 k_1 v_1 | ...], each d_head wide.
        per_head = torch.arange(part * dh, (part + 1) * dh)
        return (torch.arange(h).unsqueeze(1) * 3 * dh + per_head).flatten()
    starts = (0, h * dh, (h + kv) * dh)
    widths = (h * dh, kv * dh, kv * dh)
    return torch.arange(starts[part], starts[part] + widths[part])


def _layer_module(role: str) -> Callable[[Point, ModelMap], nn.Module]:
    return lambda point, m: getattr(m.layers[point.layer], role)


def _resid_mid_site(point: Point, m: ModelMap) -> nn.Module:
    if m.parallel_residual:
        raise ActivationPointError(
            f"{point.name}: {m.model_type} layers use a parallel residual (attention "
            "and MLP both read resid_in), so there is no resid_mid. Use resid_in, attn_out "
            "and mlp_out: resid_out = resid_in + attn_out + mlp_out."
        )
    parts = m.layers[point.layer]
    if parts.resid_mid_site is None:
        raise ArchitectureError(
            f"{point.name}: hookscope does not know where resid_mid lives in "
            f"{m.model_type} layers (no pre-MLP norm in {m.path_of(parts.block)})."
        )
    return parts.resid_mid_site


def _output_norm(role: str, sub_block: str) -> Callable[[Point, ModelMap], nn.Module]:
    def find(point: Point, m: ModelMap) -> nn.Module:
        module = getattr(m.layers[point.layer], role)
        if module is None:
            plain = point.kind.removesuffix("_post_norm")
            raise ActivationPointError(
                f"{point.name}: {m.model_type} layers add the {sub_block} output to the residual "
                f"stream without a norm (no sandwich norm), so use {plain}_{point.layer}."
            )
        return module

    return find


# Module roles of :class:`hookscope.points.Site` -> the module of one point in this model.
_MODULES: dict[str, Callable[[Point, ModelMap], nn.Module]] = {
    "first_block": lambda point, m: m.layers[0].block,
    "final_norm": lambda point, m: m.final_norm,
    "block": _layer_module("block"),
    "attention": _layer_module("attention"),
    "mlp": _layer_module("mlp"),
    "resid_mid_site": _resid_mid_site,
    "attn_out_norm": _output_norm("attn_out_norm", "attention"),
    "mlp_out_norm": _output_norm("mlp_out_norm", "MLP"),
}
_PROJECTIONS = {"q_proj": "queries", "k_proj": "keys", "v_proj": "values"}


def _projection_site(point: Point, m: ModelMap, role: str) -> PointSite:
    """q/k/v: the separate projection's output, or its columns of the fused one."""
    separate = getattr(m.spec, role)
    if separate:
        module = m.attention_child(point.layer, separate, f"{point.kind} projection")
        return PointSite(module, "output")
    fused = m.attention_child(point.layer, m.spec.qkv_proj, "q/k/v projection")
    return PointSite(fused, "output", _qkv_columns(m, _PROJECTIONS[role]))


def _projected_head_site(point: Point, m: ModelMap, role: str) -> PointSite:
    """Head h's ``d_head`` columns of the query (or its KV group's of the key) projection
    output, through head h's block of W_O: ``[.., d_model]``."""
    flat = _projection_site(point, m, role)
    head = point.head if role == "q_proj" else point.head // (m.n_heads // m.n_kv_heads)
    within = torch.arange(head * m.d_head, (head + 1) * m.d_head)
    columns = within if flat.columns is None else flat.columns[within]
    block = output_projection_block(m, point.layer, point.head)
    return PointSite(flat.module, "output", columns, block)


def _head_site(point: Point, m: ModelMap, project: bool) -> PointSite:
    """Head h's ``d_head`` columns of the output projection's input (through W_O's block)."""
    o_proj = m.attention_child(point.layer, m.spec.o_proj, "output projection")
    columns = torch.arange(point.head * m.d_head, (point.head + 1) * m.d_head)
    block = output_projection_block(m, point.layer, point.head) if project else None
    return PointSite(o_proj, "input", columns, block)


def locate(point: Point, model_map: ModelMap) -> PointSite:
    """Where ``point`` lives in this model, from its kind's :class:`~hookscope.points.Site`.

    Raises:
        ActivationPointError: for a layer out of range, or a point with no such tensor here.
        ArchitectureError: when the module that holds it cannot be found.
    """
    site = KINDS[point.kind].site
    if KINDS[point.kind].scope != "model":
        check_layer(point.layer, model_map.n_layers)
    if site.module in _MODULES:
        return PointSite(_MODULES[site.module](point, model_map), site.hook)
    if site.module in _PROJECTIONS and site.part == "head @ W_O":
        return _projected_head_site(point, model_map, site.module)
    if site.module in _PROJECTIONS:
        return _projection_site(point, model_map, site.module)
    if site.module == "o_proj":
        return _head_site(point, model_map, project=site.part == "head @ W_O")
    raise ActivationPointError(
        f"{point.name} cannot be reached by a module hook (it is read at: {site})."
    )


def plan_capture(points: list[Point], model_map: ModelMap) -> list[CaptureSite]:
    """Group ``points`` into one :class:`CaptureSite` per (module, input/output)."""
    sites: dict[tuple[int, str], CaptureSite] = {}
    for point in points:
        where = locate(point, model_map)
        site = sites.setdefault(
            (id(where.module), where.when), CaptureSite(where.module, where.when)
        )
        site.writes.append((point.name, where))
    return list(sites.values())


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
        for key, where in site.writes:
            value = where.read(selected)
            sink[key] = positions.average(value) if average else value

    return reading_hook(site.module, site.when, store).fn


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
