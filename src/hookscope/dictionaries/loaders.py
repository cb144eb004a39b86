"""Load the public dictionary formats (and hookscope's own) into a :class:`Dictionary`.

Every loader reads tensors with ``safetensors`` or ``numpy.load(allow_pickle=False)``: nothing
is unpickled, so a downloaded file cannot run code. Each checks the keys and shapes its format
documents and names the file, the key and the expected shape when one does not fit.

Formats (:func:`load_dictionary` detects which one a path holds):

- **SAELens** (a folder with ``cfg.json`` + ``sae_weights.safetensors``; SAELens'
  ``sae_lens/saes/sae.py``, ``SAE.save_model`` / ``SAEConfig``): weights ``W_enc [d_in, d_sae]``,
  ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``, ``b_dec [d_in]``, ``threshold [d_sae]`` for
  JumpReLU (``log_threshold`` in training checkpoints); cfg ``d_in``, ``d_sae``,
  ``architecture`` (``standard`` / ``topk`` / ``jumprelu`` / ``batchtopk``; v5 adds
  ``activation_fn_str`` and ``activation_fn_kwargs.k``; v6 keeps ``k`` at the top level),
  ``apply_b_dec_to_input``, ``normalize_activations`` and ``hook_name`` (top level in v5, under
  ``metadata`` / ``meta`` in v6), a TransformerLens hook name.
- **sparsify** (EleutherAI; a folder named by its hookpoint with ``cfg.json`` +
  ``sae.safetensors``; ``sparsify/sparse_coder.py``, ``SparseCoder.save_to_disk``): weights
  ``encoder.weight [d_sae, d_in]``, ``encoder.bias [d_sae]``, ``W_dec [d_sae, d_in]``,
  ``b_dec [d_in]`` (``W_skip [d_in, d_in]`` with ``skip_connection``); cfg ``d_in``, ``k``,
  ``num_latents`` (0: ``expansion_factor * d_in``), ``activation`` (``topk``), ``transcode``.
  Encoding is ``topk(relu((x - b_dec) @ encoder.weight.T + encoder.bias))`` (no ``b_dec``
  subtraction for a transcoder).
- **Gemma Scope** (``params.npz``, or the same arrays as safetensors; Google DeepMind's Gemma
  Scope tutorial): ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``, ``b_enc [d_sae]``,
  ``b_dec [d_in]``, ``threshold [d_sae]``; JumpReLU ``f = relu(pre) * (pre > threshold)`` with
  ``pre = x @ W_enc + b_enc`` (no ``b_dec`` subtraction). The files say nothing about where
  they were trained: the point comes from ``point=`` or from the release's path
  (``gemma-scope-2b-pt-res/.../layer_20/...`` is ``resid_out_20``).
- **hookscope** (a folder with ``dictionary.json`` + ``dictionary.safetensors``, written by
  :func:`save_dictionary`): every :class:`Dictionary` field.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..errors import ActivationPointError, HookscopeError
from ..points import parse_point, parse_tl_name
from .core import Dictionary

NATIVE_FORMAT = "hookscope.Dictionary/1"
NATIVE_CONFIG, NATIVE_WEIGHTS = "dictionary.json", "dictionary.safetensors"
FORMATS = {
    "hookscope": f"a folder with {NATIVE_CONFIG} + {NATIVE_WEIGHTS} (save_dictionary)",
    "saelens": "a folder with cfg.json + sae_weights.safetensors (SAELens)",
    "sparsify": "a folder with cfg.json + sae.safetensors (EleutherAI sparsify)",
    "gemma_scope": "params.npz, or a safetensors file of W_enc/W_dec/b_enc/b_dec/threshold (Gemma Scope)",
}
#: ``point=`` of a loader: one point (an SAE), or ``(reads, writes)`` (a transcoder)
PointSpec = str | tuple[str, str] | None


# -- the entry points ---------------------------------------------------------------------------
def load_dictionary(
    path: str | os.PathLike,
    point: PointSpec = None,
    name: str | None = None,
    model: Any = None,
    input_scale: float | None = None,
) -> Dictionary:
    """Load a dictionary from ``path``, detecting its format (see the module docstring).

    Args:
        path: a folder (SAELens, sparsify, hookscope) or a file (``params.npz``, a Gemma Scope
            safetensors file, or one file of a folder format).
        point: the hookscope point (or TransformerLens hook name) the dictionary reads, or
            ``(reads, writes)`` for a transcoder; default: what the format records.
        name: the name used in cache keys (``features_{name}``); default from the point.
        model: a HookedModel (or its ``model_map``), needed to resolve TransformerLens names
            whose meaning depends on the family (``hook_mlp_out``, ``hook_attn_out``).
        input_scale: SAELens ``normalize_activations="expected_average_only_in"`` needs the
            release's scaling factor (the format does not store it).

    Raises:
        HookscopeError: a path of no known format (the message lists them), a missing or
            wrongly shaped key, or a setting hookscope cannot reproduce exactly.
    """
    path = Path(path)
    if not path.exists():
        raise HookscopeError(f"load_dictionary: {str(path)!r} does not exist.")
    folder = path if path.is_dir() else path.parent
    kind = detect_format(path)
    _refuse_unused_arguments(kind, path, point=point, model=model, input_scale=input_scale)
    if kind == "hookscope":
        return load_native(folder, name=name)
    if kind == "saelens":
        return load_saelens(folder, point, name, model, input_scale)
    if kind == "sparsify":
        return load_sparsify(folder, point, name, model)
    return load_gemma_scope(path, point, name, model)


#: the load_dictionary arguments each format has no use for (they would be ignored)
_UNUSED_ARGUMENTS = {
    "hookscope": ("point", "model", "input_scale"),
    "sparsify": ("input_scale",),
    "gemma_scope": ("input_scale",),
}


def _refuse_unused_arguments(kind: str, path: Path, **given: Any) -> None:
    """Raise when an argument ``kind`` does not read was given (rather than ignore it)."""
    unused = [name for name in _UNUSED_ARGUMENTS.get(kind, ()) if given[name] is not None]
    if unused:
        raise HookscopeError(
            f"load_dictionary: {str(path)!r} is a {kind} dictionary, which does not use "
            f"{unused} (a hookscope dictionary records its points and input_scale; only SAELens "
            "folders take input_scale=); leave them out."
        )


def detect_format(path: Path) -> str:
    """The format of ``path``: ``"hookscope"``, ``"saelens"``, ``"sparsify"`` or
    ``"gemma_scope"``.

    Raises:
        HookscopeError: listing the known formats and what ``path`` holds.
    """
    if path.is_file() and (path.suffix == ".npz" or _is_gemma_scope_safetensors(path)):
        return "gemma_scope"
    folder = path if path.is_dir() else path.parent
    files = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    if NATIVE_CONFIG in files and NATIVE_WEIGHTS in files:
        return "hookscope"
    if "cfg.json" in files and "sae_weights.safetensors" in files:
        return "saelens"
    if "cfg.json" in files and "sae.safetensors" in files:
        return "sparsify"
    if path.is_dir() and "params.npz" in files:
        return "gemma_scope"
    known = "; ".join(f"{k}: {v}" for k, v in FORMATS.items())
    raise HookscopeError(
        f"load_dictionary: {str(path)!r} is no dictionary format hookscope knows ({known}). "
        f"It holds: {sorted(files)[:12] or 'nothing'}."
    )


def save_dictionary(dictionary: Dictionary, folder: str | os.PathLike) -> Path:
    """Write ``dictionary`` to ``folder`` as ``dictionary.safetensors`` (its tensors) and
    ``dictionary.json`` (every other field); :func:`load_dictionary` reads it back exactly.
    Each file is written to a temporary name and renamed, so a crash never leaves half a file.

    Raises:
        HookscopeError: metadata that is not JSON (a tensor, an object).
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {
        key: getattr(dictionary, key).detach().cpu().contiguous()
        for key in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")
        if getattr(dictionary, key) is not None
    }
    config = {
        "format": NATIVE_FORMAT,
        "activation": dictionary.activation,
        "reads": dictionary.reads,
        "writes": dictionary.writes,
        "k": dictionary.k,
        "input_scale": dictionary.input_scale,
        "subtract_decoder_bias": dictionary.subtract_decoder_bias,
        "name": dictionary.name,
        "metadata": dictionary.metadata,
    }
    try:
        text = json.dumps(config, indent=2)
    except TypeError as error:
        raise HookscopeError(
            f"save_dictionary: metadata of {dictionary.name!r} is not JSON ({error}); keep plain "
            "numbers, strings, lists and dicts there."
        ) from None
    weights = folder / NATIVE_WEIGHTS
    with tempfile.NamedTemporaryFile(dir=folder, suffix=".tmp", delete=False) as handle:
        temporary = Path(handle.name)
    save_file(tensors, temporary)
    os.replace(temporary, weights)
    _write_text(folder / NATIVE_CONFIG, text)
    return folder


