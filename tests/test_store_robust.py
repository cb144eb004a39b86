"""The store under misuse and interruption: a refused run leaves the folder usable.

Ground truths: the tokenizer's own lengths (the slot counts of ``"all"``), an in-memory
``extract_cache`` of the same call, and the files in the folder.
"""

from __future__ import annotations

import os
import sys
import threading

import pytest
import torch
from store_worker import force_writer_thread
from tiny_models import VOCAB, build_model, build_tokenizer

from hookscope import ExtractionConfig, HookedModel
from hookscope import store as store_module
from hookscope.cache import ActivationCache
from hookscope.store import LOCK, MANIFEST, ActivationStore, StoreError, StoreWriter

CONFIG = ExtractionConfig.from_names(["resid_out_1"], save_logits=False)
TEXTS = ["The cat sat on the mat", "A dog", "The capital of France is Paris", "Hello world"]


@pytest.fixture(scope="module")
def hm():
    model = HookedModel.from_hf(build_model("llama"), build_tokenizer())
    model.config.batch_size = 1
    return model


def store_files(folder) -> list[str]:
    """hookscope's own files in ``folder`` (its manifest, shards and statistics)."""
    if not folder.exists():
        return []
    names = [p.name for p in folder.iterdir()]
    return sorted(n for n in names if n == MANIFEST or n.startswith(("shard-", "stats-")))


def batches_of_lengths(lengths: list[int], seed: int = 0) -> list[dict]:
    """One tokenized batch of one full-length example per length (its ``"all"`` slot count)."""
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            "input_ids": torch.randint(3, VOCAB, (1, n), generator=generator),
            "attention_mask": torch.ones(1, n, dtype=torch.long),
        }
        for n in lengths
    ]


def assert_equals_in_memory(hm, store, data, positions) -> None:
    expected = hm.extract_cache(data, positions, extraction_config=CONFIG)
    assert len(store) == len(expected["resid_out_1"])
    assert torch.equal(store["resid_out_1"], expected["resid_out_1"])
    assert torch.equal(store["position_mask"], expected["position_mask"])


# -- "all" over prompts of varied lengths ------------------------------------------------------
def test_all_over_a_list_of_varied_texts_is_refused_before_anything_is_written(hm, tmp_path):
    folder = tmp_path / "all"
    lengths = [len(ids) for ids in hm.tokenizer(TEXTS)["input_ids"]]
    assert lengths[0] != lengths[1]  # batch 0 and batch 1 differ: the first mismatch
    with pytest.raises(StoreError) as caught:
        hm.extract_cache(TEXTS, ["all"], extraction_config=CONFIG, output_dir=folder)
    message = str(caught.value)
    assert f"got {lengths[0]} then {lengths[1]}" in message
    assert "'all'" in message and "no output_dir" in message and "extract_avg=True" in message
    assert "Nothing was written" in message
    assert store_files(folder) == []
    # the same call with valid positions works in the same folder, without overwrite
    store = hm.extract_cache(TEXTS, ["last", 0], extraction_config=CONFIG, output_dir=folder)
    assert store.complete
    assert_equals_in_memory(hm, store, TEXTS, ["last", 0])


def test_a_list_of_tokenized_batches_of_varied_lengths_is_refused_before_writing(hm, tmp_path):
    folder = tmp_path / "batches"
    batches = batches_of_lengths([7, 7, 4])
    with pytest.raises(StoreError, match=r"\(batch 0, batch 2\) got 7 then 4.*Nothing was written"):
        hm.extract_cache(batches, ["all"], extraction_config=CONFIG, output_dir=folder)
    assert store_files(folder) == []
    # the same batches of one length are fine (no false refusal)
    store = hm.extract_cache(batches[:2], ["all"], extraction_config=CONFIG, output_dir=folder)
    assert_equals_in_memory(hm, store, batches[:2], ["all"])


