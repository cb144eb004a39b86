"""Residual decomposition, the frozen final norm, direct logit attribution and head detectors,
each checked against an independent ground truth: the final norm's input read by a plain torch
hook, HF ``output_hidden_states`` and logits, and scores computed by loops from eager
``output_attentions`` of the same weights."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close_to_scale
from tiny_models import FAMILIES, PROMPTS, build_model, build_tokenizer

from hookscope import HookedModel, HookscopeError
from hookscope.analysis import (
    decompose_resid,
    detect_heads,
    frozen_norm,
    logit_attribution,
    repeated_random_tokens,
)

TARGETS = ["last", 0, 2]


def _reference(hm: HookedModel, batch: dict) -> tuple[torch.Tensor, list, torch.Tensor]:
    """``(final-norm input [batch, seq, d], hidden states, logits)`` of the plain HF forward,
    the final norm's input read by a torch hook of the test's own."""
    seen = {}

    def read_input(_module, args):
        seen["x"] = args[0].detach()  # returns None: the forward is unchanged

    handle = hm.model_map.final_norm.register_forward_pre_hook(read_input)
    try:
        with torch.no_grad():
            out = hm.hf_model(**batch, output_hidden_states=True)
    finally:
        handle.remove()
    return seen["x"].float(), out.hidden_states, out.logits.float()


def _at_targets(hm: HookedModel, batch: dict, values: torch.Tensor) -> torch.Tensor:
    """``values [batch, seq, ...]`` at TARGETS per example: last real token, 0th, 2nd real."""
    rows = []
    for b, mask in enumerate(batch["attention_mask"].bool()):
        real = mask.nonzero().flatten()
        rows.append(values[b, [int(real[-1]), int(real[0]), int(real[2])]])
    return torch.stack(rows)


def _hooked(family: str, padding_side: str = "right") -> tuple[HookedModel, dict]:
    hm = HookedModel.from_hf(build_model(family), build_tokenizer(padding_side))
    return hm, hm.prepare_inputs(PROMPTS)


@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_decomposition_sums_to_the_residual(family, per_head):
    hm, batch = _hooked(family)
    parts = decompose_resid(hm, batch, TARGETS, per_head=per_head)
    final, hidden, _ = _reference(hm, batch)
    expected = _at_targets(hm, batch, final)
    assert_close_to_scale(parts.components.sum(0), expected, msg=family)
    assert_close_to_scale(parts.residual, expected, msg=family)
    # the residual entering each layer (HF hidden_states[l]) is the sum of what came before
    accumulated = parts.accumulated()
    for layer in range(hm.model_map.n_layers):
        truth = _at_targets(hm, batch, hidden[layer].float())
        assert_close_to_scale(accumulated[layer], truth, msg=f"{family} layer {layer}")
    assert parts.labels[0] == "embed" and ("pos_embed" in parts.labels) == (family == "gpt2")
    if family == "gpt2":  # token embedding + position embedding, the latter GPT-2's wpe
        ids = _at_targets(hm, batch, batch["input_ids"][..., None])[..., 0]
        token = hm.hf_model.transformer.wte(ids).detach()
        assert_close_to_scale(parts["embed"], token)


@pytest.mark.parametrize("family", ["llama", "gemma2", "olmo2", "gpt2", "gpt_neox"])
def test_decomposition_at_a_middle_layer_is_hidden_states(family):
    hm, batch = _hooked(family)
    _, hidden, _ = _reference(hm, batch)
    for layer in (0, 1):
        parts = decompose_resid(hm, batch, TARGETS, layer=layer, per_head=True)
        truth = _at_targets(hm, batch, hidden[layer].float())
        assert_close_to_scale(parts.components.sum(0), truth, msg=f"{family} layer {layer}")


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "gpt_neox", "gemma2", "olmo2"])
def test_heads_plus_output_bias_are_what_attention_adds(family):
    hm, batch = _hooked(family)
    per_head = decompose_resid(hm, batch, TARGETS, per_head=True)
    per_layer = decompose_resid(hm, batch, TARGETS)
    has_bias = getattr(hm.model_map.layers[0].attention, hm.model_map.spec.o_proj).bias is not None
    assert ("attn_bias_0" in per_head.labels) == has_bias == (family in ("gpt2", "gpt_neox"))
    for layer in range(hm.model_map.n_layers):
        heads = [
            per_head[label]
            for label, at in zip(per_head.labels, per_head.layer_of, strict=True)
            if at == layer and not label.startswith("mlp_out")
        ]
        attn = next(
            label
            for label, at in zip(per_layer.labels, per_layer.layer_of, strict=True)
            if at == layer and label.startswith("attn_out")
        )
        assert_close_to_scale(torch.stack(heads).sum(0), per_layer[attn], msg=f"{family} {layer}")


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2", "gpt_neox", "olmo2"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_padded_equals_one_by_one(family, padding_side):
    hm, batch = _hooked(family, padding_side)
    padded = decompose_resid(hm, PROMPTS, TARGETS, per_head=True)
    attribution = logit_attribution(
        hm, PROMPTS, answer=5, against=7, target_token_positions=TARGETS
    )
    for i, prompt in enumerate(PROMPTS):
        alone = decompose_resid(hm, [prompt], TARGETS, per_head=True)
        assert alone.labels == padded.labels
        assert_close_to_scale(padded.components[:, i], alone.components[:, 0], msg=prompt)
        one = logit_attribution(hm, [prompt], answer=5, against=7, target_token_positions=TARGETS)
        assert_close_to_scale(attribution.values[:, i], one.values[:, 0], rtol=1e-4, msg=prompt)


def _model_logits(hm: HookedModel, logits: torch.Tensor) -> torch.Tensor:
    """The logits before any final softcapping (Gemma2: ``cap * atanh(logit / cap)``)."""
    cap = getattr(hm.hf_model.config.get_text_config(), "final_logit_softcapping", None)
    return cap * torch.atanh(logits / cap) if cap else logits


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_attributions_sum_to_the_logit_minus_the_constant_terms(family):
    hm, batch = _hooked(family)
    _, _, logits = _reference(hm, batch)
    logits = _at_targets(hm, batch, _model_logits(hm, logits))
    answer, other = [11, 12, 13, 14], 40
    for per_head in (False, True):
        result = logit_attribution(hm, batch, answer, other, TARGETS, per_head=per_head)
        expected = logits[torch.arange(4), :, answer] - logits[..., other]
        assert_close_to_scale(result.values.sum(0), result.total)
        assert_close_to_scale(result.total + result.constant, expected, rtol=1e-4, msg=family)
    # the constant terms, stated: the final norm's bias through W_U[a] - W_U[b], plus the
    # unembedding bias; zero for RMSNorm families without an unembedding bias
    norm, unembed = hm.model_map.final_norm, hm.hf_model.get_output_embeddings()
    w = unembed.weight.detach().float()
    bias = getattr(norm, "bias", None)
    stated = torch.zeros(4)
    if bias is not None:
        stated = (w[answer] - w[other]) @ bias.detach().float()
    if unembed.bias is not None:
        stated = stated + unembed.bias[answer] - unembed.bias[other]
    torch.testing.assert_close(result.constant, stated.float()[:, None].expand(4, 3))
    assert (bias is not None) == (family in ("gpt2", "gpt_neox", "gpt_neox_sequential"))


def test_one_logit_and_a_direction_agree(tiny_llama):
    batch = tiny_llama.prepare_inputs(PROMPTS)
    _, _, logits = _reference(tiny_llama, batch)
    one = logit_attribution(tiny_llama, batch, 9, target_token_positions=TARGETS)
    assert_close_to_scale(one.total, _at_targets(tiny_llama, batch, logits)[..., 9], rtol=1e-4)
    direction = tiny_llama.hf_model.get_output_embeddings().weight[9].detach()
    along = logit_attribution(tiny_llama, batch, direction, target_token_positions=TARGETS)
    torch.testing.assert_close(along.values, one.values)
    # a one-token string is that token
    text = tiny_llama.to_string_tokens([9])[0]
    assert torch.equal(logit_attribution(tiny_llama, batch, text, None, TARGETS).values, one.values)


def test_one_position_item_is_one_slot(tiny_llama):
    one = logit_attribution(tiny_llama, PROMPTS, 9, target_token_positions="last")
    listed = logit_attribution(tiny_llama, PROMPTS, 9, target_token_positions=["last"])
    assert one.values.shape[2] == 1
    torch.testing.assert_close(one.values, listed.values)


def test_result_prints_and_ranks_components(tiny_llama, tmp_path):
    result = logit_attribution(tiny_llama, PROMPTS, 9, 10, per_head=True)
    top = result.top(3)
    mean = result.mean()
    assert abs(top[0][1]) == pytest.approx(float(mean.abs().max()))
    assert top[0][0] in str(result)
    heads = result.heads()
    assert heads.shape == (2, 4)
    assert heads[1, 2].item() == pytest.approx(mean[result.labels.index("head_out_L1H2")].item())
    figure = result.plot(tmp_path / "dla.png")
    assert (tmp_path / "dla.png").stat().st_size > 1000
    shown = figure.axes[0].images[0].get_array()  # the heatmap holds heads()
    assert torch.allclose(torch.as_tensor(shown.data), heads)
    per_layer = logit_attribution(tiny_llama, PROMPTS, 9, 10)
    grid = torch.as_tensor(per_layer.plot().axes[0].images[0].get_array().data)
    mean = per_layer.mean()
    assert grid[1, 0] == pytest.approx(mean[per_layer.labels.index("attn_out_1")].item())
    assert grid[0, 1] == pytest.approx(mean[per_layer.labels.index("mlp_out_0")].item())


def test_frozen_norm_of_each_kind():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16) * 4 + 1
    layer_norm = torch.nn.LayerNorm(16)
    torch.nn.init.normal_(layer_norm.weight)
    torch.nn.init.normal_(layer_norm.bias)
    frozen = frozen_norm(layer_norm, x)
    assert frozen.centre and torch.equal(frozen.bias, layer_norm.bias.detach())
    parts = torch.stack([x * 0.25, x * 0.75])
    # images of the parts sum to the norm minus its bias; each is centred and scaled
    torch.testing.assert_close(
        frozen.apply(parts, x).sum(0), layer_norm(x).detach() - layer_norm.bias.detach()
    )
    x = torch.randn(3, 5, 64) * 4 + 1
    gemma = build_model("gemma").model.norm
    frozen = frozen_norm(gemma, x)
    torch.testing.assert_close(frozen.gain, 1 + gemma.weight.detach())
    llama = build_model("llama").model.norm
    assert torch.equal(frozen_norm(llama, x).gain, llama.weight.detach())

    class Doubler(torch.nn.Module):
        weight = None

        def forward(self, x):
            return 2 * x

    with pytest.raises(HookscopeError, match="Doubler is not an RMSNorm"):
        frozen_norm(Doubler(), x)


def test_bad_inputs_raise(tiny_llama):
    with pytest.raises(HookscopeError, match="layer 3 is out of range: choose 0..2"):
        decompose_resid(tiny_llama, PROMPTS[0], layer=3)
    with pytest.raises(HookscopeError, match="2 answers for 4 examples"):
        logit_attribution(tiny_llama, PROMPTS, [1, 2])
    with pytest.raises(HookscopeError, match="tokens .*give one token"):
        logit_attribution(tiny_llama, PROMPTS, "The cat sat")
    with pytest.raises(HookscopeError, match="per_head=True"):
        logit_attribution(tiny_llama, PROMPTS, 3).heads()
    with pytest.raises(HookscopeError, match=r"got shape \(7,\)"):
        logit_attribution(tiny_llama, PROMPTS, torch.zeros(7))
    with pytest.raises(HookscopeError, match=r"\[batch=4, d_model\] .*got shape \(3, 64\)"):
        logit_attribution(tiny_llama, PROMPTS, torch.zeros(3, 64))
    with pytest.raises(HookscopeError, match="no component 'mlp_out_9'"):
        decompose_resid(tiny_llama, PROMPTS[0])["mlp_out_9"]


# -- head detectors ----------------------------------------------------------------------------


def _scores_by_loops(attentions, ids: torch.Tensor, mask: torch.Tensor) -> dict:
    """The three scores from eager ``output_attentions`` ``[batch, heads, seq, seq]`` per layer,
    by explicit loops over the real tokens of each example."""
    n_layers, n_heads = len(attentions), attentions[0].shape[1]
    sums = {n: torch.zeros(n_layers, n_heads, dtype=torch.float64) for n in ("p", "d", "i")}
    counts = dict.fromkeys(sums, 0)
    for b in range(ids.shape[0]):
        real = mask[b].nonzero().flatten().tolist()
        toks = {p: int(ids[b, p]) for p in real}
        for qi, q in enumerate(real):
            targets = {
                "p": [real[qi - 1]] if qi > 0 else [],
                "d": [k for k in real[:qi] if toks[k] == toks[q]],
                "i": [real[j + 1] for j in range(qi - 1) if toks[real[j]] == toks[q]],
            }
            for name, keys in targets.items():
                if not keys:
                    continue
                counts[name] += 1
                for layer, pattern in enumerate(attentions):
                    sums[name][layer] += pattern[b, :, q, keys].double().sum(-1)
    return {n: (sums[n] / counts[n]).float() for n in sums}


def _eager_scores(family: str, batch: dict) -> dict:
    eager = build_model(family, attn_implementation="eager")
    with torch.no_grad():
        attentions = eager(**batch, output_attentions=True).attentions
    return _scores_by_loops(attentions, batch["input_ids"], batch["attention_mask"])


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_text", "gpt2", "gpt_neox", "phi3"])
def test_head_scores_equal_eager_patterns(family):
    hm = HookedModel.from_hf(build_model(family), build_tokenizer("left"))
    assert hm.hf_model.config._attn_implementation == "sdpa"
    tokens = repeated_random_tokens(hm, n_examples=5, length=7, seed=3)
    scores = detect_heads(hm, tokens, batch_size=2)
    truth = _eager_scores(family, tokens)
    for ours, name in (("previous_token", "p"), ("duplicate_token", "d"), ("induction", "i")):
        torch.testing.assert_close(scores[ours], truth[name], atol=1e-5, rtol=0)
    # every query of the repeated half (after the BOS) has a duplicate and an induction target
    assert scores.queries["induction"] == 5 * 7
    # user prompts, left-padded, batched
    prompts = [PROMPTS[0] + " " + PROMPTS[0], PROMPTS[1], PROMPTS[2]]
    batch = hm.prepare_inputs(prompts)
    scores = detect_heads(hm, prompts, batch_size=2)
    truth = _eager_scores(family, batch)  # with the padding-correct position ids
    for ours, name in (("previous_token", "p"), ("duplicate_token", "d"), ("induction", "i")):
        torch.testing.assert_close(scores[ours], truth[name], atol=1e-5, rtol=0)


def test_repeated_random_tokens_and_top(tiny_llama):
    tokens = repeated_random_tokens(tiny_llama, n_examples=3, length=6, seed=1)
    ids = tokens["input_ids"]
    assert ids.shape == (3, 13) and torch.equal(ids[:, 1:7], ids[:, 7:])
    assert (ids[:, 0] == 1).all() and not torch.isin(ids[:, 1:], torch.tensor([0, 1, 2])).any()
    scores = detect_heads(tiny_llama, tokens)
    (layer, head, value), *_ = scores.top("induction", 2)
    assert value == pytest.approx(scores["induction"].max().item())
    assert scores["induction"][layer, head] == value
    assert f"L{layer}H{head}" in str(scores)
    with pytest.raises(HookscopeError, match="no detector 'copying'"):
        scores["copying"]


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma"])
def test_attribution_in_bfloat16(family):
    """A half-precision model: the frozen norm casts its probe to the norm's dtype (LayerNorm
    refuses mixed dtypes) and the attributions still sum to the model's logit difference."""
    hm = HookedModel.from_hf(build_model(family).to(torch.bfloat16), build_tokenizer())
    batch = hm.prepare_inputs(PROMPTS)
    _, _, logits = _reference(hm, batch)
    result = logit_attribution(hm, batch, 11, 40, TARGETS, per_head=True)
    expected = _at_targets(hm, batch, logits)
    # bfloat16 keeps ~3 significant digits: 2e-2 of scale
    assert_close_to_scale(
        result.total + result.constant, expected[..., 11] - expected[..., 40], rtol=2e-2
    )
