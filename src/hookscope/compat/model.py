"""easyroutine's ``HookedModel`` and ``ActivationCache`` methods, added on top of hookscope's
classes by :func:`register` (the core classes do not know them)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..cache import ActivationCache, _human_bytes
from ..errors import HookscopeError
from ..hooked_model import HookedModel
from ..points import parse_point
from .notes import note
from .patching import compute_patching


@dataclass(frozen=True)
class ReferenceModelConfig:
    """The dimensions of easyroutine's ``hm.model_config`` (its hook-name strings have no
    equal: hookscope locates modules itself; see ``hm.model_map``)."""

    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    num_key_value_groups: int
    hidden_size: int
    head_dim: int


def model_config(hm: HookedModel) -> ReferenceModelConfig:
    """``hm.model_config``: the model's dimensions in easyroutine's field names."""
    note("hm.model_config", "hm.model_map (n_layers, n_heads, n_kv_heads, d_model, d_head)")
    m = hm.model_map
    return ReferenceModelConfig(
        num_hidden_layers=m.n_layers,
        num_attention_heads=m.n_heads,
        num_key_value_heads=m.n_kv_heads,
        num_key_value_groups=m.n_heads // m.n_kv_heads,
        hidden_size=m.d_model,
        head_dim=m.d_head,
    )


def hf_tokenizer(hm: HookedModel) -> Any:
    """``hm.hf_tokenizer``: the tokenizer, or the processor of a vision-language model."""
    note("hm.hf_tokenizer", "hm.get_tokenizer() (hm.tokenizer for the text tokenizer)")
    return hm.get_tokenizer()


def is_multimodal(hm: HookedModel) -> bool:
    """True when the model came with a processor (takes images)."""
    return hm.processor is not None


def get_lm_head(hm: HookedModel) -> nn.Module:
    """The unembedding module (``hf_model.get_output_embeddings()``).

    Raises:
        HookscopeError: for a model without one.
    """
    head = hm.hf_model.get_output_embeddings()
    if head is None:
        raise HookscopeError(f"{type(hm.hf_model).__name__} has no output embeddings (no LM head).")
    return head


def get_last_layernorm(hm: HookedModel) -> nn.Module:
    """The final norm module, applied before the LM head."""
    return hm.model_map.final_norm


def set_custom_modules(hm: HookedModel) -> None:
    """A no-op: easyroutine swapped in its own attention modules to read patterns; hookscope
    reads them through transformers' attention interface, with the model's own modules."""
    note("hm.set_custom_modules()", "nothing (not needed)", "hookscope needs no custom modules")


def restore_original_modules(hm: HookedModel) -> None:
    """A no-op: the model's modules are never replaced (see :func:`set_custom_modules`)."""
    note("hm.restore_original_modules()", "nothing (not needed)", "modules are never replaced")


def assert_module_exists(hm: HookedModel, component: str) -> None:
    """Raise unless ``component`` (a module path, ``.input`` / ``.output`` allowed) exists.

    Raises:
        ArchitectureError: naming the path and the closest real ones (a ``ValueError``, as
            easyroutine raised).
    """
    for suffix in (".input", ".output"):
        component = component.removesuffix(suffix)
    hm.get_module_from_string(component)


def assert_all_modules_exist(hm: HookedModel) -> None:
    """A no-op: hookscope locates every module it hooks when it wraps the model (and raises
    then for a module it cannot find)."""


def is_empty(cache: ActivationCache) -> bool:
    """True when the cache holds no key."""
    return len(cache) == 0


def cuda(cache: ActivationCache) -> ActivationCache:
    """Same as ``to("cuda")``."""
    return cache.to("cuda")


