"""Build the SmolLM2 residual-stream dictionary from nothing but installed files (``make dictionary``).

1. **Corpus**: the Python reference's topic texts shipped in the standard library
   (``pydoc_data.topics``, ~113k SmolLM2 tokens of English prose and code), tokenised as one
   stream and cut into windows of ``--context`` tokens; ``--tokens`` worth of windows are
   drawn evenly over the stream and shuffled (seeded), so every shard (and the held-out last
   one) samples the whole corpus.
2. **Store**: the embedded SmolLM2-135M-Instruct's ``resid_out_{layer}`` at every token of each
   window (and the token ids), streamed to ``OUT/store`` (resumable: a killed run continues).
3. **Train**: a TopK SAE (:func:`hookscope.dictionaries.training.train_dictionary`) on every
   slot but the first of each window (position 0's norm is ~100x the others: an attention
   sink), leaving out the few other vectors with such "massive activations" (norm above
   ``--outlier-factor`` x the median; ~0.03% of tokens, yet ~90% of the variance), the last
   shard held out; saved to ``OUT/dictionary`` and summarised in ``OUT/summary.json``.

``OUT`` defaults to ``$HOOKSCOPE_CACHE/dictionaries/smollm2-resid_out_15``. Nothing is
downloaded; the same flags rebuild the same dictionary.

    python scripts/train_dictionary.py                 # extract (if needed) + train
    python scripts/train_dictionary.py --tokens 20000 --d-sae 1536 --k 32
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from hookscope import ExtractionConfig, HookedModel
from hookscope.dictionaries import save_dictionary
from hookscope.dictionaries.training import train_dictionary
from hookscope.loading import cache_dir
from hookscope.store_stream import store_vectors


def corpus_text() -> str:
    """The standard library's pydoc topic texts, sorted by topic, joined by blank lines."""
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    return "\n\n".join(topics[name] for name in sorted(topics))


def corpus_windows(tokenizer, context: int, tokens: int, seed: int) -> torch.Tensor:
    """``[n_windows, context]`` token ids: ``tokens // context`` windows evenly spaced over the
    tokenised corpus, in a seeded random order."""
    ids = torch.tensor(tokenizer(corpus_text(), add_special_tokens=False)["input_ids"])
    available = len(ids) // context
    count = min(available, max(1, tokens // context))
    starts = torch.linspace(0, available - 1, count).long() * context
    windows = torch.stack([ids[s : s + context] for s in starts.tolist()])
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    return windows[order]


def build_store(hm: HookedModel, windows: torch.Tensor, point: str, folder: Path, batch: int):
    """``point`` and the token ids at every token of every window, streamed to ``folder``."""
    config = ExtractionConfig.from_names([point], save_logits=False, save_input_ids=True)
    batches = [{"input_ids": w, "attention_mask": torch.ones_like(w)} for w in windows.split(batch)]
    return hm.extract_cache(
        batches, ["all"], extraction_config=config, output_dir=str(folder), progress=True
    )


def default_out(point: str) -> Path:
    return cache_dir() / "dictionaries" / f"smollm2-{point}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layer", type=int, default=15, help="resid_out layer (default 15 of 30)")
    parser.add_argument("--context", type=int, default=64, help="tokens per window")
    parser.add_argument("--tokens", type=int, default=40960, help="corpus tokens to extract")
    parser.add_argument("--extract-batch", type=int, default=32, help="windows per shard")
    parser.add_argument("--d-sae", type=int, default=2048, help="number of features")
    parser.add_argument("--k", type=int, default=64, help="features per token (TopK)")
    parser.add_argument("--activation", default="topk", choices=["topk", "batchtopk"])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument(
        "--outlier-factor", type=float, default=10.0,
        help="leave out vectors whose norm exceeds this x the median (attention sinks)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="default: $HOOKSCOPE_CACHE/...")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    point = f"resid_out_{args.layer}"
    out = args.out or default_out(point)
    hm = HookedModel.from_pretrained()
    started = time.perf_counter()
    windows = corpus_windows(hm.get_tokenizer(), args.context, args.tokens, args.seed)
    store = build_store(hm, windows, point, out / "store", args.extract_batch)
    extracted = time.perf_counter()
    norms = store_vectors(store, point, slice(1, None), shards=[0]).norm(dim=-1)
    max_norm = args.outlier_factor * norms.median().item()
    everything = store_vectors(store, point, slice(1, None)).norm(dim=-1)
    dictionary = train_dictionary(
        store, point, args.d_sae, args.k, activation=args.activation, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, seed=args.seed, slots=slice(1, None),
        max_norm=max_norm, log_every=25, log=lambda n: print(json.dumps(n), flush=True),
        name=f"smollm2_{point}",
    )  # fmt: skip
    trained = time.perf_counter()
    report = {k: v for k, v in dictionary.metadata["training"].items() if k != "history"}
    summary = {
        **report,
        "point": point,
        "corpus": f"pydoc_data.topics (Python {platform.python_version()}), windows of "
        f"{args.context} tokens, first token of each skipped",
        "tokens_extracted": int(windows.numel()),
        "outliers_left_out": int((everything > max_norm).sum()),
        "outlier_norms": sorted(everything[everything > max_norm].tolist()),
        "median_norm": everything.median().item(),
        "extract_seconds": round(extracted - started, 1),
        "train_seconds": round(trained - extracted, 1),
        "machine": f"{platform.machine()} {platform.processor() or ''}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads",
    }
    dictionary.metadata["corpus"] = summary["corpus"]
    save_dictionary(dictionary, out / "dictionary")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "dead_features"}, indent=1))
    return summary


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
