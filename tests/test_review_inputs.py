"""An adversary's review of the inputs (issue: no silent wrongs). Each test names an input a
user may plausibly pass that gave wrong numbers, mixed data or a raw Python error, and checks
that it now gives the right numbers or a HookscopeError naming the bad value."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import PROMPTS, build_model, build_tokenizer

from hookscope import (
    Ablation,
    ExtractionConfig,
    HookedModel,
    HookedModelConfig,
    HookscopeError,
    StoreError,
    logit_lens,
)
from hookscope.errors import InputError, KeywordError, PositionError

RESID = ExtractionConfig(extract_resid_out=True, layers=[1])


@pytest.fixture(scope="module")
def hm():
    model = HookedModel.from_hf(build_model("llama"), build_tokenizer())
    model.config.batch_size = 2
    return model


def _alone(hm, prompt):
    return hm.forward(prompt, ["last"], extraction_config=RESID)["resid_out_1"]


# -- datasets ---------------------------------------------------------------------------------
def test_extract_cache_of_one_string_is_one_example(hm):
    """Before: a string was iterated, giving one example per character."""
    cache = hm.extract_cache(PROMPTS[1], ["last"], extraction_config=RESID)
    assert cache["resid_out_1"].shape[0] == 1
    torch.testing.assert_close(cache["resid_out_1"], _alone(hm, PROMPTS[1]))


@pytest.mark.parametrize("call", ["forward", "extract_cache"])
def test_a_list_mixing_strings_and_records_names_the_item(hm, call):
    """Before: the tokenizer's raw TypeError ('TextEncodeInput must be Union[...]')."""
    with pytest.raises(InputError, match=r"item 1 .* dict"):
        getattr(hm, call)([PROMPTS[0], {"text": PROMPTS[1]}], ["last"], extraction_config=RESID)


def test_batch_size_must_be_positive(hm):
    """Before: HookedModelConfig(batch_size=0) was accepted and extract_cache raised range()'s
    'arg 3 must not be zero'; a negative size did the same."""
    for bad in (0, -1, 2.5, True):
        with pytest.raises(HookscopeError, match="batch_size must be a positive int"):
            HookedModelConfig(batch_size=bad)
    hm.config.batch_size = 0
    try:
        with pytest.raises(InputError, match="batch_size must be a positive int, got 0"):
            hm.extract_cache(PROMPTS, ["last"], extraction_config=RESID)
    finally:
        hm.config.batch_size = 2


# -- model inputs -----------------------------------------------------------------------------
def test_ids_outside_the_vocabulary_or_not_integers_are_refused(hm):
    """Before: torch's 'index out of range in self' and the embedding's dtype RuntimeError."""
    vocab = hm.hf_model.get_input_embeddings().num_embeddings
    for ids, bad in ((torch.tensor([[5, 6, vocab]]), vocab), (torch.tensor([[5, -1, 6]]), -1)):
        with pytest.raises(InputError, match=rf"token id {bad}, .*valid ids: 0\.\.{vocab - 1}"):
            hm.forward(ids, ["last"], extraction_config=RESID)
    with pytest.raises(InputError, match="integer token ids, got dtype torch.float32"):
        hm.forward(torch.tensor([[5.0, 6.0]]), ["last"], extraction_config=RESID)


def test_a_mask_of_other_values_than_0_and_1_is_refused(hm):
    """Before: a mask [0, 2, 1] ran; position ids are its cumulative sum, so every position
    after the 2 was shifted (a silently different computation)."""
    batch = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.tensor([[0, 2, 1]])}
    with pytest.raises(InputError, match=r"only 0 \(padding\) and 1 .*found \[2.0\]"):
        hm.forward(batch, ["last"], extraction_config=RESID)


def test_a_ragged_tokenized_batch_says_to_pad(hm):
    """Before: torch's 'expected sequence of length 11 at dim 1 (got 7)'."""
    ragged = hm.get_tokenizer()(PROMPTS[:2])  # lists of different lengths, no padding
    with pytest.raises(InputError, match="not a rectangular batch.*padding=True"):
        hm.forward(ragged, ["last"], extraction_config=RESID)


