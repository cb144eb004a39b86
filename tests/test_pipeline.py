"""One call pipeline: every entry point sees the same interventions, and attention is scoped to
the model that runs (two models in two threads do not interfere)."""

from __future__ import annotations

import threading

import pytest
import torch
from tiny_models import build_model, build_tokenizer, patching_pair

from hookscope import ExtractionConfig, HookedModel, HookscopeError
from hookscope.interventions import Ablation, PatternEdit, Steer
from hookscope.patching import activation_patching

ANSWERS = (torch.tensor([5, 9]), torch.tensor([7, 11]))
SWEEPS = [
    (point, per)
    for point in ("resid_in", "resid_out", "attn_out", "mlp_out")
    for per in ("position", "layer")
] + [("head", "head"), ("head", "head_position")]
# one of each kind of registered intervention, at every position (text points and a pattern edit)
REGISTERED = [
    [Ablation(point="mlp_out_0", positions=["all"])],
    [Steer(point="resid_out_0", positions=["all"], vector=torch.full((64,), 0.3))],
    [PatternEdit(layer=1, heads=[0, 2], key_positions=[0], op="zero", renormalize=True)],
]


@pytest.fixture(scope="module")
def hm():
    return HookedModel.from_hf(build_model("llama"), build_tokenizer())


@pytest.mark.parametrize("registered", range(len(REGISTERED)))
@pytest.mark.parametrize("point, per", SWEEPS)
def test_batched_equals_looped_with_registered_interventions(hm, point, per, registered):
    clean, corrupt = patching_pair()
    plain = activation_patching(hm, clean, corrupt, ANSWERS, point=point, per=per, layers=[1])
    hm.register_interventions(REGISTERED[registered])
    try:
        fast = activation_patching(
            hm, clean, corrupt, ANSWERS, point=point, per=per, layers=[1], batch_size=5
        )
        slow = activation_patching(
            hm, clean, corrupt, ANSWERS, point=point, per=per, layers=[1], batched=False
        )
        # the baselines are the intervened model's: the same as a forward with it registered
        logits = hm.forward(clean, ["last"])["logits"][:, 0]
    finally:
        hm.clean_interventions()
    torch.testing.assert_close(fast.per_example, slow.per_example, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.clean_metric, slow.clean_metric)
    rows = torch.arange(2)
    torch.testing.assert_close(
        fast.clean_metric, logits[rows, ANSWERS[0]] - logits[rows, ANSWERS[1]]
    )
    # and the intervention matters, so the equalities above are not vacuous
    assert not torch.allclose(fast.clean_metric, plain.clean_metric)


def test_forward_generate_and_sweep_agree_on_one_intervention(hm):
    clean, corrupt = patching_pair()
    steer = Steer(point="resid_out_0", positions=["all"], vector=torch.full((64,), 0.5))
    hm.register_interventions([steer])
    try:
        forward = hm.forward(clean, ["last"])["logits"][:, 0]
        generated = hm.generate(
            clean,
            max_new_tokens=1,
            do_sample=False,
            extraction_config=ExtractionConfig(save_logits=True),
        )
        sweep = activation_patching(
            hm, clean, corrupt, ANSWERS, point="resid_out", per="layer", layers=[1]
        )
    finally:
        hm.clean_interventions()
    per_call = hm.forward(clean, ["last"], interventions=[steer])["logits"][:, 0]
    torch.testing.assert_close(forward, per_call, rtol=0, atol=0)
    torch.testing.assert_close(generated["generated_logits"][:, 0], forward, rtol=1e-5, atol=1e-5)
    rows = torch.arange(2)
    torch.testing.assert_close(
        sweep.clean_metric, forward[rows, ANSWERS[0]] - forward[rows, ANSWERS[1]]
    )


def _pattern_config():
    return ExtractionConfig(extract_attn_pattern=True, attn_pattern_all_keys=True, layers=[1])


def test_two_models_in_threads_do_not_interfere():
    """A thread extracts patterns in a loop from model A while model B (another family, another
    kernel) runs plain in the main thread: B's outputs stay bit-identical to its plain HF
    forward, A's patterns equal eager output_attentions, and neither waits on a global lock."""
    tokenizer = build_tokenizer()
    batch = tokenizer(["The cat sat on the mat", "Hello"], return_tensors="pt", padding=True)
    a = HookedModel.from_hf(build_model("llama"), tokenizer)
    b_model = build_model("gpt2", attn_implementation="eager")
    b = HookedModel.from_hf(b_model, tokenizer)
    with torch.no_grad():
        b_reference = b_model(**batch).logits
        eager = build_model("llama", attn_implementation="eager")
        expected = eager(**batch, output_attentions=True).attentions[1][:, 0]
    errors: list[BaseException] = []
    stop = threading.Event()
    patterns = []

    def extract_in_a_loop():
        try:
            while not stop.is_set() or not patterns:
                cache = a.forward(batch, ["all"], extraction_config=_pattern_config())
                patterns.append(cache["pattern_L1H0"])
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    thread = threading.Thread(target=extract_in_a_loop)
    thread.start()
    try:
        for _ in range(30):
            assert torch.equal(b.forward(batch)["logits"], b.forward(batch)["logits"])
            assert torch.equal(b.forward(batch, ["all"])["logits"][0, :6], b_reference[0, :6])
            with torch.no_grad():
                assert torch.equal(b_model(**batch).logits, b_reference)
    finally:
        stop.set()
        thread.join()
    assert not errors, errors
    mask = batch["attention_mask"].bool()
    for pattern in patterns:
        for row in range(2):
            real = mask[row]
            got = pattern[row][: int(real.sum())][:, real]
            want = expected[row][real][:, real]
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # A's own model is back on its kernel: nothing of hookscope's is left switched on
    assert a.hf_model.config._attn_implementation == "sdpa"


def test_attention_scope_touches_only_the_wrapped_model(hm):
    other = build_model("llama")
    seen = {}

    def look(module, args, output):
        seen["other"] = other.config._attn_implementation
        seen["self"] = hm.hf_model.config._attn_implementation

    hm.forward(
        "The cat sat",
        ["last"],
        extraction_config=ExtractionConfig(extract_attn_pattern=True),
        hooks=[{"component": "model.layers[0].mlp", "intervention": look}],
    )
    assert seen == {"other": "sdpa", "self": "hookscope+sdpa"}
    assert hm.hf_model.config._attn_implementation == "sdpa"


def test_concurrent_calls_on_one_model_get_a_clear_error(hm):
    entered, release = threading.Event(), threading.Event()

    def block(module, args, output):
        entered.set()
        release.wait(10)

    thread = threading.Thread(
        target=lambda: hm.forward(
            "The cat sat", ["last"], hooks=[{"component": "model.layers[0]", "intervention": block}]
        )
    )
    thread.start()
    try:
        assert entered.wait(10)
        with pytest.raises(HookscopeError, match="another thread"):
            hm.forward("Hello", ["last"])
    finally:
        release.set()
        thread.join()
    hm.forward("Hello", ["last"])  # free again afterwards


def test_scope_restored_when_the_forward_raises(hm):
    def boom(module, args, output):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        hm.forward(
            "The cat sat",
            ["last"],
            extraction_config=ExtractionConfig(extract_attn_pattern=True),
            hooks=[{"component": "model.layers[0].mlp", "intervention": boom}],
        )
    assert hm.hf_model.config._attn_implementation == "sdpa"
    plain = hm.hf_model(**hm.prepare_inputs("The cat sat")).logits
    assert torch.equal(hm.forward("The cat sat")["logits"][0], plain[0])
