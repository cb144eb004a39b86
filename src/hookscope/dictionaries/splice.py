"""Splicing: run the model with a point replaced by a dictionary's reconstruction.

``Splice(d)`` is an intervention (usable in ``interventions=`` of ``forward``,
``extract_cache``, ``generate``, in ``register_interventions`` and beside any other
intervention). At its positions it replaces the point ``d`` writes by

    x_hat = d.decode(d.encode(x))         (+ (y - x_hat) with keep_error=True)

where ``x`` is the point ``d`` reads and ``y`` the point it writes, both from the same call:

- an SAE (``reads == writes``): ``x = y``, the point's own value. With ``keep_error=True``
  (SAELens' error term) the model computes what it computed unspliced (up to float rounding)
  while the value is routed through the dictionary's features; without it the model runs on
  the reconstruction alone.
- a transcoder (``reads="mlp_in_l"``, ``writes="mlp_out_l"``): the MLP's output is replaced
  by the transcoder's prediction from the MLP's input, read earlier in the same forward.

Several splices (two layers, an SAE and a transcoder) apply at once, in the order given.
Features extracted in the same call (``extract_features``) of the spliced dictionary object are
those the splice used: the features of the value the model computed at the point, before the
splice replaced it (see :mod:`hookscope.dictionaries.features`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..archs import ModelMap
from ..capture import locate
from ..editing import PreparedIntervention, SlotFn
from ..errors import HookscopeError
from ..hooks import ModuleHook, reading_hook
from ..interventions import Intervention
from ..keywords import reject_unknown_fields
from ..points import KINDS
from ..positions import PositionContext
from ..window import CallWindow
from .core import Dictionary
from .features import dictionary_points


def spliced_values(
    dictionary: Dictionary, x: torch.Tensor, y: torch.Tensor, keep_error: bool
) -> torch.Tensor:
    """The splice's new value of the written point: ``x [..., d_in]`` (what the dictionary
    reads) -> ``x_hat [..., d_out]``, plus ``y - x_hat`` (``y``: the written point's value)
    with ``keep_error``. In the wider of the dictionary's and ``y``'s dtypes, so that a
    float32 model spliced with a bfloat16 dictionary keeps its error term in float32 (``y`` is
    not rounded to the dictionary's precision) and the output stays unchanged."""
    on_device = dictionary.on(x.device)
    reconstruction = on_device.reconstruct(x)
    if not keep_error:
        return reconstruction
    reconstruction = reconstruction.to(torch.promote_types(reconstruction.dtype, y.dtype))
    return reconstruction + (y.to(reconstruction.dtype) - reconstruction)


@reject_unknown_fields
@dataclass(eq=False)
class Splice(Intervention):
    """Replace the point ``dictionary`` writes by its reconstruction at ``positions``.

    Attributes:
        dictionary: the SAE or transcoder (:class:`~hookscope.dictionaries.Dictionary`).
        keep_error: add the error term ``y - x_hat`` back, so that the model's computation is
            unchanged (True, the default); False runs the model on the reconstruction alone.
        positions, apply_to: as for every intervention (default: every prompt token).
        point: always ``dictionary.writes`` (set for you).
    """

    dictionary: Dictionary
    keep_error: bool = True
    point: str | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        if not isinstance(self.dictionary, Dictionary):
            raise HookscopeError(
                f"Splice takes a hookscope.dictionaries.Dictionary, got "
                f"{type(self.dictionary).__name__}."
            )
        if self.point is None:
            self.point = self.dictionary.writes
        elif self.point != self.dictionary.writes:
            raise HookscopeError(
                f"Splice point {self.point!r} is not the point its dictionary writes "
                f"({self.dictionary.writes!r}); leave point= out."
            )
        if not isinstance(self.keep_error, bool):
            raise HookscopeError(
                f"Splice keep_error must be True or False, got {self.keep_error!r}."
            )
        super().__post_init__()

    def transform(self, values, operand, context=None):
        """An SAE splice of the selected slots ``[batch, slots, d]`` (a transcoder needs the
        point it reads as well, which :meth:`module_hooks` provides)."""
        return spliced_values(self.dictionary, values, values, self.keep_error)

    def module_hooks(
        self, model_map: ModelMap, context: PositionContext, window: CallWindow
    ) -> list[ModuleHook]:
        """The hooks of this splice for one call, checked against the model and the batch."""
        return _PreparedSplice(self, model_map, context, window).hooks()


class _PreparedSplice(PreparedIntervention):
    """A Splice ready to apply: the written point's hook replaces the selected slots; a
    transcoder's also reads the point it reads, earlier in the same forward."""

    def __init__(
        self, splice: Splice, model_map: ModelMap, context: PositionContext, window: CallWindow
    ):
        reads, writes = dictionary_points(splice.dictionary, model_map)  # before the forward
        if KINDS[writes.kind].written_as is not None:
            raise HookscopeError(
                f"Splice of {splice.dictionary.name!r}: {writes.name} is written as "
                f"{KINDS[writes.kind].written_as} (its own space); splice a dictionary that "
                f"writes {KINDS[writes.kind].written_as} instead."
            )
        self.splice = splice
        self.reads = reads
        self.read_value: torch.Tensor | None = None
        super().__init__(splice, model_map, context, window)

    def _slot_fn(self) -> SlotFn:
        splice = self.splice
        if not splice.dictionary.is_transcoder:
            return lambda x, pos: spliced_values(splice.dictionary, x, x, splice.keep_error)

        def from_read_point(y: torch.Tensor, positions: Any) -> torch.Tensor:
            if self.read_value is None or self.read_value.shape[0] != y.shape[0]:
                raise HookscopeError(
                    f"Splice of {splice.dictionary.name!r}: {splice.dictionary.reads} was not "
                    f"computed before {splice.dictionary.writes} in this forward."
                )
            x = positions.select(self.read_value)
            return spliced_values(splice.dictionary, x, y, splice.keep_error)

        return from_read_point

    def apply(self, module, tensor: torch.Tensor) -> torch.Tensor:
        """Remember what the splice received (feature extraction reads it), then splice."""
        self.window.spliced[id(self.splice.dictionary)] = tensor
        return super().apply(module, tensor)

    def hooks(self) -> list[ModuleHook]:
        hooks = super().hooks()
        if not self.splice.dictionary.is_transcoder:
            return hooks
        site = locate(self.reads, self.model_map)

        def remember(tensor: torch.Tensor) -> None:
            self.read_value = site.read(tensor)

        return [reading_hook(site.module, site.when, remember), *hooks]