def test_extraction_config_of_the_wrong_type(hm):
    """Before: AttributeError: 'dict' object has no attribute 'layers'."""
    with pytest.raises(InputError, match="must be an ExtractionConfig, got dict"):
        hm.forward(PROMPTS[0], ["last"], extraction_config={"extract_resid_out": True})


# -- positions --------------------------------------------------------------------------------
def test_pivot_positions_must_be_distinct_ints(hm):
    """Before: pivots [1, 1] made 'inputs-partition-1' an empty selection without a word, and
    an int pivot raised "'int' object is not iterable"."""
    for pivots in ([1, 1], 1):
        with pytest.raises(PositionError, match="pivot_positions must be a list of distinct ints"):
            hm.forward(PROMPTS[1], ["inputs-partition-1"], pivot_positions=pivots)


# -- lens -------------------------------------------------------------------------------------
def test_logit_lens_takes_one_item_and_one_layer_as_forward_does(hm):
    """Before: target_token_positions='last' was read as the items 'l', 'a', 's', 't' and
    layers=1 raised "'int' object is not iterable"."""
    lens = logit_lens(hm, PROMPTS[1], "last", layers=1)
    listed = logit_lens(hm, PROMPTS[1], ["last"], layers=[1])
    assert lens.layers == [1]
    torch.testing.assert_close(lens.logits, listed.logits)


# -- stores -----------------------------------------------------------------------------------
def test_a_store_path_that_is_a_file_is_refused_and_kept(hm, tmp_path):
    """Before: a raw FileExistsError."""
    path = tmp_path / "results"
    path.write_text("my notes")
    with pytest.raises(StoreError, match="is a file, not a folder"):
        hm.extract_cache(PROMPTS, ["last"], extraction_config=RESID, output_dir=str(path))
    assert path.read_text() == "my notes"


@pytest.mark.parametrize("second", ["without", "other"])
def test_a_store_does_not_resume_under_other_interventions(hm, tmp_path, second):
    """Before: a run with an ablation, resumed without it (or with another one), appended
    unablated rows to the ablated ones: one store, two experiments."""
    ablate = [Ablation(point="resid_out_0", positions=["all"])]
    other = {"without": None, "other": [Ablation(point="resid_out_0", method="scale", factor=2)]}
    out = str(tmp_path / "store")
    hm.extract_cache(
        PROMPTS[:2], ["last"], extraction_config=RESID, output_dir=out, interventions=ablate
    )
    with pytest.raises(StoreError, match="different extraction.*interventions"):
        hm.extract_cache(
            PROMPTS, ["last"], extraction_config=RESID, output_dir=out, interventions=other[second]
        )
    resumed = hm.extract_cache(
        PROMPTS, ["last"], extraction_config=RESID, output_dir=out, interventions=ablate
    )
    alone = hm.forward(PROMPTS, ["last"], extraction_config=RESID, interventions=ablate)
    torch.testing.assert_close(resumed["resid_out_1"], alone["resid_out_1"])


def test_a_store_does_not_resume_under_another_steering_vector(hm, tmp_path):
    """Interventions holding tensors are told apart by their values, not only their type."""
    from hookscope import Steer

    out = str(tmp_path / "store")
    steer = lambda v: [Steer(point="resid_out_0", vector=torch.full((64,), v))]  # noqa: E731
    hm.extract_cache(
        PROMPTS[:2], ["last"], extraction_config=RESID, output_dir=out, interventions=steer(1.0)
    )
    with pytest.raises(StoreError, match="interventions"):
        hm.extract_cache(
            PROMPTS, ["last"], extraction_config=RESID, output_dir=out, interventions=steer(2.0)
        )


# -- activation_patching ----------------------------------------------------------------------
def _pair():
    ids = torch.randint(3, 300, (2, 6), generator=torch.Generator().manual_seed(0))
    clean = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    corrupt = {"input_ids": ids.clone(), "attention_mask": torch.ones_like(ids)}
    corrupt["input_ids"][:, 1] = torch.tensor([50, 60])
    return clean, corrupt


