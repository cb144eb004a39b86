"""easyroutine's intervention and hook forms, converted to hookscope's types.

* :func:`Intervention` / :func:`from_reference`: its ``Intervention(type=..., activation=...,
  token_positions=..., patching_values=..., multiplication_value=..., apply_softmax=...)``
  (a dataclass there, a dict or any object with those attributes here) -> :class:`Ablation`,
  :class:`Patch` or :class:`PatternEdit`. Registered in ``interventions.CONVERTERS``, so
  these forms are accepted wherever hookscope takes interventions.
* :func:`hook_from_reference`: its ``{"component": "model.layers[0].mlp.output",
  "intervention": fn}`` hook dicts -> :class:`ModuleHook`. Registered in
  ``hooks.HOOK_CONVERTERS``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from ..errors import HookscopeError
from ..hooks import ModuleHook
from ..interventions import Ablation, AnyIntervention, Patch, PatternEdit
from ..points import parse_point
from .notes import note


def looks_like_reference(query: Any) -> bool:
    """An easyroutine intervention: a dict or object with ``type`` and ``activation``."""
    if isinstance(query, dict):
        return {"type", "activation"} <= set(query)
    return hasattr(query, "type") and hasattr(query, "activation")


def Intervention(  # noqa: N802 - easyroutine's class name, kept so its code runs unchanged
    type: str,  # noqa: A002 - easyroutine's field name
    activation: str,
    token_positions: Any = None,
    patching_values: Any = None,
    multiplication_value: float = 0.0,
    apply_softmax: bool = False,
) -> AnyIntervention:
    """easyroutine's ``Intervention(...)`` constructor; returns the equal hookscope intervention
    (see :func:`from_reference` for the mapping)."""
    note("Intervention(type=..., activation=...)", "Ablation / Patch / PatternEdit")
    return from_reference(
        {
            "type": type,
            "activation": activation,
            "token_positions": ["all"] if token_positions is None else token_positions,
            "patching_values": patching_values,
            "multiplication_value": multiplication_value,
            "apply_softmax": apply_softmax,
        }
    )


def from_reference(query: dict[str, Any] | Any) -> AnyIntervention:
    """Convert easyroutine's intervention form into a hookscope intervention.

    ``type="full"`` on a vector point: ``patching_values`` None / ``"ablation"`` -> an
    :class:`Ablation` scaling by ``multiplication_value`` (0: zero ablation); a tensor -> a
    :class:`Patch`. ``type`` ``"rows"`` / ``"columns"`` / ``"grid"`` (optionally
    ``_pre_softmax``) on ``pattern_L{l}H{h}`` -> a :class:`PatternEdit` scaling the rows
    (queries), columns (keys) or the grid ``(rows, columns)`` by ``multiplication_value``.

    Raises:
        HookscopeError: for a type hookscope has no equal for, naming the valid ones.
    """
    get = query.get if isinstance(query, dict) else (lambda k, d=None: getattr(query, k, d))
    kind, activation = get("type"), get("activation")
    positions = get("token_positions", ["all"])
    values, factor = get("patching_values"), float(get("multiplication_value", 0.0) or 0.0)
    if kind == "full":
        if values is None or (isinstance(values, str) and values == "ablation"):
            return Ablation(point=activation, positions=positions, method="scale", factor=factor)
        return Patch(point=activation, positions=positions, source=values)
    base = (kind or "").removesuffix("_pre_softmax")
    if (
        base in ("rows", "columns", "grid")
        and isinstance(activation, str)
        and activation.startswith("pattern_")
    ):
        return _pattern_edit(kind, base, activation, positions, factor, get("apply_softmax"))
    raise HookscopeError(
        f"reference intervention type {kind!r} on {activation!r} is not supported; valid types: "
        "'full' on vector points, 'rows' / 'columns' / 'grid' (optionally '_pre_softmax') on pattern_L{l}H{h}."
    )


def _pattern_edit(
    kind: str, base: str, activation: str, positions: Any, factor: float, softmax: Any
) -> PatternEdit:
    """A rows / columns / grid scaling of one head's pattern (pre- or post-softmax)."""
    point = parse_point(activation)
    if base == "rows":
        rows, columns = positions, ["all"]
    elif base == "columns":
        rows, columns = ["all"], positions
    else:
        rows, columns = list(positions[0]), list(positions[1])
    pre = kind.endswith("_pre_softmax")
    return PatternEdit(
        layer=point.layer,
        heads=[point.head],
        query_positions=rows,
        key_positions=columns,
        op="scale",
        value=factor,
        stage="pre" if pre else "post",
        renormalize=bool(softmax) and not pre,
    )


def _convert_intervention(query: Any) -> AnyIntervention | None:
    """The registered converter: easyroutine forms only (None for anything else)."""
    return from_reference(query) if looks_like_reference(query) else None


def _positional_arity(fn: Callable[..., Any]) -> int:
    """How many positional arguments ``fn`` takes (0 when it takes ``*args`` or is opaque)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return 0
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return 0
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)


def hook_from_reference(hook: Any) -> ModuleHook | None:
    """easyroutine's ``{"component", "intervention"}`` dict as a :class:`ModuleHook` (None for
    anything else). The component may end in ``.input`` or ``.output`` (default: output).

    A function of four positional arguments is called easyroutine's way,
    ``fn(module, args, kwargs, output)`` (``output`` is None before the module runs); any other
    gets PyTorch's ``fn(module, args, output)`` / ``fn(module, args, kwargs)``.
    """
    if not (isinstance(hook, dict) and {"component", "intervention"} <= set(hook)):
        return None
    component, when, fn = hook["component"], "output", hook["intervention"]
    for suffix in (".input", ".output"):
        if isinstance(component, str) and component.endswith(suffix):
            component, when = component[: -len(suffix)], suffix[1:]
    if _positional_arity(fn) != 4:
        return ModuleHook(component, fn, when)
    if when == "input":
        return ModuleHook(
            component, lambda module, args, kwargs: fn(module, args, kwargs, None), "input"
        )
    return ModuleHook(component, fn, "output", with_kwargs=True)


def register() -> None:
    """Add the converters to hookscope's registries (once)."""
    from .. import hooks, interventions

    if _convert_intervention not in interventions.CONVERTERS:
        interventions.CONVERTERS.append(_convert_intervention)
    if hook_from_reference not in hooks.HOOK_CONVERTERS:
        hooks.HOOK_CONVERTERS.append(hook_from_reference)
