"""Patching: batched sweeps equal the one-forward-per-site loop; sweeps localise; compute_patching."""

from __future__ import annotations

import pytest
import torch
from tiny_models import build_model, build_tokenizer, patching_pair

from hookscope import HookedModel, InputError
from hookscope.patching import activation_patching, attribution_patching

ANSWERS = (torch.tensor([5, 9]), torch.tensor([7, 11]))


def _pairs():
    tokenizer = build_tokenizer()
    clean = dict(
        tokenizer(
            ["The cat sat on the mat", "Hello world and the dog"], return_tensors="pt", padding=True
        )
    )
    corrupt = {k: v.clone() for k, v in clean.items()}
    corrupt["input_ids"][:, 2] = torch.tensor([100, 120])  # one token differs per example
    return clean, corrupt


@pytest.fixture(scope="module")
def hm():
    return HookedModel.from_hf(build_model("llama"), build_tokenizer())


@pytest.mark.parametrize(
    "point, per",
    [
        ("resid_out", "position"),
        ("attn_out", "position"),
        ("mlp_out", "layer"),
        ("head", "head"),
        ("resid_in", "position"),
    ],
)
def test_batched_sweep_equals_one_forward_per_site(hm, point, per):
    clean, corrupt = patching_pair()
    fast = activation_patching(hm, clean, corrupt, ANSWERS, point=point, per=per, batch_size=7)
    slow = activation_patching(hm, clean, corrupt, ANSWERS, point=point, per=per, batched=False)
    torch.testing.assert_close(fast.per_example, slow.per_example, rtol=1e-5, atol=1e-5)
    sites = fast.per_example[0].numel()
    # the sweep that skips unchanged work packs rows that start late into fewer forwards
    assert fast.path == "skip_unchanged" and fast.forwards <= -(-2 * sites // 7)
    assert slow.forwards == sites


def test_residual_sweep_localises(hm):
    clean, corrupt = patching_pair()
    result = activation_patching(hm, clean, corrupt, ANSWERS, point="resid_out", per="position")
    last = result.values.shape[1] - 1
    # the final layer at the last position restores the clean logit difference exactly ...
    torch.testing.assert_close(result.per_example[:, -1, last], torch.ones(2), rtol=0, atol=1e-5)
    # ... and the final layer elsewhere cannot reach the last position's logits at all
    assert torch.all(result.per_example[:, -1, :last].abs() < 1e-5)
    # before the corrupted token nothing differs, so patching there does nothing
    assert torch.all(result.per_example[:, :, 0].abs() < 1e-5)
    # at the input of layer 0 the corrupted position carries the whole effect
    inputs = activation_patching(
        hm, clean, corrupt, ANSWERS, point="resid_in", per="position", layers=[0]
    )
    torch.testing.assert_close(inputs.per_example[:, 0, 1], torch.ones(2), rtol=0, atol=1e-4)
    assert torch.all(inputs.per_example[:, 0, 2:].abs() < 1e-5)
    assert result.axes == ["layer", "position"] and len(result.labels["position"]) == last + 1


def test_attribution_agrees_with_activation_patching_where_linear(hm):
    clean, corrupt = patching_pair()
    exact = activation_patching(hm, clean, corrupt, ANSWERS, point="resid_out", per="position")
    approx = attribution_patching(hm, clean, corrupt, ANSWERS, point="resid_out")
    assert approx.values.shape == exact.values.shape
    # positions where clean and corrupt do not differ have no attribution (delta is zero)
    assert torch.all(approx.per_example[:, :, 0].abs() < 1e-6)
    flat_exact, flat_approx = exact.values.flatten(), approx.values.flatten()
    correlation = torch.corrcoef(torch.stack([flat_exact, flat_approx]))[0, 1]
    assert correlation > 0.5, correlation
    heads = attribution_patching(hm, clean, corrupt, ANSWERS, point="head")
    assert heads.values.shape == (2, 4) and torch.isfinite(heads.values).all()


def test_misaligned_pairs_fail_before_any_forward(hm):
    tokenizer = build_tokenizer()
    with pytest.raises(InputError, match="must align token by token"):
        activation_patching(
            hm,
            tokenizer(["a b c"], return_tensors="pt"),
            tokenizer(["a b c d e"], return_tensors="pt"),
            ANSWERS,
        )


def test_compute_patching_reference_form(hm):
    clean, corrupt = patching_pair()
    result = hm.compute_patching(
        ["last"],
        base_dataloader=[clean],
        target_dataloader=[corrupt],
        patching_query=[
            {"patching_elem": "@last", "layers_to_patch": [1], "activation_type": "resid_out_{}"}
        ],
        base_dictonary_idxs=[[7, 11]],
        target_dictonary_idxs=[[5, 9]],
        return_logit_diff=True,
    )
    clean_logits = hm.forward(clean, ["last"])["logits"][:, 0]
    corrupt_logits = hm.forward(corrupt, ["last"])["logits"][:, 0]
    rows = torch.arange(2)
    expected_clean = corrupt_logits[rows, ANSWERS[0]] - corrupt_logits[rows, ANSWERS[1]]
    expected_patched = clean_logits[rows, ANSWERS[0]] - clean_logits[rows, ANSWERS[1]]
    torch.testing.assert_close(result["logit_diff_in_clean"], expected_clean)
    torch.testing.assert_close(
        result["logit_diff_in_patched"], expected_patched, rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(
        result["logit_diff_variation"], expected_patched - expected_clean, rtol=1e-5, atol=1e-5
    )
    assert torch.all(result["kl_clean_to_patched"] > 0)
    torch.testing.assert_close(result["logits"], clean_logits.unsqueeze(1), rtol=1e-5, atol=1e-5)
