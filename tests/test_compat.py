"""easyroutine's code, as its docs write it, on tiny models: values checked against hookscope's
own API and HF ground truth. The compatibility layer sits on top: no core module imports it."""

from __future__ import annotations

import ast
import warnings
from pathlib import Path

import pytest
import torch
from conftest import hook_snapshot
from tiny_models import PROMPTS, build_model, build_tokenizer

import hookscope
from hookscope import Ablation, HookedModel, HookedModelConfig, KeywordError, Patch, PatternEdit
from hookscope.compat import (
    ExtractionConfig,
    Intervention,
    LogitLens,
    ReferenceSpellingWarning,
)
from hookscope.compat.notes import forget_notes

SOURCE = Path(hookscope.__file__).parent


@pytest.fixture(autouse=True)
def fresh_notes():
    forget_notes()
    yield
    forget_notes()


def _imports_compat(path: Path) -> list[str]:
    """The import statements of ``path`` that reach hookscope.compat."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            names = [alias.name for alias in node.names]
            if "compat" in module.split(".") or (module in ("", "hookscope") and "compat" in names):
                found.append(f"{path.name}:{node.lineno}")
        elif isinstance(node, ast.Import):
            found += [f"{path.name}:{node.lineno}" for a in node.names if "compat" in a.name]
    return found


def test_no_core_module_imports_the_compatibility_layer():
    core = [p for p in SOURCE.rglob("*.py") if "compat" not in p.relative_to(SOURCE).parts]
    assert len(core) > 20
    offenders = [
        hit
        for path in core
        if path.name != "__init__.py" or path.parent != SOURCE
        for hit in _imports_compat(path)
    ]
    assert offenders == []
    # the package's __init__ imports it last, after every core name
    init = (SOURCE / "__init__.py").read_text()
    assert init.index("from . import compat") > init.index("__all__ = [")


def test_extraction_config_field_aliases_with_one_note_each():
    with pytest.warns(
        ReferenceSpellingWarning, match="hookscope's is ExtractionConfig\\(extract_avg"
    ):
        config = ExtractionConfig(extract_resid_out=True, avg=True)
    assert config == ExtractionConfig(extract_resid_out=True, extract_avg=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second use is silent
        assert ExtractionConfig(avg=True).extract_avg
    projected = ExtractionConfig(extract_head_values_projected=True)
    assert projected.extract_values_vectors_projected
    over_examples = ExtractionConfig(
        extract_attn_pattern=True, extract_head_values_projected=True, avg_over_example=True
    )
    assert over_examples == ExtractionConfig(
        extract_avg_attn_pattern=True, extract_avg_values_vectors_projected=True
    )


@pytest.mark.parametrize("fields, match", [({"avgg": True}, "unexpected keyword argument 'avgg'")])
def test_misspelled_fields_raise(fields, match):
    with pytest.raises(KeywordError, match=match):
        ExtractionConfig(**fields)


def test_custom_eager_is_eager_with_a_note():
    with pytest.warns(ReferenceSpellingWarning, match="needs no custom modules"):
        config = HookedModelConfig(attn_implementation="custom_eager")
    assert config.attn_implementation == "eager"


def test_qkv_point_aliases_for_extraction(tiny_llama):
    config = ExtractionConfig(extract_queries=True, extract_keys=True, extract_values=True)
    cache = tiny_llama.forward(PROMPTS[0], ["all"], extraction_config=config)
    with pytest.warns(ReferenceSpellingWarning, match="'queries_L1'.*'queries_1'"):
        assert cache["queries_L1"] is cache["queries_1"]
    assert "keys_L0" in cache and "values_L1" in cache and "values_L7" not in cache
    # the projection outputs themselves (k_proj of layer 0), read by a plain PyTorch hook
    seen = {}
    handle = tiny_llama.hf_model.model.layers[0].self_attn.k_proj.register_forward_hook(
        lambda m, a, out: seen.setdefault("k", out.detach().clone())
    )
    try:
        tiny_llama.forward(PROMPTS[0], ["all"])
    finally:
        handle.remove()
    torch.testing.assert_close(cache["keys_L0"], seen["k"])
    named = ExtractionConfig.from_names(["keys_L1"])
    assert named.extract_keys and named.layers == [1]


def test_qkv_point_aliases_as_intervention_points(tiny_llama):
    ablate = Intervention(
        type="full", activation="values_L0", token_positions=["last"], patching_values="ablation"
    )
    assert ablate == Ablation(point="values_L0", positions=["last"], method="scale", factor=0.0)
    config = ExtractionConfig(extract_values=True)
    ours = tiny_llama.forward(
        PROMPTS[0],
        ["all"],
        extraction_config=config,
        interventions=[Ablation(point="values_0", positions=["last"], method="zero")],
    )
    theirs = tiny_llama.forward(
        PROMPTS[0], ["all"], extraction_config=config, interventions=[ablate]
    )
    assert torch.all(theirs["values_0"][:, -1] == 0) and torch.any(theirs["values_0"][:, 0] != 0)
    torch.testing.assert_close(theirs["logits"], ours["logits"])


def test_intervention_constructor_patches_and_edits_patterns(tiny_llama):
    value = torch.randn(1, 1, 64)
    patch = Intervention(
        type="full", activation="resid_out_0", token_positions=["last"], patching_values=value
    )
    assert isinstance(patch, Patch)
    cache = tiny_llama.forward(
        PROMPTS[1],
        ["last"],
        extraction_config=ExtractionConfig(extract_resid_out=True),
        interventions=[patch],
    )
    torch.testing.assert_close(cache["resid_out_0"], value)
    columns = Intervention(
        type="columns", activation="pattern_L1H2", token_positions=[0], multiplication_value=0.0
    )
    assert isinstance(columns, PatternEdit) and columns.key_positions == [0]
    pattern = ExtractionConfig(
        extract_attn_pattern=True, attn_heads=[{"layer": 1, "head": 2}], attn_pattern_all_keys=True
    )
    edited = tiny_llama.forward(
        PROMPTS[1], ["all"], extraction_config=pattern, interventions=[columns]
    )["pattern_L1H2"]
    plain = tiny_llama.forward(PROMPTS[1], ["all"], extraction_config=pattern)["pattern_L1H2"]
    assert torch.all(edited[..., 0] == 0) and torch.all(plain[..., 0] > 0)
    torch.testing.assert_close(edited[..., 1:], plain[..., 1:])  # no renormalisation asked


def test_reference_dicts_are_accepted_as_registered_interventions(tiny_llama):
    as_dict = {"type": "full", "activation": "resid_out_1", "token_positions": ["all"]}
    tiny_llama.register_interventions([as_dict])
    try:
        cache = tiny_llama.forward(
            PROMPTS[0], ["all"], extraction_config=ExtractionConfig(extract_resid_out=True)
        )
    finally:
        tiny_llama.clean_interventions()
    assert torch.all(cache["resid_out_1"] == 0)


def test_hooks_with_easyroutines_signature(tiny_llama):
    before = hook_snapshot(tiny_llama.hf_model)
    seen = {}

    def zero_mlp(module, args, kwargs, output):
        seen["kwargs"] = kwargs
        return torch.zeros_like(output)

    def read_layer_input(module, args, kwargs, output):
        seen["output"] = output
        seen["input"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

    config = ExtractionConfig(extract_mlp_out=True, extract_resid_in=True)
    cache = tiny_llama.forward(
        PROMPTS[0],
        ["all"],
        extraction_config=config,
        hooks=[
            {"component": "model.layers[0].mlp.output", "intervention": zero_mlp},
            {"component": "model.layers[1].input", "intervention": read_layer_input},
        ],
    )
    assert torch.all(cache["mlp_out_0"] == 0) and isinstance(seen["kwargs"], dict)
    assert seen["output"] is None
    torch.testing.assert_close(seen["input"], cache["resid_in_1"])
    assert hook_snapshot(tiny_llama.hf_model) == before


def test_model_accessors(tiny_llama):
    hf = tiny_llama.hf_model
    with pytest.warns(ReferenceSpellingWarning, match="hm.model_map"):
        config = tiny_llama.model_config
    assert (config.num_hidden_layers, config.num_attention_heads) == (2, 4)
    assert (config.num_key_value_heads, config.num_key_value_groups) == (2, 2)
    assert (config.hidden_size, config.head_dim) == (64, 16)
    with pytest.warns(ReferenceSpellingWarning):
        assert tiny_llama.hf_tokenizer is tiny_llama.tokenizer
    assert tiny_llama.is_multimodal() is False
    assert tiny_llama.get_lm_head() is hf.lm_head
    assert tiny_llama.get_last_layernorm() is hf.model.norm
    tiny_llama.assert_module_exists("model.layers[1].mlp.output")
    with pytest.raises(ValueError, match=r"no module at .*Closest paths: \[.model.layers.1.mlp.,"):
        tiny_llama.assert_module_exists("model.layers[1].mlpp")
    assert hookscope.ActivationCache().is_empty()
    before, logits = hook_snapshot(hf), tiny_llama.forward(PROMPTS[0])["logits"]
    with pytest.warns(ReferenceSpellingWarning, match="needs no custom modules"):
        tiny_llama.set_custom_modules()
    tiny_llama.restore_original_modules()
    assert hook_snapshot(hf) == before
    torch.testing.assert_close(tiny_llama.forward(PROMPTS[0])["logits"], logits)


def _expected_top_k(hm, prompt: str, k: int) -> dict[str, float]:
    inputs = hm.tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        probs = hm.hf_model(**inputs).logits[0, -1].float().softmax(-1)
    values, ids = probs.topk(k)
    expected: dict[str, float] = {}
    for token_id, prob in zip(ids.tolist(), values.tolist(), strict=True):
        expected.setdefault(hm.tokenizer.decode([token_id]).strip(), prob)
    return expected


def test_predict_top_k_per_example(tiny_llama):
    one = tiny_llama.predict(k=5, inputs=PROMPTS[0])
    expected = _expected_top_k(tiny_llama, PROMPTS[0], 5)
    assert list(one) == list(expected)
    torch.testing.assert_close(
        torch.tensor(list(one.values())), torch.tensor(list(expected.values()))
    )
    several = tiny_llama.predict(k=3, inputs=PROMPTS[:2])
    assert isinstance(several, list) and len(several) == 2
    for prompt, got in zip(PROMPTS[:2], several, strict=True):  # padded batch: last real token
        want = _expected_top_k(tiny_llama, prompt, 3)
        assert list(got) == list(want)
        torch.testing.assert_close(
            torch.tensor(list(got.values())), torch.tensor(list(want.values()))
        )


def test_memory_size_and_tree(tiny_llama):
    cache = tiny_llama.forward(
        PROMPTS[0], ["all"], extraction_config=ExtractionConfig(extract_resid_out=True)
    )
    one = cache["resid_out_0"]
    size = one.numel() * one.element_size()
    assert cache.memory_size("resid_out_0") == f"{size / 1024:.1f} KB"
    total = sum(v.numel() * v.element_size() for v in cache.tensors().values())
    assert cache.memory_size() == total  # hookscope's int without a key
    tree = cache.memory_tree()
    assert tree["resid_out_1"] == f"{size / 1024:.1f} KB" and set(tree) == set(cache)
    assert cache.memory_tree(grouped_tree=True)["resid_out"] == f"{2 * size / 1024:.1f} KB"
    with pytest.raises(KeyError, match="resid_out_9"):
        cache.memory_size("resid_out_9")


def test_logit_lens_from_model(tiny_llama):
    cache = tiny_llama.forward(
        PROMPTS[:2], ["last"], extraction_config=ExtractionConfig(extract_resid_out=True)
    )
    lens = LogitLens.from_model(tiny_llama)
    out = lens.compute(activations=cache, target_key="resid_out_{i}")
    assert sorted(out) == ["logit_lens_resid_out_0", "logit_lens_resid_out_1"]
    # the last layer read through the final norm and unembedding is the model's own output
    torch.testing.assert_close(
        out["logit_lens_resid_out_1"], cache["logits"].float(), rtol=1e-4, atol=1e-4
    )
    hf = tiny_llama.hf_model
    raw = lens.compute(cache, "resid_out_0", apply_norm=False)["logit_lens_resid_out_0"]
    torch.testing.assert_close(raw, hf.lm_head(cache["resid_out_0"]).float())
    pairs = [(5, 9), (7, 11)]
    diff = lens.compute(cache, "resid_out_1", token_directions=pairs)["logit_lens_resid_out_1"]
    logits = cache["logits"].float()
    expected = torch.stack([logits[i, :, a] - logits[i, :, b] for i, (a, b) in enumerate(pairs)])
    torch.testing.assert_close(diff, expected, rtol=1e-4, atol=1e-4)
    accuracy = lens.compute(cache, "resid_out_1", token_directions=pairs, metric="accuracy")
    assert accuracy["logit_lens_resid_out_1"].item() == (expected[:, -1] > 0).float().mean().item()
    with pytest.raises(hookscope.HookscopeError, match="no cache key matches 'attn_out_"):
        lens.compute(cache, "attn_out_{i}")


def test_batch_saver_fields_read_at_the_top_level(tiny_llama):
    prompts = ["The cat sat", "A dog barked", "Hello world"]
    labels = iter([torch.tensor([1, 0]), torch.tensor([1])])
    batches = [prompts[:2], prompts[2:]]
    cache = tiny_llama.extract_cache(
        batches,
        ["last"],
        extraction_config=ExtractionConfig(extract_resid_out=True),
        batch_saver=lambda batch: {"labels": next(labels)},
    )
    assert cache["labels"].tolist() == [1, 0, 1] and "labels" in cache
    assert cache["labels"] is cache["batch_saver"]["labels"]
    with pytest.raises(hookscope.HookscopeError, match=r"fields \['resid_out_0'\] share names"):
        tiny_llama.extract_cache(
            batches[:1],
            ["last"],
            extraction_config=ExtractionConfig(extract_resid_out=True),
            batch_saver=lambda batch: {"resid_out_0": torch.zeros(2)},
        )


# easyroutine 1.1.5's interpretability module: its exports, their public methods and fields, and
# the public names of its submodules (read from its wheel).
REFERENCE_NAMES = """
HookedModel ExtractionConfig Intervention InterventionConfig ActivationSaver ActivationLoader
HookedModelConfig custom_eager set_custom_modules restore_original_modules model_config
hf_tokenizer text_tokenizer get_text_tokenizer get_tokenizer get_processor get_image_placeholder
is_multimodal use_full_model use_language_model_only get_lm_head get_last_layernorm
assert_module_exists assert_all_modules_exist eval device to_string_tokens get_module_from_string
register_forward_hook set_hooks remove_hooks register_interventions clean_interventions
create_hooks forward vocabulary_index predict generate extract_cache compute_patching
avg avg_over_example extract_head_values_projected extract_head_keys_projected
extract_head_queries_projected attn_pattern_avg is_not_empty to_dict
queries_L{l} keys_L{l} values_L{l} special random-inputs-partition-k TokenIndex
is_empty cuda memory_size memory_tree register_aggregation deferred_mode add_with_info
ValueWithInfo add_metadata map_to_dict just_old aggregate_last_layernorm
LogitLens from_model_name from_tuned_lens ModelConfig ModelFactory TokenizerFactory
InputHandler AblationType AblationConfig AblationManager InterventionManager QueryResult
""".split()


def test_migration_page_has_a_row_for_every_reference_name():
    page = (SOURCE.parents[1] / "docs" / "migrating-from-easyroutine.md").read_text()
    rows = [line for line in page.splitlines() if line.startswith("| ")]
    missing = [name for name in REFERENCE_NAMES if not any(name in row for row in rows)]
    assert missing == []


def _rows_matching(slots: torch.Tensor, every: torch.Tensor) -> list[int]:
    """For each slot vector ``[d]``, the index of the equal row of ``every`` ``[T, d]``."""
    found = []
    for vector in slots:
        hits = [t for t in range(len(every)) if torch.equal(every[t], vector)]
        assert len(hits) == 1
        found += hits
    return found


def test_random_inputs_partition_draws_inside_the_partition(tiny_llama):
    config = ExtractionConfig(extract_resid_out=True, save_logits=False)
    prompt = PROMPTS[2]
    every = tiny_llama.forward(prompt, ["all"], extraction_config=config)["resid_out_1"][0]
    drawn = tiny_llama.forward(
        prompt, ["random-inputs-partition-1-3"], pivot_positions=[4], extraction_config=config
    )
    chosen = _rows_matching(drawn["resid_out_1"][0], every)
    assert len(set(chosen)) == 3 and all(4 <= t < len(every) for t in chosen)
    assert chosen == sorted(chosen)
    one = tiny_llama.forward(
        prompt, ["random-inputs-partition-0"], pivot_positions=[4], extraction_config=config
    )
    assert _rows_matching(one["resid_out_1"][0], every)[0] < 4
    # a row draws the same tokens in any batch
    batch = tiny_llama.forward(
        [PROMPTS[0], prompt],
        ["random-inputs-partition-1-3"],
        pivot_positions=[4],
        extraction_config=config,
    )
    torch.testing.assert_close(batch["resid_out_1"][1], drawn["resid_out_1"][0])
    with pytest.raises(hookscope.PositionError, match="needs pivot_positions"):
        tiny_llama.forward(prompt, ["random-inputs-partition-1"])


def test_easyroutine_keywords_name_what_to_do_instead(tiny_llama):
    with pytest.raises(KeywordError, match="'vocabulary_index' .*retain_grad"):
        tiny_llama.forward(PROMPTS[0], ["last"], vocabulary_index=5)
    with pytest.raises(KeywordError, match="'external_cache' .*not needed"):
        tiny_llama.forward(PROMPTS[0], ["last"], external_cache=None)


def test_input_embedding_gradients_recipe_from_the_migration_page(tiny_llama):
    kept = {}

    def keep(module, args, output):
        output.retain_grad()
        kept["embeddings"] = output

    cache = tiny_llama.forward(
        PROMPTS[1],
        ["last"],
        extraction_config=ExtractionConfig(keep_gradient=True),
        hooks=[hookscope.ModuleHook(tiny_llama.model_map.embed, keep)],
    )
    cache["logits"][0, -1, 5].backward()
    hf = tiny_llama.hf_model
    ids = tiny_llama.tokenizer(PROMPTS[1], return_tensors="pt")["input_ids"]
    embeddings = hf.get_input_embeddings()(ids).detach().requires_grad_()
    hf(inputs_embeds=embeddings).logits[0, -1, 5].backward()
    torch.testing.assert_close(kept["embeddings"].grad, embeddings.grad)
    hf.zero_grad(set_to_none=True)


def test_deferred_mode_gives_what_plain_cat_gives(tiny_llama):
    config = ExtractionConfig(extract_resid_out=True)
    parts = [tiny_llama.forward(p, ["last"], extraction_config=config) for p in PROMPTS[:3]]
    deferred, plain = hookscope.ActivationCache(), hookscope.ActivationCache()
    with deferred.deferred_mode() as same:
        assert same is deferred
        for part in parts:
            deferred.cat(part)
    for part in parts:
        plain.cat(part)
    whole = tiny_llama.forward(PROMPTS[:3], ["last"], extraction_config=config)
    torch.testing.assert_close(deferred["resid_out_1"], plain["resid_out_1"])
    torch.testing.assert_close(deferred["resid_out_1"], whole["resid_out_1"], rtol=1e-4, atol=1e-5)


def _eager_attention(prompt: str, layer: int, head: int) -> torch.Tensor:
    """``[T, T]`` post-softmax attention of one head, from HF's eager ``output_attentions``."""
    from tiny_models import build_model, build_tokenizer

    model = build_model("llama", attn_implementation="eager")
    inputs = build_tokenizer()(prompt, return_tensors="pt")
    with torch.no_grad():
        return model(**inputs, output_attentions=True).attentions[layer][0, head]