@pytest.mark.parametrize("thread", [True, False], ids=["writer thread", "between forwards"])
def test_a_stream_of_varied_lengths_removes_the_store_it_began(hm, tmp_path, monkeypatch, thread):
    # a generator cannot be read twice: the mismatch is found at batch 2, after batches 0 and 1
    # were committed (on the writer thread or not); the new store is removed, nothing is
    # half-written
    force_writer_thread(monkeypatch, thread)
    folder = tmp_path / "stream"
    batches = batches_of_lengths([6, 6, 3, 6])
    with pytest.raises(StoreError) as caught:
        hm.extract_cache(iter(batches), ["all"], extraction_config=CONFIG, output_dir=folder)
    message = str(caught.value)
    assert "got 6 then 3" in message and "(batch 2)" in message and "no output_dir" in message
    assert "was removed" in message
    assert store_files(folder) == []
    # the same call with valid arguments works there, without overwrite ...
    store = hm.extract_cache(iter(batches), ["last"], extraction_config=CONFIG, output_dir=folder)
    assert_equals_in_memory(hm, store, batches, ["last"])
    # ... and so does overwrite=True after another refused run on top of that store
    with pytest.raises(StoreError, match="got 6 then 3.*overwrite=True replaced was removed"):
        hm.extract_cache(
            iter(batches), ["all"], extraction_config=CONFIG, output_dir=folder, overwrite=True
        )
    assert store_files(folder) == []
    store = hm.extract_cache(
        iter(batches[:2]), ["all"], extraction_config=CONFIG, output_dir=folder, overwrite=True
    )
    assert_equals_in_memory(hm, store, batches[:2], ["all"])


def test_appending_another_slot_count_leaves_the_older_store_as_it_was(hm, tmp_path):
    folder = tmp_path / "append"
    batches = batches_of_lengths([5, 5, 2])
    hm.extract_cache(iter(batches[:2]), ["all"], extraction_config=CONFIG, output_dir=folder)
    before = {name: (folder / name).read_bytes() for name in store_files(folder)}
    with pytest.raises(StoreError, match=r"got 5 then 2.*left at its last commit \(2 examples\)"):
        hm.extract_cache(iter(batches), ["all"], extraction_config=CONFIG, output_dir=folder)
    after = {name: (folder / name).read_bytes() for name in store_files(folder)}
    assert after == before  # the complete store of the first run, byte for byte
    store = ActivationStore.open(folder)
    assert store.complete
    assert_equals_in_memory(hm, store, batches[:2], ["all"])


def test_a_refused_batch_that_extends_the_last_shard_leaves_the_store_as_it_was(hm, tmp_path):
    # the last committed batch (1 example) is a prefix of the batch asked (2 examples): it is
    # uncommitted to run again whole, but the new batch's slot count differs and is refused;
    # the store keeps that shard and stays complete (it lost its last example before)
    folder = tmp_path / "extend"
    first, second, third = batches_of_lengths([5, 5, 9])
    one_row = [{key: torch.cat([first[key], second[key]]) for key in first}, first]
    hm.extract_cache(iter(one_row), ["all"], extraction_config=CONFIG, output_dir=folder)
    before = {name: (folder / name).read_bytes() for name in store_files(folder)}
    wider = {key: torch.zeros(2, 9, dtype=first[key].dtype) for key in first}
    wider["input_ids"][0, :5], wider["input_ids"][1] = first["input_ids"][0], third["input_ids"][0]
    wider["attention_mask"][0, :5], wider["attention_mask"][1] = 1, 1
    with pytest.raises(StoreError, match=r"got 5 then 9.*left at its last commit \(3 examples\)"):
        hm.extract_cache(
            iter([one_row[0], wider]), ["all"], extraction_config=CONFIG, output_dir=folder
        )
    after = {name: (folder / name).read_bytes() for name in store_files(folder)}
    assert after == before  # the complete store of the first run, byte for byte
    store = ActivationStore.open(folder)
    store.verify()
    assert store.complete and len(store) == 3
    assert_equals_in_memory(hm, store, one_row, ["all"])


def test_a_refused_batch_after_an_extended_last_shard_leaves_the_store_incomplete(hm, tmp_path):
    # the last shard (1 example) is extended to 2 and committed again, then the next batch is
    # refused: the store holds 4 examples, more than the complete run of 3 and fewer than
    # asked, so it is not marked complete
    folder = tmp_path / "extended"
    first, second, third = batches_of_lengths([5, 5, 5])
    pair = {key: torch.cat([first[key], second[key]]) for key in first}
    hm.extract_cache(iter([pair, first]), ["all"], extraction_config=CONFIG, output_dir=folder)
    other = batches_of_lengths([7])[0]
    with pytest.raises(StoreError, match=r"got 5 then 7.*left at its last commit \(4 examples\)"):
        hm.extract_cache(
            iter([pair, {key: torch.cat([first[key], third[key]]) for key in first}, other]),
            ["all"],
            extraction_config=CONFIG,
            output_dir=folder,
        )
    store = ActivationStore.open(folder)
    store.verify()
    assert len(store) == 4 and not store.complete


