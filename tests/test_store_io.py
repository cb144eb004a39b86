"""The store's I/O: the writer thread, storage dtypes, pinned staging, reserved in-memory results.

Ground truths: the batches' own ``forward`` results concatenated by hand, HF's
``output_hidden_states``, and ``Tensor.to(dtype)`` of the full-precision values.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from store_worker import assert_same_store, force_writer_thread, prompts
from tiny_models import build_model, build_tokenizer

from hookscope import ExtractionConfig, HookedModel
from hookscope import dataset as dataset_module
from hookscope.cache import ActivationCache
from hookscope.errors import InputError
from hookscope.reserve import ReservedResults, known_size
from hookscope.store import ActivationStore, StoreError, StoreWriter
from hookscope.store_io import (
    BackgroundWriter,
    HostStager,
    PinnedPool,
    store_dtype_of,
)

CONFIG = ExtractionConfig(extract_resid_out=True, extract_mlp_out=True, save_input_ids=True)
BATCH = 3


@pytest.fixture(scope="module")
def hm():
    model = HookedModel.from_hf(build_model("llama"), build_tokenizer())
    model.config.batch_size = BATCH
    return model


def by_hand(hm, texts, positions, config=CONFIG):
    """Every batch's own forward, concatenated by hand (input_ids right-padded with pad)."""
    parts = [
        hm.forward(texts[i : i + BATCH], positions, extraction_config=config)
        for i in range(0, len(texts), BATCH)
    ]
    out = {}
    for key in parts[0].tensors():
        if key == "input_ids":
            width = max(p[key].shape[1] for p in parts)
            padded = [
                torch.nn.functional.pad(p[key], (0, width - p[key].shape[1]), value=hm.pad_token_id)
                for p in parts
            ]
            out[key] = torch.cat(padded)
        else:
            out[key] = torch.cat([p[key] for p in parts])
    return out


# -- the writer thread -------------------------------------------------------------------------
def test_background_writer_commits_in_order_and_bounds_its_queue():
    committed, gate = [], threading.Event()

    def commit(item):
        gate.wait(10)
        committed.append(item)

    writer = BackgroundWriter(commit, depth=2)
    writer.put(0)  # taken by the thread, which waits at the gate
    time.sleep(0.1)
    writer.put(1)
    writer.put(2)  # the queue is full now
    fourth = threading.Thread(target=writer.put, args=(3,))
    fourth.start()
    fourth.join(0.3)
    assert fourth.is_alive(), "a put past the queue's depth must wait"
    gate.set()
    fourth.join(10)
    writer.drain()
    assert committed == [0, 1, 2, 3]
    assert writer.close() is None and not writer.alive


def test_background_writer_raises_a_failure_at_the_next_put_and_drops_the_rest():
    committed = []

    def commit(item):
        if item == 1:
            raise OSError("disk full")
        committed.append(item)

    writer = BackgroundWriter(commit, depth=4)
    for item in (0, 1, 2):
        writer.put(item)
    time.sleep(0.2)
    with pytest.raises(OSError, match="disk full"):
        writer.put(3)
    writer.drain()  # raised once, not twice
    assert writer.close() is None
    assert committed == [0]  # 2 queued behind the failure is dropped, 3 was never queued


def test_background_writer_returns_an_unreported_failure_at_close():
    writer = BackgroundWriter(lambda item: 1 / 0, depth=1)
    writer.put("batch")
    failure = writer.close()
    assert isinstance(failure, ZeroDivisionError)
    with pytest.raises(InputError, match="positive int, got 0"):
        BackgroundWriter(print, depth=0)


def test_writing_overlaps_the_next_forward(hm, tmp_path, monkeypatch):
    """Batch i is committed on another thread while batch i + 1's forward runs."""
    events, main = [], threading.get_ident()
    original = StoreWriter._commit

    def slow_commit(self, index, cache, fingerprints):
        events.append(("commit start", index, threading.get_ident() != main))
        time.sleep(0.3)
        out = original(self, index, cache, fingerprints)
        events.append(("commit end", index, time.perf_counter()))
        return out

    monkeypatch.setattr(StoreWriter, "_commit", slow_commit)
    starts = []
    hook = hm.hf_model.model.layers[0].register_forward_pre_hook(
        lambda m, a: starts.append(time.perf_counter())
    )
    try:
        store = hm.extract_cache(
            prompts(9), ["last"], extraction_config=CONFIG, output_dir=tmp_path
        )
    finally:
        hook.remove()
    assert all(on_thread for kind, _, on_thread in events if kind == "commit start")
    ends = {index: t for kind, index, t in events if kind == "commit end"}
    assert starts[1] < ends[0] and starts[2] < ends[1], "the forwards waited for the writes"
    assert store.complete and len(store) == 9
    expected = by_hand(hm, prompts(9), ["last"])
    for key in ("resid_out_1", "mlp_out_0", "position_mask"):
        assert torch.equal(store[key], expected[key]), key


