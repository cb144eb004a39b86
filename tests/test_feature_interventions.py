"""Feature interventions (ablate, scale, clamp, steer, patch a dictionary's features) against
hand-computed edits applied with a plain Patch, under padding, in extract_cache and generate."""

from __future__ import annotations

import pytest
import torch
from tiny_models import PROMPTS, build_tokenizer

from hookscope import ExtractionConfig, intervention_from_dict
from hookscope.dictionaries import (
    Dictionary,
    FeatureAblation,
    FeatureClamp,
    FeaturePatch,
    FeatureScale,
    FeatureSteer,
    feature_intervention_from_dict,
)
from hookscope.errors import HookscopeError
from hookscope.interventions import Patch, Steer

POINT = "resid_out_0"
GREEDY = dict(max_new_tokens=5, do_sample=False)


def make_sae(activation="relu", input_scale=1.0, d_sae=32, seed=0, **kw) -> Dictionary:
    """A random SAE on resid_out_0 of the tiny llama (d_model 64) with a dead feature 5."""
    g = torch.Generator().manual_seed(seed)
    b_enc = torch.randn(d_sae, generator=g) * 0.1
    b_enc[5] = -1e4  # never active
    return Dictionary(
        W_enc=torch.randn(64, d_sae, generator=g) * 0.3,
        b_enc=b_enc,
        W_dec=torch.randn(d_sae, 64, generator=g) * 0.3,
        b_dec=torch.randn(64, generator=g) * 0.1,
        activation=activation,
        reads=POINT,
        input_scale=input_scale,
        **kw,
    )


def _padded(side="right", prompts=PROMPTS):
    return build_tokenizer(side)(prompts, return_tensors="pt", padding=True)


def _hand_edit(sae, x, features, op, value=None, source=None):
    """x' = x + (f' - f) @ W_dec / input_scale, computed here from the formula."""
    f = sae.encode(x)
    new = f.clone()
    idx = torch.tensor(features)
    if op == "ablate":
        new[..., idx] = 0
    elif op == "scale":
        new[..., idx] = f[..., idx] * value
    elif op == "clamp":
        new[..., idx] = value
    elif op == "steer":
        new[..., idx] = f[..., idx] + value
    elif op == "patch":
        new[..., idx] = source[..., idx]
    return x + (new - f) @ sae.W_dec / sae.input_scale


@pytest.mark.parametrize(
    ("activation", "op"),
    [
        ("relu", "ablate"),
        ("relu", "scale"),
        ("topk", "clamp"),
        ("relu", "steer"),
        ("topk", "patch"),
    ],
)
def test_feature_edit_equals_a_patch_of_the_hand_computed_value(tiny_llama, activation, op):
    sae = make_sae(activation, input_scale=2.0, k=6 if activation == "topk" else None)
    batch = _padded("left")
    names = [POINT, "resid_out_1"]
    plain = tiny_llama.forward(batch, ["all"], names=names)
    f = sae.encode(plain[POINT])
    active = f[plain["position_mask"]].gt(0).sum(0)
    features = active.topk(3).indices.tolist()  # features that are on somewhere
    other = tiny_llama.forward(_padded("left", PROMPTS[::-1]), ["all"], names=[POINT])
    source = sae.encode(other[POINT])
    value = {"ablate": None, "scale": 3.0, "clamp": 2.5, "steer": -1.5, "patch": None}[op]
    iv = {
        "ablate": lambda: FeatureAblation(dictionary=sae, features=features),
        "scale": lambda: FeatureScale(dictionary=sae, features=features, factor=value),
        "clamp": lambda: FeatureClamp(dictionary=sae, features=features, value=value),
        "steer": lambda: FeatureSteer(dictionary=sae, features=features, coefficient=value),
        "patch": lambda: FeaturePatch(dictionary=sae, features=features, source=source),
    }[op]()
    edited = tiny_llama.forward(batch, ["all"], names=names, interventions=[iv])
    by_hand = _hand_edit(sae, plain[POINT], features, op, value, source)
    expected = tiny_llama.forward(
        batch, ["all"], names=names, interventions=[Patch(point=POINT, source=by_hand)]
    )
    mask = plain["position_mask"]
    for key in names + ["logits"]:
        torch.testing.assert_close(edited[key][mask], expected[key][mask], rtol=1e-5, atol=1e-5)
    # and the edit did something
    assert (edited["logits"][mask] - plain["logits"][mask]).abs().max() > 1e-3


