"""On-disk activation store: sharded safetensors, a manifest, running statistics, resumable.

Layout of an output folder::

    manifest.json                  what was extracted, by which model and versions, and the
                                   committed shards (example range, bytes, sha256)
    shard-00000.safetensors ...    one ActivationCache file per batch (no pickle)
    stats-00012.safetensors        running count / mean / M2 per point and position slot, as of
                                   the last committed shard

``extract_cache`` commits each batch on a writer thread while the next batch's forward runs (at
most two batches wait; :class:`~hookscope.store_io.BackgroundWriter`): an error there is raised
in the caller at the next batch or at the end, and the batches queued before an error in the
caller are committed before it propagates (a second Ctrl-C while they are committed drops the
ones not begun yet; the folder's lock is released in every case). With ``store_dtype`` ("float16", "bfloat16",
"float32") the activations are stored in that dtype (the description records it, so a resume
must ask the same; the running statistics are those of the stored values);
``store.read(key, dtype=...)`` converts on reading.

Every file is written to a temporary name and renamed; the manifest is rewritten last, so it is
the commit point: a run killed at any moment leaves a folder whose manifest names only complete
shards, and a restart with the same arguments continues after them (no example lost or
duplicated). Reading checks each shard's size and sha256 and raises a clear error on a mismatch.

A reused folder is checked against the data it is asked to hold. Each example has a fingerprint,
the sha256 of its real token ids (where the attention mask is 1, so padding does not change it;
plus a record's other fields): each shard keeps its examples' fingerprints in its metadata, the
manifest a digest of them per shard and the count. A run resumes only when the committed examples
are the first examples asked, checked batch by batch before a committed batch is skipped; it then
continues (more examples are appended; a last batch that was shorter than the one now asked is
run again whole, so the store equals a clean run on the examples asked). Otherwise a
:class:`StoreError` names the folder and the first example that differs; one that holds *more*
examples than asked is refused too (a store holds exactly what was asked). ``overwrite=True``
replaces the store: the new empty manifest is committed first, then the old store's files are
deleted (only hookscope's own), so the folder is at every moment one valid store. Images
(``pixel_values``) are not fingerprinted: a vision-language store is checked on its token ids only.

One writer at a time: a writer holds an ``flock`` on ``.hookscope-writer.lock`` (the file holds
its pid and host name); a second live writer gets a :class:`StoreError` naming them, the lock of
a dead one is taken over with a warning naming it (POSIX; Windows has no lock between processes).
A write that fails (disk full, permission denied) raises a :class:`StoreError` saying the last
commit is intact; the same run then resumes.

A store from elsewhere is untrusted input: the manifest is checked before anything it names is
opened (:func:`check_manifest`: types, ranges, the format version, shard ranges adding up, a
sha256 per shard and statistics file, every name :func:`confined` to the folder), and every
safetensors header is checked against its file's size before a tensor is allocated
(:func:`hookscope.cache.read_safetensors_header`). Each failure is a :class:`StoreError` naming
the field or file and the folder.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import socket
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, NoReturn

import torch
from safetensors import safe_open

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

from .cache import (
    ActivationCache,
    _decode_mapping,
    _encode_mapping,
    _metadata_json,
    read_safetensors_header,
)
from .errors import HookscopeError, StoreError
from .safetensors_files import write_safetensors
from .store_io import BackgroundWriter, StagedBatch, store_dtype_of

MANIFEST = "manifest.json"
_FORMAT = "hookscope.ActivationStore/1"
_NOT_STATS = ("logits", "position_mask", "input_ids")
_OWN_FILES = ("shard-[0-9][0-9][0-9][0-9][0-9].safetensors", "stats-*.safetensors")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_manifest(path: Path) -> dict:
    """The manifest at ``path``; a StoreError when it is not JSON (damaged by hand or on disk:
    hookscope writes it atomically)."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise StoreError(
            f"{path} is not valid JSON ({error}); restore it, or use overwrite=True / another "
            "output_dir."
        ) from None


# -- a manifest from elsewhere is untrusted input ---------------------------------------------
def confined(folder: Path, name: Any, field: str) -> Path:
    """``folder / name`` for a file name a manifest gives, refused (a :class:`StoreError` naming
    the field and the folder) before any file is opened unless it stays inside ``folder``: a
    relative path without ``..``, and no symbolic link on the way leading out."""
    if not isinstance(name, str) or not name or "\0" in name or "\\" in name:
        raise StoreError(
            f"{field} of the manifest in {folder} must be a file name inside the store, not "
            f"{name!r}."
        )
    parts = name.split("/")
    if name.startswith("/") or ".." in parts or ":" in parts[0]:
        raise StoreError(
            f"{field} of the manifest in {folder} names {name!r}, which leads outside the store "
            "(an absolute path or '..'); refused: a store only reads files inside its folder."
        )
    path = folder / name
    inside = folder.resolve()
    if not path.resolve().is_relative_to(inside):
        raise StoreError(
            f"{field} of the manifest in {folder} names {name!r}, a symbolic link leading "
            f"outside the store (to {path.resolve()}); refused: a store only reads files inside "
            "its folder."
        )
    return path


