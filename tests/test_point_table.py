"""The point table (hookscope.points.KINDS) and what derives from it: keys, flags, sites, widths.

Unit tests need no model; the last ones check the table's sites and widths against tiny models
(ground truth: the shapes and modules of HF's own forward)."""

from __future__ import annotations

from dataclasses import fields

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tiny_models import PROMPTS, build_model, build_tokenizer

from hookscope import ActivationPointError, ExtractionConfig, HookedModel
from hookscope.config import (
    FLAG_OF_KIND,
    HEAD_FLAGS,
    LAYER_FLAGS,
    MODEL_FLAGS,
    RUNNING_MEAN_FLAGS,
    VISION_FLAGS,
)
from hookscope.interventions import Ablation
from hookscope.points import KINDS, TL_ALIASES, Point, parse_point, point_key, tl_hooks, width_of


def test_every_flag_is_a_config_field_and_every_extract_field_a_flag():
    config_fields = {f.name for f in fields(ExtractionConfig)}
    flags = {kind.flag for kind in KINDS.values()}
    assert flags <= config_fields
    extract_fields = {f for f in config_fields if f.startswith(("extract_", "save_"))}
    # a modifier, and the dictionary requests (features_{name}: per attached dictionary)
    assert extract_fields - flags == {
        "extract_avg",
        "extract_features",
        "extract_reconstruction_error",
    }
    assert FLAG_OF_KIND == {k.name: k.flag for k in KINDS.values()}


def test_flag_groups_partition_the_kinds():
    groups = [LAYER_FLAGS, MODEL_FLAGS, HEAD_FLAGS, VISION_FLAGS, RUNNING_MEAN_FLAGS]
    grouped = [flag for group in groups for flag in group]
    assert len(grouped) == len(set(grouped))
    assert set(grouped) | {"save_logits", "save_input_ids"} == {k.flag for k in KINDS.values()}
    assert LAYER_FLAGS["extract_resid_out"] == "resid_out"
    assert HEAD_FLAGS["extract_values_vectors_projected"] == "projected_value"
    assert RUNNING_MEAN_FLAGS["extract_avg_attn_pattern"] == ("avg_pattern", "pattern")
    assert VISION_FLAGS["extract_projector_out"] == "projector_out"


def test_reference_spellings_and_written_kinds_point_at_real_kinds():
    for kind in KINDS.values():
        for other in (kind.spelling_of, kind.written_as, kind.averages):
            assert other is None or other in KINDS, kind.name
        if kind.spelling_of:  # another name of the same tensor: same site and width
            target = KINDS[kind.spelling_of]
            assert (kind.site, kind.width, kind.scope) == (target.site, target.width, target.scope)


def test_every_tl_hook_has_one_meaning_per_model():
    """A hook's rows never both hold on one model: at most one unconditional row, and the
    conditional rows of one hook have complementary predicates on the tiny families."""
    for hook, rows in TL_ALIASES.items():
        assert sum(not alias.conditional for _, alias in rows) <= 1, hook
    for family in ("llama", "gemma2", "olmo2", "gpt2", "gpt_neox"):
        m = HookedModel.from_hf(build_model(family), build_tokenizer()).model_map
        for hook, rows in TL_ALIASES.items():
            assert sum(alias.same_on(m) for _, alias in rows) <= 1, (family, hook)
        assert set(tl_hooks(m)) >= {"hook_resid_pre", "hook_resid_post", "attn.hook_z"}


@given(
    kind=st.sampled_from(sorted(KINDS)),
    layer=st.integers(0, 99),
    head=st.integers(0, 99),
)
def test_point_key_and_parse_point_are_inverse(kind, layer, head):
    scope = KINDS[kind].scope
    point = {
        "model": Point(kind),
        "layer": Point(kind, layer),
        "head": Point(kind, layer, head),
    }[scope]
    key = point_key(point.kind, point.layer, point.head)
    assert key == point.name and parse_point(key) == point


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2", "gemma2"])
def test_table_widths_match_the_forward(family):
    """Ground truth: the shapes the hooked forward returns (read from HF's own modules)."""
    hm = HookedModel.from_hf(build_model(family), build_tokenizer())
    config = ExtractionConfig(
        extract_queries=True,
        extract_keys=True,
        extract_values=True,
        extract_attn_out=True,
        extract_head_z=True,
        extract_head_out=True,
        layers=[0],
        attn_heads=[{"layer": 0, "head": 1}],
    )
    cache = hm.forward(PROMPTS[0], ["last"], extraction_config=config)
    for key, value in cache.tensors().items():
        if key in ("position_mask", "logits"):
            continue
        assert value.shape[-1] == width_of(parse_point(key).kind, hm.model_map), (family, key)


def test_points_that_cannot_be_written_say_why_before_the_forward(tiny_llama):
    for point, reason in [
        ("pattern_L0H1", "PatternEdit"),
        ("head_queries_L0H1", "inside the attention function"),
        ("logits", "model's output"),
        ("avg_pattern_L0H1", "running mean"),
    ]:
        with pytest.raises(ActivationPointError, match=f"cannot be intervened on: .*{reason}"):
            tiny_llama.forward(PROMPTS[0], ["last"], interventions=[Ablation(point=point)])


def test_head_out_patch_reads_the_head_z_source(tiny_llama):
    """head_out is written as head_z (the table's written_as): a patch from a cache needs the
    head_z key, and patching it from the same prompt is the identity."""
    from hookscope.interventions import Patch

    ids = build_tokenizer()(PROMPTS[1], return_tensors="pt")["input_ids"]
    source = tiny_llama.forward(
        {"input_ids": ids}, ["last"], extraction_config=ExtractionConfig(extract_head_z=True)
    )
    plain = tiny_llama.forward({"input_ids": ids}, ["last"])["logits"]
    patched = tiny_llama.forward(
        {"input_ids": ids},
        ["last"],
        interventions=[Patch(point="head_out_L1H2", positions=["last"], source=source)],
    )["logits"]
    torch.testing.assert_close(patched, plain, rtol=0, atol=1e-6)
    no_z = tiny_llama.forward({"input_ids": ids}, ["last"], names=["resid_out_0"])
    with pytest.raises(ValueError, match="head_z_L1H2"):
        tiny_llama.forward(
            {"input_ids": ids},
            ["last"],
            interventions=[Patch(point="head_out_L1H2", positions=["last"], source=no_z)],
        )
