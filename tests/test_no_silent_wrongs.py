"""Inputs that used to give plausible but wrong results now give the right numbers or a clear
error (issue: no silent wrongs). Each test names the input it guards."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import PROMPTS, build_model, build_tokenizer, patching_pair

from hookscope import ExtractionConfig, HookedModel, HookedModelConfig, HookscopeError
from hookscope.errors import InputError, KeywordError
from hookscope.patching import activation_patching

RESID = ExtractionConfig(extract_resid_out=True, layers=[1])


@pytest.fixture(scope="module")
def hm():
    return HookedModel.from_hf(build_model("llama"), build_tokenizer())


# -- misspelled keywords ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "call, word, suggestion",
    [
        ("forward", "extract_config", "extraction_config"),
        ("forward", "target_token_position", "target_token_positions"),
        ("extract_cache", "extract_config", "extraction_config"),
        ("extract_cache", "output_dirr", "output_dir"),
        ("generate", "max_new_toknes", "max_new_tokens"),
        ("generate", "extract_config", "extraction_config"),
    ],
)
def test_misspelled_keywords_raise_naming_the_closest(hm, call, word, suggestion):
    args = {
        "forward": (PROMPTS[:2], ["last"]),
        "extract_cache": (PROMPTS[:2], ["last"]),
        "generate": (PROMPTS[:2],),
    }[call]
    with pytest.raises(KeywordError, match=rf"{word!r}.*did you mean {suggestion!r}"):
        getattr(hm, call)(*args, **{word: RESID})


@pytest.mark.parametrize("call", ["forward", "extract_cache"])
def test_batch_size_on_a_call_says_where_it_lives(hm, call):
    # before: "did you mean 'batch_saver'?", a different option a newcomer would then pass
    with pytest.raises(KeywordError, match=r"'batch_size'.*hm\.config\.batch_size") as raised:
        getattr(hm, call)(PROMPTS[:2], ["last"], batch_size=2)
    assert "batch_saver" not in str(raised.value)


def test_model_keywords_pass_when_the_model_names_them(hm):
    """A keyword the HF forward names (output_hidden_states) reaches it and changes nothing."""
    plain = hm.forward(PROMPTS[:2], ["last"])["logits"]
    assert torch.equal(
        hm.forward(PROMPTS[:2], ["last"], output_hidden_states=True)["logits"], plain
    )


def test_config_fields_are_checked_and_one_layer_is_a_list():
    with pytest.raises(HookscopeError, match="did you mean 'extract_resid_out'"):
        ExtractionConfig(extract_resid_outt=True)
    with pytest.raises(TypeError, match="did you mean 'batch_size'"):  # KeywordError is both
        HookedModelConfig(batchsize=4)
    assert ExtractionConfig(layers=3).layers == [3]
    assert ExtractionConfig(layers=(0, 1)).layers == [0, 1]


@settings(max_examples=40, deadline=None)
@given(word=st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=24))
def test_no_unknown_keyword_is_ignored(hm, word):
    """Property: any keyword forward does not know (its own or the model's) raises; none is
    silently dropped."""
    from hookscope.inputs import model_input_names
    from hookscope.keywords import own_keywords

    known = own_keywords(HookedModel.forward) | model_input_names(hm.hf_model)
    if word in known:
        return
    with pytest.raises(KeywordError, match=repr(word)):
        hm.forward(PROMPTS[0], ["last"], **{word: True})


# -- generation pads on the left by itself ----------------------------------------------------
@pytest.mark.parametrize("side", ["right", "left"])
def test_generate_on_strings_equals_each_prompt_alone(side):
    hm = HookedModel.from_hf(build_model("llama"), build_tokenizer(side))
    prompts = [PROMPTS[0], "a", PROMPTS[2]]
    batched = hm.generate(prompts, max_new_tokens=5, do_sample=False, return_text=True)
    alone = [
        hm.generate(p, max_new_tokens=5, do_sample=False, return_text=True)[0] for p in prompts
    ]
    assert batched == alone
    # a right-padded tokenized batch is moved to the left as well
    batch = build_tokenizer("right")(prompts, return_tensors="pt", padding=True)
    tokens = hm.generate(batch, max_new_tokens=5, do_sample=False)
    for row, prompt in enumerate(prompts):
        own = hm.generate(prompt, max_new_tokens=5, do_sample=False)[0]
        assert torch.equal(tokens[row, -5:], own[-5:])


def test_padding_inside_a_prompt_is_refused(hm):
    batch = {
        "input_ids": torch.tensor([[5, 6, 7, 8]]),
        "attention_mask": torch.tensor([[1, 0, 1, 0]]),
    }
    with pytest.raises(InputError, match="contiguous"):
        hm.generate(batch, max_new_tokens=2, do_sample=False)


# -- a tokenized batch is one batch ------------------------------------------------------------
def test_extract_cache_of_one_tokenized_batch(hm):
    batch = build_tokenizer("left")(PROMPTS[:3], return_tensors="pt", padding=True)
    cache = hm.extract_cache(batch, ["last"], extraction_config=RESID)
    direct = hm.forward(batch, ["last"], extraction_config=RESID)
    assert cache["resid_out_1"].shape[0] == 3
    torch.testing.assert_close(cache["resid_out_1"], direct["resid_out_1"], rtol=0, atol=0)


# -- patching inputs ----------------------------------------------------------------------------


QUERY = [{"patching_elem": "@last", "layers_to_patch": [1], "activation_type": "resid_out_{}"}]


@pytest.mark.parametrize(
    "base_idxs, match",
    [
        ([[7]], r"base_dictonary_idxs\[0\] must list one token id .* \(2 examples\)"),
        (7, "must be a list with one entry per batch"),
        ([7, 11], "2 entries for 1 batches"),
        ([[7, 2.5]], r"base_dictonary_idxs\[0\]\[1\] must be a token id"),
        ([[7, 10**9]], r"base_dictonary_idxs\[0\]\[1\] must be a token id"),
        ([[7, []]], r"\[0\]\[1\] must be a token id .* non-empty"),
    ],
)
def test_compute_patching_checks_dictionary_indices_before_any_forward(hm, base_idxs, match):
    clean, corrupt = patching_pair()
    calls = []
    hook = {"component": "model.layers[0]", "intervention": lambda *a: calls.append(1)}
    hm.register_forward_hook(hook["component"], hook["intervention"])
    try:
        with pytest.raises(InputError, match=match):
            hm.compute_patching(
                ["last"],
                [clean],
                [corrupt],
                patching_query=QUERY,
                base_dictonary_idxs=base_idxs,
                target_dictonary_idxs=[[5, 9]],
                return_logit_diff=True,
            )
    finally:
        hm.remove_hooks()
    assert not calls  # refused before any forward


def test_compute_patching_takes_one_tokenized_batch(hm):
    clean, corrupt = patching_pair()
    as_list = hm.compute_patching(["last"], [clean], [corrupt], patching_query=QUERY)
    as_batch = hm.compute_patching(["last"], clean, corrupt, patching_query=QUERY)
    torch.testing.assert_close(as_batch["logits"], as_list["logits"], rtol=0, atol=0)


def test_patching_equal_runs_warns_and_does_not_normalise(hm):
    clean, _ = patching_pair()
    answers = (torch.tensor([5, 9]), torch.tensor([7, 11]))
    with pytest.warns(UserWarning, match="same logit_diff .* unnormalised"):
        result = activation_patching(hm, clean, clean, answers, per="layer")
    assert not result.normalized
    assert torch.isfinite(result.per_example).all()
    # unnormalised values are the patched metric itself: patching clean into clean changes nothing
    expected = result.clean_metric.view(2, 1).expand_as(result.per_example)
    torch.testing.assert_close(result.per_example, expected, rtol=1e-5, atol=1e-5)


def test_answers_as_strings(hm):
    clean, corrupt = patching_pair()
    tokenizer = hm.get_text_tokenizer()
    one = [
        t
        for t in (" the", " cat", "a", "b")
        if len(tokenizer(t, add_special_tokens=False)["input_ids"]) == 1
    ]
    correct, wrong = one[:2]
    ids = tuple(
        torch.tensor([tokenizer(t, add_special_tokens=False)["input_ids"][0]] * 2)
        for t in (correct, wrong)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        by_text = activation_patching(hm, clean, corrupt, (correct, wrong), per="layer")
        by_ids = activation_patching(hm, clean, corrupt, ids, per="layer")
    torch.testing.assert_close(by_text.per_example, by_ids.per_example, rtol=0, atol=0)
    many = "the cat sat on the mat"
    with pytest.raises(HookscopeError, match="tokens .*single tokens"):
        activation_patching(hm, clean, corrupt, (many, correct), per="layer")
    with pytest.raises(HookscopeError, match="one token per example or one for all"):
        activation_patching(hm, clean, corrupt, ([1, 2, 3], [4, 5, 6]), per="layer")


def test_one_intervention_is_a_list_of_one(hm):
    from hookscope import Ablation

    ablation = Ablation(point="mlp_out_0")
    as_list = hm.forward(PROMPTS[0], ["last"], interventions=[ablation])["logits"]
    alone = hm.forward(PROMPTS[0], ["last"], interventions=ablation)["logits"]
    assert torch.equal(alone, as_list)
    assert not torch.equal(alone, hm.forward(PROMPTS[0], ["last"])["logits"])
    hm.register_interventions(ablation)
    try:
        assert torch.equal(hm.forward(PROMPTS[0], ["last"])["logits"], as_list)
    finally:
        hm.clean_interventions()


@pytest.mark.parametrize(
    "flag", ["sort_by_length", "overwrite", "progress", "move_to_cpu_after_forward"]
)
@pytest.mark.parametrize("value", ["no", None, 0])
def test_extract_cache_flags_that_are_not_bools_are_refused(hm, flag, value):
    """``sort_by_length="no"`` is truthy and None falsy: before, either ran silently."""
    with pytest.raises(InputError, match=f"{flag} must be True or False, got {value!r}"):
        hm.extract_cache(PROMPTS[:2], ["last"], names=["resid_out_0"], **{flag: value})


@pytest.mark.parametrize(
    "call, flag", [("forward", "compile"), ("forward", "move_to_cpu"), ("generate", "return_text")]
)
def test_flags_of_forward_and_generate_that_are_not_bools_are_refused(hm, call, flag):
    with pytest.raises(InputError, match=f"{flag} must be True or False, got 'no'"):
        getattr(hm, call)(PROMPTS[0], **{flag: "no"})


@pytest.mark.parametrize("output_dir", [3, b"acts", ["acts"]])
def test_an_output_dir_that_is_no_path_is_refused_by_name(hm, output_dir):
    with pytest.raises(InputError, match=r"output_dir must be a folder path .* got"):
        hm.extract_cache(PROMPTS[:2], ["last"], names=["resid_out_0"], output_dir=output_dir)
