"""Adversarial review of the one call pipeline (issue 14): inputs that used to give a wrong
number silently, or a confusing failure, each checked against plain HF."""

from __future__ import annotations

import pytest
import torch
from conftest import hook_snapshot
from tiny_models import build_model, build_tokenizer

from hookscope import HookedModel, HookscopeError
from hookscope.interventions import Steer

LONG = "The capital of France is Paris and the capital"


@pytest.fixture(scope="module")
def hm():
    return HookedModel.from_hf(build_model("llama"), build_tokenizer())


def test_a_call_inside_a_hook_of_a_call_on_the_same_model_is_refused(hm):
    """hm.forward inside a user hook used to run with the outer call's hooks and interventions
    still installed: the outer Steer silently changed the inner logits (by ~4)."""
    steer = Steer(point="resid_out_0", positions=["all"], vector=torch.full((64,), 3.0))
    seen: dict[str, BaseException] = {}

    def nested(module, args, output):
        if "error" not in seen:
            try:
                hm.forward(LONG, ["all"])
                seen["error"] = AssertionError("the nested call ran")
            except HookscopeError as error:
                seen["error"] = error

    before = hook_snapshot(hm.hf_model)
    outer = hm.forward(
        "The cat sat",
        ["last"],
        interventions=[steer],
        hooks=[{"component": "model.layers[0].mlp", "intervention": nested}],
    )
    assert isinstance(seen["error"], HookscopeError), seen["error"]
    assert "inside another one" in str(seen["error"])
    # the outer call is unaffected and the model is free and clean afterwards
    alone = hm.forward("The cat sat", ["last"], interventions=[steer])
    torch.testing.assert_close(outer["logits"], alone["logits"], rtol=0, atol=0)
    assert hook_snapshot(hm.hf_model) == before
    plain = hm.hf_model(**hm.prepare_inputs(LONG)).logits
    assert torch.equal(hm.forward(LONG, ["all"])["logits"][0], plain[0])


def _pattern_config():
    from hookscope import ExtractionConfig

    return ExtractionConfig(
        extract_attn_pattern=True, attn_pattern_all_keys=True, layers=[1], save_logits=False
    )


def test_two_models_sharing_one_config_extract_patterns_at_once():
    """``LlamaForCausalLM(a.config)`` shares ``a``'s config object, so switching the kernel name
    on it switches both models. B's call while A's runs used to be refused as "a hooked call
    inside another hooked call on the same model"; and had both read the config before either
    switched it, the first to finish restored it under the other, whose later layers then ran
    without hookscope's attention (patterns missing, pattern edits silently not applied)."""
    import threading

    from transformers import LlamaForCausalLM

    tokenizer = build_tokenizer()
    a_model = build_model("llama")
    b_model = LlamaForCausalLM(a_model.config).eval()
    b_model.load_state_dict(build_model("llama", seed=1).state_dict())
    assert b_model.config is a_model.config
    a, b = HookedModel.from_hf(a_model, tokenizer), HookedModel.from_hf(b_model, tokenizer)
    eager = build_model("llama", attn_implementation="eager", seed=1)
    inputs = tokenizer(["The cat sat on the mat"], return_tensors="pt")
    with torch.no_grad():
        expected_b = eager(**inputs, output_attentions=True).attentions[1][0, 0]
    expected_a = a.forward(inputs, ["all"], extraction_config=_pattern_config())["pattern_L1H0"]
    entered, release = threading.Event(), threading.Event()
    results: dict[str, object] = {}

    def block(module, args, output):
        entered.set()
        release.wait(10)

    def run_a():
        try:
            results["a"] = a.forward(
                inputs,
                ["all"],
                extraction_config=_pattern_config(),
                hooks=[{"component": "model.layers[0].mlp", "intervention": block}],
            )["pattern_L1H0"]
        except BaseException as error:  # noqa: BLE001 - checked below
            results["a"] = error

    thread = threading.Thread(target=run_a)
    thread.start()
    try:
        assert entered.wait(10)
        got_b = b.forward(inputs, ["all"], extraction_config=_pattern_config())["pattern_L1H0"]
    finally:
        release.set()
        thread.join()
    torch.testing.assert_close(got_b[0], expected_b, rtol=1e-5, atol=1e-6)
    assert isinstance(results["a"], torch.Tensor), results["a"]
    torch.testing.assert_close(results["a"], expected_a, rtol=0, atol=0)
    assert a_model.config._attn_implementation == "sdpa"