def _write_text(path: Path, text: str) -> None:
    with tempfile.NamedTemporaryFile(
        "w", dir=path.parent, suffix=".tmp", delete=False, encoding="utf-8"
    ) as handle:
        handle.write(text)
    os.replace(handle.name, path)


# -- hookscope ----------------------------------------------------------------------------------
def load_native(folder: Path, name: str | None = None) -> Dictionary:
    """A dictionary written by :func:`save_dictionary`."""
    config = _read_json(folder / NATIVE_CONFIG)
    if config.get("format") != NATIVE_FORMAT:
        raise HookscopeError(
            f"{folder / NATIVE_CONFIG}: format {config.get('format')!r} is not {NATIVE_FORMAT!r}."
        )
    fields = ("activation", "reads", "writes", "k", "input_scale", "subtract_decoder_bias", "name")
    missing = [f for f in (*fields, "metadata") if f not in config]
    if missing:
        raise HookscopeError(f"{folder / NATIVE_CONFIG} lacks {missing}.")
    weights = _read_safetensors(folder / NATIVE_WEIGHTS)
    _require(weights, ("W_enc", "b_enc", "W_dec", "b_dec"), folder / NATIVE_WEIGHTS)
    options = {f: config[f] for f in fields}
    if name is not None:
        options["name"] = name
    return Dictionary(
        W_enc=weights["W_enc"],
        b_enc=weights["b_enc"],
        W_dec=weights["W_dec"],
        b_dec=weights["b_dec"],
        threshold=weights.get("threshold"),
        metadata=config["metadata"],
        **options,
    )


