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


# -- nothing is lost or merged wrongly (issue 15, item 9) ---------------------------------------
def test_save_keeps_every_key_or_names_the_one_it_cannot(tmp_path):
    cache = ActivationCache(
        {
            "x": torch.arange(6.0).view(2, 3, 1),
            "mapping_index": ["last", 0],  # a list, as a hand-made cache may hold
            "text": ["a b", "c"],
            "attn_pattern_row_mapping_index": {(0, 2): [0, 1], "last": [2], 3: [3]},
        }
    )
    loaded = ActivationCache.load(cache.save(tmp_path / "c.safetensors"))
    assert sorted(loaded.keys()) == sorted(cache.keys())
    assert loaded["mapping_index"] == ["last", 0] and loaded["text"] == ["a b", "c"]
    assert loaded["attn_pattern_row_mapping_index"] == {(0, 2): [0, 1], "last": [2], 3: [3]}
    assert torch.equal(loaded["x"], cache["x"])
    cache["plan"] = object()
    with pytest.raises(HookscopeError, match="cannot save 'plan': it holds a object"):
        cache.save(tmp_path / "d.safetensors")
    assert not (tmp_path / "d.safetensors").exists()


def test_appending_a_batch_with_other_keys_fails_at_once_naming_them():
    cache = ActivationCache({"x": torch.ones(1, 1, 2), "y": torch.zeros(1, 1, 1)})
    with pytest.raises(HookscopeError, match=r"missing \['y'\], extra \['z'\]"):
        cache.cat({"x": torch.ones(1, 1, 2), "z": torch.zeros(1, 1, 1)})
    assert torch.equal(cache["x"], torch.ones(1, 1, 2)) and sorted(cache) == ["x", "y"]


def test_incompatible_shapes_name_the_key_and_the_shapes():
    same_layout = {"mapping_index": {"all": [0, 1]}}
    cache = ActivationCache({"x": torch.ones(1, 2, 3), **same_layout})
    cache.cat({"x": torch.ones(1, 3, 3), **same_layout})  # 3 slots under a 2-slot layout
    with pytest.raises(HookscopeError, match=r"'x': batch shapes \[\[1, 2, 3\], \[1, 3, 3\]\]"):
        cache["x"]
    saver = ActivationCache({"x": torch.ones(1, 1, 1), "batch_saver": {"v": torch.ones(1, 2)}})
    saver.cat({"x": torch.ones(1, 1, 1), "batch_saver": {"v": torch.ones(1, 4)}})
    with pytest.raises(
        HookscopeError, match=r"batch_saver\['v'\]: batch shapes \[\[1, 2\], \[1, 4\]\]"
    ):
        saver["x"]


@pytest.mark.parametrize("sort_by_length", [False, True])
def test_records_keep_their_labels_in_order(tiny_llama, sort_by_length):
    texts = PROMPTS * 2
    records = [{"text": text, "label": index} for index, text in enumerate(texts)]
    seen = []

    def keep(batch):
        seen.append(batch)
        return {"label": torch.tensor([record["label"] for record in batch])}

    tiny_llama.config.batch_size = 3
    try:
        cache = tiny_llama.extract_cache(
            records,
            ["last"],
            extraction_config=CONFIG,
            batch_saver=keep,
            sort_by_length=sort_by_length,
        )
        plain = tiny_llama.extract_cache(texts, ["last"], extraction_config=CONFIG)
    finally:
        tiny_llama.config.batch_size = 8
    assert all(isinstance(batch, list) and "text" in batch[0] for batch in seen)
    assert cache["batch_saver"]["label"].tolist() == list(range(len(texts)))
    torch.testing.assert_close(cache["resid_out_1"], plain["resid_out_1"], rtol=1e-5, atol=1e-5)


def test_a_record_without_text_is_named(tiny_llama):
    from hookscope import InputError

    with pytest.raises(InputError, match="record 1 has no string 'text' field"):
        tiny_llama.extract_cache([{"text": "a"}, {"txt": "b"}], ["last"])


def test_mean_ablation_from_a_cache_at_other_positions(tiny_llama):
    """One slot per example: one mean vector, used at any positions. Several slots: the layouts
    must agree (else a clear error), and the means apply slot by slot."""
    from hookscope.interventions import Ablation

    tokenizer = build_tokenizer()
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    dataset = tiny_llama.forward(batch, ["last"], extraction_config=CONFIG)
    vector = dataset["resid_out_0"][:, 0].mean(0)  # by hand: [d_model]

    def logits(mean, positions=(0, "last")):
        ablation = Ablation(
            point="resid_out_0", positions=list(positions), method="mean", mean=mean
        )
        return tiny_llama.forward(batch, ["last"], interventions=[ablation])["logits"]

    from_cache = logits(dataset)
    torch.testing.assert_close(from_cache, logits(vector), rtol=0, atol=0)
    assert not torch.allclose(from_cache, tiny_llama.forward(batch, ["last"])["logits"])

    two_slots = tiny_llama.forward(batch, [0, "last"], extraction_config=CONFIG)
    with pytest.raises(HookscopeError, match=r"extracted at positions \{0: \[0\], 'last': \[1\]\}"):
        logits(two_slots, positions=("last", 0))
    per_slot = two_slots["resid_out_0"].mean(0)  # [2, d_model], every slot real here
    torch.testing.assert_close(logits(two_slots), logits(per_slot), rtol=0, atol=0)
