"""Shuffled streaming batches of activation vectors from an :class:`~hookscope.store.ActivationStore`.

A store holds one point as ``[examples, P, d]`` per shard with a ``position_mask [examples, P]``.
Training a dictionary wants the opposite view: a stream of single vectors ``[batch, d]``, every
real (unpadded) slot once per epoch, in an order that mixes examples and shards, without holding
the whole store in memory. :class:`ShuffledVectors` does that:

1. each epoch visits the shards in a seeded random order;
2. the real vectors of each shard (``position_mask`` True, optionally only some ``slots``) are
   appended to a buffer of at most ``buffer_size`` vectors (plus one shard);
3. when the buffer is full it is permuted, and batches are taken from it until half of it is
   left; the rest waits for the next shard (so vectors of different shards mix);
4. at the end of the epoch what is left is permuted and emitted (the last batch may be short,
   unless ``drop_last``).

Every draw comes from one ``torch.Generator`` seeded with ``(seed, epoch)``: the same seed gives
the same batches, another seed another order. Only one point's tensor (plus the mask) of one
shard is read at a time (:meth:`ActivationStore.shard`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from .errors import HookscopeError
from .store import ActivationStore

Slots = slice | Sequence[int] | None


def select_slots(mask: torch.Tensor, slots: Slots) -> torch.Tensor:
    """``mask [examples, P]`` with every slot not in ``slots`` set False (``None``: all)."""
    if slots is None:
        return mask
    keep = torch.zeros(mask.shape[1], dtype=torch.bool)
    keep[list(range(mask.shape[1]))[slots] if isinstance(slots, slice) else list(slots)] = True
    return mask & keep


def refuse_negative_slots(slots: Slots) -> None:
    """Slots count from the first slot. A shard's slot count is that of its longest selection
    (``"all"`` under padding), so slot -1 is not each example's last token but a padded slot
    that only the longest examples fill: refused rather than silently selecting those few."""
    if isinstance(slots, slice):
        negative = [v for v in (slots.start, slots.stop) if v is not None and v < 0]
    else:
        negative = [v for v in slots or () if v < 0]
    if negative:
        raise HookscopeError(
            f"slots {slots!r}: give slot indices >= 0, counted from "
            "the first slot; a negative slot is not each example's last token (slots are padded "
            "to the longest selection). Extract the store at ['last'] for last tokens."
        )


def shard_vectors(
    store: ActivationStore,
    point: str,
    index: int,
    slots: Slots = None,
    max_norm: float | None = None,
) -> torch.Tensor:
    """The real vectors of ``point`` in shard ``index``, row-major (example, then slot):
    ``[n_real, d]``. ``slots`` keeps only those position slots (e.g. ``slice(1, None)`` drops
    the first token of stores extracted at ``"all"``); ``max_norm`` drops vectors whose norm
    exceeds it (the "massive activations" of attention-sink tokens)."""
    data = store.shard(index, [point])
    values, mask = data[point], data["position_mask"].bool()
    if values.dim() != 3 or values.shape[:2] != mask.shape:
        raise HookscopeError(
            f"{point!r} in shard {index} has shape {list(values.shape)}; a vector point "
            f"[examples, P, d] matching position_mask {list(mask.shape)} is needed."
        )
    refuse_negative_slots(slots)
    if isinstance(slots, Sequence) and any(not 0 <= s < mask.shape[1] for s in slots):
        raise HookscopeError(f"slots {list(slots)} out of range: the store has {mask.shape[1]}.")
    vectors = values[select_slots(mask, slots)]
    if max_norm is not None:
        vectors = vectors[vectors.float().norm(dim=-1) <= max_norm]
    return vectors


def store_vectors(
    store: ActivationStore,
    point: str,
    slots: Slots = None,
    shards: Sequence[int] | None = None,
    max_norm: float | None = None,
) -> torch.Tensor:
    """Every real vector of ``point`` in ``shards`` (all by default), in store order: ``[N, d]``
    (``slots`` and ``max_norm`` as in :func:`shard_vectors`)."""
    indices = range(store.num_shards) if shards is None else shards
    return torch.cat([shard_vectors(store, point, i, slots, max_norm) for i in indices])


class ShuffledVectors:
    """Iterable of shuffled batches ``[batch_size, d]`` of one point's real vectors.

    Args:
        store: an :class:`ActivationStore` (or the folder of one).
        point: a stored vector point, e.g. ``"resid_out_15"``.
        batch_size: vectors per batch (the last one of an epoch may be shorter).
        buffer_size: vectors held before a shuffle; larger mixes better (memory
            ``buffer_size * d`` floats). Must be >= ``batch_size``.
        seed: seeds the shard order and every permutation; epoch ``e`` uses ``(seed, e)``.
        epochs: how many passes ``iter()`` makes (:meth:`epoch` gives one).
        slots: only these position slots (a slice or indices), e.g. ``slice(1, None)``.
        max_norm: drop vectors whose norm exceeds it (attention-sink outliers).
        shards: only these shards (e.g. all but a held-out one).
        dtype, device: cast / move each batch.
        drop_last: skip the short last batch of each epoch.
    """

    def __init__(
        self,
        store: ActivationStore | str,
        point: str,
        batch_size: int,
        *,
        buffer_size: int = 65536,
        seed: int = 0,
        epochs: int = 1,
        slots: Slots = None,
        shards: Sequence[int] | None = None,
        max_norm: float | None = None,
        dtype: torch.dtype | None = None,
        device: Any = None,
        drop_last: bool = False,
    ):
        self.store = store if isinstance(store, ActivationStore) else ActivationStore.open(store)
        if point not in self.store.keys():
            raise HookscopeError(f"{point!r} is not in the store; keys: {self.store.keys()[:12]}.")
        for name, value in (("batch_size", batch_size), ("epochs", epochs)):
            if not (isinstance(value, int) and value > 0):
                raise HookscopeError(f"{name} must be a positive int, got {value!r}.")
        if not (isinstance(buffer_size, int) and buffer_size >= batch_size):
            raise HookscopeError(
                f"buffer_size must be an int >= batch_size ({batch_size}), got {buffer_size!r}."
            )
        refuse_negative_slots(slots)
        self.shards = list(range(self.store.num_shards) if shards is None else shards)
        bad = [s for s in self.shards if not 0 <= s < self.store.num_shards]
        if bad:
            raise HookscopeError(f"shards {bad} out of range 0..{self.store.num_shards - 1}.")
        if not self.shards or len(set(self.shards)) != len(self.shards):
            # none: an empty stream; twice: its vectors twice per epoch (not "each once")
            raise HookscopeError(
                f"shards {self.shards}: give each shard at most once, and at least one "
                f"(the store has {self.store.num_shards}: 0..{self.store.num_shards - 1})."
            )
        self.point, self.batch_size, self.buffer_size = point, batch_size, buffer_size
        self.seed, self.epochs, self.slots, self.max_norm = seed, epochs, slots, max_norm
        self.dtype, self.device, self.drop_last = dtype, device, drop_last

    def __iter__(self) -> Iterator[torch.Tensor]:
        for epoch in range(self.epochs):
            yield from self.epoch(epoch)

    def epoch(self, epoch: int = 0) -> Iterator[torch.Tensor]:
        """The batches of one epoch, ``[batch_size, d]`` each."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.shards), generator=generator).tolist()
        # the shards' vectors wait as parts and are concatenated once per shuffle, not once per
        # shard (which copied the whole buffer again for every shard added)
        parts: list[torch.Tensor] = []
        held = 0
        for position in order:
            index = self.shards[position]
            vectors = shard_vectors(self.store, self.point, index, self.slots, self.max_norm)
            parts.append(vectors)
            held += len(vectors)
            if held >= self.buffer_size:
                buffer = torch.cat(parts)
                buffer = buffer[torch.randperm(len(buffer), generator=generator)]
                taken = (len(buffer) - self.buffer_size // 2) // self.batch_size * self.batch_size
                yield from self._batches(buffer[:taken])
                parts, held = [buffer[taken:]], len(buffer) - taken
        if held:
            buffer = torch.cat(parts)
            buffer = buffer[torch.randperm(len(buffer), generator=generator)]
            yield from self._batches(buffer, last=True)

    def _batches(self, vectors: torch.Tensor, last: bool = False) -> Iterator[torch.Tensor]:
        for start in range(0, len(vectors), self.batch_size):
            batch = vectors[start : start + self.batch_size]
            if last and self.drop_last and len(batch) < self.batch_size:
                return
            yield batch.to(device=self.device, dtype=self.dtype)
