"""Features as points: features_{name}, feature_ids_{name} and reconstruction_error_{name} in
forward, extract_cache (and the store) and generate, against the dictionary applied by hand to
HF's own hidden states and to the MLP's input and output read by plain PyTorch hooks."""

from __future__ import annotations

import pytest
import torch
from tiny_models import build_model, build_tokenizer

from hookscope import ExtractionConfig, HookedModel, StoreError
from hookscope.dictionaries import Dictionary, dense_features
from hookscope.errors import ActivationPointError, HookscopeError

PROMPTS = ["the cat sat on the mat today", "a dog", "hello there world"]
D_MODEL = 64


def random_dictionary(reads, writes=None, activation="topk", k=4, name="sae", seed=0, d_sae=48):
    g = torch.Generator().manual_seed(seed)
    transcoder = writes is not None and writes != reads
    return Dictionary(
        W_enc=torch.randn(D_MODEL, d_sae, generator=g) / 4,
        b_enc=torch.randn(d_sae, generator=g) * 0.1,
        W_dec=torch.randn(d_sae, D_MODEL, generator=g) / 8,
        b_dec=torch.randn(D_MODEL, generator=g) * 0.1,
        activation=activation,
        k=k,
        reads=reads,
        writes=writes,
        subtract_decoder_bias=not transcoder,
        name=name,
    )


@pytest.fixture(scope="module")
def hm():
    model = HookedModel.from_hf(build_model("llama"), build_tokenizer())
    model.attach_dictionary(random_dictionary("resid_out_0", name="res0"))
    model.attach_dictionary(
        random_dictionary("mlp_in_1", "mlp_out_1", activation="relu", name="tc1", seed=1)
    )
    return model


