"""Attribution rows on the embedded SmolLM2-135M (30 layers): the edges into the " Paris" logit
sum to its real value, whatever the transcoders' quality (the error nodes carry the rest), so the
frozen replacement model is exact on a real model too. (One forward and one backward; feature
targets, padding and batching are checked on the tiny models.)"""

from __future__ import annotations

import pytest
import torch

from hookscope import HookedModel
from hookscope.dictionaries import Dictionary, LogitTarget, attribution_rows

pytestmark = pytest.mark.real_model


def _transcoder(layer: int, d_model: int = 576, d_sae: int = 128) -> Dictionary:
    g = torch.Generator().manual_seed(layer)
    return Dictionary(
        W_enc=torch.randn(d_model, d_sae, generator=g) * d_model**-0.5,
        b_enc=torch.zeros(d_sae),
        W_dec=torch.randn(d_sae, d_model, generator=g) * 0.05,
        b_dec=torch.zeros(d_model),
        activation="topk",
        k=16,
        reads=f"mlp_in_{layer}",
        writes=f"mlp_out_{layer}",
        subtract_decoder_bias=False,
        name=f"tc{layer}",
    )


def test_edges_into_paris_sum_to_the_real_logit():
    hm = HookedModel.from_pretrained()
    tokenizer = hm.get_tokenizer()
    batch = tokenizer("The capital of France is", return_tensors="pt")
    paris = tokenizer(" Paris", add_special_tokens=False)["input_ids"][0]
    transcoders = [_transcoder(layer) for layer in (3, 15, 27)]
    rows = attribution_rows(hm, batch, transcoders, [LogitTarget(paris)])
    scale = rows.value.abs().max()
    assert (rows.total() - rows.value).abs().max() <= 1e-4 * scale
    logits = hm.forward(batch, ["last"])["logits"][:, 0].float()
    expected = logits[:, paris] - logits.mean(-1)
    assert (rows.value[:, 0] - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert rows.features[15].abs().max() > 0 and rows.errors[0].abs().max() > 0
