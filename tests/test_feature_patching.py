"""Feature patching sweeps against a one-feature-at-a-time loop of FeaturePatch, and feature
attribution against gradients computed by hand and against the patching effect itself."""

from __future__ import annotations

import pytest
import torch
from tiny_models import build_tokenizer

from hookscope.dictionaries import (
    Dictionary,
    FeaturePatch,
    feature_attribution,
    feature_patching,
)
from hookscope.errors import HookscopeError, PositionError
from hookscope.interventions import Custom

POINT = "resid_out_0"
ANSWERS = (17, 42)


def make_sae(decoder_scale=0.3, input_scale=1.0, d_sae=24, seed=0) -> Dictionary:
    g = torch.Generator().manual_seed(seed)
    return Dictionary(
        W_enc=torch.randn(64, d_sae, generator=g) * 0.3,
        b_enc=torch.randn(d_sae, generator=g) * 0.1,
        W_dec=torch.randn(d_sae, 64, generator=g) * decoder_scale,
        b_dec=torch.randn(64, generator=g) * 0.1,
        activation="relu",
        reads=POINT,
        input_scale=input_scale,
    )


def _pair():
    """Clean / corrupt batches of 3 left-padded prompts of different lengths that differ in
    one token each."""
    tokenizer = build_tokenizer("left")
    clean = tokenizer(
        ["The cat sat on the mat", "A dog barked at", "Hello world and"],
        return_tensors="pt",
        padding=True,
    )
    corrupt = {k: v.clone() for k, v in clean.items()}
    corrupt["input_ids"][:, -2] = torch.tensor([100, 120, 140])
    return dict(clean), corrupt


def _logit_diff(logits):
    return logits[:, ANSWERS[0]] - logits[:, ANSWERS[1]]


def test_feature_patching_equals_a_one_feature_at_a_time_loop(tiny_llama):
    sae = make_sae(input_scale=2.0)
    clean, corrupt = _pair()
    items = ["last", -2, 0]
    result = feature_patching(
        tiny_llama,
        clean,
        corrupt,
        sae,
        answers=ANSWERS,
        features=[0, 3, 11],
        positions=items,
        normalize=False,
        batch_size=5,  # chunks mix examples, features and slots
    )
    assert result.axes == ["feature", "position"]
    assert result.labels["feature"] == [0, 3, 11]
    assert result.forwards == 6  # ceil(3 examples x 3 features x 3 slots / 5)
    f_clean = sae.encode(tiny_llama.forward(clean, items, names=[POINT])[POINT])
    expected = torch.empty(3, 3, len(items))
    for example in range(3):
        row = {k: v[example : example + 1] for k, v in corrupt.items()}
        for j, feature in enumerate([0, 3, 11]):
            for slot, item in enumerate(items):
                patch = FeaturePatch(
                    dictionary=sae,
                    features=feature,
                    positions=[item],
                    source=f_clean[example, slot],
                )
                logits = tiny_llama.forward(row, ["last"], interventions=[patch])["logits"][:, 0]
                expected[example, j, slot] = _logit_diff(logits)[0]
    torch.testing.assert_close(result.per_example, expected, rtol=1e-5, atol=1e-5)
    assert (expected - result.corrupt_metric.view(3, 1, 1)).abs().max() > 1e-3  # patches matter


def test_feature_patching_picks_the_features_that_differ_and_normalises(tiny_llama):
    sae = make_sae()
    clean, corrupt = _pair()
    items = ["last", -2]
    f_clean = sae.encode(tiny_llama.forward(clean, items, names=[POINT])[POINT])
    f_corrupt = sae.encode(tiny_llama.forward(corrupt, items, names=[POINT])[POINT])
    expected_top = (f_clean - f_corrupt).abs().sum((0, 1)).topk(4).indices.tolist()
    kwargs = dict(answers=ANSWERS, top_n=4, positions=items)
    raw = feature_patching(tiny_llama, clean, corrupt, sae, normalize=False, **kwargs)
    normalised = feature_patching(tiny_llama, clean, corrupt, sae, **kwargs)
    assert raw.labels["feature"] == expected_top
    gap = (raw.clean_metric - raw.corrupt_metric).view(3, 1, 1)
    torch.testing.assert_close(
        normalised.per_example, (raw.per_example - raw.corrupt_metric.view(3, 1, 1)) / gap
    )
    assert normalised.method == "feature" and "feature patching" in repr(normalised)


def _gradient_at_point(hm, inputs, positions):
    """d logit_diff / d x at the point's selected slots, by autograd on a leaf put there."""
    leaves = []

    def leaf(tensor, context):
        x = context.positions.select(tensor).detach().requires_grad_(True)
        leaves.append(x)
        rows, slots, index = context.positions.real_slots(tensor.device)
        return tensor.index_put((rows, index), x[rows, slots])

    from hookscope import ExtractionConfig

    cache = hm.forward(
        inputs,
        ["last"],
        extraction_config=ExtractionConfig(keep_gradient=True),
        interventions=[Custom(point=POINT, positions=positions, fn=leaf)],
    )
    (gradient,) = torch.autograd.grad(_logit_diff(cache["logits"][:, 0]).sum(), leaves)
    return leaves[0].detach(), gradient