@pytest.mark.parametrize("method", ["mean", "sum", "baseline_ratio"])
def test_attn_pattern_avg_blocks_match_eager_attention(tiny_llama, method):
    prompts = [PROMPTS[2], PROMPTS[0]]  # different lengths: the second row is padded
    targets, rows = ["first", (1, 3), "last"], [(2, 4), "last"]
    config = ExtractionConfig(
        extract_attn_pattern=True,
        attn_heads=[{"layer": 1, "head": 3}],
        attn_pattern_row_positions=rows,
        attn_pattern_avg=method,
    )
    got = tiny_llama.forward(prompts, targets, extraction_config=config)["pattern_L1H3"]
    assert got.shape == (2, 2, 3)
    for b, prompt in enumerate(prompts):
        attn = _eager_attention(prompt, 1, 3)
        T = len(attn)
        row_groups, col_groups = [[2, 3], [T - 1]], [[0], [1, 2], [T - 1]]
        for i, r in enumerate(row_groups):
            for j, c in enumerate(col_groups):
                block = attn[r][:, c]
                if method == "sum":
                    want = block.sum()
                elif method == "mean":
                    want = block.mean()
                else:  # uniform causal attention: row q spreads 1 / (q + 1) over keys 0..q
                    share = sum(sum(k <= q for k in c) / (q + 1) for q in r) / len(r)
                    want = block.mean() / share
                # a block no row can see (keys after every row) is 0 / 0: NaN, as 0 / 0 is
                torch.testing.assert_close(got[b, i, j], want, rtol=1e-4, atol=1e-5, equal_nan=True)
    assert got[:, 0, 2].isnan().all() == (method == "baseline_ratio")


