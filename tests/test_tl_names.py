"""TransformerLens hook names as aliases: selecting, reading and intervening by them.

Ground truth is HF itself (``output_hidden_states``, eager ``output_attentions``, the input of
the output projection); tests/test_parity.py compares the same names with TransformerLens.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import PROMPTS, build_model, build_tokenizer

from hookscope import ActivationPointError, ExtractionConfig, HookedModel, InputError
from hookscope.interventions import Steer
from hookscope.points import Point, parse_point


def test_parse_point_translates_one_point_hooks(tiny_llama):
    assert parse_point("blocks.3.hook_resid_post") == Point("resid_out", 3)
    assert parse_point("blocks.0.hook_resid_pre") == Point("resid_in", 0)
    llama = tiny_llama.model_map
    assert parse_point("blocks.2.hook_mlp_out", llama) == Point("mlp_out", 2)
    assert parse_point("blocks.2.ln1.hook_out", llama) == Point("attn_in", 2)
    # names whose hookscope equal depends on the family need the model
    for hook in ("hook_attn_out", "hook_mlp_out", "ln1.hook_out"):
        with pytest.raises(ActivationPointError, match="depends on the family.*with the model"):
            parse_point(f"blocks.1.{hook}")
    with pytest.raises(ActivationPointError, match="hook_normalized.*Supported.*hook_resid_post"):
        parse_point("blocks.1.ln1.hook_normalized")
    with pytest.raises(ActivationPointError, match="every head of layer 1.*pattern_L1H0"):
        parse_point("blocks.1.attn.hook_pattern")


def test_from_names_sets_flags_layers_and_heads():
    config = ExtractionConfig.from_names(
        ["blocks.1.hook_resid_post", "mlp_out_0", "pattern_L1H2"], save_logits=False
    )
    assert config.extract_resid_out and config.extract_mlp_out and config.extract_attn_pattern
    assert config.layers == [0, 1] and config.attn_heads == [{"layer": 1, "head": 2}]
    assert not config.save_logits and not config.extract_resid_in
    every_head = ExtractionConfig.from_names(["blocks.1.attn.hook_z", "pattern_L0H1"])
    assert every_head.extract_head_z and every_head.attn_heads == "all"
    with pytest.raises(ActivationPointError, match="unknown activation point 'resid'"):
        ExtractionConfig.from_names(["resid"])


def test_cache_reads_resid_names_against_hidden_states(tiny_llama):
    tokenizer = build_tokenizer("left")
    batch = tokenizer(PROMPTS[:3], return_tensors="pt", padding=True)
    # HF's last hidden state is after the final norm: compare the layers before it
    names = ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_post", "blocks.1.hook_attn_out"]
    cache = tiny_llama.forward(batch, ["all"], names=names)
    for row, prompt in enumerate(PROMPTS[:3]):  # ground truth: each prompt alone through HF
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        hidden = tiny_llama.hf_model(input_ids=ids, output_hidden_states=True).hidden_states
        count = ids.shape[1]  # "all" left-aligns a row's real tokens in its slots
        for name, expected in zip(names[:2], hidden[:2], strict=True):
            assert name in cache
            torch.testing.assert_close(cache[name][row, :count], expected[0], rtol=0, atol=1e-5)
    assert torch.equal(cache["blocks.1.hook_attn_out"], cache["attn_out_1"])
    assert "blocks.0.hook_mlp_out" not in cache and "blocks.0.ln1.hook_normalized" not in cache


def test_pattern_stack_equals_eager_output_attentions():
    model = build_model("llama", attn_implementation="eager")
    hm = HookedModel.from_hf(model, build_tokenizer())
    ids = build_tokenizer()(PROMPTS[2], return_tensors="pt")["input_ids"]
    cache = hm.forward({"input_ids": ids}, ["all"], names=["blocks.1.attn.hook_pattern"])
    expected = model(input_ids=ids, output_attentions=True).attentions[1]  # [1, heads, q, k]
    stacked = cache["blocks.1.attn.hook_pattern"]
    assert stacked.shape == expected.shape
    torch.testing.assert_close(stacked, expected, rtol=0, atol=1e-6)


def test_z_stack_equals_output_projection_input(tiny_llama):
    ids = build_tokenizer()(PROMPTS[1], return_tensors="pt")["input_ids"]
    seen = {}
    o_proj = tiny_llama.hf_model.model.layers[0].self_attn.o_proj
    handle = o_proj.register_forward_pre_hook(lambda _m, args: seen.update(z=args[0]))
    try:
        cache = tiny_llama.forward({"input_ids": ids}, ["all"], names=["blocks.0.attn.hook_z"])
    finally:
        handle.remove()
    m = tiny_llama.model_map
    expected = seen["z"].view(1, ids.shape[1], m.n_heads, -1)  # [batch, pos, heads, d_head]
    torch.testing.assert_close(cache["blocks.0.attn.hook_z"], expected, rtol=0, atol=1e-6)


def test_rot_q_equals_hf_rotary_queries(tiny_llama):
    """Ground truth: HF's q_proj on the attention input, through HF's apply_rotary_pos_emb."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    ids = build_tokenizer()(PROMPTS[1], return_tensors="pt")["input_ids"]
    attention = tiny_llama.hf_model.model.layers[1].self_attn
    seen = {}
    handle = attention.register_forward_pre_hook(
        lambda _m, _args, kwargs: seen.update(kwargs), with_kwargs=True
    )
    try:
        cache = tiny_llama.forward({"input_ids": ids}, ["all"], names=["blocks.1.attn.hook_rot_q"])
    finally:
        handle.remove()
    m = tiny_llama.model_map
    queries = attention.q_proj(seen["hidden_states"]).view(1, ids.shape[1], m.n_heads, -1)
    cos, sin = seen["position_embeddings"]
    rotated, _ = apply_rotary_pos_emb(queries.transpose(1, 2), queries.transpose(1, 2), cos, sin)
    expected = rotated.transpose(1, 2)  # [batch, pos, heads, d_head], TransformerLens's layout
    torch.testing.assert_close(cache["blocks.1.attn.hook_rot_q"], expected, rtol=0, atol=1e-5)


