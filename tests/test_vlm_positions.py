"""Image-aware positions on a tiny Llava (text stack: Llama; vision: CLIP), built from configs.

Only the position language and the text-side points are covered here; processors, other VLM
families and vision-tower points are the vision-language issue's work.
"""

from __future__ import annotations

import torch
import transformers as tf
from tiny_models import build_config, build_tokenizer

from hookscope import ExtractionConfig, HookedModel

IMAGE = 310  # the image token id (inside the 320-token vocab)


def _llava():
    text = build_config("llama")  # the tiny Llama of tiny_models (vocab 320)
    vision = tf.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    config = tf.LlavaConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=IMAGE,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    return tf.LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa").eval()


def _example(prefix, suffix):
    return [*prefix, *[IMAGE] * 16, *suffix]  # 16 image tokens: (32 / 8)^2 patches


def test_image_positions_select_the_image_tokens():
    model = _llava()
    hm = HookedModel.from_hf(model, build_tokenizer())
    ids = torch.tensor([_example([5, 6], [7, 8, 9])])
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.randn(1, 3, 32, 32),
    }
    items = ["all-image", "first-image", "last-image", "start-image", "end-image", "all-text"]
    cache = hm.forward(batch, items, extraction_config=ExtractionConfig(extract_resid_in=True))
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states[1][0]  # input of layer 1
    m = cache["mapping_index"]
    expected = {
        "all-image": list(range(2, 18)),
        "first-image": [2],
        "last-image": [17],
        "start-image": [1],
        "end-image": [18],
        "all-text": [0, 1, 18, 19, 20],
    }
    for item, positions in expected.items():
        assert torch.equal(cache["resid_in_1"][0, m[item]], hidden[positions]), item


def test_padded_batch_with_images_equals_one_by_one():
    model = _llava()
    hm = HookedModel.from_hf(model, build_tokenizer())
    rows = [_example([5, 6, 11], [7, 8]), _example([12], [7, 8, 9, 10])]
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    width = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])  # left padding
    mask = (torch.arange(width) >= torch.tensor([width - len(r) for r in rows]).unsqueeze(1)).long()
    config = ExtractionConfig(extract_resid_out=True)
    items = ["end-image", "last", "first-image", "random-image-3"]
    batched = hm.forward(
        {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels},
        items,
        extraction_config=config,
    )
    for row, tokens in enumerate(rows):
        alone = hm.forward(
            {
                "input_ids": torch.tensor([tokens]),
                "attention_mask": torch.ones(1, len(tokens), dtype=torch.long),
                "pixel_values": pixels[row : row + 1],
            },
            items,
            extraction_config=config,
        )
        for key in ("resid_out_1", "logits"):
            scale = alone[key].abs().max()
            assert (batched[key][row] - alone[key][0]).abs().max() <= 1e-5 * scale + 1e-6, key
