"""ActivationCache: merging batches (also of different widths), stacking, saving, loading."""

from __future__ import annotations

import pytest
import torch
from tiny_models import PROMPTS, build_tokenizer

from hookscope import ActivationCache, ExtractionConfig, HookscopeError

CONFIG = ExtractionConfig(extract_resid_out=True, save_input_ids=True)


def test_merge_equal_layouts_equals_one_big_batch(tiny_llama):
    tokenizer = build_tokenizer("left")
    whole = tiny_llama.forward(
        tokenizer(PROMPTS, return_tensors="pt", padding=True), ["last", 0], extraction_config=CONFIG
    )
    merged = ActivationCache()
    for start in (0, 2):
        part = tokenizer(PROMPTS[start : start + 2], return_tensors="pt", padding=True)
        merged.cat(tiny_llama.forward(part, ["last", 0], extraction_config=CONFIG))
    assert merged["mapping_index"] == whole["mapping_index"]
    for key in ("resid_out_0", "resid_out_1", "logits", "position_mask"):
        torch.testing.assert_close(merged[key], whole[key], rtol=1e-5, atol=1e-5)


def test_merge_relays_variable_width_items():
    """Batch A has 'all' 3 wide, batch B 5 wide: A's rows are padded into the 5-wide layout."""
    a = ActivationCache(
        {
            "resid_out_0": torch.ones(1, 4, 2),
            "position_mask": torch.tensor([[True, True, True, True]]),
            "mapping_index": {"all": [0, 1, 2], "last": [3]},
            "input_ids": torch.tensor([[7, 8, 9]]),
        },
        pad_token_id=0,
    )
    b = ActivationCache(
        {
            "resid_out_0": 2 * torch.ones(1, 6, 2),
            "position_mask": torch.ones(1, 6, dtype=torch.bool),
            "mapping_index": {"all": [0, 1, 2, 3, 4], "last": [5]},
            "input_ids": torch.tensor([[1, 2, 3, 4, 5]]),
        }
    )
    merged = ActivationCache(pad_token_id=0).cat(a).cat(b)
    assert merged["mapping_index"] == {"all": [0, 1, 2, 3, 4], "last": [5]}
    assert merged["resid_out_0"][0, :, 0].tolist() == [1, 1, 1, 0, 0, 1]
    assert merged["resid_out_0"][1, :, 0].tolist() == [2] * 6
    assert merged["position_mask"][0].tolist() == [True, True, True, False, False, True]
    assert merged["input_ids"].tolist() == [[7, 8, 9, 0, 0], [1, 2, 3, 4, 5]]


def test_merge_refuses_different_items_or_keys():
    a = ActivationCache({"x": torch.ones(1, 1, 1), "mapping_index": {"last": [0]}})
    b = ActivationCache({"x": torch.ones(1, 1, 1), "mapping_index": {"first": [0]}})
    try:
        ActivationCache().cat(a).cat(b)["x"]
    except HookscopeError as error:
        assert "different position items" in str(error)
    else:
        raise AssertionError("merging different items must fail")


def test_refused_merge_consumes_nothing():
    """The merge drops each key's batch parts as it goes, so every reason to refuse it is
    checked first: after a refusal the cache still holds all its batches, untouched."""
    cache = ActivationCache({"x": torch.ones(1, 1, 2), "y": torch.zeros(1, 1, 1)})
    cache.cat({"x": torch.ones(1, 1, 3), "y": torch.zeros(1, 1, 1)})
    for _ in range(2):
        with pytest.raises(HookscopeError, match="'x'.*differ beyond the batch axis"):
            cache["y"]
    assert [list(part["x"].shape) for part in [cache._data, *cache._pending]] == [
        [1, 1, 2],
        [1, 1, 3],
    ]


def test_reorder_rows_in_place_equals_take():
    parts = [{"x": torch.arange(3.0 * k, 3.0 * k + 3).view(3, 1, 1)} for k in range(2)]
    saver = {"batch_saver": {"label": ["a", "b", "c"]}}
    cache = ActivationCache({**parts[0], **saver}).cat({**parts[1], **saver})
    rows = torch.tensor([5, 0, 3])
    taken = cache.take(rows)
    assert cache.reorder_rows(rows) is cache
    assert cache["x"].flatten().tolist() == [5.0, 0.0, 3.0] == taken["x"].flatten().tolist()
    assert cache["batch_saver"]["label"] == ["c", "a", "a"] == taken["batch_saver"]["label"]


def test_stack_orders_layers(tiny_llama):
    cache = tiny_llama.forward(PROMPTS[0], ["last"], extraction_config=CONFIG)
    stacked = cache.stack("resid_out")
    assert stacked.shape == (2, 1, 1, 64)
    assert torch.equal(stacked[1], cache["resid_out_1"])


def test_save_load_round_trip(tmp_path, tiny_llama):
    tokenizer = build_tokenizer()
    cache = tiny_llama.extract_cache(
        [
            tokenizer(PROMPTS[:2], return_tensors="pt", padding=True)
            | {"label": torch.tensor([3, 4])}
        ],
        [(0, 2), "last"],
        extraction_config=CONFIG,
        batch_saver=lambda batch: {"label": batch["label"], "names": ["a", "b"]},
    )
    path = cache.save(tmp_path / "acts" / "cache.safetensors")
    loaded = ActivationCache.load(path)
    assert loaded["mapping_index"] == {(0, 2): [0, 1], "last": [2]}
    assert loaded["batch_saver"]["names"] == ["a", "b"]
    assert torch.equal(loaded["batch_saver"]["label"], torch.tensor([3, 4]))
    for key, value in cache.tensors().items():
        assert torch.equal(loaded[key], value), key
    assert not list(tmp_path.glob("acts/.*tmp")), "no temporary file is left behind"


def test_repr_memory_and_to(tiny_llama):
    cache = tiny_llama.forward(PROMPTS[0], ["last"], extraction_config=CONFIG)
    expected = sum(v.numel() * v.element_size() for v in cache.tensors().values())
    assert cache.memory_size() == expected
    text = repr(cache)
    assert "resid_out_1" in text and "[1, 1, 64] float32" in text and "mapping_index" in text
    assert cache.to("cpu")["resid_out_0"].device.type == "cpu"
    assert len(cache) == len(list(cache.keys())) and "logits" in cache
