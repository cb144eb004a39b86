"""Module hooks as data, and the one place that installs and removes them.

A :class:`ModuleHook` names a module (an ``nn.Module`` or a path string such as
``"model.layers[0].mlp"``), when it fires (``"output"``: after the module's forward, PyTorch's
``register_forward_hook``; ``"input"``: before it, ``register_forward_pre_hook(with_kwargs=True)``)
and the function. :func:`installed` guarantees removal, whatever the forward raises.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .errors import ArchitectureError, HookscopeError

When = Literal["input", "output"]


@dataclass
class ModuleHook:
    """One hook on one module.

    ``fn`` has PyTorch's signatures: ``fn(module, args, output) -> output | None`` when
    ``when="output"``; ``fn(module, args, kwargs) -> (args, kwargs) | None`` when ``when="input"``.
    """

    module: nn.Module | str
    fn: Callable[..., Any]
    when: When = "output"
    #: run before hooks already on the module (interventions: HF's own output-recording hooks,
    #: e.g. the vision tower's hidden_states that Llava reads, must see the edited value)
    first: bool = False
    #: output hooks only: call ``fn(module, args, kwargs, output)`` (PyTorch's ``with_kwargs``)
    with_kwargs: bool = False


#: Converters of other libraries' hook forms (registered by :mod:`hookscope.compat`): each takes
#: any object and returns a :class:`ModuleHook`, or None when the form is not its.
HOOK_CONVERTERS: list[Callable[[Any], ModuleHook | None]] = []


def input_tensor(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    """The hidden-states input of a module call (positional, or the ``hidden_states`` keyword)."""
    tensor = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(tensor, torch.Tensor):
        raise ArchitectureError(
            f"{type(module).__name__} was called without a hidden_states tensor "
            f"(positional args: {len(args)}, keyword args: {sorted(kwargs)})."
        )
    return tensor


def output_tensor(output: Any) -> torch.Tensor:
    """The main tensor of a module output: decoder layers return a tensor or a tuple."""
    return output[0] if isinstance(output, tuple | list) else output


def reading_hook(
    module: nn.Module | str, when: When, fn: Callable[[torch.Tensor], None]
) -> ModuleHook:
    """A hook that passes the module's hidden-states input (``"input"``) or main output
    (``"output"``) to ``fn`` and changes nothing."""
    if when == "input":
        return ModuleHook(
            module, lambda mod, args, kwargs: fn(input_tensor(mod, args, kwargs)), "input"
        )
    return ModuleHook(module, lambda mod, args, output: fn(output_tensor(output)), "output")


def replacing_hook(
    module: nn.Module | str, when: When, fn: Callable[[nn.Module, torch.Tensor], torch.Tensor]
) -> ModuleHook:
    """A hook that replaces the module's hidden-states input or main output by
    ``fn(module, tensor)``, keeping the rest of the call (other arguments, tuple outputs) as is."""
    if when == "input":

        def pre(mod, args, kwargs):
            new = fn(mod, input_tensor(mod, args, kwargs))
            return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})

        return ModuleHook(module, pre, "input")

    def post(mod, args, output):
        new = fn(mod, output_tensor(output))
        return (new, *output[1:]) if isinstance(output, tuple) else new

    return ModuleHook(module, post, "output")


def get_module(model: nn.Module, path: str) -> nn.Module:
    """The submodule at ``path``: ``"model.layers[0].self_attn"`` or ``"model.layers.0.self_attn"``.

    Raises:
        ArchitectureError: naming the path and the closest real module paths.
    """
    dotted = re.sub(r"\[(\d+)\]", r".\1", path.strip()).strip(".")
    if dotted == "":
        return model
    try:
        return model.get_submodule(dotted)
    except AttributeError:
        names = [name for name, _ in model.named_modules() if name]
        close = difflib.get_close_matches(dotted, names, n=5, cutoff=0.5)
        raise ArchitectureError(
            f"no module at {path!r} in {type(model).__name__}. Closest paths: {close or names[:5]}."
        ) from None


def as_module_hook(hook: Any) -> ModuleHook:
    """Accept a :class:`ModuleHook`, or a form a registered converter knows (the reference
    design's ``{"component", "intervention"}`` dicts, see :mod:`hookscope.compat`).

    Raises:
        HookscopeError: for anything else.
    """
    if isinstance(hook, ModuleHook):
        return hook
    for converter in HOOK_CONVERTERS:
        if (converted := converter(hook)) is not None:
            return converted
    raise HookscopeError(
        f"a hook must be a hookscope.ModuleHook or a dict with 'component' and 'intervention', "
        f"got {hook!r}."
    )


def register(model: nn.Module, hook: ModuleHook) -> RemovableHandle:
    """Register one hook on ``model`` (resolving a path string) and return its handle."""
    module = get_module(model, hook.module) if isinstance(hook.module, str) else hook.module
    if hook.when == "input":
        return module.register_forward_pre_hook(hook.fn, with_kwargs=True, prepend=hook.first)
    if hook.when == "output":
        return module.register_forward_hook(
            hook.fn, prepend=hook.first, with_kwargs=hook.with_kwargs
        )
    raise HookscopeError(f"hook 'when' must be 'input' or 'output', got {hook.when!r}.")


@contextmanager
def installed(model: nn.Module, hooks: Sequence[ModuleHook]) -> Iterator[list[RemovableHandle]]:
    """Register ``hooks`` for the duration of the block; remove every one of them on exit.
    Hooks marked ``first`` run before all others, in their given order."""
    handles: list[RemovableHandle] = []
    ordered = [h for h in reversed(hooks) if h.first] + [h for h in hooks if not h.first]
    try:
        for hook in ordered:
            handles.append(register(model, hook))
        yield handles
    finally:
        for handle in handles:
            handle.remove()
