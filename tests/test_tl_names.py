"""TransformerLens hook names as aliases: selecting, reading and intervening by them.

Ground truth is HF itself (``output_hidden_states``, eager ``output_attentions``, the input of
the output projection); tests/test_parity.py compares the same names with TransformerLens.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close_to_scale
from tiny_models import FAMILIES, INPUT_NORM, PROMPTS, build_model, build_tokenizer

from hookscope import ActivationPointError, ExtractionConfig, HookedModel, InputError
from hookscope.interventions import Steer
from hookscope.points import Point, parse_point


def test_parse_point_translates_one_point_hooks(tiny_llama):
    assert parse_point("blocks.3.hook_resid_post") == Point("resid_out", 3)
    assert parse_point("blocks.0.hook_resid_pre") == Point("resid_in", 0)
    llama = tiny_llama.model_map
    assert parse_point("blocks.2.hook_mlp_out", llama) == Point("mlp_out", 2)
    assert parse_point("blocks.2.ln1.hook_out", llama) == Point("attn_in", 2)
    # names whose hookscope equal depends on the family need the model
    for hook in ("hook_attn_out", "hook_mlp_out", "ln1.hook_out"):
        with pytest.raises(ActivationPointError, match="depends on the family.*with the model"):
            parse_point(f"blocks.1.{hook}")
    with pytest.raises(ActivationPointError, match="hook_normalized.*Supported.*hook_resid_post"):
        parse_point("blocks.1.ln1.hook_normalized")
    with pytest.raises(ActivationPointError, match="every head of layer 1.*pattern_L1H0"):
        parse_point("blocks.1.attn.hook_pattern")


def test_from_names_sets_flags_layers_and_heads():
    config = ExtractionConfig.from_names(
        ["blocks.1.hook_resid_post", "mlp_out_0", "pattern_L1H2"], save_logits=False
    )
    assert config.extract_resid_out and config.extract_mlp_out and config.extract_attn_pattern
    assert config.layers == [0, 1] and config.attn_heads == [{"layer": 1, "head": 2}]
    assert not config.save_logits and not config.extract_resid_in
    every_head = ExtractionConfig.from_names(["blocks.1.attn.hook_z", "pattern_L0H1"])
    assert every_head.extract_head_z and every_head.attn_heads == "all"
    with pytest.raises(ActivationPointError, match="unknown activation point 'resid'"):
        ExtractionConfig.from_names(["resid"])


def test_cache_reads_resid_names_against_hidden_states(tiny_llama):
    tokenizer = build_tokenizer("left")
    batch = tokenizer(PROMPTS[:3], return_tensors="pt", padding=True)
    # HF's last hidden state is after the final norm: compare the layers before it
    names = ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_post", "blocks.1.hook_attn_out"]
    cache = tiny_llama.forward(batch, ["all"], names=names)
    for row, prompt in enumerate(PROMPTS[:3]):  # ground truth: each prompt alone through HF
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        hidden = tiny_llama.hf_model(input_ids=ids, output_hidden_states=True).hidden_states
        count = ids.shape[1]  # "all" left-aligns a row's real tokens in its slots
        for name, expected in zip(names[:2], hidden[:2], strict=True):
            assert name in cache
            torch.testing.assert_close(cache[name][row, :count], expected[0], rtol=0, atol=1e-5)
    assert torch.equal(cache["blocks.1.hook_attn_out"], cache["attn_out_1"])
    assert "blocks.0.hook_mlp_out" not in cache and "blocks.0.ln1.hook_normalized" not in cache


def test_pattern_stack_equals_eager_output_attentions():
    model = build_model("llama", attn_implementation="eager")
    hm = HookedModel.from_hf(model, build_tokenizer())
    ids = build_tokenizer()(PROMPTS[2], return_tensors="pt")["input_ids"]
    cache = hm.forward({"input_ids": ids}, ["all"], names=["blocks.1.attn.hook_pattern"])
    expected = model(input_ids=ids, output_attentions=True).attentions[1]  # [1, heads, q, k]
    stacked = cache["blocks.1.attn.hook_pattern"]
    assert stacked.shape == expected.shape
    torch.testing.assert_close(stacked, expected, rtol=0, atol=1e-6)


def test_z_stack_equals_output_projection_input(tiny_llama):
    ids = build_tokenizer()(PROMPTS[1], return_tensors="pt")["input_ids"]
    seen = {}
    o_proj = tiny_llama.hf_model.model.layers[0].self_attn.o_proj
    handle = o_proj.register_forward_pre_hook(lambda _m, args: seen.update(z=args[0]))
    try:
        cache = tiny_llama.forward({"input_ids": ids}, ["all"], names=["blocks.0.attn.hook_z"])
    finally:
        handle.remove()
    m = tiny_llama.model_map
    expected = seen["z"].view(1, ids.shape[1], m.n_heads, -1)  # [batch, pos, heads, d_head]
    torch.testing.assert_close(cache["blocks.0.attn.hook_z"], expected, rtol=0, atol=1e-6)


def test_rot_q_equals_hf_rotary_queries(tiny_llama):
    """Ground truth: HF's q_proj on the attention input, through HF's apply_rotary_pos_emb."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    ids = build_tokenizer()(PROMPTS[1], return_tensors="pt")["input_ids"]
    attention = tiny_llama.hf_model.model.layers[1].self_attn
    seen = {}
    handle = attention.register_forward_pre_hook(
        lambda _m, _args, kwargs: seen.update(kwargs), with_kwargs=True
    )
    try:
        cache = tiny_llama.forward({"input_ids": ids}, ["all"], names=["blocks.1.attn.hook_rot_q"])
    finally:
        handle.remove()
    m = tiny_llama.model_map
    queries = attention.q_proj(seen["hidden_states"]).view(1, ids.shape[1], m.n_heads, -1)
    cos, sin = seen["position_embeddings"]
    rotated, _ = apply_rotary_pos_emb(queries.transpose(1, 2), queries.transpose(1, 2), cos, sin)
    expected = rotated.transpose(1, 2)  # [batch, pos, heads, d_head], TransformerLens's layout
    torch.testing.assert_close(cache["blocks.1.attn.hook_rot_q"], expected, rtol=0, atol=1e-5)


