"""Several images per example: ":k" items address image k (0-based, in order), images are
found per family (adjacent Llava / PaliGemma images split by their fixed token count; Pixtral
rows joined across [IMG_BREAK]), and a padded batch with different image counts equals one by
one."""

from __future__ import annotations

import pytest
import torch
from tiny_vlms import image

from hookscope import ExtractionConfig, HookedModel
from hookscope.errors import PositionError


def _two_image_text(vlm):
    placeholder = vlm.prompt.split("What")[0]  # the family's image placeholder text
    return f"First {placeholder} then {placeholder}What changed?"


def test_each_image_is_addressed_by_its_number(vlm):
    hm = HookedModel.from_hf(vlm.model, vlm.processor)
    inputs = vlm.inputs([_two_image_text(vlm)], [[image(0), image(1)]])
    ids = inputs["input_ids"]
    spans = torch.nonzero(ids[0] == hm.image_layout.token).flatten()
    numbers = hm.image_numbers(ids)[0]
    assert int(numbers.max()) == 1, vlm.family  # two images found
    half = len(spans) // 2  # both images have the same size: the same token count
    expected = {0: spans[:half].tolist(), 1: spans[half:].tolist()}
    items = ["all-image:0", "all-image:1", "end-image:0", "start-image:1", "last-image:-1"]
    cache = hm.forward(inputs, items, extraction_config=ExtractionConfig(extract_resid_in=True))
    m, got = cache["mapping_index"], cache["resid_in_1"][0]
    with torch.no_grad():
        inputs_ = {k: v for k, v in inputs.items() if k != "labels"}
        hidden = vlm.model(**inputs_, output_hidden_states=True).hidden_states[1][0]
    for k in (0, 1):
        assert torch.equal(got[m[f"all-image:{k}"]], hidden[expected[k]]), (vlm.family, k)
    assert torch.equal(got[m["last-image:-1"]], hidden[[expected[1][-1]]])
    assert torch.equal(got[m["end-image:0"]], hidden[[expected[0][-1] + 1]])
    assert torch.equal(got[m["start-image:1"]], hidden[[expected[1][0] - 1]])
    with pytest.raises(PositionError, match="has 2 image"):
        hm.forward(inputs, ["first-image:2"])


def test_padded_batch_with_different_image_counts_equals_one_by_one(vlm):
    hm = HookedModel.from_hf(vlm.model, vlm.processor)
    texts = [_two_image_text(vlm), "The cat. " + vlm.prompt]
    images = [[image(3), image(4)], [image(5)]]
    items = ["end-image:-1", "first-image:0", "last"]
    config = ExtractionConfig(extract_resid_out=True)
    batched = hm.forward(vlm.inputs(texts, images), items, extraction_config=config)
    for row in range(2):
        alone = hm.forward(
            vlm.inputs(texts[row : row + 1], images[row : row + 1]), items, extraction_config=config
        )
        for key in ("resid_out_1", "logits"):
            solo = alone[key][0]
            assert (batched[key][row] - solo).abs().max() <= 1e-5 * solo.abs().max() + 1e-6
