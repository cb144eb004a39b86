"""The on-disk store: equals the in-memory result, resumes after SIGKILL, detects corruption."""

from __future__ import annotations

import json
import os
import signal
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
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    partial = json.loads((folder / "manifest.json").read_text())
    assert 3 <= len(partial["shards"]) < N // 50 and not partial["complete"]
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
