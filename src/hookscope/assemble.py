"""Internal: turn what one forward's hooks captured into its ActivationCache."""

from __future__ import annotations

from typing import Any

import torch

from .cache import ActivationCache, Axes
from .config import ExtractionConfig
from .plan import ExtractionPlan
from .positions import ResolvedPositions
from .vision_points import declare_vision_axes


def assemble_cache(
    sink: dict[str, torch.Tensor],
    output: Any,
    positions: ResolvedPositions,
    row_positions: ResolvedPositions | None,
    config: ExtractionConfig,
    plan: ExtractionPlan,
    input_ids: torch.Tensor,
    pad_token_id: int,
) -> ActivationCache:
    """The cache of one forward: what the hooks wrote to ``sink``, the logits at the target
    positions, ``mapping_index`` / ``position_mask``, running means and pattern merge axes."""
    cache = ActivationCache(sink, pad_token_id=pad_token_id)
    cache.tl_names = plan.tl_names
    if config.save_logits and output is not None:
        logits = positions.select(output.logits)
        logits = logits if config.keep_gradient else logits.detach()
        cache["logits"] = positions.average(logits) if config.extract_avg else logits
    if config.save_input_ids:
        cache["input_ids"] = input_ids
    if config.extract_avg:
        cache["mapping_index"] = positions.averaged_mapping()
        cache["position_mask"] = torch.ones(
            len(positions.mask), len(positions.items), dtype=torch.bool
        )
    else:
        cache["mapping_index"] = dict(positions.mapping_index)
        cache["position_mask"] = positions.mask.clone()
    _add_running_means(cache, sink, plan, row_positions)
    _declare_pattern_axes(cache, config, row_positions)
    declare_vision_axes(cache)
    if row_positions is not None:
        cache["attn_pattern_row_mapping_index"] = dict(row_positions.mapping_index)
    return cache


def _add_running_means(
    cache: ActivationCache,
    sink: dict[str, torch.Tensor],
    plan: ExtractionPlan,
    row_positions: ResolvedPositions | None,
) -> None:
    """Average each running-mean source over the batch (padded cells excluded) and store it
    with its per-cell example count; drop sources captured only for that."""
    slots = cache["position_mask"]  # [batch, P], one slot per item under extract_avg
    rows = row_positions.mask if row_positions is not None else slots
    for mean_key, source_key in plan.running_means:
        value = sink[source_key]
        is_pattern = source_key.startswith("pattern_")
        weight = rows.unsqueeze(2) & slots.unsqueeze(1) if is_pattern else slots
        cache.set_running_mean(mean_key, *_masked_batch_mean(value, weight.to(value.device)))
    for key in plan.temporary:
        del cache[key]


def _masked_batch_mean(
    value: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of ``value [batch, *cells, *rest]`` over the batch where ``weight [batch, *cells]``
    is True -> ``(mean [*cells, *rest], count [*cells])``."""
    count = weight.sum(0)
    trailing = [1] * (value.dim() - weight.dim())
    total = (value * weight.view(*weight.shape, *trailing).to(value.dtype)).sum(0)
    return total / count.clamp(min=1).view(*count.shape, *trailing).to(value.dtype), count


def _declare_pattern_axes(
    cache: ActivationCache, config: ExtractionConfig, row_positions: ResolvedPositions | None
) -> None:
    """Pattern rows follow the target layout unless attn_pattern_row_positions is set; columns
    follow it unless attn_pattern_all_keys keeps every key (then they are right-padded)."""
    slots = (() if row_positions is not None else (1,)) + (
        () if config.attn_pattern_all_keys else (2,)
    )
    axes = Axes(slots=slots, ragged=(2,) if config.attn_pattern_all_keys else ())
    for key in cache:
        if key.startswith("pattern_"):
            cache.set_axes(key, axes)
