"""Internal: ``extract_cache``'s in-memory result written into buffers reserved once.

When the size of the dataset is known before the loop (a list of texts or records, a list of
tokenized batches), the per-example activations of every batch are copied into one buffer per
key, ``[examples, ...]``, allocated at the first batch, instead of being kept per batch and
concatenated at the end. The batch's own tensors are then freed at once, so the resident
memory is the data plus one forward's working set, whatever the allocator keeps between
small blocks (see benchmarks/RESULTS.md: kept per batch, 691 MB of results grew the resident
set by 1.7-7.6 GB), and the merge at the end copies nothing. With ``sort_by_length`` each
row is written at its example's index, so no reordering pass is needed either.

Only plain ``[batch, P, ...]`` activations are reserved (the default axes, one row per example,
the same width in every batch); everything else (``input_ids``, patterns with declared axes,
running means, ``batch_saver``, values that are not tensors) is merged as before. A batch that
does not fit the reservation (another position layout, another width: ``"all"`` over prompts
of different lengths) turns the rest of the run into the plain merge, with the rows written so
far as its first part: the result is the same either way.
"""

from __future__ import annotations

from typing import Any

import torch

from .cache import ActivationCache
from .errors import HookscopeError


def known_size(dataloader: Any, texts: list[str] | None) -> int | None:
    """How many examples ``dataloader`` holds, when it can tell before the loop: a list of
    texts or records (``texts``), or a list / tuple of tokenized batches (mappings with
    ``input_ids``, or id tensors). None otherwise (an iterator, a DataLoader, one batch)."""
    if texts is not None:
        return len(texts)
    if not isinstance(dataloader, list | tuple) or not dataloader:
        return None
    total = 0
    for batch in dataloader:
        ids = batch.get("input_ids") if hasattr(batch, "get") else batch
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            return None
        total += len(ids)
    return total


class ReservedResults:
    """The in-memory result of a dataset of ``total`` examples, built batch by batch.

    Use: :meth:`add` each batch's cache (on the host, already in its storage dtype), then
    :meth:`result`.
    """

    def __init__(self, total: int, pad_token_id: int):
        self.total = total
        self.rest = ActivationCache(pad_token_id=pad_token_id)  # what is merged as before
        self.buffers: dict[str, torch.Tensor] | None = None  # None: not reserved (yet / any more)
        self.key_order: list[str] = []
        self.mapping: Any = None
        self.filled = 0
        self.written: list[torch.Tensor] = []  # each batch's example indices (sorted runs only)
        self.sorted = False

    def add(self, cache: ActivationCache, rows: torch.Tensor | None) -> None:
        """Keep one batch. ``rows``: the examples' indices in the dataset (``sort_by_length``),
        or None: the next examples in order. ``cache`` is consumed (its reserved keys are
        removed from it)."""
        count = len(cache["position_mask"])
        if rows is not None:
            self.sorted = True
        if self.buffers is None and self.filled == 0:
            self._reserve(cache, count)
        if self.buffers is not None and not self._fits(cache, count):
            self._give_up()
        if self.buffers is not None:
            self._write(cache, count, rows)
        self.rest.cat(cache)
        self.filled += count

    def _reservable(self, cache: ActivationCache, count: int) -> list[str]:
        return [
            key
            for key, value in cache.items()
            if isinstance(value, torch.Tensor)
            and key != "input_ids"
            and key not in cache._axes
            and key not in cache._counts
            and key not in cache._aggregated
            and value.dim() >= 1
            and len(value) == count
        ]

    def _reserve(self, cache: ActivationCache, count: int) -> None:
        self.key_order = list(cache.keys())
        self.mapping = cache.get("mapping_index")
        self.buffers = {}
        for key in self._reservable(cache, count):
            value = cache[key]
            self.buffers[key] = torch.empty(
                (self.total, *value.shape[1:]), dtype=value.dtype, device=value.device
            )

    def _fits(self, cache: ActivationCache, count: int) -> bool:
        """The batch has the reserved keys with the reserved widths and position layout."""
        if self.filled + count > self.total or cache.get("mapping_index") != self.mapping:
            return False
        if list(cache.keys()) != self.key_order:
            return False
        for key, buffer in self.buffers.items():
            value = cache[key]
            if (
                not isinstance(value, torch.Tensor)
                or value.shape[1:] != buffer.shape[1:]
                or value.dtype != buffer.dtype
                or len(value) != count
                or key in cache._axes
            ):
                return False
        return True

    def _write(self, cache: ActivationCache, count: int, rows: torch.Tensor | None) -> None:
        for key, buffer in self.buffers.items():
            value = cache[key]
            if rows is None:
                buffer[self.filled : self.filled + count].copy_(value)
            else:
                buffer.index_copy_(0, rows.to(buffer.device), value.to(buffer.device))
            del cache[key]
        if rows is not None:  # in order, the rows written are 0..filled: nothing to keep
            self.written.append(rows)

    def _give_up(self) -> None:
        """Stop reserving: the rows written so far become the first part of a plain merge."""
        self.rest._merge_pending()
        order = torch.cat(self.written) if self.written else torch.zeros(0, dtype=torch.long)
        head = {}
        for key, buffer in self.buffers.items():
            # a copy: a view would keep the whole dataset-sized buffer until the final merge
            head[key] = buffer[: self.filled].clone() if not self.sorted else buffer[order]
        data = self.rest._data
        for key in self.key_order:
            if key in head:
                data[key] = head[key]
            elif key in data:
                data[key] = data.pop(key)  # keep the first batch's key order
        self.buffers = None

    def result(self) -> ActivationCache:
        """Every example, in dataset order (as concatenating the batches would give)."""
        rest = self.rest
        if self.sorted:
            rest.reorder_rows(torch.argsort(rest["batch_saver"]["example_index"]))
        if self.buffers is None:
            return rest
        rest._merge_pending()
        if self.filled != self.total:
            if self.sorted:
                raise HookscopeError(
                    f"the dataset gave {self.filled} examples where {self.total} were counted."
                )
            self.buffers = {k: b[: self.filled] for k, b in self.buffers.items()}
        data = rest._data
        rest._data = {
            key: self.buffers[key] if key in self.buffers else data[key] for key in self.key_order
        }
        return rest
