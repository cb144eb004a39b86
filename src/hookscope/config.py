"""Configuration dataclasses: how to load a model, and what to extract from it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, Literal

import torch

from .errors import HookscopeError
from .keywords import reject_unknown_fields
from .points import KINDS

if TYPE_CHECKING:
    from .archs import ModelMap

# The flag tables, derived from the point table (hookscope.points.KINDS): flag -> kind.
# Flags that request activations of one kind in every (selected) layer.
LAYER_FLAGS: dict[str, str] = {
    k.flag: k.name for k in KINDS.values() if k.scope == "layer" and not k.is_vision
}
# Flags that request one model-level point (logits and input_ids are save_* flags, below).
MODEL_FLAGS: dict[str, str] = {
    k.flag: k.name
    for k in KINDS.values()
    if k.scope == "model" and not k.is_vision and k.flag.startswith("extract_")
}
# Flags that request one kind per selected (layer, head): keys ``{kind}_L{layer}H{head}``.
HEAD_FLAGS: dict[str, str] = {
    k.flag: k.name for k in KINDS.values() if k.scope == "head" and k.averages is None
}
# Flags that request points of the vision encoder / projector (vision-language models).
VISION_FLAGS: dict[str, str] = {k.flag: k.name for k in KINDS.values() if k.is_vision}
# Flags that keep a running mean over examples: flag -> (mean kind, the per-example kind it averages).
RUNNING_MEAN_FLAGS: dict[str, tuple[str, str]] = {
    k.flag: (k.name, k.averages) for k in KINDS.values() if k.averages is not None
}
# The inverse: point kind -> the flag that extracts it (every kind a config can request).
FLAG_OF_KIND: dict[str, str] = {k.name: k.flag for k in KINDS.values()}


@reject_unknown_fields
@dataclass
class HookedModelConfig:
    """How to load the model that a :class:`~hookscope.HookedModel` wraps.

    Attributes:
        model_name: an HF folder, a hub id, a ``.gguf`` file, or ``None`` for the embedded
            default model (SmolLM2-135M-Instruct).
        device_map: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, or an accelerate map (``"auto"``,
            ``"balanced"``, a dict). ``None`` picks ``"cuda"`` when available, else ``"cpu"``.
        torch_dtype: the dtype to load in (``torch.float32``, ``torch.bfloat16``, ...) or
            ``"auto"`` for the checkpoint's own.
        attn_implementation: the attention kernel (``"sdpa"``, ``"eager"``, ``"flash_attention_2"``,
            ...); ``None`` keeps transformers' default for the family.
        batch_size: batch size used when hookscope batches raw strings itself.
        gguf_file: the GGUF file name inside ``model_name`` (a folder), if loading from GGUF.
        revision: the hub revision to load.
        trust_remote_code: run a checkpoint's own Python code (off unless you turn it on).
        max_memory / offload_folder: accelerate placement limits and the folder for weights
            offloaded to disk (with an accelerate ``device_map``).
    """

    model_name: str | None = None
    device_map: str | dict[str, Any] | None = None
    torch_dtype: torch.dtype | str = "auto"
    attn_implementation: str | None = "sdpa"
    batch_size: int = 8
    gguf_file: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    max_memory: dict[Any, Any] | None = None
    offload_folder: str | None = None

    def __post_init__(self) -> None:
        size = self.batch_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise HookscopeError(f"batch_size must be a positive int, got {self.batch_size!r}.")


def _layer_list(name: str, value: Any) -> list[int] | None:
    """``layers`` as None or a list of ints: one int is that layer (``layers=3`` is ``[3]``);
    tuples, ranges, numpy / torch integers are accepted; anything else raises (a string '1' or a
    float 1.0 would otherwise be reported as a layer out of range)."""
    if value is None:
        return None
    if hasattr(value, "tolist") and not isinstance(value, list):  # numpy / torch
        value = value.tolist()
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    items = list(value) if isinstance(value, list | tuple | range) else None
    if items is None or not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        raise HookscopeError(
            f"ExtractionConfig.{name} must be None (all layers), an int or a list of ints, "
            f"got {value!r}."
        )
    return items


def _dictionary_names(name: str, value: Any) -> bool | list[str]:
    """``extract_features`` / ``extract_reconstruction_error``: a bool, or dictionary names (one
    string is a list of one)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return list(value)
    raise HookscopeError(
        f"ExtractionConfig.{name} must be True / False or a list of dictionary names, got {value!r}."
    )


_DICTIONARY_KEYS = (
    ("features_", "extract_features"),
    ("reconstruction_error_", "extract_reconstruction_error"),
)


def _dictionary_flag(name: Any) -> tuple[str, str] | None:
    """``(flag, dictionary name)`` for ``features_{name}`` / ``reconstruction_error_{name}``."""
    for prefix, flag in _DICTIONARY_KEYS:
        if isinstance(name, str) and name.startswith(prefix) and len(name) > len(prefix):
            return flag, name[len(prefix) :]
    return None