def test_ablating_a_feature_that_is_zero_is_a_no_op(tiny_llama):
    sae = make_sae()
    batch = _padded("right")
    plain = tiny_llama.forward(batch, ["all"], names=[POINT])
    assert not sae.encode(plain[POINT])[..., 5].any()  # feature 5 is dead
    ablated = tiny_llama.forward(
        batch, ["all"], names=[POINT], interventions=[FeatureAblation(dictionary=sae, features=5)]
    )
    for key in (POINT, "logits"):
        torch.testing.assert_close(ablated[key], plain[key], rtol=0, atol=1e-6)


def test_edit_keeps_the_error_term(tiny_llama):
    """Ablating every feature leaves x - f @ W_dec / s, i.e. decode(0) + the error term."""
    sae = make_sae(input_scale=0.5)
    batch = _padded("right")
    plain = tiny_llama.forward(batch, ["all"], names=[POINT])
    x = plain[POINT]
    ablated = tiny_llama.forward(
        batch,
        ["all"],
        names=[POINT],
        interventions=[FeatureAblation(dictionary=sae, features="all")],
    )
    error = x - sae.reconstruct(x)
    expected = sae.decode(torch.zeros(*x.shape[:2], sae.d_sae)) + error
    mask = plain["position_mask"]
    torch.testing.assert_close(ablated[POINT][mask], expected[mask], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
def test_batched_padded_equals_one_by_one(tiny_llama, side):
    sae = make_sae("topk", k=4)
    ivs = [
        FeatureClamp(dictionary=sae, features=[0, 7], value=4.0, positions=["last", 1]),
        FeatureScale(dictionary=sae, features="all", factor=0.5, positions=[0]),
    ]
    batch = _padded(side)
    assert not batch["attention_mask"].bool().all()
    batched = tiny_llama.forward(batch, ["last"], names=["resid_out_1"], interventions=ivs)
    for row, prompt in enumerate(PROMPTS):
        alone = tiny_llama.forward(
            build_tokenizer(side)(prompt, return_tensors="pt"),
            ["last"],
            names=["resid_out_1"],
            interventions=ivs,
        )
        for key in ("resid_out_1", "logits"):
            torch.testing.assert_close(batched[key][row], alone[key][0], rtol=1e-5, atol=1e-5)


def test_patch_from_a_cache_in_extract_cache_reads_each_batchs_rows(tiny_llama):
    sae = make_sae()
    tokenizer = build_tokenizer("left")
    batches = [tokenizer(PROMPTS[i : i + 2], return_tensors="pt", padding=True) for i in (0, 2)]
    clean = tiny_llama.extract_cache(batches, ["last"], names=[POINT])
    steer = Steer(point=POINT, vector=torch.ones(64))
    # patching every feature back from the clean cache at the last token, over a steered run
    patch = FeaturePatch(dictionary=sae, positions=["last"], source=clean)
    patched = tiny_llama.extract_cache(
        batches, ["last"], names=[POINT], interventions=[steer, patch]
    )
    # by hand, batch by batch: x' = x_steered + (f(clean) - f(steered)) @ W_dec
    for number, batch in enumerate(batches):
        steered = tiny_llama.forward(batch, ["last"], names=[POINT], interventions=[steer])[POINT]
        rows = clean[POINT][2 * number : 2 * number + 2]
        by_hand = steered + (sae.encode(rows) - sae.encode(steered)) @ sae.W_dec
        expected = tiny_llama.forward(
            batch,
            ["last"],
            names=[POINT],
            interventions=[steer, Patch(point=POINT, positions=["last"], source=by_hand)],
        )
        torch.testing.assert_close(
            patched["logits"][2 * number : 2 * number + 2], expected["logits"], rtol=1e-5, atol=1e-5
        )
    # a dataset-wide tensor of features [N, P, d_sae] is read the same way, batch by batch
    features = FeaturePatch(dictionary=sae, positions=["last"], source=sae.encode(clean[POINT]))
    from_tensor = tiny_llama.extract_cache(batches, ["last"], interventions=[steer, features])
    torch.testing.assert_close(from_tensor["logits"], patched["logits"], rtol=1e-6, atol=1e-6)


def test_registered_feature_intervention_equals_per_call(tiny_llama):
    sae = make_sae()
    iv = FeatureSteer(dictionary=sae, features=[2, 3], coefficient=2.0, positions=["last"])
    per_call = tiny_llama.forward(_padded(), ["last"], interventions=[iv])
    tiny_llama.register_interventions([iv])
    try:
        registered = tiny_llama.forward(_padded(), ["last"])
    finally:
        tiny_llama.clean_interventions()
    torch.testing.assert_close(registered["logits"], per_call["logits"], rtol=0, atol=0)


def test_generated_only_edits_leave_the_prompt_untouched(tiny_llama):
    sae = make_sae()
    batch = _padded("left", PROMPTS[:3])
    clamp = FeatureClamp(dictionary=sae, features=[1, 4], value=8.0, apply_to="generated")
    config = ExtractionConfig(extract_resid_out=True)
    kwargs = dict(target_token_positions=["last"], extraction_config=config, **GREEDY)
    plain = tiny_llama.generate(batch, **kwargs)
    edited = tiny_llama.generate(batch, interventions=[clamp], **kwargs)
    no_cache = tiny_llama.generate(batch, interventions=[clamp], use_cache=False, **kwargs)
    assert torch.equal(edited["sequences"], no_cache["sequences"])
    # the prompt call (first new token's logits, the prompt's resid) is the plain one
    torch.testing.assert_close(edited["generated_logits"][:, 0], plain["generated_logits"][:, 0])
    torch.testing.assert_close(edited[POINT][:, 0], plain[POINT][:, 0])
    # every later step ran with the clamp: its logits equal a forward over the same sequence
    # with the clamp applied at the fed-back generated positions only
    steps = GREEDY["max_new_tokens"] - 1
    sequences = edited["sequences"][:, :-1]
    mask = torch.cat([batch["attention_mask"], torch.ones(3, steps, dtype=torch.long)], 1)
    at_generated = FeatureClamp(
        dictionary=sae, features=[1, 4], value=8.0, positions=list(range(-steps, 0))
    )
    reference = tiny_llama.forward(
        {"input_ids": sequences, "attention_mask": mask},
        list(range(-steps, 0)),
        interventions=[at_generated],
    )
    torch.testing.assert_close(
        edited["generated_logits"][:, 1:], reference["logits"], rtol=1e-4, atol=1e-4
    )
    assert not torch.allclose(edited["generated_logits"][:, 1:], plain["generated_logits"][:, 1:])


def test_feature_steer_in_generate_equals_steer_by_the_decoder_direction(tiny_llama):
    sae = make_sae(input_scale=2.0)
    batch = _padded("left", PROMPTS[:3])
    feature = FeatureSteer(dictionary=sae, features=9, coefficient=6.0, apply_to="both")
    direction = Steer(point=POINT, vector=6.0 * sae.W_dec[9] / 2.0, apply_to="both")
    a = tiny_llama.generate(batch, interventions=[feature], **GREEDY)
    b = tiny_llama.generate(batch, interventions=[direction], **GREEDY)
    assert torch.equal(a, b)
    assert not torch.equal(a, tiny_llama.generate(batch, **GREEDY))


def test_to_dict_round_trip_stores_the_dictionary_by_name():
    sae = make_sae(name="res0")
    source = torch.randn(2, 1, 32)
    ivs = [
        FeatureAblation(dictionary=sae, features=[1, 2], positions=["last"]),
        FeatureScale(dictionary=sae, features=3, factor=2.0),
        FeatureClamp(dictionary=sae, features="all", value=0.5, apply_to="both"),
        FeatureSteer(dictionary=sae, features=[4], coefficient=-1.0, apply_to="generated"),
        FeaturePatch(dictionary=sae, features=[0], source=source, positions=[(0, 2)]),
    ]
    for iv in ivs:
        data = iv.to_dict()
        assert data["dictionary"] == {"dictionary": "res0"}
        assert feature_intervention_from_dict(data, {"res0": sae}) == iv
        assert feature_intervention_from_dict(data, sae) == iv
        with pytest.raises(HookscopeError, match="feature_intervention_from_dict"):
            intervention_from_dict(data)
    with pytest.raises(HookscopeError, match="not among the dictionaries given"):
        feature_intervention_from_dict(ivs[0].to_dict(), {"other": sae})


def test_bad_feature_interventions_are_refused_clearly(tiny_llama):
    sae = make_sae()
    with pytest.raises(HookscopeError, match=r"0\.\.31"):
        FeatureAblation(dictionary=sae, features=[3, 32])
    with pytest.raises(HookscopeError, match="give indices or 'all'"):
        FeatureAblation(dictionary=sae, features="some")
    with pytest.raises(HookscopeError, match="resid_out_0"):
        FeatureAblation(dictionary=sae, features=1, point="resid_out_1")
    with pytest.raises(HookscopeError, match="must be a hookscope Dictionary"):
        FeatureAblation(dictionary=sae.W_dec, features=1)
    with pytest.raises(HookscopeError, match="prompt only"):
        FeaturePatch(dictionary=sae, source=torch.zeros(32), apply_to="generated")
    g = torch.Generator().manual_seed(1)
    transcoder = Dictionary(
        W_enc=torch.randn(64, 8, generator=g),
        b_enc=torch.zeros(8),
        W_dec=torch.randn(8, 64, generator=g),
        b_dec=torch.zeros(64),
        activation="relu",
        reads="resid_mid_0",
        writes="mlp_out_0",
        subtract_decoder_bias=False,
    )
    with pytest.raises(HookscopeError, match="MLP transcoders"):
        FeatureClamp(dictionary=transcoder, features=1, value=1.0)
    wrong_width = FeaturePatch(dictionary=sae, source=torch.zeros(2, 1, 31), positions=["last"])
    with pytest.raises(HookscopeError, match=r"source has shape \[2, 1, 31\]"):
        tiny_llama.forward(_padded("left", PROMPTS[:2]), ["last"], interventions=[wrong_width])
    no_key = FeaturePatch(
        dictionary=sae,
        source=tiny_llama.forward(PROMPTS[:1], ["last"], names=["resid_out_1"]),
        positions=["last"],
    )
    with pytest.raises(HookscopeError, match="no 'resid_out_0'"):
        tiny_llama.forward(PROMPTS[:1], ["last"], interventions=[no_key])


@pytest.mark.parametrize(
    ("activation", "kw"),
    [
        ("relu", {}),
        ("jumprelu", {"threshold": torch.full((32,), 0.2)}),
        ("batchtopk", {"threshold": torch.full((32,), 0.1), "k": 3}),
        ("batchtopk", {"k": 3}),
        ("topk", {"k": 3}),
    ],
)
def test_encoding_only_the_chosen_features_equals_the_full_encoding(activation, kw):
    sae = make_sae(activation, input_scale=1.5, **kw)
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(2))
    index = torch.tensor([0, 4, 9, 31])
    full = sae.encode(x)
    assert full[..., index].any()
    torch.testing.assert_close(sae.encode(x, index), full[..., index])


