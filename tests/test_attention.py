"""Attention internals under the model's own kernel: patterns, per-head q/k/v, head outputs."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_batch_equals_one_by_one
from tiny_models import EAGER_ONLY, FAMILIES, PROMPTS, build_model, build_tokenizer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from hookscope import ActivationPointError, ExtractionConfig, HookedModel, HookscopeError
from hookscope.attention import output_projection_block

HEADS = ExtractionConfig(
    extract_attn_pattern=True,
    extract_head_queries=True,
    extract_head_keys=True,
    extract_head_values=True,
    extract_head_z=True,
    extract_head_out=True,
    extract_values_vectors_projected=True,
    extract_attn_out=True,
    extract_attn_in=True,
)


@pytest.fixture(scope="module")
def unpadded(hooked, family):
    batch = build_tokenizer()(PROMPTS[2:3], return_tensors="pt")  # 18 tokens > sliding window 4
    cache = hooked.forward(batch, ["all"], extraction_config=HEADS)
    eager = build_model(family, attn_implementation="eager")
    with torch.no_grad():
        reference = eager(**batch, output_attentions=True)
    return batch, cache, reference


def test_pattern_equals_eager_output_attentions(hooked, unpadded):
    _, cache, reference = unpadded
    m = hooked.model_map
    for layer in range(m.n_layers):
        for head in range(m.n_heads):
            pattern = cache[f"pattern_L{layer}H{head}"]
            torch.testing.assert_close(
                pattern, reference.attentions[layer][:, head], rtol=0, atol=1e-5
            )
            torch.testing.assert_close(pattern.sum(-1), torch.ones_like(pattern.sum(-1)))


def test_heads_sum_to_attn_out_minus_bias(hooked, unpadded):
    _, cache, _ = unpadded
    m = hooked.model_map
    for layer in range(m.n_layers):
        o_proj = getattr(m.layers[layer].attention, m.spec.o_proj)
        bias = o_proj.bias if getattr(o_proj, "bias", None) is not None else 0
        total = sum(cache[f"head_out_L{layer}H{h}"] for h in range(m.n_heads))
        torch.testing.assert_close(total, cache[f"attn_out_{layer}"] - bias, rtol=1e-5, atol=1e-5)


def test_pattern_times_values_is_head_z(hooked, unpadded):
    _, cache, _ = unpadded
    m = hooked.model_map
    for layer in range(m.n_layers):
        for head in range(m.n_heads):
            z = cache[f"pattern_L{layer}H{head}"] @ cache[f"head_values_L{layer}H{head}"]
            torch.testing.assert_close(z, cache[f"head_z_L{layer}H{head}"], rtol=1e-5, atol=1e-5)


def test_projected_values_weighted_by_pattern_give_head_out(hooked, unpadded):
    _, cache, _ = unpadded
    m = hooked.model_map
    for layer in range(m.n_layers):
        for head in range(m.n_heads):
            out = cache[f"pattern_L{layer}H{head}"] @ cache[f"projected_value_L{layer}H{head}"]
            torch.testing.assert_close(
                out, cache[f"head_out_L{layer}H{head}"], rtol=1e-5, atol=1e-5
            )


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in EAGER_ONLY])
def test_other_layers_stay_on_sdpa_and_logits_unchanged(family):
    hooked = HookedModel.from_hf(build_model(family), build_tokenizer())
    batch = build_tokenizer("left")(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        plain = hooked.hf_model(
            **batch, position_ids=(batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        ).logits
    real_sdpa, seen = ALL_ATTENTION_FUNCTIONS["sdpa"], []

    def spy(module, *args, **kwargs):
        seen.append(module.layer_idx)
        return real_sdpa(module, *args, **kwargs)

    ALL_ATTENTION_FUNCTIONS["sdpa"] = spy
    try:
        cache = hooked.forward(
            batch,
            ["all"],
            extraction_config=ExtractionConfig(extract_attn_pattern=True, layers=[1]),
        )
    finally:
        del ALL_ATTENTION_FUNCTIONS._local_mapping["sdpa"]
    assert seen == [0, 1], "every layer's output still comes from the SDPA kernel"
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is real_sdpa
    assert sorted(k for k in cache if k.startswith("pattern")) == [
        f"pattern_L1H{h}" for h in range(4)
    ]
    mask = batch["attention_mask"].bool()
    for row in range(len(PROMPTS)):
        n = int(mask[row].sum())
        assert torch.equal(cache["logits"][row, :n], plain[row, mask[row]])


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_padded_batch_equals_one_by_one(hooked, padding_side):
    config = ExtractionConfig(
        **{**HEADS.__dict__, "extract_attn_in": False, "extract_attn_out": False}
    )
    positions = ["last", 0, -3, (1, 3)]
    assert_batch_equals_one_by_one(
        hooked, build_tokenizer(padding_side), PROMPTS, positions, config
    )


def test_gqa_keys_and_values_pick_the_right_group():
    """4 query heads share 2 KV heads: heads 0-1 read group 0, heads 2-3 group 1."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = build_model("llama")
    hooked = HookedModel.from_hf(model, build_tokenizer())
    batch = build_tokenizer()(PROMPTS[0], return_tensors="pt")
    cache = hooked.forward(batch, ["all"], extraction_config=HEADS)
    layer, attention = 1, model.model.layers[1].self_attn
    x = cache[f"attn_in_{layer}"]  # [1, T, d]
    with torch.no_grad():
        q = (x @ attention.q_proj.weight.T).view(1, -1, 4, 16).transpose(1, 2)
        k = (x @ attention.k_proj.weight.T).view(1, -1, 2, 16).transpose(1, 2)
        v = (x @ attention.v_proj.weight.T).view(1, -1, 2, 16)
        positions = torch.arange(x.shape[1]).unsqueeze(0)
        cos, sin = model.model.rotary_emb(x, positions)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
    for head, group in ((0, 0), (1, 0), (2, 1), (3, 1)):
        torch.testing.assert_close(
            cache[f"head_values_L{layer}H{head}"][0], v[0, :, group], rtol=0, atol=1e-5
        )
        torch.testing.assert_close(
            cache[f"head_keys_L{layer}H{head}"][0], k[0, group], rtol=0, atol=1e-5
        )
        torch.testing.assert_close(
            cache[f"head_queries_L{layer}H{head}"][0], q[0, head], rtol=0, atol=1e-5
        )