# -- SAELens ------------------------------------------------------------------------------------
_SAELENS_ARCHITECTURES = ("standard", "topk", "jumprelu", "batchtopk")


def load_saelens(
    folder: Path,
    point: PointSpec = None,
    name: str | None = None,
    model: Any = None,
    input_scale: float | None = None,
) -> Dictionary:
    """An SAELens SAE (``cfg.json`` + ``sae_weights.safetensors``). Architectures ``standard``
    (ReLU), ``topk``, ``jumprelu`` and ``batchtopk``; gated SAEs, per-vector input
    normalisation (``constant_norm_rescale``, ``layer_norm``) and ``hook_z`` reshaping are
    refused rather than approximated."""
    cfg = _read_json(folder / "cfg.json")
    source = folder / "sae_weights.safetensors"
    d_in, d_sae = _int_field(cfg, "d_in", folder), _int_field(cfg, "d_sae", folder)
    activation, k = _saelens_activation(cfg, folder)
    weights = _read_safetensors(source)
    if "threshold" not in weights and "log_threshold" in weights:
        weights["threshold"] = weights["log_threshold"].exp()
    needed = ("W_enc", "b_enc", "W_dec", "b_dec") + (
        ("threshold",) if activation == "jumprelu" else ()
    )
    _require(weights, needed, source)
    meta = {}  # v6 keeps hook names under "metadata" (later "meta")
    for field in ("metadata", "meta"):
        meta.update(cfg[field] if isinstance(cfg.get(field), dict) else {})
    hook_name = cfg.get("hook_name") or meta.get("hook_name")
    hook_out = cfg.get("hook_name_out") or meta.get("hook_name_out")
    d_out = int(cfg.get("d_out", d_in))
    _check_shapes(weights, source, d_in=d_in, d_sae=d_sae, d_out=d_out)
    if activation in ("jumprelu", "batchtopk") and "threshold" in weights:
        _refuse_negative_threshold(weights["threshold"], source, "SAELens")
    _refuse_saelens_settings(cfg, meta, weights, folder)
    scale = _saelens_scale(cfg, folder, input_scale)
    W_dec = weights["W_dec"]
    if "scaling_factor" in weights:  # finetuning_scaling_factor: features are scaled before W_dec
        W_dec = W_dec * weights["scaling_factor"].unsqueeze(1)
    default = hook_name if hook_out is None else (hook_name, hook_out)
    reads, writes = _points(point, default, model, folder)
    return Dictionary(
        W_enc=weights["W_enc"],
        b_enc=weights["b_enc"],
        W_dec=W_dec,
        b_dec=weights["b_dec"],
        activation=activation,
        reads=reads,
        writes=writes,
        k=k,
        threshold=weights.get("threshold") if activation in ("jumprelu", "batchtopk") else None,
        input_scale=scale,
        subtract_decoder_bias=bool(cfg.get("apply_b_dec_to_input", True)),
        name=name or _default_name(reads, writes),
        metadata={"format": "saelens", "source": str(folder), "hook_name": hook_name},
    )


