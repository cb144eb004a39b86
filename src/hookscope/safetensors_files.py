"""Writing safetensors files: streamed, checksummed on the way, optionally atomic.

The store writes one shard and one statistics file per batch on its writer thread, beside the
next forward. safetensors' own writer costs ~40 us of Python per tensor and the store then read
every file back for its sha256; here the header is built once, each tensor's bytes go to the
file straight from its memory, and the sha256 is computed from the same bytes on the way.

Format (https://huggingface.co/docs/safetensors): 8 bytes little-endian header length, the
JSON header (``{name: {dtype, shape, data_offsets}}`` and ``__metadata__``) padded with spaces
to a multiple of 8, then the tensors' bytes back to back, without holes.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import struct
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save

MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' reader refuses a longer header
_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def write_safetensors(
    path: Path,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
    atomic: bool = True,
) -> str:
    """Write ``tensors`` (any layout; views of one tensor are fine) to ``path``; returns the
    sha256 (hex) of the file's bytes.

    ``atomic``: write a temporary file renamed over ``path``, so a failure leaves the old file
    (or none). The store passes False for files that no manifest names yet (a failure leaves a
    partial file that nothing reads and the next writer removes).

    Raises:
        ValueError: (before anything is written) a metadata key or value that is not a
            string, or a tensor name that is not a string or is ``"__metadata__"``: safetensors'
            reader refuses such a header, so the file would be unreadable.
    """
    _check_names(tensors, metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not atomic:
        return _write(path, tensors, metadata)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        digest = _write(Path(tmp), tensors, metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return digest


def _check_names(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> None:
    """Refuse a header safetensors cannot read back (its metadata is a map of strings)."""
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValueError(
                f"safetensors metadata must map strings to strings, got {key!r}: {value!r} "
                f"({type(value).__name__}); pass str(value) or json.dumps(value)."
            )
    for name in tensors:
        if not isinstance(name, str) or name == "__metadata__":
            raise ValueError(
                f"a safetensors tensor name must be a string other than '__metadata__', got "
                f"{name!r}."
            )


def _write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> str:
    """Create ``path`` anew (a link or file already there is removed, never written through)
    and write the file; returns its sha256."""
    pieces = _pieces(tensors, metadata)
    head = next(pieces)  # the header, built and checked before the file is touched
    path.unlink(missing_ok=True)
    digest = hashlib.sha256()
    with open(path, "xb") as file:
        for piece in itertools.chain([head], pieces):
            digest.update(piece)
            file.write(piece)
    return digest.hexdigest()


def _pieces(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None):
    """The file's bytes in order: the length and header, then each tensor's memory."""
    if sys.byteorder != "little" or any(v.dtype not in _DTYPES for v in tensors.values()):
        yield save({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, metadata)
        return
    cpu = {name: value.detach().cpu() for name, value in tensors.items()}
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, value in cpu.items():
        size = value.numel() * value.element_size()
        header[name] = {
            "dtype": _DTYPES[value.dtype],
            "shape": list(value.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    # UTF-8 as safetensors writes it (escaped, a lone surrogate would make a header its
    # reader refuses; unescaped it raises UnicodeEncodeError here, as safetensors' writer does)
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if len(text) > MAX_HEADER_BYTES:
        raise ValueError(
            f"the safetensors header would take {len(text)} bytes, over the {MAX_HEADER_BYTES} "
            "safetensors reads (metadata or tensor names too large)."
        )
    text += b" " * (-len(text) % 8)
    yield struct.pack("<Q", len(text)) + text
    for value in cpu.values():
        if value.numel():
            yield value.resolve_neg().contiguous().reshape(-1).view(torch.uint8).numpy().data
