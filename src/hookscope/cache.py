"""ActivationCache: a dict of activations that merges batches and saves to safetensors.

Layout of the values (``P`` = slots of the target positions, see ``hookscope.positions``):

* activations (``resid_out_3``, ``logits``, ...): ``[batch, P, ...]``
* ``position_mask``: ``[batch, P]`` bool, False for slots that pad a shorter selection
* ``input_ids``: ``[batch, seq]`` as given; batches of different length are right-padded with
  ``pad_token_id`` when merged
* ``mapping_index``: each position item -> its slot indices, e.g. ``{"last": [0], 0: [1]}``
* ``batch_saver``: a dict of whatever ``extract_cache``'s ``batch_saver`` returned, merged
  across batches (tensors concatenated, lists extended); each of its fields also reads at the
  top level (``cache["labels"]``, as the reference design shows it), so a field may not share
  a name with another key of the cache
* running means (``avg_pattern_L0H1``, ...): no batch axis; each carries a count of the examples
  behind every cell, and merging two caches combines them as a weighted mean

Batches whose items select a different number of slots (``"all"`` over batches of different
lengths) are re-laid on merge: each item gets the widest count, shorter rows are zero-padded and
masked. Merging happens once, when a value is first read, so appending is linear.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .errors import HookscopeError
from .points import Point, TLName, parse_point, point_alias, point_key, recorded_tl_name
from .safetensors_files import write_safetensors

METADATA_KEYS = ("mapping_index", "batch_saver")
_FORMAT = "hookscope.ActivationCache/1"


@dataclass(frozen=True)
class Axes:
    """How a ``[batch, ...]`` tensor merges across batches: ``slots`` are axes laid out by the
    target positions (re-laid when batches differ), ``ragged`` are axes of free length that are
    right-padded with zeros to the longest batch."""

    slots: tuple[int, ...] = (1,)
    ragged: tuple[int, ...] = ()


def default_axes(key: str, value: torch.Tensor) -> Axes:
    """Axes of a value whose producer did not declare them: ``[batch, P, ...]``."""
    if key == "input_ids" or value.dim() < 2:
        return Axes(slots=())
    return Axes()


def _point_or_none(key: str) -> Point | None:
    try:
        return parse_point(key)
    except HookscopeError:
        return None


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


class ActivationCache(MutableMapping):
    """Activations by name, dict-like (``[]``, ``in``, ``keys``, ``items``, ``len``).

    Example:
        >>> cache = hm.forward(batch, ["last"], ExtractionConfig(extract_resid_out=True))
        >>> cache["resid_out_3"].shape        # [batch, positions, d_model]
        >>> cache.stack("resid_out").shape    # [layers, batch, positions, d_model]
    """

    def __init__(self, data: dict[str, Any] | None = None, pad_token_id: int = 0):
        self._data: dict[str, Any] = dict(data or {})
        self._pending: list[dict[str, Any]] = []
        self._counts: dict[str, torch.Tensor] = {}
        self._axes: dict[str, Axes] = {}
        # key prefix -> function(old, new) that merges those keys in cat (register_aggregation),
        # and the keys whose value such a function made (kept out of the lazy merge)
        self._aggregations: dict[str, Callable[[Any, Any], Any]] = {}
        self._aggregated: set[str] = set()
        self.pad_token_id = pad_token_id
        # TransformerLens hook -> (kind, head axis) on the model this cache came from (set by
        # the forward that made it; kept by cat, take and save). None when unknown: then names
        # whose meaning depends on the family (hook_attn_out, ...) are refused.
        self.tl_names: dict[str, tuple[str, int | None]] | None = None

    # -- dict protocol -------------------------------------------------------------------------
    def __getitem__(self, key: str) -> Any:
        """A value by its key, or by a TransformerLens hook name: ``blocks.3.hook_resid_post``
        reads ``resid_out_3``; ``blocks.3.attn.hook_pattern`` / ``attn.hook_z`` stack the layer's
        per-head keys in TransformerLens's layout (``[batch, heads, rows, P]`` /
        ``[batch, P, heads, d_head]``), which needs every head from 0 up in the cache.
        TransformerLens names mean what they mean on the model the cache came from
        (``hook_attn_out`` is ``attn_out_post_norm`` on sandwich-norm families)."""
        self._merge_pending()
        if key in self._data:
            return self._data[key]
        if isinstance(saver := self._data.get("batch_saver"), dict) and key in saver:
            return saver[key]
        if (alias := point_alias(key)) is not None and alias in self._data:
            return self._data[alias]
        tl = recorded_tl_name(key, self.tl_names)
        if tl is None:
            raise KeyError(f"{key!r} is not in this cache; keys: {list(self._data)}")
        if tl.head_axis is None:
            return self[point_key(tl.kind, tl.layer)]
        return self._stack_heads(key, tl)

    def _stack_heads(self, key: str, tl: TLName) -> torch.Tensor:
        heads = self._heads_from_zero(tl)
        if heads is None:
            raise KeyError(
                f"{key!r} stacks {point_key(tl.kind, tl.layer, 0)}, H1, ... but this cache does not hold "
                f"every head of layer {tl.layer} from 0 up: extract every head (attn_heads='all')."
            )
        return torch.stack(
            [self._data[point_key(tl.kind, tl.layer, h)] for h in heads], tl.head_axis
        )

    def _heads_from_zero(self, tl: TLName) -> list[int] | None:
        """The heads of ``tl``'s kind and layer in the cache, if they are 0, 1, ..., else None."""
        heads = sorted(
            point.head
            for point in map(_point_or_none, self._data)
            if point and (point.kind, point.layer) == (tl.kind, tl.layer) and point.head is not None
        )
        return heads if heads and heads == list(range(len(heads))) else None

    def __setitem__(self, key: str, value: Any) -> None:
        self._merge_pending()
        if key == "batch_saver" and isinstance(value, dict):
            clashes = sorted(set(value) & (set(self._data) - {"batch_saver"}), key=str)
            if clashes:
                raise HookscopeError(
                    f"batch_saver fields {clashes} share names with keys of the cache; they read "
                    "at the top level (cache[field]), so rename them."
                )
        self._data[key] = value

    def __delitem__(self, key: str) -> None:
        self._merge_pending()
        del self._data[key]
        self._counts.pop(key, None)
        self._aggregated.discard(key)

    def __iter__(self) -> Iterator[str]:
        self._merge_pending()
        return iter(list(self._data))

    def __len__(self) -> int:
        self._merge_pending()
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        self._merge_pending()
        if key in self._data:
            return True
        if isinstance(saver := self._data.get("batch_saver"), dict) and key in saver:
            return True
        if isinstance(key, str) and point_alias(key) in self._data:
            return True
        try:
            tl = recorded_tl_name(key, self.tl_names)
        except HookscopeError:  # a TransformerLens hook with no equal here
            return False
        if tl is None:
            return False
        if tl.head_axis is None:
            return point_key(tl.kind, tl.layer) in self._data
        return self._heads_from_zero(tl) is not None

    # -- batches -------------------------------------------------------------------------------
    def cat(self, other: ActivationCache | dict[str, Any]) -> ActivationCache:
        """Append the batch in ``other`` (rows after this cache's rows). Returns ``self``.

        Running means are combined at once (they are small); everything else is merged lazily.
        """
        self._check_same_keys(other)
        counts = getattr(other, "_counts", {})
        self._axes.update(getattr(other, "_axes", {}))
        if self.tl_names is None:
            self.tl_names = getattr(other, "tl_names", None)
        aggregated = self._aggregate(other, counts)  # checked before anything changes
        for key, count in counts.items():
            self._add_to_running_mean(key, other[key], count)
        self._pending.append(
            {k: v for k, v in other.items() if k not in counts and k not in aggregated}
        )
        return self

    def register_aggregation(self, key_prefix: str, function: Callable[[Any, Any], Any]) -> None:
        """Merge the keys that start with ``key_prefix`` in :meth:`cat` by
        ``function(old, new)`` (``old`` is None for the first batch) instead of concatenating
        them. Register before the first ``cat`` of such a key.

        Raises:
            HookscopeError: when ``function`` is not callable.
        """
        if not callable(function):
            raise HookscopeError(
                f"register_aggregation({key_prefix!r}, ...) needs a function(old, new), got "
                f"{type(function).__name__}."
            )
        self._aggregations[key_prefix] = function

    def remove_aggregation(self, key_prefix: str) -> None:
        """Stop merging ``key_prefix`` keys by a registered function (concatenate them again)."""
        self._aggregations.pop(key_prefix, None)

    def _aggregate(self, other: Any, counts: dict[str, Any]) -> dict[str, Any]:
        """Apply the registered functions to ``other``'s keys; returns the keys they took.

        Raises:
            HookscopeError: for a key this cache already holds concatenated.
        """
        taken = {}
        for key in other.keys():
            prefix = next((p for p in self._aggregations if key.startswith(p)), None)
            if key in counts or prefix is None:
                continue
            first = key not in self._aggregated
            if first and (key in self._data or any(key in batch for batch in self._pending)):
                raise HookscopeError(
                    f"register_aggregation({prefix!r}) came after {key!r} was concatenated; "
                    "register aggregations before the first cat."
                )
            taken[key] = (self._aggregations[prefix], first)
        for key, (function, first) in taken.items():
            self._data[key] = function(None if first else self._data[key], other[key])
            self._aggregated.add(key)
        return taken

    def _check_same_keys(self, other: ActivationCache | dict[str, Any]) -> None:
        """Raise (before anything is appended) when ``other`` holds other keys than this cache.

        Raises:
            HookscopeError: naming the keys only one side has.
        """
        mine = set(self._pending[0] if self._pending else ()) | set(self._data)
        if not mine:
            return  # the first batch
        theirs = set(other.keys())
        if theirs != mine:
            raise HookscopeError(
                f"cannot append a batch whose keys differ from this cache's: missing "
                f"{sorted(mine - theirs)}, extra {sorted(theirs - mine)}; extract every batch "
                "with the same config."
            )

    def set_running_mean(self, key: str, mean: torch.Tensor, count: torch.Tensor) -> None:
        """Store ``mean`` as a running mean over ``count`` examples (per cell, broadcastable)."""
        self._data[key] = mean
        self._counts[key] = count

    def set_axes(self, key: str, axes: Axes) -> None:
        """Declare how ``key`` merges across batches (see :class:`Axes`)."""
        self._axes[key] = axes

    def running_count(self, key: str) -> torch.Tensor:
        """How many examples stand behind each cell of the running mean ``key``."""
        return self._counts[key]

    def _add_to_running_mean(self, key: str, mean: torch.Tensor, count: torch.Tensor) -> None:
        if key not in self._counts:
            self.set_running_mean(key, mean, count)
            return
        old_mean, old_count = self._data[key], self._counts[key]
        if old_mean.shape != mean.shape:
            raise HookscopeError(
                f"cannot combine running means of {key!r} with shapes {list(old_mean.shape)} and "
                f"{list(mean.shape)}: use position items of the same width in every batch."
            )
        total = old_count + count
        weight = (count / total.clamp(min=1)).to(mean.dtype)
        weight = weight.view(*weight.shape, *([1] * (mean.dim() - weight.dim())))
        self.set_running_mean(key, old_mean + (mean - old_mean) * weight, total)

    def _merge_pending(self) -> None:
        if self._pending:
            means = {k: self._data.pop(k) for k in (*self._counts, *self._aggregated)}
            batches = ([self._data] if self._data else []) + self._pending
            self._data = (
                _merge_batches(batches, self.pad_token_id, self._axes)
                if len(batches) > 1
                else batches[0]
            )
            self._data.update(means)
            self._pending = []

    def take(self, rows: torch.Tensor) -> ActivationCache:
        """A new cache with only ``rows`` (in that order) of every per-example value."""
        self._merge_pending()
        out = ActivationCache(pad_token_id=self.pad_token_id)
        out._axes, out._counts = dict(self._axes), dict(self._counts)
        out._aggregations, out._aggregated = dict(self._aggregations), set(self._aggregated)
        out.tl_names = self.tl_names
        out._data = {key: self._rows_of(key, value, rows) for key, value in self._data.items()}
        return out

    def reorder_rows(self, rows: torch.Tensor) -> ActivationCache:
        """Keep only ``rows`` (in that order) of every per-example value, in place, one value at
        a time: the peak is the data plus one value, where :meth:`take` needs twice the data.
        Returns ``self``."""
        self._merge_pending()
        for key in list(self._data):
            self._data[key] = self._rows_of(key, self._data[key], rows)
        return self

    def _rows_of(self, key: str, value: Any, rows: torch.Tensor) -> Any:
        if key in self._counts or key in self._aggregated:
            return value  # running means and aggregated values have no known batch axis
        if isinstance(value, torch.Tensor):
            return value[rows.to(value.device)]
        if key == "batch_saver" and isinstance(value, dict):
            return {
                k: v[rows]
                if isinstance(v, torch.Tensor)
                else [v[i] for i in rows.tolist()]
                if isinstance(v, list)
                else v
                for k, v in value.items()
            }
        return value

    # -- views ---------------------------------------------------------------------------------
    def stack(self, kind: str) -> torch.Tensor:
        """Stack every layer of one kind: ``stack("resid_out")`` -> ``[layers, batch, P, d]``.

        Raises:
            HookscopeError: when the cache holds no ``{kind}_{layer}`` key.
        """
        by_layer = {}
        for key in self:
            try:
                point = parse_point(key)
            except ValueError:
                continue
            if point.kind == kind and point.layer is not None and point.head is None:
                by_layer[point.layer] = self._data[key]
        if not by_layer:
            kinds = sorted({k.rsplit("_", 1)[0] for k in self if k[-1:].isdigit()})
            raise HookscopeError(
                f"no '{kind}_{{layer}}' keys in this cache; per-layer kinds here: {kinds}"
            )
        return torch.stack([by_layer[layer] for layer in sorted(by_layer)])

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor value, by key (``mapping_index`` and ``batch_saver`` aside)."""
        return {k: v for k, v in self.items() if isinstance(v, torch.Tensor)}

    def to(self, device: str | torch.device) -> ActivationCache:
        """Move every tensor (batch_saver tensors included) to ``device``, in place. Returns self."""
        self._merge_pending()
        for key, value in self._data.items():
            if isinstance(value, torch.Tensor):
                self._data[key] = value.to(device)
            elif key == "batch_saver" and isinstance(value, dict):
                self._data[key] = {
                    k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in value.items()
                }
        return self

    def cpu(self) -> ActivationCache:
        """Same as ``to("cpu")``."""
        return self.to("cpu")

    def memory_size(self) -> int:
        """Bytes held by the tensors of this cache."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def __repr__(self) -> str:
        self._merge_pending()
        lines = [f"ActivationCache({len(self._data)} keys, {_human_bytes(self.memory_size())})"]
        width = max((len(k) for k in self._data), default=0)
        for key, value in self._data.items():
            if isinstance(value, torch.Tensor):
                desc = (
                    f"{list(value.shape)} {str(value.dtype).removeprefix('torch.')} {value.device}"
                )
            else:
                desc = repr(value) if len(repr(value)) < 80 else f"{type(value).__name__}(...)"
            lines.append(f"  {key:<{width}}  {desc}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        """Notebook view: keys, shapes, dtypes, and activation norms per layer and slot."""
        from .report import notebook_view

        return notebook_view(self)

    # -- disk ----------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
        """Write the cache to one safetensors file (tensors) with JSON metadata; atomic.

        Every key is saved: tensors as tensors, other values (``mapping_index``, ``text``, ...)
        as JSON data in the header (tuples and non-string keys kept); a value that is neither
        raises naming its key. Non-tensor ``batch_saver`` values must be JSON-serialisable
        (never pickled).
        ``metadata``: extra string entries for the file's header (the store's fingerprints).
        """
        path = Path(path)
        self.save_sha256(path, metadata)
        return path

    def save_sha256(
        self,
        path: str | os.PathLike,
        metadata: dict[str, str] | None = None,
        atomic: bool = True,
    ) -> str:
        """:meth:`save`, returning the sha256 of the file written (computed from the bytes on
        their way: the store's checksum without reading the shard back). ``atomic=False``
        writes ``path`` in place (the store's shards: no manifest names them yet)."""
        path = Path(path)
        if path.is_dir():
            raise HookscopeError(
                f"cannot save the cache to {str(path)!r}: it is a folder; give a file path such "
                "as 'cache.safetensors'."
            )
        tensors = dict(self.tensors())
        saver = self._data.get("batch_saver") or {}
        saver_json = {}
        for key, value in saver.items():
            if isinstance(value, torch.Tensor):
                tensors[f"batch_saver/{key}"] = value
            else:
                try:
                    saver_json[key] = json.loads(json.dumps(value))
                except TypeError as error:
                    raise HookscopeError(
                        f"batch_saver value {key!r} ({type(value).__name__}) is neither a tensor "
                        "nor JSON-serialisable; hookscope never pickles."
                    ) from error
        for key, count in self._counts.items():
            tensors[f"running_count/{key}"] = count
        mapping = self._data.get("mapping_index")
        metadata = {
            "format": _FORMAT,
            "mapping_index": json.dumps(
                _encode_mapping(mapping) if isinstance(mapping, dict) else None
            ),
            "values": json.dumps(self._json_values()),
            "batch_saver": json.dumps(saver_json),
            "pad_token_id": str(self.pad_token_id),
            **(metadata or {}),
        }
        if self.tl_names is not None:
            metadata["tl_names"] = json.dumps(self.tl_names)
        return write_safetensors(path, tensors, metadata, atomic=atomic)

    def _json_values(self) -> dict[str, Any]:
        """Every value that is not a tensor (``batch_saver`` aside), tagged for JSON so that
        tuples and non-string keys come back as they were.

        Raises:
            HookscopeError: naming the first key whose value is neither a tensor nor made of
                dicts, lists, tuples, strings, numbers, booleans and None.
        """
        return {
            key: _to_json(value, key)
            for key, value in self._data.items()
            if not isinstance(value, torch.Tensor) and key != "batch_saver"
        }

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "cpu") -> ActivationCache:
        """Read a cache written by :meth:`save`.

        The file is untrusted input: its header is read and checked against the file's size
        before any tensor is allocated (:func:`read_safetensors_header`), and its JSON metadata
        is checked field by field; nothing is ever unpickled.

        Raises:
            HookscopeError: naming the file (and the field) when it is not a safetensors file,
                its header claims more data than the file holds, or its metadata is malformed.
        """
        metadata = read_safetensors_header(path)[1]
        if metadata.get("format") != _FORMAT:
            raise HookscopeError(f"{path} is not a hookscope ActivationCache file.")
        with _reading(path):
            data, counts, saver = cls._read_tensors(path, device)
        field = "batch_saver"
        try:
            saver = {**_metadata_json(metadata, "batch_saver", {}, path, dict), **saver}
            field = "mapping_index"
            mapping = _decode_mapping(_metadata_json(metadata, "mapping_index", None, path))
            if mapping is not None:
                data["mapping_index"] = mapping
            field = "values"
            for key, value in _metadata_json(metadata, "values", {}, path, dict).items():
                data[key] = _from_json(value)
            field = "pad_token_id"
            pad_token_id = int(metadata.get("pad_token_id", 0))
            field = "tl_names"
            tl_names = _metadata_json(metadata, "tl_names", None, path, dict)
            tl_names = None if tl_names is None else {h: tuple(v) for h, v in tl_names.items()}
        except HookscopeError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise HookscopeError(
                f"{path}: the metadata field {field!r} is malformed ({error!r}); the file is "
                "damaged or was not written by hookscope."
            ) from None
        if saver:
            data["batch_saver"] = saver
        cache = cls(data, pad_token_id=pad_token_id)
        cache._counts = counts
        if tl_names is not None:
            cache.tl_names = tl_names
        return cache

    @staticmethod
    def _read_tensors(path: Any, device: str) -> tuple[dict, dict, dict]:
        """(data, running counts, batch_saver tensors) of the safetensors file at ``path``."""
        data: dict[str, Any] = {}
        counts: dict[str, torch.Tensor] = {}
        saver: dict[str, Any] = {}
        with safe_open(str(path), framework="pt", device=device) as handle:
            for key in handle.keys():
                if key.startswith("batch_saver/"):
                    saver[key.removeprefix("batch_saver/")] = handle.get_tensor(key)
                elif key.startswith("running_count/"):
                    counts[key.removeprefix("running_count/")] = handle.get_tensor(key)
                else:
                    data[key] = handle.get_tensor(key)
        return data, counts, saver


# -- reading untrusted safetensors files -------------------------------------------------------
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
    "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict, dict[str, str]]:
    """(tensor entries, ``__metadata__``) of the safetensors file at ``path``, checked against
    the file before anything is allocated: the 8-byte header length fits the file and
    :data:`MAX_HEADER_BYTES`, the header is a JSON object, every tensor's dtype is known, its
    shape is non-negative integers and its byte range lies inside the file with exactly the size
    its shape and dtype need. A crafted header cannot make a reader allocate more than the file.

    Raises:
        HookscopeError: naming the file and what is wrong.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise HookscopeError(
                f"{path} is not a safetensors file: {size} bytes, fewer than its 8-byte header "
                "length."
            )
        length = int.from_bytes(head, "little")
        if length > min(size - 8, MAX_HEADER_BYTES):
            raise HookscopeError(
                f"{path} is not a valid safetensors file: its header claims {length} bytes, the "
                f"file holds {size - 8} after the length (limit {MAX_HEADER_BYTES}); refused "
                "before reading it."
            )
        raw = handle.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise HookscopeError(
            f"{path} is not a valid safetensors file: its header is not JSON ({error})."
        ) from None
    if not isinstance(header, dict):
        raise HookscopeError(f"{path} is not a valid safetensors file: its header is not a dict.")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise HookscopeError(f"{path}: the safetensors __metadata__ must map strings to strings.")
    for name, entry in header.items():
        _check_tensor_entry(path, name, entry, size - 8 - length)
    return header, metadata


def _check_tensor_entry(path: Any, name: str, entry: Any, data_bytes: int) -> None:
    """One header entry ``{"dtype", "shape", "data_offsets"}`` fits the ``data_bytes`` after
    the header and its shape (a HookscopeError naming the tensor otherwise)."""
    ok = isinstance(entry, dict) and entry.get("dtype") in _DTYPE_BYTES
    shape, offsets = (entry.get("shape"), entry.get("data_offsets")) if ok else (None, None)
    ok = ok and isinstance(shape, list) and all(_natural(n) for n in shape)
    ok = ok and isinstance(offsets, list) and len(offsets) == 2 and all(map(_natural, offsets))
    if not ok:
        raise HookscopeError(
            f"{path}: tensor {name!r} has a malformed header entry {str(entry)[:200]} (needs a "
            f"dtype among {sorted(_DTYPE_BYTES)}, a shape and two data offsets)."
        )
    begin, end = offsets
    need = _DTYPE_BYTES[entry["dtype"]]
    for n in shape:
        need *= n
    if not begin <= end <= data_bytes or end - begin != need:
        raise HookscopeError(
            f"{path}: tensor {name!r} claims bytes {begin}..{end} for shape {shape} "
            f"({need} bytes) but the file holds {data_bytes} bytes of data; refused before "
            "reading it."
        )


def _natural(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _metadata_json(
    metadata: dict[str, str], field: str, default: Any, path: Any, kind: type | None = None
) -> Any:
    """The JSON value of ``metadata[field]`` (``default`` when absent), of type ``kind``."""
    if field not in metadata:
        return default
    try:
        value = json.loads(metadata[field])
    except json.JSONDecodeError as error:
        raise HookscopeError(
            f"{path}: the metadata field {field!r} is not valid JSON ({error})."
        ) from None
    if kind is not None and value is not None and not isinstance(value, kind):
        raise HookscopeError(
            f"{path}: the metadata field {field!r} must be a JSON {kind.__name__}, not "
            f"{type(value).__name__}."
        )
    return value


class _reading:
    """Turn the safetensors reader's own errors on a checked file into a HookscopeError."""

    def __init__(self, path: Any):
        self.path = path

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, error: Any, traceback: Any) -> bool:
        if error is not None and type(error).__name__ == "SafetensorError":
            raise HookscopeError(
                f"{self.path} is not a valid safetensors file ({error})."
            ) from None
        return False