def _natural(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _malformed(folder: Path, field: str, problem: str) -> NoReturn:
    raise StoreError(
        f"the manifest of {folder} is malformed: {field} {problem}; restore it, or use "
        "overwrite=True / another output_dir."
    )


def check_manifest(manifest: Any, folder: Path) -> dict:
    """``manifest`` checked before anything it names is opened: types, ranges, the format
    version, every file name confined to ``folder``, shard example ranges consecutive from 0 and
    adding up to ``examples``, a checksum for every shard. Returns it; a :class:`StoreError`
    naming the field and the folder otherwise."""
    if not isinstance(manifest, dict):
        _malformed(folder, "the manifest", f"must be a JSON object, not {manifest!r:.80}")
    if manifest.get("format") != _FORMAT:
        raise StoreError(
            f"{folder / MANIFEST} is not a hookscope activation-store manifest (format "
            f"{manifest.get('format')!r:.80}; this hookscope reads {_FORMAT!r})."
        )
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        _malformed(folder, "'shards'", f"must be a list, not {shards!r:.80}")
    end = 0
    for index, shard in enumerate(shards):
        end = _check_shard_entry(shard, index, end, folder)
    if manifest.get("examples") != end or not _natural(manifest.get("examples")):
        _malformed(
            folder, "'examples'", f"is {manifest.get('examples')!r:.80}, the shards hold {end}"
        )
    for field, default in (("stats", None), ("previous_stats", None), ("batch_saver", None)):
        manifest.setdefault(field, default)  # optional: absent in older or hand-made manifests
    if shards and manifest["stats"] is None:
        _malformed(folder, "'stats'", f"is missing, but {len(shards)} shards are committed")
    for field in ("stats", "previous_stats"):
        if manifest.get(field) is not None:
            confined(folder, manifest[field], f"{field!r}")
        checksum = manifest.get(f"{field}_sha256")
        if checksum is not None and not _is_hex(checksum, 64):
            _malformed(folder, f"'{field}_sha256'", f"must be 64 hex digits, not {checksum!r:.80}")
    if not isinstance(manifest.get("complete", False), bool):
        _malformed(folder, "'complete'", "must be true or false")
    if not isinstance(manifest.get("description", {}), dict):
        _malformed(folder, "'description'", "must be a JSON object")
    saver = manifest.get("batch_saver")
    if saver is not None and not (
        isinstance(saver, list) and all(isinstance(k, str) for k in saver)
    ):
        _malformed(folder, "'batch_saver'", "must be null or a list of field names")
    return manifest


def _check_shard_entry(shard: Any, index: int, start: int, folder: Path) -> int:
    """Check ``shards[index]``, which must hold examples from ``start``; returns where it ends."""
    field = f"shards[{index}]"
    if not isinstance(shard, dict):
        _malformed(folder, field, f"must be a JSON object, not {shard!r:.80}")
    confined(folder, shard.get("file"), f"{field}.file")
    examples = shard.get("examples")
    if not (isinstance(examples, list) and len(examples) == 2 and all(map(_natural, examples))):
        _malformed(folder, f"{field}.examples", f"must be [first, end], not {examples!r:.80}")
    if examples[0] != start or examples[1] < start:
        _malformed(
            folder, f"{field}.examples", f"is {examples}, but the shards before end at {start}"
        )
    if not _natural(shard.get("bytes")):
        _malformed(folder, f"{field}.bytes", f"must be a size, not {shard.get('bytes')!r:.80}")
    for key in ("sha256", "data_sha256"):
        value = shard.get(key)
        if (key == "sha256" or value is not None) and not _is_hex(value, 64):
            _malformed(folder, f"{field}.{key}", f"must be 64 hex digits, not {value!r:.80}")
    if not _natural(shard.get("index_offset", 0)):
        _malformed(folder, f"{field}.index_offset", "must be a non-negative integer")
    return examples[1]


def _is_hex(value: Any, length: int) -> bool:
    return (
        isinstance(value, str)
        and len(value) == length
        and all(c in "0123456789abcdef" for c in value)
    )


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _chan_merge(
    old_n: torch.Tensor,
    old_mean: torch.Tensor,
    old_m2: torch.Tensor,
    n: torch.Tensor,
    mean: torch.Tensor,
    m2: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chan et al.'s parallel update: two summaries (counts [..., P], means and M2 [..., P, d])
    of disjoint sets of examples -> the summary of both (leading dimensions broadcast)."""
    a, b = old_n.unsqueeze(-1), n.unsqueeze(-1)
    total = a + b
    delta = mean - old_mean
    new_mean = old_mean + delta * b / total.clamp(min=1)
    new_m2 = old_m2 + m2 + delta**2 * a * b / total.clamp(min=1)
    return total.squeeze(-1), new_mean, new_m2


def slot_count_error(first: int, then: int, where: str, state: str = "") -> StoreError:
    """The error for batches of different position slot counts (``"all"`` over prompts of
    varied lengths): a store keeps one slot count ``P`` for every shard (its statistics, its
    readers and its export are ``[examples, P, ...]``). ``where`` names the batches, ``state``
    says what the folder holds now."""
    return StoreError(
        f"a store needs the same number of position slots in every batch, but {where} got "
        f"{first} then {then}: positions whose slot count follows the prompt (e.g. 'all', text "
        "anchors) cannot be streamed to a store; use fixed positions (e.g. 'last', 0, -1), "
        "average them (extract_avg=True), or hold the result in memory (no output_dir)."
        + (f" {state}" if state else "")
    )


class RunningStats:
    """Count, mean and M2 per point and position slot, merged batch by batch (Chan et al.)."""

    def __init__(self) -> None:
        self.count: dict[str, torch.Tensor] = {}
        self.mean: dict[str, torch.Tensor] = {}
        self.m2: dict[str, torch.Tensor] = {}

    def update(self, cache: ActivationCache) -> None:
        """Add one batch: every ``[batch, P, d]`` activation, over its real slots. (One point at
        a time: small operations stay on the writer thread, off the forward's threads.)"""
        weight = cache["position_mask"].to(torch.float64).cpu().unsqueeze(-1)  # [batch, P, 1]
        n = weight.sum(0)  # [P, 1]
        for key, value in cache.tensors().items():
            if key in _NOT_STATS or key.startswith("batch_saver") or value.dim() != 3:
                continue
            x = value.detach().to(torch.float64).cpu()
            mean = (x * weight).sum(0) / n.clamp(min=1)
            self._combine(key, n.squeeze(-1), mean, (((x - mean) ** 2) * weight).sum(0))

    def merge(self, other: RunningStats) -> None:
        """Add the examples summarised by ``other`` (e.g. another worker's part)."""
        for key in other.count:
            self._combine(key, other.count[key], other.mean[key], other.m2[key])

    def _combine(self, key: str, n: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor) -> None:
        """Chan et al.'s parallel update of (count [P], mean [P, d], M2 [P, d])."""
        if key not in self.count:
            self.count[key], self.mean[key], self.m2[key] = n, mean, m2
            return
        if self.count[key].shape != n.shape:
            raise slot_count_error(
                len(self.count[key]), len(n), f"the running statistics of {key!r}"
            )
        self.count[key], self.mean[key], self.m2[key] = _chan_merge(
            self.count[key], self.mean[key], self.m2[key], n, mean, m2
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for key in self.count:
            out[f"{key}/count"], out[f"{key}/mean"], out[f"{key}/m2"] = (
                self.count[key],
                self.mean[key],
                self.m2[key],
            )
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> RunningStats:
        stats = cls()
        for name, value in tensors.items():
            key, part = name.rsplit("/", 1)
            {"count": stats.count, "mean": stats.mean, "m2": stats.m2}[part][key] = value
        return stats

    def summary(self, key: str) -> dict[str, torch.Tensor]:
        if key not in self.count:
            raise StoreError(f"no statistics for {key!r}; kept for: {sorted(self.count)}.")
        count = self.count[key]
        return {
            "count": count,
            "mean": self.mean[key].float(),
            "var": (self.m2[key] / count.clamp(min=1).unsqueeze(-1)).float(),
        }


# -- what the store holds: data fingerprints ---------------------------------------------------
def fingerprint_examples(
    input_ids: Any, attention_mask: Any = None, extras: list[str] | None = None
) -> list[str]:
    """One fingerprint per example: the sha256 (16 hex digits) of its real token ids.

    Args:
        input_ids: ``[batch, seq]`` (or ``[seq]``) token ids.
        attention_mask: ``[batch, seq]``; only positions where it is 1 count, so the padding
            side and length do not change a fingerprint. None: every position is real.
        extras: per example, text that also identifies it (a record's other fields).
    """
    ids = torch.as_tensor(input_ids)
    ids = ids.unsqueeze(0) if ids.dim() == 1 else ids
    mask = (
        torch.ones_like(ids, dtype=torch.bool)
        if attention_mask is None
        else torch.as_tensor(attention_mask).reshape(ids.shape).bool()
    )
    out = []
    for row in range(ids.shape[0]):
        real = ids[row][mask[row].to(ids.device)].to(device="cpu", dtype=torch.int64)
        digest = hashlib.sha256(real.numpy().astype("<i8").tobytes())
        if extras is not None:
            digest.update(b"\0" + extras[row].encode())
        out.append(digest.hexdigest()[:16])
    return out


def batch_fingerprints(batch: Any, tokenizer: Any = None, records: list | None = None) -> list[str]:
    """Fingerprints of one ``extract_cache`` batch: a mapping with ``input_ids`` (and
    ``attention_mask``), an id tensor, or text (tokenised with ``tokenizer`` as ``forward`` does).
    ``records``: the batch's ``{"text": ..., ...}`` records; their other fields count too.
    A batch's images are not part of its fingerprint (see the store module's docstring)."""
    from .inputs import tokenize

    if isinstance(batch, str) or (isinstance(batch, list) and batch and isinstance(batch[0], str)):
        batch = tokenize(tokenizer, batch)
    if isinstance(batch, torch.Tensor):
        batch = {"input_ids": batch}
    if not isinstance(batch, Mapping) or batch.get("input_ids") is None:
        raise StoreError(
            f"cannot fingerprint a batch of type {type(batch).__name__} for the store: give "
            "batches with input_ids (a tokenizer's output), strings or id tensors."
        )
    extras = None
    if records is not None:
        extras = [
            json.dumps({k: v for k, v in r.items() if k != "text"}, sort_keys=True, default=str)
            for r in records
        ]
    return fingerprint_examples(batch["input_ids"], batch.get("attention_mask"), extras)


def _digest(fingerprints: list[str]) -> str:
    return hashlib.sha256("\n".join(fingerprints).encode()).hexdigest()


def _description_differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """``"field: stored X, asked Y"`` for each leaf where two descriptions differ. A field one
    side lacks (a store written by another hookscope version) matches False / None / "none" on
    the other: a flag added later, left at its default, asks for nothing."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            missing = "(absent)"
            if (key in old) != (key in new):
                value = old[key] if key in old else new[key]
                if value is False or value is None or value == "none":
                    continue
            out += _description_differences(
                old.get(key, missing), new.get(key, missing), f"{prefix}{key}."
            )
        return out
    if old == new:
        return []
    return [f"{prefix.rstrip('.')}: stored {old!r}, asked {new!r}"]


# -- one writer at a time ----------------------------------------------------------------------
LOCK = ".hookscope-writer.lock"
_HELD: dict[str, _FolderLock] = {}  # folders this process writes, by resolved path


class _FolderLock:
    """An exclusive ``flock`` on ``folder/.hookscope-writer.lock``, which holds the writer's pid.

    The kernel drops the lock when its process dies, so the lock of a killed writer is stale
    and simply taken over. Within one process, a writer abandoned by an exception (a Ctrl-C in
    a notebook) is taken over by the next writer of the same thread; a live writer in another
    thread or process is refused with a :class:`StoreError` naming its pid."""

    def __init__(self, folder: Path):
        self.path, self.key = folder / LOCK, str(folder.resolve())
        self.thread = threading.get_ident()
        self.before_release: Callable[[], Any] | None = None  # the owner's writer thread stops
        held = _HELD.get(self.key)
        if held is not None:
            if held.thread != self.thread and held.thread in _live_threads():
                raise StoreError(
                    f"{folder} is being written by another thread of this process "
                    f"(pid {os.getpid()}); wait for it to finish."
                )
            held.release()
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if fcntl is not None:  # (Windows: no lock between processes)
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(os.read(self.fd, 256))
            os.close(self.fd)
            raise StoreError(
                f"{folder} is being written by another process ({holder}, lock {self.path}); "
                "wait for it to finish, or stop it: a dead writer's lock is taken over."
            ) from None
        stale = os.read(self.fd, 256)
        if stale.strip():  # a writer that died without releasing: the kernel dropped its flock
            warnings.warn(
                f"{folder}: taking over the stale writer lock of {_holder(stale)}, which is no "
                "longer running (killed or crashed); its uncommitted batch is discarded.",
                stacklevel=4,
            )
        os.ftruncate(self.fd, 0)
        os.lseek(self.fd, 0, os.SEEK_SET)
        os.write(self.fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        _HELD[self.key] = self

    def release(self) -> None:
        """Drop the lock (the file stays: unlinking a flock file races with the next writer),
        once the owner's queued batches are committed."""
        if self.fd is None:
            return
        try:
            if self.before_release is not None:  # a weak reference: the lock keeps no writer alive
                stop, self.before_release = self.before_release(), None
                if stop is not None:
                    stop()
        finally:  # dropped even when a Ctrl-C interrupts the wait for the writer thread
            self._drop()

    def _drop(self) -> None:
        if self.fd is None:
            return
        if _HELD.get(self.key) is self:
            del _HELD[self.key]
        os.ftruncate(self.fd, 0)
        if fcntl is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None


def _holder(content: bytes) -> str:
    """``"pid 123 on host h"`` from a lock file's content (``"123 h"``; older: ``"123"``)."""
    fields = content.decode(errors="replace").split()
    if not fields:
        return "pid unknown"
    return f"pid {fields[0]}" + (f" on host {fields[1]}" if len(fields) > 1 else "")


def release_writer(folder: str | os.PathLike) -> None:
    """Release ``folder`` if a writer of this process still holds it after an error (a failed
    ``extract_cache`` keeps its lock until the writer is garbage-collected or the same thread
    writes the folder again; a process that lives on, a Ray worker, calls this)."""
    held = _HELD.get(str(Path(folder).resolve()))
    if held is not None:
        held.release()


def _live_threads() -> set[int]:
    return {thread.ident for thread in threading.enumerate()}


def _releases_on_error(method: Callable) -> Callable:
    """Release the writer's folder lock when ``method`` raises (the folder is left at its last
    commit; batches queued before the error are committed first)."""

    @functools.wraps(method)
    def wrapper(self: StoreWriter, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except BaseException as error:
            self.abort(error)
            raise

    return wrapper


class StoreWriter:
    """Writes one shard per batch and commits it in the manifest (see the module docstring).

    Use: ``check_batch(i, batch)`` for every batch ``i`` in order (True: already committed, skip
    it), ``write(cache)`` for each batch it did not skip, then ``finish()``.

    Args:
        folder: the output folder (created). An existing store of the same extraction resumes
            when its committed examples are the first examples asked (checked batch by batch).
        description: what is extracted (model, config, positions, ...): it must match on resume.
        overwrite: replace an existing store in ``folder`` (whatever it holds) by this one.

    Raises:
        StoreError: another live writer holds the folder; the folder holds another extraction
            (the message names each differing field) or a file that is not a hookscope manifest.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        description: dict[str, Any],
        overwrite: bool = False,
        background: bool = False,
    ):
        self.folder = Path(folder)
        self._background: BackgroundWriter | None = None
        self._in_background = background
        if self.folder.exists() and not self.folder.is_dir():
            raise StoreError(
                f"output_dir {str(self.folder)!r} is a file, not a folder; hookscope will not "
                "replace it: pass a folder path."
            )
        self.folder.mkdir(parents=True, exist_ok=True)
        self._created = False  # True once _open makes a new store (none before, or overwrite)
        self._replaced = False  # True once overwrite=True replaced an older store
        self._opened_complete: tuple[int, bool] | None = (
            None  # a resumed store's (shards, complete)
        )
        self._slots: int | None = None  # the store's position slot count, once known
        # the manifest before _rewind_last uncommitted the last shard (its files are kept until
        # that batch commits again), restored if that batch is refused (_check_slot_count)
        self._before_rewind: dict | None = None
        self._lock = _FolderLock(self.folder)
        try:
            self._open(json.loads(json.dumps(description)), overwrite)
        except BaseException:
            self.close()
            raise
        self._pending: tuple[int, list[str]] | None = None
        self._asked_batches = self._asked_examples = 0
        self._lock.before_release = weakref.WeakMethod(self._stop_background)
        self._next_batch, self._next_example = self.completed_batches, self.examples

    def _open(self, description: dict[str, Any], overwrite: bool) -> None:
        for stray in self.folder.glob(".*.tmp"):
            stray.unlink()  # half-written files of a killed run
        path = self.folder / MANIFEST
        old = None
        if path.exists():
            old = self._old_manifest(path, overwrite)
        if old is not None and not overwrite:
            self._resume(old, description)
            return
        self.manifest = {
            "format": _FORMAT,
            "description": description,
            "shards": [],
            "stats": None,
            "previous_stats": None,
            "examples": 0,
            "complete": False,
            "batch_saver": None,
        }
        self.stats = RunningStats()
        _write_json(path, self.manifest)  # the commit point: from here the folder is the new store
        self._created = True
        self._replaced = old is not None  # overwrite=True removed an older store
        if old is not None:
            _remove_store_files(self.folder, self.manifest, replaced=old)

    def _old_manifest(self, path: Path, overwrite: bool) -> dict:
        """The folder's manifest, checked (:func:`check_manifest`). With ``overwrite``, a damaged
        or malformed one counts as an empty store (its files are swept by pattern only: a name
        from a manifest that failed the check is never deleted); a foreign one is refused."""
        try:
            old = _read_manifest(path)
        except StoreError:
            if not overwrite:
                raise
            return {"format": _FORMAT, "shards": []}
        if not isinstance(old, dict) or old.get("format") != _FORMAT:
            raise StoreError(
                f"{path} is not a hookscope activation-store manifest (format "
                f"{old.get('format') if isinstance(old, dict) else None!r:.80}; this hookscope "
                f"writes {_FORMAT!r}); hookscope will not replace it: use another output_dir."
            )
        try:
            return check_manifest(old, self.folder)
        except StoreError:
            if not overwrite:
                raise
            return {"format": _FORMAT, "shards": []}

    def _resume(self, manifest: dict[str, Any], description: dict[str, Any]) -> None:
        differences = _description_differences(manifest.get("description"), description)
        if differences:
            raise StoreError(
                f"{self.folder} holds a different extraction ({'; '.join(differences)}); use "
                "another output_dir, or overwrite=True to replace it."
            )
        if any("data_sha256" not in shard for shard in manifest["shards"]):
            raise StoreError(
                f"{self.folder} was written by a hookscope that did not fingerprint the data, so "
                "resuming it cannot be checked; use overwrite=True to write it again."
            )
        self.manifest = manifest
        self._opened_complete = (len(manifest["shards"]), bool(manifest.get("complete")))
        self.stats = _read_stats(self.folder, manifest, "stats")
        _remove_store_files(self.folder, manifest)  # files of a batch killed before its commit

    @property
    def completed_batches(self) -> int:
        return len(self.manifest["shards"])

    @property
    def examples(self) -> int:
        return self.manifest["examples"]

    @property
    def next_example(self) -> int:
        """The index of the next example :meth:`write` takes: the committed examples plus those
        queued on the writer thread."""
        return self._next_example

    def close(self) -> None:
        """Wait for the queued batches to be committed, then release the folder (done by
        :meth:`finish` and by every error the writer raises).

        Raises:
            StoreError: a queued batch failed to commit and was not reported yet.
        """
        try:
            failure = self._stop_background()
        finally:  # also on a KeyboardInterrupt while the writer thread is joined
            self._lock.release()
        if failure is not None:
            raise failure

    def abort(self, error: BaseException) -> None:
        """Like :meth:`close`, while ``error`` is being raised: a failure of the writer thread
        not reported yet is attached to ``error`` as a note (and chained), never dropped."""
        try:
            failure = self._stop_background()
        finally:  # also on a second Ctrl-C while the writer thread is joined
            self._lock.release()
        if failure is not None and failure is not error:
            error.add_note(f"The store's writer thread had failed too: {failure}")
            if error.__context__ is None:
                error.__context__ = failure

    def _stop_background(self) -> BaseException | None:
        """Drain and stop the writer thread; its failure not raised yet, if any."""
        background, self._background = self._background, None
        return background.close() if background is not None else None

    def flush(self) -> None:
        """Wait until every batch given to :meth:`write` is committed.

        Raises:
            StoreError: (the folder released) a batch failed to commit; the store is at its
                last commit and the same run resumes from there.
        """
        if self._background is not None:
            try:
                self._background.drain()
            except BaseException as error:
                self.abort(error)
                raise

    def __del__(self) -> None:
        lock = getattr(self, "_lock", None)
        if lock is not None:
            lock.release()

    # -- resume: the asked data must extend the committed data ---------------------------------
    @_releases_on_error
    def check_batch(
        self, index: int, batch: Any, tokenizer: Any = None, records: list | None = None
    ) -> bool:
        """Check batch ``index`` (batches in order) against the store before running it.

        Returns True when the batch is committed already, with the same examples (skip it).
        The last committed batch may hold a prefix of the batch asked (a finished run on fewer
        examples): it is then uncommitted and returns False, so it runs again whole and the
        store equals a clean run on the examples asked.

        Args:
            batch: the batch as ``forward`` gets it (see :func:`batch_fingerprints`).
            tokenizer: tokenises a batch of text; records: the batch's records, if any.

        Raises:
            StoreError: (the folder released, nothing changed in it) naming the folder and the
                first example that differs, or saying the store holds more examples than asked.
        """
        if index != self._asked_batches:
            raise StoreError(f"check_batch got batch {index}; batch {self._asked_batches} is next.")
        asked = batch_fingerprints(batch, tokenizer, records)
        self._asked_batches += 1
        self._asked_examples += len(asked)
        if index < self.completed_batches and not self._committed_prefix(index, asked):
            return True
        if index < self.completed_batches:
            self._rewind_last()
        elif self.manifest["complete"]:  # appending: the store is not complete until finish()
            self.manifest["complete"] = False
            _write_json(self.folder / MANIFEST, self.manifest)
        self._pending = (index, asked)
        return False

    def _committed_prefix(self, index: int, asked: list[str]) -> bool:
        """False when batch ``index`` holds exactly ``asked``; True when it holds a strict prefix
        of it and is the last committed batch; else raise naming the first difference."""
        shard = self.manifest["shards"][index]
        self._check_shard_file(shard)
        low, high = shard["examples"]
        if len(asked) == high - low and _digest(asked) == shard["data_sha256"]:
            return False
        committed = self._committed_fingerprints(shard)
        for row, (was, now) in enumerate(zip(committed, asked, strict=False)):
            if was != now:
                raise StoreError(
                    f"{self.folder} holds other data: example {low + row} (batch {index}, row "
                    f"{row}) is not the one committed there (tokens fingerprint {was}, asked "
                    f"{now}); use another output_dir, or overwrite=True to replace the store."
                )
        if len(asked) < len(committed):
            self._refuse_more_than_asked(low + len(asked))
        if index != self.completed_batches - 1:
            raise StoreError(
                f"{self.folder} holds other data: example {high} is committed in batch {index + 1} "
                f"but asked in batch {index} (the batches differ); use the same batch size and "
                "batches, or overwrite=True to replace the store."
            )
        return True

    def _check_shard_file(self, shard: dict) -> None:
        """A committed shard that a resume keeps is there, at its committed size (a cheap check:
        its sha256 is checked when it is read)."""
        path = confined(self.folder, shard["file"], "a shard's file")
        size = path.stat().st_size if path.is_file() else None
        if size != shard.get("bytes", size):
            found = "missing" if size is None else f"{size} bytes, committed {shard['bytes']}"
            raise StoreError(
                f"shard {shard['file']} of {self.folder} is damaged ({found}), so the store "
                "cannot be resumed; use overwrite=True to write it again."
            )

    def _refuse_more_than_asked(self, asked: int) -> None:
        raise StoreError(
            f"{self.folder} holds {self.examples} examples, more than the {asked} asked (which "
            f"are its first {asked}). A store holds exactly the examples asked: read the first "
            f"{asked} with ActivationStore.open({str(self.folder)!r})[key][:{asked}], or pass "
            "overwrite=True to replace it with these."
        )

    def _committed_fingerprints(self, shard: dict) -> list[str]:
        path = confined(self.folder, shard["file"], "a shard's file")
        if not path.exists() or _sha256(path) != shard["sha256"]:
            raise StoreError(f"shard {shard['file']} is missing or corrupted in {self.folder}.")
        metadata = _read_header(path)[1]
        fingerprints = _metadata_json(metadata, "example_fingerprints", [], path, list)
        if not all(isinstance(f, str) for f in fingerprints):
            raise StoreError(f"{path}: example_fingerprints must be a list of strings.")
        return fingerprints

    def _rewind_last(self) -> None:
        """Uncommit the last shard (its statistics go back to the shard before). Its files
        stay until its batch is committed again (written in place then: no manifest names
        them), so a refused batch can restore the store as it was."""
        self._before_rewind = json.loads(json.dumps(self.manifest))
        shard = self.manifest["shards"].pop()
        self.manifest["examples"] = shard["examples"][0]
        self.manifest["complete"] = False
        previous = self.manifest.get("previous_stats")
        if previous is None and self.completed_batches:  # recount from the shards
            self.stats = RunningStats()
            for kept in self.manifest["shards"]:
                self.stats.update(ActivationCache.load(self.folder / kept["file"]))
            previous, checksum = self._save_stats(self.completed_batches - 1)
        else:
            self.stats = _read_stats(self.folder, self.manifest, "previous_stats")
            checksum = self.manifest.get("previous_stats_sha256")
        self.manifest["stats"], self.manifest["previous_stats"] = previous, None
        self.manifest["stats_sha256"], self.manifest["previous_stats_sha256"] = checksum, None
        _write_json(self.folder / MANIFEST, self.manifest)
        self._next_batch, self._next_example = self.completed_batches, self.examples

    # -- write ---------------------------------------------------------------------------------
    @_releases_on_error
    def write(self, cache: ActivationCache | StagedBatch) -> None:
        """Write ``cache`` (the batch last passed to :meth:`check_batch`) as the next shard and
        commit it: at once, or with ``background=True`` on the writer thread while the caller
        goes on (:meth:`flush` / :meth:`finish` wait for it). A :class:`StagedBatch` (a copy
        from an accelerator under way) is synchronised before it is written.

        Raises:
            StoreError: the batch does not match the one checked; or (background) an earlier
                batch failed to commit.
        """
        index = self._next_batch
        if self._pending is None or self._pending[0] != index:
            raise StoreError(f"write() needs check_batch({index}, batch) first.")
        fingerprints = self._pending[1]
        staged = cache if isinstance(cache, StagedBatch) else StagedBatch(cache, None, [], None)
        rows, slots = staged.cache["position_mask"].shape[:2]
        if rows != len(fingerprints):
            raise StoreError(f"batch {index} has {rows} rows but {len(fingerprints)} were checked.")
        self._check_slot_count(index, slots)
        job = (index, staged, fingerprints)
        if self._in_background:
            if self._background is None:
                self._background = BackgroundWriter(self._commit_job, name="store-writer")
            self._background.put(job)
        else:
            self._commit_job(job)
        self._next_batch, self._next_example = index + 1, self._next_example + rows
        self._pending = None

    def _check_slot_count(self, index: int, slots: int) -> None:
        """Refuse batch ``index`` before it is queued when its position slot count is not the
        store's (a store keeps one: see :func:`slot_count_error`). The batches queued before
        it are committed first; then a store this writer created is removed (the folder is as
        before the call, so the same call with valid arguments works there), an older one is
        left at its last commit.

        Raises:
            StoreError: naming both slot counts, the ways out and what the folder holds.
        """
        if self._slots is None:
            self._slots = self._committed_slots() or slots
        if slots == self._slots:
            return
        failure = self._stop_background()
        if self._created:
            self._remove_new_store()
            before = (
                "the store that overwrite=True replaced was removed when the run began"
                if self._replaced
                else "as before the run"
            )
            state = (
                f"Nothing was kept: the store this run began in {self.folder} was removed (the "
                f"folder holds no store, {before})."
            )
        else:
            rewound = (
                None if self._before_rewind is None else len(self._before_rewind["shards"]) - 1
            )
            if index == rewound:
                # the refused batch is the one rewound: its shard back, the store as opened
                self.manifest = self._before_rewind
                _write_json(self.folder / MANIFEST, self.manifest)
            elif self._before_rewind is None and self._opened_complete == (
                self.completed_batches,
                True,
            ):
                self.manifest["complete"] = True  # nothing appended: complete, as it was
                _write_json(self.folder / MANIFEST, self.manifest)
            state = (
                f"The store in {self.folder} is left at its last commit ({self.examples} "
                "examples); overwrite=True replaces it."
            )
        where = f"the batches for {self.folder} (batch {index})"
        error = slot_count_error(self._slots, slots, where, state)
        if failure is not None:
            error.add_note(f"The store's writer thread had failed too: {failure}")
        raise error

    def _committed_slots(self) -> int | None:
        """The position slot count of the store's first committed shard (None: no shard)."""
        if not self.manifest["shards"]:
            return None
        path = confined(self.folder, self.manifest["shards"][0]["file"], "a shard's file")
        shape = _read_header(path)[0].get("position_mask", {}).get("shape") or []
        return shape[1] if len(shape) == 2 else None

    def _remove_new_store(self) -> None:
        """Delete the store this writer created: its manifest first (from then the folder
        holds no store), then hookscope's own shard and statistics files."""
        (self.folder / MANIFEST).unlink(missing_ok=True)
        for pattern in _OWN_FILES:
            for path in self.folder.glob(pattern):
                path.unlink(missing_ok=True)

    def _commit_job(self, job: tuple[int, StagedBatch, list[str]]) -> None:
        """Commit one batch (on the writer thread with ``background=True``)."""
        index, staged, fingerprints = job
        try:
            cache = staged.wait()  # already in the store's dtype (DatasetRun converts it)
            stale = self._commit(index, cache, fingerprints)
        except OSError as error:
            raise StoreError(
                f"writing batch {index} to {self.folder} failed ({error}); the store is left at "
                f"its last commit: its {self.examples} committed examples are intact and the "
                "batch was not committed. Free space / fix the permissions and run the same "
                "extraction again: it resumes from there."
            ) from error
        finally:
            staged.release()
        if stale:
            with contextlib.suppress(OSError):  # left behind: swept by the next writer
                (self.folder / stale).unlink(missing_ok=True)

    def _commit(self, index: int, cache: ActivationCache, fingerprints: list[str]) -> str | None:
        """Write batch ``index``'s shard and statistics, then the manifest naming them (the
        commit point); returns the statistics file the commit made stale. Every step writes a
        temporary file and renames it, so a failure or a kill at any step leaves the last
        commit as it was. The in-memory manifest changes only once the files are written."""
        name = f"shard-{index:05d}.safetensors"
        path = self.folder / name
        shard_sha256 = cache.save_sha256(  # in place: the manifest names it only once written
            path, metadata={"example_fingerprints": json.dumps(fingerprints)}, atomic=False
        )
        stats = RunningStats()
        stats.merge(self.stats)
        stats.update(cache)
        stats_name, stats_sha256 = self._save_stats(index, stats)
        manifest = json.loads(json.dumps(self.manifest))
        stale = manifest.get("previous_stats")
        manifest["previous_stats"] = manifest["stats"]
        manifest["stats"] = stats_name
        manifest["previous_stats_sha256"] = manifest.get("stats_sha256")
        manifest["stats_sha256"] = stats_sha256
        start = self.examples
        manifest["shards"].append(
            {
                "file": name,
                "examples": [start, start + len(fingerprints)],
                "bytes": path.stat().st_size,
                "sha256": shard_sha256,
                "data_sha256": _digest(fingerprints),
            }
        )
        manifest["examples"] = start + len(fingerprints)
        manifest["complete"] = False
        if "batch_saver" in cache and manifest["batch_saver"] is None:
            manifest["batch_saver"] = sorted(cache["batch_saver"])
        _write_json(self.folder / MANIFEST, manifest)  # the commit point
        self.manifest, self.stats = manifest, stats
        return stale

    def _save_stats(self, index: int, stats: RunningStats | None = None) -> tuple[str, str]:
        """Write the running statistics (``stats``, default the writer's) as of shard
        ``index``; returns the file name and its sha256."""
        name = f"stats-{index:05d}.safetensors"
        tensors = (stats or self.stats).tensors()
        return name, write_safetensors(self.folder / name, tensors, atomic=False)

    @_releases_on_error
    def finish(self) -> ActivationStore:
        """Mark the store complete and release the folder.

        Raises:
            StoreError: the store holds more examples than were asked (see :meth:`check_batch`).
        """
        self.flush()
        if self._asked_batches < self.completed_batches:
            self._refuse_more_than_asked(self._asked_examples)
        self.manifest["complete"] = True
        _write_json(self.folder / MANIFEST, self.manifest)
        self.close()
        return ActivationStore.open(self.folder)


def _remove_store_files(folder: Path, manifest: dict, replaced: dict | None = None) -> None:
    """Delete hookscope's own files in ``folder`` that ``manifest`` does not name: shards and
    statistics of uncommitted batches, and those of the ``replaced`` store (part folders of a
    distributed store included). Other files are never touched."""
    keep = {shard["file"] for shard in manifest["shards"]}
    keep |= {manifest.get("stats"), manifest.get("previous_stats")}
    doomed = {p.name for pattern in _OWN_FILES for p in folder.glob(pattern)}
    if replaced is not None:
        doomed |= {shard["file"] for shard in replaced["shards"]}
        doomed |= {replaced.get("stats"), replaced.get("previous_stats")}
    parts = set()
    for name in doomed - keep - {None}:
        (folder / name).unlink(missing_ok=True)
        if "/" in name:
            parts.add(folder / name.split("/")[0])
    for part in parts:
        manifest_path = part / MANIFEST
        if manifest_path.exists() and _is_store_manifest(manifest_path):
            shutil.rmtree(part)


def _is_store_manifest(path: Path) -> bool:
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == _FORMAT


def _read_header(path: Path) -> tuple[dict, dict[str, str]]:
    """(tensor entries, ``__metadata__``) of the store file at ``path``, its header checked
    against the file before anything is read (:func:`~hookscope.cache.read_safetensors_header`)."""
    try:
        return read_safetensors_header(path)
    except StoreError:
        raise
    except HookscopeError as error:
        raise StoreError(f"a file of the store is damaged or crafted: {error}") from None


def _check_rows(path: Path, shard: dict, folder: Path) -> None:
    """The shard at ``path`` holds as many examples (``position_mask`` rows, read from its
    checked header) as its manifest entry's example range says."""
    header = _read_header(path)[0]
    low, high = shard["examples"]
    shape = header.get("position_mask", {}).get("shape")
    if not shape or shape[0] != high - low:
        raise StoreError(
            f"shard {shard['file']} of {folder} holds {shape[0] if shape else 'no'} examples "
            f"(position_mask {shape}), but the manifest's examples {shard['examples']} say "
            f"{high - low}."
        )


def _read_stats(folder: Path, manifest: dict, field: str) -> RunningStats:
    """The running statistics in the file ``manifest[field]`` names (none: empty), checked
    against the manifest's ``{field}_sha256`` (stores written before it existed have none)."""
    name = manifest.get(field)
    if not name:
        return RunningStats()
    path = confined(folder, name, f"{field!r}")
    checksum = manifest.get(f"{field}_sha256")
    if checksum is not None and (not path.is_file() or _sha256(path) != checksum):
        raise StoreError(
            f"the statistics file {name} of {folder} is missing or corrupted: its sha256 does "
            f"not match the manifest's {field}_sha256."
        )
    with _untrusted(path):
        return RunningStats.from_tensors(_load_all(path))


def _load_all(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors file at ``path``, its header checked first."""
    _read_header(path)
    with _untrusted(path), safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


@contextlib.contextmanager
def _untrusted(path: Path) -> Iterator[None]:
    """Errors of reading a store file (the safetensors reader's, a malformed header field) as a
    :class:`StoreError` naming the file; hookscope's own errors pass as they are."""
    try:
        yield
    except HookscopeError:
        raise
    except (KeyError, ValueError, TypeError, AttributeError, IndexError) as error:
        raise StoreError(
            f"{path} is damaged or not a shard hookscope wrote ({type(error).__name__}: "
            f"{error}); restore it, or use overwrite=True / another output_dir."
        ) from None
    except Exception as error:
        if type(error).__name__ != "SafetensorError":
            raise
        raise StoreError(f"{path} is not a valid safetensors file ({error}).") from None


class ActivationStore:
    """Read an output folder written by ``extract_cache(..., output_dir=...)``.

    ``store["resid_out_3"]`` is one point across all examples ``[examples, P, d]`` (only that key
    is read from each shard), in the original example order; ``store.manifest`` the manifest;
    ``store.stats(key)`` the running count / mean / variance per position slot;
    iteration yields one :class:`ActivationCache` per shard.
    """

    def __init__(self, folder: Path, manifest: dict):
        self.folder, self.manifest = folder, manifest
        self._verified: set[str] = set()

    @classmethod
    def open(cls, folder: str | os.PathLike) -> ActivationStore:
        folder = Path(folder)
        path = folder / MANIFEST
        if not path.exists():
            raise StoreError(f"{folder} is not an activation store (no {MANIFEST}).")
        manifest = check_manifest(_read_manifest(path), folder)
        for shard in manifest["shards"]:
            file = confined(folder, shard["file"], "a shard's file")
            if not file.exists() or file.stat().st_size != shard["bytes"]:
                size = file.stat().st_size if file.exists() else "missing"
                raise StoreError(
                    f"shard {shard['file']} is truncated or missing in {folder} ({size} bytes, the "
                    f"manifest says {shard['bytes']})."
                )
        if not manifest.get("complete"):
            warnings.warn(
                f"{folder} is an incomplete store (its run stopped or is still running): it holds "
                f"the first {manifest.get('examples', 0)} examples only; run the same extraction "
                "again to finish it.",
                stacklevel=2,
            )
        return cls(folder, manifest)

    def __len__(self) -> int:
        return self.manifest["examples"]

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    def _shard_path(self, shard: dict) -> Path:
        path = confined(self.folder, shard["file"], "a shard's file")
        if shard["file"] not in self._verified:
            if not path.is_file() or _sha256(path) != shard["sha256"]:
                raise StoreError(
                    f"shard {shard['file']} is corrupted: its sha256 does not match the manifest "
                    f"of {self.folder}."
                )
            _check_rows(path, shard, self.folder)
            self._verified.add(shard["file"])
        return path

    def verify(self) -> None:
        """Check every shard's checksum (raises :class:`StoreError` on the first mismatch)."""
        for shard in self.manifest["shards"]:
            self._shard_path(shard)

    def keys(self) -> list[str]:
        if not self.manifest["shards"]:
            return []
        path = self._shard_path(self.manifest["shards"][0])
        with _untrusted(path), safe_open(str(path), framework="pt") as handle:
            return [k for k in handle.keys() if not k.startswith("running_count/")]

    def _read(self, keys: list[str]) -> ActivationCache:
        merged = ActivationCache()
        for shard in self.manifest["shards"]:
            path = self._shard_path(shard)
            with _untrusted(path), safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                part: dict[str, Any] = {k: handle.get_tensor(k) for k in keys if k in handle.keys()}
                part["position_mask"] = handle.get_tensor("position_mask")
                if "batch_saver/example_index" in part:
                    part["batch_saver/example_index"] = shard_example_index(
                        shard, part["batch_saver/example_index"], len(part["position_mask"])
                    )
                for key, value in part.items():
                    if value.dim() == 0 or len(value) != len(part["position_mask"]):
                        raise StoreError(
                            f"shard {shard['file']} of {self.folder}: {key!r} has shape "
                            f"{list(value.shape)}, not one row per example of the shard "
                            f"({len(part['position_mask'])})."
                        )
                part["mapping_index"] = _decode_mapping(json.loads(metadata["mapping_index"]))
            merged.cat(part)
        return merged

    @property
    def store_dtype(self) -> str | None:
        """The dtype the activations were stored in (``store_dtype``; None: as computed)."""
        return (self.manifest.get("description") or {}).get("store_dtype")

    def __getitem__(self, key: str) -> torch.Tensor:
        """One point over every example, ``[examples, P, ...]``, in the original order, in the
        dtype it was stored in."""
        return self.read(key)

    def read(self, key: str, dtype: Any = None) -> torch.Tensor:
        """``store[key]`` (``[examples, P, ...]``, original order), converted to ``dtype``
        (``"float32"``, ``torch.float32``, ...) when given: a float16 / bfloat16 store read
        back as float32 for training, say.

        Raises:
            StoreError: ``key`` is not in the store. InputError: an unknown ``dtype``.
        """
        target = store_dtype_of(dtype)
        value = self._read_point(key)
        return value if target is None or value.dtype == target else value.to(target)

    def _read_point(self, key: str) -> torch.Tensor:
        keys = self.keys()
        if key not in keys:
            raise StoreError(f"{key!r} is not in this store; keys: {keys[:12]}.")
        wanted = [key] + (
            ["batch_saver/example_index"] if "batch_saver/example_index" in keys else []
        )
        merged = self._read(wanted)
        value = merged[key]
        if "batch_saver/example_index" in merged:
            value = value[torch.argsort(merged["batch_saver/example_index"])]
        return value

    @property
    def mapping_index(self) -> dict:
        return self._read([])["mapping_index"]

    def stats(self, key: str) -> dict[str, torch.Tensor]:
        """``{"count": [P], "mean": [P, d], "var": [P, d]}`` over every example (real slots)."""
        if not self.manifest["stats"]:
            raise StoreError("this store has no statistics yet (no shard committed).")
        return _read_stats(self.folder, self.manifest, "stats").summary(key)

    @property
    def num_shards(self) -> int:
        return len(self.manifest["shards"])

    def shard(self, index: int, keys: list[str]) -> dict[str, torch.Tensor]:
        """The tensors ``keys`` plus ``position_mask`` of shard ``index`` (its rows in the
        shard's order), reading nothing else; checksum checked on first use."""
        if not 0 <= index < self.num_shards:
            raise StoreError(
                f"shard index {index} is out of range: {self.folder} has {self.num_shards} shards."
            )
        path = self._shard_path(self.manifest["shards"][index])
        with _untrusted(path), safe_open(str(path), framework="pt") as handle:
            missing = [key for key in keys if key not in handle.keys()]
            if missing:
                raise StoreError(f"{missing} not in {self.folder}; keys: {self.keys()[:12]}.")
            return {key: handle.get_tensor(key) for key in [*keys, "position_mask"]}

    def __iter__(self) -> Iterator[ActivationCache]:
        for shard in self.manifest["shards"]:
            yield ActivationCache.load(self._shard_path(shard))

    def select(self, predicate: Callable[[dict[str, Any]], bool]) -> torch.Tensor:
        """Indices (original order) of the examples whose ``batch_saver`` fields satisfy
        ``predicate(fields)``; e.g. ``store.select(lambda f: f["label"] == 1)``."""
        chosen = []
        for shard, cache in zip(self.manifest["shards"], self, strict=True):
            saver = cache.get("batch_saver") or {}
            rows = len(cache["position_mask"])
            index = shard_example_index(shard, saver.get("example_index"), rows)
            for row in range(rows):
                fields = {k: _item(v[row]) for k, v in saver.items()}
                if predicate(fields):
                    chosen.append(int(index[row]))
        return torch.tensor(sorted(chosen), dtype=torch.long)

    def _repr_html_(self) -> str:
        """Notebook view: folder, examples, shards, and each key's shape and dtype."""
        from .report import notebook_view

        return notebook_view(self)

    def to_numpy(self, key: str):
        """``store[key]`` as a numpy array (float32 for half-precision tensors)."""
        value = self[key]
        return (value.float() if value.dtype in (torch.bfloat16, torch.float16) else value).numpy()


def shard_example_index(shard: dict, saved: Any, rows: int) -> torch.Tensor:
    """The dataset index of each row of a shard, ``[rows]`` int64: the ``example_index`` its
    batch saved (the extraction's order; ``sort_by_length`` reorders rows) plus the shard's
    ``index_offset`` (the parts of a distributed store count from 0), or, where none was saved,
    the shard's example range in order. The one rule for every reader (``store[key]``,
    :meth:`ActivationStore.select`, :mod:`hookscope.export`)."""
    if isinstance(saved, torch.Tensor):
        return saved.long() + shard.get("index_offset", 0)
    low = shard["examples"][0]
    return torch.arange(low, low + rows)


def _item(value: Any) -> Any:
    return value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value


def weights_fingerprint(model: torch.nn.Module, samples: int = 8) -> str:
    """16 hex digits that tell weights apart: the sha256 of ``samples`` evenly spaced values of
    every parameter (exact bytes, so the same on any device; a model wrapped from memory, e.g.
    fine-tuned, has no name that would tell it from its base)."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.device.type == "meta" or param.numel() == 0:
                continue  # offloaded to disk: not readable here
            flat = param.detach().reshape(-1)
            # integer spacing (a float32 linspace rounds past the end of a large tensor)
            index = (torch.arange(samples) * (flat.numel() - 1)) // max(samples - 1, 1)
            index = index.unique().to(flat.device)
            values = flat[index].cpu().contiguous().view(torch.uint8).numpy().tobytes()
            digest.update(name.encode() + b"\0" + values)
    return digest.hexdigest()[:16]


def describe(hm: Any, config: Any, positions: list, extra: dict[str, Any]) -> dict[str, Any]:
    """The manifest's description of an extraction (compared on resume)."""
    import transformers

    from . import __version__

    return {
        "model": str(hm.model_name),
        "weights": weights_fingerprint(hm.hf_model),
        "revision": getattr(hm.config, "revision", None),
        "model_type": hm.model_map.model_type,
        "dtype": str(next(hm.hf_model.parameters()).dtype).removeprefix("torch."),
        "transformers": transformers.__version__,
        "hookscope": __version__,
        "extraction_config": config.to_dict(),
        "positions": _encode_mapping({item: [] for item in positions}),
        **extra,
    }
