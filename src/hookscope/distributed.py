"""Data-parallel extraction on Ray: each worker holds one HookedModel and streams its share of the
prompts to the shared output folder; the driver writes one manifest over all of it.

    from hookscope.distributed import extract_distributed
    store = extract_distributed(lambda: HookedModel.from_pretrained(path), prompts, ["last"],
                                ExtractionConfig(extract_resid_out=True), "acts/", num_workers=4)

Prompts are split at batch boundaries, so every worker builds exactly the batches the
single-process run builds, and the store holds the same values. Each worker writes a part folder
(``part-000/`` ...), resumable like any store; the top-level manifest lists their shards in order
and the merged running statistics. Needs ``pip install 'hookscope[ray]'``; hookscope works
without it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .config import ExtractionConfig
from .errors import HookscopeError
from .positions import normalize_items
from .safetensors_files import write_safetensors
from .store import (
    _FORMAT,
    MANIFEST,
    ActivationStore,
    RunningStats,
    _load_all,
    _write_json,
    release_writer,
)


def _import_ray():
    try:
        import ray
    except ImportError as error:
        raise HookscopeError(
            "distributed extraction needs Ray: pip install 'hookscope[ray]'."
        ) from error
    return ray


def _extract_part(model_factory, prompts, positions, config_dict, folder, batch_size, seed) -> str:
    """Run on a worker: extract ``prompts`` into the part folder ``folder``."""
    hm = model_factory()
    hm.config.batch_size = batch_size
    try:
        hm.extract_cache(
            prompts,
            positions,
            extraction_config=ExtractionConfig.from_dict(config_dict),
            output_dir=folder,
            seed=seed,
        )
    finally:
        release_writer(folder)  # the worker process lives on: a retry may run in another one
    return folder


def extract_distributed(
    model_factory: Callable[[], Any],
    prompts: Sequence[str],
    target_token_positions: Sequence[Any],
    extraction_config: ExtractionConfig,
    output_dir: str,
    num_workers: int = 2,
    batch_size: int = 8,
    address: str | None = None,
    seed: int = 0,
    cpus_per_worker: float = 1,
    gpus_per_worker: float = 0,
) -> ActivationStore:
    """Extract ``prompts`` data-parallel on a Ray cluster into one store at ``output_dir``.

    Args:
        model_factory: builds the worker's HookedModel (runs once per worker, on the worker).
        address: a Ray cluster address (``"auto"``, ``"ray://host:10001"``); None starts a local
            cluster with ``num_workers`` CPUs.
        cpus_per_worker / gpus_per_worker: resources each worker asks Ray for.
    """
    ray = _import_ray()
    single = isinstance(target_token_positions, str | int | Mapping)  # one item, a text anchor
    positions = normalize_items(target_token_positions if single else list(target_token_positions))
    prompts = list(prompts)
    if not prompts:
        raise HookscopeError("extract_distributed got no prompts.")
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(
            address=address,
            num_cpus=None if address else num_workers,
            include_dashboard=False,
            log_to_driver=False,
            ignore_reinit_error=True,
        )
    try:
        batches = math.ceil(len(prompts) / batch_size)
        per_worker = math.ceil(batches / num_workers) * batch_size  # split at batch boundaries
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        task = ray.remote(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker)(_extract_part)
        parts = []
        for worker, start in enumerate(range(0, len(prompts), per_worker)):
            folder = str(out / f"part-{worker:03d}")
            parts.append(
                task.remote(
                    model_factory,
                    prompts[start : start + per_worker],
                    positions,
                    extraction_config.to_dict(),
                    folder,
                    batch_size,
                    seed,
                )
            )
        folders = ray.get(parts)
    finally:
        if started_here:
            ray.shutdown()
    return _combine_parts(out, [Path(f) for f in folders])


def _combine_parts(out: Path, folders: list[Path]) -> ActivationStore:
    """Write the top-level manifest (and merged statistics) over the part stores, in order."""
    shards, stats, examples, descriptions, saver = [], RunningStats(), 0, [], None
    for folder in folders:
        manifest = json.loads((folder / MANIFEST).read_text())
        if not manifest.get("complete"):
            raise HookscopeError(
                f"part store {folder} is incomplete; run extract_distributed again to resume it."
            )
        descriptions.append(manifest["description"])
        saver = saver or manifest.get("batch_saver")
        for shard in manifest["shards"]:
            low, high = shard["examples"]
            shards.append(
                {
                    **shard,
                    "file": f"{folder.name}/{shard['file']}",
                    "examples": [examples + low, examples + high],
                    "index_offset": examples,
                }
            )
        examples += manifest["examples"]
        if manifest.get("stats"):
            stats.merge(RunningStats.from_tensors(_load_all(folder / manifest["stats"])))
    stats_name = "stats-merged.safetensors"
    # atomic: a manifest of an earlier merge may name this file (a failure keeps the old one)
    stats_sha256 = write_safetensors(out / stats_name, stats.tensors())
    description = {k: v for k, v in descriptions[0].items() if k != "batch_size"}
    description["workers"] = len(folders)
    _write_json(
        out / MANIFEST,
        {
            "format": _FORMAT,
            "description": description,
            "shards": shards,
            "stats": stats_name,
            "stats_sha256": stats_sha256,
            "examples": examples,
            "complete": True,
            "batch_saver": saver,
        },
    )
    return ActivationStore.open(out)