# -- JSON with tuples and non-string keys ------------------------------------------------------
def _to_json(value: Any, key: str) -> Any:
    """``value`` (of the cache's ``key``) as JSON data: dicts become ``{"dict": [[key, value],
    ...]}`` and tuples ``{"tuple": [...]}`` so that :func:`_from_json` restores them exactly."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list):
        return [_to_json(v, key) for v in value]
    if isinstance(value, tuple):
        return {"tuple": [_to_json(v, key) for v in value]}
    if isinstance(value, dict):
        return {"dict": [[_to_json(k, key), _to_json(v, key)] for k, v in value.items()]}
    raise HookscopeError(
        f"cannot save {key!r}: it holds a {type(value).__name__}, which is neither a tensor nor "
        "JSON data; a cache file holds tensors and JSON data only (hookscope never pickles): "
        f"convert it or `del cache[{key!r}]` first."
    )


def _from_json(value: Any) -> Any:
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    if isinstance(value, dict) and "tuple" in value:
        return tuple(_from_json(v) for v in value["tuple"])
    if isinstance(value, dict):
        return {_hashable(_from_json(k)): _from_json(v) for k, v in value["dict"]}
    return value


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, list | tuple) else key


# -- mapping index encoding --------------------------------------------------------------------
def _encode_mapping(mapping: dict | None) -> list | None:
    if mapping is None:
        return None
    encoded = []
    for item, slots in mapping.items():
        kind = "tuple" if isinstance(item, tuple) else type(item).__name__
        encoded.append([kind, list(item) if isinstance(item, tuple) else item, list(slots)])
    return encoded


def _decode_mapping(encoded: list | None) -> dict | None:
    if encoded is None:
        return None
    return {(tuple(item) if kind == "tuple" else item): slots for kind, item, slots in encoded}


# -- merging -----------------------------------------------------------------------------------
def _merge_batches(
    batches: list[dict[str, Any]], pad_token_id: int, declared: dict[str, Axes]
) -> dict[str, Any]:
    """Concatenate batch dicts along the batch axis, re-laying slots where widths differ.

    The batch dicts are consumed: each key's per-batch values are dropped as soon as that key is
    merged, so the peak is the merged data plus one key's parts, not twice the data. Everything
    that could refuse the merge is checked before the first value is dropped."""
    keys = list(batches[0])
    for index, batch in enumerate(batches[1:], start=1):
        if set(batch) != set(keys):
            raise HookscopeError(
                f"cannot merge batch {index}: its keys differ from the first batch's "
                f"(missing {sorted(set(keys) - set(batch))}, extra {sorted(set(batch) - set(keys))})."
            )
    mappings = [batch.get("mapping_index") for batch in batches]
    layout = _common_layout(mappings)
    axes_of = {}
    for key in keys:
        if isinstance(batches[0][key], torch.Tensor):
            axes_of[key] = declared.get(key) or default_axes(key, batches[0][key])
            slots_free = layout is not None or key == "input_ids"
            _check_mergeable(key, [batch[key] for batch in batches], axes_of[key], slots_free)
        elif key == "batch_saver":
            _check_saver_mergeable([batch[key] for batch in batches])
    merged: dict[str, Any] = {}
    for key in keys:
        values = [batch.pop(key) for batch in batches]
        if key == "mapping_index":
            merged[key] = layout[0] if layout else values[0]
        elif key == "batch_saver":
            merged[key] = _merge_saver(values)
        elif key == "input_ids" and isinstance(values[0], torch.Tensor):
            merged[key] = _cat_padded(values, pad_token_id)
        elif isinstance(values[0], torch.Tensor):
            axes = axes_of[key]
            for axis in axes.ragged:
                values = _pad_to_longest(values, axis, 0)
            if layout and axes.slots:
                values = [
                    _relay(v, m, layout, axes.slots) for v, m in zip(values, mappings, strict=True)
                ]
            merged[key] = torch.cat(values)
        elif all(v == values[0] for v in values):
            merged[key] = values[0]
        else:
            merged[key] = values
    return merged


def _check_mergeable(
    key: str, values: list[torch.Tensor], axes: Axes, slots_free: bool = True
) -> None:
    """Raise unless ``values`` agree on every axis but the batch and ragged axes, and the slot
    axes when ``slots_free`` (the batches' position layouts differ and are re-laid)."""
    free = {0, *axes.ragged, *(axes.slots if slots_free else ())}
    if key == "input_ids":
        free |= {1}  # right-padded to the longest batch
    shapes = [
        [size for axis, size in enumerate(v.shape) if axis not in free] + [v.dim()] for v in values
    ]
    if any(shape != shapes[0] for shape in shapes):
        raise HookscopeError(
            f"cannot merge {key!r}: batch shapes {[list(v.shape) for v in values]} differ "
            "beyond the batch axis."
        )


def _check_saver_mergeable(savers: list[Any]) -> None:
    """Raise unless the batches' ``batch_saver`` dicts have the same fields and each tensor
    field the same shape beyond the batch axis."""
    if not all(isinstance(saver, dict) for saver in savers):
        return
    for index, saver in enumerate(savers[1:], start=1):
        if set(saver) != set(savers[0]):
            raise HookscopeError(
                f"cannot merge batch_saver of batch {index}: its fields {sorted(saver)} differ "
                f"from the first batch's {sorted(savers[0])}."
            )
    for field in savers[0]:
        parts = [saver[field] for saver in savers]
        if all(isinstance(p, torch.Tensor) for p in parts):
            shapes = [list(p.shape) for p in parts]
            if any(shape[1:] != shapes[0][1:] for shape in shapes):
                raise HookscopeError(
                    f"cannot merge batch_saver[{field!r}]: batch shapes {shapes} differ beyond "
                    "the batch axis."
                )


def _common_layout(mappings: list[dict | None]) -> tuple[dict, dict] | None:
    """``(merged mapping, widths per item)`` if the batches' slot layouts differ, else None."""
    if all(m == mappings[0] for m in mappings):
        return None
    items = list(mappings[0])
    if any(list(m) != items for m in mappings):
        raise HookscopeError(
            f"cannot merge batches with different position items: {[list(m) for m in mappings]}"
        )
    widths = {item: max(len(m[item]) for m in mappings) for item in items}
    merged, start = {}, 0
    for item in items:
        merged[item] = list(range(start, start + widths[item]))
        start += widths[item]
    return merged, widths


def _relay(value: torch.Tensor, mapping: dict, layout: tuple[dict, dict], axes: tuple[int, ...]):
    """Copy each item's slots of ``value`` into the merged layout (zeros / False elsewhere)."""
    merged_mapping, _ = layout
    total = sum(len(slots) for slots in merged_mapping.values())
    for axis in axes:
        shape = list(value.shape)
        shape[axis] = total
        out = value.new_zeros(shape)
        for item, slots in mapping.items():
            target = merged_mapping[item][: len(slots)]
            out.index_copy_(
                axis,
                torch.tensor(target, device=value.device),
                value.index_select(axis, torch.tensor(slots, device=value.device)),
            )
        value = out
    return value


def _pad_to_longest(values: list[torch.Tensor], axis: int, pad_value: float) -> list[torch.Tensor]:
    """Right-pad each tensor along ``axis`` to the longest one."""
    length = max(v.shape[axis] for v in values)
    padded = []
    for value in values:
        widths = [0, 0] * (value.dim() - 1 - axis) + [0, length - value.shape[axis]]
        padded.append(torch.nn.functional.pad(value, widths, value=pad_value))
    return padded


def _cat_padded(values: list[torch.Tensor], pad_value: int) -> torch.Tensor:
    """Concatenate ``[batch, seq]`` tensors of different ``seq``, right-padding with ``pad_value``."""
    return torch.cat(_pad_to_longest(values, 1, pad_value))


def _merge_saver(values: list[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for key in values[0]:
        parts = [v.get(key) for v in values]
        if all(isinstance(p, torch.Tensor) for p in parts):
            merged[key] = torch.cat([p if p.dim() else p.unsqueeze(0) for p in parts])
        elif all(isinstance(p, list) for p in parts):
            merged[key] = [x for p in parts for x in p]
        else:
            merged[key] = parts
    return merged
