"""Interventions: values checked by hand on tiny models; identity edits change nothing."""

from __future__ import annotations

import pytest
import torch
from conftest import hook_snapshot
from tiny_models import PROMPTS, build_model, build_tokenizer

from hookscope import (
    ActivationPointError,
    ExtractionConfig,
    HookedModel,
    HookscopeError,
    PositionError,
)
from hookscope.compat import from_reference
from hookscope.interventions import (
    Ablation,
    Custom,
    Patch,
    PatternEdit,
    Steer,
    intervention_from_dict,
)

RESID = ExtractionConfig(
    extract_resid_out=True, extract_resid_mid=True, extract_mlp_out=True, extract_attn_out=True
)


def _pair():
    """Two prompts of the same token length (a clean / corrupt pair)."""
    clean = dict(build_tokenizer()(["The cat sat on the mat"], return_tensors="pt"))
    corrupt = {k: v.clone() for k, v in clean.items()}
    corrupt["input_ids"][0, 1] = 100  # one token differs
    return clean, corrupt


def _final_logits(hm, resid):
    """The unembedding read of a last-layer residual vector (Llama: norm then lm_head)."""
    with torch.no_grad():
        return hm.hf_model.lm_head(hm.model_map.final_norm(resid))


def test_patching_a_run_with_itself_changes_nothing(tiny_llama):
    batch = build_tokenizer("left")(PROMPTS, return_tensors="pt", padding=True)
    cache = tiny_llama.forward(batch, ["all"], extraction_config=RESID)
    patched = tiny_llama.forward(
        batch,
        ["all"],
        interventions=[Patch(point=f"resid_out_{layer}", source=cache) for layer in range(2)],
    )
    assert torch.equal(patched["logits"], cache["logits"])


def test_patching_every_position_makes_downstream_equal_the_source(tiny_llama):
    clean, corrupt = _pair()
    clean_cache = tiny_llama.forward(clean, ["all"], extraction_config=RESID)
    patched = tiny_llama.forward(
        corrupt, ["all"], interventions=[Patch(point="resid_out_0", source=clean_cache)]
    )
    torch.testing.assert_close(patched["logits"], clean_cache["logits"], rtol=0, atol=1e-6)
    plain = tiny_llama.forward(corrupt, ["all"])
    assert not torch.allclose(plain["logits"], clean_cache["logits"])


def test_zero_mean_and_steer_match_hand_computation(tiny_llama):
    batch = build_tokenizer()(PROMPTS[:1], return_tensors="pt")
    plain = tiny_llama.forward(batch, ["last"], extraction_config=RESID)
    mid, out = plain["resid_mid_1"], plain["resid_out_1"]

    zero = tiny_llama.forward(
        batch, ["last"], interventions=[Ablation(point="mlp_out_1", positions=["last"])]
    )
    torch.testing.assert_close(zero["logits"], _final_logits(tiny_llama, mid), rtol=1e-5, atol=1e-5)

    dataset = tiny_llama.extract_cache(PROMPTS, ["last"], extraction_config=RESID)
    mean = dataset["mlp_out_1"][:, 0].mean(0)
    ablated = tiny_llama.forward(
        batch,
        ["last"],
        interventions=[
            Ablation(point="mlp_out_1", positions=["last"], method="mean", mean=dataset)
        ],
    )
    torch.testing.assert_close(
        ablated["logits"], _final_logits(tiny_llama, mid + mean), rtol=1e-5, atol=1e-5
    )

    vector = torch.randn(64, generator=torch.Generator().manual_seed(3))
    steered = tiny_llama.forward(
        batch,
        ["last"],
        interventions=[
            Steer(point="resid_out_1", positions=["last"], vector=vector, coefficient=2.0)
        ],
    )
    torch.testing.assert_close(
        steered["logits"], _final_logits(tiny_llama, out + 2 * vector), rtol=1e-5, atol=1e-5
    )

    scaled = tiny_llama.forward(
        batch, ["last"], interventions=[Ablation(point="resid_out_1", method="scale", factor=1.0)]
    )
    assert torch.equal(scaled["logits"], plain["logits"])


def test_cache_records_values_after_the_intervention(tiny_llama):
    vector = torch.ones(64)
    batch = build_tokenizer()(PROMPTS[:1], return_tensors="pt")
    plain = tiny_llama.forward(batch, ["last", 0], extraction_config=RESID)
    steered = tiny_llama.forward(
        batch,
        ["last", 0],
        extraction_config=RESID,
        interventions=[Steer(point="resid_mid_1", positions=["last"], vector=vector)],
    )
    torch.testing.assert_close(
        steered["resid_mid_1"][:, 0], plain["resid_mid_1"][:, 0] + 1, rtol=0, atol=1e-5
    )
    torch.testing.assert_close(
        steered["resid_mid_1"][:, 1], plain["resid_mid_1"][:, 1], rtol=0, atol=0
    )
    # the residual really carries the change: resid_out = resid_mid' + mlp(resid_mid')
    torch.testing.assert_close(
        steered["resid_out_1"], steered["resid_mid_1"] + steered["mlp_out_1"], rtol=1e-5, atol=1e-5
    )


