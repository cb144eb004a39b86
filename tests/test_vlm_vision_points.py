"""Vision-encoder and projector points (vision_resid_out_{l}, vision_attn_out_{l},
projector_out): values against independent computations, patching and ablation, errors."""

from __future__ import annotations

import pytest
import torch
from tiny_vlms import build_vlm, image

from hookscope import ExtractionConfig, HookedModel
from hookscope.errors import ActivationPointError, HookscopeError
from hookscope.interventions import Ablation, Patch

VISION = ExtractionConfig(
    extract_vision_resid_out=True,
    extract_vision_attn_out=True,
    extract_projector_out=True,
    extract_resid_in=True,
    extract_resid_out=True,
)


@pytest.fixture
def tower_vlm(vlm):
    """The families with a vision transformer (all but Chameleon, whose VQ-VAE has none)."""
    if vlm.family == "chameleon":
        pytest.skip("Chameleon's image encoder is a VQ-VAE: no vision points (tested below)")
    return vlm


def test_chameleon_has_no_vision_points():
    vlm = build_vlm("chameleon")
    hm = HookedModel.from_hf(vlm.model, vlm.processor)
    assert hm.vision_map is None
    with pytest.raises(ActivationPointError, match="no vision tower"):
        hm.forward(_inputs(vlm), ["last"], extraction_config=VISION)


def _inputs(vlm, seeds=(0, 1)):
    texts = ["Look: " + vlm.prompt, "A cat. " + vlm.prompt + " Paris"][: len(seeds)]
    return vlm.inputs(texts, [[image(s)] for s in seeds])


def test_projector_out_is_what_replaces_the_image_embeddings(tower_vlm):
    vlm = tower_vlm
    if vlm.family == "llava_next":
        pytest.skip("Llava-NeXt re-packs the projected crops (unpadding, newline rows) first")
    hm = HookedModel.from_hf(vlm.model, vlm.processor)
    cache = hm.forward(_inputs(vlm), ["all-image"], extraction_config=VISION)
    # (PaliGemma divides the features by sqrt(d_model) and Gemma's embedding scale multiplies
    # them back: resid_in_0 is projector_out there too)
    features = cache["projector_out"].reshape(-1, hm.model_map.d_model)
    embedded = cache["resid_in_0"][cache["position_mask"]]  # image tokens, row by row
    assert torch.equal(features, embedded)


def test_vision_resid_out_feeds_the_next_block(tower_vlm):
    vlm = tower_vlm
    hm = HookedModel.from_hf(vlm.model, vlm.processor)
    seen = {}

    def grab(module, args, kwargs):
        seen["input"] = args[0] if args else kwargs["hidden_states"]

    handle = hm.vision_map.layers[1].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        cache = hm.forward(_inputs(vlm), ["last"], extraction_config=VISION)
    finally:
        handle.remove()
    assert torch.equal(cache["vision_resid_out_0"], seen["input"])


def test_llava_vision_points_by_hand():
    vlm = build_vlm("llava")
    hm = HookedModel.from_hf(vlm.model, vlm.processor)
    cache = hm.forward(_inputs(vlm), ["last"], extraction_config=VISION)
    block = hm.vision_map.layers[1]
    resid_in, attn_out = cache["vision_resid_out_0"], cache["vision_attn_out_1"]
    with torch.no_grad():
        mid = resid_in + attn_out
        by_hand = mid + block.mlp(block.layer_norm2(mid))
        # "default" feature selection: the last block's output without the CLS token
        projected = vlm.model.model.multi_modal_projector(cache["vision_resid_out_1"][:, 1:])
    torch.testing.assert_close(cache["vision_resid_out_1"], by_hand, rtol=1e-5, atol=1e-5)
    assert torch.equal(cache["projector_out"], projected)


def test_patching_the_vision_tower_restores_the_other_image(tower_vlm):
    vlm = tower_vlm
    hm = HookedModel.from_hf(vlm.model, vlm.processor)
    last = len(hm.vision_map.layers) - 1
    clean = hm.forward(_inputs(vlm, (0, 1)), ["all"], extraction_config=VISION)
    corrupt_inputs = _inputs(vlm, (5, 6))
    corrupt = hm.forward(corrupt_inputs, ["all"], extraction_config=VISION)
    assert not torch.allclose(clean["resid_out_1"], corrupt["resid_out_1"])
    for point in (f"vision_resid_out_{last}", "projector_out"):
        patched = hm.forward(
            corrupt_inputs,
            ["all"],
            extraction_config=VISION,
            interventions=[Patch(point=point, source=clean)],
        )
        assert torch.equal(patched[point], clean[point])
        torch.testing.assert_close(patched["resid_out_1"], clean["resid_out_1"])


def test_zero_ablating_the_projector_zeroes_the_image_embeddings(tower_vlm):
    vlm = tower_vlm
    hm = HookedModel.from_hf(vlm.model, vlm.processor)
    cache = hm.forward(
        _inputs(vlm),
        ["all-image"],
        extraction_config=VISION,
        interventions=[Ablation(point="projector_out")],
    )
    assert not cache["projector_out"].any()
    if vlm.family != "llava_next":  # Llava-NeXt adds its learned image_newline rows
        assert not cache["resid_in_0"].any()


def test_vision_point_errors(tower_vlm, tiny_llama):
    vlm = tower_vlm
    hm = HookedModel.from_hf(vlm.model, vlm.processor)
    with pytest.raises(ActivationPointError, match="vision layer 7 is out of range"):
        hm.forward(
            _inputs(vlm),
            ["last"],
            extraction_config=ExtractionConfig(extract_vision_resid_out=True, vision_layers=[7]),
        )
    with pytest.raises(HookscopeError, match="no token positions"):
        hm.forward(
            _inputs(vlm),
            ["last"],
            interventions=[Ablation(point="projector_out", positions=["last"])],
        )
    with pytest.raises(ActivationPointError, match="no vision tower"):
        tiny_llama.forward(
            torch.tensor([[5, 6, 7]]),
            ["last"],
            extraction_config=ExtractionConfig(extract_projector_out=True),
        )


def test_extract_cache_concatenates_vision_points_across_batches():
    vlm = build_vlm("llava")
    hm = HookedModel.from_hf(vlm.model, vlm.processor)
    batches = [_inputs(vlm, (0, 1)), _inputs(vlm, (2, 3))]
    config = ExtractionConfig(
        extract_vision_resid_out=True, extract_projector_out=True, extract_resid_out=True
    )
    merged = hm.extract_cache(batches, ["end-image"], extraction_config=config)
    alone = [hm.forward(b, ["end-image"], extraction_config=config) for b in batches]
    for key in ("vision_resid_out_1", "projector_out", "resid_out_0"):
        assert torch.equal(merged[key], torch.cat([a[key] for a in alone])), key