@pytest.mark.parametrize("thread", [True, False], ids=["writer thread", "between forwards"])
def test_a_failed_write_is_raised_and_the_store_resumes(hm, tmp_path, monkeypatch, thread):
    force_writer_thread(monkeypatch, thread)
    original = StoreWriter._commit

    def fail_third(self, index, cache, fingerprints):
        if index == 2:
            raise OSError(28, "No space left on device")
        return original(self, index, cache, fingerprints)

    monkeypatch.setattr(StoreWriter, "_commit", fail_third)
    folder = tmp_path / "acts"
    with pytest.raises(StoreError, match="No space left on device.*last commit"):
        hm.extract_cache(prompts(15), ["last", 0], extraction_config=CONFIG, output_dir=folder)
    with pytest.warns(UserWarning, match="incomplete store"):
        partial = ActivationStore.open(folder)
    assert len(partial.manifest["shards"]) == 2 and len(partial) == 2 * BATCH
    monkeypatch.setattr(StoreWriter, "_commit", original)
    # released (another thread may take the folder) and resumable to the clean store
    outcome = []
    worker = threading.Thread(
        target=lambda: outcome.append(
            hm.extract_cache(prompts(15), ["last", 0], extraction_config=CONFIG, output_dir=folder)
        )
    )
    worker.start()
    worker.join(60)
    clean = hm.extract_cache(
        prompts(15), ["last", 0], extraction_config=CONFIG, output_dir=tmp_path / "clean"
    )
    assert_same_store(outcome[0], clean)


def test_abort_reports_a_writer_failure_beside_the_callers_error(tmp_path, monkeypatch):
    monkeypatch.setattr(
        StoreWriter, "_commit", lambda *a: (_ for _ in ()).throw(OSError("device gone"))
    )
    writer = StoreWriter(tmp_path / "s", {"what": 1}, background=True)
    batch = {"input_ids": torch.tensor([[1, 2, 3]])}
    assert writer.check_batch(0, batch) is False
    cache = ActivationCache({"position_mask": torch.ones(1, 1, dtype=torch.bool)})
    writer.write(cache)
    interrupt = KeyboardInterrupt()
    writer.abort(interrupt)
    assert any(
        "writer thread had failed too" in n and "device gone" in n for n in interrupt.__notes__
    )
    StoreWriter(tmp_path / "s", {"what": 1}).close()  # the folder was released


@pytest.mark.parametrize("to_store", [True, False], ids=["store", "in memory"])
def test_a_batch_saver_that_reuses_its_tensor_keeps_each_batchs_values(hm, tmp_path, to_store):
    """The batch_saver's tensors are copied when returned: a buffer the caller refills for the
    next batch (here while the writer thread may still hold the last one) changes nothing."""
    buffer, seen = torch.zeros(BATCH), []

    def saver(batch):
        rows = batch["input_ids"].shape[0]
        buffer[:rows] = batch["attention_mask"].sum(1).float()  # refilled in place every batch
        seen.append(buffer[:rows].clone())
        return {"length": buffer[:rows]}

    texts = prompts(3 * BATCH + 1)
    out = hm.extract_cache(
        texts,
        ["last"],
        extraction_config=CONFIG,
        batch_saver=saver,
        output_dir=tmp_path / "s" if to_store else None,
    )
    lengths = out.read("batch_saver/length") if to_store else out["batch_saver"]["length"]
    assert torch.equal(lengths, torch.cat(seen))
    tokenizer = hm.get_text_tokenizer()
    assert lengths.tolist() == [float(len(tokenizer(t)["input_ids"])) for t in texts]


# -- storage dtype -------------------------------------------------------------------------------
def test_store_dtype_stores_rounded_values_and_reads_back_converted(hm, tmp_path):
    texts = prompts(10)
    exact = by_hand(hm, texts, ["last", 0])
    store = hm.extract_cache(
        texts,
        ["last", 0],
        extraction_config=CONFIG,
        output_dir=tmp_path / "half",
        store_dtype="float16",
        batch_saver=lambda b: {"score": b["attention_mask"].sum(1).float() / 3},
    )
    assert store.store_dtype == "float16" and store.manifest["description"]["store_dtype"]
    for key in ("resid_out_0", "mlp_out_1", "logits"):
        assert store[key].dtype == torch.float16
        assert torch.equal(store[key], exact[key].to(torch.float16)), key
        assert torch.equal(store.read(key, dtype="float32"), exact[key].half().float()), key
    assert torch.equal(store["position_mask"], exact["position_mask"])
    assert torch.equal(store["input_ids"], exact["input_ids"])
    assert store.read("batch_saver/score").dtype == torch.float32  # the user's field, untouched
    stats = store.stats("resid_out_1")
    torch.testing.assert_close(
        stats["mean"].double(), store["resid_out_1"].double().mean(0), rtol=1e-6, atol=1e-7
    )