def _saelens_activation(cfg: dict, folder: Path) -> tuple[str, int | None]:
    architecture = cfg.get("architecture", "standard")
    function = cfg.get("activation_fn_str", "relu")
    kwargs = cfg.get("activation_fn_kwargs") or {}
    k = cfg.get("k", kwargs.get("k"))
    if architecture == "standard" and function == "topk":
        architecture = "topk"  # SAELens v5: a standard SAE with a TopK activation function
    elif architecture == "standard" and function != "relu":
        raise HookscopeError(
            f"{folder / 'cfg.json'}: activation_fn_str {function!r} is not supported; hookscope "
            "reads 'relu' and 'topk'."
        )
    if architecture not in _SAELENS_ARCHITECTURES:
        raise HookscopeError(
            f"{folder / 'cfg.json'}: SAELens architecture {architecture!r} is not supported; "
            f"hookscope reads {_SAELENS_ARCHITECTURES}."
        )
    if architecture in ("topk", "batchtopk"):
        if isinstance(k, float) and k.is_integer():
            k = int(k)
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise HookscopeError(
                f"{folder / 'cfg.json'}: a {architecture} SAE needs k (a positive int, at the top "
                f"level or in activation_fn_kwargs), got {k!r}."
            )
        return architecture, k
    return {"standard": "relu", "jumprelu": "jumprelu"}[architecture], None


def _refuse_saelens_settings(cfg: dict, meta: dict, weights: dict, folder: Path) -> None:
    head = cfg.get("hook_head_index", meta.get("hook_head_index"))
    if head is not None:
        raise HookscopeError(
            f"{folder / 'cfg.json'}: hook_head_index={head!r} (an SAE on one head's slice) is not "
            "supported; hookscope's dictionaries read whole points."
        )
    if cfg.get("reshape_activations", "none") != "none":
        raise HookscopeError(
            f"{folder / 'cfg.json'}: reshape_activations={cfg['reshape_activations']!r} (hook_z "
            "SAEs over all heads concatenated) is not supported."
        )
    if cfg.get("finetuning_scaling_factor") and "scaling_factor" not in weights:
        raise HookscopeError(
            f"{folder}: finetuning_scaling_factor is set but sae_weights.safetensors has no "
            "scaling_factor."
        )


