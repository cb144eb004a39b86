"""Head detectors and direct logit attribution on the embedded SmolLM2-135M: the induction heads
found by the detector carry induction (ablating them ruins the repeated half of a repeated random
sequence, ablating as many random heads does not), and the IOI logit difference is fully
attributed."""

from __future__ import annotations

import pytest
import torch

from hookscope import (
    Ablation,
    HookedModel,
    detect_heads,
    logit_attribution,
    repeated_random_tokens,
)

pytestmark = pytest.mark.real_model

IOI = "When Mary and John went to the store, John gave a drink to"
LENGTH = 20


@pytest.fixture(scope="module")
def smol():
    return HookedModel.from_pretrained()


def repeat_loss(hm: HookedModel, tokens: dict, heads: list[tuple[int, int]]) -> float:
    """Mean next-token loss on the repeated half (its tokens 2..LENGTH, which an induction head
    can predict) with ``heads`` zero-ablated at every position."""
    ablations = [Ablation(point=f"head_out_L{layer}H{head}") for layer, head in heads]
    logits = hm.forward(tokens, ["all"], interventions=ablations)["logits"].float()
    start = 1 + LENGTH  # BOS, then the first half
    predicted = logits[:, start : 2 * LENGTH].log_softmax(-1)
    actual = tokens["input_ids"][:, start + 1 : 2 * LENGTH + 1]
    return -predicted.gather(-1, actual[..., None]).mean().item()


def test_ablating_induction_heads_hurts_far_more_than_random_heads(smol):
    scores = detect_heads(smol, repeated_random_tokens(smol, n_examples=8, length=LENGTH, seed=0))
    top = [(layer, head) for layer, head, _ in scores.top("induction", 5)]
    assert top[0] == (18, 6) and scores["induction"][18, 6] > 0.8
    held_out = repeated_random_tokens(smol, n_examples=8, length=LENGTH, seed=1)
    base = repeat_loss(smol, held_out, [])
    induction = repeat_loss(smol, held_out, top) - base
    others = [(layer, head) for layer in range(30) for head in range(9) if (layer, head) not in top]
    generator = torch.Generator().manual_seed(0)
    random_rises = [
        repeat_loss(
            smol,
            held_out,
            [others[i] for i in torch.randperm(len(others), generator=generator)[:5]],
        )
        - base
        for _ in range(5)
    ]
    # measured: base 4.86, +4.82 for the top 5 induction heads, at most +0.34 for random sets
    assert induction > 3.0
    assert induction > 5 * max(random_rises), (induction, random_rises)


def test_ioi_logit_difference_is_attributed(smol):
    dla = logit_attribution(smol, IOI, " Mary", " John", per_head=True)
    clean = smol.forward(IOI, ["last"])["logits"][0, 0]
    mary, john = (
        smol.get_tokenizer()(t, add_special_tokens=False)["input_ids"][0]
        for t in (" Mary", " John")
    )
    torch.testing.assert_close(dla.total[0, 0], clean[mary] - clean[john], atol=1e-3, rtol=1e-4)
    assert float(dla.constant.abs().max()) == 0.0  # RMSNorm, no unembedding bias
    assert dla.top(1)[0][0] == "head_out_L23H3"