def test_head_ablation_removes_exactly_that_head():
    for family in ("llama", "gpt2", "gpt_neox"):
        hm = HookedModel.from_hf(build_model(family), build_tokenizer())
        config = ExtractionConfig(
            extract_attn_out=True, extract_head_out=True, attn_heads=[{"layer": 1, "head": 1}]
        )
        plain = hm.forward(PROMPTS[0], ["all"], extraction_config=config)
        ablated = hm.forward(
            PROMPTS[0],
            ["all"],
            extraction_config=config,
            interventions=[Ablation(point="head_out_L1H1")],
        )
        torch.testing.assert_close(
            ablated["attn_out_1"],
            plain["attn_out_1"] - plain["head_out_L1H1"],
            rtol=1e-5,
            atol=1e-5,
            msg=family,
        )
        assert torch.all(ablated["head_out_L1H1"] == 0)


def test_fused_qkv_point_write(tiny_llama):
    hm = HookedModel.from_hf(build_model("gpt2"), build_tokenizer())
    config = ExtractionConfig(extract_keys=True, extract_queries=True)
    plain = hm.forward(PROMPTS[0], ["all"], extraction_config=config)
    zeroed = hm.forward(
        PROMPTS[0], ["all"], extraction_config=config, interventions=[Ablation(point="keys_0")]
    )
    assert torch.all(zeroed["keys_0"] == 0)
    assert torch.equal(zeroed["queries_0"], plain["queries_0"])  # only the key columns changed
    assert not torch.allclose(zeroed["logits"], plain["logits"])