def make_transcoder(layer=0, input_scale=1.0) -> Dictionary:
    g = torch.Generator().manual_seed(3)
    return Dictionary(
        W_enc=torch.randn(64, 32, generator=g) * 0.3,
        b_enc=torch.randn(32, generator=g) * 0.1,
        W_dec=torch.randn(32, 64, generator=g) * 0.3,
        b_dec=torch.randn(64, generator=g) * 0.1,
        activation="relu",
        reads=f"mlp_in_{layer}",
        writes=f"mlp_out_{layer}",
        subtract_decoder_bias=False,
        input_scale=input_scale,
        name="tc",
    )


@pytest.mark.parametrize("op", ["clamp", "scale", "patch"])
def test_transcoder_features_are_read_from_the_mlp_input(tiny_llama, op):
    """A transcoder's edit at mlp_out_0 uses f = encode(mlp_in_0) of the same call."""
    from hookscope.hooks import reading_hook

    transcoder = make_transcoder(input_scale=2.0)
    batch = _padded("right")  # slot j of "all" is position j
    seen = {}
    hook = reading_hook(tiny_llama.model_map.layers[0].mlp, "input", lambda t: seen.update(x=t))
    plain = tiny_llama.forward(batch, ["all"], names=["mlp_out_0"], hooks=[hook])
    mlp_out = plain["mlp_out_0"]
    mlp_in = seen["x"][:, : mlp_out.shape[1]]
    features = [1, 2, 6]
    source = torch.rand(4, mlp_out.shape[1], 32) * 3
    iv = {
        "clamp": lambda: FeatureClamp(dictionary=transcoder, features=features, value=2.0),
        "scale": lambda: FeatureScale(dictionary=transcoder, features=features, factor=-1.0),
        "patch": lambda: FeaturePatch(dictionary=transcoder, features=features, source=source),
    }[op]()
    f = transcoder.encode(mlp_in)
    new = f.clone()
    idx = torch.tensor(features)
    new[..., idx] = {"clamp": 2.0, "scale": -f[..., idx], "patch": source[..., idx]}[op]
    by_hand = mlp_out + (new - f) @ transcoder.W_dec / 2.0
    edited = tiny_llama.forward(batch, ["all"], names=["mlp_out_0"], interventions=[iv])
    expected = tiny_llama.forward(
        batch,
        ["all"],
        names=["mlp_out_0"],
        interventions=[Patch(point="mlp_out_0", source=by_hand)],
    )
    mask = plain["position_mask"]
    for key in ("mlp_out_0", "logits"):
        torch.testing.assert_close(edited[key][mask], expected[key][mask], rtol=1e-5, atol=1e-5)
    assert (edited["logits"][mask] - plain["logits"][mask]).abs().max() > 1e-3