def test_a_store_of_another_dtype_is_refused(hm, tmp_path):
    folder = tmp_path / "acts"
    hm.extract_cache(
        prompts(6), ["last"], extraction_config=CONFIG, output_dir=folder, store_dtype="bfloat16"
    )
    for asked, shown in (("float16", "'float16'"), (None, "None")):
        with pytest.raises(StoreError, match=f"store_dtype: stored 'bfloat16', asked {shown}"):
            hm.extract_cache(
                prompts(6), ["last"], extraction_config=CONFIG, output_dir=folder, store_dtype=asked
            )
    again = hm.extract_cache(
        prompts(6), ["last"], extraction_config=CONFIG, output_dir=folder, store_dtype="bfloat16"
    )
    assert again.complete and again["resid_out_1"].dtype == torch.bfloat16
    with pytest.raises(
        InputError, match=r"store_dtype must be one of \['bfloat16', 'float16', 'float32'\].*'int8'"
    ):
        hm.extract_cache(prompts(6), ["last"], output_dir=tmp_path / "x", store_dtype="int8")
    assert not (tmp_path / "x").exists()  # refused before anything was written


def test_store_dtype_in_memory(hm):
    texts = prompts(7)
    exact = by_hand(hm, texts, ["last", 0])
    half = hm.extract_cache(texts, ["last", 0], extraction_config=CONFIG, store_dtype="bfloat16")
    for key in ("resid_out_1", "mlp_out_0", "logits"):
        assert half[key].dtype == torch.bfloat16
        assert torch.equal(half[key], exact[key].to(torch.bfloat16)), key
    assert half["position_mask"].dtype == torch.bool
    assert store_dtype_of(torch.float16) == torch.float16 and store_dtype_of(None) is None


# -- reserved in-memory results --------------------------------------------------------------------
def test_reserved_results_equal_the_batches_and_hf(hm):
    texts = prompts(11)  # the last batch is short
    result = hm.extract_cache(texts, ["last", 0], extraction_config=CONFIG)
    expected = by_hand(hm, texts, ["last", 0])
    assert set(result.tensors()) == set(expected)
    for key, value in expected.items():
        assert torch.equal(result[key], value), key
    tokenizer = build_tokenizer()
    for row in (0, 5, 10):
        ids = tokenizer(texts[row], return_tensors="pt")
        hidden = hm.hf_model(**ids, output_hidden_states=True).hidden_states
        torch.testing.assert_close(
            result["resid_out_0"][row, 0], hidden[1][0, -1], rtol=1e-5, atol=1e-6
        )
        torch.testing.assert_close(
            result["resid_out_0"][row, 1], hidden[1][0, 0], rtol=1e-5, atol=1e-6
        )


def test_reserved_results_are_written_in_place(monkeypatch, hm):
    """The result's tensors are the buffers reserved at the first batch (no merge copy)."""
    made = []
    original = ReservedResults._reserve

    def spy(self, cache, count):
        original(self, cache, count)
        made.append(dict(self.buffers))

    monkeypatch.setattr(ReservedResults, "_reserve", spy)
    result = hm.extract_cache(prompts(8), ["last"], extraction_config=CONFIG)
    assert len(made) == 1 and made[0]["resid_out_1"].shape[0] == 8
    for key, buffer in made[0].items():
        assert result[key].data_ptr() == buffer.data_ptr(), key
    assert "input_ids" not in made[0]  # ragged across batches: merged as before


@pytest.mark.parametrize("positions", [["last", 0], ["all"]])
def test_sorted_and_unreservable_batches_equal_the_plain_merge(hm, monkeypatch, positions):
    """sort_by_length writes rows at their example's index; "all" (widths differ by batch)
    gives up the reservation mid-run; both equal the plain merge."""
    texts = prompts(13)
    for sort in (False, True):
        reserved = hm.extract_cache(texts, positions, extraction_config=CONFIG, sort_by_length=sort)
        monkeypatch.setattr(dataset_module, "_RESERVE", False)
        plain = hm.extract_cache(texts, positions, extraction_config=CONFIG, sort_by_length=sort)
        monkeypatch.setattr(dataset_module, "_RESERVE", True)
        assert list(reserved.keys()) == list(plain.keys())
        for key, value in plain.tensors().items():
            assert torch.equal(reserved[key], value), (key, sort)
        assert reserved["mapping_index"] == plain["mapping_index"]
        if sort:
            assert torch.equal(reserved["example_index"], torch.arange(13))