def test_gradient_x_activation_equals_the_hand_computed_gradient(tiny_llama):
    sae = make_sae(input_scale=2.0)
    batch = build_tokenizer("right")(
        ["The cat sat on the mat", "A dog", "Hello world and more"],
        return_tensors="pt",
        padding=True,
    )
    attribution = feature_attribution(tiny_llama, batch, sae, answers=ANSWERS, positions=["all"])
    x, gradient = _gradient_at_point(tiny_llama, batch, ["all"])
    f = sae.encode(x)
    by_hand = (gradient @ sae.W_dec.T / 2.0) * f  # [N, P, d_sae]
    mask = attribution.position_mask
    assert not mask.all()  # padded slots exist and are zero
    torch.testing.assert_close(attribution.scores[mask], by_hand[mask], rtol=1e-4, atol=1e-6)
    assert not attribution.scores[~mask].any()
    assert attribution.scores[mask].abs().max() > 1e-3
    plain = tiny_llama.forward(batch, ["last"])["logits"][:, 0]
    torch.testing.assert_close(attribution.metric_value, _logit_diff(plain), rtol=1e-5, atol=1e-5)
    # top features of example 1 at its last real slot, by |score|
    top = attribution.top(3, example=1)
    last = int(mask[1].sum()) - 1
    assert [i for i, _ in top[last]] == by_hand[1, last].abs().topk(3).indices.tolist()
    assert top[-1] == [] and attribution.tokens[1] == tiny_llama.to_string_tokens(
        batch["input_ids"][1][batch["attention_mask"][1].bool()]
    )


def test_attribution_batched_padded_equals_one_by_one(tiny_llama):
    sae = make_sae()
    prompts = ["The cat sat on the mat", "A dog", "Hello world and more"]
    tokenizer = build_tokenizer("left")
    batched = feature_attribution(
        tiny_llama,
        tokenizer(prompts, return_tensors="pt", padding=True),
        sae,
        answers=ANSWERS,
        positions=["last", 0],
    )
    for row, prompt in enumerate(prompts):
        alone = feature_attribution(
            tiny_llama,
            tokenizer(prompt, return_tensors="pt"),
            sae,
            answers=ANSWERS,
            positions=["last", 0],
        )
        torch.testing.assert_close(batched.scores[row], alone.scores[0], rtol=1e-4, atol=1e-6)


def test_attribution_patching_estimates_the_patching_effect_when_near_linear(tiny_llama):
    # a small decoder: each feature moves the residual a little, so the effect is near linear
    sae = make_sae(decoder_scale=0.02)
    clean, corrupt = _pair()
    items = ["last", -2]
    patched = feature_patching(
        tiny_llama,
        clean,
        corrupt,
        sae,
        answers=ANSWERS,
        features="all",
        positions=items,
        normalize=False,
        batch_size=64,
    )
    effect = patched.per_example - patched.corrupt_metric.view(3, 1, 1)  # [N, F, P]
    estimate = feature_attribution(
        tiny_llama, corrupt, sae, answers=ANSWERS, positions=items, clean=clean
    )
    assert estimate.method == "attribution patching"
    estimate = estimate.scores.permute(0, 2, 1)  # [N, d_sae, P]
    assert effect.abs().max() > 1e-3
    assert (estimate - effect).abs().max() < 0.05 * effect.abs().max()
    correlation = torch.corrcoef(torch.stack([estimate.flatten(), effect.flatten()]))[0, 1]
    assert correlation > 0.99


def test_bad_inputs_are_refused(tiny_llama):
    sae = make_sae()
    clean, corrupt = _pair()
    with pytest.raises(PositionError, match="same number of tokens in every example"):
        feature_patching(tiny_llama, clean, corrupt, sae, answers=ANSWERS, positions=["all"])
    with pytest.raises(HookscopeError, match="not 'logit_diff', 'prob'"):
        feature_attribution(tiny_llama, corrupt, sae, metric="kl")
    with pytest.raises(HookscopeError, match=r"0\.\.23"):
        feature_patching(tiny_llama, clean, corrupt, sae, answers=ANSWERS, features=[24])
    with pytest.raises(HookscopeError, match="top_n must be a positive int"):
        feature_patching(tiny_llama, clean, corrupt, sae, answers=ANSWERS, top_n=0)
    transcoder = Dictionary(
        W_enc=torch.zeros(64, 4),
        b_enc=torch.zeros(4),
        W_dec=torch.zeros(4, 64),
        b_dec=torch.zeros(64),
        activation="relu",
        reads="mlp_in_0",
        writes="mlp_out_0",
        subtract_decoder_bias=False,
    )
    with pytest.raises(HookscopeError, match="transcoder"):
        feature_attribution(tiny_llama, corrupt, transcoder, answers=ANSWERS)
