"""Edges of the frozen replacement model (transcoders, frozen norms and attention): complete
(they sum to the target), equal to a hand computation on the last layer, batched == alone."""

from __future__ import annotations

import pytest
import torch
from tiny_models import build_tokenizer

from hookscope.dictionaries import (
    Dictionary,
    FeatureTarget,
    LogitTarget,
    attribution_rows,
)
from hookscope.errors import HookscopeError
from hookscope.hooks import reading_hook
from hookscope.interventions import PatternEdit

PROMPTS = ["The cat sat on the mat", "A dog", "Hello world and more"]


def make_transcoder(layer: int, seed: int, subtract_decoder_bias=False, input_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return Dictionary(
        W_enc=torch.randn(64, 40, generator=g) * 0.3,
        b_enc=torch.randn(40, generator=g) * 0.1,
        W_dec=torch.randn(40, 64, generator=g) * 0.1,
        b_dec=torch.randn(64, generator=g) * 0.1,
        activation="relu",
        reads=f"mlp_in_{layer}",
        writes=f"mlp_out_{layer}",
        subtract_decoder_bias=subtract_decoder_bias,
        input_scale=input_scale,
        name=f"tc{layer}",
    )


def _mlp_inputs(hm, batch):
    """Each layer's MLP input in a plain forward: ``{layer: [batch, seq, d_model]}``."""
    seen = {}
    hooks = [
        reading_hook(parts.mlp, "input", lambda t, layer=layer: seen.__setitem__(layer, t))
        for layer, parts in enumerate(hm.model_map.layers)
    ]
    logits = hm.forward(batch, ["last"], hooks=hooks)["logits"][:, 0]
    return seen, logits


def test_frozen_pattern_edit_changes_no_value(tiny_llama):
    batch = build_tokenizer("left")(PROMPTS, return_tensors="pt", padding=True)
    plain = tiny_llama.forward(batch, ["all"])
    freeze = [PatternEdit(layer=layer, op="freeze") for layer in range(2)]
    frozen = tiny_llama.forward(batch, ["all"], interventions=freeze)
    torch.testing.assert_close(frozen["logits"], plain["logits"], rtol=1e-5, atol=1e-5)
    with pytest.raises(HookscopeError, match="not valid at stage 'pre'"):
        PatternEdit(layer=0, op="freeze", stage="pre")


@pytest.mark.parametrize(("subtract", "scale"), [(False, 1.0), (True, 2.0)])
def test_edges_sum_to_the_real_target_value(tiny_llama, subtract, scale):
    """Completeness: with norms and attention frozen the map from the leaves to a target is
    affine, so its edges (leaf x gradient) plus the bias constant give the target exactly; an
    unfrozen norm or pattern breaks it."""
    tokenizer = build_tokenizer("right")
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    transcoders = {layer: make_transcoder(layer, layer, subtract, scale) for layer in range(2)}
    targets = [LogitTarget(17), FeatureTarget(1, 3, "last"), FeatureTarget(1, 7, 1)]
    rows = attribution_rows(tiny_llama, batch, transcoders, targets)
    torch.testing.assert_close(rows.total(), rows.value, rtol=1e-4, atol=1e-4)
    # the values are the real model's: the de-meaned logit, the feature's pre-activation
    mlp_in, logits = _mlp_inputs(tiny_llama, batch)
    torch.testing.assert_close(
        rows.value[:, 0], logits[:, 17] - logits.mean(-1), rtol=1e-5, atol=1e-5
    )
    pre = transcoders[1].pre_activations(mlp_in[1])  # [batch, seq, d_sae]
    last = batch["attention_mask"].sum(1) - 1
    rows_ = torch.arange(3)
    torch.testing.assert_close(rows.value[:, 1], pre[rows_, last, 3], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rows.value[:, 2], pre[rows_, 1, 7], rtol=1e-5, atol=1e-5)
    # layer-1 features have no path to a layer-1 feature target; padding carries no edge
    assert not rows.features[1][:, 1:].any() and not rows.errors[1][:, 1:].any()
    padding = ~batch["attention_mask"].bool()
    assert not rows.embedding.permute(0, 2, 1)[padding].any()
    assert rows.embedding.abs().max() > 1e-3 and rows.features[0].abs().max() > 1e-3
    assert all(p.requires_grad for p in tiny_llama.hf_model.parameters())


def test_last_layer_feature_to_logit_edges_by_hand(tiny_llama):
    """A feature of the last layer's transcoder reaches the last-position logit only through the
    frozen final norm and the unembedding: a * (W_dec[i] * g * s) . (W_U[t] - mean W_U)."""
    batch = build_tokenizer("left")(PROMPTS, return_tensors="pt", padding=True)
    transcoder = make_transcoder(1, 5, input_scale=2.0)
    rows = attribution_rows(tiny_llama, batch, [transcoder], [LogitTarget(42)])
    mlp_in, _ = _mlp_inputs(tiny_llama, batch)
    final = tiny_llama.forward(batch, ["last"], names=["resid_out_1"])["resid_out_1"][:, 0]
    norm = tiny_llama.model_map.final_norm
    scale = (final.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon).rsqrt()  # [3, 1]
    unembed = tiny_llama.hf_model.get_output_embeddings().weight
    readout = unembed[42] - unembed.mean(0)  # [d_model]
    features = transcoder.encode(mlp_in[1])[:, -1]  # last position (left padding): [3, d_sae]
    direction = transcoder.W_dec / 2.0 * norm.weight * readout  # [d_sae, d_model]
    by_hand = features * (scale * direction.sum(-1))
    torch.testing.assert_close(rows.features[1][:, 0, -1], by_hand, rtol=1e-4, atol=1e-6)
    assert by_hand.abs().max() > 1e-3
    # the last MLP runs after the last attention: its earlier positions do not reach the logit
    assert not rows.features[1][:, 0, :-1].any()
    # layer 0 has no transcoder: its whole MLP output is an error node, and the edges stay exact
    assert set(rows.errors) == {0, 1} and rows.errors[0].abs().max() > 1e-3
    torch.testing.assert_close(rows.total(), rows.value, rtol=1e-4, atol=1e-4)


def test_batched_across_prompts_equals_one_prompt_at_a_time(tiny_llama):
    tokenizer = build_tokenizer("left")
    transcoders = [make_transcoder(0, 0), make_transcoder(1, 1)]
    targets = [LogitTarget(17), FeatureTarget(1, 3, "last")]
    batched = attribution_rows(
        tiny_llama, tokenizer(PROMPTS, return_tensors="pt", padding=True), transcoders, targets
    )
    # rows of (prompt, target) in batches of 4 mix prompts and targets in one backward
    mixed = attribution_rows(
        tiny_llama,
        tokenizer(PROMPTS, return_tensors="pt", padding=True),
        transcoders,
        targets,
        batch_size=4,
    )
    torch.testing.assert_close(mixed.total(), batched.total(), rtol=1e-5, atol=1e-5)
    for layer in (0, 1):
        torch.testing.assert_close(
            mixed.features[layer], batched.features[layer], rtol=1e-4, atol=1e-6
        )
    width = batched.attention_mask.shape[1]
    for row, prompt in enumerate(PROMPTS):
        alone = attribution_rows(
            tiny_llama, tokenizer(prompt, return_tensors="pt"), transcoders, targets
        )
        n = alone.attention_mask.shape[1]  # left padding: the prompt is the last n positions
        torch.testing.assert_close(batched.value[row], alone.value[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            batched.embedding[row, :, width - n :], alone.embedding[0], rtol=1e-4, atol=1e-6
        )
        for layer in (0, 1):
            torch.testing.assert_close(
                batched.features[layer][row, :, width - n :],
                alone.features[layer][0],
                rtol=1e-4,
                atol=1e-6,
            )
            torch.testing.assert_close(
                batched.errors[layer][row, :, width - n :],
                alone.errors[layer][0],
                rtol=1e-4,
                atol=1e-6,
            )


def test_bad_graph_inputs_are_refused(tiny_llama):
    sae = Dictionary(
        W_enc=torch.zeros(64, 4),
        b_enc=torch.zeros(4),
        W_dec=torch.zeros(4, 64),
        b_dec=torch.zeros(64),
        activation="relu",
        reads="resid_out_0",
    )
    with pytest.raises(HookscopeError, match="need transcoders writing mlp_out"):
        attribution_rows(tiny_llama, PROMPTS[:1], [sae], [LogitTarget(1)])
    wrong_read = make_transcoder(0, 0)
    wrong_read.reads = "mlp_in_1"
    with pytest.raises(HookscopeError, match="reads mlp_in_l and writes"):
        attribution_rows(tiny_llama, PROMPTS[:1], [wrong_read], [LogitTarget(1)])
    with pytest.raises(HookscopeError, match="key it by its layer"):
        attribution_rows(tiny_llama, PROMPTS[:1], {1: make_transcoder(0, 0)}, [LogitTarget(1)])
    with pytest.raises(HookscopeError, match=r"layers with one: \[0\]"):
        attribution_rows(tiny_llama, PROMPTS[:1], [make_transcoder(0, 0)], [FeatureTarget(1, 0)])
    with pytest.raises(HookscopeError, match="has 40 features"):
        attribution_rows(tiny_llama, PROMPTS[:1], [make_transcoder(0, 0)], [FeatureTarget(0, 40)])
    with pytest.raises(HookscopeError, match="batch_size must be a positive int"):
        attribution_rows(
            tiny_llama, PROMPTS[:1], [make_transcoder(0, 0)], [LogitTarget(1)], batch_size=0
        )
    with pytest.raises(HookscopeError, match="exactly one token"):
        attribution_rows(
            tiny_llama, PROMPTS[:1], [make_transcoder(0, 0)], [FeatureTarget(0, 1, "all")]
        )


@pytest.mark.parametrize("family", ["qwen2", "gemma2", "gpt2", "gpt_neox"])
def test_edges_are_complete_on_families_with_biases_caps_and_parallel_blocks(family):
    """Qwen2's attention biases, GPT-2's LayerNorm / Conv1D biases and learned positions, and
    GPT-NeoX's biases are per-row bias leaves; Gemma2's final softcap is undone (the target is
    the logit before the cap)."""
    from tiny_models import build_model

    from hookscope import HookedModel

    hm = HookedModel.from_hf(build_model(family), build_tokenizer("left"))
    d_model = hm.model_map.d_model
    g = torch.Generator().manual_seed(0)
    transcoder = Dictionary(
        W_enc=torch.randn(d_model, 40, generator=g) * 0.3,
        b_enc=torch.randn(40, generator=g) * 0.1,
        W_dec=torch.randn(40, d_model, generator=g) * 0.1,
        b_dec=torch.randn(d_model, generator=g) * 0.1,
        activation="relu",
        reads="mlp_in_0",
        writes="mlp_out_0",
        subtract_decoder_bias=False,
    )
    batch = build_tokenizer("left")(PROMPTS, return_tensors="pt", padding=True)
    rows = attribution_rows(hm, batch, [transcoder], [LogitTarget(17)])
    torch.testing.assert_close(rows.total(), rows.value, rtol=1e-4, atol=1e-4)
    logits = hm.forward(batch, ["last"])["logits"][:, 0].float()
    cap = getattr(hm.hf_model.config, "final_logit_softcapping", None)
    if cap is not None:
        logits = cap * torch.atanh(logits / cap)
    torch.testing.assert_close(
        rows.value[:, 0], logits[:, 17] - logits.mean(-1), rtol=1e-4, atol=1e-4
    )
    if family != "gemma2":
        assert rows.bias.abs().max() > 1e-4  # the biases carry part of the logit
