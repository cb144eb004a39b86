"""The compiled path (``compile=True``): the same values as the eager path and as HF's own
hidden states, batched with padding; capture inside one graph; under each shape policy (dynamic
shapes, a CPU's; length buckets, an accelerator's, forced here) bounded compiles; clear
refusals. One tiny Llama per padding side, few shapes: every new shape compiles (seconds)."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from tiny_models import PROMPTS, build_model, build_tokenizer
from torch import nn

import hookscope.compiled
from hookscope import ExtractionConfig, HookedModel, InputError, Steer
from hookscope.compiled import BUCKET, CompileError, bucket_length, dynamic_shapes, pad_to_bucket

# lengths 2..13 tokens: one bucket; the long prompt (> BUCKET tokens) falls in the second
LONG = " ".join(["the cat sat on the mat"] * 8)
GRAPHS_DYNAMIC = 1  # every length, batches padded to batch_size rows
POINTS = ExtractionConfig(
    extract_resid_out=True, extract_attn_out=True, extract_mlp_out=True, extract_head_out=True
)


@pytest.fixture(scope="module", params=["left", "right"])
def hm(request):
    model = HookedModel.from_hf(build_model("llama"), build_tokenizer(request.param))
    model.config.batch_size = 4
    return model


@pytest.fixture(params=["dynamic", "buckets"])
def policy(request, monkeypatch):
    """The shape policy, forced (on this CPU the path's own choice is "dynamic")."""
    dynamic = request.param == "dynamic"
    monkeypatch.setattr(hookscope.compiled, "dynamic_shapes", lambda device: dynamic)
    return request.param


def assert_same_cache(compiled, eager, tolerance=1e-5):
    assert sorted(compiled.keys()) == sorted(eager.keys())
    for key in eager:
        if isinstance(eager[key], torch.Tensor):
            assert compiled[key].shape == eager[key].shape, key
            assert compiled[key].dtype == eager[key].dtype, key
            torch.testing.assert_close(compiled[key], eager[key], atol=tolerance, rtol=tolerance)
        else:
            assert compiled[key] == eager[key], key


@contextmanager
def torch_hook(register, active=True):
    """A user's torch hook (``register()`` returns its handle) held for the block, if active."""
    handle = register() if active else None
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()


def compiled_and_eager(hm, config, prompts=PROMPTS[:3], positions=("last", 0)):
    """The same forward compiled and eager."""
    return tuple(
        hm.forward(prompts, list(positions), extraction_config=config, compile=compile)
        for compile in (True, False)
    )


def test_compiled_forward_equals_eager_and_hf_hidden_states(hm, policy):
    """Module points and logits at positions with per-row widths (padded slots), batched with
    padding (3 rows padded to 4, the length to a bucket): as eager, and resid_out_0 as HF's own
    hidden state of each prompt run alone."""
    prompts = PROMPTS[:3]
    items = ["last", 0, (1, 3)]
    compiled = hm.forward(prompts, items, extraction_config=POINTS, compile=True)
    eager = hm.forward(prompts, items, extraction_config=POINTS)
    assert_same_cache(compiled, eager)
    for row, prompt in enumerate(prompts):
        ids = hm.get_text_tokenizer()(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            hidden = hm.hf_model(ids, output_hidden_states=True).hidden_states[1][0]
        torch.testing.assert_close(
            compiled["resid_out_0"][row, 0], hidden[-1], atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(compiled["resid_out_0"][row, 1], hidden[0], atol=1e-5, rtol=1e-5)


def test_compiled_dataset_ragged_slots_and_average(hm, policy):
    """``"all"`` selects a different count per row (zero-filled padded slots); extract_avg
    averages each row's real slots; a 5-prompt dataset in batches of 4 (the short last batch
    is padded with rows that are dropped)."""
    config = ExtractionConfig(extract_resid_out=True, save_logits=False)
    prompts = [*PROMPTS, "The dog"]
    compiled = hm.extract_cache(prompts, ["all"], extraction_config=config, compile=True)
    eager = hm.extract_cache(prompts, ["all"], extraction_config=config)
    assert_same_cache(compiled, eager)
    assert not bool(compiled["position_mask"].all())  # some slots really are padding
    averaged = ExtractionConfig(extract_resid_out=True, save_logits=False, extract_avg=True)
    compiled = hm.extract_cache(prompts, ["all"], extraction_config=averaged, compile=True)
    eager = hm.extract_cache(prompts, ["all"], extraction_config=averaged)
    assert_same_cache(compiled, eager)


def test_one_graph_no_break_and_bounded_compiles(policy):
    """Capture is inside the graph (no graph break per layer). Buckets: batches of new lengths
    in a seen bucket reuse its graph, a longer batch compiles once for its bucket. Dynamic
    shapes: one graph for every length (short batches padded to batch_size rows). Another model of
    the same shape reuses the graph with its own weights (per-head outputs read its own W_O), and
    so do later calls of one model."""
    from torch._dynamo.utils import counters

    config = ExtractionConfig(extract_resid_out=True, extract_head_out=True, save_logits=False)
    counters.clear()
    for seed, prompts in ((3, PROMPTS[:2]), (3, PROMPTS[2:4]), (3, [PROMPTS[0]]), (3, [LONG, PROMPTS[1]]), (4, PROMPTS[1:3])):  # fmt: skip
        hm = HookedModel.from_hf(build_model("llama", seed=seed), build_tokenizer("left"))
        hm.config.batch_size = 2
        compiled = hm.forward(prompts, ["last"], extraction_config=config, compile=True)
        eager = hm.forward(prompts, ["last"], extraction_config=config)
        assert_same_cache(compiled, eager)
    assert dict(counters["graph_break"]) == {}
    graphs = {"buckets": 2, "dynamic": GRAPHS_DYNAMIC}[policy]  # buckets: two, two graphs
    assert counters["stats"]["unique_graphs"] == graphs
    # the same model called again, as over a dataset: no graph more (state the hooks pass
    # within a call, left over from the last one, once recompiled the whole graph)
    for prompts in (PROMPTS[:2], [PROMPTS[3]], PROMPTS[2:4]):
        assert_same_cache(
            hm.forward(prompts, ["last"], extraction_config=config, compile=True),
            hm.forward(prompts, ["last"], extraction_config=config),
        )
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.parametrize(
    "request_kwargs, named",
    [
        ({"interventions": [Steer(point="resid_out_0", vector=torch.ones(64))]}, "interventions"),
        ({"extraction_config": ExtractionConfig(extract_attn_pattern=True)}, "attention patterns"),
        ({"hooks": [{"component": "model.layers[0]", "intervention": lambda m, a, o: o}]}, "hooks"),
        (
            {"extraction_config": ExtractionConfig(extract_resid_out=True, keep_gradient=True)},
            "keep_gradient",
        ),
    ],
)
def test_what_cannot_compile_is_refused_by_name(tiny_llama, request_kwargs, named):
    request_kwargs.setdefault("extraction_config", ExtractionConfig(extract_resid_out=True))
    with pytest.raises(CompileError, match=named) as raised:
        tiny_llama.forward(PROMPTS[:2], ["last"], compile=True, **request_kwargs)
    assert "compile=False" in str(raised.value)


def test_dictionary_features_are_refused_not_dropped(tiny_llama):
    """Features are encoded by eager hooks: compile=True refuses them by the dictionary's name
    (it once returned the cache without the features_ keys)."""
    from hookscope.dictionaries import Dictionary

    d_model = tiny_llama.hf_model.config.hidden_size
    sae = Dictionary(
        W_enc=torch.randn(d_model, 8), b_enc=torch.zeros(8), W_dec=torch.randn(8, d_model),
        b_dec=torch.zeros(d_model), activation="relu", reads="resid_out_0",
        writes="resid_out_0", name="compiled_sae",
    )  # fmt: skip
    tiny_llama.attach_dictionary(sae)
    try:
        config = ExtractionConfig(extract_resid_out=True, extract_features=True)
        with pytest.raises(CompileError, match="dictionary features.*compiled_sae"):
            tiny_llama.forward(PROMPTS[:2], ["last"], extraction_config=config, compile=True)
        eager = tiny_llama.forward(PROMPTS[:2], ["last"], extraction_config=config)
        torch.testing.assert_close(eager["features_compiled_sae"], sae.encode(eager["resid_out_0"]))
    finally:
        tiny_llama.detach_dictionary("compiled_sae")


@pytest.mark.parametrize("flag", ["no", "False", 1, None])
def test_a_compile_flag_that_is_not_a_bool_is_refused(tiny_llama, flag):
    # "no" / "False" are truthy: before, they silently ran the compiled path
    config = ExtractionConfig(extract_resid_out=True)
    with pytest.raises(InputError, match="compile must be True or False"):
        tiny_llama.forward(PROMPTS[:2], ["last"], extraction_config=config, compile=flag)
    with pytest.raises(InputError, match=repr(flag)):
        tiny_llama.extract_cache(PROMPTS[:2], ["last"], extraction_config=config, compile=flag)


def test_the_shape_policy_is_dynamic_on_a_cpu_only():
    assert dynamic_shapes("cpu") and dynamic_shapes(torch.device("cpu"))
    assert not dynamic_shapes("cuda") and not dynamic_shapes(torch.device("cuda", 1))


def test_bucket_padding_by_hand():
    assert [bucket_length(n) for n in (1, BUCKET, BUCKET + 1, 3 * BUCKET)] == [
        BUCKET, BUCKET, 2 * BUCKET, 3 * BUCKET
    ]  # fmt: skip
    model = build_model("gpt2")  # absolute positions: position_ids must follow the real tokens
    inputs = {"input_ids": torch.tensor([[0, 5, 6], [7, 8, 9]]), "attention_mask": torch.tensor([[0, 1, 1], [1, 1, 1]])}  # fmt: skip
    padded = pad_to_bucket(inputs, model, "left", pad_id=0, rows=3)
    ids, mask = padded.model_inputs["input_ids"], padded.model_inputs["attention_mask"]
    assert ids.shape == mask.shape == (3, BUCKET)
    assert ids[:, -3:].tolist() == [[0, 5, 6], [7, 8, 9], [7, 8, 9]]  # new row: a copy of the last
    assert int(mask[:, : BUCKET - 3].sum()) == 0 and int(ids[:, : BUCKET - 3].sum()) == 0
    assert padded.model_inputs["position_ids"][0, -2:].tolist() == [0, 1]
    assert (padded.rows, padded.shift) == (2, BUCKET - 3)
    right = pad_to_bucket(inputs, model, "right", pad_id=0, rows=2)
    assert right.model_inputs["input_ids"][:, :3].tolist() == inputs["input_ids"].tolist()
    assert right.shift == 0
    with pytest.raises(CompileError, match="pixel_values"):
        pad_to_bucket({**inputs, "pixel_values": torch.zeros(1)}, model, "left", 0, 2)


def test_the_process_recompile_limit_is_left_as_it_was(tiny_llama):
    """compile=True raised torch._dynamo's recompile_limit for the whole process."""
    import torch._dynamo

    before = torch._dynamo.config.recompile_limit
    tiny_llama.forward(["a b c"], ["last"], names=["resid_out_0"], compile=True)
    assert torch._dynamo.config.recompile_limit == before


def test_a_store_written_compiled_is_not_resumed_eager(tiny_llama, tmp_path):
    """compile=True was not in the store's description: a resume with compile=False mixed shards
    from both paths (about 1e-6 apart) in one store."""
    from hookscope.store import StoreError

    names = ["resid_out_0"]
    store = tiny_llama.extract_cache(
        PROMPTS[:2], ["last"], names=names, output_dir=tmp_path / "s", compile=True
    )
    again = tiny_llama.extract_cache(
        PROMPTS[:2], ["last"], names=names, output_dir=tmp_path / "s", compile=True
    )
    assert torch.equal(again["resid_out_0"], store["resid_out_0"])
    with pytest.raises(StoreError, match="compile"):
        tiny_llama.extract_cache(PROMPTS[:2], ["last"], names=names, output_dir=tmp_path / "s")


def test_unpadding_hooks_run_each_mlp_on_real_tokens_only():
    """The mechanism of compiled_unpad, run eagerly: each MLP sees ``[1, n_real, d]`` (the mask's
    real tokens, minus filler rows), its output is scattered back zero at padding, and the real
    tokens' hidden states are the plain forward's (left padding, a filler row)."""
    from hookscope.compiled_unpad import RealTokens, unpadding_hooks
    from hookscope.hooks import ModuleHook, installed

    hm = HookedModel.from_hf(build_model("llama"), build_tokenizer("left"))
    inputs = dict(hm.prepare_inputs(PROMPTS[:3]))
    inputs = {k: torch.cat([v, v[-1:]]) for k, v in inputs.items()}  # row 3 fills the batch
    mask = inputs["attention_mask"].bool()
    assert not bool(mask.all())
    with torch.no_grad():
        plain = hm.model_map.decoder(**inputs).last_hidden_state
    real = RealTokens()
    real.index = RealTokens.of(inputs, own_rows=3)
    assert real.index.numel() == int(mask[:3].sum())
    seen, outputs = [], []
    mlps = [layer.mlp for layer in hm.model_map.layers]
    down_proj = mlps[0].down_proj.forward  # not a hook: a hook inside an MLP keeps it padded
    mlps[0].down_proj.forward = lambda x: seen.append(x.shape) or down_proj(x)
    hooks = unpadding_hooks(mlps, real) + [ModuleHook(mlps[0], lambda m, a, o: outputs.append(o))]
    with installed(hm.hf_model, hooks), torch.no_grad():
        unpadded = hm.model_map.decoder(**inputs).last_hidden_state
    assert seen == [torch.Size([1, real.index.numel(), hm.hf_model.config.intermediate_size])]
    assert outputs[0].shape == plain.shape
    fillers = torch.zeros_like(mask)
    fillers[3:] = True
    assert float(outputs[0][~mask | fillers].abs().max()) == 0.0
    assert float(outputs[0][mask & ~fillers].abs().min()) > 0.0
    own = mask & ~fillers
    torch.testing.assert_close(unpadded[own], plain[own], atol=1e-6, rtol=1e-6)


def test_an_mlp_called_another_way_runs_padded_unchanged():
    """An MLP called with a keyword other than hidden_states, or with a second per-token tensor,
    is not unpadded (its output is the plain one at every position), and never raises."""
    from hookscope.compiled_unpad import RealTokens, unpadding_hooks
    from hookscope.hooks import installed

    class Scaled(nn.Module):
        def forward(self, x, gate=None):
            return x * 2 if gate is None else x * gate

    hidden = torch.randn(2, 5, 4)
    real = RealTokens()
    real.index = torch.tensor([1, 2, 3, 4, 6, 7])  # some of the 10 positions are padding
    mlp = Scaled()
    for call in (lambda: mlp(x=hidden), lambda: mlp(hidden, hidden + 1)):
        with installed(mlp, unpadding_hooks([mlp], real)):
            through_hooks = call()
        torch.testing.assert_close(through_hooks, call(), atol=0, rtol=0)
    with installed(mlp, unpadding_hooks([mlp], real)):  # the usual call: padding zeroed
        assert float(mlp(hidden).reshape(10, 4)[[0, 5, 8, 9]].abs().max()) == 0.0


def test_the_compiled_path_gathers_real_tokens_under_dynamic_shapes_only(monkeypatch, policy):
    """compile=True hands the MLP hooks the batch's real tokens (dynamic shapes), or nothing
    (buckets: a static graph would recompile for every count of real tokens)."""
    from hookscope.compiled_unpad import RealTokens

    counts = []
    original = RealTokens.of
    monkeypatch.setattr(
        RealTokens,
        "of",
        staticmethod(lambda *a: counts.append(original(*a).numel()) or original(*a)),
    )
    hm = HookedModel.from_hf(build_model("llama"), build_tokenizer("right"))
    hm.config.batch_size = 4
    config = ExtractionConfig(extract_resid_out=True, save_logits=False)
    compiled = hm.forward(PROMPTS[:3], ["last"], extraction_config=config, compile=True)
    assert_same_cache(compiled, hm.forward(PROMPTS[:3], ["last"], extraction_config=config))
    tokens = hm.prepare_inputs(PROMPTS[:3])["attention_mask"].sum()
    assert counts == ([int(tokens)] if policy == "dynamic" else [])


@pytest.mark.parametrize(
    "family", ["gpt2", "gemma2", "gemma3_text", "phi3", "gpt_neox", "mixtral", "qwen3_moe"]
)
def test_compiled_mlps_on_real_tokens_equal_eager_across_families(family):
    """Families whose MLP is called otherwise (GPT-2's Conv1D, parallel attention and MLP,
    sandwich norms, mixtures of experts): compiled with the MLPs on real tokens equals eager at
    every real position, left padding, 5 prompts in batches of 4 (a filler row)."""
    hm = HookedModel.from_hf(build_model(family), build_tokenizer("left"))
    hm.config.batch_size = 4
    config = ExtractionConfig(extract_resid_out=True, extract_mlp_out=True, save_logits=False)
    prompts = [*PROMPTS[:4], "The dog"]
    compiled = hm.extract_cache(prompts, ["all"], extraction_config=config, compile=True)
    assert_same_cache(compiled, hm.extract_cache(prompts, ["all"], extraction_config=config))


def test_the_compiled_decoder_stops_after_the_last_layer_read(policy):
    """Only layer 0 read: layers 1.. do not run (the eager path stops there too), the values
    are eager's, and the decoder's layer list is whole again after the call, also after one
    that raised. Alternating with a forward that reads every layer reuses no wrong graph."""
    hm = HookedModel.from_hf(build_model("llama"), build_tokenizer("left"))
    layers = hm.model_map.decoder.layers
    assert len(layers) > 1
    calls = []
    layers[1].register_forward_pre_hook(lambda module, args: calls.append(1))
    first = ExtractionConfig(extract_resid_out=True, extract_mlp_out=True, save_logits=False, layers=[0])  # fmt: skip
    every = ExtractionConfig(extract_resid_out=True, save_logits=False)
    for config in (first, every, first):
        calls.clear()
        compiled = hm.forward(PROMPTS[:3], ["last"], extraction_config=config, compile=True)
        assert calls == ([] if config is first else [1])
        assert hm.model_map.decoder.layers is layers
        assert_same_cache(compiled, hm.forward(PROMPTS[:3], ["last"], extraction_config=config))

    forward = next(iter(hm.__dict__["_compiled_forwards"].values()))
    assert forward.cut is not None and len(forward.cut.kept) == 1

    def fail(*args):
        assert len(hm.model_map.decoder.layers) == 1
        raise RuntimeError("in the graph")

    forward.compiled = fail
    with pytest.raises(RuntimeError, match="in the graph"):
        hm.forward(PROMPTS[:3], ["last"], extraction_config=first, compile=True)
    assert hm.model_map.decoder.layers is layers


def test_a_graph_traced_on_another_model_or_before_a_hook_is_not_reused_without_it(policy):
    """dynamo shares a code object's graphs between all models of one class and by default does
    not guard on module hooks: model B's own torch hook (here one that doubles an MLP's down
    projection, a module without hooks when A was traced) ran not at all when model A, of the
    same architecture, had compiled first. Likewise a hook added to A after its first compiled
    call."""
    config = ExtractionConfig(extract_resid_out=True, save_logits=False)
    model_a = HookedModel.from_hf(build_model("llama"), build_tokenizer("left"))
    model_b = HookedModel.from_hf(build_model("llama", seed=1), build_tokenizer("left"))

    def doubled(module, args, output):
        return output * 2

    model_a.forward(PROMPTS[:3], ["last"], extraction_config=config, compile=True)
    for model in (model_b, model_a):
        down_proj = model.model_map.decoder.layers[0].mlp.down_proj
        with torch_hook(lambda: down_proj.register_forward_hook(doubled)):  # noqa: B023
            compiled, eager = compiled_and_eager(model, config, positions=["last"])
        plain = model.forward(PROMPTS[:3], ["last"], extraction_config=config)
        assert not torch.allclose(eager["resid_out_0"], plain["resid_out_0"])  # the hook acts
        assert_same_cache(compiled, eager)


def test_a_user_hook_inside_an_unpadded_mlp_sees_every_position():
    """A torch hook of the user's on a module inside an MLP (here: add to each row's last
    position of layer 0's down projection) saw the batch's real tokens flattened to
    ``[1, n_real, d]`` under dynamic shapes, and edited one token of the whole batch: that
    MLP runs padded, as eager. Removed again, the MLPs are unpadded again (no stale graph)."""
    from torch._dynamo.utils import counters

    hm = HookedModel.from_hf(build_model("llama"), build_tokenizer("left"))
    hm.config.batch_size = 4
    config = ExtractionConfig(extract_resid_out=True, extract_mlp_out=True, save_logits=False)

    def steer_last(module, args, output):
        return torch.cat([output[:, :-1], output[:, -1:] + 1.0], dim=1)

    down_proj = hm.model_map.decoder.layers[0].mlp.down_proj
    counters.clear()
    plain = hm.forward(PROMPTS[:3], ["last", 0], extraction_config=config)
    for hooked in (True, False, True):
        with torch_hook(lambda: down_proj.register_forward_hook(steer_last), hooked):
            compiled, eager = compiled_and_eager(hm, config)
        assert torch.equal(eager["mlp_out_0"], plain["mlp_out_0"]) != hooked  # the hook acts
        assert_same_cache(compiled, eager)
    assert dict(counters["graph_break"]) == {}


def test_a_user_pre_hook_on_the_hf_model_runs_without_logits():
    """Without logits the compiled path called the decoder alone, so a torch pre-hook of the
    user's on the HF model (here one that rewrites the input ids), which the eager path runs,
    silently did not run. Removed again, the decoder alone runs again."""
    hm = HookedModel.from_hf(build_model("llama"), build_tokenizer("right"))
    hm.config.batch_size = 4
    config = ExtractionConfig(extract_resid_out=True, save_logits=False)

    def rewrite_ids(module, args, kwargs):
        return args, {**kwargs, "input_ids": kwargs["input_ids"].clamp(max=7)}

    plain = hm.forward(PROMPTS[:3], ["last", 0], extraction_config=config)
    for hooked in (True, False):
        register = lambda: hm.hf_model.register_forward_pre_hook(rewrite_ids, with_kwargs=True)  # noqa: E731
        with torch_hook(register, hooked):
            compiled, eager = compiled_and_eager(hm, config)
        assert torch.equal(eager["resid_out_1"], plain["resid_out_1"]) != hooked  # the hook acts
        assert_same_cache(compiled, eager)


def test_per_head_points_read_a_replaced_weight():
    """Per-head outputs are read through a block of W_O planned at the first compiled call: a
    weight replaced since (``load_state_dict(assign=True)``, ``o_proj.weight = ...``) left
    head_out on the old weight while the model ran the new one."""
    hm = HookedModel.from_hf(build_model("llama"), build_tokenizer("left"))
    config = ExtractionConfig(extract_head_out=True, extract_resid_out=True, save_logits=False)
    hm.forward(PROMPTS[:3], ["last"], extraction_config=config, compile=True)
    state = {name: value * 1.5 for name, value in hm.hf_model.state_dict().items()}
    hm.hf_model.load_state_dict(state, assign=True)
    o_proj = hm.model_map.decoder.layers[1].self_attn.o_proj
    o_proj.weight = nn.Parameter(o_proj.weight.detach() * 2)
    compiled = hm.forward(PROMPTS[:3], ["last"], extraction_config=config, compile=True)
    assert_same_cache(compiled, hm.forward(PROMPTS[:3], ["last"], extraction_config=config))
