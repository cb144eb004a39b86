"""Interventions as data: ablate, patch, steer, edit attention patterns, or run any function.

Each intervention names an activation point by its cache key (``resid_out_3``, ``mlp_out_1``,
``head_out_L2H5``, ...) and token positions in the same per-example language as extraction.

The rule for extraction at the same point: **the cache records the value after every
intervention at that point** (what the rest of the model actually read). It holds for
``forward``, ``extract_cache`` and ``generate`` and for interventions passed per call or kept
with ``register_interventions``.

Head-level points (``head_out_L{l}H{h}`` and ``head_z_L{l}H{h}``) are changed where the head's
output is born: its slice of the output-projection input ``z``. Patch sources, means and
steering vectors for them are therefore in z space (``[d_head]``, the ``head_z`` key).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import torch
from torch import nn

from .errors import HookscopeError
from .keywords import reject_unknown_fields

Phase = Literal["prompt", "generated", "both"]
_PHASES = ("prompt", "generated", "both")


def _positions_default() -> list:
    return ["all"]


@dataclass(kw_only=True, eq=False)
class Intervention:
    """Base of the point interventions.

    Attributes:
        point: the activation point to change (a cache key such as ``"resid_out_3"``).
        positions: position items, resolved per example (default: every real token).
        apply_to: ``"prompt"`` (the input positions), ``"generated"`` (each new token during
            :meth:`HookedModel.generate`), or ``"both"``.
    """

    point: str
    positions: list = field(default_factory=_positions_default)
    apply_to: Phase = "prompt"

    def __post_init__(self) -> None:
        if self.apply_to not in _PHASES:
            raise HookscopeError(f"apply_to {self.apply_to!r} is not one of {_PHASES}.")
        if isinstance(self.positions, str | int | tuple):
            self.positions = [self.positions]

    def __eq__(self, other: object) -> bool:
        if type(self) is not type(other):
            return NotImplemented
        return all(_same(getattr(self, f.name), getattr(other, f.name)) for f in fields(self))

    __hash__ = None  # mutable, compared by value

    def transform(
        self, values: torch.Tensor, operand: torch.Tensor | None, context: Any = None
    ) -> torch.Tensor:
        """What this intervention does to ``values`` (the point's selected slots
        ``[batch, slots, *rest]``, or a whole vision tensor), given its ``operand`` already
        broadcast to ``values``' shape and dtype. The one place that maps an intervention to
        its effect, for text and vision points alike."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (tensors as nested lists); see :func:`intervention_from_dict`."""
        data = {"type": type(self).__name__}
        for f in fields(self):
            data[f.name] = _encode(getattr(self, f.name), f"{type(self).__name__}.{f.name}")
        return data


@reject_unknown_fields
@dataclass(kw_only=True, eq=False)
class Ablation(Intervention):
    """Replace the point's value at ``positions``.

    ``method="zero"``: zeros. ``"scale"``: multiply by ``factor``. ``"mean"``: the mean from
    ``mean``, a tensor (``[*rest]`` or ``[positions, *rest]``) or an :class:`ActivationCache`
    holding the point, averaged over its examples (real slots only). The positions rule for a
    cache: one taken with one slot per example (e.g. at ``["last"]``) gives one mean vector that
    replaces the point at *any* positions; one with several slots gives a mean per slot, so its
    ``mapping_index`` must equal the ablation's resolved positions (same items, same widths),
    else a ``HookscopeError`` names both. A store's running statistics
    (``store.stats(point)["mean"]``, ``[P, *rest]``) are a tensor: the shape rule applies.
    """

    method: Literal["zero", "mean", "scale"] = "zero"
    factor: float = 0.0
    mean: Any = None

    def transform(self, values, operand, context=None):
        if self.method == "zero":
            return torch.zeros_like(values)
        if self.method == "scale":
            return values * self.factor
        return operand

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.method not in ("zero", "mean", "scale"):
            raise HookscopeError(
                f"Ablation method {self.method!r} is not one of 'zero', 'mean', 'scale'."
            )
        if self.method == "mean" and self.mean is None:
            raise HookscopeError(
                "Ablation(method='mean') needs mean= (a tensor or an ActivationCache)."
            )