def test_a_callers_hooks_after_the_last_extracted_layer_still_run(hm):
    """With ``save_logits=False`` the forward used to stop after the last extracted layer even
    when the caller had hooks further on (per call, or kept by register_forward_hook): they
    silently never ran."""
    from hookscope import ExtractionConfig

    config = ExtractionConfig(extract_resid_out=True, layers=[0], save_logits=False)
    seen: list[torch.Tensor] = []

    def record(module, args, output):
        seen.append(output[0][:, -1] if isinstance(output, tuple) else output[:, -1])

    handle = hm.hf_model.model.layers[1].register_forward_hook(record)
    with torch.no_grad():
        hm.hf_model(**hm.prepare_inputs("The cat sat"))
    handle.remove()
    expected = seen.pop()

    cache = hm.forward(
        "The cat sat", ["last"], extraction_config=config,
        hooks=[{"component": "model.layers[1]", "intervention": record}],
    )  # fmt: skip
    assert "resid_out_0" in cache and len(seen) == 1, seen
    torch.testing.assert_close(seen[0], expected, rtol=0, atol=0)
    handle = hm.register_forward_hook("model.layers[1]", record)
    try:
        hm.forward("The cat sat", ["last"], extraction_config=config)
    finally:
        hm.remove_hooks()
    assert len(seen) == 2
    torch.testing.assert_close(seen[1], expected, rtol=0, atol=0)
    assert handle not in hm.persistent_hooks
    handles = hm.set_hooks([{"component": "model.layers[1]", "intervention": record}])
    try:
        hm.forward("The cat sat", ["last"], extraction_config=config)
    finally:
        hm.remove_hooks(handles)
    assert len(seen) == 3 and not hm.persistent_hooks


def test_create_hooks_in_a_plain_forward_do_not_stop_it(hm):
    """hm.create_hooks gives capture hooks for the caller's own forward: they must not end it
    with hookscope's internal StopForward (only the executor catches it)."""
    from hookscope import ExtractionConfig
    from hookscope.hooks import installed

    config = ExtractionConfig(extract_resid_out=True, layers=[0], save_logits=False)
    inputs = hm.prepare_inputs("The cat sat")
    context = hm.position_context(inputs)
    sink: dict[str, torch.Tensor] = {}
    with installed(hm.hf_model, hm.create_hooks(context.resolve(["last"]), sink, config)):
        with torch.no_grad():
            output = hm.hf_model(**inputs, output_hidden_states=True)
    torch.testing.assert_close(
        sink["resid_out_0"][:, 0], output.hidden_states[1][:, -1], rtol=0, atol=0
    )


@pytest.mark.parametrize("form", ["model.compile", "forward", "torch.compile(model)"])
def test_a_compiled_model_sees_every_calls_hooks(form):
    """torch.compile does not guard on module hooks: after a plain hooked call had compiled the
    graph, a Steer had no effect at all (logits off by 2.6) and an extracted point was missing
    from the cache. Hooked calls now run the compiled model's own code."""
    from hookscope import ExtractionConfig

    tokenizer = build_tokenizer()
    reference = HookedModel.from_hf(build_model("llama"), tokenizer)
    model = build_model("llama")
    if form == "model.compile":
        model.compile(backend="eager")
    elif form == "forward":
        model.forward = torch.compile(model.forward, backend="eager")
    else:  # used to fail with "inputs have no input_ids (keys: ['attention_mask', 'input_ids'])"
        model = torch.compile(model, backend="eager")
    hm = HookedModel.from_hf(model, tokenizer)
    vector = torch.randn(64, generator=torch.Generator().manual_seed(0))
    steer = Steer(point="resid_out_0", positions=["all"], vector=vector)
    config = ExtractionConfig(extract_resid_out=True, layers=[0])
    for options in ({}, {"interventions": [steer]}, {"extraction_config": config}):
        got = hm.forward(LONG, ["last"], **options)
        want = reference.forward(LONG, ["last"], **options)
        assert set(got.tensors()) == set(want.tensors()), options
        for key, value in want.tensors().items():
            torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-5, msg=key)


def _dataset_hm(batch_size: int = 2) -> HookedModel:
    from hookscope.config import HookedModelConfig

    return HookedModel(
        HookedModelConfig(batch_size=batch_size), hf_model=build_model("llama"),
        tokenizer=build_tokenizer(),
    )  # fmt: skip


