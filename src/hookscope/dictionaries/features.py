"""Features as points: a dictionary's encoding, read inside the capture hooks like any point.

A dictionary attached to a model (``hm.attach_dictionary(d)``) is extracted with
``ExtractionConfig(extract_features=True)`` (or a list of names) in ``forward``,
``extract_cache`` (the store too) and ``generate``:

- ``features_{name}`` ``[batch, P, d_sae]``: ``d.encode(x)`` where ``x`` is the point ``d``
  reads, at the target positions (``P`` slots, laid out as every other point). The encoder runs
  on the slots the capture hook already selected: at ``["last"]`` it encodes one vector per
  example, never the whole sequence.
- with ``feature_top_k=k``: ``features_{name}`` ``[batch, P, k]``, the k largest activations of
  each slot in descending order, and ``feature_ids_{name}`` ``[batch, P, k]`` (int64), their
  feature indices; an id is -1 where the slot has fewer than k active (nonzero) features.
  :func:`dense_features` turns the pair back into ``[batch, P, d_sae]``.
- ``reconstruction_error_{name}`` ``[batch, P, d_out]``: ``y - d.decode(d.encode(x))`` where
  ``y`` is the point ``d`` writes (``x`` itself for an SAE; the MLP's output for a transcoder
  that reads the MLP's input).

Both follow the rule of every point: they describe the value after the interventions that ran
at the point. One exception makes splicing readable: while a :class:`~hookscope.dictionaries.
splice.Splice` of the same dictionary object runs in the call, they are computed from the value
the splice received (the model's value before the splice replaced it): the features are the
ones the splice decoded, i.e. the features of the value the model computed there, and the
reconstruction error is the error term the splice added back (``keep_error=True``) or dropped.
Values are in the dictionary's dtype, on the point's device.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..archs import ModelMap
from ..capture import PointSite, locate
from ..errors import ActivationPointError, HookscopeError
from ..hooks import ModuleHook, reading_hook
from ..points import KINDS, Point, parse_point, width_of
from .core import Dictionary

FEATURES, FEATURE_IDS, ERROR = "features", "feature_ids", "reconstruction_error"


def feature_key(name: str) -> str:
    """``features_{name}``: the cache key of a dictionary's features."""
    return f"{FEATURES}_{name}"


def feature_ids_key(name: str) -> str:
    """``feature_ids_{name}``: the feature indices of top-k feature storage."""
    return f"{FEATURE_IDS}_{name}"


def error_key(name: str) -> str:
    """``reconstruction_error_{name}``: the point minus the dictionary's reconstruction."""
    return f"{ERROR}_{name}"


def dictionary_points(dictionary: Dictionary, model_map: ModelMap) -> tuple[Point, Point]:
    """The points ``dictionary`` reads and writes on this model, checked: each must be a text
    point a module hook reaches, in range, whose width is the dictionary's ``d_in`` / ``d_out``.

    Raises:
        ActivationPointError: naming the dictionary, the point and the widths.
    """
    found = []
    for role, point_name, size in (
        ("reads", dictionary.reads, dictionary.d_in),
        ("writes", dictionary.writes, dictionary.d_out),
    ):
        what = f"dictionary {dictionary.name!r} {role} {point_name!r}"
        try:
            point = parse_point(point_name, model_map)
            if KINDS[point.kind].is_vision:
                raise ActivationPointError("vision points have no token positions")
            width = width_of(point.kind, model_map)
            locate(point, model_map)
        except ActivationPointError as error:
            raise ActivationPointError(f"{what}: {error}") from None
        if width != size:
            dim = "d_in" if role == "reads" else "d_out"
            raise ActivationPointError(
                f"{what}: that point is {width} wide on this model, but the dictionary's "
                f"{dim} is {size} (was it trained on another model?)."
            )
        found.append(point)
    return found[0], found[1]


@dataclass
class FeatureRequest:
    """What one forward extracts of one dictionary.

    Attributes:
        dictionary: the dictionary.
        reads, writes: its points on this model.
        features: extract ``features_{name}`` (and ``feature_ids_{name}`` under top-k).
        error: extract ``reconstruction_error_{name}``.
    """

    dictionary: Dictionary
    reads: Point
    writes: Point
    features: bool = False
    error: bool = False

    @property
    def layers(self) -> list[int | None]:
        return [self.reads.layer, self.writes.layer]


def plan_features(
    config: Any, dictionaries: Mapping[str, Dictionary] | None, model_map: ModelMap
) -> list[FeatureRequest]:
    """The :class:`FeatureRequest` s of ``config`` (``extract_features``,
    ``extract_reconstruction_error``, ``feature_top_k``) over the attached ``dictionaries``.

    Raises:
        HookscopeError: a name that is not attached (naming the closest), a request with no
            dictionary attached, ``feature_top_k`` without ``extract_features``.
        ActivationPointError: a dictionary whose points do not fit this model.
    """
    dictionaries = dict(dictionaries or {})
    features = _requested("extract_features", config.extract_features, dictionaries)
    errors = _requested(
        "extract_reconstruction_error", config.extract_reconstruction_error, dictionaries
    )
    if config.feature_top_k is not None and not features:
        raise HookscopeError(
            f"feature_top_k={config.feature_top_k} stores the top features of extract_features; "
            "set extract_features too (or drop feature_top_k)."
        )
    requests = []
    for name in [*features, *(n for n in errors if n not in features)]:
        dictionary = dictionaries[name]
        top_k = config.feature_top_k
        if name in features and top_k is not None and top_k > dictionary.d_sae:
            raise HookscopeError(
                f"feature_top_k={top_k} is more than dictionary {name!r}'s {dictionary.d_sae} "
                f"features; use at most {dictionary.d_sae} (or None for dense features)."
            )
        reads, writes = dictionary_points(dictionary, model_map)
        requests.append(FeatureRequest(dictionary, reads, writes, name in features, name in errors))
    return requests


