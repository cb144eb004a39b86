"""On-disk activation store: sharded safetensors, a manifest, running statistics, resumable.

Layout of an output folder::

    manifest.json                  what was extracted, by which model and versions, and the
                                   committed shards (example range, bytes, sha256)
    shard-00000.safetensors ...    one ActivationCache file per batch (no pickle)
    stats-00012.safetensors        running count / mean / M2 per point and position slot, as of
                                   the last committed shard

Every file is written to a temporary name and renamed; the manifest is rewritten last, so it is
the commit point: a run killed at any moment leaves a folder whose manifest names only complete
shards, and a restart with the same arguments continues after them (no example lost or
duplicated). Reading checks each shard's size and sha256 and raises a clear error on a mismatch.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .cache import ActivationCache, _decode_mapping, _encode_mapping
from .errors import HookscopeError

MANIFEST = "manifest.json"
_FORMAT = "hookscope.ActivationStore/1"
_NOT_STATS = ("logits", "position_mask", "input_ids")


class StoreError(HookscopeError):
    """An activation store that is missing, foreign, incomplete or corrupted."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


class RunningStats:
    """Count, mean and M2 per point and position slot, merged batch by batch (Chan et al.)."""

    def __init__(self) -> None:
        self.count: dict[str, torch.Tensor] = {}
        self.mean: dict[str, torch.Tensor] = {}
        self.m2: dict[str, torch.Tensor] = {}

    def update(self, cache: ActivationCache) -> None:
        """Add one batch: every ``[batch, P, d]`` activation, over its real slots."""
        mask = cache["position_mask"].to(torch.float64)  # [batch, P]
        for key, value in cache.tensors().items():
            if key in _NOT_STATS or key.startswith("batch_saver") or value.dim() != 3:
                continue
            x = value.detach().to(torch.float64).cpu()
            weight = mask.unsqueeze(-1)
            n = weight.sum(0)  # [P, 1]
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
            raise StoreError(
                f"running statistics of {key!r} need the same position slots in every batch."
            )
        old_n, new_n = self.count[key].unsqueeze(-1), n.unsqueeze(-1)
        total = old_n + new_n
        delta = mean - self.mean[key]
        self.mean[key] = self.mean[key] + delta * new_n / total.clamp(min=1)
        self.m2[key] = self.m2[key] + m2 + delta**2 * old_n * new_n / total.clamp(min=1)
        self.count[key] = total.squeeze(-1)

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


class StoreWriter:
    """Writes one shard per batch and commits it in the manifest (see the module docstring).

    Args:
        folder: the output folder (created; an existing store of the *same* extraction resumes).
        description: what is extracted (model, config, positions, ...): it must match on resume.
    """

    def __init__(self, folder: str | os.PathLike, description: dict[str, Any]):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        for stray in self.folder.glob(".*.tmp"):
            stray.unlink()  # half-written files of a killed run
        path = self.folder / MANIFEST
        if path.exists():
            manifest = json.loads(path.read_text())
            if manifest.get("description") != description:
                raise StoreError(
                    f"{self.folder} holds a different extraction ({manifest.get('description')}); "
                    "use another output_dir or delete this one."
                )
            self.manifest = manifest
            stats_file = manifest.get("stats")
            self.stats = (
                RunningStats.from_tensors(_load_all(self.folder / stats_file))
                if stats_file
                else RunningStats()
            )
        else:
            self.manifest = {
                "format": _FORMAT,
                "description": description,
                "shards": [],
                "stats": None,
                "examples": 0,
                "complete": False,
                "batch_saver": None,
            }
            self.stats = RunningStats()
            _write_json(path, self.manifest)

    @property
    def completed_batches(self) -> int:
        return len(self.manifest["shards"])

    @property
    def examples(self) -> int:
        return self.manifest["examples"]

    def write(self, cache: ActivationCache) -> None:
        """Write ``cache`` (one batch) as the next shard and commit it."""
        index = self.completed_batches
        name = f"shard-{index:05d}.safetensors"
        path = cache.save(self.folder / name)
        rows = len(cache["position_mask"])
        self.stats.update(cache)
        stats_name = f"stats-{index:05d}.safetensors"
        stats_tmp = self.folder / f".{stats_name}.tmp"
        save_file({k: v.contiguous() for k, v in self.stats.tensors().items()}, str(stats_tmp))
        os.replace(stats_tmp, self.folder / stats_name)
        previous_stats = self.manifest["stats"]
        start = self.examples
        self.manifest["shards"].append(
            {
                "file": name,
                "examples": [start, start + rows],
                "bytes": path.stat().st_size,
                "sha256": _sha256(path),
            }
        )
        self.manifest["examples"] = start + rows
        self.manifest["stats"] = stats_name
        if "batch_saver" in cache and self.manifest["batch_saver"] is None:
            self.manifest["batch_saver"] = sorted(cache["batch_saver"])
        _write_json(self.folder / MANIFEST, self.manifest)  # the commit point
        if previous_stats:
            (self.folder / previous_stats).unlink(missing_ok=True)

    def finish(self) -> ActivationStore:
        self.manifest["complete"] = True
        _write_json(self.folder / MANIFEST, self.manifest)
        return ActivationStore.open(self.folder)


