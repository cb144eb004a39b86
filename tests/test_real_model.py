"""The embedded default model, SmolLM2-135M-Instruct (Llama, 30 layers, 9 heads / 3 KV heads)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_batch_equals_one_by_one

from hookscope import ExtractionConfig, HookedModel

pytestmark = pytest.mark.real_model

PROMPTS = ["The capital of France is", "Hello, my name is Alice and I", "1 2 3 4 5 6"]


@pytest.fixture(scope="module")
def smol():
    return HookedModel.from_pretrained()


def test_default_model_loads(smol):
    m = smol.model_map
    assert (m.model_type, m.n_layers, m.n_heads, m.n_kv_heads, m.d_model) == (
        "llama",
        30,
        9,
        3,
        576,
    )


def test_paris(smol):
    cache = smol.forward("The capital of France is", ["last"])
    top = cache["logits"][0, 0].argmax()
    assert smol.to_string_tokens([int(top)]) == [" Paris"]


def test_plain_forward_bit_identical_and_hidden_states(smol):
    batch = smol.get_tokenizer()(PROMPTS[1], return_tensors="pt")
    cache = smol.forward(
        batch,
        ["all"],
        extraction_config=ExtractionConfig(extract_resid_in=True, layers=[0, 15, 29]),
    )
    with torch.no_grad():
        reference = smol.hf_model(**batch, output_hidden_states=True)
    assert torch.equal(cache["logits"], reference.logits)
    for layer in (0, 15, 29):
        assert torch.equal(cache[f"resid_in_{layer}"], reference.hidden_states[layer])


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_padded_batch_equals_one_by_one(smol, padding_side):
    tokenizer = smol.get_tokenizer()
    tokenizer.padding_side = padding_side
    config = ExtractionConfig(extract_resid_out=True, extract_attn_out=True, layers=[0, 10, 29])
    try:
        # 1e-4 of scale: float32 reduction order differs between batch shapes, and the error grows
        # through 30 layers that carry ~2.5e3 "massive activations" (tiny models hold 1e-5).
        assert_batch_equals_one_by_one(
            smol, tokenizer, PROMPTS, ["last", 0, -2, (1, 3)], config, rtol=1e-4
        )
    finally:
        tokenizer.padding_side = "right"


def test_hub_name_falls_back_to_embedded_copy(smol):
    again = HookedModel.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert again.model_map.n_layers == 30
    cache = again.forward("The capital of France is", ["last"])
    assert torch.equal(
        cache["logits"], smol.forward("The capital of France is", ["last"])["logits"]
    )


def test_ioi_residual_sweep_localises(smol):
    from hookscope.patching import activation_patching

    tokenizer = smol.get_tokenizer()
    clean = tokenizer(
        ["When Mary and John went to the store, John gave a drink to"], return_tensors="pt"
    )
    corrupt = tokenizer(
        ["When Mary and John went to the store, Mary gave a drink to"], return_tensors="pt"
    )
    assert clean["input_ids"].shape == corrupt["input_ids"].shape
    mary, john = (
        tokenizer(t, add_special_tokens=False)["input_ids"][0] for t in (" Mary", " John")
    )
    result = activation_patching(
        smol, clean, corrupt, ([mary], [john]), point="resid_out", layers=[0, 15, 29]
    )
    assert result.clean_metric[0] > 0 > result.corrupt_metric[0], "the model solves the IOI pair"
    last = result.values.shape[1] - 1
    torch.testing.assert_close(result.values[2, last], torch.tensor(1.0), rtol=0, atol=1e-4)
    assert result.values[2, :last].abs().max() < 1e-4
    # early on, the effect sits at the differing name (position of " John"/" Mary" after the comma)
    differing = int((clean["input_ids"][0] != corrupt["input_ids"][0]).nonzero()[0])
    assert result.values[0].abs().argmax() == differing
