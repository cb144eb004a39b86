"""Loading from a folder, from a config, in another dtype; default-model resolution."""

from __future__ import annotations

import torch
from tiny_models import PROMPTS, build_model, build_tokenizer

from hookscope import ExtractionConfig, HookedModel, HookedModelConfig, loading


def test_from_pretrained_folder_matches_the_model(tiny_folder):
    hm = HookedModel.from_pretrained(
        str(tiny_folder), device_map="cpu", torch_dtype=torch.float32, attn_implementation="sdpa"
    )
    same = HookedModel(
        HookedModelConfig(model_name=str(tiny_folder), device_map="cpu", torch_dtype=torch.float32)
    )
    batch = build_tokenizer()(PROMPTS[0], return_tensors="pt")
    with torch.no_grad():
        expected = build_model("llama")(**batch).logits
    for wrapped in (hm, same):
        assert wrapped.hf_model.config._attn_implementation == "sdpa"
        assert torch.equal(wrapped.forward(batch, ["all"])["logits"], expected)
    assert hm.model_name == str(tiny_folder)


def test_bfloat16_keeps_model_dtype_and_tracks_float32(tiny_folder):
    config = ExtractionConfig(extract_resid_out=True)
    half = HookedModel.from_pretrained(
        str(tiny_folder), device_map="cpu", torch_dtype=torch.bfloat16
    )
    full = HookedModel.from_pretrained(
        str(tiny_folder), device_map="cpu", torch_dtype=torch.float32
    )
    low = half.forward(PROMPTS[0], ["last", 0], extraction_config=config)
    high = full.forward(PROMPTS[0], ["last", 0], extraction_config=config)
    assert low["resid_out_1"].dtype == torch.bfloat16
    torch.testing.assert_close(
        low["resid_out_1"].float(), high["resid_out_1"], rtol=0.05, atol=0.05
    )


def test_default_model_resolution(monkeypatch, tmp_path):
    monkeypatch.setattr(loading, "default_model_dir", lambda: tmp_path / "smol")
    monkeypatch.setattr(loading, "_in_hub_cache", lambda model_id: False)
    assert loading._resolve_source(HookedModelConfig()) == (tmp_path / "smol", {})
    assert loading._resolve_source(HookedModelConfig(model_name=loading.DEFAULT_MODEL_ID)) == (
        tmp_path / "smol",
        {},
    )
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"")
    assert loading._resolve_source(HookedModelConfig(model_name=str(gguf))) == (
        tmp_path,
        {"gguf_file": "m.gguf"},
    )


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("HOOKSCOPE_CACHE", str(tmp_path))
    assert loading.cache_dir() == tmp_path


def test_pad_token_defaults_to_eos(tiny_folder):
    tokenizer = build_tokenizer()
    tokenizer = type(tokenizer)(tokenizer_object=tokenizer.backend_tokenizer, eos_token="</s>")
    hm = HookedModel.from_hf(build_model("llama"), tokenizer)
    assert hm.get_tokenizer().pad_token == "</s>"


def test_accelerate_disk_offload_gives_the_same_numbers(tiny_folder, tmp_path):
    """Layer 1 offloaded to disk by accelerate: extraction, per-head outputs (which read W_O) and
    interventions equal the in-memory model's."""
    from hookscope.interventions import Ablation

    device_map = {
        "model.embed_tokens": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    offloaded = HookedModel.from_pretrained(
        str(tiny_folder),
        device_map=device_map,
        torch_dtype=torch.float32,
        offload_folder=str(tmp_path / "offload"),
    )
    assert hasattr(offloaded.model_map.layers[1].attention.o_proj, "_hf_hook")
    plain = HookedModel.from_pretrained(
        str(tiny_folder), device_map="cpu", torch_dtype=torch.float32
    )
    config = ExtractionConfig(
        extract_resid_out=True,
        extract_attn_pattern=True,
        extract_head_out=True,
        extract_values_vectors_projected=True,
        layers=[1],
    )
    for interventions in ([], [Ablation(point="head_out_L1H0")]):
        a = plain.forward(
            PROMPTS[:2], ["last", 0], extraction_config=config, interventions=interventions
        )
        b = offloaded.forward(
            PROMPTS[:2], ["last", 0], extraction_config=config, interventions=interventions
        )
        for key, value in a.tensors().items():
            torch.testing.assert_close(b[key], value, rtol=1e-5, atol=1e-6, msg=key)
