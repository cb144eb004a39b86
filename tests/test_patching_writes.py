"""A sweep's patch writes: only the patched slots are written (no copy of the whole tensor)
where nothing but the model holds the tensor, with the values of the copying writes.

Ground truths: the same sweep with the copying writes (bit for bit; test_patching.py and
test_sweep_reuse.py compare the sweeps with the one-forward-per-site loop), and a snapshot of
each tensor a foreign hook kept, taken when it saw it.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import build_model, build_tokenizer, patching_pair

from hookscope import HookedModel
from hookscope import patching as patching_module
from hookscope.patching import activation_patching

ANSWERS = (torch.tensor([5, 9]), torch.tensor([7, 11]))
SWEEPS = [
    ("resid_out", "position"),
    ("resid_in", "position"),
    ("attn_out", "position"),
    ("mlp_out", "layer"),
    ("head", "head_position"),
]


@pytest.fixture(scope="module")
def hm():
    return HookedModel.from_hf(build_model("llama"), build_tokenizer())


@pytest.fixture
def write_modes(monkeypatch):
    """Records the ``in_place`` argument of every write hook a sweep builds."""
    modes, real = [], patching_module._write_hook

    def spy(site, rows, positions, values, in_place=False):
        modes.append(in_place)
        return real(site, rows, positions, values, in_place)

    monkeypatch.setattr(patching_module, "_write_hook", spy)
    return modes


@pytest.mark.parametrize(
    "point, per, skip_unchanged",
    [(point, per, False) for point, per in SWEEPS]  # the full batched sweep
    + [("resid_out", "position", True), ("head", "head_position", True)],  # the window sweep
)
def test_writing_the_slots_in_place_gives_the_copying_values(
    hm, point, per, skip_unchanged, write_modes, monkeypatch
):
    clean, corrupt = patching_pair()
    options = {"point": point, "per": per, "batch_size": 5, "skip_unchanged": skip_unchanged}
    in_place = activation_patching(hm, clean, corrupt, ANSWERS, **options)
    assert write_modes and all(write_modes)  # the slots were written into the module's tensor
    write_modes.clear()
    monkeypatch.setattr(patching_module, "_writes_in_place", lambda hm: False)
    copied = activation_patching(hm, clean, corrupt, ANSWERS, **options)
    assert write_modes and not any(write_modes)  # a copy of the whole tensor each time
    assert torch.equal(in_place.per_example, copied.per_example)  # bit for bit


def keeping_sweep(hm, monkeypatch=None, force_in_place=False):
    """A resid_out sweep of layer 0 with a persistent hook that keeps every output of layer 0
    it sees, beside a snapshot taken when it saw it. Returns (result, [(kept, snapshot)])."""
    if force_in_place:
        monkeypatch.setattr(patching_module, "_writes_in_place", lambda hm: True)
    kept = []

    def keep(module, args, out):
        tensor = out if isinstance(out, torch.Tensor) else out[0]
        kept.append((tensor, tensor.clone()))

    clean, corrupt = patching_pair()
    handle = hm.register_forward_hook("model.layers.0", keep)
    try:
        result = activation_patching(
            hm, clean, corrupt, ANSWERS, point="resid_out", per="position", layers=[0]
        )
    finally:
        hm.remove_hooks([handle])
    return result, kept


def test_a_tensor_a_foreign_hook_keeps_is_never_written(hm, write_modes, monkeypatch):
    result, kept = keeping_sweep(hm)
    assert write_modes and not any(write_modes)  # the hook could keep it: writes go to copies
    assert len(kept) > 3  # two baselines, the clean run, then the sweep's forwards
    assert all(torch.equal(tensor, snapshot) for tensor, snapshot in kept)
    clean, corrupt = patching_pair()
    plain = activation_patching(
        hm, clean, corrupt, ANSWERS, point="resid_out", per="position", layers=[0]
    )
    assert torch.equal(result.per_example, plain.per_example)
    # what the gate prevents: writing in place would change the tensors the hook kept
    forced, kept = keeping_sweep(hm, monkeypatch, force_in_place=True)
    assert not all(torch.equal(tensor, snapshot) for tensor, snapshot in kept)
    assert torch.equal(forced.per_example, plain.per_example)
