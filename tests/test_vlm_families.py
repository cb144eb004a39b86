"""Every supported vision-language family, on a tiny random model with an offline processor:
image positions match the processor's image-token spans, the language model's residual stream
equals HF's hidden states, and a left-padded batch with different text lengths equals the
examples one by one."""

from __future__ import annotations

import torch
from tiny_vlms import image

from hookscope import ExtractionConfig, HookedModel


def _texts(vlm):
    return ["Look: " + vlm.prompt, "The cat sat on the mat. " + vlm.prompt + " Paris"]


def _model_inputs(inputs):
    """The processor output without ``labels`` (PaliGemma's processor returns them; with them
    the model builds its training-time mask, and hookscope, an inference tool, drops them)."""
    return {k: v for k, v in inputs.items() if k != "labels"}


def _image_id(model) -> int:
    config = model.config
    token = getattr(config, "image_token_id", None)
    return token if token is not None else config.image_token_index


def test_image_positions_match_the_processor_spans(vlm):
    hm = HookedModel.from_hf(vlm.model, vlm.processor)
    inputs = vlm.inputs(_texts(vlm), [[image(0)], [image(1)]], padding_side="right")
    items = ["all-image", "first-image", "last-image", "end-image"]
    if vlm.family != "paligemma":  # PaliGemma's processor puts the image first: no token before
        items.append("start-image")
    cache = hm.forward(inputs, items, extraction_config=ExtractionConfig(extract_resid_in=True))
    with torch.no_grad():
        hidden = vlm.model(**_model_inputs(inputs), output_hidden_states=True).hidden_states[1]
    m = cache["mapping_index"]
    for row in range(2):
        spans = torch.nonzero(inputs["input_ids"][row] == _image_id(vlm.model)).flatten()
        first, last = int(spans[0]), int(spans[-1])
        expected = {
            "all-image": spans.tolist(),
            "first-image": [first],
            "last-image": [last],
            "start-image": [first - 1],
            "end-image": [last + 1],
        }
        for item in items:
            positions = expected[item]
            got = cache["resid_in_1"][row, m[item]][: len(positions)]
            assert torch.equal(got, hidden[row, positions]), (vlm.family, item)


def test_resid_out_equals_hf_hidden_states(vlm):
    hm = HookedModel.from_hf(vlm.model, vlm.processor)
    inputs = vlm.inputs(_texts(vlm), [[image(0)], [image(1)]], padding_side="right")
    cache = hm.forward(inputs, ["all"], extraction_config=ExtractionConfig(extract_resid_out=True))
    with torch.no_grad():
        reference = vlm.model(**_model_inputs(inputs), output_hidden_states=True)
    mask = inputs["attention_mask"].bool()
    # hidden_states[l + 1] is the output of layer l, except the last (after the final norm)
    for layer in range(hm.model_map.n_layers - 1):
        ours = cache["resid_out_" + str(layer)]
        for row in range(2):
            n = int(mask[row].sum())
            assert torch.equal(ours[row, :n], reference.hidden_states[layer + 1][row, mask[row]])
    n = int(mask[0].sum())
    assert torch.equal(cache["logits"][0, :n], reference.logits[0, mask[0]])


def test_padded_batch_equals_one_by_one(vlm):
    hm = HookedModel.from_hf(vlm.model, vlm.processor)
    texts, images = _texts(vlm), [[image(2)], [image(3)]]
    config = ExtractionConfig(extract_resid_out=True, extract_attn_out=True)
    items = ["last", "end-image", "first-image", "all-text"]
    batched = hm.forward(vlm.inputs(texts, images), items, extraction_config=config)
    for row in range(2):
        alone = hm.forward(
            vlm.inputs(texts[row : row + 1], images[row : row + 1]), items, extraction_config=config
        )
        width = alone["resid_out_1"].shape[1]
        for key in ("resid_out_1", "attn_out_0", "logits"):
            ours, solo = batched[key][row, : alone[key].shape[1]], alone[key][0]
            scale = solo.abs().max()
            assert (ours - solo).abs().max() <= 1e-5 * scale + 1e-6, (vlm.family, key, width)
