"""Export to Arrow / HF datasets: one row per example, the values of the store or cache exactly."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from store_worker import prompts
from tiny_models import build_model, build_tokenizer

from hookscope import ExtractionConfig, HookedModel
from hookscope.errors import HookscopeError, InputError
from hookscope.export import to_arrow, to_hf_dataset

pa = pytest.importorskip("pyarrow")

CONFIG = ExtractionConfig(extract_resid_out=True, save_input_ids=True)
N = 11


@pytest.fixture(scope="module")
def hm():
    model = HookedModel.from_hf(build_model("llama"), build_tokenizer())
    model.config.batch_size = 4
    return model


def saver(records):
    return {
        "label": torch.tensor([len(r["text"]) % 3 for r in records]),
        "name": [r["text"][:5] for r in records],
    }


def records():
    return [{"text": text, "id": i} for i, text in enumerate(prompts(N))]


@pytest.fixture(scope="module")
def store(hm, tmp_path_factory):
    folder = tmp_path_factory.mktemp("export") / "acts"
    return hm.extract_cache(
        records(),
        ["last", 0],
        extraction_config=CONFIG,
        output_dir=folder,
        sort_by_length=True,  # shards hold the examples out of order
        store_dtype="float16",
        batch_saver=saver,
    )


def column(table, name) -> np.ndarray:
    """A fixed-size-list column back to ``[rows, *shape]`` numpy."""
    array = table.column(name).combine_chunks()
    shape = []
    while pa.types.is_fixed_size_list(array.type):
        shape.append(array.type.list_size)
        array = array.flatten()
    return array.to_numpy(zero_copy_only=False).reshape(len(table), *shape)


def test_store_to_arrow_round_trip(store):
    table = to_arrow(store)
    assert table.num_rows == N
    assert table.column("example_index").to_pylist() == list(range(N))
    for key in ("resid_out_0", "resid_out_1", "logits"):
        assert table.schema.field(key).type.value_type.value_type == pa.float16()
        assert np.array_equal(column(table, key), store[key].numpy()), key
    assert np.array_equal(column(table, "position_mask"), store["position_mask"].numpy())
    expected = [records()[i] for i in range(N)]
    assert table.column("label").to_pylist() == [len(r["text"]) % 3 for r in expected]
    assert table.column("name").to_pylist() == [r["text"][:5] for r in expected]
    ids = store["input_ids"]  # padded to the longest shard; each row keeps its batch's width
    tokenizer = build_tokenizer()
    for row, exported in enumerate(table.column("input_ids").to_pylist()):
        assert exported == ids[row, : len(exported)].tolist()
        real = tokenizer(prompts(N)[row])["input_ids"]
        assert exported[: len(real)] == real


def test_chosen_points_dtype_and_the_cache_export_the_same(hm, store):
    table = to_arrow(store, ["resid_out_1"], dtype="bfloat16")
    assert table.column_names == [
        "example_index",
        "resid_out_1",
        "position_mask",
        "input_ids",
        "label",
        "name",
    ]
    # bfloat16 travels as float32 (Arrow has none), exactly
    assert table.schema.field("resid_out_1").type.value_type.value_type == pa.float32()
    assert np.array_equal(
        column(table, "resid_out_1"), store["resid_out_1"].bfloat16().float().numpy()
    )
    memory = hm.extract_cache(
        records(), ["last", 0], extraction_config=CONFIG, store_dtype="float16", batch_saver=saver
    )
    from_cache = to_arrow(memory, ["resid_out_1"])
    assert np.array_equal(column(from_cache, "resid_out_1"), store["resid_out_1"].numpy())
    assert from_cache.column("label").to_pylist() == table.column("label").to_pylist()


def test_bad_points_and_missing_dependencies(store, monkeypatch, hm):
    with pytest.raises(
        InputError, match=r"cannot export 'resid_out_7'.*exportable points: \[.*'resid_out_0'"
    ):
        to_arrow(store, ["resid_out_7"])
    for points in ([], ["resid_out_0", "resid_out_0"]):
        with pytest.raises(InputError, match=r"give each point at most once, and at least one"):
            to_arrow(store, points)
    means = hm.extract_cache(
        prompts(4), ["last"], extraction_config=ExtractionConfig(extract_avg_attn_pattern=True)
    )
    mean_key = next(iter(means._counts))  # avg_pattern_...: no row per example
    assert mean_key.startswith("avg_pattern")
    with pytest.raises(InputError, match=f"cannot export '{mean_key}'.*not a per-example"):
        to_arrow(means, [mean_key])
    assert mean_key not in to_arrow(means).column_names
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(HookscopeError, match=r"pip install 'hookscope\[arrow\]'"):
        to_arrow(store)
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(HookscopeError, match=r"pip install 'hookscope\[datasets\]'"):
        to_hf_dataset(store)


def test_hf_datasets_round_trip(store):
    pytest.importorskip("datasets")
    dataset = to_hf_dataset(store, ["resid_out_0", "logits"])
    assert len(dataset) == N
    rows = dataset.with_format("torch")[:]
    assert torch.equal(rows["resid_out_0"], store["resid_out_0"])
    assert torch.equal(rows["logits"], store["logits"])
    assert torch.equal(rows["position_mask"], store["position_mask"])
    assert rows["example_index"].tolist() == list(range(N))
