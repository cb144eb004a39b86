"""steering_vector and Steer(relative=True), checked against hand computations."""

from __future__ import annotations

import pytest
import torch
from tiny_models import PROMPTS

from hookscope import ExtractionConfig, HookscopeError, steering_vector
from hookscope.interventions import Steer

RESID_OUT = ExtractionConfig(extract_resid_out=True)


def _token_rows(hm, prompts, point, positions):
    """Every selected token's activation, one unpadded prompt at a time: ``[tokens, d]``."""
    rows = []
    for prompt in prompts:
        cache = hm.forward([prompt], positions, extraction_config=RESID_OUT)
        rows.append(cache[point][0][cache["position_mask"][0]])
    return torch.cat(rows)


@pytest.mark.parametrize("positions", [["all"], ["last", 0]])
def test_steering_vector_is_the_difference_of_masked_token_means(tiny_llama, positions):
    positive, negative = PROMPTS[:3], PROMPTS[3:5]
    lengths = {len(tiny_llama.tokenizer(p)["input_ids"]) for p in positive}
    assert len(lengths) > 1  # the batch really pads
    vector = steering_vector(
        tiny_llama, positive, negative, point="resid_out_0", positions=positions, batch_size=2
    )
    expected = _token_rows(tiny_llama, positive, "resid_out_0", positions).mean(0) - _token_rows(
        tiny_llama, negative, "resid_out_0", positions
    ).mean(0)
    assert vector.shape == (64,)
    torch.testing.assert_close(vector, expected, rtol=1e-5, atol=1e-5)


def test_steering_vector_with_all_positions_matches_hf_hidden_states(tiny_llama):
    """Ground truth from HF: resid_out_0 is output_hidden_states[1], padding dropped."""

    def hf_mean(prompts):
        rows = []
        for prompt in prompts:
            ids = tiny_llama.tokenizer(prompt, return_tensors="pt")
            with torch.no_grad():
                out = tiny_llama.hf_model(**ids, output_hidden_states=True)
            rows.append(out.hidden_states[1][0])
        return torch.cat(rows).mean(0)

    positive, negative = PROMPTS[:2], PROMPTS[2:4]
    vector = steering_vector(tiny_llama, positive, negative, point="resid_out_0")
    torch.testing.assert_close(vector, hf_mean(positive) - hf_mean(negative), rtol=1e-4, atol=1e-5)


def test_relative_steer_adds_coefficient_times_slot_norm_along_the_unit_vector(tiny_llama):
    batch = tiny_llama.tokenizer(PROMPTS[:2], return_tensors="pt", padding=True)
    vector = torch.randn(64, generator=torch.Generator().manual_seed(5))
    plain = tiny_llama.forward(batch, ["last"], extraction_config=RESID_OUT)
    norms = plain["resid_out_0"].norm(dim=-1, keepdim=True)  # [batch, 1, 1]
    assert not torch.allclose(norms[0], norms[1])  # a per-slot coefficient, not one scalar
    manual_vector = 0.5 * norms * vector / vector.norm()  # [batch, 1, 64]
    manual = tiny_llama.forward(
        batch,
        ["last"],
        extraction_config=RESID_OUT,
        interventions=[Steer(point="resid_out_0", positions=["last"], vector=manual_vector)],
    )
    relative = tiny_llama.forward(
        batch,
        ["last"],
        extraction_config=RESID_OUT,
        interventions=[
            Steer(
                point="resid_out_0",
                positions=["last"],
                vector=3 * vector,  # the vector's own length does not matter
                coefficient=0.5,
                relative=True,
            )
        ],
    )
    torch.testing.assert_close(
        relative["resid_out_0"], plain["resid_out_0"] + manual_vector, rtol=1e-5, atol=1e-5
    )
    for key in ("resid_out_0", "resid_out_1", "logits"):
        torch.testing.assert_close(relative[key], manual[key], rtol=1e-5, atol=1e-5)


def test_steering_errors_name_the_bad_value(tiny_llama):
    with pytest.raises(HookscopeError, match="norm 0"):
        tiny_llama.forward(
            PROMPTS[:1],
            ["last"],
            interventions=[Steer(point="resid_out_0", vector=torch.zeros(64), relative=True)],
        )
    with pytest.raises(HookscopeError, match="relative must be True or False, got 'yes'"):
        Steer(point="resid_out_0", vector=torch.ones(64), relative="yes")
    with pytest.raises(HookscopeError, match="no negative prompts"):
        steering_vector(tiny_llama, PROMPTS[:1], [], point="resid_out_0")
    with pytest.raises(HookscopeError, match="not a single string"):
        steering_vector(tiny_llama, "a cat", PROMPTS[:1], point="resid_out_0")
    with pytest.raises(HookscopeError, match="batch_size must be an int >= 1, got 0"):
        steering_vector(tiny_llama, PROMPTS[:1], PROMPTS[:1], point="resid_out_0", batch_size=0)
