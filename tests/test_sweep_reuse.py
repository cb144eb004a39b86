"""Sweeps that skip what a patch cannot change (hookscope.sweep_reuse): every family gives the
grid of the one-forward-per-site reference (Patch interventions on full forwards) and of the full
batched sweep, with left and right padding and examples of different lengths; the skipped work
is really skipped; features that rule it out fall back (or raise when it is required)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import FAMILIES, build_model, build_tokenizer, patching_pair

from hookscope import HookedModel, HookscopeError
from hookscope.interventions import Steer
from hookscope.patching import activation_patching

ANSWERS = (torch.tensor([5, 9]), torch.tensor([7, 11]))


def _padded_pair(side: str) -> tuple[dict, dict]:
    """Two examples of different lengths (padded on ``side``); the corrupt run differs at each
    example's second real token."""
    tokenizer = build_tokenizer(side)
    clean = dict(
        tokenizer(
            ["The cat sat on the mat", "Hello world and the dog"], return_tensors="pt", padding=True
        )
    )
    assert not clean["attention_mask"].bool().all()
    corrupt = {k: v.clone() for k, v in clean.items()}
    for row in range(2):
        first = int(clean["attention_mask"][row].argmax())
        corrupt["input_ids"][row, first + 1] = 100 + 20 * row
    return clean, corrupt


def _fast_and_loop(hm, clean, corrupt, **kwargs):
    """The sweep that skips unchanged work and the one-forward-per-site reference, unnormalised
    (a normalised grid divides float noise by clean - corrupt)."""
    common = dict(answers=ANSWERS, normalize=False, **kwargs)
    fast = activation_patching(hm, clean, corrupt, batch_size=5, skip_unchanged=True, **common)
    loop = activation_patching(hm, clean, corrupt, batched=False, **common)
    assert (fast.path, loop.path) == ("skip_unchanged", "looped")
    torch.testing.assert_close(fast.per_example, loop.per_example, rtol=0, atol=1e-5)
    assert fast.per_example.abs().max() > 1e-3  # the patches change something
    return fast


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_gives_the_reference_grid_under_left_padding(family):
    hm = HookedModel.from_hf(build_model(family), build_tokenizer("left"))
    clean, corrupt = _padded_pair("left")
    _fast_and_loop(hm, clean, corrupt, point="resid_out", per="layer", positions=[1, -1])
    common = dict(answers=ANSWERS, normalize=False, point="head", per="head", batch_size=3)
    fast = activation_patching(hm, clean, corrupt, skip_unchanged=True, **common)
    full = activation_patching(hm, clean, corrupt, skip_unchanged=False, **common)
    assert (fast.path, full.path) == ("skip_unchanged", "batched")
    torch.testing.assert_close(fast.per_example, full.per_example, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "point, positions",
    [("resid_out", None), ("resid_in", ["last"]), ("attn_out", [2]), ("mlp_out", [1, 3])],
)
@pytest.mark.parametrize("side", ["left", "right"])
def test_points_and_padding_sides_give_the_reference_grid(point, positions, side):
    hm = HookedModel.from_hf(build_model("gpt2"), build_tokenizer(side))  # absolute positions
    clean, corrupt = _padded_pair(side)
    _fast_and_loop(hm, clean, corrupt, point=point, per="layer", positions=positions)


@pytest.mark.parametrize(
    "point, per, metric",
    [
        ("resid_out", "position", "kl"),
        ("mlp_out", "position", "prob"),
        ("head", "head_position", "logit_diff"),
    ],
)
def test_layer_by_position_grids_and_metrics(tiny_llama, point, per, metric):
    clean, corrupt = patching_pair()
    _fast_and_loop(tiny_llama, clean, corrupt, point=point, per=per, metric=metric, layers=[1])


