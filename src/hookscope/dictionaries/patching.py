"""Patching and attribution over a dictionary's features.

**Feature patching** (:func:`feature_patching`) patches one feature at one position slot from the
clean run into the corrupt run, for every (feature, slot) pair of a grid, and reads the metric
at each example's last real token (as :func:`hookscope.patching.activation_patching`: clean and
corrupt align token by token; ``normalize`` maps corrupt to 0 and clean to 1). A patch follows
the feature-intervention rule (:class:`~hookscope.dictionaries.FeaturePatch`): the corrupt value
keeps everything but the feature's own contribution,
``x' = x + (f_clean_i - f_corrupt_i) * W_dec[i] / input_scale``. Nothing upstream of the point
changes, so that shift is known from the two baseline runs, and the sweep is batched: each row of
a forward carries one (example, feature, slot) site as a one-slot additive edit, and a grid costs
``ceil(examples x features x slots / batch_size)`` forwards.

**Feature attribution** (:func:`feature_attribution`) is the gradient estimate of the same, from
one forward and one backward: at the dictionary's point the features are put into the graph,
``x = decode(f) + error`` with ``f = encode(x)`` a leaf and ``error = x - decode(f)`` detached
(so the forward is the model's own, up to float rounding), and the score of feature ``i`` at a
slot is

- ``f_i * dmetric/df_i`` (gradient x activation: the linear estimate of the metric lost when the
  feature is removed), or, given ``clean=`` inputs,
- ``(f_clean_i - f_i) * dmetric/df_i`` at the corrupt run (attribution patching: the linear
  estimate of :func:`feature_patching`'s unnormalised effect).

``dmetric/df_i = dmetric/dx . W_dec[i] / input_scale``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..config import ExtractionConfig
from ..editing import write_slots
from ..errors import HookscopeError, PositionError
from ..interventions import Custom, Steer
from ..patching import PatchingResult, _answer_ids, _baselines, _metric, _pair, _result
from .core import Dictionary
from .interventions import _feature_index

MetricFn = Callable[[torch.Tensor], torch.Tensor]


# -- shared ------------------------------------------------------------------------------------
def _sae_point(dictionary: Any, where: str) -> str:
    """The point an SAE reads and writes; transcoders and non-dictionaries are refused."""
    if not isinstance(dictionary, Dictionary):
        raise HookscopeError(
            f"{where} needs a hookscope Dictionary, got {type(dictionary).__name__}."
        )
    if dictionary.is_transcoder:
        raise HookscopeError(
            f"{where}: dictionary {dictionary.name!r} is a transcoder (reads {dictionary.reads}, "
            f"writes {dictionary.writes}); only SAEs (reads == writes) are supported here."
        )
    return dictionary.writes


def _position_items(positions: Any, default: str) -> list:
    """Position items as a list: one item (a name, an index, a ``(start, end)`` slice) is
    wrapped, as interventions do."""
    if positions is None:
        return [default]
    if isinstance(positions, str | int | tuple):
        return [positions]
    return list(positions)


def _real_slots(hm: Any, inputs: dict, positions: Sequence[Any]) -> Any:
    """``positions`` resolved on ``inputs``; every slot must be a real token of every example
    (a grid column is one slot across examples)."""
    resolved = hm.position_context(inputs).resolve(list(positions))
    missing = (~resolved.mask).nonzero()
    if len(missing):
        example, slot = missing[0].tolist()
        raise PositionError(
            f"positions={list(positions)!r} give example {example} no token at slot {slot} "
            f"(they select {int(resolved.mask[example].sum())} of {resolved.mask.shape[1]} "
            "slots there): a feature grid needs the same number of tokens in every example; "
            "give items every example has (e.g. 'last', -2, a text anchor)."
        )
    return resolved


def _features_at(hm: Any, inputs: dict, positions: Sequence[Any], dictionary: Dictionary):
    """``(x, f)`` at the point: ``x [N, P, d]`` and its features ``[N, P, d_sae]`` (float)."""
    point = dictionary.writes
    x = hm.forward(inputs, list(positions), names=[point])[point]
    return x, dictionary.on(x.device).encode(x)


# -- feature patching --------------------------------------------------------------------------
def feature_patching(
    hm: Any,
    clean: Any,
    corrupt: Any,
    dictionary: Dictionary,
    answers: Any = None,
    features: int | Sequence[int] | None = None,
    top_n: int = 16,
    positions: Sequence[Any] | str | int | None = None,
    metric: str = "logit_diff",
    normalize: bool = True,
    batch_size: int = 16,
) -> PatchingResult:
    """Patch each feature at each position slot from the clean into the corrupt run.

    Args:
        hm: the HookedModel.
        clean, corrupt: aligned batches (same tokens count and padding), or lists of strings.
        dictionary: an SAE (``reads == writes``); its point is patched.
        answers: as for :func:`~hookscope.patching.activation_patching`.
        features: feature indices to sweep; ``None`` takes the ``top_n`` features whose clean
            and corrupt activations differ most (summed ``|f_clean - f_corrupt|`` over examples
            and slots): a feature equal in both runs has no effect to measure.
        positions: position items (default ``["last"]``), resolved per example; each slot must
            be a real token of every example.
        metric: ``"logit_diff"``, ``"prob"`` or ``"kl"``.
        batch_size: rows (one site each) per forward.

    Returns:
        A :class:`~hookscope.patching.PatchingResult` with axes ``["feature", "position"]``
        (``labels["feature"]``: the feature indices; ``labels["position"]``: example 0's tokens
        at the slots) and ``method="feature"``.
    """
    point = _sae_point(dictionary, "feature_patching")
    positions = _position_items(positions, "last")
    _check_options(metric, batch_size, top_n)
    clean, corrupt, correct, wrong, clean_logprobs, clean_metric, corrupt_metric = _baselines(
        hm, clean, corrupt, answers, metric
    )
    slots = _real_slots(hm, clean, positions)
    _, f_clean = _features_at(hm, clean, positions, dictionary)
    _, f_corrupt = _features_at(hm, corrupt, positions, dictionary)
    chosen = _chosen_features(features, top_n, f_clean, f_corrupt, dictionary.d_sae)
    # the shift each (example, feature, slot) patch adds: [N, F, P, d]
    change = (f_clean - f_corrupt)[..., chosen].permute(0, 2, 1)  # [N, F, P]
    direction = dictionary.W_dec[chosen].to(change.device) / dictionary.input_scale  # [F, d]
    shifts = change.unsqueeze(-1) * direction[None, :, None, :]

    def metric_of(logits: torch.Tensor, examples: torch.Tensor) -> torch.Tensor:
        return _metric(
            logits,
            metric,
            correct[examples],
            wrong[examples] if wrong is not None else None,
            clean_logprobs[examples] if clean_logprobs is not None else None,
        )

    per_example, forwards = _sweep_shifts(
        hm, corrupt, point, list(positions), shifts, batch_size, metric_of
    )
    labels = {
        "feature": chosen.tolist(),
        "position": hm.to_string_tokens(clean["input_ids"][0][slots.index[0].cpu()]),
    }
    result = _result(
        per_example,
        ["feature", "position"],
        labels,
        clean_metric,
        corrupt_metric,
        metric,
        normalize and metric != "kl",
        "activation",
        forwards,
    )
    result.method = "feature"
    return result


def _check_options(metric: Any, batch_size: Any, top_n: Any) -> None:
    if metric not in ("logit_diff", "prob", "kl"):
        raise HookscopeError(f"metric {metric!r} is not one of 'logit_diff', 'prob', 'kl'.")
    for name, value in (("batch_size", batch_size), ("top_n", top_n)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise HookscopeError(f"{name} must be a positive int, got {value!r}.")


def _chosen_features(
    features: Any, top_n: int, f_clean: torch.Tensor, f_corrupt: torch.Tensor, d_sae: int
) -> torch.Tensor:
    """The swept features ``[F]`` (long): as given, or the ``top_n`` that differ most."""
    if features is not None:
        return _feature_index(features, d_sae, "feature_patching")
    difference = (f_clean - f_corrupt).abs().sum((0, 1))
    return difference.topk(min(top_n, d_sae)).indices.cpu()


def _sweep_shifts(
    hm: Any,
    corrupt: dict,
    point: str,
    positions: list,
    shifts: torch.Tensor,
    batch_size: int,
    metric_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, int]:
    """Run every site ``shifts [N, F, P, d]`` (example, feature, slot) as its own row of the
    corrupt batch, adding the shift at that slot only; returns the metric ``[N, F, P]`` and the
    number of forwards."""
    examples, n_features, n_slots, width = shifts.shape
    sites = [(e, j, p) for e in range(examples) for j in range(n_features) for p in range(n_slots)]
    results = torch.empty(len(sites))
    forwards = math.ceil(len(sites) / batch_size)
    for start in range(0, len(sites), batch_size):
        chunk = sites[start : start + batch_size]
        rows, feature, slot = torch.tensor(chunk).unbind(-1)  # [C] each
        batch = {k: v[rows.to(v.device)] if torch.is_tensor(v) else v for k, v in corrupt.items()}
        vector = shifts.new_zeros(len(chunk), n_slots, width)  # one nonzero slot per row
        index = tuple(t.to(shifts.device) for t in (rows, feature, slot))
        vector[torch.arange(len(chunk), device=shifts.device), index[2]] = shifts[index]
        edit = Steer(point=point, positions=positions, vector=vector)
        logits = hm.forward(batch, ["last"], interventions=[edit])["logits"][:, 0]
        results[start : start + len(chunk)] = metric_of(logits, rows).cpu()
    return results.view(examples, n_features, n_slots), forwards


# -- feature attribution -----------------------------------------------------------------------
@dataclass
class FeatureAttribution:
    """Per-feature attribution scores at position slots.

    Attributes:
        scores: ``[examples, slots, d_sae]``, 0 at padded slots.
        position_mask: ``[examples, slots]``, True at real slots.
        tokens: per example, the tokens at its slots.
        metric_value: ``[examples]``, the metric of the run the gradient was taken at.
        metric: the metric's name (``"custom"`` for a function).
        method: ``"gradient x activation"`` or ``"attribution patching"`` (given clean inputs).
    """

    scores: torch.Tensor
    position_mask: torch.Tensor
    tokens: list[list[str]]
    metric_value: torch.Tensor
    metric: str
    method: str

    def top(self, k: int = 10, example: int | None = None) -> list[list[tuple[int, float]]]:
        """Per slot, the ``k`` features with the largest ``|score|`` as ``(feature, score)``,
        for one example or (``None``) the mean over the examples (real slots only)."""
        if example is None:
            weight = self.position_mask.unsqueeze(-1).to(self.scores.dtype)
            table = (self.scores * weight).sum(0) / weight.sum(0).clamp(min=1)
            real = self.position_mask.any(0)
        else:
            table, real = self.scores[example], self.position_mask[example]
        k = min(k, table.shape[-1])
        indices = table.abs().topk(k, dim=-1).indices
        return [
            [(int(i), float(table[slot, i])) for i in indices[slot]] if real[slot] else []
            for slot in range(table.shape[0])
        ]

    def __repr__(self) -> str:
        n, p, d = self.scores.shape
        return (
            f"FeatureAttribution({self.method}, {self.metric}, {n} examples x {p} slots x "
            f"{d} features)"
        )


def feature_attribution(
    hm: Any,
    inputs: Any,
    dictionary: Dictionary,
    answers: Any = None,
    metric: str | MetricFn = "logit_diff",
    positions: Sequence[Any] | str | int | None = None,
    clean: Any = None,
) -> FeatureAttribution:
    """Gradient x activation (or, with ``clean``, attribution patching) of a metric with
    respect to a dictionary's features, from one forward and one backward.

    Args:
        hm: the HookedModel.
        inputs: the batch the gradient is taken at (the corrupt run when ``clean`` is given);
            padded batches are fine.
        dictionary: an SAE (``reads == writes``).
        answers: ``(correct, wrong)`` for ``"logit_diff"``, ``correct`` for ``"prob"``.
        metric: ``"logit_diff"``, ``"prob"``, or a function ``logits [batch, vocab] -> [batch]``
            of the logits at each example's last real token.
        positions: position items where features are scored (default ``["all"]``), resolved
            per example.
        clean: aligned clean inputs: scores become ``(f_clean - f) * dmetric/df``.

    Returns:
        A :class:`FeatureAttribution`; ``.top(k)`` gives the top features per slot.
    """
    point = _sae_point(dictionary, "feature_attribution")
    positions = _position_items(positions, "all")
    if clean is not None:
        clean, inputs = _pair(hm, clean, inputs)
    else:
        inputs = hm.prepare_inputs(inputs)
    metric_fn, metric_name = _metric_function(hm, metric, answers, inputs["input_ids"].shape[0])
    leaves: list[torch.Tensor] = []
    insert = Custom(point=point, positions=list(positions), fn=_feature_leaf(dictionary, leaves))
    cache = hm.forward(
        inputs,
        ["last"],
        extraction_config=ExtractionConfig(keep_gradient=True),
        interventions=[insert],
    )
    value = metric_fn(cache["logits"][:, 0])
    (features,) = leaves
    (gradient,) = torch.autograd.grad(value.sum(), features)
    resolved = hm.position_context(inputs).resolve(list(positions))
    mask = resolved.mask.to(features.device)
    if clean is not None:
        _, f_clean = _features_at(hm, clean, positions, dictionary)
        scores = (f_clean.to(features.device) - features.detach()) * gradient
    else:
        scores = features.detach() * gradient
    scores = scores * mask.unsqueeze(-1)
    ids = inputs["input_ids"]
    tokens = [
        hm.to_string_tokens(ids[row][resolved.index[row][resolved.mask[row]].to(ids.device)])
        for row in range(len(ids))
    ]
    method = "attribution patching" if clean is not None else "gradient x activation"
    return FeatureAttribution(
        scores.cpu(), mask.cpu(), tokens, value.detach().cpu(), metric_name, method
    )


def _feature_leaf(dictionary: Dictionary, leaves: list[torch.Tensor]) -> Callable:
    """A :class:`Custom` function that puts the features of the selected slots into the graph
    as a leaf: ``x = decode(f) + (x - decode(f)).detach()``; the leaf goes to ``leaves``."""

    def insert(tensor: torch.Tensor, context: Any) -> torch.Tensor:
        d = dictionary.on(tensor.device)  # moved once per device, kept by the dictionary
        x = context.positions.select(tensor)  # [B, P, d]
        features = d.encode(x.detach()).requires_grad_(True)
        reconstruction = d.decode(features)
        leaves.append(features)
        return write_slots(
            tensor, context.positions, reconstruction + (x - reconstruction).detach()
        )

    return insert


def _metric_function(hm: Any, metric: Any, answers: Any, examples: int) -> tuple[MetricFn, str]:
    """``metric`` as ``logits [batch, vocab] -> [batch]`` and its name."""
    if callable(metric):
        return metric, "custom"
    if metric not in ("logit_diff", "prob"):
        raise HookscopeError(
            f"feature_attribution metric {metric!r} is not 'logit_diff', 'prob' or a function "
            "of the last-token logits (KL's gradient at the run itself is 0)."
        )
    correct, wrong = _answer_ids(answers, examples, metric, hm.get_text_tokenizer())

    def fn(logits: torch.Tensor) -> torch.Tensor:
        return _metric(logits, metric, correct, wrong)

    return fn, metric
