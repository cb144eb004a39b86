"""INTERIM save / load of a :class:`Dictionary` (safetensors weights + a JSON config).

A stand-in until the native format of ``hookscope.dictionaries`` (``save_dictionary`` /
``load_dictionary`` in the loaders module) lands; then fold these two functions into it and
delete this module. Layout of a folder::

    dictionary.safetensors   W_enc, b_enc, W_dec, b_dec (and threshold)
    dictionary.json          activation, reads, writes, k, input_scale, subtract_decoder_bias,
                             name, metadata (JSON)

Nothing is pickled; shapes are checked by :class:`Dictionary` on load.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors.torch import load_file, save_file

from ..errors import HookscopeError
from .core import Dictionary

WEIGHTS, CONFIG = "dictionary.safetensors", "dictionary.json"
_TENSORS = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")
_FIELDS = ("activation", "reads", "writes", "k", "input_scale", "subtract_decoder_bias", "name")


def save_dictionary_interim(dictionary: Dictionary, folder: str | os.PathLike) -> Path:
    """Write ``dictionary`` to ``folder`` (created); returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {
        key: getattr(dictionary, key).detach().contiguous()
        for key in _TENSORS
        if getattr(dictionary, key) is not None
    }
    save_file(tensors, str(folder / WEIGHTS))
    config = {key: getattr(dictionary, key) for key in _FIELDS}
    config["metadata"] = dictionary.metadata
    (folder / CONFIG).write_text(json.dumps(config, indent=1))
    return folder


def load_dictionary_interim(folder: str | os.PathLike) -> Dictionary:
    """Read a folder written by :func:`save_dictionary_interim`."""
    folder = Path(folder)
    if not (folder / WEIGHTS).is_file() or not (folder / CONFIG).is_file():
        raise HookscopeError(f"{folder} holds no {WEIGHTS} + {CONFIG} (a saved dictionary).")
    config = json.loads((folder / CONFIG).read_text())
    tensors = load_file(str(folder / WEIGHTS))
    unknown = set(tensors) - set(_TENSORS)
    if unknown:
        raise HookscopeError(f"{folder / WEIGHTS} has unexpected tensors {sorted(unknown)}.")
    return Dictionary(**tensors, **{k: config[k] for k in _FIELDS}, metadata=config["metadata"])