def test_stacking_needs_every_head_from_zero(tiny_llama):
    ids = build_tokenizer()(PROMPTS[1], return_tensors="pt")["input_ids"]
    cache = tiny_llama.forward({"input_ids": ids}, ["all"], names=["pattern_L0H1"])
    assert "blocks.0.attn.hook_pattern" not in cache
    with pytest.raises(KeyError, match="every head of layer 0"):
        cache["blocks.0.attn.hook_pattern"]


def test_steer_at_a_tl_name_equals_steer_at_the_key(tiny_llama):
    ids = build_tokenizer()(PROMPTS[0], return_tensors="pt")["input_ids"]
    vector = torch.linspace(-1, 1, tiny_llama.model_map.d_model)
    logits = [
        tiny_llama.forward(
            {"input_ids": ids},
            ["last"],
            interventions=[Steer(point=point, positions=["last"], vector=vector, coefficient=3.0)],
        )["logits"]
        for point in ("blocks.0.hook_resid_post", "resid_out_0")
    ]
    plain = tiny_llama.forward({"input_ids": ids}, ["last"])["logits"]
    assert torch.equal(logits[0], logits[1]) and not torch.allclose(logits[0], plain)


def test_names_in_extract_cache_and_exclusive_with_a_config(tiny_llama):
    cache = tiny_llama.extract_cache(PROMPTS, ["last"], names=["blocks.1.hook_resid_post"])
    single = tiny_llama.forward(PROMPTS[3], ["last"], names=["resid_out_1"])
    torch.testing.assert_close(cache["blocks.1.hook_resid_post"][3], single["resid_out_1"][0])
    with pytest.raises(InputError, match="names or extraction_config, not both"):
        tiny_llama.forward(
            PROMPTS[0], ["last"], names=["resid_out_1"], extraction_config=ExtractionConfig()
        )