@pytest.mark.parametrize("bad", [-1, 320, 5000])
def test_patching_answers_outside_the_vocabulary_are_refused(hm, bad):
    """Before: -1 silently read the vocabulary's last token (a plausible grid of the wrong
    token); 5000 gave a raw IndexError."""
    from hookscope import activation_patching

    clean, corrupt = _pair()
    with pytest.raises(HookscopeError, match=rf"answers \(correct\) hold token ids \[{bad}, 5\]"):
        activation_patching(hm, clean, corrupt, answers=([bad, 5], [6, 6]))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"point": "resid_mid"}, "point 'resid_mid' cannot be swept; valid points"),  # KeyError
        ({"point": "mlp_out", "per": "head_position"}, "per='head_position' is not valid"),
        ({"metric": "logit_dif"}, "metric 'logit_dif' is not one of"),  # AttributeError
        ({"batch_size": 0}, "batch_size must be a positive int, got 0"),  # ZeroDivisionError
        ({"batch_size": -1}, "batch_size must be a positive int, got -1"),  # ran, '-24 forwards'
    ],
)
def test_patching_options_name_what_exists(hm, options, message):
    from hookscope import activation_patching

    clean, corrupt = _pair()
    with pytest.raises(HookscopeError, match=message):
        activation_patching(hm, clean, corrupt, answers=(5, 6), **options)


def test_patching_one_layer_as_an_int(hm):
    """Before: layers=1 raised "'int' object is not iterable"; now it is the grid of [1]."""
    from hookscope import activation_patching

    clean, corrupt = _pair()
    one = activation_patching(hm, clean, corrupt, answers=(5, 6), layers=1)
    full = activation_patching(hm, clean, corrupt, answers=(5, 6))
    torch.testing.assert_close(one.values[0], full.values[1])


# -- compute_patching (the reference design's form) -------------------------------------------
QUERY = {"patching_elem": "@last", "layers_to_patch": [0], "activation_type": "resid_in_{}"}


def _patch_args():
    tokenizer = build_tokenizer()
    return (
        tokenizer(PROMPTS[:2], return_tensors="pt", padding=True),
        tokenizer(PROMPTS[2:], return_tensors="pt", padding=True),
    )


def test_compute_patching_with_an_empty_query_refuses(hm):
    """Before: patching_query=[] returned the unpatched run as if it were patched."""
    base, target = _patch_args()
    with pytest.raises(HookscopeError, match="patching_query is empty"):
        hm.compute_patching(["last"], base, target, patching_query=[])


def test_compute_patching_query_keys_and_layers_are_checked(hm):
    """Before: a misspelled key was ignored, an activation_type without '{}' patched one layer
    for every layer asked, and layers_to_patch=0 raised a raw TypeError."""
    base, target = _patch_args()
    misspelled = {**QUERY, "layer_to_patch": [1]}
    with pytest.raises(KeywordError, match="'layer_to_patch'; did you mean 'layers_to_patch'"):
        hm.compute_patching(["last"], base, target, patching_query=[misspelled])
    fixed = {**QUERY, "activation_type": "resid_in_0", "layers_to_patch": [0, 1]}
    with pytest.raises(HookscopeError, match="has no '\\{\\}' for the layer"):
        hm.compute_patching(["last"], base, target, patching_query=[fixed])
    one = hm.compute_patching(
        ["last"], base, target, patching_query={**QUERY, "layers_to_patch": 0}
    )
    listed = hm.compute_patching(["last"], base, target, patching_query=[QUERY])
    torch.testing.assert_close(one["logits"], listed["logits"])