def test_a_per_example_steer_in_extract_cache_reads_each_batchs_rows():
    """A Steer vector with one row per dataset example ``[N, slots, width]`` used to be read
    from rows 0..B-1 in every batch of extract_cache (off by 3.3 from one forward)."""
    from tiny_models import PROMPTS

    from hookscope import ExtractionConfig

    hm = _dataset_hm()
    config = ExtractionConfig(extract_resid_out=True, layers=[1])
    vector = torch.randn(len(PROMPTS), 1, 64, generator=torch.Generator().manual_seed(0))
    steer = Steer(point="resid_out_0", positions=["last"], vector=vector)
    batched = hm.extract_cache(PROMPTS, ["last"], extraction_config=config, interventions=[steer])
    whole = hm.forward(PROMPTS, ["last"], extraction_config=config, interventions=[steer])
    torch.testing.assert_close(batched["resid_out_1"], whole["resid_out_1"], rtol=1e-5, atol=1e-5)
    # a per-batch vector is refused in a dataset of several batches (it has too few rows)
    with pytest.raises(HookscopeError, match="rows 2..3"):
        hm.extract_cache(
            PROMPTS, ["last"], extraction_config=config,
            interventions=[Steer(point="resid_out_0", positions=["last"], vector=vector[:2])],
        )  # fmt: skip


def test_sort_by_length_with_a_per_example_source_is_refused():
    """sort_by_length batches examples out of order while a Patch source spanning the dataset is
    read as contiguous rows: the patched activations were silently another example's (2.7)."""
    from tiny_models import PROMPTS

    from hookscope import ExtractionConfig, InputError
    from hookscope.interventions import Patch

    hm = _dataset_hm()
    source = hm.forward(
        PROMPTS[::-1], ["last"], extraction_config=ExtractionConfig(extract_resid_out=True)
    )
    patch = Patch(point="resid_out_0", positions=["last"], source=source)
    config = ExtractionConfig(extract_resid_out=True, layers=[1])
    with pytest.raises(InputError, match="sort_by_length=True reorders"):
        hm.extract_cache(
            PROMPTS, ["last"], extraction_config=config, interventions=[patch], sort_by_length=True
        )
    hm.register_interventions([patch])
    try:
        with pytest.raises(InputError, match="Patch on resid_out_0"):
            hm.extract_cache(PROMPTS, ["last"], extraction_config=config, sort_by_length=True)
        # unsorted, each batch reads its own rows: the same as one forward over the dataset
        batched = hm.extract_cache(PROMPTS, ["last"], extraction_config=config)
        whole = hm.forward(PROMPTS, ["last"], extraction_config=config)
    finally:
        hm.clean_interventions()
    torch.testing.assert_close(batched["resid_out_1"], whole["resid_out_1"], rtol=1e-5, atol=1e-5)
    # a single vector does not depend on the order: sorting stays allowed
    steer = Steer(point="resid_out_0", positions=["last"], vector=torch.ones(64))
    sorted_run = hm.extract_cache(
        PROMPTS, ["last"], extraction_config=config, interventions=[steer], sort_by_length=True
    )
    plain_run = hm.extract_cache(PROMPTS, ["last"], extraction_config=config, interventions=[steer])
    torch.testing.assert_close(sorted_run["resid_out_1"], plain_run["resid_out_1"])


def test_compute_patching_logit_diffs_see_the_calls_hooks(hm):
    """compute_patching passed its extra keywords (a hook) to the patched run only: the logit
    differences it returns were measured on another model than the patched cache's logits."""
    tokenizer = build_tokenizer()
    base = tokenizer(
        ["The cat sat on the mat", "A dog barked at the cat"], return_tensors="pt", padding=True
    )
    target = tokenizer(
        ["The dog sat on the mat", "A cat barked at the dog"], return_tensors="pt", padding=True
    )
    ids = [[[5, 6], 7]], [[9, 11]]

    def silence(module, args, output):
        return output * 0.0

    hook = {"component": "model.layers[1].mlp", "intervention": silence}
    out = hm.compute_patching(
        ["last"], [base], [target],
        patching_query=[{"patching_elem": "@last", "layers_to_patch": [0], "activation_type": "resid_out_{}"}],
        base_dictonary_idxs=ids[0], target_dictonary_idxs=ids[1], return_logit_diff=True,
        hooks=[hook],
    )  # fmt: skip
    logits = out["logits"][:, 0]
    in_patched = logits[:, [9, 11]].diag() - torch.stack([logits[0, [5, 6]].mean(), logits[1, 7]])
    torch.testing.assert_close(out["logit_diff_in_patched"], in_patched, rtol=1e-5, atol=1e-5)
    clean = hm.forward(target, ["last"], hooks=[hook])["logits"][:, 0]
    in_clean = clean[:, [9, 11]].diag() - torch.stack([clean[0, [5, 6]].mean(), clean[1, 7]])
    torch.testing.assert_close(out["logit_diff_in_clean"], in_clean, rtol=1e-5, atol=1e-5)