def _saelens_scale(cfg: dict, folder: Path, input_scale: float | None) -> float:
    norm = cfg.get("normalize_activations", "none") or "none"
    if norm == "none":
        return 1.0 if input_scale is None else float(input_scale)
    if norm == "expected_average_only_in":
        if input_scale is None:
            raise HookscopeError(
                f"{folder / 'cfg.json'}: normalize_activations='expected_average_only_in' scales "
                "inputs by a constant the files do not store; pass input_scale= (SAELens' "
                "norm_scaling_factor of the release)."
            )
        return float(input_scale)
    raise HookscopeError(
        f"{folder / 'cfg.json'}: normalize_activations={norm!r} rescales each vector by its own "
        "norm or statistics, which a Dictionary does not reproduce; hookscope reads 'none' and "
        "'expected_average_only_in'."
    )


# -- sparsify -----------------------------------------------------------------------------------
_HOOKPOINT = re.compile(r"(?:^|\.)layers\.(?P<layer>\d+)(?P<mlp>\.mlp)?$")


def load_sparsify(
    folder: Path, point: PointSpec = None, name: str | None = None, model: Any = None
) -> Dictionary:
    """An EleutherAI sparsify sparse coder (``cfg.json`` + ``sae.safetensors``, in a folder
    named by its hookpoint: ``layers.6`` is ``resid_out_6``, ``layers.6.mlp`` is ``mlp_out_6``,
    or ``mlp_in_6 -> mlp_out_6`` for a transcoder). TopK only; skip connections are refused."""
    cfg = _read_json(folder / "cfg.json")
    source = folder / "sae.safetensors"
    d_in = _int_field(cfg, "d_in", folder)
    if cfg.get("activation", "topk") != "topk":
        raise HookscopeError(
            f"{folder / 'cfg.json'}: sparsify activation {cfg.get('activation')!r} is not "
            "supported; hookscope reads 'topk'."
        )
    for flag in ("skip_connection", "embed_skip", "gram_lookup"):
        if cfg.get(flag):
            raise HookscopeError(
                f"{folder / 'cfg.json'}: {flag}=True adds a term a Dictionary does not have "
                "(W_skip / an embedding skip / an n-gram table); such coders are not supported."
            )
    d_sae = int(cfg.get("num_latents") or 0) or d_in * int(cfg.get("expansion_factor", 32))
    k = cfg.get("k", 32)
    weights = _read_safetensors(source)
    if "W_skip" in weights:
        raise HookscopeError(f"{source}: holds W_skip (a skip transcoder), which is not supported.")
    _require(weights, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), source)
    expected = {
        "encoder.weight": (d_sae, d_in),
        "encoder.bias": (d_sae,),
        "W_dec": (d_sae, d_in),
        "b_dec": (d_in,),
    }
    _check_expected(weights, expected, source)
    transcode = bool(cfg.get("transcode", False))
    reads, writes = _points(point, _sparsify_default(folder.name, transcode), model, folder)
    return Dictionary(
        W_enc=weights["encoder.weight"].T.contiguous(),
        b_enc=weights["encoder.bias"],
        W_dec=weights["W_dec"],
        b_dec=weights["b_dec"],
        activation="topk",
        reads=reads,
        writes=writes,
        k=int(k),
        subtract_decoder_bias=not transcode,
        name=name or _default_name(reads, writes),
        metadata={"format": "sparsify", "source": str(folder), "hookpoint": folder.name},
    )


def _sparsify_default(hookpoint: str, transcode: bool) -> Any:
    """The points of a sparsify hookpoint (a module path), or None when it is not one hookscope
    maps (then ``point=`` is required)."""
    match = _HOOKPOINT.search(hookpoint)
    if match is None:
        return None
    layer = match["layer"]
    if match["mlp"]:
        return (f"mlp_in_{layer}", f"mlp_out_{layer}") if transcode else f"mlp_out_{layer}"
    return None if transcode else f"resid_out_{layer}"