def _alone_hidden(hm, prompt, layer):
    """HF's own hidden_states[layer + 1] (= resid_out_layer) for one unpadded prompt."""
    ids = hm.tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        return hm.hf_model(**ids, output_hidden_states=True).hidden_states[layer + 1][0]


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_features_equal_the_dictionary_on_hf_hidden_states(hm, padding_side):
    tokenizer = build_tokenizer(padding_side)
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    config = ExtractionConfig(extract_features=["res0"], extract_reconstruction_error=True)
    cache = hm.forward(batch, ["last", 0], extraction_config=config)
    d = hm.dictionaries["res0"]
    for row, prompt in enumerate(PROMPTS):
        hidden = _alone_hidden(hm, prompt, 0)  # [seq, d_model], no padding
        x = hidden[[-1, 0]]  # the slots of "last" then 0
        torch.testing.assert_close(cache["features_res0"][row], d.encode(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            cache["reconstruction_error_res0"][row], x - d.reconstruct(x), rtol=1e-5, atol=1e-5
        )
        assert (cache["features_res0"][row] > 0).sum(-1).tolist() == [4, 4]  # TopK, k=4
    assert "features_tc1" not in cache and "reconstruction_error_tc1" in cache  # True: all


def test_transcoder_features_and_error_from_the_mlp_input_and_output(hm):
    seen = {}
    mlp = hm.hf_model.model.layers[1].mlp
    handles = [
        mlp.register_forward_pre_hook(lambda m, args: seen.__setitem__("in", args[0])),
        mlp.register_forward_hook(lambda m, args, out: seen.__setitem__("out", out)),
    ]
    batch = build_tokenizer()(PROMPTS, return_tensors="pt", padding=True)
    try:
        with torch.no_grad():
            hm.hf_model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    config = ExtractionConfig(
        extract_features=["tc1"],
        extract_reconstruction_error=["tc1"],
        extract_mlp_in=True,
        layers=[1],
    )
    cache = hm.forward(batch, ["all"], extraction_config=config)
    d, mask = hm.dictionaries["tc1"], cache["position_mask"]
    x, y = seen["in"], seen["out"]  # right padding: slots of "all" are the sequence positions
    torch.testing.assert_close(cache["mlp_in_1"][mask], x[mask])
    torch.testing.assert_close(cache["features_tc1"][mask], d.encode(x[mask]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        cache["reconstruction_error_tc1"][mask],
        y[mask] - d.reconstruct(x[mask]),
        rtol=1e-5,
        atol=1e-5,
    )


def test_top_k_storage_holds_the_largest_features_and_marks_inactive_ones(hm):
    batch = build_tokenizer()(PROMPTS, return_tensors="pt", padding=True)
    dense = hm.forward(
        batch, ["last", 1], extraction_config=ExtractionConfig(extract_features=["res0"])
    )
    sparse = hm.forward(
        batch,
        ["last", 1],
        extraction_config=ExtractionConfig(extract_features=["res0"], feature_top_k=6),
    )
    values, ids = sparse["features_res0"], sparse["feature_ids_res0"]
    assert values.shape == ids.shape == (3, 2, 6) and ids.dtype == torch.int64
    expected = dense["features_res0"].topk(6, dim=-1).values
    torch.testing.assert_close(values, expected)
    # the dictionary keeps k=4 per vector: slots 5 and 6 are inactive, marked -1
    assert (ids[..., 4:] == -1).all() and (values[..., 4:] == 0).all() and (ids[..., :4] >= 0).all()
    torch.testing.assert_close(dense_features(values, ids, 48), dense["features_res0"])


def test_names_request_features_like_points(hm):
    config = ExtractionConfig(extract_features=["res0"], extract_reconstruction_error=["tc1"])
    by_config = hm.forward(["hello there"], ["last"], extraction_config=config)
    by_name = hm.forward(
        ["hello there"], ["last"], names=["features_res0", "reconstruction_error_tc1"]
    )
    assert set(by_name.tensors()) - {"logits", "position_mask"} == {
        "features_res0",
        "reconstruction_error_tc1",
    }
    for key in ("features_res0", "reconstruction_error_tc1"):
        torch.testing.assert_close(by_name[key], by_config[key])


def test_extract_avg_averages_each_item_s_features(hm):
    batch = build_tokenizer()(PROMPTS, return_tensors="pt", padding=True)
    config = ExtractionConfig(extract_features=["res0"], extract_reconstruction_error=["res0"])
    per_token = hm.forward(batch, ["all"], extraction_config=config)
    averaged = hm.forward(
        batch,
        ["all"],
        extraction_config=ExtractionConfig(**{**config.to_dict(), "extract_avg": True}),
    )
    mask = per_token["position_mask"].unsqueeze(-1).float()
    for key in ("features_res0", "reconstruction_error_res0"):
        expected = (per_token[key] * mask).sum(1) / mask.sum(1)
        torch.testing.assert_close(averaged[key][:, 0], expected, rtol=1e-5, atol=1e-6)


def test_extract_cache_store_round_trip_and_a_changed_dictionary_refuses_resume(hm, tmp_path):
    config = ExtractionConfig(extract_features=["res0"], extract_reconstruction_error=["res0"])
    memory = hm.extract_cache(PROMPTS, ["last"], extraction_config=config)
    store = hm.extract_cache(PROMPTS, ["last"], extraction_config=config, output_dir=tmp_path / "s")
    for key in ("features_res0", "reconstruction_error_res0"):
        torch.testing.assert_close(store[key], memory[key])
    d = hm.dictionaries["res0"]
    for row, prompt in enumerate(PROMPTS):
        x = _alone_hidden(hm, prompt, 0)[-1]
        torch.testing.assert_close(
            store["features_res0"][row, 0], d.encode(x), rtol=1e-5, atol=1e-5
        )
    top = ExtractionConfig(extract_features=["res0"], feature_top_k=6)
    sparse = hm.extract_cache(
        PROMPTS, ["last", 0], extraction_config=top, output_dir=tmp_path / "t"
    )
    ids = sparse["feature_ids_res0"]
    assert ids.dtype == torch.int64 and (ids[..., 4:] == -1).all()  # k=4: two inactive
    in_memory = hm.extract_cache(PROMPTS, ["last", 0], extraction_config=top)
    assert torch.equal(ids, in_memory["feature_ids_res0"])
    other = random_dictionary("resid_out_0", name="res0", seed=5)
    hm.attach_dictionary(other, replace=True)
    try:
        with pytest.raises(StoreError, match="dictionaries"):
            hm.extract_cache(PROMPTS, ["last"], extraction_config=config, output_dir=tmp_path / "s")
    finally:
        hm.attach_dictionary(d, replace=True)


def test_generate_extracts_features_per_step(hm):
    config = ExtractionConfig(
        extract_features=["res0"], extract_resid_out=True, layers=[0], save_logits=False
    )
    cache = hm.generate(
        ["the cat sat", "a dog"], max_new_tokens=3, do_sample=False, target_token_positions=["last"],
        extraction_config=config,
    )  # fmt: skip
    assert cache["features_res0"].shape == (2, 3, 48)  # the prompt's last token + 2 fed back
    d = hm.dictionaries["res0"]
    torch.testing.assert_close(
        cache["features_res0"], d.encode(cache["resid_out_0"]), rtol=1e-5, atol=1e-5
    )
    # the fed-back tokens' features, against HF on the generated sequence
    sequences = cache["sequences"]
    for row in range(2):
        real = sequences[row][sequences[row] != hm.tokenizer.pad_token_id]
        with torch.no_grad():
            hidden = hm.hf_model(real[None], output_hidden_states=True).hidden_states[1][0]
        torch.testing.assert_close(
            cache["features_res0"][row, 1:], d.encode(hidden[-3:-1]), rtol=1e-4, atol=1e-4
        )


def test_bad_requests_fail_at_plan_time(hm):
    with pytest.raises(HookscopeError, match="Did you mean 'res0'"):
        hm.forward(["hi"], ["last"], extraction_config=ExtractionConfig(extract_features=["rse0"]))
    with pytest.raises(HookscopeError, match="feature_top_k"):
        hm.forward(["hi"], ["last"], extraction_config=ExtractionConfig(feature_top_k=3))
    # more top features than the dictionary has used to be capped to d_sae silently
    too_many = ExtractionConfig(extract_features=["res0"], feature_top_k=10_000)
    with pytest.raises(HookscopeError, match=r"feature_top_k=10000 is more than .* features"):
        hm.forward(["hi"], ["last"], extraction_config=too_many)
    with pytest.raises(ActivationPointError, match="out of range"):
        hm.attach_dictionary(random_dictionary("resid_out_7", name="deep"))
    narrow = Dictionary(
        W_enc=torch.zeros(32, 8), b_enc=torch.zeros(8), W_dec=torch.zeros(8, 32), b_dec=torch.zeros(32),
        activation="relu", reads="resid_out_1", name="narrow",
    )  # fmt: skip
    with pytest.raises(
        ActivationPointError, match="64 wide on this model, but the dictionary's d_in is 32"
    ):
        hm.attach_dictionary(narrow)
    with pytest.raises(HookscopeError, match="attached already"):
        hm.attach_dictionary(random_dictionary("resid_out_1", name="res0"))
    with pytest.raises(HookscopeError, match="attached: \\['res0', 'tc1'\\]"):
        hm.detach_dictionary("nope")
    bare = HookedModel.from_hf(hm.hf_model, hm.tokenizer)
    with pytest.raises(HookscopeError, match="attach_dictionary"):
        bare.forward(["hi"], ["last"], extraction_config=ExtractionConfig(extract_features=True))
    with pytest.raises(HookscopeError, match="list of dictionary names"):
        ExtractionConfig(extract_features=3)