def _attention_work(hm, sweep) -> dict[int, int]:
    """Query rows x tokens each layer's attention computes during ``sweep()`` (counted by
    wrapping each attention module's ``forward``: a torch hook would make the sweep fall back)."""
    work = {index: 0 for index in range(hm.model_map.n_layers)}

    def counting(forward, index):
        def run(*args, **kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            work[index] += hidden.shape[:2].numel()
            return forward(*args, **kwargs)

        return run

    modules = [parts.attention for parts in hm.model_map.layers]
    for index, module in enumerate(modules):
        module.forward = counting(module.forward, index)
    try:
        sweep()
    finally:
        for module in modules:
            del module.forward
    return work


def test_layers_below_the_patch_and_positions_before_it_are_not_computed(tiny_llama):
    clean, corrupt = patching_pair()  # 2 examples x 7 tokens, 2 layers
    tokens = clean["input_ids"].shape[1]

    def sweep(skip):
        return lambda: activation_patching(
            tiny_llama, clean, corrupt, ANSWERS, point="resid_out", per="position",
            batch_size=7, skip_unchanged=skip,
        )  # fmt: skip

    full, fast = _attention_work(tiny_llama, sweep(False)), _attention_work(tiny_llama, sweep(True))
    # baselines (clean, corrupt, clean activations) and the one recorded corrupt run: 2 x 7 each
    assert fast[0] == 4 * 2 * tokens  # no sweep row runs layer 0 (resid_out_0 is replayed)
    sites = 2 * tokens  # per example: 2 layers x 7 positions
    assert full[0] == full[1] == 3 * 2 * tokens + 2 * sites * tokens
    # layer 1 runs only the rows patched at layer 0, from their position on (forwards of 7 rows
    # share the earliest position of their rows)
    assert 3 * 2 * tokens < fast[1] < full[1] // 2


def test_layers_are_restored_after_a_sweep(tiny_llama):
    clean, corrupt = patching_pair()
    activation_patching(tiny_llama, clean, corrupt, ANSWERS, point="attn_out", per="position")
    assert all("forward" not in parts.block.__dict__ for parts in tiny_llama.model_map.layers)


def test_registered_interventions_fall_back_to_the_full_sweep():
    hm = HookedModel.from_hf(build_model("llama"), build_tokenizer())
    clean, corrupt = patching_pair()
    hm.register_interventions(
        [Steer(point="resid_out_0", vector=torch.ones(64), positions=["all"])]
    )
    result = activation_patching(hm, clean, corrupt, ANSWERS, point="resid_out", per="position")
    assert result.path == "batched" and "registered interventions" in result.fallback
    loop = activation_patching(
        hm, clean, corrupt, ANSWERS, point="resid_out", per="position", batched=False
    )
    torch.testing.assert_close(result.per_example, loop.per_example, rtol=0, atol=1e-5)
    with pytest.raises(HookscopeError, match="registered interventions.*skip_unchanged=False"):
        activation_patching(hm, clean, corrupt, ANSWERS, skip_unchanged=True)


def test_a_torch_hook_from_outside_hookscope_falls_back_to_the_full_sweep():
    # before: the sweep replayed layer 0's recorded output through the block's __call__, so a
    # plain torch hook on it ran twice for replayed rows (grid off by ~0.9 here, no warning)
    hm = HookedModel.from_hf(build_model("llama"), build_tokenizer())
    clean, corrupt = patching_pair()

    def scale(module, args, output):
        return (output[0] * 1.5, *output[1:]) if isinstance(output, tuple) else output * 1.5

    handle = hm.model_map.layers[0].block.register_forward_hook(scale)
    try:
        result = activation_patching(hm, clean, corrupt, ANSWERS, point="attn_out")
        loop = activation_patching(hm, clean, corrupt, ANSWERS, point="attn_out", batched=False)
        assert result.path == "batched" and "outside hookscope" in result.fallback
        assert "model.layers.0" in result.fallback
        torch.testing.assert_close(result.per_example, loop.per_example, rtol=0, atol=1e-5)
        with pytest.raises(HookscopeError, match="outside hookscope.*skip_unchanged=False"):
            activation_patching(hm, clean, corrupt, ANSWERS, skip_unchanged=True)
    finally:
        handle.remove()
    assert activation_patching(hm, clean, corrupt, ANSWERS).path == "skip_unchanged"


def test_bad_skip_unchanged_requests_raise(tiny_llama):
    clean, corrupt = patching_pair()
    with pytest.raises(HookscopeError, match="needs batched=True"):
        activation_patching(tiny_llama, clean, corrupt, ANSWERS, batched=False, skip_unchanged=True)
    with pytest.raises(HookscopeError, match="None, True or False, got 'yes'"):
        activation_patching(tiny_llama, clean, corrupt, ANSWERS, skip_unchanged="yes")


def test_what_cannot_be_replayed_is_named():
    from types import SimpleNamespace

    from hookscope.sweep_reuse import _as_corrupt_run

    hidden = torch.zeros(2, 5, 4)
    layer = SimpleNamespace(keys=torch.zeros(2, 1, 5, 3), values=torch.zeros(2, 1, 5, 3))
    cache = SimpleNamespace(layers=[layer, layer])
    shape = torch.Size([2, 5])
    assert "no per-layer KV cache (NoneType)" in _as_corrupt_run(
        [hidden, hidden], None, shape, "cache"
    )
    extra = _as_corrupt_run([hidden, (hidden, torch.ones(1))], cache, shape, "cache")
    assert extra == "decoder layer 1 returns more than hidden states (2 items)"
    short = SimpleNamespace(layers=[layer, SimpleNamespace(keys=layer.keys[:, :, :3], values=None)])
    assert "every position" in _as_corrupt_run([hidden, hidden], short, shape, "cache")
    run = _as_corrupt_run([hidden, (hidden, None)], cache, shape, "cache")
    assert run.output_rest == [None, (None,)] and run.keys[1] is layer.keys
    assert torch.equal(run.layer_outputs[1], hidden)


def test_batch_sized_arguments_are_cut_to_the_computed_rows():
    from hookscope.sweep_reuse import _take_rows

    mask, cos = torch.zeros(4, 1, 3, 9), torch.zeros(1, 3, 8)
    positions = torch.arange(4)  # [q] with q == batch: not a batch tensor (one dimension)
    taken = _take_rows({"mask": mask, "emb": (cos, torch.zeros(4, 3, 8)), "pos": positions}, 4, 2)
    assert taken["mask"].shape == (2, 1, 3, 9) and taken["emb"][0] is cos
    assert taken["emb"][1].shape == (2, 3, 8) and taken["pos"] is positions


def test_vision_language_models_fall_back_to_the_full_sweep():
    from tiny_vlms import build_vlm

    vlm = build_vlm("llava")
    hm = HookedModel.from_hf(vlm.model, vlm.processor)
    clean = dict(vlm.processor.tokenizer(["a b c d e"], return_tensors="pt"))
    corrupt = {k: v.clone() for k, v in clean.items()}
    corrupt["input_ids"][0, 2] = 5
    answers = (torch.tensor([3]), torch.tensor([4]))
    result = activation_patching(hm, clean, corrupt, answers, per="layer", normalize=False)
    assert result.path == "batched" and "vision-language" in result.fallback
    loop = activation_patching(
        hm, clean, corrupt, answers, per="layer", normalize=False, batched=False
    )
    torch.testing.assert_close(result.per_example, loop.per_example, rtol=0, atol=1e-5)


def test_transformers_output_capturing_hooks_do_not_block_skipping():
    """After any HF call with output_hidden_states, transformers leaves its own recording hooks
    on the layers; the sweep took them for a user's hooks and refused (or fell back)."""
    hm = HookedModel.from_hf(build_model("llama"), build_tokenizer())
    clean, corrupt = patching_pair()
    with torch.no_grad():
        hm.hf_model(**clean, output_hidden_states=True)
    assert any(m._forward_hooks for m in hm.hf_model.modules())  # transformers' own
    fast = activation_patching(hm, clean, corrupt, ([5, 5], [6, 6]), skip_unchanged=True)
    full = activation_patching(hm, clean, corrupt, ([5, 5], [6, 6]), skip_unchanged=False)
    assert fast.path == "skip_unchanged"
    torch.testing.assert_close(fast.values, full.values, atol=1e-5, rtol=0)
