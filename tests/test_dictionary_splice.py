"""Splice: with the error term the model's output is unchanged (1e-5); without it the change
equals patching the point with the reconstruction computed by hand; transcoders replace the
MLP's output from its input; several at once; features of a spliced dictionary."""

from __future__ import annotations

import pytest
import torch
from test_dictionary_features import PROMPTS, random_dictionary
from tiny_models import build_model, build_tokenizer

from hookscope import ExtractionConfig, HookedModel, Patch
from hookscope.dictionaries import Dictionary, Splice
from hookscope.errors import ActivationPointError, HookscopeError

SAE0 = random_dictionary("resid_out_0", name="res0")
SAE1 = random_dictionary("resid_out_1", activation="relu", name="res1", seed=2)
TC1 = random_dictionary("mlp_in_1", "mlp_out_1", activation="relu", name="tc1", seed=1)


@pytest.fixture(scope="module")
def hm():
    return HookedModel.from_hf(build_model("llama"), build_tokenizer())


@pytest.fixture(scope="module", params=["right", "left"])
def batch(request):
    return build_tokenizer(request.param)(PROMPTS, return_tensors="pt", padding=True)


def _logits(hm, batch, interventions=()):
    return hm.forward(batch, ["all"], interventions=list(interventions))["logits"]


@pytest.mark.parametrize(
    "splices",
    [[Splice(SAE0)], [Splice(TC1)], [Splice(SAE0), Splice(SAE1)], [Splice(SAE0), Splice(TC1)]],
    ids=["sae", "transcoder", "two-saes", "sae-and-transcoder"],
)
def test_splice_with_error_term_leaves_the_output_unchanged(hm, batch, splices):
    plain = _logits(hm, batch)
    spliced = _logits(hm, batch, splices)
    torch.testing.assert_close(spliced, plain, rtol=1e-5, atol=1e-5)
    # the splice is not a no-op: without the error term the output moves
    dropped = _logits(hm, batch, [Splice(s.dictionary, keep_error=False) for s in splices])
    assert (dropped - plain).abs().max() > 1e-2


def _all_positions(hm, batch, point):
    config = ExtractionConfig.from_names([point], hm.model_map, save_logits=False)
    return hm.forward(batch, ["all"], extraction_config=config)[point]


def test_sae_splice_without_error_equals_patching_the_reconstruction(hm, batch):
    x = _all_positions(hm, batch, "resid_out_0")  # [batch, slots, d_model]
    by_hand = Patch(point="resid_out_0", positions=["all"], source=SAE0.reconstruct(x))
    expected = _logits(hm, batch, [by_hand])
    spliced = _logits(hm, batch, [Splice(SAE0, keep_error=False)])
    torch.testing.assert_close(spliced, expected, rtol=1e-5, atol=1e-5)
    plain = _logits(hm, batch)
    change = (spliced - plain).abs().max()
    assert change > 1e-2, f"the reconstruction should change the output (max change {change:.2e})"


def test_transcoder_splice_without_error_equals_patching_the_mlp_output(hm, batch):
    mlp_in = _all_positions(hm, batch, "mlp_in_1")
    by_hand = Patch(point="mlp_out_1", positions=["all"], source=TC1.reconstruct(mlp_in))
    expected = _logits(hm, batch, [by_hand])
    torch.testing.assert_close(
        _logits(hm, batch, [Splice(TC1, keep_error=False)]), expected, rtol=1e-5, atol=1e-5
    )


def test_splice_at_some_positions_only(hm, batch):
    x = _all_positions(hm, batch, "resid_out_0")
    last = hm.forward(
        batch, ["last"], extraction_config=ExtractionConfig(extract_resid_out=True, layers=[0])
    )
    by_hand = Patch(
        point="resid_out_0", positions=["last"], source=SAE0.reconstruct(last["resid_out_0"])
    )
    spliced = _logits(hm, batch, [Splice(SAE0, keep_error=False, positions=["last"])])
    torch.testing.assert_close(spliced, _logits(hm, batch, [by_hand]), rtol=1e-5, atol=1e-5)
    assert x.shape[1] > 1  # other positions exist and were left alone (equal to the patch run)