def test_compute_patching_keywords_and_one_position_item(hm):
    """Before: base_dictionary_idxs (spelt right; the reference spells 'dictonary') was
    suggested 'position_ids' by forward(); target_token_positions='last' became 'l','a','s','t'."""
    base, target = _patch_args()
    with pytest.raises(KeywordError, match="did you mean 'base_dictonary_idxs'"):
        hm.compute_patching(["last"], base, target, base_dictionary_idxs=[[5, 6]])
    one = hm.compute_patching("last", base, target, patching_query=[QUERY])
    listed = hm.compute_patching(["last"], base, target, patching_query=[QUERY])
    torch.testing.assert_close(one["logits"], listed["logits"])


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_a_resume_refuses_a_store_with_a_damaged_shard(hm, tmp_path, damage):
    """Before: a resume skipped the committed batches without looking at their files, ran every
    new batch, then failed when opening the result ('truncated or missing'), without saying how
    to recover. Now it fails before any forward and names the way out (overwrite=True)."""
    out = tmp_path / "store"
    hm.extract_cache(PROMPTS[:2], ["last"], extraction_config=RESID, output_dir=str(out))
    shard = out / "shard-00000.safetensors"
    if damage == "deleted":
        shard.unlink()
    else:
        shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(StoreError, match="shard-00000.safetensors of .* is damaged"):
        hm.extract_cache(PROMPTS, ["last"], extraction_config=RESID, output_dir=str(out))
    again = hm.extract_cache(
        PROMPTS, ["last"], extraction_config=RESID, output_dir=str(out), overwrite=True
    )
    alone = hm.forward(PROMPTS, ["last"], extraction_config=RESID)
    torch.testing.assert_close(again["resid_out_1"], alone["resid_out_1"])


def test_a_store_does_not_resume_with_other_weights(hm, tmp_path):
    """Before: two models of one family wrapped from memory (a base and its fine-tune, here two
    seeds) have the same name, type and dtype, so the second resumed the first's store and
    appended its rows: one store, two models."""
    out = str(tmp_path / "store")
    hm.extract_cache(PROMPTS[:2], ["last"], extraction_config=RESID, output_dir=out)
    other = HookedModel.from_hf(build_model("llama", seed=1), build_tokenizer())
    other.config.batch_size = 2
    with pytest.raises(StoreError, match="different extraction \\(weights: stored"):
        other.extract_cache(PROMPTS, ["last"], extraction_config=RESID, output_dir=out)
    resumed = hm.extract_cache(PROMPTS, ["last"], extraction_config=RESID, output_dir=out)
    assert len(resumed) == len(PROMPTS)


# -- command line -----------------------------------------------------------------------------
def test_cli_overwrite_keeps_the_users_files_beside_a_store(tiny_folder, tmp_path):
    """Before: `extract --overwrite` removed the whole --out folder (shutil.rmtree), so a
    notebook saved beside the store was lost; the API's overwrite=True removes only its files."""
    from hookscope.cli import main

    prompts, out = tmp_path / "p.txt", tmp_path / "results"
    prompts.write_text("The cat sat\nA dog\n")
    argv = ["extract", str(tiny_folder), "--prompts", str(prompts), "--points", "resid_out"]
    argv += ["--layers", "1", "--out", str(out)]
    assert main(argv) == 0
    (out / "analysis.ipynb").write_text("my work")
    (out / "figures").mkdir()
    (out / "figures" / "fig1.png").write_bytes(b"png")
    prompts.write_text("A dog\nThe cat sat\n")
    assert main([*argv, "--overwrite"]) == 0
    assert (out / "analysis.ipynb").read_text() == "my work"
    assert (out / "figures" / "fig1.png").read_bytes() == b"png"
    from hookscope.store import ActivationStore

    assert len(ActivationStore.open(out)) == 2


# -- empty prompts, configs, interventions, lens, cache files --------------------------------
@pytest.mark.parametrize("call", ["forward", "generate"])
def test_an_empty_prompt_is_named(hm, call):
    """Before: generate('') raised a raw IndexError from the padding code."""
    args = {"forward": (["last"],), "generate": ()}[call]
    options = {"generate": {"max_new_tokens": 2}}.get(call, {})
    with pytest.raises(InputError, match="example 1 has no tokens"):
        getattr(hm, call)([PROMPTS[0], ""], *args, **options)
    with pytest.raises(InputError, match="example 0 has no tokens"):
        getattr(hm, call)("", *args, **options)


