"""Model support as data: one :class:`ArchSpec` per HF ``model_type``.

A spec says where each part of a decoder block lives, as attribute names. Paths are relative:
``layers``, ``final_norm`` and ``embed`` to the text decoder (``model.get_decoder()``), every other
part to one decoder layer (``attention``, ``mlp``, norms) or to its attention module (projections).
Adding a family of a known shape is adding one entry to :data:`SPECS`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

QKVLayout = Literal["concat", "neox"]


@dataclass(frozen=True)
class ArchSpec:
    """Where the parts of one architecture live (attribute names, see the module docstring).

    Attributes:
        layers: the ``nn.ModuleList`` of decoder layers, under the decoder.
        attention: the self-attention module, under a layer.
        mlp: the MLP (or mixture-of-experts) module, under a layer.
        final_norm: the norm applied after the last layer, under the decoder.
        embed: the token embedding, under the decoder.
        q_proj, k_proj, v_proj: separate projections under the attention module, or ``None``.
        qkv_proj: one fused projection under the attention module, or ``None``.
        qkv_layout: how the fused output splits: ``"concat"`` is ``[q | k | v]`` along the last
            axis (GPT-2, Phi-3); ``"neox"`` interleaves per head ``[q_h | k_h | v_h]`` (GPT-NeoX).
        o_proj: the attention output projection under the attention module.
        input_norm: the norm before attention (its output is ``attn_in``), under a layer, or
            ``None`` for post-norm blocks (OLMo2) whose attention reads the residual stream.
        resid_mid_site: the layer child whose *input* is the residual stream between the
            attention and MLP sub-blocks; ``None`` where the block has no such tensor.
        attn_out_norm / mlp_out_norm: a norm applied to the attention / MLP output before it is
            added to the residual stream ("sandwich" norms: Gemma2/3, OLMo2), or ``None``.
        parallel_residual_flag: a config attribute that, when true, makes attention and MLP read
            the same input in parallel (then there is no ``resid_mid``).
    """

    layers: str = "layers"
    attention: str = "self_attn"
    mlp: str = "mlp"
    final_norm: str = "norm"
    embed: str = "embed_tokens"
    q_proj: str | None = "q_proj"
    k_proj: str | None = "k_proj"
    v_proj: str | None = "v_proj"
    qkv_proj: str | None = None
    qkv_layout: QKVLayout = "concat"
    o_proj: str = "o_proj"
    input_norm: str | None = "input_layernorm"
    resid_mid_site: str | None = "post_attention_layernorm"
    attn_out_norm: str | None = None
    mlp_out_norm: str | None = None
    parallel_residual_flag: str | None = None


LLAMA_LIKE = ArchSpec()
SANDWICH_NORMS = replace(
    LLAMA_LIKE,
    resid_mid_site="pre_feedforward_layernorm",
    attn_out_norm="post_attention_layernorm",
    mlp_out_norm="post_feedforward_layernorm",
)
# OLMo2 is post-norm: no input norm, sub-block outputs are normalised before the residual add.
OLMO2 = replace(
    LLAMA_LIKE,
    input_norm=None,
    resid_mid_site="mlp",
    attn_out_norm="post_attention_layernorm",
    mlp_out_norm="post_feedforward_layernorm",
)
PHI3 = replace(LLAMA_LIKE, q_proj=None, k_proj=None, v_proj=None, qkv_proj="qkv_proj")
GPT2 = ArchSpec(
    layers="h",
    attention="attn",
    final_norm="ln_f",
    embed="wte",
    q_proj=None,
    k_proj=None,
    v_proj=None,
    qkv_proj="c_attn",
    o_proj="c_proj",
    input_norm="ln_1",
    resid_mid_site="ln_2",
)
GPT_NEOX = ArchSpec(
    attention="attention",
    final_norm="final_layer_norm",
    embed="embed_in",
    q_proj=None,
    k_proj=None,
    v_proj=None,
    qkv_proj="query_key_value",
    qkv_layout="neox",
    o_proj="dense",
    parallel_residual_flag="use_parallel_residual",
)

SPECS: dict[str, ArchSpec] = {
    **{
        name: LLAMA_LIKE
        for name in (
            "llama",
            "mistral",
            "mixtral",
            "qwen2",
            "qwen2_moe",
            "qwen3",
            "qwen3_moe",
            "gemma",
            "olmo",
            "smollm3",
        )
    },
    "gemma2": SANDWICH_NORMS,
    "gemma3_text": SANDWICH_NORMS,
    "olmo2": OLMO2,
    "olmo3": OLMO2,
    "phi3": PHI3,
    "gpt2": GPT2,
    "gpt_neox": GPT_NEOX,
}
