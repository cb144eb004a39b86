"""The on-disk store: equals the in-memory result, resumes after SIGKILL, detects corruption."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from store_worker import prompts, run
from tiny_models import build_model, build_tokenizer

from hookscope import ExtractionConfig, HookedModel
from hookscope.interventions import Ablation
from hookscope.store import ActivationStore, StoreError

N = 2000
KEYS = ("resid_out_0", "resid_out_1", "mlp_out_1", "logits", "position_mask")


@pytest.fixture(scope="module")
def in_memory():
    hm = HookedModel.from_hf(build_model("llama"), build_tokenizer())
    hm.config.batch_size = 50
    config = ExtractionConfig(extract_resid_out=True, extract_mlp_out=True)
    return hm.extract_cache(prompts(N), ["last", 0], extraction_config=config)


@pytest.fixture(scope="module")
def complete_store(tmp_path_factory):
    return run(str(tmp_path_factory.mktemp("store") / "acts"), N)


def test_store_equals_in_memory(complete_store, in_memory):
    assert len(complete_store) == N and complete_store.complete
    assert len(complete_store.manifest["shards"]) == N // 50
    for key in KEYS:
        assert torch.equal(complete_store[key], in_memory[key]), key
    assert complete_store.mapping_index == {"last": [0], 0: [1]}
    description = complete_store.manifest["description"]
    assert (
        description["model_type"] == "llama" and description["extraction_config"]["extract_mlp_out"]
    )
    assert {"transformers", "hookscope", "dtype", "positions"} <= set(description)


def test_running_statistics(complete_store, in_memory):
    stats = complete_store.stats("resid_out_1")
    values = in_memory["resid_out_1"].double()
    assert stats["count"].tolist() == [N, N]
    torch.testing.assert_close(stats["mean"].double(), values.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        stats["var"].double(), values.var(0, unbiased=False), rtol=1e-4, atol=1e-6
    )
    # usable directly as the mean of a mean ablation
    hm = HookedModel.from_hf(build_model("llama"), build_tokenizer())
    hm.forward(
        prompts(2),
        ["last", 0],
        interventions=[
            Ablation(point="resid_out_1", positions=["last", 0], method="mean", mean=stats["mean"])
        ],
    )


def test_select_and_numpy(complete_store):
    short = complete_store.select(lambda fields: fields["length"] <= 2)
    lengths = torch.tensor([len(build_tokenizer()(p)["input_ids"]) for p in prompts(N)])
    assert torch.equal(short, torch.nonzero(lengths <= 2).flatten())
    assert (complete_store.to_numpy("resid_out_0") == complete_store["resid_out_0"].numpy()).all()


def test_killed_run_resumes_to_the_identical_store(tmp_path, complete_store):
    folder = tmp_path / "acts"
    worker = Path(__file__).parent / "store_worker.py"
    process = subprocess.Popen([sys.executable, str(worker), str(folder), str(N), "0.05"])
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            manifest = folder / "manifest.json"
            if manifest.exists() and len(json.loads(manifest.read_text())["shards"]) >= 3:
                break
            time.sleep(0.05)
        # a second writer is refused while the first one lives, naming its pid
        with pytest.raises(
            StoreError,
            match=f"being written by another process \\(pid {process.pid} on host {socket.gethostname()}",
        ):
            run(str(folder), N)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    partial = json.loads((folder / "manifest.json").read_text())
    assert 3 <= len(partial["shards"]) < N // 50 and not partial["complete"]
    host = socket.gethostname()
    assert (folder / ".hookscope-writer.lock").read_text().split() == [str(process.pid), host]
    # the dead writer's lock is taken over, saying whose it was
    with pytest.warns(UserWarning, match=f"stale writer lock of pid {process.pid} on host {host}"):
        resumed = run(str(folder), N)
    assert resumed.complete and len(resumed) == N
    for key in KEYS:
        assert torch.equal(resumed[key], complete_store[key]), key
    for stat in ("count", "mean", "var"):
        assert torch.equal(
            resumed.stats("mlp_out_1")[stat], complete_store.stats("mlp_out_1")[stat]
        )
    assert not list(folder.glob(".*.tmp"))


def test_corrupted_and_truncated_shards_are_detected(tmp_path):
    store = run(str(tmp_path / "acts"), 200)
    shard = tmp_path / "acts" / store.manifest["shards"][1]["file"]
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="shard-00001.safetensors is corrupted"):
        ActivationStore.open(tmp_path / "acts")["resid_out_1"]
    shard.write_bytes(bytes(data[:-100]))
    with pytest.raises(StoreError, match="truncated or missing"):
        ActivationStore.open(tmp_path / "acts")


def test_a_different_extraction_refuses_the_folder(tmp_path):
    run(str(tmp_path / "acts"), 100)
    hm = HookedModel.from_hf(build_model("llama"), build_tokenizer())
    with pytest.raises(StoreError, match="holds a different extraction"):
        hm.extract_cache(prompts(100), ["last"], output_dir=str(tmp_path / "acts"))


def test_sort_by_length_returns_the_original_order(tiny_llama):
    texts = prompts(40)
    config = ExtractionConfig(extract_resid_out=True)
    plain = tiny_llama.extract_cache(texts, ["last", "all"], extraction_config=config)
    bucketed = tiny_llama.extract_cache(
        texts, ["last", "all"], extraction_config=config, sort_by_length=True
    )
    assert torch.equal(bucketed["batch_saver"]["example_index"], torch.arange(40))
    for key in ("resid_out_1", "position_mask"):
        scale = plain[key].float().abs().max()
        assert (bucketed[key].float() - plain[key].float()).abs().max() <= 1e-5 * scale


def test_ray_workers_build_the_same_store(tmp_path, complete_store):
    pytest.importorskip("ray")
    import functools

    from hookscope.distributed import extract_distributed

    folder = tmp_path / "tiny"
    build_model("llama").save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    n = 400
    factory = functools.partial(
        HookedModel.from_pretrained, str(folder), device_map="cpu", torch_dtype=torch.float32
    )
    store = extract_distributed(
        factory,
        prompts(n),
        ["last", 0],
        ExtractionConfig(extract_resid_out=True, extract_mlp_out=True),
        str(tmp_path / "acts"),
        num_workers=2,
        batch_size=50,
    )
    assert store.complete and len(store) == n and store.manifest["description"]["workers"] == 2
    single = run(str(tmp_path / "single"), n)
    for key in KEYS:
        assert torch.equal(store[key], single[key]), key
    for stat in ("count", "mean", "var"):
        torch.testing.assert_close(
            store.stats("resid_out_1")[stat], single.stats("resid_out_1")[stat]
        )


# -- a reused folder is checked against the data it is asked to hold ---------------------------
SMALL = ExtractionConfig(extract_resid_out=True)


@pytest.fixture
def small_hm():
    hm = HookedModel.from_hf(build_model("llama"), build_tokenizer())
    hm.config.batch_size = 4
    return hm


def small_run(hm, folder, texts, **kwargs):
    return hm.extract_cache(
        texts, ["last", 0], extraction_config=SMALL, output_dir=str(folder), **kwargs
    )


def count_forwards(hm) -> list[int]:
    calls = []
    hm.hf_model.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_fingerprints_ignore_padding_and_see_every_real_token():
    from hookscope.store import fingerprint_examples

    texts = ["The cat sat on the mat", "A dog"]
    right = build_tokenizer("right")(texts, return_tensors="pt", padding=True)
    left = build_tokenizer("left")(texts, return_tensors="pt", padding=True)
    alone = [fingerprint_examples(build_tokenizer()(t)["input_ids"])[0] for t in texts]
    assert fingerprint_examples(right["input_ids"], right["attention_mask"]) == alone
    assert fingerprint_examples(left["input_ids"], left["attention_mask"]) == alone
    mask = right["attention_mask"]
    changed = right["input_ids"].clone()
    changed[1, int(mask[1].sum()) - 1] += 1  # the last real token of row 1
    fingerprints = fingerprint_examples(changed, mask)
    assert fingerprints[0] == alone[0] and fingerprints[1] != alone[1]
    padding = right["input_ids"].clone()
    padding[~mask.bool()] = 5  # other ids where the mask is 0
    assert fingerprint_examples(padding, mask) == alone


def test_other_prompts_are_refused_and_the_folder_is_unchanged(tmp_path, small_hm):
    texts = prompts(10)
    small_run(small_hm, tmp_path / "acts", texts)
    before = {p.name: p.read_bytes() for p in (tmp_path / "acts").iterdir()}
    other = texts[:6] + ["Hello world"] + texts[7:]
    with pytest.raises(StoreError, match=r"acts holds other data: example 6 \(batch 1, row 2\)"):
        small_run(small_hm, tmp_path / "acts", other)
    after = {p.name: p.read_bytes() for p in (tmp_path / "acts").iterdir()}
    assert before == after
    # the lock was released with the error: the right prompts still resume (nothing to run)
    calls = count_forwards(small_hm)
    assert len(small_run(small_hm, tmp_path / "acts", texts)) == 10 and not calls


@pytest.mark.parametrize("previous_stats", [True, False])
def test_more_prompts_resume_and_append_equal_to_a_clean_run(tmp_path, small_hm, previous_stats):
    """The short last batch is uncommitted and its statistics go back to the batch before
    (kept in the manifest, or recounted from the shards when that file is gone)."""
    from store_worker import assert_same_store

    texts = prompts(14)
    small_run(small_hm, tmp_path / "acts", texts[:6])  # batches of 4 and 2
    if not previous_stats:
        path = tmp_path / "acts" / "manifest.json"
        manifest = json.loads(path.read_text())
        (tmp_path / "acts" / manifest["previous_stats"]).unlink()
        manifest["previous_stats"] = None
        path.write_text(json.dumps(manifest))
    calls = count_forwards(small_hm)
    extended = small_run(small_hm, tmp_path / "acts", texts)
    # batch 0 is kept; the short batch 1 runs again whole, then batches 2 and 3
    assert len(calls) == 3
    calls.clear()
    assert extended.complete
    assert_same_store(extended, small_run(small_hm, tmp_path / "clean", texts))
    assert sorted(p.name for p in (tmp_path / "acts").iterdir()) == sorted(
        p.name for p in (tmp_path / "clean").iterdir()
    )


@pytest.mark.parametrize("asked", [6, 8])
def test_fewer_prompts_are_refused(tmp_path, small_hm, asked):
    """A store holds exactly the examples asked: a prefix of it is refused (within a batch or
    at a batch boundary) with the way out."""
    small_run(small_hm, tmp_path / "acts", prompts(10))
    with pytest.raises(StoreError, match=f"holds 10 examples, more than the {asked} asked"):
        small_run(small_hm, tmp_path / "acts", prompts(asked))
    assert len(ActivationStore.open(tmp_path / "acts")) == 10


def test_overwrite_replaces_only_hookscope_files(tmp_path, small_hm):
    from store_worker import assert_same_store

    folder = tmp_path / "acts"
    small_run(small_hm, folder, prompts(10))
    (folder / "notes.txt").write_text("mine")
    other = ["Hello world", "A dog barked", "The cat sat on the mat"]
    replaced = small_run(small_hm, folder, other, overwrite=True)
    assert_same_store(replaced, small_run(small_hm, tmp_path / "clean", other))
    assert (folder / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [p.name for p in (tmp_path / "clean").iterdir()] + ["notes.txt"]
    )


def test_a_damaged_manifest_is_named(tmp_path, small_hm):
    small_run(small_hm, tmp_path / "acts", prompts(3))
    (tmp_path / "acts" / "manifest.json").write_text('{"format": "hooks')
    with pytest.raises(StoreError, match="manifest.json is not valid JSON"):
        small_run(small_hm, tmp_path / "acts", prompts(3))
    with pytest.raises(StoreError, match="manifest.json is not valid JSON"):
        ActivationStore.open(tmp_path / "acts")
    assert len(small_run(small_hm, tmp_path / "acts", prompts(3), overwrite=True)) == 3


def test_a_foreign_manifest_is_never_replaced(tmp_path, small_hm):
    (tmp_path / "acts").mkdir()
    (tmp_path / "acts" / "manifest.json").write_text('{"name": "my project"}')
    with pytest.raises(StoreError, match="not a hookscope activation-store manifest"):
        small_run(small_hm, tmp_path / "acts", prompts(3), overwrite=True)
    assert (tmp_path / "acts" / "manifest.json").read_text() == '{"name": "my project"}'


def test_a_different_extraction_names_the_fields(tmp_path, small_hm):
    small_run(small_hm, tmp_path / "acts", prompts(3))
    small_hm.config.batch_size = 2
    with pytest.raises(StoreError, match="batch_size: stored 4, asked 2") as error:
        small_hm.extract_cache(
            prompts(3),
            ["last", 0],
            extraction_config=ExtractionConfig(extract_resid_out=True, extract_mlp_out=True),
            output_dir=str(tmp_path / "acts"),
        )
    assert "extraction_config.extract_mlp_out: stored False, asked True" in str(error.value)


def test_a_store_without_fingerprints_is_not_resumed(tmp_path, small_hm):
    small_run(small_hm, tmp_path / "acts", prompts(5))
    path = tmp_path / "acts" / "manifest.json"
    manifest = json.loads(path.read_text())
    for shard in manifest["shards"]:
        del shard["data_sha256"]
    path.write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="did not fingerprint the data"):
        small_run(small_hm, tmp_path / "acts", prompts(5))


def test_records_are_fingerprinted_with_their_fields(tmp_path, small_hm):
    """Records keep their other fields (labels) in the store, so changing a label is other data."""
    records = [{"text": t, "label": i % 2} for i, t in enumerate(prompts(5))]
    store = small_run(
        small_hm,
        tmp_path / "acts",
        records,
        batch_saver=lambda batch: {"label": torch.tensor([r["label"] for r in batch])},
    )
    assert store.select(lambda f: f["label"] == 1).tolist() == [1, 3]
    relabelled = [dict(r, label=1) for r in records]
    with pytest.raises(StoreError, match="example 0 "):
        small_run(small_hm, tmp_path / "acts", relabelled)


def test_a_store_from_a_version_without_a_new_default_flag_resumes(tiny_llama, tmp_path):
    """A config flag added in a later version, left at its default, is the same extraction; one
    set to True is not."""
    import json

    from hookscope import ExtractionConfig, StoreError

    prompts = ["The cat sat on the mat", "A dog", "Hello there"]
    config = ExtractionConfig(extract_resid_out=True, layers=[0])
    tiny_llama.extract_cache(prompts[:2], ["last"], extraction_config=config, output_dir=tmp_path)
    manifest_path = tmp_path / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["description"]["extraction_config"]["extract_head_keys_projected"]  # older store
    manifest_path.write_text(json.dumps(manifest))
    store = tiny_llama.extract_cache(
        prompts, ["last"], extraction_config=config, output_dir=tmp_path
    )
    assert len(store) == 3
    asked = ExtractionConfig(extract_resid_out=True, layers=[0], extract_head_keys_projected=True)
    with pytest.raises(StoreError, match="extract_head_keys_projected: stored '\\(absent\\)'"):
        tiny_llama.extract_cache(prompts, ["last"], extraction_config=asked, output_dir=tmp_path)
