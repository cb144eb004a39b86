"""Bad input gets a clear error; hooks never outlive a call; user hooks; early stop; discovery."""

from __future__ import annotations

import pytest
import torch
from conftest import hook_snapshot
from tiny_models import PROMPTS, build_model, build_tokenizer

from hookscope import (
    ActivationPointError,
    ArchitectureError,
    ExtractionConfig,
    HookedModel,
    HookscopeError,
    InputError,
    ModuleHook,
    PositionError,
)

RESID = ExtractionConfig(extract_resid_out=True)


def _padded():
    return build_tokenizer("left")(PROMPTS, return_tensors="pt", padding=True)


def _plain_logits(hm, batch):
    with torch.no_grad():
        return hm.hf_model(**batch).logits


@pytest.mark.parametrize(
    "positions, error, message",
    [
        (["middle"], PositionError, "unknown position item 'middle'.*Valid items"),
        ([8], PositionError, "out of range for example 1, which has 7 real tokens"),
        ([], PositionError, "empty"),
        (None, PositionError, "target_token_positions is required"),
        (["end-image"], PositionError, "text-only model"),
    ],
)
def test_bad_positions(tiny_llama, positions, error, message):
    before = hook_snapshot(tiny_llama.hf_model)
    with pytest.raises(error, match=message):
        tiny_llama.forward(_padded(), positions, extraction_config=RESID)
    assert hook_snapshot(tiny_llama.hf_model) == before


def test_errors_are_value_errors(tiny_llama):
    with pytest.raises(ValueError):
        tiny_llama.forward(_padded(), ["nope"], extraction_config=RESID)


def test_layer_out_of_range(tiny_llama):
    with pytest.raises(
        ActivationPointError,
        match=r"layer.* 5 is out of range: this model has 2 layers \(valid 0..1\)",
    ):
        tiny_llama.forward(
            PROMPTS[0],
            ["last"],
            extraction_config=ExtractionConfig(extract_resid_out=True, layers=[5]),
        )


def test_missing_attention_mask_with_padding(tiny_llama):
    ids = _padded()["input_ids"]
    with pytest.raises(InputError, match="pad token .* no attention_mask"):
        tiny_llama.forward({"input_ids": ids}, ["last"], extraction_config=RESID)


def test_module_paths(tiny_llama):
    assert (
        tiny_llama.get_module_from_string("model.layers[0].self_attn")
        is tiny_llama.model_map.layers[0].attention
    )
    assert (
        tiny_llama.get_module_from_string("model.layers.1.mlp")
        is tiny_llama.model_map.layers[1].mlp
    )
    with pytest.raises(ArchitectureError, match="model.layers.0.self_attn"):
        tiny_llama.get_module_from_string("model.layers[0].self_atn")


def test_exception_in_user_hook_leaves_no_hook(tiny_llama):
    before = hook_snapshot(tiny_llama.hf_model)
    batch = _padded()
    expected = _plain_logits(tiny_llama, batch)

    def broken(module, args, output):
        raise RuntimeError("user hook failed")

    with pytest.raises(RuntimeError, match="user hook failed"):
        tiny_llama.forward(
            batch,
            ["last"],
            extraction_config=RESID,
            hooks=[ModuleHook("model.layers.1.mlp", broken)],
        )
    assert hook_snapshot(tiny_llama.hf_model) == before
    assert torch.equal(_plain_logits(tiny_llama, batch), expected)


def test_keyboard_interrupt_inside_a_hook_leaves_no_hook(tiny_llama):
    before = hook_snapshot(tiny_llama.hf_model)

    def interrupt(module, args, kwargs):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tiny_llama.forward(
            PROMPTS[0],
            ["last"],
            extraction_config=RESID,
            hooks=[ModuleHook("model.layers.0", interrupt, "input")],
        )
    assert hook_snapshot(tiny_llama.hf_model) == before


def test_bad_hook_path_registers_nothing(tiny_llama):
    before = hook_snapshot(tiny_llama.hf_model)
    good = ModuleHook("model.layers.0.mlp", lambda m, a, o: None)
    bad = ModuleHook("model.layers.9.mlp", lambda m, a, o: None)
    with pytest.raises(ArchitectureError):
        tiny_llama.forward(PROMPTS[0], ["last"], hooks=[good, bad])
    assert hook_snapshot(tiny_llama.hf_model) == before
    with pytest.raises(ArchitectureError):
        tiny_llama.set_hooks([good, bad])
    assert hook_snapshot(tiny_llama.hf_model) == before


def test_reference_style_hook_dict_runs_before_capture(tiny_llama):
    before = hook_snapshot(tiny_llama.hf_model)
    """A per-call hook that zeroes layer 0's MLP: the cache sees the zero, the logits change."""
    batch = _padded()
    plain = tiny_llama.forward(
        batch, ["last"], extraction_config=ExtractionConfig(extract_mlp_out=True)
    )
    zeroed = tiny_llama.forward(
        batch,
        ["last"],
        extraction_config=ExtractionConfig(extract_mlp_out=True),
        hooks=[
            {
                "component": "model.layers[0].mlp.output",
                "intervention": lambda m, a, out: torch.zeros_like(out),
            }
        ],
    )
    assert torch.all(zeroed["mlp_out_0"] == 0) and not torch.all(plain["mlp_out_0"] == 0)
    assert not torch.allclose(zeroed["logits"], plain["logits"])
    assert hook_snapshot(tiny_llama.hf_model) == before


