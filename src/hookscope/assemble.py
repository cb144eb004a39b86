"""Internal: turn what one forward's hooks captured into its ActivationCache."""

from __future__ import annotations

from typing import Any

import torch

from .cache import ActivationCache, Axes
from .config import ExtractionConfig
from .errors import HookscopeError
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
    attention_mask: torch.Tensor | None = None,
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
    if config.attn_pattern_avg != "none":
        rows = row_positions if row_positions is not None else positions
        for key in [k for k in cache if k.startswith("pattern_")]:
            cache[key] = pattern_blocks(
                cache[key], rows, positions, config.attn_pattern_avg, attention_mask
            )
            cache.set_axes(key, Axes(slots=()))
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


def pattern_blocks(
    pattern: torch.Tensor,
    rows: ResolvedPositions,
    columns: ResolvedPositions,
    method: str,
    attention_mask: torch.Tensor | None,
) -> torch.Tensor:
    """``pattern [batch, row slots, column slots]`` -> ``[batch, row items, column items]``:
    the mean / sum / baseline ratio of each block of real (not padded) cells."""
    out = torch.empty(len(pattern), len(rows.items), len(columns.items), dtype=torch.float32)
    row_mask, col_mask = rows.mask.cpu(), columns.mask.cpu()
    values = pattern.detach().float().cpu()
    for i, row_item in enumerate(rows.items):
        r = rows.mapping_index[row_item]
        for j, col_item in enumerate(columns.items):
            c = columns.mapping_index[col_item]
            weight = row_mask[:, r, None] & col_mask[:, None, c]  # [batch, |r|, |c|]
            total = (values[:, r][:, :, c] * weight).sum((1, 2))
            mean = total / weight.sum((1, 2)).clamp(min=1)
            if method == "sum":
                out[:, i, j] = total
            elif method == "mean":
                out[:, i, j] = mean
            else:
                out[:, i, j] = mean / _uniform_share(rows, r, columns, c, attention_mask)
    return out.to(pattern.dtype)


def _uniform_share(
    rows: ResolvedPositions,
    r: list[int],
    columns: ResolvedPositions,
    c: list[int],
    attention_mask: torch.Tensor | None,
) -> torch.Tensor:
    """``[batch]``: the mean over the block's real rows of (its real keys at or before the row)
    / (all real keys at or before the row): the block's mean under uniform causal attention.
    0 (so the ratio is inf or NaN) when no key of the block is visible to its rows."""
    if attention_mask is None:
        raise HookscopeError("attn_pattern_avg='baseline_ratio' needs the batch's attention mask.")
    seen = attention_mask.detach().cpu().long().cumsum(1)  # real keys at or before each index
    row_index, col_index = rows.index.cpu()[:, r], columns.index.cpu()[:, c]
    row_ok, col_ok = rows.mask.cpu()[:, r], columns.mask.cpu()[:, c]
    visible = ((col_index[:, None, :] <= row_index[:, :, None]) & col_ok[:, None, :]).sum(2)
    share = visible / seen.gather(1, row_index).clamp(min=1)  # [batch, |r|]
    return (share * row_ok).sum(1) / row_ok.sum(1).clamp(min=1)


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
