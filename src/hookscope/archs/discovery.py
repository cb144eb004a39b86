"""Structural discovery: guess an :class:`ArchSpec` for a ``model_type`` with no entry in the table.

It looks for the usual names of each part. It never guesses ``resid_mid`` or sandwich norms from a
layer that has unusual norms: those stay unknown, and asking for them raises a clear error.
"""

from __future__ import annotations

from torch import nn

from ..errors import ArchitectureError
from .specs import ArchSpec

_ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe")
_SEPARATE_QKV = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"))
_FUSED_QKV = ("qkv_proj", "Wqkv", "c_attn", "query_key_value")
_O_PROJ = ("o_proj", "out_proj", "dense", "c_proj")


def _first_child(module: nn.Module, names: tuple[str, ...]) -> str | None:
    children = dict(module.named_children())
    return next((name for name in names if name in children), None)


def discover_spec(decoder: nn.Module, num_layers: int, model_type: str) -> ArchSpec:
    """Build a spec for ``decoder`` from its module names; raise naming the part not found."""
    layers_name = next(
        (
            name
            for name, child in decoder.named_children()
            if isinstance(child, nn.ModuleList) and len(child) == num_layers
        ),
        None,
    )
    if layers_name is None:
        raise ArchitectureError(
            f"model_type {model_type!r} is not in hookscope's table and structural discovery found "
            f"no nn.ModuleList of {num_layers} decoder layers under {type(decoder).__name__} "
            f"(children: {[n for n, _ in decoder.named_children()]})."
        )
    layer = getattr(decoder, layers_name)[0]
    attention = _first_child(layer, _ATTENTION_NAMES)
    mlp = _first_child(layer, _MLP_NAMES)
    norms = [n for n, _ in decoder.named_children() if "norm" in n.lower() or n == "ln_f"]
    embed = decoder.get_input_embeddings() if hasattr(decoder, "get_input_embeddings") else None
    embed_name = next((n for n, c in decoder.named_children() if c is embed), None)
    missing = [
        part
        for part, found in (
            ("attention module (one of " + ", ".join(_ATTENTION_NAMES) + ")", attention),
            ("MLP module (one of " + ", ".join(_MLP_NAMES) + ")", mlp),
            ("final norm (a child of the decoder named *norm*)", norms),
            ("token embedding", embed_name),
        )
        if not found
    ]
    if missing:
        raise ArchitectureError(
            f"model_type {model_type!r} is not in hookscope's table and structural discovery could "
            f"not find: {'; '.join(missing)} in {type(layer).__name__} "
            f"(children: {[n for n, _ in layer.named_children()]})."
        )
    attn_module = getattr(layer, attention)
    separate = next(
        (names for names in _SEPARATE_QKV if all(hasattr(attn_module, n) for n in names)), None
    )
    layer_children = dict(layer.named_children())
    # Only the plain Llama-style layout is trusted for resid_mid: one pre-MLP norm, no sandwich.
    plain_pre_norm = "post_attention_layernorm" in layer_children and not any(
        n in layer_children for n in ("pre_feedforward_layernorm", "post_feedforward_layernorm")
    )
    return ArchSpec(
        layers=layers_name,
        attention=attention,
        mlp=mlp,
        final_norm=norms[-1],
        embed=embed_name,
        q_proj=separate[0] if separate else None,
        k_proj=separate[1] if separate else None,
        v_proj=separate[2] if separate else None,
        qkv_proj=None if separate else _first_child(attn_module, _FUSED_QKV),
        o_proj=_first_child(attn_module, _O_PROJ) or "o_proj",
        input_norm="input_layernorm" if "input_layernorm" in layer_children else None,
        resid_mid_site="post_attention_layernorm" if plain_pre_norm else None,
    )