@reject_unknown_fields
@dataclass
class ExtractionConfig:
    """What to extract in a forward pass. Every ``extract_*`` flag adds cache keys.

    Per layer (keys ``{kind}_{layer}``, see ``hookscope.points.KINDS`` for definitions):
    ``extract_resid_in``, ``extract_resid_mid``, ``extract_resid_out``,
    ``extract_resid_in_post_layernorm``, ``extract_attn_in``, ``extract_attn_out``,
    ``extract_mlp_in``, ``extract_mlp_out``, ``extract_queries``, ``extract_keys``, ``extract_values``; on
    sandwich-norm families (Gemma2/3, OLMo2) also ``extract_attn_out_post_norm`` /
    ``extract_mlp_out_post_norm``, what attention / the MLP adds to the residual stream there.

    Model level: ``extract_embed`` -> ``input_embeddings``; ``extract_last_layernorm`` ->
    ``last_layernorm``; ``save_input_ids`` -> ``input_ids``; ``save_logits`` -> ``logits``
    at the target positions (default on).

    Per head (keys ``{kind}_L{layer}H{head}``, for the heads in ``attn_heads``):
    ``extract_attn_pattern`` -> ``pattern`` ``[batch, rows, P]`` (post-softmax; rows are the
    target positions or ``attn_pattern_row_positions``; columns the target positions, or every
    key with ``attn_pattern_all_keys``); ``extract_head_queries`` / ``extract_head_keys`` /
    ``extract_head_values`` -> the vectors head h uses (its KV group's under grouped-query
    attention), queries and keys after rotary embedding; ``extract_head_z`` -> head h's slice of
    the output-projection input; ``extract_head_out`` -> that slice through head h's block of
    ``W_O``; ``extract_values_vectors_projected`` -> ``projected_value``, each position's value
    vector through head h's block of ``W_O``; ``extract_head_queries_projected`` /
    ``extract_head_keys_projected`` -> ``projected_query`` / ``projected_key``, the query (key)
    projection's head-h slice through the same block (easyroutine's definitions).

    Running means over every example seen (by ``forward`` or ``extract_cache``):
    ``extract_avg_attn_pattern`` -> ``avg_pattern`` ``[rows, P]``;
    ``extract_avg_values_vectors_projected`` -> ``avg_projected_value`` ``[P, d_model]``.

    Vision-language models (see :mod:`hookscope.vision_points`; no position axis):
    ``extract_vision_resid_out`` -> ``vision_resid_out_{l}``, the output of vision block l;
    ``extract_vision_attn_out`` -> ``vision_attn_out_{l}``, its attention output;
    ``extract_projector_out`` -> ``projector_out``, the image features in the language model's
    space. ``vision_layers`` restricts the vision blocks (default: all).

    Pattern blocks: ``attn_pattern_avg`` (``"mean"``, ``"sum"``, ``"baseline_ratio"``) reduces
    each ``pattern`` to ``[batch, row items, column items]``: one value per block of rows of one
    row item (``attn_pattern_row_positions``, default the target items) and columns of one
    target item, padded slots excluded. ``baseline_ratio`` is the block's mean over the mean
    that uniform causal attention would give it (per row: the block's keys at or before it over
    the real keys at or before it).

    Dictionaries attached with ``HookedModel.attach_dictionary`` (see
    :mod:`hookscope.dictionaries.features`): ``extract_features`` (True: every attached one,
    or a list of names) -> ``features_{name}`` ``[batch, P, d_sae]``, the dictionary's encoding
    of the point it reads at the target positions; with ``feature_top_k=k`` only the k largest
    per slot: ``features_{name}`` ``[batch, P, k]`` (descending) and ``feature_ids_{name}``
    ``[batch, P, k]`` (their feature indices, -1 where fewer than k are active).
    ``extract_reconstruction_error`` (True or names) -> ``reconstruction_error_{name}``
    ``[batch, P, d_out]``: the point the dictionary writes minus its reconstruction.

    Modifiers:
        extract_avg: average over each position item's tokens (one slot per item).
        layers: restrict per-layer extraction to these layers (default: all).
        keep_gradient: run with autograd on and keep the graph through extracted tensors.
    """

    extract_embed: bool = False
    extract_resid_in: bool = False
    extract_resid_mid: bool = False
    extract_resid_out: bool = False
    extract_resid_in_post_layernorm: bool = False
    extract_attn_in: bool = False
    extract_attn_out: bool = False
    extract_mlp_in: bool = False
    extract_mlp_out: bool = False
    extract_attn_out_post_norm: bool = False
    extract_mlp_out_post_norm: bool = False
    extract_queries: bool = False
    extract_keys: bool = False
    extract_values: bool = False
    extract_last_layernorm: bool = False
    extract_attn_pattern: bool = False
    extract_avg_attn_pattern: bool = False
    extract_values_vectors_projected: bool = False
    extract_avg_values_vectors_projected: bool = False
    extract_head_out: bool = False
    extract_head_queries: bool = False
    extract_head_keys: bool = False
    extract_head_values: bool = False
    extract_head_queries_projected: bool = False
    extract_head_keys_projected: bool = False
    save_input_ids: bool = False
    save_logits: bool = True
    extract_avg: bool = False
    extract_head_z: bool = False
    attn_heads: list[dict[str, int]] | Literal["all"] = "all"
    attn_pattern_row_positions: list[Any] | None = None
    attn_pattern_all_keys: bool = False
    attn_pattern_avg: Literal["none", "mean", "sum", "baseline_ratio"] = "none"
    layers: list[int] | None = None
    keep_gradient: bool = False
    extract_vision_resid_out: bool = False
    extract_vision_attn_out: bool = False
    extract_projector_out: bool = False
    vision_layers: list[int] | None = None
    extract_features: bool | list[str] = False
    feature_top_k: int | None = None
    extract_reconstruction_error: bool | list[str] = False

    def __post_init__(self) -> None:
        for name in ("layers", "vision_layers"):
            setattr(self, name, _layer_list(name, getattr(self, name)))
        for name in ("extract_features", "extract_reconstruction_error"):
            setattr(self, name, _dictionary_names(name, getattr(self, name)))
        top_k = self.feature_top_k
        if top_k is not None and (
            isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1
        ):
            raise HookscopeError(
                f"ExtractionConfig.feature_top_k must be None (dense) or a positive int, got {top_k!r}."
            )

    def is_not_empty(self) -> bool:
        """True when at least one activation is requested (``save_logits`` aside)."""
        flags = [
            *LAYER_FLAGS,
            *MODEL_FLAGS,
            *HEAD_FLAGS,
            *RUNNING_MEAN_FLAGS,
            *VISION_FLAGS,
            "save_input_ids",
            "extract_features",
            "extract_reconstruction_error",
        ]
        return any(getattr(self, flag) for flag in flags)

    @classmethod
    def from_names(
        cls, names: Sequence[str], model_map: ModelMap | None = None, **options: Any
    ) -> ExtractionConfig:
        """The config that extracts the points ``names``: cache keys (``resid_out_3``,
        ``pattern_L2H5``, ``logits``) or TransformerLens hook names (``blocks.3.hook_resid_post``,
        ``blocks.2.attn.hook_pattern``; see ``hookscope.points.tl_kind``). TransformerLens names
        whose meaning depends on the family (``hook_attn_out``, ``hook_mlp_out``,
        ``ln1.hook_out``, ``attn.hook_rot_q``) need ``model_map`` (``hm.model_map``).

        Flags are per kind and ``layers`` / ``attn_heads`` per config, so naming ``resid_out_1``
        and ``mlp_out_4`` extracts both kinds in layers 1 and 4: the cache holds at least the
        named points. ``options`` are other fields (``save_logits=False``, ...).
        ``features_{name}`` and ``reconstruction_error_{name}`` request an attached dictionary's
        features and reconstruction error.

        Raises:
            ActivationPointError: for a name that is no activation point (listing valid forms),
                or a TransformerLens name with no equal on this model.
        """
        from .points import parse_point, parse_tl_name

        if isinstance(names, str):
            names = [names]
        chosen: dict[str, Any] = {}
        layers, vision_layers, heads, every_head = set(), set(), [], False
        for name in names:
            if (flag := _dictionary_flag(name)) is not None:  # features_{name}, ...
                chosen.setdefault(flag[0], []).append(flag[1])
                continue
            tl = parse_tl_name(name, model_map)
            if tl is not None and tl.head_axis is not None:
                chosen[FLAG_OF_KIND[tl.kind]] = True
                layers.add(tl.layer)
                every_head = True
                continue
            point = parse_point(name, model_map)
            chosen[FLAG_OF_KIND[point.kind]] = True
            if point.kind in VISION_FLAGS.values() and point.layer is not None:
                vision_layers.add(point.layer)
            elif point.layer is not None:
                layers.add(point.layer)
            if point.head is not None:
                heads.append({"layer": point.layer, "head": point.head})
        if layers:
            chosen["layers"] = sorted(layers)
        if vision_layers:
            chosen["vision_layers"] = sorted(vision_layers)
        if heads and not every_head:
            chosen["attn_heads"] = heads
        return cls(**{**chosen, **options})

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict of every field."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExtractionConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise a ``TypeError`` naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TypeError(f"unknown ExtractionConfig fields {unknown}; valid: {sorted(known)}")
        return cls(**data)