def test_stacking_needs_every_head_from_zero(tiny_llama):
    ids = build_tokenizer()(PROMPTS[1], return_tensors="pt")["input_ids"]
    cache = tiny_llama.forward({"input_ids": ids}, ["all"], names=["pattern_L0H1"])
    assert "blocks.0.attn.hook_pattern" not in cache
    with pytest.raises(KeyError, match="every head of layer 0"):
        cache["blocks.0.attn.hook_pattern"]


def test_steer_at_a_tl_name_equals_steer_at_the_key(tiny_llama):
    ids = build_tokenizer()(PROMPTS[0], return_tensors="pt")["input_ids"]
    vector = torch.linspace(-1, 1, tiny_llama.model_map.d_model)
    logits = [
        tiny_llama.forward(
            {"input_ids": ids},
            ["last"],
            interventions=[Steer(point=point, positions=["last"], vector=vector, coefficient=3.0)],
        )["logits"]
        for point in ("blocks.0.hook_resid_post", "resid_out_0")
    ]
    plain = tiny_llama.forward({"input_ids": ids}, ["last"])["logits"]
    assert torch.equal(logits[0], logits[1]) and not torch.allclose(logits[0], plain)


def test_names_in_extract_cache_and_exclusive_with_a_config(tiny_llama):
    cache = tiny_llama.extract_cache(PROMPTS, ["last"], names=["blocks.1.hook_resid_post"])
    single = tiny_llama.forward(PROMPTS[3], ["last"], names=["resid_out_1"])
    torch.testing.assert_close(cache["blocks.1.hook_resid_post"][3], single["resid_out_1"][0])
    with pytest.raises(InputError, match="names or extraction_config, not both"):
        tiny_llama.forward(
            PROMPTS[0], ["last"], names=["resid_out_1"], extraction_config=ExtractionConfig()
        )


# -- one definition on every family: TransformerLens's -----------------------------------------
def _hooked(family: str) -> HookedModel:
    return HookedModel.from_hf(build_model(family), build_tokenizer())


def _tl_cache(hm: HookedModel, hooks: list[str]):
    ids = build_tokenizer()(PROMPTS[1], return_tensors="pt")["input_ids"]
    names = [f"blocks.{layer}.{hook}" for layer in range(hm.model_map.n_layers) for hook in hooks]
    return hm.forward({"input_ids": ids}, ["all"], names=names)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_attn_and_mlp_out_are_what_the_block_adds_on_every_family(family):
    """TransformerLens's hook_attn_out / hook_mlp_out are what attention / the MLP add to the
    residual stream; ground truth: the residual stream itself (block input and output)."""
    hm = _hooked(family)
    parallel = hm.model_map.parallel_residual
    hooks = ["hook_resid_pre", "hook_resid_post", "hook_attn_out", "hook_mlp_out"]
    hooks += [] if parallel else ["hook_resid_mid"]
    cache = _tl_cache(hm, hooks)
    for layer in range(hm.model_map.n_layers):
        tl = {hook: cache[f"blocks.{layer}.{hook}"] for hook in hooks}
        if parallel:
            added = tl["hook_resid_post"] - tl["hook_resid_pre"]
            assert_close_to_scale(tl["hook_attn_out"] + tl["hook_mlp_out"], added, msg=family)
        else:
            mid = tl["hook_resid_mid"]
            assert_close_to_scale(tl["hook_attn_out"], mid - tl["hook_resid_pre"], msg=family)
            assert_close_to_scale(tl["hook_mlp_out"], tl["hook_resid_post"] - mid, msg=family)


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text", "olmo2"])
def test_sandwich_norm_families_name_the_normalised_outputs(family):
    hm = _hooked(family)
    cache = _tl_cache(hm, ["hook_attn_out", "hook_mlp_out"])
    parts = hm.model_map.layers[0]
    assert set(cache.tl_names) >= {"hook_attn_out", "hook_mlp_out"}
    assert "attn_out_post_norm_0" in cache and "attn_out_0" not in cache
    # the keys the names resolve to are the post-norm modules' outputs, not the sub-block outputs
    plain = hm.forward(
        {"input_ids": build_tokenizer()(PROMPTS[1], return_tensors="pt")["input_ids"]},
        ["all"],
        extraction_config=ExtractionConfig(extract_attn_out=True, extract_mlp_out=True),
    )
    with torch.no_grad():
        normed_attn = parts.attn_out_norm(plain["attn_out_0"])
        normed_mlp = parts.mlp_out_norm(plain["mlp_out_0"])
    assert_close_to_scale(cache["blocks.0.hook_attn_out"], normed_attn)
    assert_close_to_scale(cache["blocks.0.hook_mlp_out"], normed_mlp)
    gap = (cache["blocks.0.hook_attn_out"] - plain["attn_out_0"]).abs().max()
    assert gap > 0.1 * plain["attn_out_0"].abs().max()  # the two are different quantities
    # a cache of the pre-norm kinds never answers the TransformerLens name with them
    assert "blocks.0.hook_attn_out" not in plain
    with pytest.raises(KeyError, match="attn_out_post_norm_0"):
        plain["blocks.0.hook_attn_out"]


