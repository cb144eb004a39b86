"""Parity with the libraries users would pick instead (run when they are installed: `make parity`,
which runs this file in each peer's own venv; each test skips where its peer is missing).

hookscope's activations equal TransformerLens 4's TransformerBridge hook points and nnsight 0.8's
module outputs on tiny Llama / Qwen2 / GPT-2 models (and SmolLM2 with the real_model marker).
TransformerBridge forces eager attention and mutates the model it is given, so it gets its own
eager copy; hookscope runs on SDPA, so values agree to float32 kernel noise (1e-5 of scale).
"""

from __future__ import annotations

import copy
import importlib.util

import pytest
from conftest import assert_close_to_scale
from tiny_models import PROMPTS, build_model, build_tokenizer

from hookscope import ExtractionConfig, HookedModel
from hookscope.points import point_key, tl_hooks


def _need(package: str):
    return pytest.mark.skipif(
        importlib.util.find_spec(package) is None, reason=f"{package} is not installed"
    )


needs_transformer_lens = _need("transformer_lens")
needs_nnsight = _need("nnsight")

POINTS = ExtractionConfig(
    extract_attn_in=True,
    extract_resid_in=True,
    extract_resid_mid=True,
    extract_resid_out=True,
    extract_attn_out=True,
    extract_mlp_out=True,
    extract_attn_pattern=True,
    extract_head_z=True,
)


def _bridge(folder, family):
    model = copy.deepcopy(build_model(family, attn_implementation="eager"))
    model.config.architectures = [type(model).__name__]  # how the Bridge picks its adapter
    return _bridge_from(folder, model)


@needs_transformer_lens
@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "gemma2", "gemma3_text", "olmo2"])
def test_transformer_lens_bridge(family, tmp_path):
    build_model(family).save_pretrained(tmp_path)
    build_tokenizer().save_pretrained(tmp_path)
    hm = HookedModel.from_hf(build_model(family), build_tokenizer())
    m = hm.model_map
    tokens = build_tokenizer()(PROMPTS[2], return_tensors="pt")["input_ids"]
    ours = hm.forward({"input_ids": tokens}, ["all"], extraction_config=POINTS)
    bridge = _bridge(tmp_path, family)
    _, theirs = bridge.run_with_cache(tokens, names_filter=lambda name: name.startswith("blocks."))
    for layer in range(m.n_layers):
        for head in range(m.n_heads):
            pattern = theirs[f"blocks.{layer}.attn.hook_pattern"][0, head]
            assert_close_to_scale(
                ours[point_key("pattern", layer, head)][0], pattern, msg=f"pattern L{layer}H{head}"
            )
            z = theirs[f"blocks.{layer}.attn.hook_z"][0, :, head]
            assert_close_to_scale(
                ours[point_key("head_z", layer, head)][0], z, msg=f"z L{layer}H{head}"
            )
    # every hook name with an equal on this family (hookscope's own alias table) selects and
    # keys hookscope's cache, in TransformerLens's layouts, and equals TransformerLens's value
    hooks = tl_hooks(m)
    assert ("hook_attn_out" in hooks) and ("attn.hook_rot_q" in hooks) == (family != "gpt2")
    assert ("ln1.hook_out" in hooks) == (family != "olmo2")  # OLMo2 has no input norm
    names = [f"blocks.{layer}.{hook}" for layer in range(m.n_layers) for hook in hooks]
    by_name = hm.forward({"input_ids": tokens}, ["all"], names=names)
    for name in names:
        assert_close_to_scale(by_name[name], theirs[name], msg=name)
    if m.spec.attn_out_norm is not None:
        # sandwich norms: hook_attn_out / hook_mlp_out are after the post-norms (what the block
        # adds, TransformerLens's definition); hookscope's attn_out / mlp_out are the module
        # outputs before them, the Bridge's attn.hook_out / mlp.hook_out
        for layer in range(m.n_layers):
            for kind, hook in (("attn_out", "attn.hook_out"), ("mlp_out", "mlp.hook_out")):
                assert_close_to_scale(
                    ours[point_key(kind, layer)][0], theirs[f"blocks.{layer}.{hook}"][0], msg=kind
                )


