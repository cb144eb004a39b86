"""Internal: patching sweeps that skip what the patch cannot change.

A patch at layer ``l``, position ``p`` leaves every layer below ``l`` and every position
before ``p`` exactly as in the corrupt run. So a sweep row whose patch sits there

* feeds only the positions from ``p`` on, with the corrupt run's keys and values of the
  positions before ``p`` as a KV cache (the attention of the fed positions is the same
  computation as in the full forward), and
* does not run the decoder layers below its first changed layer: their output is *replayed*
  from the corrupt run (the layer's forward is not called; the output keeps the format of the
  real layer's output).

Both are generic: the model's own forward runs (embeddings, position ids, masks, final norm,
unembedding), with a config-less ``DynamicCache`` (full layers, so sliding-window layers keep
every key and mask by position) and each decoder layer's ``forward`` wrapped for the call. Rows
of one forward are sorted by their first changed layer, so the rows a layer must compute are a
prefix of the batch: the layer runs on that prefix (every batch-sized tensor argument sliced)
and the replayed rows are appended after it.

Where a feature rules this out (registered interventions or persistent hooks, a vision-language
model, no KV cache argument, flex attention, a cache that is not plain per-layer keys/values),
:func:`reuse_blocker` names it and the sweep runs the full batched path instead.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .config import ExtractionConfig
from .errors import HookscopeError
from .hooks import ModuleHook, installed, output_tensor
from .inputs import model_input_names
from .pipeline import Executor, _eager_if_compiled, plan_call


@dataclass
class CorruptRun:
    """What the corrupt run computed, for replay.

    Attributes:
        layer_outputs: per decoder layer, its main output ``[N, T, d_model]``.
        output_rest: per layer, the other items of a tuple output (all None), or None when the
            layer returns a bare tensor.
        keys, values: per layer, the cached ``[N, kv_heads, T, d_head]`` keys and values.
        cache_arg: the model's keyword for the KV cache (``cache`` or ``past_key_values``).
    """

    layer_outputs: list[torch.Tensor]
    output_rest: list[tuple | None]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    cache_arg: str


@dataclass
class SweepRow:
    """One row of a sweep forward: an example, the first layer whose output the patch can
    change, and the first position it can change (absolute, in the padded sequence)."""

    example: int
    first_layer: int
    start: int


def _cache_arg(hf_model: nn.Module) -> str | None:
    names = model_input_names(hf_model)
    return next((n for n in ("cache", "past_key_values") if n in names), None)


def _foreign_hook_site(hf_model: nn.Module) -> str | None:
    """The first module holding a torch forward (pre-)hook that hookscope did not install for
    this call (none are installed when a sweep decides its path), or None."""
    from torch.nn.modules import module as torch_module

    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return "every module (a global hook)"
    for name, module in hf_model.named_modules():
        hooks = [*module._forward_hooks.values(), *module._forward_pre_hooks.values()]
        if any(not _records_outputs_only(hook) for hook in hooks):
            return name or type(hf_model).__name__
    return None


def _records_outputs_only(hook: Any) -> bool:
    """transformers 5 leaves output-capturing hooks on the layers after any call with
    ``output_hidden_states`` / ``output_attentions``; they record only while such a call runs
    (never during a sweep), so a replayed layer running them changes nothing."""
    return getattr(hook, "__module__", "") == "transformers.utils.output_capturing"


def reuse_blocker(hm: Any) -> str | None:
    """Why this model cannot skip unchanged work in a sweep, or None when it can."""
    if hm.registered_interventions:
        return "the model has registered interventions (they would run in replayed layers)"
    if hm.persistent_hooks:
        return "the model has persistent hooks (they would miss replayed layers)"
    foreign = _foreign_hook_site(hm.hf_model)
    if foreign is not None:
        return (
            f"the model has forward hooks registered outside hookscope (on {foreign}); a "
            "replayed layer would run them again"
        )
    if hm.vision_map is not None:
        return "vision-language models are swept on the full path"
    if _cache_arg(hm.hf_model) is None:
        return f"{type(hm.hf_model).__name__}.forward takes no KV cache argument"
    implementation = getattr(hm.hf_model.config, "_attn_implementation", None)
    if implementation not in (None, "eager", "sdpa"):
        return f"attention implementation {implementation!r} (only eager and sdpa are replayed)"
    if "logits_to_keep" not in model_input_names(hm.hf_model):
        return f"{type(hm.hf_model).__name__}.forward takes no logits_to_keep"
    return None


def record_corrupt_run(hm: Any, corrupt: dict) -> CorruptRun | str:
    """One forward of the corrupt batch with a KV cache, keeping every layer's output.

    Returns:
        The :class:`CorruptRun`, or a string saying why the run cannot be replayed.
    """
    from transformers import DynamicCache

    cache_arg = _cache_arg(hm.hf_model)
    layers = hm.model_map.layers
    outputs: list[Any] = [None] * len(layers)

    def keep(index: int):
        return ModuleHook(
            layers[index].block, lambda mod, args, out: outputs.__setitem__(index, out)
        )

    kwargs = {"use_cache": True, cache_arg: DynamicCache()}  # config-less: full layers
    plan = plan_call(
        hm,
        corrupt,
        None,
        ExtractionConfig(),
        hooks=[keep(i) for i in range(len(layers))],
        model_kwargs=kwargs,
    )
    result = Executor.of(hm.hf_model).run(plan)
    cache = getattr(result, cache_arg, None)
    if cache is None:
        cache = getattr(result, "past_key_values", None)
    return _as_corrupt_run(outputs, cache, corrupt["input_ids"].shape, cache_arg)


def _as_corrupt_run(
    outputs: list[Any], cache: Any, shape: torch.Size, cache_arg: str
) -> CorruptRun | str:
    """Check what the corrupt run left (a layer output per layer, keys and values of every
    position per layer) and keep it."""
    cache_layers = getattr(cache, "layers", None)
    if cache_layers is None or len(cache_layers) < len(outputs):
        return f"the model returned no per-layer KV cache ({type(cache).__name__})"
    rests: list[tuple | None] = []
    for index, out in enumerate(outputs):
        if out is None:
            return f"decoder layer {index} did not run in the corrupt forward"
        rest = tuple(out[1:]) if isinstance(out, tuple) else None
        if rest is not None and any(item is not None for item in rest):
            return f"decoder layer {index} returns more than hidden states ({len(out)} items)"
        rests.append(rest)
    keys = [layer.keys for layer in cache_layers[: len(outputs)]]
    values = [layer.values for layer in cache_layers[: len(outputs)]]
    if any(k is None or k.dim() != 4 or k.shape[-2] != shape[1] for k in keys):
        return "the KV cache does not hold every position of every layer"
    main = [output_tensor(out).detach() for out in outputs]
    return CorruptRun(main, rests, keys, values, cache_arg)


def _take_rows(value: Any, batch: int, rows: int) -> Any:
    """``value`` with every batch-sized tensor (2 or more dims, first dim ``batch``) cut to its
    first ``rows`` rows, inside tuples, lists and dicts; anything else unchanged."""
    if isinstance(value, torch.Tensor):
        return value[:rows] if value.dim() >= 2 and value.shape[0] == batch else value
    if isinstance(value, tuple | list):
        return type(value)(_take_rows(v, batch, rows) for v in value)
    if isinstance(value, dict):
        return {k: _take_rows(v, batch, rows) for k, v in value.items()}
    return value


def _replaying_forward(forward, active: int, replay: torch.Tensor, rest: tuple | None):
    """A decoder layer ``forward`` that runs the first ``active`` rows for real and appends
    ``replay`` ``[batch - active, q, d]`` (the corrupt run's output) for the others."""

    def run(*args: Any, **kwargs: Any) -> Any:
        if active == 0:
            return replay if rest is None else (replay, *rest)
        batch = active + len(replay)
        out = forward(*_take_rows(args, batch, active), **_take_rows(kwargs, batch, active))
        main = output_tensor(out)
        joined = torch.cat([main, replay.to(main.dtype)], 0)
        return (joined, *out[1:]) if isinstance(out, tuple) else joined

    return run


@contextmanager
def replaying_layers(
    hm: Any, run: CorruptRun, rows: Sequence[SweepRow], start: int
) -> Iterator[None]:
    """Wrap each decoder layer's ``forward`` for one sweep forward: layer ``k`` computes the
    rows whose ``first_layer <= k`` (a prefix: ``rows`` are sorted by it) and replays the
    others; a layer no row computes is not run at all. Restored on exit."""
    blocks = [parts.block for parts in hm.model_map.layers]
    examples = torch.tensor([row.example for row in rows])
    firsts = [row.first_layer for row in rows]
    saved = [block.__dict__.get("forward") for block in blocks]
    try:
        for index, block in enumerate(blocks):
            active = sum(1 for f in firsts if f <= index)
            if active == len(rows):
                continue
            output = run.layer_outputs[index]
            replay = output[examples[active:].to(output.device), start:]
            block.forward = _replaying_forward(
                block.forward, active, replay, run.output_rest[index]
            )
        yield
    finally:
        for block, own in zip(blocks, saved, strict=True):
            if own is None:
                block.__dict__.pop("forward", None)
            else:
                block.forward = own


def prefix_cache(run: CorruptRun, rows: Sequence[SweepRow], start: int) -> Any:
    """A ``DynamicCache`` holding, per layer, the corrupt keys and values of the positions
    before ``start`` for the rows that layer computes (at least one row, so every layer
    reports ``start`` cached positions)."""
    from transformers import DynamicCache

    examples = torch.tensor([row.example for row in rows])
    data = []
    for index, (keys, values) in enumerate(zip(run.keys, run.values, strict=True)):
        active = max(1, sum(1 for row in rows if row.first_layer <= index))
        chosen = examples[:active].to(keys.device)
        data.append((keys[chosen, :, :start], values[chosen, :, :start]))
    return DynamicCache(ddp_cache_data=data)


def run_rows(
    hm: Any,
    corrupt: dict,
    run: CorruptRun,
    rows: Sequence[SweepRow],
    hooks: Sequence[ModuleHook],
    last: torch.Tensor,
) -> torch.Tensor:
    """One sweep forward of ``rows`` (sorted by ``first_layer``) on the corrupt inputs, from
    their earliest ``start`` on, with ``hooks`` (patch writes, in window coordinates) installed.

    Args:
        last: ``[rows]`` each row's last real token (absolute), where the logits are read.

    Returns:
        ``[rows, vocab]`` logits at each row's last real token.
    """
    firsts = [row.first_layer for row in rows]
    if firsts != sorted(firsts):
        raise HookscopeError(f"sweep rows must be sorted by first_layer, got {firsts}.")
    start = min(row.start for row in rows)
    examples = torch.tensor([row.example for row in rows])
    inputs = {}
    for key, value in corrupt.items():
        if isinstance(value, torch.Tensor) and value.shape[0] == corrupt["input_ids"].shape[0]:
            value = value[examples.to(value.device)]
            if key != "attention_mask" and value.dim() >= 2:
                value = value[:, start:]
        inputs[key] = value
    inputs["use_cache"] = start > 0
    if start > 0:
        inputs[run.cache_arg] = prefix_cache(run, rows, start)
    keep = (last - start).view(-1, 1)
    inputs["logits_to_keep"] = keep.to(corrupt["input_ids"].device)
    hf_model = hm.hf_model
    with (
        Executor.of(hf_model).exclusive(),
        torch.no_grad(),
        _eager_if_compiled(hf_model),
        replaying_layers(hm, run, rows, start),
        installed(hf_model, hooks),
    ):
        logits = hf_model(**inputs).logits
    if logits.shape[:2] != (len(rows), 1):
        raise HookscopeError(
            f"{type(hf_model).__name__} returned logits of shape {list(logits.shape)} for "
            "logits_to_keep [rows, 1]; run the sweep with skip_unchanged=False."
        )
    return logits[:, 0]
