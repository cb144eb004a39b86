"""Internal: the store's I/O around the forward (``extract_cache(..., output_dir=...)``).

* :class:`BackgroundWriter`: commits batches on one thread while the next forward runs. At
  most ``depth`` batches wait (memory stays bounded: a full queue blocks the caller); they are
  committed in the order they were put. An error in the thread is kept and raised in the
  caller at the next :meth:`~BackgroundWriter.put` or at :meth:`~BackgroundWriter.drain` /
  :meth:`~BackgroundWriter.close`, never dropped; the batches queued behind a failed one are
  discarded uncommitted (the store stays at its last commit, so the same run resumes).
* :func:`to_store_dtype`: the storage dtype of a cache's activations (``store_dtype``).
* :class:`HostStager`: copies a batch from an accelerator into pinned host buffers with
  ``non_blocking=True`` and synchronises on an event before the batch is written, so the copy
  overlaps the next forward's kernel launches. Tensors already on the CPU pass through
  untouched (a no-op). The buffers come from a :class:`PinnedPool` and go back to it once the
  batch is written.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

import torch

from .cache import ActivationCache
from .errors import InputError

STORE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_STOP = object()


class BackgroundWriter:
    """``commit(item)`` for every item :meth:`put`, in order, on one daemon thread.

    Args:
        commit: called on the thread with each item; what it raises is re-raised in the caller.
        depth: at most this many items wait; :meth:`put` blocks while the queue is full.
    """

    def __init__(self, commit: Callable[[Any], None], depth: int = 2, name: str = "writer"):
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise InputError(f"the writer's queue depth must be a positive int, got {depth!r}.")
        self._commit = commit
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._reported = False
        self._cancelled = False
        self._thread = threading.Thread(target=self._work, name=f"hookscope-{name}", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                # after a failure or an interrupted close, queued items are dropped uncommitted
                if self._error is None and not self._cancelled:
                    self._commit(item)
            except BaseException as error:  # re-raised in the caller
                self._error = error
            finally:
                self._queue.task_done()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _raise_error(self) -> None:
        if self._error is not None and not self._reported:
            self._reported = True
            raise self._error

    def put(self, item: Any) -> None:
        """Queue ``item`` (blocks while ``depth`` items wait). Raises the error of an earlier
        commit that failed (the item is then not queued)."""
        self._raise_error()
        if not self.alive:
            raise RuntimeError("the store's writer thread is closed; open a new writer.")
        self._queue.put(item)

    def drain(self) -> None:
        """Wait until every item put is committed (or dropped after a failure); raise the
        failure if it was not raised yet."""
        if self.alive:
            self._queue.join()
        self._raise_error()

    def close(self) -> BaseException | None:
        """Drain and stop the thread. Returns the failure not raised yet (None if none), so a
        caller already handling another exception can report it beside that one.

        A KeyboardInterrupt while it waits (a second Ctrl-C) does not leave the thread
        running: the items still queued are dropped uncommitted (as after a failure), the one
        being committed finishes (a commit is atomic), and then the interrupt is raised, so the
        caller's cleanup (releasing the store's lock) runs once nothing writes any more.

        Raises:
            KeyboardInterrupt: one arrived while waiting (re-raised once the thread stopped).
        """
        interrupt, stop_queued = None, False
        while self.alive:
            try:
                if not stop_queued:
                    self._queue.put(_STOP, timeout=0.1)  # a timeout: the queue may stay full
                    stop_queued = True
                self._thread.join()
            except queue.Full:
                continue
            except KeyboardInterrupt as error:
                interrupt = interrupt or error
                self._cancelled = True  # the worker drops what is queued, commits nothing more
        failure = None
        if self._error is not None and not self._reported:
            self._reported = True
            failure = self._error
        if interrupt is not None:
            if failure is not None:
                interrupt.add_note(f"The store's writer thread had failed too: {failure}")
            raise interrupt
        return failure


def store_dtype_of(name: Any) -> torch.dtype | None:
    """The torch dtype of a ``store_dtype`` name (None: keep each tensor's own dtype).

    Raises:
        InputError: naming the value and the valid choices.
    """
    if name is None:
        return None
    if isinstance(name, torch.dtype):
        name = str(name).removeprefix("torch.")
    if name not in STORE_DTYPES:
        raise InputError(
            f"store_dtype must be one of {sorted(STORE_DTYPES)} (or None: as computed), got "
            f"{name!r}."
        )
    return STORE_DTYPES[name]


def converts(key: str, value: Any) -> bool:
    """Whether ``store_dtype`` applies to the cache value ``key``: every floating-point tensor
    (activations, logits, running means); ``batch_saver`` fields are the user's, kept as given."""
    return isinstance(value, torch.Tensor) and value.is_floating_point() and key != "batch_saver"


def to_store_dtype(cache: ActivationCache, dtype: torch.dtype | None) -> ActivationCache:
    """``cache`` with every floating-point activation cast to ``dtype``, in place (None: as
    it is). Returns ``cache``."""
    if dtype is None:
        return cache
    for key, value in list(cache.items()):
        if converts(key, value) and value.dtype != dtype:
            if key in cache._counts:  # a running mean keeps its count
                cache.set_running_mean(key, value.to(dtype), cache._counts[key])
            else:
                cache[key] = value.to(dtype)
    return cache


# -- pinned asynchronous device-to-host copies -------------------------------------------------
class PinnedPool:
    """Reusable host buffers by (shape, dtype), pinned when an accelerator is there.

    ``allocate`` makes a new buffer (default: ``torch.empty(..., pin_memory=True)``); a test
    passes a plain allocator to check the reuse logic on a CPU-only machine. At most ``keep``
    buffers of one shape and dtype are kept for reuse."""

    def __init__(self, allocate: Callable[..., torch.Tensor] | None = None, keep: int = 4):
        self._allocate = allocate or _pinned_empty
        self._free: dict[tuple, list[torch.Tensor]] = {}
        self._lock = threading.Lock()
        self.keep, self.allocated = keep, 0

    def take(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        with self._lock:
            free = self._free.get((tuple(shape), dtype))
            if free:
                return free.pop()
        self.allocated += 1
        return self._allocate(tuple(shape), dtype)

    def give(self, buffer: torch.Tensor) -> None:
        """Return ``buffer`` for reuse (called once the batch that used it is written)."""
        with self._lock:
            free = self._free.setdefault((tuple(buffer.shape), buffer.dtype), [])
            if len(free) < self.keep:
                free.append(buffer)


def _pinned_empty(shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, pin_memory=True)


class StagedBatch:
    """A batch on its way to the host: :meth:`wait` synchronises the copies and gives the host
    cache; :meth:`release` hands its buffers back to the pool once the batch is written."""

    def __init__(self, cache: ActivationCache, event: Any, buffers: list, pool: PinnedPool | None):
        self.cache, self._event, self._buffers, self._pool = cache, event, buffers, pool

    @property
    def copying(self) -> bool:
        """Whether a copy is under way (False: the cache was on the host already)."""
        return self._event is not None or bool(self._buffers)

    def wait(self) -> ActivationCache:
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        return self.cache

    def release(self) -> None:
        if self._pool is not None:
            for buffer in self._buffers:
                self._pool.give(buffer)
        self._buffers = []


class HostStager:
    """Start the device-to-host copy of a batch's tensors (non_blocking, into pinned buffers).

    Args:
        pool: where the host buffers come from (default: pinned ones).
        record_event: makes the event to synchronise on after the copies (default: a CUDA
            event recorded on the current stream); a test passes a stand-in.
    """

    def __init__(
        self,
        pool: PinnedPool | None = None,
        record_event: Callable[[], Any] | None = None,
        on_device: Callable[[torch.Tensor], bool] | None = None,
    ):
        self.pool = pool
        self._record_event = record_event or _cuda_event
        self._on_device = on_device or _on_device  # a test stages CPU tensors as if on a GPU

    def stage(self, cache: ActivationCache) -> StagedBatch:
        """``cache``'s device tensors copied into host buffers (``batch_saver`` fields too).
        A cache with every tensor on the CPU is returned as it is, with no copy and no event."""
        on_device = self._on_device
        moving = [k for k, v in cache.items() if isinstance(v, torch.Tensor) and on_device(v)]
        saver = cache.get("batch_saver") if "batch_saver" in cache else None
        saver = saver if isinstance(saver, dict) else {}
        saver_moving = [k for k, v in saver.items() if isinstance(v, torch.Tensor) and on_device(v)]
        if not moving and not saver_moving:
            return StagedBatch(cache, None, [], None)
        if self._record_event is _cuda_event and not _all_cuda(cache, moving, saver_moving):
            return StagedBatch(cache.cpu(), None, [], None)  # (mps, xpu): a plain copy
        if self.pool is None:
            self.pool = PinnedPool()
        buffers: list[torch.Tensor] = []

        def to_host(value: torch.Tensor) -> torch.Tensor:
            buffer = self.pool.take(value.shape, value.dtype)
            buffer.copy_(value, non_blocking=True)
            buffers.append(buffer)
            return buffer

        for key in moving:
            if key in cache._counts:
                cache.set_running_mean(key, to_host(cache[key]), to_host(cache._counts[key]))
            else:
                cache[key] = to_host(cache[key])
        if saver_moving:
            cache["batch_saver"] = {
                k: to_host(v) if k in saver_moving else v for k, v in saver.items()
            }
        return StagedBatch(cache, self._record_event(), buffers, self.pool)


def _on_device(value: torch.Tensor) -> bool:
    return value.device.type != "cpu"


def _all_cuda(cache: ActivationCache, keys: list[str], saver_keys: list[str]) -> bool:
    values = [cache[k] for k in keys] + [cache["batch_saver"][k] for k in saver_keys]
    return all(value.device.type == "cuda" for value in values)


def _cuda_event() -> Any:
    event = torch.cuda.Event()
    event.record()
    return event