def predict(
    hm: HookedModel, k: int = 10, strip: bool = True, **kwargs: Any
) -> dict[str, float] | list[dict[str, float]]:
    """The k most likely next tokens after each example's last real token, with their
    probabilities: ``{token: probability}`` (first occurrence kept when stripping merges two
    tokens). One example gives one dict (as easyroutine), several a list of dicts.
    ``kwargs`` go to :meth:`HookedModel.forward` (``inputs=...``)."""
    cache = hm.forward(target_token_positions=["last"], **kwargs)
    probs = cache["logits"][:, -1].float().softmax(-1)
    values, ids = probs.topk(k, dim=-1)
    result = []
    for row_values, row_ids in zip(values, ids, strict=True):
        tokens: dict[str, float] = {}
        for token, prob in zip(
            hm.to_string_tokens(row_ids.tolist()), row_values.tolist(), strict=True
        ):
            token = token.strip() if strip else token
            tokens.setdefault(token, prob)
        result.append(tokens)
    return result[0] if len(result) == 1 else result


@contextmanager
def deferred_mode(cache: ActivationCache) -> Iterator[ActivationCache]:
    """easyroutine's deferred ``cat``: hookscope's ``cat`` always defers, merging the appended
    batches once, when a value is first read, so this context only yields the cache."""
    yield cache


def _bytes_of(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_bytes_of(v) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(_bytes_of(v) for v in value)
    return 0


_memory_size_bytes = ActivationCache.memory_size


def memory_size(cache: ActivationCache, key: str | None = None) -> int | str:
    """Without ``key``: bytes held by the cache's tensors (an int, hookscope's form). With
    ``key``: that entry's size as a readable string (``"12.0 KB"``, easyroutine's form).

    Raises:
        KeyError: for a key not in the cache (easyroutine answered ``"Not present: 0 B"``).
    """
    if key is None:
        return _memory_size_bytes(cache)
    return _human_bytes(_bytes_of(cache[key]))


def _group_of(key: str) -> str:
    """``resid_out_3`` -> ``resid_out``; ``pattern_L2H5`` -> ``pattern_L2``; others unchanged."""
    try:
        point = parse_point(key)
    except HookscopeError:
        return key
    if point.head is not None:
        return f"{point.kind}_L{point.layer}"
    return point.kind


def memory_tree(
    cache: ActivationCache, print_tree: bool = False, grouped_tree: bool = False
) -> dict[str, str]:
    """``{key: readable size}`` of every entry; ``grouped_tree`` sums the layers of a kind
    (``resid_out``) and the heads of a layer (``pattern_L2``); ``print_tree`` prints it."""
    sizes: dict[str, int] = {}
    for key in cache:
        group = _group_of(key) if grouped_tree else key
        sizes[group] = sizes.get(group, 0) + _bytes_of(cache[key])
    tree = {key: _human_bytes(size) for key, size in sizes.items()}
    if print_tree:
        width = max((len(k) for k in tree), default=0)
        print("\n".join(f"{k:<{width}}  {v}" for k, v in tree.items()))
    return tree


# easyroutine's methods, by the class they are added to (properties where easyroutine reads an
# attribute)
_METHODS = {
    HookedModel: {
        "compute_patching": compute_patching,
        "model_config": property(model_config),
        "hf_tokenizer": property(hf_tokenizer),
        "is_multimodal": is_multimodal,
        "get_lm_head": get_lm_head,
        "get_last_layernorm": get_last_layernorm,
        "set_custom_modules": set_custom_modules,
        "restore_original_modules": restore_original_modules,
        "predict": predict,
        "assert_module_exists": assert_module_exists,
        "assert_all_modules_exist": assert_all_modules_exist,
    },
    ActivationCache: {
        "is_empty": is_empty,
        "cuda": cuda,
        "deferred_mode": deferred_mode,
        "memory_size": memory_size,
        "memory_tree": memory_tree,
    },
}


def register() -> None:
    """Add the methods to :class:`HookedModel` and :class:`ActivationCache` (idempotent)."""
    for cls, methods in _METHODS.items():
        for name, method in methods.items():
            setattr(cls, name, method)