def test_attn_pattern_avg_needs_per_item_patterns(tiny_llama):
    with pytest.raises(hookscope.HookscopeError, match="set extract_attn_pattern=True"):
        tiny_llama.forward(
            PROMPTS[0], ["last"], extraction_config=ExtractionConfig(attn_pattern_avg="mean")
        )
    with pytest.raises(hookscope.HookscopeError, match="cannot be combined with attn_pattern_all"):
        tiny_llama.forward(
            PROMPTS[0],
            ["last"],
            extraction_config=ExtractionConfig(
                extract_attn_pattern=True, attn_pattern_all_keys=True, attn_pattern_avg="sum"
            ),
        )
    with pytest.raises(hookscope.HookscopeError, match="got 'median'"):
        tiny_llama.forward(
            PROMPTS[0],
            ["last"],
            extraction_config=ExtractionConfig(
                extract_attn_pattern=True, attn_pattern_avg="median"
            ),
        )


def test_attn_pattern_avg_merges_across_batches(tiny_llama):
    config = ExtractionConfig(
        extract_attn_pattern=True, attn_heads=[{"layer": 0, "head": 1}], attn_pattern_avg="mean"
    )
    merged = tiny_llama.extract_cache(
        [PROMPTS[:2], PROMPTS[2:]], ["first", "all"], extraction_config=config
    )
    whole = tiny_llama.forward(PROMPTS, ["first", "all"], extraction_config=config)
    assert merged["pattern_L0H1"].shape == (4, 2, 2)
    torch.testing.assert_close(merged["pattern_L0H1"], whole["pattern_L0H1"], rtol=1e-4, atol=1e-5)


