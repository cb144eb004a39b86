"""Feature interventions: ablate, scale, clamp, steer or patch a dictionary's features.

Each is an :class:`~hookscope.interventions.Intervention` on the dictionary's ``writes`` point
(for an SAE the point it reads), so it takes ``positions`` and ``apply_to`` like
:class:`~hookscope.interventions.Ablation`, :class:`~hookscope.interventions.Patch` and
:class:`~hookscope.interventions.Steer`, and works in ``forward``, ``extract_cache``,
``generate`` and ``register_interventions``.

**Semantics: the edit is made in feature space and the dictionary's error is kept.** At each
selected slot with value ``x [d]``::

    f  = encode(x)                        [d_sae]
    f' = f with the chosen features edited
    x' = x + (f' - f) @ W_dec / input_scale

so only the chosen features' decoder directions move ``x``; the rest of ``x`` (the other
features' reconstruction and the reconstruction error ``x - decode(f)``) is untouched. Ablating
a feature that is 0 at a slot changes nothing there (exactly), and an SAE whose reconstruction
is poor still leaves the model's computation intact except for the edit. The edits:

- :class:`FeatureAblation`: ``f'_i = 0``;
- :class:`FeatureScale`: ``f'_i = factor * f_i``;
- :class:`FeatureClamp`: ``f'_i = value`` (whatever ``f_i`` was, 0 included);
- :class:`FeatureSteer`: ``f'_i = f_i + coefficient``, i.e. ``x += coefficient * W_dec[i] /
  input_scale`` (no encoding needed);
- :class:`FeaturePatch`: ``f'_i = source_i``, the features of another run (a tensor
  ``[batch, positions, d_sae]`` or an :class:`~hookscope.cache.ActivationCache` holding the
  point, which is encoded).

``features`` is one feature index, a list of them, or ``"all"``.

The dictionary is not JSON: :meth:`FeatureIntervention.to_dict` stores its ``name``, and
:func:`feature_intervention_from_dict` rebuilds the intervention given the dictionaries by name.

An MLP **transcoder** (``reads="mlp_in_{l}"``, the MLP module's input; ``writes="mlp_out_{l}"``)
is edited the same way at ``mlp_out_{l}``, with ``f = encode(mlp_in)`` read in the same call at
the same slots: ``mlp_out' = mlp_out + (f' - f) @ W_dec / input_scale``. Its patch sources are
feature tensors (a cache holds the MLP's output, not its input). Other transcoders are refused.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch

from ..editing import checked_cache_source
from ..errors import HookscopeError
from ..hooks import reading_hook
from ..interventions import Intervention, _decode, _encode
from ..keywords import reject_unknown_fields
from .core import Dictionary

FeatureSelection = int | list[int] | Literal["all"]


@dataclass(kw_only=True, eq=False, repr=False)
class FeatureIntervention(Intervention):
    """Base of the feature interventions (see the module docstring for the semantics).

    Attributes:
        dictionary: the SAE whose features are edited.
        features: a feature index, a list of them, or ``"all"``.
        point: the point changed; ``None`` (the default) means ``dictionary.writes``, and any
            other value must equal it.
        positions, apply_to: as for every intervention.
    """

    point: str | None = None
    dictionary: Dictionary
    features: FeatureSelection

    #: False for edits that do not read the current features (steering).
    reads_features = True

    def __post_init__(self) -> None:
        name = type(self).__name__
        if not isinstance(self.dictionary, Dictionary):
            raise HookscopeError(
                f"{name} dictionary must be a hookscope Dictionary, got "
                f"{type(self.dictionary).__name__} {self.dictionary!r:.80}; a saved feature "
                "intervention is rebuilt with hookscope.dictionaries."
                "feature_intervention_from_dict(data, {name: dictionary})."
            )
        d = self.dictionary
        if d.is_transcoder and _transcoder_layer(d) is None:
            raise HookscopeError(
                f"{name}: dictionary {d.name!r} reads {d.reads} and writes {d.writes}; feature "
                "interventions support SAEs (reads == writes) and MLP transcoders (reads "
                "mlp_in_{l}, the MLP's input, and writes mlp_out_{l} of the same layer)."
            )
        if self.point is None:
            self.point = d.writes
        elif self.point != d.writes:
            raise HookscopeError(
                f"{name} point {self.point!r} is not the point dictionary {d.name!r} writes "
                f"({d.writes!r}); leave point unset."
            )
        super().__post_init__()
        object.__setattr__(self, "_index", _feature_index(self.features, d.d_sae, name))
        object.__setattr__(self, "_moved", {})

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{f.name}={self.dictionary.name if f.name == 'dictionary' else getattr(self, f.name)!r}"
            if f.name != "source" or not isinstance(self.source, torch.Tensor)
            else f"source=<tensor {list(self.source.shape)}>"
            for f in fields(self)
        )
        return f"{type(self).__name__}({shown})"

    # -- the edit -------------------------------------------------------------------------
    def edit(self, old: torch.Tensor, operand: torch.Tensor | None) -> torch.Tensor:
        """The chosen features' new values from their current ones ``old [batch, slots, n]``
        (``n`` chosen features; zeros when :attr:`reads_features` is False)."""
        raise NotImplementedError

    def transform(
        self,
        values: torch.Tensor,
        operand: torch.Tensor | None,
        context: Any = None,
        read: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``values [batch, slots, d]`` -> ``x + (f' - f) @ W_dec / input_scale`` on the chosen
        features; ``operand``: their source values ``[batch, slots, n]`` (a patch) or None;
        ``read``: for a transcoder, what it reads at the same slots (the MLP's input)."""
        dictionary, index = self._on(values.device)
        if self.reads_features and dictionary.is_transcoder and read is None:
            raise HookscopeError(
                f"{type(self).__name__} on {self.point}: a transcoder's features come from the "
                "MLP's input, which this call did not read (a vision point or a Custom path)."
            )
        if self.reads_features:
            old = _encode_chosen(dictionary, values if read is None else read, index)
        else:
            old = values.new_zeros((*values.shape[:-1], len(index)), dtype=dictionary.W_dec.dtype)
        change = self.edit(old, operand) - old  # [batch, slots, n]
        every = len(index) == dictionary.d_sae  # sorted unique indices: all of them, in order
        delta = change @ (dictionary.W_dec if every else dictionary.W_dec[index])
        delta = delta / dictionary.input_scale
        return values + delta.to(values.dtype)

    def _on(self, device: torch.device) -> tuple[Dictionary, torch.Tensor]:
        """The dictionary and feature index on ``device`` (moved once per device)."""
        key = str(device)
        if key not in self._moved:
            self._moved[key] = self._index.to(device)
        return self.dictionary.on(device), self._moved[key]  # on(): remade after an edit

    # -- inside the pipeline --------------------------------------------------------------
    def prepare_slots(self, prepared: Any) -> Callable:
        """The slot function for :class:`~hookscope.editing.PreparedIntervention`: operands are
        checked here, before the forward (only a patch has one). For a transcoder, the MLP
        input of the current call is kept by :meth:`read_hooks` and read at the same slots."""
        operand_of = self._operand_function(prepared)
        reads: dict[str, torch.Tensor] = {}
        prepared.feature_reads = reads  # shared with read_hooks (called after this)

        def slot_fn(values: torch.Tensor, positions: Any) -> torch.Tensor:
            read = positions.select(reads["x"]) if self.dictionary.is_transcoder else None
            operand = None if operand_of is None else operand_of(values)
            return self.transform(values, operand, read=read)

        return slot_fn

    def _operand_function(self, prepared: Any) -> Callable | None:
        """``values -> operand [batch, slots, n]`` for edits that take one (a patch)."""
        return None

    def read_hooks(self, prepared: Any) -> list:
        """Hooks that keep what a transcoder reads (the MLP's input) for this call."""
        layer = _transcoder_layer(self.dictionary)
        if layer is None or not self.reads_features:
            return []
        reads = prepared.feature_reads
        mlp = prepared.model_map.layers[layer].mlp
        return [reading_hook(mlp, "input", lambda tensor: reads.__setitem__("x", tensor))]

    # -- saving ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict; the dictionary is stored by its ``name``."""
        data: dict[str, Any] = {"type": type(self).__name__}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "dictionary":
                data[f.name] = {"dictionary": value.name}
            else:
                data[f.name] = _encode(value, f"{type(self).__name__}.{f.name}")
        return data


