"""Image-text attention blocking: with text queries cut off from image keys in every layer, text
positions no longer depend on the pixels; with image queries cut off from text keys, image
positions no longer depend on the text before the image."""

from __future__ import annotations

import pytest
import torch
from tiny_vlms import build_vlm, image

from hookscope import ExtractionConfig, HookedModel
from hookscope.errors import HookscopeError, PositionError

CONFIG = ExtractionConfig(extract_resid_out=True)


def _run(hm, inputs, items, block=None):
    edits = hm.image_text_block(block) if block else None
    return hm.forward(inputs, items, extraction_config=CONFIG, interventions=edits)


def test_blocking_text_to_image_makes_text_independent_of_the_pixels(vlm):
    hm = HookedModel.from_hf(vlm.model, vlm.processor)
    texts = ["A cat. " + vlm.prompt + " Paris"]
    first, second = vlm.inputs(texts, [[image(0)]]), vlm.inputs(texts, [[image(9)]])
    free = [_run(hm, inputs, ["all-text"]) for inputs in (first, second)]
    assert not torch.allclose(free[0]["resid_out_1"], free[1]["resid_out_1"], atol=1e-4)
    blocked = [_run(hm, inputs, ["all-text"], "text-to-image") for inputs in (first, second)]
    torch.testing.assert_close(blocked[0]["resid_out_1"], blocked[1]["resid_out_1"])
    torch.testing.assert_close(blocked[0]["logits"], blocked[1]["logits"])


def test_blocking_image_to_text_makes_the_image_independent_of_the_text_before(vlm):
    if vlm.family == "paligemma":
        pytest.skip("PaliGemma's processor puts the image before all text")
    hm = HookedModel.from_hf(vlm.model, vlm.processor)
    inputs = vlm.inputs(["A cat. " + vlm.prompt], [[image(0)]])
    other = dict(inputs)
    other["input_ids"] = inputs["input_ids"].clone()
    other["input_ids"][0, 0] = 17 if int(inputs["input_ids"][0, 0]) != 17 else 18  # a text token
    free = [_run(hm, x, ["all-image"]) for x in (inputs, other)]
    assert not torch.allclose(free[0]["resid_out_1"], free[1]["resid_out_1"], atol=1e-4)
    blocked = [_run(hm, x, ["all-image"], "image-to-text") for x in (inputs, other)]
    torch.testing.assert_close(blocked[0]["resid_out_1"], blocked[1]["resid_out_1"])


def test_block_errors(tiny_llama):
    vlm = build_vlm("llava")
    hm = HookedModel.from_hf(vlm.model, vlm.processor)
    with pytest.raises(HookscopeError, match="'sideways' is not one of"):
        hm.image_text_block("sideways")
    with pytest.raises(PositionError, match="text-only"):
        tiny_llama.image_text_block()