# -- Gemma Scope --------------------------------------------------------------------------------
_GEMMA_KEYS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
_GEMMA_RELEASE = re.compile(r"gemma-scope-[^/\\]*-(?P<site>res|mlp|att)\b.*layer_(?P<layer>\d+)")


def load_gemma_scope(
    path: Path, point: PointSpec = None, name: str | None = None, model: Any = None
) -> Dictionary:
    """A Gemma Scope JumpReLU SAE: ``params.npz`` (read with ``allow_pickle=False``) or a
    safetensors file of the same arrays. The point is ``point=``, else taken from the release
    path (``-res`` -> ``resid_out_l``, ``-mlp`` -> ``mlp_out_post_norm_l``, what Gemma 2's MLP
    adds to the residual stream)."""
    if path.is_dir():
        path = path / "params.npz"
    weights = _read_npz(path) if path.suffix == ".npz" else _read_safetensors(path)
    weights = {_GEMMA_NAMES.get(k, k): v for k, v in weights.items()}
    _require(weights, _GEMMA_KEYS, path)
    unexpected = sorted(set(weights) - set(_GEMMA_KEYS))
    if unexpected:  # an array we do not apply would make our encoding differ from the format's
        raise HookscopeError(
            f"{path}: unexpected arrays {unexpected} beside Gemma Scope's {list(_GEMMA_KEYS)}; "
            "hookscope would ignore them, so it refuses the file."
        )
    d_in, d_sae = weights["W_enc"].shape if weights["W_enc"].dim() == 2 else (-1, -1)
    _check_shapes(weights, path, d_in=d_in, d_sae=d_sae, d_out=d_in)
    _refuse_negative_threshold(weights["threshold"], path, "Gemma Scope")
    reads, writes = _points(point, _gemma_default(path), model, path)
    return Dictionary(
        W_enc=weights["W_enc"],
        b_enc=weights["b_enc"],
        W_dec=weights["W_dec"],
        b_dec=weights["b_dec"],
        activation="jumprelu",
        reads=reads,
        writes=writes,
        threshold=weights["threshold"],
        subtract_decoder_bias=False,
        name=name or _default_name(reads, writes),
        metadata={"format": "gemma_scope", "source": str(path)},
    )


_GEMMA_NAMES = {"w_enc": "W_enc", "w_dec": "W_dec"}


def _refuse_negative_threshold(threshold: torch.Tensor, source: Path, format_name: str) -> None:
    if not bool((threshold >= 0).all()):  # NaN fails this too
        raise HookscopeError(
            f"{source}: threshold has negative or NaN entries; {format_name}'s JumpReLU is "
            "relu(pre) * (pre > threshold), which equals hookscope's pre * (pre > threshold) "
            "only for thresholds >= 0."
        )


def _gemma_default(path: Path) -> str | None:
    match = _GEMMA_RELEASE.search(path.resolve().as_posix())
    if match is None:
        return None
    if match["site"] == "att":
        return None  # hook_z of all heads concatenated: no hookscope point
    kind = "resid_out" if match["site"] == "res" else "mlp_out_post_norm"
    return f"{kind}_{match['layer']}"


def _is_gemma_scope_safetensors(path: Path) -> bool:
    if path.suffix != ".safetensors" or (path.parent / "cfg.json").exists():
        return False
    if (path.parent / NATIVE_CONFIG).exists():
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = {_GEMMA_NAMES.get(k, k) for k in handle.keys()}
    except Exception:  # not a safetensors file: detection reports the folder's contents
        return False
    return {"W_enc", "W_dec", "threshold"} <= keys


# -- shared helpers -----------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise HookscopeError(f"cannot read {path} as JSON: {error}.") from None
    if not isinstance(data, dict):
        raise HookscopeError(f"{path} holds a JSON {type(data).__name__}, not an object.")
    return data


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as error:  # safetensors raises its own types for a malformed file
        raise HookscopeError(f"cannot read {path} as safetensors: {error}.") from None


