"""Export activations to Apache Arrow and HuggingFace ``datasets`` (optional dependencies).

One row per example, in dataset order::

    example_index   int64                   the example's index in the extraction
    resid_out_3     fixed_size_list<fixed_size_list<float, d_model>[P]>[...]  one per point
    position_mask   fixed_size_list<bool>[P]  which slots are real
    input_ids       list<int64>             where stored (``save_input_ids``): the row as
                                            stored, with its batch's padding
    <field>         a ``batch_saver`` field kept per example (a tensor or a list)

A point ``[examples, *shape]`` becomes nested fixed-size lists of ``shape``, so a reader gets
the exact layout back (``numpy``: ``column.flatten()...reshape``; ``datasets``: ``with_format
("torch")`` gives ``[examples, *shape]``). Arrow has no bfloat16: a bfloat16 point is exported
as float32 (exactly: every bfloat16 value is a float32 value); float16 stays float16.

``pip install 'hookscope[arrow]'`` for :func:`to_arrow`, ``'hookscope[datasets]'`` for
:func:`to_hf_dataset`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from safetensors import safe_open

from .cache import ActivationCache
from .errors import HookscopeError, InputError
from .store import (
    ActivationStore,
    _metadata_json,
    _read_header,
    _untrusted,
    shard_example_index,
)
from .store_io import store_dtype_of

_NOT_POINTS = ("position_mask", "input_ids", "mapping_index", "batch_saver")


def _import(module: str, extra: str) -> Any:
    try:
        return __import__(module)
    except ImportError:
        raise HookscopeError(
            f"exporting activations needs the optional dependency {module!r}, which is not "
            f"installed: pip install 'hookscope[{extra}]' (or pip install {module})."
        ) from None


def to_arrow(
    source: ActivationStore | ActivationCache,
    points: Sequence[str] | None = None,
    dtype: Any = None,
) -> Any:
    """A ``pyarrow.Table`` with one row per example (see the module docstring).

    Args:
        source: a store (``extract_cache(..., output_dir=...)``, read shard by shard) or an
            in-memory :class:`ActivationCache` with one row per example.
        points: the activation keys to export (default: every per-example point).
        dtype: ``"float16"`` / ``"bfloat16"`` / ``"float32"``: convert the points first.

    Raises:
        HookscopeError: pyarrow is missing; StoreError / InputError: a point that is not in
            ``source`` or has no row per example (a running mean), naming the valid ones.
    """
    pa = _import("pyarrow", "arrow")
    target = store_dtype_of(dtype)
    batches = [_record_batch(pa, part, keys, target) for part, keys in _parts(source, points)]
    if not batches:
        raise InputError(f"nothing to export: {source!r:.120} holds no examples.")
    table = pa.Table.from_batches(batches)
    order = torch.tensor(table.column("example_index").to_numpy().copy())
    if not torch.equal(order, torch.arange(len(order))):
        table = table.take(pa.array(torch.argsort(order).numpy()))
    return table


def to_hf_dataset(
    source: ActivationStore | ActivationCache,
    points: Sequence[str] | None = None,
    dtype: Any = None,
) -> Any:
    """A HuggingFace ``datasets.Dataset`` of :func:`to_arrow`'s table (same columns; read
    ``dataset.with_format("torch")[point]`` for ``[examples, *shape]``).

    Raises:
        HookscopeError: ``datasets`` (or pyarrow) is missing; see :func:`to_arrow`.
    """
    datasets = _import("datasets", "datasets")
    return datasets.Dataset(to_arrow(source, points, dtype))


# -- what is read ------------------------------------------------------------------------------
def _parts(source: Any, points: Sequence[str] | None) -> Iterator[tuple[dict[str, Any], list[str]]]:
    """``(part, point keys)`` per shard of a store (one part for a cache): ``part`` holds
    the points, ``position_mask``, ``example_index``, and ``input_ids`` / ``batch_saver``
    fields where present."""
    if isinstance(source, ActivationCache):
        yield _cache_part(source, points)
        return
    if not isinstance(source, ActivationStore):
        raise InputError(
            f"to_arrow exports an ActivationStore or an ActivationCache, not "
            f"{type(source).__name__}."
        )
    keys = None
    for shard in source.manifest["shards"]:
        path = source._shard_path(shard)  # checksum and rows checked
        part = _shard_part(path, shard)
        if keys is None:
            keys = _chosen(part, points, f"the store {source.folder}")
        yield part, keys


def _shard_part(path: Any, shard: dict) -> dict[str, Any]:
    metadata = _read_header(path)[1]
    with _untrusted(path), safe_open(str(path), framework="pt") as handle:
        part: dict[str, Any] = {"_keys": list(handle.keys()), "_handle_path": path}
        part["position_mask"] = handle.get_tensor("position_mask")
        saver = {
            k.removeprefix("batch_saver/"): handle.get_tensor(k)
            for k in handle.keys()
            if k.startswith("batch_saver/")
        }
    saver.update(_metadata_json(metadata, "batch_saver", {}, path, dict))
    rows = len(part["position_mask"])
    part["example_index"] = shard_example_index(shard, saver.pop("example_index", None), rows)
    part["batch_saver"] = saver
    return part


def _cache_part(cache: ActivationCache, points: Sequence[str] | None) -> tuple[dict, list[str]]:
    rows = len(cache["position_mask"])
    saver = dict(cache.get("batch_saver") or {}) if "batch_saver" in cache else {}
    index = saver.pop("example_index", None)
    part = {
        **cache.tensors(),
        "example_index": shard_example_index({"examples": [0, rows]}, index, rows),
        "batch_saver": saver,
        "_keys": list(cache.tensors()),
        "_means": set(cache._counts),
    }
    return part, _chosen(part, points, "the cache")


def _chosen(part: dict[str, Any], points: Sequence[str] | None, where: str) -> list[str]:
    """The point keys to export; the defaults are every per-example point."""
    rows = len(part["position_mask"])
    available = [
        k
        for k in part["_keys"]
        if k not in _NOT_POINTS
        and not k.startswith(("batch_saver/", "running_count/"))
        and not _is_running_mean(part, k, rows)
    ]
    if points is None:
        return available
    if isinstance(points, str):
        points = [points]
    if not points or len(set(points)) != len(points):  # none: a table without activations
        raise InputError(
            f"points {list(points)!r}: give each point at most once, and at least one (or None: "
            f"every point); exportable points: {available[:16]}"
            f"{' ...' if len(available) > 16 else ''}."
        )
    for key in points:
        if key not in available:
            raise InputError(
                f"cannot export {key!r} from {where}: it is not a per-example activation there; "
                f"exportable points: {available[:16]}{' ...' if len(available) > 16 else ''}."
            )
    return list(points)


def _is_running_mean(part: dict[str, Any], key: str, rows: int) -> bool:
    if f"running_count/{key}" in part["_keys"] or key in part.get("_means", ()):
        return True
    value = part.get(key)
    return isinstance(value, torch.Tensor) and (value.dim() == 0 or len(value) != rows)


def _point(part: dict[str, Any], key: str) -> torch.Tensor:
    if key in part:
        return part[key]
    path = part["_handle_path"]  # a store's shard, its checksum and header checked
    with _untrusted(path), safe_open(str(path), framework="pt") as handle:
        return handle.get_tensor(key)


# -- tensors as Arrow arrays ---------------------------------------------------------------------
def _record_batch(pa: Any, part: dict[str, Any], keys: list[str], dtype: Any) -> Any:
    rows = len(part["position_mask"])
    columns = {"example_index": pa.array(part["example_index"].numpy())}
    for key in keys:
        value = _point(part, key)
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        columns[key] = _fixed(pa, value)
    columns["position_mask"] = _fixed(pa, part["position_mask"])
    ids = part.get("input_ids")
    if ids is None and "input_ids" in part["_keys"] and "_handle_path" in part:
        ids = _point(part, "input_ids")
    if isinstance(ids, torch.Tensor):
        columns["input_ids"] = pa.array(ids.long().tolist(), type=pa.list_(pa.int64()))
    for field, value in part["batch_saver"].items():
        if field in columns:
            continue
        if isinstance(value, torch.Tensor) and value.dim() >= 1 and len(value) == rows:
            columns[field] = _fixed(pa, value)
        elif isinstance(value, list) and len(value) == rows:
            columns[field] = pa.array([json.loads(json.dumps(v)) for v in value])
    return pa.RecordBatch.from_pydict(columns)


def _fixed(pa: Any, value: torch.Tensor) -> Any:
    """``value`` ``[rows, *shape]`` as an Arrow array of nested fixed-size lists of ``shape``
    (``[rows]``: a plain array). bfloat16 becomes float32 (Arrow has none)."""
    value = value.detach().cpu()
    if value.dtype == torch.bfloat16:
        value = value.float()
    array = pa.array(value.contiguous().reshape(-1).numpy())
    for size in reversed(value.shape[1:]):
        array = pa.FixedSizeListArray.from_arrays(array, size)
    return array