@reject_unknown_fields
@dataclass(kw_only=True, eq=False)
class Patch(Intervention):
    """Replace the point's value at ``positions`` with values from another run.

    ``source`` is an :class:`ActivationCache` extracted at the same position items (its key
    ``source_key``, default the point; ``head_z_L{l}H{h}`` for head points), or a tensor
    ``[batch, positions, *rest]`` (``[positions, *rest]`` and ``[*rest]`` broadcast). Rows are
    aligned by example; in ``extract_cache`` a cache source is consumed batch by batch.
    """

    source: Any
    source_key: str | None = None

    def transform(self, values, operand, context=None):
        return operand


@reject_unknown_fields
@dataclass(kw_only=True, eq=False)
class Steer(Intervention):
    """Add ``coefficient * vector`` (``[*rest]`` or ``[positions, *rest]``) at ``positions``.

    With ``relative=True`` the coefficient is relative to the norm of the point's value in each
    slot: each slot ``x`` gets ``coefficient * ||x|| * vector / ||vector||`` (norms over the
    last axis), so ``coefficient=0.5`` pushes every token by half its own residual norm whatever
    the layer's scale.
    """

    vector: Any
    coefficient: float = 1.0
    relative: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.relative, bool):
            raise HookscopeError(f"Steer relative must be True or False, got {self.relative!r}.")

    def transform(self, values, operand, context=None):
        """``values``: ``[batch, slots, *rest]``; ``operand``: the vector broadcast to it."""
        if not self.relative:
            return values + self.coefficient * operand
        direction_norm = operand.norm(dim=-1, keepdim=True)
        if bool((direction_norm == 0).any()):
            raise HookscopeError(
                f"Steer(relative=True) on {self.point}: the vector has norm 0, so it has no "
                "direction to scale; give a nonzero vector."
            )
        slot_norm = values.norm(dim=-1, keepdim=True)
        return values + self.coefficient * slot_norm * operand / direction_norm


@reject_unknown_fields
@dataclass(kw_only=True, eq=False)
class Custom(Intervention):
    """Run ``fn(tensor, context) -> tensor`` on a point (the full ``[batch, seq, ...]`` tensor),
    or on a module's output when ``module`` (a path such as ``"model.layers[2].mlp"``) is given
    instead of ``point``. ``context`` is an :class:`InterventionContext`."""

    point: str | None = None
    module: str | None = None
    fn: Callable[[torch.Tensor, InterventionContext], torch.Tensor]

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.point is None) == (self.module is None):
            raise HookscopeError("Custom needs exactly one of point= or module=.")

    def transform(self, values, operand, context=None):
        """Custom functions see the whole tensor of the call and its context."""
        return self.fn(values, context)


@reject_unknown_fields
@dataclass(kw_only=True, eq=False)
class PatternEdit:
    """Edit the attention matrix of ``layer`` for ``heads`` on a grid of query rows x key
    columns (each a position list, resolved per example).

    Attributes:
        op: post-softmax: ``"zero"``, ``"scale"`` (by ``value``), ``"set"`` (to ``value``),
            ``"patch"`` (from ``source``: a cache's ``pattern_L{l}H{h}`` or a tensor
            ``[batch, rows, columns]``), ``"freeze"`` (the same values, detached: the output
            is then linear in the values, with no gradient through queries and keys; used by
            attribution graphs). Pre-softmax (``stage="pre"``): ``"block"`` (the pair may
            not attend), ``"scale"`` and ``"set"`` of the score. Pre-softmax edits never unmask
            a masked (future or padded) key; post-softmax edits never write masked cells.
        renormalize: after a post-softmax edit, divide each edited row by its new sum (a row with
            nothing left, e.g. the first token with its only key zeroed, stays zero).
    """

    layer: int
    heads: list[int] | Literal["all"] = "all"
    query_positions: list = field(default_factory=_positions_default)
    key_positions: list = field(default_factory=_positions_default)
    op: Literal["zero", "scale", "set", "patch", "freeze", "block"] = "zero"
    value: float = 0.0
    source: Any = None
    stage: Literal["post", "pre"] = "post"
    renormalize: bool = False
    apply_to: Phase = "prompt"

    def __post_init__(self) -> None:
        valid = {
            "post": ("zero", "scale", "set", "patch", "freeze"),
            "pre": ("block", "scale", "set"),
        }
        if self.stage not in valid:
            raise HookscopeError(f"PatternEdit stage {self.stage!r} is not 'post' or 'pre'.")
        if self.op not in valid[self.stage]:
            raise HookscopeError(
                f"PatternEdit op {self.op!r} is not valid at stage {self.stage!r}; valid: {valid[self.stage]}."
            )
        if self.op == "patch" and self.source is None:
            raise HookscopeError("PatternEdit(op='patch') needs source=.")
        if self.apply_to != "prompt":
            raise HookscopeError(
                "PatternEdit applies to the prompt's attention only (apply_to='prompt'); during "
                "generation it edits the prompt forward."
            )

    __eq__ = Intervention.__eq__
    __hash__ = None
    to_dict = Intervention.to_dict