def test_reserved_results_unit():
    def batch(start, count, width=2):
        values = torch.arange(start, start + count, dtype=torch.float32)
        return ActivationCache(
            {
                "a": values[:, None, None].expand(count, width, 3).clone(),
                "position_mask": torch.ones(count, width, dtype=torch.bool),
                "mapping_index": {"x": list(range(width))},
            }
        )

    results = ReservedResults(7, pad_token_id=0)
    for start, count in ((0, 3), (3, 3), (6, 1)):
        results.add(batch(start, count), None)
    out = results.result()
    assert torch.equal(out["a"][:, 0, 0], torch.arange(7.0))
    # out of order rows land at their index; a wider batch turns into the plain merge
    results = ReservedResults(5, pad_token_id=0)
    first = batch(10, 2)
    first["batch_saver"] = {"example_index": torch.tensor([3, 0])}
    results.add(first, torch.tensor([3, 0]))
    second = batch(20, 3, width=3)
    second["batch_saver"] = {"example_index": torch.tensor([1, 4, 2])}
    results.add(second, torch.tensor([1, 4, 2]))
    out = results.result()
    assert results.buffers is None
    assert out["a"][:, 0, 0].tolist() == [11.0, 20.0, 22.0, 10.0, 21.0]
    assert out["position_mask"][:, 2].tolist() == [False, True, True, False, True]


def test_known_size(hm):
    tokenizer = build_tokenizer()
    batches = [tokenizer(prompts(3), return_tensors="pt", padding=True) for _ in range(2)]
    assert known_size(prompts(5), prompts(5)) == 5
    assert known_size(batches, None) == 6
    assert known_size(iter(batches), None) is None
    assert known_size([{"input_ids": [1, 2]}], None) is None
    result = hm.extract_cache(batches, ["last"], extraction_config=CONFIG)
    assert torch.equal(result["resid_out_1"], by_hand(hm, prompts(3) * 2, ["last"])["resid_out_1"])


# -- pinned asynchronous copies (the logic, on the CPU) --------------------------------------------
class FakeEvent:
    synchronized = 0

    def synchronize(self):
        FakeEvent.synchronized += 1


def test_host_stager_is_a_no_op_on_cpu():
    cache = ActivationCache({"a": torch.ones(2, 1, 3), "position_mask": torch.ones(2, 1).bool()})
    before = dict(cache.tensors())
    staged = HostStager().stage(cache)
    assert staged.wait() is cache and not staged.copying
    assert all(staged.cache[k] is v for k, v in before.items())


def test_host_stager_copies_into_reused_buffers_and_synchronises_once():
    pool = PinnedPool(allocate=lambda shape, dtype: torch.empty(shape, dtype=dtype))
    stager = HostStager(pool, record_event=FakeEvent, on_device=lambda t: True)
    FakeEvent.synchronized = 0
    seen = set()
    for step in range(3):
        source = torch.randn(4, 2, 5)
        cache = ActivationCache({"a": source, "position_mask": torch.ones(4, 2, dtype=torch.bool)})
        cache.set_running_mean("avg", torch.full((2, 2), float(step)), torch.tensor(4))
        cache["batch_saver"] = {"label": torch.arange(4), "names": ["w", "x", "y", "z"]}
        staged = stager.stage(cache)
        assert staged.copying
        host = staged.wait()
        staged.wait()
        assert torch.equal(host["a"], source) and host["a"].data_ptr() != source.data_ptr()
        assert torch.equal(host["avg"], torch.full((2, 2), float(step)))
        assert host.running_count("avg") == 4
        assert torch.equal(host["batch_saver"]["label"], torch.arange(4))
        assert host["batch_saver"]["names"] == ["w", "x", "y", "z"]
        seen.add(host["a"].data_ptr())
        staged.release()
    assert FakeEvent.synchronized == 3  # once per batch, before it is written
    # a, mask, avg and its count (staged too: no blocking copy), label: reused every step
    assert pool.allocated == 5 and len(seen) == 1


def test_all_positions_of_varied_lengths_to_a_store_say_what_to_do(hm, tmp_path):
    # the slot count of 'all' follows each batch's longest prompt; the store's statistics need
    # one count, and the error now names the counts and the two ways out
    hm.config.batch_size = 1  # one prompt per batch: two slot counts
    try:
        with pytest.raises(StoreError, match=r"got \d+ then \d+.*'all'.*no output_dir"):
            hm.extract_cache(
                ["The cat sat on the mat", "A dog"], ["all"], extraction_config=CONFIG,
                output_dir=tmp_path / "all",
            )  # fmt: skip
    finally:
        hm.config.batch_size = BATCH
