"""Adversarial review of the one call pipeline (issue 14): inputs that used to give a wrong
number silently, or a confusing failure, each checked against plain HF."""

from __future__ import annotations

import pytest
import torch
from conftest import hook_snapshot
from tiny_models import build_model, build_tokenizer

from hookscope import HookedModel, HookscopeError
from hookscope.interventions import Steer

LONG = "The capital of France is Paris and the capital"


@pytest.fixture(scope="module")
def hm():
    return HookedModel.from_hf(build_model("llama"), build_tokenizer())


def test_a_call_inside_a_hook_of_a_call_on_the_same_model_is_refused(hm):
    """hm.forward inside a user hook used to run with the outer call's hooks and interventions
    still installed: the outer Steer silently changed the inner logits (by ~4)."""
    steer = Steer(point="resid_out_0", positions=["all"], vector=torch.full((64,), 3.0))
    seen: dict[str, BaseException] = {}

    def nested(module, args, output):
        if "error" not in seen:
            try:
                hm.forward(LONG, ["all"])
                seen["error"] = AssertionError("the nested call ran")
            except HookscopeError as error:
                seen["error"] = error

    before = hook_snapshot(hm.hf_model)
    outer = hm.forward(
        "The cat sat",
        ["last"],
        interventions=[steer],
        hooks=[{"component": "model.layers[0].mlp", "intervention": nested}],
    )
    assert isinstance(seen["error"], HookscopeError), seen["error"]
    assert "inside another one" in str(seen["error"])
    # the outer call is unaffected and the model is free and clean afterwards
    alone = hm.forward("The cat sat", ["last"], interventions=[steer])
    torch.testing.assert_close(outer["logits"], alone["logits"], rtol=0, atol=0)
    assert hook_snapshot(hm.hf_model) == before
    plain = hm.hf_model(**hm.prepare_inputs(LONG)).logits
    assert torch.equal(hm.forward(LONG, ["all"])["logits"][0], plain[0])
