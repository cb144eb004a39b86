"""Generation with interventions and extraction active, with or without the KV cache.

A hook on the model's own forward tells every intervention hook which positions the current call
covers (:class:`~hookscope.editing.CallWindow`): the prompt call, then one new token per step
under the KV cache (or the whole sequence again without it). So each intervention is applied
exactly once per token on the cache path, and the no-cache path computes the same thing.

Extraction during generation: the prompt call gives the target positions; every later call gives
one slot for the token it feeds back (the token generated at the previous step; the very last
generated token is never run through the model). Keys keep their names; the slots of generated
tokens are listed under ``mapping_index["generated"]``.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from .cache import ActivationCache
from .config import ExtractionConfig
from .hooks import ModuleHook
from .keywords import check_model_kwargs, own_keywords
from .pipeline import plan_call
from .window import CallWindow


def generate(
    hm: Any,
    inputs: Any,
    generation_config: Any = None,
    target_token_positions: Any = None,
    return_text: bool = False,
    interventions: list | None = None,
    extraction_config: ExtractionConfig | None = None,
    pivot_positions: Any = None,
    seed: int = 0,
    **generate_kwargs: Any,
) -> torch.Tensor | list[str] | ActivationCache:
    """See :meth:`hookscope.HookedModel.generate`."""
    _check_generate_kwargs(hm, generate_kwargs)
    config = extraction_config or ExtractionConfig(save_logits=False)
    plan = plan_call(
        hm,
        inputs,
        target_token_positions,
        config,
        interventions=interventions,
        pivot_positions=pivot_positions,
        seed=seed,
        generation=True,
    )
    records: list[dict[str, torch.Tensor]] = []
    plan.hooks.insert(0, _window_tracker(hm.hf_model, plan.window))
    if plan.extraction.captures_modules():
        plan.hooks.append(_step_collector(hm.hf_model, plan.sink, records))
    tokenizer = hm.get_text_tokenizer()
    if tokenizer is not None and "pad_token_id" not in generate_kwargs:
        generate_kwargs["pad_token_id"] = tokenizer.pad_token_id
    if plan.extraction.captures_modules() or config.save_logits:
        generate_kwargs.update(return_dict_in_generate=True, output_logits=config.save_logits)

    def call(model, model_inputs):
        return model.generate(
            **model_inputs, generation_config=generation_config, **generate_kwargs
        )

    output = hm.executor.run(plan, call)
    sequences = output if isinstance(output, torch.Tensor) else output.sequences
    new_text = None
    if return_text:
        prompt_length = plan.window.prompt_length
        new_text = tokenizer.batch_decode(sequences[:, prompt_length:], skip_special_tokens=True)
    if extraction_config is None:
        return new_text if return_text else sequences
    targets = plan.targets if plan.extraction.captures_modules() else None
    return _generation_cache(hm, records, targets, sequences, output, new_text)


def _check_generate_kwargs(hm: Any, generate_kwargs: dict[str, Any]) -> None:
    """Extra keywords must be generation options or inputs the model's forward names."""
    if generate_kwargs:
        options = _generation_options(type(hm.hf_model))
        check_model_kwargs(generate_kwargs, hm.hf_model, type(hm).generate, extra_valid=options)


@functools.cache
def _generation_options(model_class: type) -> frozenset[str]:
    """Keywords HF ``generate`` takes: ``GenerationConfig`` fields and its own parameters."""
    from transformers import GenerationConfig

    return frozenset(GenerationConfig().to_dict()) | own_keywords(model_class.generate)


def _window_tracker(model: torch.nn.Module, window: CallWindow) -> ModuleHook:
    """A pre-hook on the model's own forward that moves ``window`` to each step's positions."""

    def track_call(module, args, kwargs):
        step_ids = kwargs.get("input_ids", args[0] if args else None)
        step_mask = kwargs.get("attention_mask")
        kv_len = (
            step_mask.shape[1]
            if step_mask is not None
            else window.offset + window.length + step_ids.shape[1]
        )
        window.enter_call(step_ids.shape[1], kv_len)

    return ModuleHook(model, track_call, "input")


def _step_collector(
    model: torch.nn.Module, sink: dict[str, torch.Tensor], records: list
) -> ModuleHook:
    """A hook after the model's forward that moves each step's captures into ``records``."""

    def collect(module, args, output):
        records.append(dict(sink))
        sink.clear()

    return ModuleHook(model, collect, "output")


def _generation_cache(hm, records, targets, sequences, output, new_text) -> ActivationCache:
    cache = ActivationCache(pad_token_id=hm.pad_token_id)
    cache["sequences"] = sequences
    if new_text is not None:
        cache["text"] = new_text
    if getattr(output, "logits", None):
        cache["generated_logits"] = torch.stack(output.logits, dim=1)  # [batch, new tokens, vocab]
    if records:
        for key in records[0]:
            cache[key] = torch.cat([record[key] for record in records], dim=1)
        width = targets.index.shape[1]
        mapping = dict(targets.mapping_index)
        mapping["generated"] = list(range(width, width + len(records) - 1))
        cache["mapping_index"] = mapping
        generated = torch.ones(targets.mask.shape[0], len(records) - 1, dtype=torch.bool)
        cache["position_mask"] = torch.cat([targets.mask, generated], dim=1)
    return cache