def _varlen_kernel(module, query, key, value, attention_mask, scaling=None, sliding_window=None,
                   softcap=None, **kwargs):  # fmt: skip
    """A flash-style kernel on CPU: it gets a 2-D padding mask, or None without padding, and
    applies causality and the sliding window itself (as flash_attention_2 does)."""
    groups = query.shape[1] // key.shape[1]
    keys, values = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scores = query @ keys.transpose(-1, -2) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    q_len, kv_len = query.shape[2], key.shape[2]
    rows = torch.arange(q_len)[:, None] + kv_len - q_len
    columns = torch.arange(kv_len)[None]
    allowed = columns <= rows
    if sliding_window is not None:
        allowed = allowed & (columns > rows - sliding_window)
    allowed = allowed[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, None, :]
    probs = torch.softmax(scores.masked_fill(~allowed, torch.finfo(scores.dtype).min), -1)
    return (probs @ values).transpose(1, 2).contiguous(), probs


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
@pytest.mark.parametrize("padded", [False, True])
def test_patterns_of_sliding_layers_under_a_flash_style_kernel(family, padded):
    """Flash kernels get no mask without padding and apply the sliding window themselves:
    hookscope's patterns of sliding layers then ignored the window (off by up to 0.99 against
    eager output_attentions) and pattern edits attended outside it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    from hookscope import ExtractionConfig
    from hookscope.interventions import PatternEdit

    name = "hookscope_test_varlen"  # no "flash" in it: transformers would look for the package
    AttentionInterface.register(name, _varlen_kernel)
    AttentionMaskInterface.register(name, flash_attention_mask)
    tokenizer = build_tokenizer()
    texts = [LONG, "The cat sat"] if padded else [LONG]
    inputs = tokenizer(texts, return_tensors="pt", padding=True)
    model = build_model(family, attn_implementation=name)
    with torch.no_grad():
        expected = build_model(family, attn_implementation="eager")(
            **inputs, output_attentions=True
        ).attentions[0]  # layer 0 slides (window 4)
    hm = HookedModel.from_hf(model, tokenizer)
    config = ExtractionConfig(
        extract_attn_pattern=True, attn_pattern_all_keys=True, layers=[0], save_logits=False
    )
    cache = hm.forward(inputs, ["all"], extraction_config=config)
    mask = inputs["attention_mask"].bool()
    for row in range(len(texts)):
        real = mask[row]
        got = cache["pattern_L0H1"][row][: int(real.sum())][:, real]
        torch.testing.assert_close(got, expected[row, 1][real][:, real], rtol=1e-5, atol=1e-6)
    identity = PatternEdit(layer=0, op="scale", value=1.0)
    plain = hm.forward(inputs, ["last"])["logits"]
    edited = hm.forward(inputs, ["last"], interventions=[identity])["logits"]
    torch.testing.assert_close(edited, plain, rtol=1e-5, atol=1e-5)


def test_attention_internals_under_flex_attention_are_refused_clearly():
    """flex_attention passes a BlockMask: patterns used to fail deep inside with
    "'BlockMask' object has no attribute 'dim'"."""
    from hookscope import ExtractionConfig
    from hookscope.errors import ArchitectureError
    from hookscope.interventions import PatternEdit

    model = build_model("llama", attn_implementation="flex_attention")
    hm = HookedModel.from_hf(model, build_tokenizer())
    before = hook_snapshot(model)
    config = ExtractionConfig(extract_attn_pattern=True, layers=[0])
    with pytest.raises(ArchitectureError, match="flex_attention.*sdpa"):
        hm.forward("The cat sat", ["all"], extraction_config=config)
    with pytest.raises(ArchitectureError, match="flex_attention"):
        hm.forward("The cat sat", ["all"], interventions=[PatternEdit(layer=0)])
    assert hook_snapshot(model) == before
    assert model.config._attn_implementation == "flex_attention"


def test_an_edited_layer_returns_the_pattern_it_used():
    """Under eager attention a layer returns its attention weights (output_attentions); an
    edited layer returned None instead of the edited pattern."""
    from hookscope import ExtractionConfig
    from hookscope.interventions import PatternEdit

    hm = HookedModel.from_hf(build_model("llama", attn_implementation="eager"), build_tokenizer())
    returned = {}

    def grab(module, args, output):
        returned["weights"] = output[1]

    edit = PatternEdit(layer=0, key_positions=[0], op="zero", renormalize=True)
    config = ExtractionConfig(
        extract_attn_pattern=True, attn_pattern_all_keys=True, layers=[0], save_logits=False
    )
    cache = hm.forward(
        "The cat sat on", ["all"], extraction_config=config, interventions=[edit],
        hooks=[{"component": "model.layers[0].self_attn", "intervention": grab}],
    )  # fmt: skip
    weights = returned["weights"]
    assert weights is not None
    for head in range(4):
        torch.testing.assert_close(weights[0, head], cache[f"pattern_L0H{head}"][0])
    assert torch.all(weights[0, :, 1:, 0] == 0)  # the edit is in it
