"""Processor accessors, the image placeholder, language-model-only mode and loading a
vision-language model from a folder."""

from __future__ import annotations

import pytest
import torch
from tiny_vlms import build_vlm, image

from hookscope import ExtractionConfig, HookedModel
from hookscope.errors import HookscopeError, InputError, PositionError


def test_accessors_and_placeholder(vlm):
    hm = HookedModel.from_hf(vlm.model, vlm.processor)  # a processor in the tokenizer slot
    assert hm.get_processor() is vlm.processor
    assert hm.get_text_tokenizer() is vlm.processor.tokenizer
    assert vlm.prompt.startswith(hm.get_image_placeholder())
    # the placeholder makes the processor emit this family's image tokens
    inputs = vlm.inputs([hm.get_image_placeholder() + " hi"], [[image(0)]])
    assert bool((inputs["input_ids"] == hm.image_layout.token).any())


def test_language_model_only(vlm):
    hm = HookedModel.from_hf(vlm.model, vlm.processor)
    config = ExtractionConfig(extract_resid_out=True)
    hm.use_language_model_only()
    assert hm.get_tokenizer() is vlm.processor.tokenizer
    cache = hm.forward("The cat sat on the mat", ["last"], extraction_config=config)
    ids = vlm.processor.tokenizer(["The cat sat on the mat"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        reference = vlm.model(input_ids=ids, output_hidden_states=True)
    assert torch.equal(cache["resid_out_0"][:, 0], reference.hidden_states[1][:, -1])
    assert torch.equal(cache["logits"][:, 0], reference.logits[:, -1])
    assert (
        hm.model_map.n_layers == 2
        and hm.get_module_from_string(hm.model_map.path_of(hm.model_map.layers[0].block))
        is hm.model_map.layers[0].block
    )
    with_image = vlm.inputs([vlm.prompt], [[image(0)]])
    with pytest.raises(InputError, match="use_language_model_only"):
        hm.forward(with_image, ["last"])
    with pytest.raises(PositionError, match="has no image token"):
        hm.forward("The cat", ["all-image"])
    hm.use_full_model()
    assert hm.get_tokenizer() is vlm.processor
    hm.forward(with_image, ["all-image"], extraction_config=config)


def test_image_tokens_without_pixels_and_text_only_errors(tiny_llama):
    vlm = build_vlm("llava")
    hm = HookedModel.from_hf(vlm.model, vlm.processor)
    inputs = vlm.inputs([vlm.prompt], [[image(0)]])
    with pytest.raises(InputError, match="no pixel_values"):
        hm.forward({"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]})
    qwen = build_vlm("qwen2_vl")
    hq = HookedModel.from_hf(qwen.model, qwen.processor)
    q_inputs = dict(qwen.inputs([qwen.prompt], [[image(0)]]))
    del q_inputs["image_grid_thw"]
    with pytest.raises(InputError, match="image_grid_thw"):
        hq.forward(q_inputs)
    with pytest.raises(PositionError, match="text-only"):
        tiny_llama.forward(torch.tensor([[5, 6, 7]]), ["end-image"])
    with pytest.raises(HookscopeError, match="no processor"):
        tiny_llama.get_image_placeholder()


def test_missing_mm_token_type_ids_are_derived():
    qwen = build_vlm("qwen2_5_vl")
    hm = HookedModel.from_hf(qwen.model, qwen.processor)
    full = qwen.inputs(["A cat. " + qwen.prompt], [[image(0)]])
    partial = {k: v for k, v in full.items() if k != "mm_token_type_ids"}
    config = ExtractionConfig(extract_resid_out=True)
    ours = hm.forward(partial, ["all"], extraction_config=config)
    with torch.no_grad():
        reference = qwen.model(**full, output_hidden_states=True)
    assert torch.equal(ours["resid_out_0"][0], reference.hidden_states[1][0])


def test_from_pretrained_loads_model_and_processor(tmp_path):
    vlm = build_vlm("llava")
    vlm.model.save_pretrained(tmp_path)
    vlm.processor.save_pretrained(tmp_path)
    hm = HookedModel.from_pretrained(str(tmp_path), device_map="cpu", torch_dtype=torch.float32)
    assert type(hm.hf_model).__name__ == "LlavaForConditionalGeneration"
    assert hm.get_image_placeholder() == "<image>"
    inputs = hm.get_processor()(text=[vlm.prompt], images=[[image(0)]], return_tensors="pt")
    cache = hm.forward(
        inputs, ["end-image"], extraction_config=ExtractionConfig(extract_resid_out=True)
    )
    expected = HookedModel.from_hf(vlm.model, vlm.processor).forward(
        inputs, ["end-image"], extraction_config=ExtractionConfig(extract_resid_out=True)
    )
    assert torch.equal(cache["resid_out_1"], expected["resid_out_1"])
