"""easyroutine's ``LogitLens.from_model(hm).compute(...)`` over :func:`hookscope.lens.lens_logits`.

One deliberate difference: each residual is normalised with its own statistics (the final norm
module applied to it, as :mod:`hookscope.lens` does), not with the last layer's cached
statistics, so no ``last_layernorm`` entry is needed in the cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..cache import ActivationCache
from ..errors import HookscopeError
from ..lens import lens_logits


class LogitLens:
    """Read cached residuals through the model's final norm and unembedding."""

    def __init__(self, hm: Any):
        self.hm = hm

    @classmethod
    def from_model(cls, hm: Any) -> LogitLens:
        """The lens of a :class:`~hookscope.HookedModel`."""
        return cls(hm)

    def __repr__(self) -> str:
        return f"LogitLens({self.hm.model_name})"

    def get_keys(self, activations: ActivationCache, key_pattern: str) -> list[str]:
        """The cache keys ``key_pattern`` names: itself, or ``"resid_out_{i}"`` filled with every
        layer present in the cache.

        Raises:
            HookscopeError: when the cache holds none of them, listing its keys.
        """
        if "{" not in key_pattern:
            keys = [key_pattern] if key_pattern in activations else []
        else:
            keys = [
                key_pattern.format(i=layer, layer=layer)
                for layer in range(self.hm.model_map.n_layers)
                if key_pattern.format(i=layer, layer=layer) in activations
            ]
        if not keys:
            raise HookscopeError(
                f"LogitLens: no cache key matches {key_pattern!r}; keys: {list(activations)}."
            )
        return keys

    def compute(
        self,
        activations: ActivationCache,
        target_key: str,
        token_directions: Sequence[Any] | None = None,
        apply_norm: bool = True,
        apply_softmax: bool = False,
        metric: str | None = "logit_diff",
    ) -> dict[str, torch.Tensor]:
        """``{"logit_lens_{key}": ...}`` for each key ``target_key`` names (see :meth:`get_keys`).

        Without ``token_directions``: the logits ``[batch, P, vocab]`` (probabilities with
        ``apply_softmax``). With them (one per example: a token id, or a pair ``(a, b)``):
        ``metric="logit_diff"`` gives ``[batch, P]`` logit(a) - logit(b) (or logit(a));
        ``metric="accuracy"`` the fraction of examples whose last position has logit(a) >
        logit(b). ``apply_norm=False`` skips the final norm (the raw residual unembedded).

        Raises:
            HookscopeError: for directions that do not match the batch, or an unknown metric.
        """
        if metric not in ("logit_diff", "accuracy", None):
            raise HookscopeError(
                f"LogitLens metric must be 'logit_diff' or 'accuracy', got {metric!r}."
            )
        result = {}
        for key in self.get_keys(activations, target_key):
            logits = self._logits(activations[key], apply_norm)
            if token_directions is None:
                result[f"logit_lens_{key}"] = logits.softmax(-1) if apply_softmax else logits
            else:
                result[f"logit_lens_{key}"] = _directions(logits, token_directions, metric)
        return result

    def _logits(self, residual: torch.Tensor, apply_norm: bool) -> torch.Tensor:
        """``residual [batch, P, d_model]`` -> float logits ``[batch, P, vocab]``."""
        if apply_norm:
            return lens_logits(self.hm, residual).float()
        unembed = self.hm.hf_model.get_output_embeddings()
        with torch.no_grad():
            return unembed(residual.to(unembed.weight.device)).float()


def _directions(
    logits: torch.Tensor, directions: Sequence[Any], metric: str | None
) -> torch.Tensor:
    """Per example, logit(a) - logit(b) (or logit(a)) ``[batch, P]``, or the accuracy."""
    if len(directions) != logits.shape[0]:
        raise HookscopeError(
            f"LogitLens: {len(directions)} token_directions for a batch of {logits.shape[0]}."
        )
    rows = []
    for row, direction in zip(logits, directions, strict=True):
        pair = list(direction) if isinstance(direction, list | tuple) else [direction]
        rows.append(row[:, pair[0]] - (row[:, pair[1]] if len(pair) == 2 else 0))
    diffs = torch.stack(rows)
    if metric == "accuracy":
        return (diffs[:, -1] > 0).float().mean()
    return diffs
