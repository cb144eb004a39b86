"""Patching sweep: batched (one patch site per row) vs one forward per site.

    python benchmarks/bench_patching.py [--repeats 3] [--write]

SmolLM2-135M-Instruct, an IOI prompt pair, residual stream (resid_out) sweep over 30 layers x
every position. Both variants compute the same grid (checked here, and in tests/test_patching.py).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from common import machine  # noqa: E402

from hookscope import HookedModel  # noqa: E402
from hookscope.patching import activation_patching  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--write", action="store_true", help="rewrite benchmarks/RESULTS_patching.md"
    )
    args = parser.parse_args()
    hm = HookedModel.from_pretrained()
    tokenizer = hm.get_tokenizer()
    clean = tokenizer(
        ["When Mary and John went to the store, John gave a drink to"], return_tensors="pt"
    )
    corrupt = tokenizer(
        ["When Mary and John went to the store, Mary gave a drink to"], return_tensors="pt"
    )
    mary, john = (
        tokenizer(t, add_special_tokens=False)["input_ids"][0] for t in (" Mary", " John")
    )
    answers = ([mary], [john])

    def run(batched: bool):
        return activation_patching(
            hm,
            clean,
            corrupt,
            answers,
            point="resid_out",
            batch_size=args.batch_size,
            batched=batched,
        )

    times = {"batched": [], "loop": []}
    results = {}
    for round_index in range(args.repeats):
        for name in ["batched", "loop"] if round_index % 2 == 0 else ["loop", "batched"]:
            start = time.perf_counter()
            results[name] = run(name == "batched")
            times[name].append(time.perf_counter() - start)
    max_diff = (results["batched"].per_example - results["loop"].per_example).abs().max().item()
    ratios = [loop / fast for loop, fast in zip(times["loop"], times["batched"], strict=True)]
    grid = " x ".join(str(n) for n in results["batched"].values.shape)
    lines = [
        f"Machine: {machine()}",
        f"Command: `python benchmarks/bench_patching.py --repeats {args.repeats} --batch-size {args.batch_size}`",
        f"SmolLM2-135M-Instruct, IOI pair, resid_out sweep, grid {grid} (layers x positions), 1 example.",
        "",
        "| variant | forwards | median s |",
        "| --- | ---: | ---: |",
        f"| batched (batch {args.batch_size}) | {results['batched'].forwards} | {statistics.median(times['batched']):.2f} |",
        f"| one forward per site | {results['loop'].forwards} | {statistics.median(times['loop']):.2f} |",
        "",
        f"Speed-up (median of paired ratios): **{statistics.median(ratios):.2f}x**; max |grid difference| {max_diff:.2e}.",
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        (Path(__file__).parent / "RESULTS_patching.md").write_text(text + "\n")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