@dataclass
class InterventionContext:
    """What a :class:`Custom` function knows about the call it runs in."""

    point: str | None
    module: nn.Module
    positions: Any
    phase: Literal["prompt", "generated"]
    step: int


AnyIntervention = Intervention | PatternEdit

#: Converters of other libraries' intervention forms (registered by :mod:`hookscope.compat`):
#: each takes any object and returns a hookscope intervention, or None when the form is not its.
CONVERTERS: list[Callable[[Any], AnyIntervention | None]] = []


def convert_foreign(intervention: Any) -> Any:
    """``intervention`` as a hookscope intervention when a registered converter knows its form;
    anything else comes back unchanged (the caller rejects what is not an intervention)."""
    if isinstance(intervention, Intervention | PatternEdit):
        return intervention
    for converter in CONVERTERS:
        if (converted := converter(intervention)) is not None:
            return converted
    return intervention


_TYPES = {cls.__name__: cls for cls in (Ablation, Patch, Steer, Custom, PatternEdit)}


def intervention_from_dict(data: dict[str, Any]) -> AnyIntervention:
    """Rebuild an intervention from :meth:`Intervention.to_dict` output."""
    data = dict(data)
    kind = data.pop("type", None)
    if isinstance(kind, str) and kind.startswith("Feature"):
        raise HookscopeError(
            f"{kind} holds a Dictionary, which has no JSON form: rebuild it with "
            "hookscope.dictionaries.feature_intervention_from_dict(data, {name: dictionary})."
        )
    if kind not in _TYPES:
        raise HookscopeError(f"unknown intervention type {kind!r}; valid: {sorted(_TYPES)}.")
    return _TYPES[kind](**{k: _decode(v) for k, v in data.items()})


def _same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a is b if callable(a) or hasattr(a, "tensors") else a == b


def _encode(value: object, where: str) -> object:
    if isinstance(value, torch.Tensor):
        return {
            "tensor": value.detach().cpu().tolist(),
            "dtype": str(value.dtype).removeprefix("torch."),
        }
    if isinstance(value, tuple):
        return {"tuple": list(value)}
    if isinstance(value, list):
        return [_encode(v, where) for v in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    raise HookscopeError(
        f"{where} holds a {type(value).__name__}, which has no JSON form (save an "
        "ActivationCache with cache.save(); functions cannot be saved)."
    )


def _decode(value: object) -> object:
    if isinstance(value, dict) and "tensor" in value:
        return torch.tensor(value["tensor"], dtype=getattr(torch, value["dtype"]))
    if isinstance(value, dict) and "tuple" in value:
        return tuple(value["tuple"])
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


IMAGE_TEXT_DIRECTIONS = ("text-to-image", "image-to-text", "both")


def image_text_block(
    n_layers: int,
    direction: str = "text-to-image",
    layers: list[int] | None = None,
    heads: list[int] | Literal["all"] = "all",
) -> list[PatternEdit]:
    """Pattern edits that cut attention between text and image tokens (before the softmax, so
    each row renormalises over what it may still attend to).

    ``"text-to-image"``: text queries may not attend to image keys (text then reads nothing of
    the pixels); ``"image-to-text"``: image queries may not attend to text keys; ``"both"``.
    Text means every real token that is not an image token (markers such as
    ``<start_of_image>`` included).

    Raises:
        HookscopeError: for an unknown direction.
    """
    if direction not in IMAGE_TEXT_DIRECTIONS:
        raise HookscopeError(
            f"image-text block direction {direction!r} is not one of {IMAGE_TEXT_DIRECTIONS}."
        )
    pairs = []
    if direction in ("text-to-image", "both"):
        pairs.append((["all-text"], ["all-image"]))
    if direction in ("image-to-text", "both"):
        pairs.append((["all-image"], ["all-text"]))
    return [
        PatternEdit(
            layer=layer,
            heads=heads,
            query_positions=queries,
            key_positions=keys,
            op="block",
            stage="pre",
        )
        for layer in (range(n_layers) if layers is None else layers)
        for queries, keys in pairs
    ]
