"""The activation-point grammar: cache key names <-> ``(kind, layer, head)``.

Three shapes of name, parsed in this one place:

* model-level: ``input_embeddings``, ``last_layernorm``, ``logits``, ``input_ids``
* per layer: ``{kind}_{layer}``, e.g. ``resid_out_3``, ``attn_in_0``
* per head: ``{kind}_L{layer}H{head}``, e.g. ``pattern_L2H5``, ``head_out_L0H1``

TransformerLens hook names are accepted as aliases (``blocks.3.hook_resid_post`` is
``resid_out_3``), so code and SAE weights keyed by them carry over: see :data:`TL_LAYER_HOOKS`
and :data:`TL_HEAD_HOOKS`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from .errors import ActivationPointError, choices

Scope = Literal["model", "layer", "head"]


@dataclass(frozen=True)
class PointKind:
    """One kind of activation point, with its one-line definition (the docs table uses it)."""

    name: str
    scope: Scope
    shape: str
    definition: str


KINDS: dict[str, PointKind] = {
    kind.name: kind
    for kind in (
        PointKind(
            "input_embeddings",
            "model",
            "[batch, pos, d_model]",
            "What enters layer 0: token (+ position) embeddings after any embedding scaling.",
        ),
        PointKind(
            "resid_in",
            "layer",
            "[batch, pos, d_model]",
            "Input of decoder layer l (the residual stream).",
        ),
        PointKind(
            "resid_mid",
            "layer",
            "[batch, pos, d_model]",
            "Residual stream between the attention and MLP sub-blocks: resid_in_l plus what "
            "attention adds (not normalised). Absent in parallel-residual blocks.",
        ),
        PointKind("resid_out", "layer", "[batch, pos, d_model]", "Output of decoder layer l."),
        PointKind(
            "attn_in",
            "layer",
            "[batch, pos, d_model]",
            "Input of the attention module of layer l (after the input norm, where there is one).",
        ),
        PointKind(
            "resid_in_post_layernorm",
            "layer",
            "[batch, pos, d_model]",
            "Reference-design name of attn_in_l: the residual stream after the input norm.",
        ),
        PointKind(
            "attn_out",
            "layer",
            "[batch, pos, d_model]",
            "Output of the attention module of layer l (after the output projection, before any "
            "post-attention norm of sandwich-norm families).",
        ),
        PointKind(
            "mlp_out",
            "layer",
            "[batch, pos, d_model]",
            "Output of the MLP (or mixture-of-experts) module of layer l.",
        ),
        PointKind(
            "queries",
            "layer",
            "[batch, pos, n_heads * d_head]",
            "Query projection output of layer l, flat (before rotary embedding and any q-norm).",
        ),
        PointKind(
            "keys",
            "layer",
            "[batch, pos, n_kv_heads * d_head]",
            "Key projection output of layer l, flat (before rotary embedding and any k-norm).",
        ),
        PointKind(
            "values",
            "layer",
            "[batch, pos, n_kv_heads * d_head]",
            "Value projection output of layer l, flat.",
        ),
        PointKind(
            "last_layernorm",
            "model",
            "[batch, pos, d_model]",
            "Output of the final norm (what the unembedding reads).",
        ),
        PointKind(
            "logits", "model", "[batch, pos, vocab]", "Model logits at the target positions."
        ),
        PointKind(
            "input_ids",
            "model",
            "[batch, seq]",
            "The token ids of the batch, as given (all tokens).",
        ),
        PointKind(
            "pattern",
            "head",
            "[batch, rows, P]",
            "Post-softmax attention probabilities of head h: rows = query positions (the targets, "
            "or attn_pattern_row_positions), columns = the target key positions (or every key "
            "with attn_pattern_all_keys: [batch, rows, seq]).",
        ),
        PointKind(
            "avg_pattern",
            "head",
            "[rows, P]",
            "Running mean of pattern_L{l}H{h} over every example seen (padded cells excluded).",
        ),
        PointKind(
            "head_queries",
            "head",
            "[batch, P, d_head]",
            "The query vector head h uses, as the attention kernel receives it (after any q-norm "
            "and rotary embedding).",
        ),
        PointKind(
            "head_keys",
            "head",
            "[batch, P, d_head]",
            "The key vector head h reads (its KV group's under grouped-query attention), after "
            "any k-norm and rotary embedding.",
        ),
        PointKind(
            "head_values",
            "head",
            "[batch, P, d_head]",
            "The value vector head h reads (its KV group's under grouped-query attention).",
        ),
        PointKind(
            "head_z",
            "head",
            "[batch, P, d_head]",
            "Head h's slice of the output-projection input (pattern @ values for that head).",
        ),
        PointKind(
            "head_out",
            "head",
            "[batch, P, d_model]",
            "Head h's contribution to attn_out: head_z through head h's block of W_O "
            "(sum over heads = attn_out minus the output-projection bias).",
        ),
        PointKind(
            "projected_value",
            "head",
            "[batch, P, d_model]",
            "Each position's value vector for head h through head h's block of W_O.",
        ),
        PointKind(
            "vision_resid_out",
            "layer",
            "[images, patches, d_vision]",
            "Output of block l of the vision encoder (vision-language models; no position axis: "
            "the whole tensor the block returns).",
        ),
        PointKind(
            "vision_attn_out",
            "layer",
            "[images, patches, d_vision]",
            "Output of the attention module of vision block l.",
        ),
        PointKind(
            "projector_out",
            "model",
            "[images, image_tokens, d_model]",
            "The image features in the language model's space (what replaces the image tokens' "
            "embeddings; flattened it equals resid_in_0 at 'all-image').",
        ),
        PointKind(
            "avg_projected_value",
            "head",
            "[P, d_model]",
            "Running mean of projected_value_L{l}H{h} over every example seen.",
        ),
    )
}

# TransformerLens hook names (``blocks.{l}.<hook>``) whose definition equals a hookscope kind
# (tests/test_parity.py checks each against TransformerLens 4's TransformerBridge).
TL_LAYER_HOOKS: dict[str, str] = {
    "hook_resid_pre": "resid_in",
    "hook_resid_mid": "resid_mid",
    "hook_resid_post": "resid_out",
    "hook_attn_out": "attn_out",
    "hook_mlp_out": "mlp_out",
    "ln1.hook_out": "attn_in",
}
# Hooks that hold every head of a layer: hook -> (per-head kind, TransformerLens's head axis).
# ``attn.hook_pattern`` is [batch, heads, query, key]; ``attn.hook_z`` and ``attn.hook_rot_q`` (the
# queries after rotary embedding, rotary models only) are [batch, pos, heads, d_head].
TL_HEAD_HOOKS: dict[str, tuple[str, int]] = {
    "attn.hook_pattern": ("pattern", 1),
    "attn.hook_z": ("head_z", 2),
    "attn.hook_rot_q": ("head_queries", 2),
}
_TL_NAME = re.compile(r"^blocks\.(?P<layer>\d+)\.(?P<hook>.+)$")


@dataclass(frozen=True)
class TLName:
    """A TransformerLens hook name, translated: ``head_axis`` is None for one-point hooks, else
    the axis along which the per-head points of ``kind`` stack into TransformerLens's layout."""

    kind: str
    layer: int
    head_axis: int | None = None