def _load_all(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


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
        manifest = json.loads(path.read_text())
        if manifest.get("format") != _FORMAT:
            raise StoreError(f"{path} is not a hookscope activation-store manifest.")
        for shard in manifest["shards"]:
            file = folder / shard["file"]
            if not file.exists() or file.stat().st_size != shard["bytes"]:
                size = file.stat().st_size if file.exists() else "missing"
                raise StoreError(
                    f"shard {shard['file']} is truncated or missing ({size} bytes, the manifest says {shard['bytes']})."
                )
        return cls(folder, manifest)

    def __len__(self) -> int:
        return self.manifest["examples"]

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    def _shard_path(self, shard: dict) -> Path:
        path = self.folder / shard["file"]
        if shard["file"] not in self._verified:
            if _sha256(path) != shard["sha256"]:
                raise StoreError(
                    f"shard {shard['file']} is corrupted: its sha256 does not match the manifest."
                )
            self._verified.add(shard["file"])
        return path

    def verify(self) -> None:
        """Check every shard's checksum (raises :class:`StoreError` on the first mismatch)."""
        for shard in self.manifest["shards"]:
            self._shard_path(shard)

    def keys(self) -> list[str]:
        if not self.manifest["shards"]:
            return []
        with safe_open(str(self._shard_path(self.manifest["shards"][0])), framework="pt") as handle:
            return [k for k in handle.keys() if not k.startswith("running_count/")]

    def _read(self, keys: list[str]) -> ActivationCache:
        merged = ActivationCache()
        for shard in self.manifest["shards"]:
            with safe_open(str(self._shard_path(shard)), framework="pt") as handle:
                metadata = handle.metadata()
                part: dict[str, Any] = {k: handle.get_tensor(k) for k in keys if k in handle.keys()}
                if "batch_saver/example_index" in part:  # parts of a distributed store count from 0
                    part["batch_saver/example_index"] = part[
                        "batch_saver/example_index"
                    ] + shard.get("index_offset", 0)
                part["position_mask"] = handle.get_tensor("position_mask")
                part["mapping_index"] = _decode_mapping(json.loads(metadata["mapping_index"]))
            merged.cat(part)
        return merged

    def __getitem__(self, key: str) -> torch.Tensor:
        """One point over every example, ``[examples, P, ...]``, in the original order."""
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
        return RunningStats.from_tensors(_load_all(self.folder / self.manifest["stats"])).summary(
            key
        )

    def __iter__(self) -> Iterator[ActivationCache]:
        for shard in self.manifest["shards"]:
            yield ActivationCache.load(self._shard_path(shard))

    def select(self, predicate: Callable[[dict[str, Any]], bool]) -> torch.Tensor:
        """Indices (original order) of the examples whose ``batch_saver`` fields satisfy
        ``predicate(fields)``; e.g. ``store.select(lambda f: f["label"] == 1)``."""
        chosen = []
        for shard, cache in zip(self.manifest["shards"], self, strict=True):
            saver = cache.get("batch_saver") or {}
            for row in range(len(cache["position_mask"])):
                fields = {k: _item(v[row]) for k, v in saver.items()}
                if predicate(fields):
                    chosen.append(int(fields["example_index"]) + shard.get("index_offset", 0))
        return torch.tensor(sorted(chosen), dtype=torch.long)

    def to_numpy(self, key: str):
        """``store[key]`` as a numpy array (float32 for half-precision tensors)."""
        value = self[key]
        return (value.float() if value.dtype in (torch.bfloat16, torch.float16) else value).numpy()


def _item(value: Any) -> Any:
    return value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value


def describe(hm: Any, config: Any, positions: list, extra: dict[str, Any]) -> dict[str, Any]:
    """The manifest's description of an extraction (compared on resume)."""
    import transformers

    from . import __version__

    return {
        "model": str(hm.model_name),
        "revision": getattr(hm.config, "revision", None),
        "model_type": hm.model_map.model_type,
        "dtype": str(next(hm.hf_model.parameters()).dtype).removeprefix("torch."),
        "transformers": transformers.__version__,
        "hookscope": __version__,
        "extraction_config": config.to_dict(),
        "positions": _encode_mapping({item: [] for item in positions}),
        **extra,
    }


#: The reference design's name for an on-disk activation writer/reader.
ActivationSaver = ActivationStore
