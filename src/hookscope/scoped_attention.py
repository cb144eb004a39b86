"""Internal: hookscope's attention function, switched on for one model at a time.

transformers (v5) looks an attention module's kernel up by name, ``config._attn_implementation``,
in ``AttentionInterface`` (and the mask builder in ``AttentionMaskInterface``). hookscope
registers, through those public interfaces, one extra name per original kernel,
``"hookscope+sdpa"``, ``"hookscope+eager"``, ``"hookscope+flash_attention_2"``, ...: its
attention function is a dispatcher, and its mask function is the original kernel's own, so the
model builds exactly the mask it builds without hookscope.

During a hooked call only the wrapped model's language-model attention config is switched to
that name (and switched back in ``finally``); the dispatcher routes each call of that model's
attention modules to the call's handler and everything else (another model that shares nothing
with it, a module without a handler) straight to the original kernel. Nothing process-wide is
replaced while a call runs, so two models in two threads never see each other's hooks.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .archs import ModelMap
from .errors import ArchitectureError

AttentionFn = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]
#: ``handler(original_kernel, module, query, key, value, attention_mask, *args, **kwargs)``
Handler = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]

PREFIX = "hookscope+"
#: kernels whose mask hookscope cannot read, with what their mask is
UNSUPPORTED = {"flex_attention": "BlockMask"}
# attention module id -> the handler of the call that is running on it (one call at a time)
_HANDLERS: dict[int, Handler] = {}
_REGISTER_LOCK = threading.Lock()  # registering a name happens once per kernel
# id(config) -> [calls that need it switched, its own implementation]: a config shared by two
# models is switched by the first call and restored by the last
_SWITCHED: dict[int, list] = {}
_SCOPE_LOCK = threading.Lock()  # guards _SWITCHED and the handler checks


def family_eager_function(module: nn.Module) -> AttentionFn:
    """The eager attention function of ``module``'s own modeling file (it carries the family's
    details, e.g. Gemma2's logit softcapping), which transformers uses for ``"eager"``."""
    function = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if function is None:
        raise ArchitectureError(
            f"{type(module).__name__}: its modeling file has no eager_attention_forward, so "
            "hookscope cannot run it under its own eager attention."
        )
    return function


def _original_kernel(name: str, module: nn.Module) -> AttentionFn:
    """The kernel registered as ``name`` (eager: the module's own family function)."""
    if name != "eager" and name in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[name]
    return family_eager_function(module)


def _dispatcher(original: str) -> AttentionFn:
    def hookscope_attention(module, query, key, value, attention_mask, *args, **kwargs):
        kernel = _original_kernel(original, module)
        handler = _HANDLERS.get(id(module))
        if handler is None:
            return kernel(module, query, key, value, attention_mask, *args, **kwargs)
        return handler(kernel, module, query, key, value, attention_mask, *args, **kwargs)

    hookscope_attention.__name__ = f"hookscope_attention_over_{original}"
    return hookscope_attention


def scoped_name(original: str) -> str:
    """hookscope's name for ``original`` (registered on first use): ``"sdpa"`` ->
    ``"hookscope+sdpa"``. The name keeps the original inside it, so transformers' checks such
    as "is a flash kernel requested" answer as they do for the original."""
    name = PREFIX + original
    with _REGISTER_LOCK:
        if name not in ALL_ATTENTION_FUNCTIONS:
            AttentionInterface.register(name, _dispatcher(original))
            # a kernel without a mask function gets the 2-D mask as is: keep that for ours
            if original in ALL_MASK_ATTENTION_FUNCTIONS:
                AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])
    return name


def _attention_configs(model_map: ModelMap) -> list[Any]:
    """The distinct configs the language model's attention modules read their kernel from."""
    configs: dict[int, Any] = {}
    for parts in model_map.layers:
        config = parts.attention.config
        configs.setdefault(id(config), config)
    return list(configs.values())


@contextmanager
def scoped_attention(model_map: ModelMap, handler: Handler) -> Iterator[None]:
    """Route this model's decoder attention calls through ``handler`` for the block.

    Only the language model's attention configs are switched (a vision tower keeps its own
    kernel). A config object shared with another model (``LlamaForCausalLM(a.config)``) stays
    switched while any call needs it and gets its own name back when the last one ends, whatever
    happens: the other model's modules, without a handler, still reach the original kernel.

    Raises:
        ArchitectureError: when these attention modules are already in a hooked call (a
            HookedModel over a part of this model, or the whole of it).
    """
    modules = [parts.attention for parts in model_map.layers]
    configs = _attention_configs(model_map)
    for config in configs:
        if config._attn_implementation in UNSUPPORTED:
            raise ArchitectureError(
                f"attention internals and pattern edits are not supported under "
                f"{config._attn_implementation!r} (its mask is a {UNSUPPORTED[config._attn_implementation]}, "
                "not a tensor hookscope can read): load the model with "
                'attn_implementation="sdpa" or "eager".'
            )
    _enter(modules, configs, handler)
    try:
        yield
    finally:
        _leave(modules, configs)


def _enter(modules: list[nn.Module], configs: list[Any], handler: Handler) -> None:
    with _SCOPE_LOCK:
        if any(id(module) in _HANDLERS for module in modules):
            raise ArchitectureError(
                "this model's attention modules are already in a hooked call (another "
                "HookedModel wraps them too): calls on shared modules cannot overlap."
            )
        # names first (registering may raise): nothing is changed until all are known
        names = {
            id(config): scoped_name(config._attn_implementation or "eager")
            for config in configs
            if id(config) not in _SWITCHED
        }
        for module in modules:
            _HANDLERS[id(module)] = handler
        for config in configs:
            switched = _SWITCHED.get(id(config))
            if switched is None:
                switched = _SWITCHED[id(config)] = [0, config._attn_implementation]
                # the attribute transformers' own set_attn_implementation writes (without its
                # per-module walk and checks, which would cost more than a small forward)
                config._attn_implementation_internal = names[id(config)]
            switched[0] += 1


def _leave(modules: list[nn.Module], configs: list[Any]) -> None:
    with _SCOPE_LOCK:
        for config in configs:
            switched = _SWITCHED[id(config)]
            switched[0] -= 1
            if switched[0] == 0:
                config._attn_implementation_internal = switched[1]
                del _SWITCHED[id(config)]
        for module in modules:
            _HANDLERS.pop(id(module), None)