def parse_tl_name(name: str) -> TLName | None:
    """Translate a TransformerLens hook name; None when ``name`` is not of the ``blocks.`` form.

    Raises:
        ActivationPointError: a ``blocks.{l}.`` name whose hook has no hookscope equivalent.
    """
    match = _TL_NAME.match(name) if isinstance(name, str) else None
    if match is None:
        return None
    layer, hook = int(match["layer"]), match["hook"]
    if hook in TL_LAYER_HOOKS:
        return TLName(TL_LAYER_HOOKS[hook], layer)
    if hook in TL_HEAD_HOOKS:
        kind, axis = TL_HEAD_HOOKS[hook]
        return TLName(kind, layer, axis)
    raise ActivationPointError(
        f"TransformerLens hook {name!r} has no hookscope equivalent. Supported: "
        f"{choices([f'blocks.{{l}}.{hook}' for hook in [*TL_LAYER_HOOKS, *TL_HEAD_HOOKS]])}."
    )


_LAYER_NAME = re.compile(r"^(?P<kind>[a-z_]+?)_(?P<layer>\d+)$")
_HEAD_NAME = re.compile(r"^(?P<kind>[a-z_]+?)_L(?P<layer>\d+)H(?P<head>\d+)$")


@dataclass(frozen=True)
class Point:
    """One activation point: a kind, plus a layer (and a head) where the kind has one."""

    kind: str
    layer: int | None = None
    head: int | None = None

    @property
    def name(self) -> str:
        """The cache key: ``resid_out_3``, ``pattern_L2H5`` or ``input_embeddings``."""
        if self.head is not None:
            return f"{self.kind}_L{self.layer}H{self.head}"
        if self.layer is not None:
            return f"{self.kind}_{self.layer}"
        return self.kind

    def __str__(self) -> str:
        return self.name


def parse_point(name: str) -> Point:
    """Parse a cache key (or a TransformerLens hook name of one point) into a :class:`Point`.

    Raises:
        ActivationPointError: for a malformed name or an unknown kind (listing the valid kinds).
    """
    if not isinstance(name, str):
        raise ActivationPointError(f"activation point names are strings, got {name!r}.")
    if (tl := parse_tl_name(name)) is not None:
        if tl.head_axis is not None:
            raise ActivationPointError(
                f"{name!r} holds every head of layer {tl.layer}: name one head here "
                f"({tl.kind}_L{tl.layer}H0, ...); a cache reads {name!r} as the heads stacked."
            )
        return Point(tl.kind, tl.layer)
    if name in KINDS and KINDS[name].scope == "model":
        return Point(name)
    if (match := _HEAD_NAME.match(name)) and match["kind"] in KINDS:
        return Point(match["kind"], int(match["layer"]), int(match["head"]))
    if (match := _LAYER_NAME.match(name)) and match["kind"] in KINDS:
        return Point(match["kind"], int(match["layer"]))
    scoped = {
        scope: [k for k, v in KINDS.items() if v.scope == scope]
        for scope in ("model", "layer", "head")
    }
    raise ActivationPointError(
        f"unknown activation point {name!r}. Valid: {choices(scoped['model'])}; "
        f"'{{kind}}_{{layer}}' with kind in {choices(scoped['layer'])}; or "
        f"'{{kind}}_L{{layer}}H{{head}}' with kind in {choices(scoped['head'])}."
    )


def check_layer(layer: int, n_layers: int, what: str = "layer") -> None:
    """Raise a clear error when ``layer`` is not in ``0..n_layers-1``."""
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_layers:
        raise ActivationPointError(
            f"{what} {layer!r} is out of range: this model has {n_layers} layers (valid 0..{n_layers - 1})."
        )