def test_averaged_all_positions_stream_to_a_store(hm, tmp_path):
    # extract_avg: one slot per item whatever the prompt's length, so nothing is refused
    config = ExtractionConfig.from_names(["resid_out_1"], save_logits=False, extract_avg=True)
    store = hm.extract_cache(TEXTS, ["all"], extraction_config=config, output_dir=tmp_path / "a")
    expected = hm.extract_cache(TEXTS, ["all"], extraction_config=config)
    assert torch.equal(store["resid_out_1"], expected["resid_out_1"])
    by_hand = torch.stack(
        [hm.forward(t, ["all"], extraction_config=CONFIG)["resid_out_1"][0].mean(0) for t in TEXTS]
    )
    torch.testing.assert_close(store["resid_out_1"][:, 0], by_hand)


# -- a second Ctrl-C while the writer thread is joined -----------------------------------------
def small_batch(step: int) -> tuple[dict, ActivationCache]:
    """A batch of 2 examples (its token ids) and its cache ``resid_out_1 [2, 3, 4]``."""
    generator = torch.Generator().manual_seed(step)
    ids = {"input_ids": torch.tensor([[3 + step, 4, 5], [6, 7 + step, 8]])}
    cache = ActivationCache(
        {
            "resid_out_1": torch.randn(2, 3, 4, generator=generator),
            "position_mask": torch.ones(2, 3, dtype=torch.bool),
            "mapping_index": {"all": [0, 1, 2]},
        }
    )
    return ids, cache