@needs_nnsight
@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_nnsight_module_outputs(family):
    from nnsight import LanguageModel

    hm = HookedModel.from_hf(build_model(family), build_tokenizer())
    lm = LanguageModel(build_model(family), tokenizer=build_tokenizer())
    tokens = build_tokenizer()(PROMPTS[2], return_tensors="pt")["input_ids"]
    ours = hm.forward({"input_ids": tokens}, ["all"], extraction_config=POINTS)
    m = hm.model_map
    layers = [m.path_of(parts.block) for parts in m.layers]
    saved = []
    with lm.trace(tokens):
        for index, path in enumerate(layers):
            block = lm
            for part in path.split("."):
                block = block[int(part)] if part.isdigit() else getattr(block, part)
            attention = getattr(block, m.spec.attention)
            mlp = getattr(block, m.spec.mlp)
            # nnsight reads in execution order: attention, then MLP, then the block's output
            attn_out = attention.output[0].save()
            mlp_out = mlp.output.save()
            saved.append((index, attn_out, mlp_out, block.output.save()))
    for index, attn_out, mlp_out, resid_out in saved:
        resid_out = resid_out[0] if isinstance(resid_out, tuple) else resid_out
        assert_close_to_scale(ours[f"resid_out_{index}"][0], resid_out[0], msg=f"resid_out_{index}")
        assert_close_to_scale(ours[f"attn_out_{index}"][0], attn_out[0], msg=f"attn_out_{index}")
        assert_close_to_scale(ours[f"mlp_out_{index}"][0], mlp_out[0], msg=f"mlp_out_{index}")


@needs_transformer_lens
@pytest.mark.real_model
def test_transformer_lens_bridge_on_smollm2():
    from transformers import AutoModelForCausalLM

    from hookscope.loading import default_model_dir

    folder = default_model_dir()
    hm = HookedModel.from_pretrained()
    bridge = _bridge_from(
        folder, AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")
    )
    tokens = hm.get_tokenizer()("The capital of France is", return_tensors="pt")["input_ids"]
    ours = hm.forward(
        {"input_ids": tokens},
        ["all"],
        extraction_config=ExtractionConfig(
            extract_resid_out=True, extract_attn_pattern=True, layers=[0, 14, 29]
        ),
    )
    _, theirs = bridge.run_with_cache(tokens, names_filter=lambda name: name.startswith("blocks."))
    for layer in (0, 14, 29):
        # 1e-4 of scale: SDPA vs the bridge's eager attention over up to 30 layers
        assert_close_to_scale(
            ours[f"resid_out_{layer}"][0], theirs[f"blocks.{layer}.hook_resid_post"][0], rtol=1e-4
        )
        assert_close_to_scale(
            ours[f"pattern_L{layer}H3"][0],
            theirs[f"blocks.{layer}.attn.hook_pattern"][0, 3],
            rtol=1e-4,
        )


def _bridge_from(folder, hf_model):
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoTokenizer

    return TransformerBridge.boot_transformers(
        str(folder), hf_model=hf_model, tokenizer=AutoTokenizer.from_pretrained(folder)
    )


@needs_nnsight
@pytest.mark.real_model
def test_nnsight_on_smollm2():
    from nnsight import LanguageModel
    from transformers import AutoModelForCausalLM

    from hookscope.loading import default_model_dir

    folder = default_model_dir()
    hm = HookedModel.from_pretrained()
    lm = LanguageModel(AutoModelForCausalLM.from_pretrained(folder), tokenizer=hm.get_tokenizer())
    tokens = hm.get_tokenizer()("The capital of France is", return_tensors="pt")["input_ids"]
    layers = [0, 14, 29]
    ours = hm.forward(
        {"input_ids": tokens},
        ["all"],
        extraction_config=ExtractionConfig(
            extract_resid_out=True, extract_attn_out=True, extract_mlp_out=True, layers=layers
        ),
    )
    saved = {}
    with lm.trace(tokens):
        for layer in layers:  # execution order: attention, MLP, block output
            block = lm.model.layers[layer]
            saved[f"attn_out_{layer}"] = block.self_attn.output[0].save()
            saved[f"mlp_out_{layer}"] = block.mlp.output.save()
            saved[f"resid_out_{layer}"] = block.output.save()
    for key, value in saved.items():
        # both run the same SDPA model: equal up to float32 kernel order
        assert_close_to_scale(ours[key][0], value[0], msg=key)