def _requested(flag: str, value: Any, dictionaries: dict[str, Dictionary]) -> list[str]:
    if value is False or value == []:
        return []
    if not dictionaries:
        raise HookscopeError(
            f"ExtractionConfig.{flag} needs a dictionary attached to the model: "
            "hm.attach_dictionary(dictionary) first."
        )
    if value is True:
        return list(dictionaries)
    for name in value:
        if name not in dictionaries:
            close = difflib.get_close_matches(name, list(dictionaries), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise HookscopeError(
                f"ExtractionConfig.{flag} names {name!r}, which is not attached.{hint} "
                f"Attached: {sorted(dictionaries)}."
            )
    return list(dict.fromkeys(value))


def feature_hooks(
    requests: list[FeatureRequest],
    model_map: ModelMap,
    positions: Any,
    sink: dict[str, torch.Tensor],
    *,
    average: bool = False,
    keep_gradient: bool = False,
    top_k: int | None = None,
    spliced: dict[int, torch.Tensor] | None = None,
) -> list[ModuleHook]:
    """The reading hooks that write each request's keys into ``sink``.

    ``positions`` selects the slots (a ``ResolvedPositions`` or generation's step positions);
    ``spliced`` holds, by ``id(dictionary)``, the value a Splice of that dictionary received in
    the current call (see the module docstring).
    """
    hooks = []
    for request in requests:
        capture = _FeatureCapture(
            request, positions, sink, spliced if spliced is not None else {}, average,
            keep_gradient, top_k, locate(request.reads, model_map),
            locate(request.writes, model_map),
        )  # fmt: skip
        site = capture.reads_site
        hooks.append(reading_hook(site.module, site.when, capture.on_read))
        if request.error and request.reads != request.writes:
            site = capture.writes_site
            hooks.append(reading_hook(site.module, site.when, capture.on_write))
    return hooks


@dataclass
class _FeatureCapture:
    """The hooks of one dictionary in one call: the reads hook encodes the selected slots; a
    transcoder's writes hook subtracts the decoded features from the point it writes."""

    request: FeatureRequest
    positions: Any
    sink: dict[str, torch.Tensor]
    spliced: dict[int, torch.Tensor]
    average: bool
    keep_gradient: bool
    top_k: int | None
    reads_site: PointSite
    writes_site: PointSite
    features: torch.Tensor | None = field(default=None, repr=False)  # for the writes hook

    def _slots(self, hidden: torch.Tensor, site: PointSite, original: Any) -> torch.Tensor:
        """The point at the selected slots ``[batch, P, width]``: from the module tensor, or
        from the value a splice received (already the point, no columns to take)."""
        if original is not None:
            value = self.positions.select(original)
        else:
            value = site.read(self.positions.select(hidden))
        return value if self.keep_gradient else value.detach()

    def _error(self, y: torch.Tensor, features: torch.Tensor) -> None:
        dictionary = self.request.dictionary
        error = y.to(features.dtype) - dictionary.on(y.device).decode(features)
        self.sink[error_key(dictionary.name)] = (
            self.positions.average(error) if self.average else error
        )

    def on_read(self, hidden: torch.Tensor) -> None:
        request, dictionary = self.request, self.request.dictionary
        same_point = request.reads == request.writes
        # popped: the call need not hold the spliced tensor any longer
        original = self.spliced.pop(id(dictionary), None) if same_point else None
        x = self._slots(hidden, self.reads_site, original)
        features = dictionary.on(x.device).encode(x)  # [batch, P, d_sae]
        if request.features:
            values = _feature_values(
                dictionary.name, features, self.positions, self.average, self.top_k
            )
            self.sink.update(values)
        if request.error and same_point:
            self._error(x, features)
        elif request.error:
            self.features = features

    def on_write(self, hidden: torch.Tensor) -> None:
        request, features = self.request, self.features
        if features is None:
            raise HookscopeError(
                f"dictionary {request.dictionary.name!r}: {request.writes.name} ran before "
                f"{request.reads.name} in this forward, so its reconstruction error cannot be "
                "computed (a transcoder must read a point computed before the one it writes)."
            )
        self.features = None
        original = self.spliced.pop(id(request.dictionary), None)
        self._error(self._slots(hidden, self.writes_site, original), features)


def _feature_values(
    name: str, features: torch.Tensor, positions: Any, average: bool, top_k: int | None
) -> dict[str, torch.Tensor]:
    """``features_{name}`` (dense, or the top k per slot with ``feature_ids_{name}``)."""
    if average:
        features = positions.average(features)
    if top_k is None:
        return {feature_key(name): features}
    values, ids = features.topk(min(top_k, features.shape[-1]), dim=-1)
    ids = torch.where(values != 0, ids, torch.full_like(ids, -1))
    return {feature_key(name): values, feature_ids_key(name): ids}


def dense_features(values: torch.Tensor, ids: torch.Tensor, d_sae: int) -> torch.Tensor:
    """Top-k storage back to dense: ``values [..., k]``, ``ids [..., k]`` (-1: none) ->
    ``[..., d_sae]`` with zeros elsewhere."""
    dense = torch.zeros(*values.shape[:-1], d_sae + 1, dtype=values.dtype, device=values.device)
    index = torch.where(ids < 0, torch.full_like(ids, d_sae), ids)
    return dense.scatter(-1, index, values)[..., :d_sae]
