"""Steering vectors from contrasting prompt sets (a difference of masked means)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .config import ExtractionConfig
from .errors import HookscopeError


def steering_vector(
    hm: Any,
    positive_prompts: Sequence[str],
    negative_prompts: Sequence[str],
    point: str = "resid_out_6",
    positions: Sequence[Any] = ("all",),
    batch_size: int = 8,
) -> torch.Tensor:
    """The mean activation of ``point`` over ``positive_prompts`` minus the same over
    ``negative_prompts``: a vector to pass as ``Steer(vector=...)``.

    Each mean is taken over every real token slot (``position_mask`` True) that ``positions``
    selects in every prompt of the set (pooled over tokens, padding excluded), in batches of
    ``batch_size`` padded prompts through ``hm.forward``.

    Returns:
        ``[*rest]`` (``[d_model]`` for residual points), float32 on the CPU.

    Raises:
        HookscopeError: for an empty prompt set or a batch_size below 1;
            ActivationPointError for a point that is no activation point.
    """
    if isinstance(positive_prompts, str) or isinstance(negative_prompts, str):
        raise HookscopeError(
            "steering_vector needs lists of prompts for positive_prompts and negative_prompts, "
            "not a single string."
        )
    if not isinstance(batch_size, int) or batch_size < 1:
        raise HookscopeError(f"steering_vector batch_size must be an int >= 1, got {batch_size!r}.")
    positive = _masked_mean(hm, positive_prompts, point, list(positions), batch_size, "positive")
    negative = _masked_mean(hm, negative_prompts, point, list(positions), batch_size, "negative")
    return positive - negative


def _masked_mean(hm, prompts, point, positions, batch_size, which) -> torch.Tensor:
    """Mean of ``point`` over the real slots of ``positions`` in all ``prompts``: ``[*rest]``."""
    if len(prompts) == 0:
        raise HookscopeError(f"steering_vector got no {which} prompts; give at least one.")
    config = ExtractionConfig.from_names([point], hm.model_map, save_logits=False)
    total, count = None, 0
    for start in range(0, len(prompts), batch_size):
        batch = list(prompts[start : start + batch_size])
        cache = hm.forward(batch, positions, extraction_config=config, move_to_cpu=True)
        values = cache[point].float()  # [batch, P, *rest]
        mask = cache["position_mask"].to(values.device)  # [batch, P]
        selected = values[mask]  # [real slots, *rest]
        part = selected.sum(dim=0)
        total = part if total is None else total + part
        count += selected.shape[0]
    if count == 0:
        raise HookscopeError(
            f"steering_vector: positions {positions!r} select no real token in the {which} prompts."
        )
    return total / count
