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

from typing import Any

import torch

from .cache import ActivationCache
from .capture import capture_hooks, plan_capture
from .config import ExtractionConfig
from .editing import CallWindow, prepare
from .errors import HookscopeError, PositionError
from .hooks import ModuleHook, installed
from .plan import plan_extraction
from .positions import ResolvedPositions


class _StepPositions:
    """Positions that follow the generation step: the targets in the prompt call, the newest
    position in every later call."""

    def __init__(self, targets: ResolvedPositions, window: CallWindow):
        self.targets, self.window = targets, window
        self._step: tuple[int, ResolvedPositions] | None = None

    def _current(self, batch: int) -> ResolvedPositions:
        if self.window.step == 0:
            return self.targets
        if self._step is None or self._step[0] != self.window.step:  # built once per step
            index = torch.full((batch, 1), self.window.length - 1)
            newest = ResolvedPositions(
                index,
                torch.ones_like(index, dtype=torch.bool),
                {"generated": [0]},
                ["generated"],
                [1],
            )
            self._step = (self.window.step, newest)
        return self._step[1]

    def select(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._current(hidden.shape[0]).select(hidden)

    def average(self, selected: torch.Tensor) -> torch.Tensor:
        return self._current(selected.shape[0]).average(selected)


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
    tokenizer = hm.get_text_tokenizer()
    model_inputs = hm.prepare_inputs(inputs)
    model_inputs.pop("position_ids", None)  # generate derives them from the mask itself
    context = hm._position_context(model_inputs, pivot_positions, seed)
    mask = context.attention_mask
    window = CallWindow(prompt_length=mask.shape[1])
    intervention_hooks, pattern_edits = prepare(
        [*hm._registered_interventions, *(interventions or [])],
        hm.model_map,
        context,
        window,
        hm.vision_map,
    )
    if pattern_edits:
        raise HookscopeError(
            "PatternEdit is not supported in generate yet; run forward on the prompt to study its effect."
        )

    def track_call(module, args, kwargs):
        step_ids = kwargs.get("input_ids", args[0] if args else None)
        step_mask = kwargs.get("attention_mask")
        kv_len = (
            step_mask.shape[1]
            if step_mask is not None
            else window.offset + window.length + step_ids.shape[1]
        )
        window.enter_call(step_ids.shape[1], kv_len)

    hooks = [ModuleHook(hm.hf_model, track_call, "input"), *intervention_hooks]
    records: list[dict[str, torch.Tensor]] = []
    sink: dict[str, torch.Tensor] = {}
    config = extraction_config or ExtractionConfig(save_logits=False)
    plan = plan_extraction(config, hm.model_map)
    if config.extract_avg:
        raise HookscopeError(
            "extract_avg is not supported in generate; average the returned slots."
        )
    if plan.attention:
        raise HookscopeError(
            "attention patterns and per-head q/k/v are not extracted during generate; run forward "
            "on the generated sequences instead."
        )
    if plan.points:
        if target_token_positions is None:
            raise PositionError(
                "target_token_positions is required when activations are requested."
            )
        targets = context.resolve(target_token_positions)
        hooks += capture_hooks(
            plan_capture(plan.points, hm.model_map),
            _StepPositions(targets, window),
            sink,
            average=False,
            keep_gradient=False,
        )

        def collect(module, args, output):
            records.append(dict(sink))
            sink.clear()

        hooks.append(ModuleHook(hm.hf_model, collect, "output"))

    if tokenizer is not None and "pad_token_id" not in generate_kwargs:
        generate_kwargs["pad_token_id"] = tokenizer.pad_token_id
    if plan.points or config.save_logits:
        generate_kwargs.update(return_dict_in_generate=True, output_logits=config.save_logits)
    with hm._exclusive(), torch.no_grad(), installed(hm.hf_model, hooks):
        output = hm.hf_model.generate(
            **model_inputs, generation_config=generation_config, **generate_kwargs
        )
    sequences = output if isinstance(output, torch.Tensor) else output.sequences
    new_text = None
    if return_text:
        new_text = tokenizer.batch_decode(sequences[:, mask.shape[1] :], skip_special_tokens=True)
    if extraction_config is None:
        return new_text if return_text else sequences
    return _generation_cache(
        hm, records, targets if plan.points else None, sequences, output, new_text
    )


def _generation_cache(hm, records, targets, sequences, output, new_text) -> ActivationCache:
    cache = ActivationCache(pad_token_id=hm._pad_token_id())
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