def test_pattern_edits():
    hm = HookedModel.from_hf(build_model("llama"), build_tokenizer())
    batch = build_tokenizer()(PROMPTS[:1], return_tensors="pt")
    config = ExtractionConfig(extract_attn_pattern=True, layers=[1])
    plain = hm.forward(batch, ["all"], extraction_config=config)

    identity = hm.forward(
        batch,
        ["all"],
        extraction_config=config,
        interventions=[PatternEdit(layer=1, op="scale", value=1.0)],
    )
    torch.testing.assert_close(identity["logits"], plain["logits"], rtol=1e-5, atol=1e-5)

    edit = PatternEdit(
        layer=1, heads=[2], query_positions=["all"], key_positions=[0], op="zero", renormalize=True
    )
    edited = hm.forward(batch, ["all"], extraction_config=config, interventions=[edit])
    pattern = edited["pattern_L1H2"][0]
    assert torch.all(pattern[1:, 0] == 0)
    torch.testing.assert_close(pattern[1:].sum(-1), torch.ones(pattern.shape[0] - 1))
    assert pattern[0].sum() == 0  # row 0 could only attend to key 0: nothing left to renormalise
    torch.testing.assert_close(edited["pattern_L1H1"], plain["pattern_L1H1"], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(edited["logits"], plain["logits"], atol=1e-4), (
        "the edit must change the output"
    )

    # pre-softmax edits never unmask the future: row 0 still attends only to key 0
    unmask = PatternEdit(
        layer=1,
        heads="all",
        query_positions=[0],
        key_positions=["all"],
        op="set",
        value=50.0,
        stage="pre",
    )
    pre = hm.forward(batch, ["all"], extraction_config=config, interventions=[unmask])
    assert torch.all(pre["pattern_L1H0"][0, 0, 1:] == 0) and pre["pattern_L1H0"][0, 0, 0] == 1


def test_custom_on_point_and_module(tiny_llama):
    seen = []

    def double(tensor, context):
        seen.append((context.point, context.phase))
        return tensor * 2

    plain = tiny_llama.forward(PROMPTS[0], ["last"], extraction_config=RESID)
    doubled = tiny_llama.forward(
        PROMPTS[0],
        ["last"],
        extraction_config=RESID,
        interventions=[Custom(point="mlp_out_1", fn=double)],
    )
    torch.testing.assert_close(doubled["mlp_out_1"], 2 * plain["mlp_out_1"])
    module = tiny_llama.forward(
        PROMPTS[0],
        ["last"],
        extraction_config=RESID,
        interventions=[Custom(module="model.layers[1].mlp", fn=double)],
    )
    torch.testing.assert_close(module["mlp_out_1"], 2 * plain["mlp_out_1"])
    assert seen == [("mlp_out_1", "prompt"), (None, "prompt")]


@pytest.mark.parametrize(
    "intervention, error, message",
    [
        (Ablation(point="resid_out_9"), ActivationPointError, "layer 9 is out of range"),
        (Ablation(point="head_out_L0H9"), ActivationPointError, "head 9 is out of range"),
        (Ablation(point="nonsense_3"), ActivationPointError, "unknown activation point"),
        (
            Ablation(point="resid_out_0", positions=[40]),
            PositionError,
            "out of range for example 0",
        ),
        (
            Steer(point="resid_out_0", vector=torch.ones(7)),
            HookscopeError,
            "vector has shape \\[7\\]",
        ),
        (
            Patch(point="resid_out_0", source=torch.ones(3, 1, 64)),
            HookscopeError,
            "source has shape",
        ),
        (PatternEdit(layer=0, heads=[5]), ActivationPointError, "PatternEdit head 5"),
    ],
)
def test_bad_interventions_fail_before_any_forward(tiny_llama, intervention, error, message):
    calls = []
    handle = tiny_llama.register_forward_hook("model.layers.0", lambda m, a, o: calls.append(1))
    before = hook_snapshot(tiny_llama.hf_model)
    try:
        with pytest.raises(error, match=message):
            tiny_llama.forward(PROMPTS[:2], ["last"], interventions=[intervention])
    finally:
        tiny_llama.remove_hooks()
    assert calls == [] and hook_snapshot(tiny_llama.hf_model) == before - {
        h for h in before if h[2] == handle.id
    }


def test_patch_source_position_mismatch(tiny_llama):
    cache = tiny_llama.forward(PROMPTS[:1], ["last"], extraction_config=RESID)
    with pytest.raises(HookscopeError, match="extracted at positions"):
        tiny_llama.forward(
            PROMPTS[:1],
            ["last"],
            interventions=[Patch(point="resid_out_0", positions=[0, 1], source=cache)],
        )


def test_data_round_trip_and_reference_forms():
    steer = Steer(
        point="resid_out_1", positions=["last", (0, 2)], vector=torch.arange(3.0), coefficient=0.5
    )
    assert intervention_from_dict(steer.to_dict()) == steer
    edit = PatternEdit(
        layer=1, heads=[0], key_positions=[0], op="scale", value=0.5, renormalize=True
    )
    assert intervention_from_dict(edit.to_dict()) == edit
    assert "Steer(point='resid_out_1'" in repr(steer)
    with pytest.raises(HookscopeError, match="no JSON form"):
        Custom(point="resid_out_0", fn=lambda t, c: t).to_dict()
    converted = from_reference(
        {
            "type": "full",
            "activation": "resid_out_2",
            "token_positions": ["last"],
            "patching_values": "ablation",
        }
    )
    assert converted == Ablation(
        point="resid_out_2", positions=["last"], method="scale", factor=0.0
    )
    columns = from_reference(
        {
            "type": "columns",
            "activation": "pattern_L1H3",
            "token_positions": [0],
            "multiplication_value": 0.0,
            "apply_softmax": True,
        }
    )
    assert columns == PatternEdit(
        layer=1,
        heads=[3],
        query_positions=["all"],
        key_positions=[0],
        op="scale",
        value=0.0,
        renormalize=True,
    )


def test_registered_interventions_until_cleaned(tiny_llama):
    plain = tiny_llama.forward(PROMPTS[0], ["last"])
    tiny_llama.register_interventions([Ablation(point="mlp_out_1")])
    try:
        ablated = tiny_llama.forward(PROMPTS[0], ["last"])
        assert not torch.allclose(ablated["logits"], plain["logits"])
    finally:
        tiny_llama.clean_interventions()
    assert torch.equal(tiny_llama.forward(PROMPTS[0], ["last"])["logits"], plain["logits"])


def test_extract_cache_patch_source_spans_the_dataset(tiny_llama):
    tokenizer = build_tokenizer("left")
    batches = [tokenizer(PROMPTS[i : i + 2], return_tensors="pt", padding=True) for i in (0, 2)]
    source = tiny_llama.extract_cache(batches, ["last"], extraction_config=RESID)
    noise = Steer(point="resid_out_0", vector=torch.ones(64))
    # patching the un-steered values back over a steered run restores the plain run
    restored = tiny_llama.extract_cache(
        batches,
        ["last"],
        interventions=[noise, Patch(point="resid_out_0", positions=["last"], source=source)],
    )
    # only the last position was restored, so compare against a run steered everywhere but there
    expected = tiny_llama.extract_cache(
        batches,
        ["last"],
        interventions=[Steer(point="resid_out_0", positions=[(0, -1)], vector=torch.ones(64))],
    )
    torch.testing.assert_close(restored["logits"], expected["logits"], rtol=1e-5, atol=1e-5)


def test_reference_dicts_are_accepted_directly(tiny_llama):
    reference = {
        "type": "full",
        "activation": "mlp_out_1",
        "token_positions": ["last"],
        "patching_values": "ablation",
    }
    direct = tiny_llama.forward(PROMPTS[0], ["last"], interventions=[reference])
    ours = tiny_llama.forward(
        PROMPTS[0], ["last"], interventions=[Ablation(point="mlp_out_1", positions=["last"])]
    )
    assert torch.equal(direct["logits"], ours["logits"])