def test_persistent_hook_until_removed(tiny_llama):
    before = hook_snapshot(tiny_llama.hf_model)
    calls = []
    tiny_llama.register_forward_hook("model.layers[1]", lambda m, a, o: calls.append(1))
    tiny_llama.forward(PROMPTS[0], ["last"])
    tiny_llama.hf_model(**build_tokenizer()(PROMPTS[0], return_tensors="pt"))
    assert len(calls) == 2
    tiny_llama.remove_hooks()
    tiny_llama.forward(PROMPTS[0], ["last"])
    assert len(calls) == 2 and hook_snapshot(tiny_llama.hf_model) == before


def test_create_set_remove_hooks_by_hand(tiny_llama):
    from hookscope.positions import resolve_positions

    batch = build_tokenizer()(PROMPTS[0], return_tensors="pt")
    with torch.no_grad():
        reference = tiny_llama.hf_model(**batch, output_hidden_states=True)
    before = hook_snapshot(tiny_llama.hf_model)
    positions = resolve_positions(["last"], batch["attention_mask"])
    sink = {}
    handles = tiny_llama.set_hooks(tiny_llama.create_hooks(positions, sink, RESID))
    with torch.no_grad():
        tiny_llama.hf_model(**batch)
    tiny_llama.remove_hooks(handles)
    assert hook_snapshot(tiny_llama.hf_model) == before
    assert torch.equal(sink["resid_out_0"][0, 0], reference.hidden_states[1][0, -1])


def test_early_stop_skips_later_layers_and_keeps_values(tiny_llama):
    batch = _padded()
    full = tiny_llama.forward(
        batch, ["last"], extraction_config=ExtractionConfig(extract_resid_out=True)
    )
    calls = []
    # a raw PyTorch hook observes it (hooks given to hookscope count as requests and do run)
    handle = tiny_llama.hf_model.model.layers[1].register_forward_hook(
        lambda m, a, o: calls.append(1)
    )
    try:
        early = tiny_llama.forward(
            batch,
            ["last"],
            extraction_config=ExtractionConfig(
                extract_resid_out=True, layers=[0], save_logits=False
            ),
        )
    finally:
        handle.remove()
    assert calls == [], "layer 1 must not run"
    assert set(early.tensors()) == {"resid_out_0", "position_mask"}
    assert torch.equal(early["resid_out_0"], full["resid_out_0"])


def test_to_string_tokens(tiny_llama):
    tokenizer = build_tokenizer()
    ids = tokenizer("The cat sat", return_tensors="pt")["input_ids"][0]
    tokens = tiny_llama.to_string_tokens(ids)
    assert "".join(tokens) == "The cat sat"
    assert tiny_llama.to_string_tokens(ids.unsqueeze(0)) == [tokens]


def test_get_processor_on_text_model(tiny_llama):
    with pytest.raises(HookscopeError, match="text-only"):
        tiny_llama.get_processor()
    assert tiny_llama.get_text_tokenizer() is tiny_llama.get_tokenizer()


def test_structural_discovery_for_unknown_model_type():
    model = build_model("llama")
    model.config.model_type = "my_new_llama"
    hm = HookedModel.from_hf(model, build_tokenizer())
    assert hm.model_map.discovered
    batch = build_tokenizer()(PROMPTS[0], return_tensors="pt")
    cache = hm.forward(
        batch,
        ["all"],
        extraction_config=ExtractionConfig(extract_resid_in=True, extract_resid_mid=True),
    )
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states
    assert torch.equal(cache["resid_in_1"], hidden[1])


def test_unsupported_model_names_the_missing_part():
    model = build_model("llama")
    model.config.model_type = "strange"
    model.model.layers[0].add_module("mixer", model.model.layers[0].self_attn)
    del model.model.layers[0].self_attn
    with pytest.raises(ArchitectureError, match="could not find: attention module"):
        HookedModel.from_hf(model, build_tokenizer())


def test_generate_matches_hf(tiny_llama):
    batch = build_tokenizer("left")(PROMPTS[:2], return_tensors="pt", padding=True)
    expected = tiny_llama.hf_model.generate(
        **batch, max_new_tokens=4, do_sample=False, pad_token_id=0
    )
    sequences = tiny_llama.generate(batch, max_new_tokens=4, do_sample=False)
    assert torch.equal(sequences, expected)
    texts = tiny_llama.generate(batch, max_new_tokens=4, do_sample=False, return_text=True)
    assert texts == build_tokenizer().batch_decode(
        expected[:, batch["input_ids"].shape[1] :], skip_special_tokens=True
    )


def test_keep_gradient_flows_to_the_embeddings(tiny_llama):
    embed = tiny_llama.model_map.embed.weight
    embed.grad = None
    cache = tiny_llama.forward(
        PROMPTS[0],
        ["last"],
        extraction_config=ExtractionConfig(extract_resid_out=True, keep_gradient=True),
    )
    cache["resid_out_1"].sum().backward()
    assert embed.grad is not None and embed.grad.abs().sum() > 0
    embed.grad = None
    plain = tiny_llama.forward(PROMPTS[0], ["last"], extraction_config=RESID)
    assert not plain["resid_out_1"].requires_grad and not plain["logits"].requires_grad