def test_config_layers_of_the_wrong_type_say_so():
    """Before: layers=True raised "'bool' object is not iterable"; layers='1' and [1.0] were
    reported as layers out of range."""
    import numpy as np

    for bad in (True, "1", [1.0], [1, "2"]):
        with pytest.raises(HookscopeError, match="layers must be None .*an int or a list of ints"):
            ExtractionConfig(layers=bad)
    assert ExtractionConfig(layers=np.arange(2)).layers == [0, 1]
    assert ExtractionConfig(layers=torch.tensor(1)).layers == [1]
    assert ExtractionConfig(vision_layers=range(2)).vision_layers == [0, 1]


def test_misspelled_intervention_fields_name_the_closest():
    """Before: Python's TypeError, without the closest field (and not a HookscopeError)."""
    from hookscope import Patch, Steer, intervention_from_dict

    with pytest.raises(KeywordError, match="'methd'; did you mean 'method'"):
        Ablation(point="resid_out_0", methd="zero")
    with pytest.raises(KeywordError, match="'coeficient'; did you mean 'coefficient'"):
        Steer(point="resid_out_0", vector=torch.ones(64), coeficient=2.0)
    with pytest.raises(KeywordError, match="'sourse'; did you mean 'source'"):
        Patch(point="resid_out_0", sourse=torch.ones(64))
    with pytest.raises(KeywordError, match="'pont'; did you mean 'point'"):
        intervention_from_dict({"type": "Ablation", "pont": "resid_out_0"})


def test_lens_token_ids_and_top_k_are_checked(hm):
    """Before: lens.logit(-1) / prob(-1) silently read the vocabulary's last token; rank(-1),
    out-of-vocabulary ids and top_k(k > vocab) raised raw torch errors."""
    lens = logit_lens(hm, PROMPTS[1], ["last"])
    vocab = lens.logits.shape[-1]
    for read in (lens.logit, lens.prob, lens.rank):
        for bad in (-1, vocab):
            with pytest.raises(HookscopeError, match=rf"token id {bad} .*0\.\.{vocab - 1}"):
                read(bad)
    with pytest.raises(HookscopeError, match=rf"k must be an int in 0\.\.{vocab}"):
        lens.top_k(vocab + 1)
    with pytest.raises(HookscopeError, match="example 3 .* out of range"):
        lens.top_k(2, example=3)
    top = lens.top_k(1)
    best = lens.logits[:, 0, -1].argmax(-1)
    assert [row[0][0] for row in top] == hm.to_string_tokens(best.tolist())


def test_saving_a_cache_to_a_folder_is_refused(hm, tmp_path):
    """Before: a raw IsADirectoryError from the atomic rename."""
    cache = hm.forward(PROMPTS[:2], ["last"], extraction_config=RESID)
    with pytest.raises(HookscopeError, match="it is a folder; give a file path"):
        cache.save(tmp_path)


# -- property: every input form of the same prompts gives the same numbers ---------------------
def _forms(tokenizer, prompts):
    """The same prompts as each input form a user may pass to forward."""
    left = build_tokenizer("left")
    forms = {
        "list": list(prompts),
        "right": tokenizer(list(prompts), return_tensors="pt", padding=True),
        "left": left(list(prompts), return_tensors="pt", padding=True),
        "lists": dict(tokenizer(list(prompts), padding=True)),
    }
    if len(prompts) == 1:
        ids = tokenizer(prompts[0], return_tensors="pt")["input_ids"]
        forms |= {"string": prompts[0], "ids 1-D": ids[0], "ids 2-D": ids}
    return forms


