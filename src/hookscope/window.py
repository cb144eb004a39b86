"""Internal: which token positions one model call covers.

``forward`` runs every position in one call. ``generate`` runs the prompt, then (under the KV
cache) one new token per call, or (without it) the whole sequence again. A :class:`CallWindow`
follows those calls so that intervention and capture hooks know which absolute positions the
tensors they see hold; :class:`StepPositions` gives capture hooks the target positions in the
prompt call and the newest token in every later call.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .positions import ResolvedPositions


@dataclass
class CallWindow:
    """Which absolute positions the current model call covers, and its phase.

    Attributes:
        prompt_length: padded length of the prompt (absolute positions below it are prompt).
        offset: absolute position of the call's first input token (cached tokens before it).
        length: number of input tokens in the call.
        step: 0 for the prompt call, then 1, 2, ... per generated token.
        example_offset: index of the batch's first row in the whole dataset (cache sources).
        spliced: by ``id(dictionary)``, the value a Splice of that dictionary received in the
            current call (before it replaced the point), for feature extraction.
    """

    prompt_length: int
    offset: int = 0
    length: int = 0
    step: int = 0
    example_offset: int = 0
    resid_in: dict[int, torch.Tensor] = field(default_factory=dict)
    spliced: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def phase(self) -> str:
        return "prompt" if self.step == 0 else "generated"

    def enter_call(self, q_len: int, kv_len: int) -> None:
        """Record a new model call of ``q_len`` input tokens over ``kv_len`` total positions."""
        if self.length:
            self.step += 1
        self.offset, self.length = kv_len - q_len, q_len

    def covers(self, apply_to: str) -> bool:
        """Whether an intervention with ``apply_to`` has anything to do in this call."""
        if apply_to == "both":
            return True
        if apply_to == "prompt":
            return self.offset < self.prompt_length
        return self.offset + self.length > self.prompt_length

    def generated_positions(self, batch: int, device: torch.device) -> ResolvedPositions:
        """Slots for every generated position in this call (relative to the call)."""
        first = max(self.prompt_length - self.offset, 0)
        index = torch.arange(first, self.length, device=device).expand(batch, -1)
        return ResolvedPositions(
            index=index,
            mask=torch.ones_like(index, dtype=torch.bool),
            mapping_index={"generated": list(range(index.shape[1]))},
            items=["generated"],
            widths=[index.shape[1]],
        )

    def prompt_positions(self, positions: ResolvedPositions) -> ResolvedPositions | None:
        """``positions`` (absolute, on the prompt) shifted into this call; None if none fall in it."""
        if self.offset == 0 and self.length >= self.prompt_length:
            return positions
        index = positions.index - self.offset
        inside = (index >= 0) & (index < self.length) & positions.mask
        if not inside.any():
            return None
        return ResolvedPositions(
            index=index.clamp(0, self.length - 1),
            mask=inside,
            mapping_index=positions.mapping_index,
            items=positions.items,
            widths=positions.widths,
        )


class StepPositions:
    """Capture positions that follow the generation step: the targets in the prompt call, the
    newest position (``mapping_index["generated"]``) in every later call. Duck-types the
    ``select`` / ``average`` of :class:`~hookscope.positions.ResolvedPositions`."""

    def __init__(self, targets: ResolvedPositions, window: CallWindow):
        self.targets, self.window = targets, window
        self._step: tuple[int, ResolvedPositions] | None = None

    def _current(self, batch: int) -> ResolvedPositions:
        if self.window.step == 0:
            return self.targets
        if self._step is None or self._step[0] != self.window.step:  # built once per step
            index = torch.full((batch, 1), self.window.length - 1)
            newest = ResolvedPositions(
                index,
                torch.ones_like(index, dtype=torch.bool),
                {"generated": [0]},
                ["generated"],
                [1],
            )
            self._step = (self.window.step, newest)
        return self._step[1]

    def select(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden [batch, call_len, ...]`` -> ``[batch, slots, ...]`` for this step."""
        return self._current(hidden.shape[0]).select(hidden)

    def average(self, selected: torch.Tensor) -> torch.Tensor:
        return self._current(selected.shape[0]).average(selected)