def test_transcoder_edits_at_generated_tokens_read_each_steps_mlp_input(tiny_llama):
    batch = _padded("left", PROMPTS[:3])
    clamp = FeatureClamp(
        dictionary=make_transcoder(1), features=[0, 5], value=6.0, apply_to="generated"
    )
    cached = tiny_llama.generate(batch, interventions=[clamp], **GREEDY)
    uncached = tiny_llama.generate(batch, interventions=[clamp], use_cache=False, **GREEDY)
    assert torch.equal(cached, uncached)
    assert not torch.equal(cached, tiny_llama.generate(batch, **GREEDY))
    with pytest.raises(HookscopeError, match="give the source features as a tensor"):
        tiny_llama.forward(
            batch,
            ["last"],
            interventions=[
                FeaturePatch(
                    dictionary=make_transcoder(),
                    positions=["last"],
                    source=tiny_llama.forward(batch, ["last"], names=["mlp_out_0"]),
                )
            ],
        )


def test_a_feature_listed_twice_is_refused():
    """FeatureSteer(features=[3, 3]) used to add the coefficient once, exactly as [3] did."""
    sae = make_sae()
    with pytest.raises(HookscopeError, match=r"\[3\] listed more than once"):
        FeatureSteer(dictionary=sae, features=[3, 1, 3], coefficient=2.0)
    with pytest.raises(HookscopeError, match="more than once"):
        FeatureAblation(dictionary=sae, features=torch.tensor([2, 2]))
    assert FeatureSteer(dictionary=sae, features=[3, 1])._index.tolist() == [1, 3]