def test_features_with_a_splice_are_those_of_the_value_the_model_computed(hm, batch):
    hm.attach_dictionary(SAE0)
    hm.attach_dictionary(TC1)
    try:
        config = ExtractionConfig(extract_features=True, extract_reconstruction_error=True)
        plain = hm.forward(batch, ["last"], extraction_config=config)
        splices = [Splice(SAE0, keep_error=False), Splice(TC1, keep_error=False)]
        spliced = hm.forward(batch, ["last"], extraction_config=config, interventions=splices)
        # resid_out_0 is the first splice's: TC1 reads a model already changed by it, so its
        # plain reference is the run with the SAE splice alone
        after_sae = hm.forward(batch, ["last"], extraction_config=config, interventions=splices[:1])
        for key, reference in (
            ("features_res0", plain),
            ("reconstruction_error_res0", plain),
            ("features_tc1", after_sae),
            ("reconstruction_error_tc1", after_sae),
        ):
            torch.testing.assert_close(spliced[key], reference[key], msg=key)
            assert reference[key].abs().max() > 1e-2, key  # not vacuous
        assert not torch.allclose(after_sae["features_tc1"], plain["features_tc1"])
    finally:
        hm.detach_dictionary("res0")
        hm.detach_dictionary("tc1")


def test_registered_splice_and_generate(hm):
    prompts = build_tokenizer("left")(["the cat sat", "a dog"], return_tensors="pt", padding=True)
    options = dict(max_new_tokens=4, do_sample=False)
    plain = hm.generate(prompts, **options)
    hm.register_interventions([Splice(SAE0, apply_to="both"), Splice(TC1, apply_to="both")])
    try:
        kept = hm.generate(prompts, **options)
    finally:
        hm.clean_interventions()
    assert torch.equal(kept, plain)  # with the error terms, greedy decoding is unchanged
    # without them, each step runs on the reconstruction: equal to the no-KV-cache path
    dropped = [
        Splice(SAE0, keep_error=False, apply_to="both"),
        Splice(TC1, keep_error=False, apply_to="both"),
    ]
    cached = hm.generate(prompts, interventions=dropped, **options)
    uncached = hm.generate(prompts, interventions=dropped, use_cache=False, **options)
    assert torch.equal(cached, uncached)
    assert not torch.equal(cached, plain)  # the reconstructions change what is generated


def test_bad_splices_are_refused(hm):
    with pytest.raises(HookscopeError, match="not the point its dictionary writes"):
        Splice(SAE0, point="resid_out_1")
    with pytest.raises(HookscopeError, match="takes a hookscope.dictionaries.Dictionary"):
        Splice("res0")
    deep = random_dictionary("resid_out_5", name="deep")
    with pytest.raises(ActivationPointError, match="out of range"):
        hm.forward(["hi"], ["last"], interventions=[Splice(deep)])


def test_bfloat16_model_with_a_float32_dictionary():
    model = HookedModel.from_hf(build_model("llama").to(torch.bfloat16), build_tokenizer())
    batch = build_tokenizer()(PROMPTS, return_tensors="pt", padding=True)
    plain = _logits(model, batch)
    # x (bf16) -> float32 -> x_hat + (x - x_hat) -> bf16 rounds back to x exactly
    assert torch.equal(_logits(model, batch, [Splice(SAE0), Splice(TC1)]), plain)
    model.attach_dictionary(SAE0)
    cache = model.forward(
        batch,
        ["last"],
        extraction_config=ExtractionConfig(
            extract_features=True, extract_resid_out=True, layers=[0]
        ),
    )
    assert cache["features_res0"].dtype == torch.float32
    torch.testing.assert_close(cache["features_res0"], SAE0.encode(cache["resid_out_0"]))


def test_float32_model_with_a_bfloat16_dictionary_keeps_its_error_term_exact(hm):
    """The error term is computed in float32, not rounded to the dictionary's bfloat16."""
    batch = build_tokenizer()(PROMPTS, return_tensors="pt", padding=True)
    plain = _logits(hm, batch)
    half_sae, half_tc = SAE0.to(dtype=torch.bfloat16), TC1.to(dtype=torch.bfloat16)
    spliced = _logits(hm, batch, [Splice(half_sae), Splice(half_tc)])
    assert spliced.dtype == torch.float32
    torch.testing.assert_close(spliced, plain, rtol=0, atol=1e-5)


def test_splices_that_cannot_write_their_point_are_refused(hm):
    head = Dictionary(
        W_enc=torch.zeros(64, 8), b_enc=torch.zeros(8), W_dec=torch.zeros(8, 64), b_dec=torch.zeros(64),
        activation="relu", reads="head_out_L0H1", name="head",
    )  # fmt: skip
    with pytest.raises(HookscopeError, match="written as head_z"):
        hm.forward(["hi"], ["last"], interventions=[Splice(head)])
    backwards = random_dictionary("resid_out_1", "mlp_out_0", activation="relu", name="backwards")
    with pytest.raises(HookscopeError, match="was not computed before"):
        hm.forward(["hi"], ["last"], interventions=[Splice(backwards)])
