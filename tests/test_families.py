"""Every supported family, on a tiny random model: each activation point checked against an
independent ground truth (HF hidden states, identities, hand computations from the weights)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_batch_equals_one_by_one
from tiny_models import INPUT_NORM, PROMPTS, build_model, build_tokenizer

from hookscope import ActivationPointError, ExtractionConfig, HookedModel

ALL_LAYER_POINTS = ExtractionConfig(
    extract_embed=True,
    extract_resid_in=True,
    extract_resid_mid=True,
    extract_resid_out=True,
    extract_resid_in_post_layernorm=True,
    extract_attn_in=True,
    extract_attn_out=True,
    extract_mlp_out=True,
    extract_queries=True,
    extract_keys=True,
    extract_values=True,
    extract_last_layernorm=True,
)


def _config_for(hm: HookedModel, **overrides) -> ExtractionConfig:
    config = ExtractionConfig(**{**ALL_LAYER_POINTS.__dict__, **overrides})
    if hm.model_map.parallel_residual:
        config.extract_resid_mid = False
    return config


@pytest.fixture(scope="module")
def unpadded(hooked):
    """One prompt per row, no padding, and the HF reference outputs."""
    batch = hooked.get_tokenizer()(PROMPTS[0], return_tensors="pt")
    batch = {k: v.repeat(2, 1) for k, v in batch.items()}
    batch["input_ids"][1, 2:] = batch["input_ids"][1, 2:].flip(0)  # two different rows
    with torch.no_grad():
        reference = hooked.hf_model(**batch, output_hidden_states=True)
    cache = hooked.forward(batch, ["all"], extraction_config=_config_for(hooked))
    return batch, reference, cache


def test_plain_forward_is_bit_identical(hooked, unpadded):
    batch, reference, _ = unpadded
    cache = hooked.forward(batch, ["all"])
    assert torch.equal(cache["logits"], reference.logits)


def test_logits_bit_identical_with_extraction_active(unpadded):
    _, reference, cache = unpadded
    assert torch.equal(cache["logits"], reference.logits)


def test_resid_in_equals_hf_hidden_states(hooked, unpadded):
    _, reference, cache = unpadded
    hidden = reference.hidden_states
    assert torch.equal(cache["input_embeddings"], hidden[0])
    for layer in range(hooked.model_map.n_layers):
        assert torch.equal(cache[f"resid_in_{layer}"], hidden[layer]), layer


def test_resid_out_chain_and_final_norm(hooked, unpadded):
    _, reference, cache = unpadded
    n = hooked.model_map.n_layers
    for layer in range(n - 1):
        assert torch.equal(cache[f"resid_out_{layer}"], cache[f"resid_in_{layer + 1}"])
    # HF's last hidden state is taken after the final norm.
    with torch.no_grad():
        normed = hooked.model_map.final_norm(cache[f"resid_out_{n - 1}"])
    torch.testing.assert_close(normed, reference.hidden_states[n], rtol=0, atol=1e-6)
    assert torch.equal(cache["last_layernorm"], reference.hidden_states[n])


def test_residual_identities(hooked, unpadded):
    """resid_mid = resid_in + what attention adds; resid_out = resid_mid + what the MLP adds."""
    _, _, cache = unpadded
    model_map = hooked.model_map
    for layer, parts in enumerate(model_map.layers):
        resid_in, attn_out, mlp_out = (
            cache[f"{k}_{layer}"] for k in ("resid_in", "attn_out", "mlp_out")
        )
        with torch.no_grad():
            attn_added = parts.attn_out_norm(attn_out) if parts.attn_out_norm else attn_out
            mlp_added = parts.mlp_out_norm(mlp_out) if parts.mlp_out_norm else mlp_out
        resid_out = cache[f"resid_out_{layer}"]
        if model_map.parallel_residual:
            torch.testing.assert_close(resid_out, resid_in + attn_out + mlp_out, rtol=0, atol=1e-5)
            continue
        resid_mid = cache[f"resid_mid_{layer}"]
        torch.testing.assert_close(resid_mid, resid_in + attn_added, rtol=0, atol=1e-5)
        torch.testing.assert_close(resid_out, resid_mid + mlp_added, rtol=0, atol=1e-5)


def test_attn_in_is_input_norm_of_resid_in(hooked, family, unpadded):
    _, _, cache = unpadded
    for layer, parts in enumerate(hooked.model_map.layers):
        norm_name = INPUT_NORM[family]
        resid_in = cache[f"resid_in_{layer}"]
        with torch.no_grad():
            expected = getattr(parts.block, norm_name)(resid_in) if norm_name else resid_in
        torch.testing.assert_close(cache[f"attn_in_{layer}"], expected, rtol=0, atol=1e-6)
        assert torch.equal(cache[f"resid_in_post_layernorm_{layer}"], cache[f"attn_in_{layer}"])


def _hand_qkv(hooked, family, layer, attn_in):
    """q, k, v computed by hand from the projection weights (flat, before rotary / qk-norm)."""
    attention = hooked.model_map.layers[layer].attention
    m = hooked.model_map
    h, kv, dh = m.n_heads, m.n_kv_heads, m.d_head

    def linear(module, x):
        if family == "gpt2":  # Conv1D stores weight as [in, out]
            return x @ module.weight + module.bias
        return F.linear(x, module.weight, module.bias)

    if family == "gpt2":
        fused = linear(attention.c_attn, attn_in)
        return fused[..., : h * dh], fused[..., h * dh : 2 * h * dh], fused[..., 2 * h * dh :]
    if family.startswith("gpt_neox"):
        fused = linear(attention.query_key_value, attn_in).view(*attn_in.shape[:-1], h, 3, dh)
        return tuple(fused[..., i, :].flatten(-2) for i in range(3))
    if family == "phi3":
        fused = linear(attention.qkv_proj, attn_in)
        return fused[..., : h * dh], fused[..., h * dh : (h + kv) * dh], fused[..., (h + kv) * dh :]
    return tuple(linear(getattr(attention, n), attn_in) for n in ("q_proj", "k_proj", "v_proj"))


def test_queries_keys_values_match_hand_computation(hooked, family, unpadded):
    _, _, cache = unpadded
    for layer in range(hooked.model_map.n_layers):
        with torch.no_grad():
            q, k, v = _hand_qkv(hooked, family, layer, cache[f"attn_in_{layer}"])
        torch.testing.assert_close(cache[f"queries_{layer}"], q, rtol=0, atol=1e-5)
        torch.testing.assert_close(cache[f"keys_{layer}"], k, rtol=0, atol=1e-5)
        torch.testing.assert_close(cache[f"values_{layer}"], v, rtol=0, atol=1e-5)
        assert (
            cache[f"keys_{layer}"].shape[-1]
            == hooked.model_map.n_kv_heads * hooked.model_map.d_head
        )


POSITIONS = ["last", "first", 0, 1, -2, (0, 2), (-3, -1), "last-2"]


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_padded_batch_equals_one_by_one(hooked, padding_side):
    config = _config_for(hooked, extract_last_layernorm=False, extract_embed=False)
    assert_batch_equals_one_by_one(
        hooked, build_tokenizer(padding_side), PROMPTS, POSITIONS, config
    )


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_all_positions_under_padding_are_masked_not_misaligned(hooked, padding_side):
    tokenizer = build_tokenizer(padding_side)
    config = ExtractionConfig(extract_resid_out=True)
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    cache = hooked.forward(batch, ["all", "last"], extraction_config=config)
    lengths = batch["attention_mask"].sum(1)
    width = int(lengths.max())
    assert cache["mapping_index"] == {"all": list(range(width)), "last": [width]}
    for row, prompt in enumerate(PROMPTS):
        n = int(lengths[row])
        assert cache["position_mask"][row].tolist() == [True] * n + [False] * (width - n) + [True]
        alone = hooked.forward(
            tokenizer(prompt, return_tensors="pt"), ["all"], extraction_config=config
        )
        torch.testing.assert_close(
            cache["resid_out_1"][row, :n], alone["resid_out_1"][0], rtol=1e-5, atol=1e-5
        )
        assert torch.all(cache["resid_out_1"][row, n:width] == 0)


def test_resid_mid_absent_in_parallel_residual():
    hooked = HookedModel.from_hf(build_model("gpt_neox"), build_tokenizer())
    assert hooked.model_map.parallel_residual
    with pytest.raises(ActivationPointError, match="parallel residual"):
        hooked.forward(
            PROMPTS[0], ["last"], extraction_config=ExtractionConfig(extract_resid_mid=True)
        )


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_plain_forward_bit_identical_under_padding(hooked, padding_side):
    """Padded batches: hookscope only adds position_ids from the mask (as HF generate does)."""
    batch = build_tokenizer(padding_side)(PROMPTS, return_tensors="pt", padding=True)
    cache = hooked.forward(batch, ["all"])
    mask = batch["attention_mask"]
    position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with torch.no_grad():
        reference = hooked.hf_model(**batch, position_ids=position_ids).logits
    for row in range(len(PROMPTS)):
        real = mask[row].bool()
        n = int(real.sum())
        assert torch.equal(cache["logits"][row, :n], reference[row, real])


def test_extract_avg_is_mean_of_item_positions(hooked):
    batch = build_tokenizer()(PROMPTS[:1], return_tensors="pt")
    full = hooked.forward(
        batch, [(0, 3), "last"], extraction_config=ExtractionConfig(extract_resid_out=True)
    )
    avg = hooked.forward(
        batch,
        [(0, 3), "last"],
        extraction_config=ExtractionConfig(extract_resid_out=True, extract_avg=True),
    )
    assert avg["mapping_index"] == {(0, 3): [0], "last": [1]}
    torch.testing.assert_close(avg["resid_out_0"][:, 0], full["resid_out_0"][:, :3].mean(1))
    torch.testing.assert_close(avg["resid_out_0"][:, 1], full["resid_out_0"][:, 3])