def _read_npz(path: Path) -> dict[str, torch.Tensor]:
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as arrays:
            return {key: torch.from_numpy(np.array(arrays[key])) for key in arrays.files}
    except (OSError, ValueError) as error:  # ValueError: an object array would need pickle
        raise HookscopeError(f"cannot read {path} as npz without pickle: {error}.") from None


def _int_field(cfg: dict, key: str, folder: Path) -> int:
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise HookscopeError(f"{folder / 'cfg.json'}: {key} must be a positive int, got {value!r}.")
    return value


def _require(weights: dict, keys: tuple[str, ...], source: Path) -> None:
    missing = [k for k in keys if k not in weights]
    if missing:
        raise HookscopeError(f"{source} lacks {missing}; it holds {sorted(weights)}.")


def _check_shapes(weights: dict, source: Path, d_in: int, d_sae: int, d_out: int) -> None:
    """W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_out], b_dec [d_out], threshold
    [d_sae] (the SAELens and Gemma Scope layout)."""
    expected = {
        "W_enc": (d_in, d_sae),
        "b_enc": (d_sae,),
        "W_dec": (d_sae, d_out),
        "b_dec": (d_out,),
        "threshold": (d_sae,),
        "scaling_factor": (d_sae,),
    }
    _check_expected(weights, expected, source)


def _check_expected(weights: dict, expected: dict, source: Path) -> None:
    for key, shape in expected.items():
        if key in weights and tuple(weights[key].shape) != shape:
            raise HookscopeError(
                f"{source}: {key} has shape {list(weights[key].shape)}, expected {list(shape)}."
            )


def _points(point: PointSpec, default: Any, model: Any, source: Path) -> tuple[str, str]:
    """``(reads, writes)`` as hookscope keys, from ``point=`` or the format's own record."""
    if point is not None and default is not None:
        _check_agrees(point, default, model, source)
    spec = point if point is not None else default
    if spec is None:
        raise HookscopeError(
            f"{source}: the files do not say which point this dictionary reads; pass point= "
            "(e.g. point='resid_out_6', or point=('mlp_in_6', 'mlp_out_6') for a transcoder)."
        )
    if isinstance(spec, str):
        key = _point_key(spec, model, source)
        return key, key
    if isinstance(spec, tuple | list) and len(spec) == 2:
        return _point_key(spec[0], model, source), _point_key(spec[1], model, source)
    raise HookscopeError(f"point must be a point name or (reads, writes), got {spec!r}.")


def _check_agrees(point: PointSpec, recorded: Any, model: Any, source: Path) -> None:
    """``point=`` may settle a name the files leave open (a family-dependent TransformerLens
    name), never contradict one they state: a dictionary trained at layer 6 read at layer 2
    would give plausible, wrong features."""
    try:
        stated = _points(recorded, None, model, source)
    except ActivationPointError:
        return  # the files' name needs point= (or model=) to mean anything here
    asked = _points(point, None, model, source)
    if asked != stated:
        raise HookscopeError(
            f"{source}: point={point!r} ({asked[0]} -> {asked[1]}) contradicts the point the "
            f"files record, {recorded!r} ({stated[0]} -> {stated[1]}); drop point= or load the "
            "dictionary trained for the point you want."
        )


def _point_key(name: str, model: Any, source: Path) -> str:
    """A hookscope key for ``name`` (a key or a TransformerLens hook name)."""
    model_map = getattr(model, "model_map", model)
    try:
        tl = parse_tl_name(name, model_map)
        if tl is not None and tl.head_axis is not None:
            raise ActivationPointError(
                f"{name!r} holds every head of a layer; a dictionary reads one point."
            )
        return parse_point(name, model_map).name
    except ActivationPointError as error:
        raise ActivationPointError(
            f"{source}: the dictionary's point {name!r} has no hookscope equal here ({error}). "
            "Pass point= with a hookscope key (and model= for family-dependent "
            "TransformerLens names)."
        ) from None


def _default_name(reads: str, writes: str) -> str:
    return f"sae_{reads}" if reads == writes else f"transcoder_{writes}"
