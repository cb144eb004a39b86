"""Generation with interventions and extraction, with and without the KV cache."""

from __future__ import annotations

import torch
from tiny_models import PROMPTS, build_tokenizer

from hookscope import ExtractionConfig
from hookscope.interventions import Ablation, Steer

GREEDY = dict(max_new_tokens=6, do_sample=False)


def _batch():
    return build_tokenizer("left")(PROMPTS[:3], return_tensors="pt", padding=True)


def _plain(hm, batch, **kwargs):
    return hm.hf_model.generate(**batch, pad_token_id=0, **GREEDY, **kwargs)


def test_identity_interventions_equal_plain_generation(tiny_llama):
    batch = _batch()
    identity = [Ablation(point="resid_out_0", method="scale", factor=1.0, apply_to="both")]
    assert torch.equal(
        tiny_llama.generate(batch, interventions=identity, **GREEDY), _plain(tiny_llama, batch)
    )


def test_steering_changes_generation_and_cache_paths_agree(tiny_llama):
    batch = _batch()
    vector = 3 * torch.randn(64, generator=torch.Generator().manual_seed(0))
    steer = [Steer(point="resid_out_0", vector=vector, apply_to="both")]
    cached = tiny_llama.generate(batch, interventions=steer, use_cache=True, **GREEDY)
    uncached = tiny_llama.generate(batch, interventions=steer, use_cache=False, **GREEDY)
    assert torch.equal(cached, uncached)
    assert not torch.equal(cached, _plain(tiny_llama, batch))
    generated_only = [Steer(point="resid_out_0", vector=vector, apply_to="generated")]
    a = tiny_llama.generate(batch, interventions=generated_only, use_cache=True, **GREEDY)
    b = tiny_llama.generate(batch, interventions=generated_only, use_cache=False, **GREEDY)
    assert torch.equal(a, b)
    prompt_width = batch["input_ids"].shape[1]
    # the first new token comes from the (unsteered) prompt call
    assert torch.equal(a[:, prompt_width], _plain(tiny_llama, batch)[:, prompt_width])


def test_extraction_during_generation_matches_a_forward_over_the_sequence(tiny_llama):
    batch = _batch()
    config = ExtractionConfig(extract_resid_out=True)
    cache = tiny_llama.generate(
        batch, target_token_positions=["last"], extraction_config=config, **GREEDY
    )
    sequences = cache["sequences"]
    assert cache["mapping_index"] == {
        "last": [0],
        "generated": list(range(1, GREEDY["max_new_tokens"])),
    }
    assert cache["generated_logits"].shape == (3, GREEDY["max_new_tokens"], 320)
    full_mask = torch.cat(
        [batch["attention_mask"], torch.ones(3, GREEDY["max_new_tokens"], dtype=torch.long)], 1
    )
    reference = tiny_llama.forward(
        {"input_ids": sequences[:, :-1], "attention_mask": full_mask[:, :-1]},
        ["all"],
        extraction_config=config,
    )
    for row in range(3):
        n_real = int(full_mask[row, :-1].sum())
        n_new = GREEDY["max_new_tokens"] - 1
        # last prompt token, then each generated token that was fed back
        expected = reference["resid_out_1"][row, n_real - n_new - 1 : n_real]
        torch.testing.assert_close(cache["resid_out_1"][row], expected, rtol=1e-5, atol=1e-5)