@settings(max_examples=12, deadline=None)
@given(
    chosen=st.lists(st.sampled_from(PROMPTS), min_size=1, max_size=3),
    items=st.sampled_from([["last"], [0, "last"], [(0, 2)], ["first", -2]]),
)
def test_every_input_form_gives_each_prompts_own_numbers(hm, chosen, items):
    """Property: strings, padded batches (either side), lists of ids and id tensors of the same
    prompts give, row by row, what each prompt gives alone."""
    alone = [hm.forward(p, items, extraction_config=RESID)["resid_out_1"][0] for p in chosen]
    for name, form in _forms(hm.get_tokenizer(), chosen).items():
        got = hm.forward(form, items, extraction_config=RESID)["resid_out_1"]
        for row, expected in enumerate(alone):
            torch.testing.assert_close(got[row], expected, rtol=1e-5, atol=1e-5, msg=name)


@settings(max_examples=8, deadline=None)
@given(chosen=st.lists(st.sampled_from(PROMPTS), min_size=1, max_size=5))
def test_every_dataset_form_gives_the_same_cache(hm, chosen):
    """Property: a list, a tuple, a generator (one-shot), a DataLoader, records, a list of
    batches and one tokenized batch of the same prompts give the same rows in the same order."""
    from torch.utils.data import DataLoader

    tokenizer = hm.get_tokenizer()
    expected = torch.cat([_alone(hm, p) for p in chosen])
    forms = {
        "list": list(chosen),
        "tuple": tuple(chosen),
        "generator": (p for p in chosen),
        "dataloader": DataLoader(list(chosen), batch_size=2),
        "records": [{"text": p, "label": i} for i, p in enumerate(chosen)],
        "batches": [
            tokenizer(chosen[i : i + 2], return_tensors="pt", padding=True)
            for i in range(0, len(chosen), 2)
        ],
        "one batch": tokenizer(list(chosen), return_tensors="pt", padding=True),
    }
    if len(chosen) == 1:
        forms["string"] = chosen[0]
    for name, form in forms.items():
        got = hm.extract_cache(form, ["last"], extraction_config=RESID)["resid_out_1"]
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=name)


def test_a_dataloader_over_records_says_what_to_pass(hm):
    """A DataLoader over records collates them to {'text': [...], 'label': tensor}: the error
    now says to pass the records themselves (which give the right rows, as the property above
    checks)."""
    from torch.utils.data import DataLoader

    records = [{"text": p, "label": i} for i, p in enumerate(PROMPTS)]
    with pytest.raises(InputError, match="pass the list of records itself to extract_cache"):
        hm.extract_cache(DataLoader(records, batch_size=2), ["last"], extraction_config=RESID)


def test_opening_an_incomplete_store_warns(hm, tmp_path, monkeypatch):
    """Before: a store whose run was stopped opened without a word; store[key] then held the
    first rows only, easy to take for the whole dataset."""
    from hookscope import ActivationStore
    from hookscope.store import StoreWriter

    write, calls = StoreWriter.write, []

    def stop_at_second(self, cache):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return write(self, cache)

    monkeypatch.setattr(StoreWriter, "write", stop_at_second)
    out = tmp_path / "store"
    with pytest.raises(KeyboardInterrupt):
        hm.extract_cache(PROMPTS, ["last"], extraction_config=RESID, output_dir=str(out))
    with pytest.warns(UserWarning, match="incomplete store .* first 2 examples only"):
        partial = ActivationStore.open(out)
    torch.testing.assert_close(partial["resid_out_1"], _alone(hm, PROMPTS[:2]))
    monkeypatch.setattr(StoreWriter, "write", write)
    done = hm.extract_cache(PROMPTS, ["last"], extraction_config=RESID, output_dir=str(out))
    assert done.complete and len(done) == len(PROMPTS)


def test_weights_fingerprint_reads_large_parameters():
    """A float32 linspace over 28 million indices rounds its last index past the end (found on
    the embedded model's embedding); the sampled indices stay in range for any size."""
    from hookscope.store import weights_fingerprint

    big = torch.nn.Embedding(28311552 // 576, 576)
    first = weights_fingerprint(big)
    with torch.no_grad():
        big.weight.view(-1)[-1] += 1  # the last value is one of the samples
    assert weights_fingerprint(big) != first