def test_row_positions_and_all_keys():
    family = "gemma2"  # eager kernel, sliding window, softcapping
    hooked = HookedModel.from_hf(build_model(family), build_tokenizer())
    batch = build_tokenizer()(PROMPTS[2:3], return_tensors="pt")
    with torch.no_grad():
        reference = hooked.hf_model(**batch, output_attentions=True).attentions
    config = ExtractionConfig(
        extract_attn_pattern=True,
        attn_pattern_row_positions=["last", 5],
        attn_pattern_all_keys=True,
    )
    cache = hooked.forward(batch, [0], extraction_config=config)
    assert cache["attn_pattern_row_mapping_index"] == {"last": [0], 5: [1]}
    for layer in range(2):
        expected = reference[layer][:, 1][:, [-1, 5]]
        torch.testing.assert_close(cache[f"pattern_L{layer}H1"], expected, rtol=0, atol=1e-5)
    # layer 0 slides over 4 keys: the last row attends to the last 4 tokens only
    assert (cache["pattern_L0H1"][0, 0, :-4] == 0).all() and (
        cache["pattern_L0H1"][0, 0, -4:] > 0
    ).all()


def test_all_keys_under_left_padding_zero_the_padded_keys(tiny_llama):
    batch = build_tokenizer("left")(PROMPTS, return_tensors="pt", padding=True)
    cache = tiny_llama.forward(
        batch,
        ["last"],
        extraction_config=ExtractionConfig(extract_attn_pattern=True, attn_pattern_all_keys=True),
    )
    pattern = cache["pattern_L0H0"]  # [batch, 1, seq]
    assert pattern.shape == (4, 1, batch["input_ids"].shape[1])
    pad = ~batch["attention_mask"].bool()
    assert (pattern[:, 0][pad] == 0).all()
    torch.testing.assert_close(pattern.sum(-1), torch.ones(4, 1))