@needs_transformer_lens
@pytest.mark.real_model
def test_transformer_lens_decompose_resid_and_logit_attrs_on_smollm2():
    """hookscope's decomposition and DLA equal TransformerLens's ``decompose_resid`` /
    ``stack_head_results`` / ``logit_attrs`` on the Bridge in compatibility mode (the final
    norm's weight folded into ``W_U``, as TransformerLens's DLA assumes: on an unprocessed
    Bridge ``logit_attrs`` leaves the norm's gain out and does not sum to the logit)."""
    import torch
    from transformers import AutoModelForCausalLM

    from hookscope.analysis import decompose_resid, logit_attribution
    from hookscope.loading import default_model_dir

    folder = default_model_dir()
    hm = HookedModel.from_pretrained()
    bridge = _bridge_from(
        folder, AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")
    )
    bridge.enable_compatibility_mode(disable_warnings=True)
    ioi = "When Mary and John went to the store, John gave a drink to"
    tokens = hm.get_tokenizer()(ioi, return_tensors="pt")["input_ids"]
    mary, john = (
        hm.get_tokenizer()(t, add_special_tokens=False)["input_ids"] for t in (" Mary", " John")
    )
    _, cache = bridge.run_with_cache(tokens)
    stack, labels = cache.decompose_resid(apply_ln=False, return_labels=True, pos_slice=-1)
    ours = decompose_resid(hm, {"input_ids": tokens}, ["last"])
    assert len(labels) == len(ours.labels) == 61  # embed + 30 x (attention, MLP)
    assert_close_to_scale(ours.components[:, 0, 0], stack[:, 0], rtol=1e-4)
    theirs = cache.logit_attrs(
        stack, tokens=torch.tensor(mary), incorrect_tokens=torch.tensor(john), pos_slice=-1
    )
    dla = logit_attribution(hm, {"input_ids": tokens}, " Mary", " John")
    assert_close_to_scale(dla.values[:, 0, 0], theirs[:, 0], rtol=1e-4)
    # per head: stack_head_results (no output bias on SmolLM2) and their attributions
    heads, _ = cache.stack_head_results(layer=-1, pos_slice=-1, return_labels=True)
    per_head = logit_attribution(hm, {"input_ids": tokens}, " Mary", " John", per_head=True)
    rows = [i for i, label in enumerate(per_head.labels) if label.startswith("head_out_")]
    head_attrs = cache.logit_attrs(
        heads, tokens=torch.tensor(mary), incorrect_tokens=torch.tensor(john), pos_slice=-1
    )
    assert_close_to_scale(per_head.values[rows, 0, 0], head_attrs[:, 0], rtol=1e-4)


@needs_transformer_lens
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_transformer_lens_logit_attrs(family, tmp_path):
    """TransformerLens's ``logit_attrs`` (compatibility mode: the final norm folded into
    ``W_U``, writing weights centred) equals hookscope's DLA, on a LayerNorm family with biases
    (GPT-2: centring, the norm's bias a constant term) and an RMSNorm one."""
    import torch

    from hookscope.analysis import logit_attribution

    build_model(family).save_pretrained(tmp_path)
    build_tokenizer().save_pretrained(tmp_path)
    hm = HookedModel.from_hf(build_model(family), build_tokenizer())
    tokens = build_tokenizer()(PROMPTS[2], return_tensors="pt")["input_ids"]
    bridge = _bridge(tmp_path, family)
    bridge.enable_compatibility_mode(disable_warnings=True)
    _, cache = bridge.run_with_cache(tokens)
    stack = cache.decompose_resid(apply_ln=False, pos_slice=-1)
    theirs = cache.logit_attrs(
        stack, tokens=torch.tensor([11]), incorrect_tokens=torch.tensor([40]), pos_slice=-1
    )
    ours = logit_attribution(hm, {"input_ids": tokens}, 11, 40)
    assert len(ours.labels) == len(theirs)
    assert_close_to_scale(ours.values[:, 0, 0], theirs[:, 0], rtol=1e-4)