def lock_is_free(folder) -> bool:
    """Whether an exclusive flock on the folder's lock file can be taken now (flock locks belong
    to an open file, so another open of the file in this process conflicts too)."""
    import fcntl

    fd = os.open(folder / LOCK, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


@pytest.mark.skipif(sys.platform == "win32", reason="flock: POSIX only")
def test_a_second_ctrl_c_while_the_writer_is_joined_still_releases_the_folder(
    tmp_path, monkeypatch
):
    folder = tmp_path / "s"
    gate, committing = threading.Event(), threading.Event()
    real_commit = StoreWriter._commit

    def slow_commit(self, index, cache, fingerprints):
        if index == 1:  # batch 1 blocks on the writer thread until the test lets it go
            committing.set()
            assert gate.wait(20)
        return real_commit(self, index, cache, fingerprints)

    monkeypatch.setattr(StoreWriter, "_commit", slow_commit)
    writer = StoreWriter(folder, {"what": 1}, background=True)
    batches = [small_batch(step) for step in range(3)]
    for index, (ids, cache) in enumerate(batches):
        assert writer.check_batch(index, ids) is False
        writer.write(cache)
        if index == 0:
            writer.flush()  # batch 0 committed
    assert committing.wait(20)  # batch 1 is being committed, batch 2 waits in the queue
    thread = writer._background._thread
    real_join, joins = thread.join, []

    def join(timeout=None):  # Ctrl-C twice while joined, then the commit may finish
        joins.append(timeout)
        if len(joins) <= 2:
            raise KeyboardInterrupt(f"Ctrl-C {len(joins) + 1}")
        gate.set()
        return real_join(timeout)

    monkeypatch.setattr(thread, "join", join)
    first = KeyboardInterrupt("Ctrl-C 1")  # in the caller's loop: it aborts the writer
    with pytest.raises(KeyboardInterrupt, match="Ctrl-C 2"):
        writer.abort(first)
    assert len(joins) == 3 and not thread.is_alive()
    # the folder is released: no holder in this process, the flock free, the lock file empty
    assert str(folder.resolve()) not in store_module._HELD
    assert lock_is_free(folder) and (folder / LOCK).read_bytes() == b""
    # a writer in another thread opens it (a held lock refuses another thread) and resumes
    opened = []
    other = threading.Thread(target=lambda: opened.append(StoreWriter(folder, {"what": 1})))
    other.start()
    other.join()
    assert len(opened) == 1 and opened[0].completed_batches == 2
    opened[0].close()
    # batch 1 (being committed) finished; batch 2 (not begun) was dropped; both shards intact
    with pytest.warns(UserWarning, match="incomplete store"):
        store = ActivationStore.open(folder)
    store.verify()
    expected = torch.cat([batches[0][1]["resid_out_1"], batches[1][1]["resid_out_1"]])
    assert len(store) == 4 and torch.equal(store["resid_out_1"], expected)


# -- one rule for each row's example index ------------------------------------------------------
def test_every_reader_puts_the_rows_of_a_combined_store_in_dataset_order(hm, tmp_path):
    # two part stores (as extract_distributed's workers write them: each counts its examples
    # from 0, its shards hold them sorted by length) combined with an index_offset per shard
    pytest.importorskip("pyarrow")
    from hookscope.distributed import _combine_parts
    from hookscope.export import to_arrow

    records = [{"text": text, "id": i} for i, text in enumerate(TEXTS * 2 + ["A cat"])]
    config = ExtractionConfig.from_names(["resid_out_1"], save_logits=False)
    options = {
        "extraction_config": config,
        "sort_by_length": True,
        "batch_saver": lambda batch: {"id": torch.tensor([r["id"] for r in batch])},
    }
    hm.config.batch_size = 2
    try:
        parts = [tmp_path / "out" / "part-000", tmp_path / "out" / "part-001"]
        hm.extract_cache(records[:5], ["last"], output_dir=parts[0], **options)
        hm.extract_cache(records[5:], ["last"], output_dir=parts[1], **options)
        in_memory = [
            hm.extract_cache(part, ["last"], **options)["resid_out_1"]
            for part in (records[:5], records[5:])
        ]  # the same batches, merged in memory (dataset order)
    finally:
        hm.config.batch_size = 1
    expected = torch.cat(in_memory)
    by_hand = torch.cat(
        [hm.forward(r["text"], ["last"], extraction_config=config)["resid_out_1"] for r in records]
    )
    torch.testing.assert_close(expected, by_hand, rtol=1e-5, atol=1e-5)  # really that order
    store = _combine_parts(tmp_path / "out", parts)
    offsets = [shard.get("index_offset") for shard in store.manifest["shards"]]
    assert offsets == [0] * 3 + [5] * 2
    assert torch.equal(store["resid_out_1"], expected)
    table = to_arrow(store)
    assert table.column("example_index").to_pylist() == list(range(len(records)))
    exported = torch.tensor(
        table.column("resid_out_1").combine_chunks().flatten().flatten().to_numpy()
    )
    assert torch.equal(exported.reshape(expected.shape), expected)
    odd = store.select(lambda fields: fields["id"] % 2 == 1)
    assert odd.tolist() == [i for i in range(len(records)) if i % 2 == 1]


def test_merging_part_stores_again_keeps_the_merged_statistics_on_a_failure(
    hm, tmp_path, monkeypatch
):
    # the top manifest of a first merge names stats-merged.safetensors; a second merge that
    # fails while writing that file (disk full) leaves the first merge readable and verified
    from hookscope import distributed, safetensors_files
    from hookscope.distributed import _combine_parts

    parts = [tmp_path / "out" / "part-000", tmp_path / "out" / "part-001"]
    batches = batches_of_lengths([4, 4])
    for part, batch in zip(parts, batches, strict=True):
        hm.extract_cache([batch], ["last"], extraction_config=CONFIG, output_dir=part)
    first = _combine_parts(tmp_path / "out", parts)
    mean = first.stats("resid_out_1")["mean"].clone()

    def disk_full(tensors, metadata):
        yield b"partial"  # part of the header written, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors_files, "_pieces", disk_full)
    with pytest.raises(OSError, match="No space"):
        distributed._combine_parts(tmp_path / "out", parts)
    again = ActivationStore.open(tmp_path / "out")
    again.verify()
    torch.testing.assert_close(again.stats("resid_out_1")["mean"], mean, rtol=0, atol=0)