def test_running_means_over_a_dataset(tiny_llama):
    tokenizer = build_tokenizer("left")
    config = ExtractionConfig(
        extract_attn_pattern=True,
        extract_avg_attn_pattern=True,
        extract_avg_values_vectors_projected=True,
        extract_values_vectors_projected=True,
        attn_heads=[{"layer": 1, "head": 2}],
    )
    batches = [tokenizer(PROMPTS[i : i + 2], return_tensors="pt", padding=True) for i in (0, 2)]
    cache = tiny_llama.extract_cache(batches, ["last", 0, 1], extraction_config=config)
    assert cache["avg_pattern_L1H2"].shape == (3, 3)
    torch.testing.assert_close(cache["avg_pattern_L1H2"], cache["pattern_L1H2"].mean(0))
    torch.testing.assert_close(
        cache["avg_projected_value_L1H2"], cache["projected_value_L1H2"].mean(0)
    )
    assert cache.running_count("avg_pattern_L1H2").tolist() == [[4] * 3] * 3
    assert not any(k.startswith("pattern_L0") for k in cache)


def test_running_mean_alone_keeps_no_per_example_pattern(tiny_llama):
    config = ExtractionConfig(extract_avg_attn_pattern=True, attn_heads=[{"layer": 0, "head": 1}])
    cache = tiny_llama.forward(PROMPTS[:2], ["last"], extraction_config=config)
    assert [k for k in cache if "pattern" in k] == ["avg_pattern_L0H1"]


def test_attn_heads_validation(tiny_llama):
    with pytest.raises(ActivationPointError, match="head 7 is out of range: layer 0 has 4 heads"):
        tiny_llama.forward(
            PROMPTS[0],
            ["last"],
            extraction_config=ExtractionConfig(
                extract_head_out=True, attn_heads=[{"layer": 0, "head": 7}]
            ),
        )
    with pytest.raises(ActivationPointError, match="exactly the keys"):
        tiny_llama.forward(
            PROMPTS[0],
            ["last"],
            extraction_config=ExtractionConfig(extract_head_out=True, attn_heads=[{"layer": 0}]),
        )
    with pytest.raises(HookscopeError, match="no meaning for attention patterns"):
        tiny_llama.forward(
            PROMPTS[0],
            ["last"],
            extraction_config=ExtractionConfig(extract_attn_pattern=True, extract_avg=True),
        )


def test_registry_restored_after_an_error(tiny_llama):
    before = dict(ALL_ATTENTION_FUNCTIONS._local_mapping)

    def broken(module, args, output):
        raise RuntimeError("boom")

    from hookscope import ModuleHook

    with pytest.raises(RuntimeError, match="boom"):
        tiny_llama.forward(
            PROMPTS[0],
            ["last"],
            extraction_config=ExtractionConfig(extract_attn_pattern=True),
            hooks=[ModuleHook("model.layers.1.mlp", broken)],
        )
    assert dict(ALL_ATTENTION_FUNCTIONS._local_mapping) == before


def test_output_projection_block_reconstructs_o_proj(hooked):
    m = hooked.model_map
    blocks = torch.cat([output_projection_block(m, 0, h) for h in range(m.n_heads)], dim=1)
    o_proj = getattr(m.layers[0].attention, m.spec.o_proj)
    z = torch.randn(3, m.n_heads * m.d_head)
    bias = o_proj.bias if getattr(o_proj, "bias", None) is not None else 0
    with torch.no_grad():
        torch.testing.assert_close(z @ blocks.T + bias, o_proj(z), rtol=1e-5, atol=1e-5)