def _encode_chosen(dictionary: Dictionary, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The chosen features of ``x`` ``[..., n]``; ``index`` is sorted and unique
    (:func:`_feature_index`), so all ``d_sae`` of them are every feature in order: one plain
    encode, no gathered weights."""
    return dictionary.encode(x, None if len(index) == dictionary.d_sae else index)


def _transcoder_layer(dictionary: Dictionary) -> int | None:
    """The layer of an MLP transcoder (reads ``mlp_in_{l}``, writes ``mlp_out_{l}``), else None."""
    match = re.fullmatch(r"mlp_out_(\d+)", str(dictionary.writes))
    if match is None or dictionary.reads != f"mlp_in_{match[1]}":
        return None
    return int(match[1])


def _feature_index(features: Any, d_sae: int, where: str) -> torch.Tensor:
    """``features`` (an index, a list, or "all") as sorted unique indices ``[n]`` (long)."""
    if isinstance(features, str):
        if features != "all":
            raise HookscopeError(f"{where} features {features!r}: give indices or 'all'.")
        return torch.arange(d_sae)
    items = [features] if not isinstance(features, list | tuple | torch.Tensor) else features
    items = items.tolist() if isinstance(items, torch.Tensor) else list(items)
    bad = [f for f in items if isinstance(f, bool) or not isinstance(f, int) or not 0 <= f < d_sae]
    if bad or not items:
        raise HookscopeError(
            f"{where} features {features!r}: {'bad entries ' + repr(bad) if bad else 'empty'}; "
            f"give feature indices in 0..{d_sae - 1} (one, a list) or 'all'."
        )
    repeated = sorted({f for f in items if items.count(f) > 1})
    if repeated:  # FeatureSteer([3, 3]) would otherwise add the coefficient once, not twice
        raise HookscopeError(
            f"{where} features {features!r}: {repeated} listed more than once; list each "
            "feature once (scale the coefficient or factor to strengthen an edit)."
        )
    return torch.tensor(sorted(items), dtype=torch.long)


@reject_unknown_fields
@dataclass(kw_only=True, eq=False, repr=False)
class FeatureAblation(FeatureIntervention):
    """Set the chosen features to 0: ``x' = x - f_i W_dec[i] / input_scale`` summed over them."""

    def edit(self, old, operand):
        return torch.zeros_like(old)


@reject_unknown_fields
@dataclass(kw_only=True, eq=False, repr=False)
class FeatureScale(FeatureIntervention):
    """Multiply the chosen features by ``factor`` (2.0 doubles what they write)."""

    factor: float

    def edit(self, old, operand):
        return old * self.factor


@reject_unknown_fields
@dataclass(kw_only=True, eq=False, repr=False)
class FeatureClamp(FeatureIntervention):
    """Set the chosen features to ``value`` at every selected slot (active there or not)."""

    value: float

    def edit(self, old, operand):
        return torch.full_like(old, float(self.value))


@reject_unknown_fields
@dataclass(kw_only=True, eq=False, repr=False)
class FeatureSteer(FeatureIntervention):
    """Add ``coefficient`` to the chosen features: ``x += coefficient * W_dec[i] / input_scale``
    (each chosen feature's decoder direction, unnormalised; nothing is encoded)."""

    coefficient: float = 1.0
    reads_features = False

    def edit(self, old, operand):
        return old + self.coefficient


@reject_unknown_fields
@dataclass(kw_only=True, eq=False, repr=False)
class FeaturePatch(FeatureIntervention):
    """Set the chosen features to their values in another run (prompt positions only).

    ``source``: features ``[batch, positions, d_sae]`` (``[positions, d_sae]`` and ``[d_sae]``
    broadcast; rows aligned by example, as for :class:`~hookscope.interventions.Patch`), or an
    :class:`~hookscope.cache.ActivationCache` holding the point (key ``source_key``, default the
    point) at the same position items, which is encoded with the dictionary.
    """

    features: FeatureSelection = "all"
    source: Any
    source_key: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.apply_to != "prompt":
            raise HookscopeError(
                f"FeaturePatch on {self.point} takes values per prompt position; it applies to "
                "the prompt only (apply_to='prompt')."
            )

    def edit(self, old, operand):
        if operand is None:  # a path that does not prepare slots (a vision point's whole tensor)
            raise HookscopeError(
                f"FeaturePatch on {self.point}: patching features is supported on text points "
                "only (a vision point's tensor has no position slots to align the source with)."
            )
        return operand.to(old.dtype)

    def _operand_function(self, prepared: Any) -> Callable:
        source = self._batch_source(prepared)  # [B, P, n] or broadcastable, on the CPU
        return lambda values: source.to(values.device).expand(*values.shape[:-1], source.shape[-1])

    def _batch_source(self, prepared: Any) -> torch.Tensor:
        """This batch's rows of the source features, the chosen ones only: ``[B, P, n]``,
        ``[P, n]`` or ``[n]``; checked against the call's slots."""
        first, batch = prepared.window.example_offset, prepared.batch
        slots = prepared.positions.index.shape[1]
        if hasattr(self.source, "tensors"):
            return self._cache_features(prepared, first, batch, slots)
        source = torch.as_tensor(self.source)
        d_sae = self.dictionary.d_sae
        fits = {
            1: list(source.shape) == [d_sae],
            2: list(source.shape) == [slots, d_sae],
            3: source.shape[1:] == (slots, d_sae) and source.shape[0] >= first + batch,
        }
        if not fits.get(source.dim(), False):
            raise HookscopeError(
                f"FeaturePatch on {self.point}: source has shape {list(source.shape)}; expected "
                f"[{d_sae}], [{slots}, {d_sae}] (per position slot of {self.positions!r}) or "
                f"[batch, {slots}, {d_sae}] with rows {first}..{first + batch - 1}."
            )
        if source.dim() == 3:
            source = source[first : first + batch]
        return source[..., self._index.to(source.device)]

    def _cache_features(self, prepared: Any, first: int, batch: int, slots: int) -> torch.Tensor:
        """The chosen features ``[batch, P, n]`` (on the CPU) of this batch's rows of a source
        cache's point: only these rows and only the chosen features are encoded."""
        if self.dictionary.is_transcoder:
            raise HookscopeError(
                f"FeaturePatch on {self.point} with transcoder {self.dictionary.name!r}: give the "
                "source features as a tensor [batch, positions, d_sae] (a cache holds the MLP "
                "output, not the input the transcoder reads)."
            )
        values = self._cache_rows(self.source, prepared, first, batch)
        if values.shape[1] != slots:
            raise HookscopeError(
                f"FeaturePatch on {self.point}: the source cache has {values.shape[1]} position "
                f"slots; this call selects {slots} ({self.positions!r})."
            )
        dictionary, index = self._on(self.dictionary.W_enc.device)
        return _encode_chosen(dictionary, values.to(dictionary.W_enc.device), index).cpu()

    def _cache_rows(self, source: Any, prepared: Any, first: int, batch: int) -> torch.Tensor:
        """This batch's rows of the point in a source cache ``[batch, P, d]``, checked."""
        key = self.source_key or self.point
        what = f"FeaturePatch on {self.point}"
        mapping = prepared.positions.mapping_index
        values = checked_cache_source(source, key, mapping, first + batch, what)
        return values[first : first + batch]


FEATURE_INTERVENTIONS = {
    cls.__name__: cls
    for cls in (FeatureAblation, FeatureScale, FeatureClamp, FeatureSteer, FeaturePatch)
}


def feature_intervention_from_dict(
    data: Mapping[str, Any], dictionaries: Mapping[str, Dictionary] | Dictionary
) -> FeatureIntervention:
    """Rebuild a feature intervention from :meth:`FeatureIntervention.to_dict` output.

    Args:
        data: the dict.
        dictionaries: the dictionaries by name (or one dictionary), to put back the one the
            intervention named.

    Raises:
        HookscopeError: an unknown type, or a dictionary name not among ``dictionaries``.
    """
    data = dict(data)
    kind = data.pop("type", None)
    if kind not in FEATURE_INTERVENTIONS:
        raise HookscopeError(
            f"unknown feature intervention type {kind!r}; valid: {sorted(FEATURE_INTERVENTIONS)}."
        )
    if isinstance(dictionaries, Dictionary):
        dictionaries = {dictionaries.name: dictionaries}
    reference = data.pop("dictionary", None)
    name = reference.get("dictionary") if isinstance(reference, dict) else None
    if name not in dictionaries:
        raise HookscopeError(
            f"{kind} names dictionary {name!r}, which is not among the dictionaries given "
            f"({sorted(dictionaries)})."
        )
    fields_ = {k: _decode(v) for k, v in data.items()}
    return FEATURE_INTERVENTIONS[kind](dictionary=dictionaries[name], **fields_)