def test_names_whose_meaning_depends_on_the_family_need_the_model(tiny_llama):
    gemma2 = _hooked("gemma2").model_map
    assert ExtractionConfig.from_names(
        ["blocks.0.hook_attn_out"], gemma2
    ).extract_attn_out_post_norm
    on_llama = ExtractionConfig.from_names(["blocks.0.hook_attn_out"], tiny_llama.model_map)
    assert on_llama.extract_attn_out and not on_llama.extract_attn_out_post_norm
    with pytest.raises(ActivationPointError, match="depends on the family"):
        ExtractionConfig.from_names(["blocks.0.hook_mlp_out"])
    # a cache that does not record its model answers family-independent names only
    from hookscope import ActivationCache

    bare = ActivationCache({"attn_out_0": torch.ones(1, 1, 4), "resid_out_0": torch.zeros(1, 1, 4)})
    assert torch.equal(bare["blocks.0.hook_resid_post"], bare["resid_out_0"])
    assert "blocks.0.hook_attn_out" not in bare
    with pytest.raises(ActivationPointError, match="depends on the family"):
        bare["blocks.0.hook_attn_out"]


def test_post_norm_kinds_are_refused_where_there_is_no_such_norm(tiny_llama):
    with pytest.raises(ActivationPointError, match="without a norm.*use attn_out_1"):
        tiny_llama.forward(PROMPTS[0], ["last"], names=["attn_out_post_norm_1"])


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2", "olmo2"])
def test_ln1_hook_out_is_the_input_norm_output_or_refused(family):
    """TransformerLens's ln1 is the input norm; OLMo2 has none (the Bridge maps ln1 to its
    post-attention norm there), so the name is refused rather than given another tensor."""
    hm = _hooked(family)
    norm_name = INPUT_NORM[family]
    ids = build_tokenizer()(PROMPTS[1], return_tensors="pt")["input_ids"]
    if norm_name is None:
        with pytest.raises(ActivationPointError, match="no equal on olmo2.*input norm"):
            hm.forward({"input_ids": ids}, ["all"], names=["blocks.0.ln1.hook_out"])
        return
    seen = {}
    norm = getattr(hm.model_map.layers[0].block, norm_name)
    handle = norm.register_forward_hook(lambda _m, _a, out: seen.update(out=out))
    try:
        cache = hm.forward({"input_ids": ids}, ["all"], names=["blocks.0.ln1.hook_out"])
    finally:
        handle.remove()
    torch.testing.assert_close(cache["blocks.0.ln1.hook_out"], seen["out"], rtol=0, atol=0)


def test_rot_q_is_refused_without_rotary_embedding():
    hm = _hooked("gpt2")
    with pytest.raises(ActivationPointError, match="no equal on gpt2.*rotary models"):
        hm.forward(PROMPTS[0], ["last"], names=["blocks.0.attn.hook_rot_q"])


def test_interventions_at_tl_names_follow_the_family(tmp_path):
    hm = _hooked("gemma2")
    ids = build_tokenizer()(PROMPTS[0], return_tensors="pt")["input_ids"]
    vector = torch.linspace(-1, 1, hm.model_map.d_model)

    def steered(point):
        steer = Steer(point=point, positions=["last"], vector=vector, coefficient=3.0)
        return hm.forward({"input_ids": ids}, ["last"], interventions=[steer])["logits"]

    by_name = steered("blocks.0.hook_attn_out")
    assert torch.equal(by_name, steered("attn_out_post_norm_0"))
    assert not torch.allclose(by_name, steered("attn_out_0"))  # the pre-norm point differs
    # a saved cache keeps its model's meanings
    cache = _tl_cache(hm, ["hook_attn_out"])
    loaded = type(cache).load(cache.save(tmp_path / "c.safetensors"))
    assert torch.equal(loaded["blocks.1.hook_attn_out"], cache["attn_out_post_norm_1"])
