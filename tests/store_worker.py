"""Run an extraction to a store (used by test_store.py, which kills it part-way)."""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
from tiny_models import build_model, build_tokenizer  # noqa: E402

from hookscope import ExtractionConfig, HookedModel  # noqa: E402
from hookscope import dataset as dataset_module  # noqa: E402


def prompts(n: int) -> list[str]:
    words = ["cat", "dog", "capital", "Paris", "world", "the", "mat", "store", "drink", "Mary"]
    return [" ".join(words[(i * k) % len(words)] for k in range(1, 2 + i % 6)) for i in range(n)]


def run(folder: str, n: int, slow: float = 0.0):
    hm = HookedModel.from_hf(build_model("llama"), build_tokenizer())
    hm.config.batch_size = 50
    if slow:
        import time

        hm.register_forward_hook("model.layers.1", lambda m, a, o: time.sleep(slow))
    config = ExtractionConfig(extract_resid_out=True, extract_mlp_out=True)
    return hm.extract_cache(
        prompts(n),
        ["last", 0],
        extraction_config=config,
        output_dir=folder,
        batch_saver=lambda b: {"length": b["attention_mask"].sum(1)},
    )


if __name__ == "__main__":
    torch.set_num_threads(1)
    run(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))


def force_writer_thread(monkeypatch, thread: bool) -> None:
    """extract_cache's stores commit on the writer thread (``thread``) or between forwards."""
    writer = dataset_module.StoreWriter
    monkeypatch.setattr(
        dataset_module, "StoreWriter", lambda *a, **k: writer(*a, **{**k, "background": thread})
    )


def assert_same_store(store, clean) -> None:
    """``store`` holds exactly what ``clean`` (a fresh run on the same examples) holds: the same
    examples (fingerprints), values, running statistics and shard layout."""
    assert len(store) == len(clean)
    assert [s["data_sha256"] for s in store.manifest["shards"]] == [
        s["data_sha256"] for s in clean.manifest["shards"]
    ]
    assert [s["examples"] for s in store.manifest["shards"]] == [
        s["examples"] for s in clean.manifest["shards"]
    ]
    assert store.keys() == clean.keys()
    for key in clean.keys():
        assert torch.equal(store[key], clean[key]), key
    if clean.manifest["stats"]:
        for key in ("resid_out_1",):
            for part, value in clean.stats(key).items():
                assert torch.equal(store.stats(key)[part], value), (key, part)