def test_special_position_is_the_tokenizers_special_tokens(tiny_llama):
    prompt = "The cat</s> sat on<s> the mat"
    ids = tiny_llama.tokenizer(prompt)["input_ids"]
    where = [i for i, t in enumerate(ids) if t in tiny_llama.tokenizer.all_special_ids]
    assert len(where) == 2  # </s> and <s> as single tokens
    config = ExtractionConfig(extract_resid_out=True, save_logits=False)
    every = tiny_llama.forward(prompt, ["all"], extraction_config=config)["resid_out_1"]
    special = tiny_llama.forward(prompt, ["special"], extraction_config=config)
    torch.testing.assert_close(special["resid_out_1"], every[:, where])
    assert special["mapping_index"] == {"special": [0, 1]}
    with pytest.raises(hookscope.PositionError, match="example 1 has no special token"):
        tiny_llama.forward([prompt, "A dog barked"], ["special"])


def test_register_aggregation_merges_matching_keys_by_the_function(tiny_llama):
    config = ExtractionConfig(extract_resid_out=True)
    parts = [tiny_llama.forward(p, ["last"], extraction_config=config) for p in PROMPTS[:3]]
    whole = tiny_llama.forward(PROMPTS[:3], ["last"], extraction_config=config)
    cache = hookscope.ActivationCache()
    cache.register_aggregation(
        "resid_out", lambda old, new: new.sum(0) if old is None else old + new.sum(0)
    )
    for part in parts:
        cache.cat(part)
    # the aggregated keys are summed over examples; the others still concatenate
    torch.testing.assert_close(
        cache["resid_out_0"], whole["resid_out_0"].sum(0), rtol=1e-4, atol=1e-4
    )
    torch.testing.assert_close(cache["logits"], whole["logits"], rtol=1e-4, atol=1e-5)
    assert torch.equal(cache.take(torch.tensor([1]))["resid_out_1"], cache["resid_out_1"])
    late = hookscope.ActivationCache().cat(parts[0])
    late.register_aggregation("resid_out", lambda old, new: new)
    with pytest.raises(hookscope.HookscopeError, match="register aggregations before the first"):
        late.cat(parts[1])
    assert len(late["resid_out_0"]) == 1  # the refused batch changed nothing
    with pytest.raises(hookscope.HookscopeError, match="needs a function"):
        late.register_aggregation("logits", "sum")


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # separate and fused q/k/v projections
def test_projected_queries_and_keys_as_easyroutine_defines_them(family):
    """projected_query / projected_key: the projection output's head slice (before rotary)
    through head h's block of W_O, checked against raw torch hooks on the projections."""
    model = build_model(family)
    hm = HookedModel.from_hf(model, build_tokenizer())
    m = hm.model_map
    seen = {}
    attention = m.layers[1].attention
    if family == "gpt2":
        handle = attention.c_attn.register_forward_hook(lambda mod, a, out: seen.update(qkv=out))
    else:
        handles = [
            attention.q_proj.register_forward_hook(lambda mod, a, out: seen.update(q=out)),
            attention.k_proj.register_forward_hook(lambda mod, a, out: seen.update(k=out)),
        ]
    batch = build_tokenizer("left")(
        ["The cat sat on the mat", "A dog"], return_tensors="pt", padding=True
    )
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # as alone, under padding
    with torch.no_grad():
        model(**batch, position_ids=positions)
    if family == "gpt2":
        handle.remove()
        d = m.n_heads * m.d_head
        seen["q"], seen["k"] = seen["qkv"][..., :d], seen["qkv"][..., d : 2 * d]
        w_o = attention.c_proj.weight.T  # Conv1D stores [in, out]
    else:
        for handle in handles:
            handle.remove()
        w_o = attention.o_proj.weight
    config = ExtractionConfig(
        extract_head_queries_projected=True, extract_head_keys_projected=True, layers=[1]
    )
    cache = hm.forward(batch, ["last"], extraction_config=config)
    last = batch["attention_mask"].shape[1] - 1  # left padding: the last column is each last token
    groups = m.n_heads // m.n_kv_heads
    for h in range(m.n_heads):
        block = w_o[:, h * m.d_head : (h + 1) * m.d_head]
        kv = h // groups
        want_q = seen["q"][:, last, h * m.d_head : (h + 1) * m.d_head] @ block.T
        want_k = seen["k"][:, last, kv * m.d_head : (kv + 1) * m.d_head] @ block.T
        torch.testing.assert_close(
            cache[f"projected_query_L1H{h}"][:, 0], want_q, rtol=1e-5, atol=1e-6
        )
        torch.testing.assert_close(
            cache[f"projected_key_L1H{h}"][:, 0], want_k, rtol=1e-5, atol=1e-6
        )
