"""Patching sweeps on the IOI pair: skipping unchanged work vs the full batched sweep vs one
forward per site.

    python benchmarks/bench_patching.py [--repeats 3] [--write]

SmolLM2-135M-Instruct, an IOI prompt pair. Two grids:

* ``resid_out`` over 30 layers x every position (420 sites);
* ``head`` (each head's output, all positions) over 30 layers x 9 heads (270 sites).

Variants, run interleaved (the order rotates every round) on one shared machine:

* ``skip`` (the default): each row starts at its patched layer from the corrupt run's residual
  stream and at its patched position from the corrupt run's KV cache;
* ``batched`` (``skip_unchanged=False``): every row runs the whole prompt through every layer;
* ``loop`` (``batched=False``): one full forward per site through ``Patch`` interventions.

All compute the same grid (max differences printed; tests/test_sweep_reuse.py checks 1e-5 on every
tiny family). Ratios are medians of per-round ratios (paired: measured side by side).
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

VARIANTS = {
    "skip": {"skip_unchanged": True},
    "batched": {"skip_unchanged": False},
    "loop": {"batched": False},
}
GRIDS = {
    "resid_out": {"point": "resid_out", "per": "position"},
    "head": {"point": "head", "per": "head"},
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument(
        "--head-loop", action="store_true", help="also time one forward per site on the head grid"
    )
    parser.add_argument(
        "--write", action="store_true", help="rewrite benchmarks/RESULTS_patching.md"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
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

    def run(grid: str, variant: str):
        return activation_patching(
            hm,
            clean,
            corrupt,
            answers,
            batch_size=args.batch_size,
            **GRIDS[grid],
            **VARIANTS[variant],
        )

    for variant in ("skip", "batched", "loop"):  # untimed warm-up (first calls allocate)
        activation_patching(hm, clean, corrupt, answers, layers=[29], **VARIANTS[variant])
    names = list(VARIANTS)
    variants = {g: names if g == "resid_out" or args.head_loop else names[:2] for g in GRIDS}
    times = {(g, v): [] for g in GRIDS for v in variants[g]}
    results = {}
    for round_index in range(args.repeats):
        order = names[round_index % 3 :] + names[: round_index % 3]
        for grid in GRIDS:
            for variant in [v for v in order if v in variants[grid]]:
                start = time.perf_counter()
                results[grid, variant] = run(grid, variant)
                times[grid, variant].append(time.perf_counter() - start)
                print(
                    f"round {round_index} {grid} {variant}: {times[grid, variant][-1]:.2f} s",
                    flush=True,
                )
    text = "\n".join(report(args, times, results))
    print(text)
    if args.write:
        (Path(__file__).parent / "RESULTS_patching.md").write_text(text + "\n")


def _ratio(times, grid, slow, fast) -> float:
    return statistics.median(
        a / b for a, b in zip(times[grid, slow], times[grid, fast], strict=True)
    )


def _diff(results, grid, a, b) -> float:
    return (results[grid, a].per_example - results[grid, b].per_example).abs().max().item()


def report(args, times, results) -> list[str]:
    lines = [
        f"Machine: {machine()}",
        "Load average at the end (1/5/15 min): "
        + ", ".join(f"{x:.1f}" for x in os.getloadavg())
        + " (a machine shared with other jobs).",
        f"Command: `python benchmarks/bench_patching.py --repeats {args.repeats} --batch-size {args.batch_size}"
        f"{f' --threads {args.threads}' if args.threads else ''}{' --head-loop' if args.head_loop else ''}`",
        'SmolLM2-135M-Instruct, IOI pair ("When Mary and John went to the store, John gave a drink to" vs '
        'the same with "Mary"), 1 example, metric logit difference ( Mary - John).',
        "",
        "| grid | variant | forwards | median s | loop / this (paired) | batched / this (paired) |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for grid in GRIDS:
        shape = " x ".join(str(n) for n in results[grid, "skip"].values.shape)
        for variant in VARIANTS:
            if (grid, variant) not in times:
                continue
            result = results[grid, variant]
            loop = _ratio(times, grid, "loop", variant) if (grid, "loop") in times else None
            lines.append(
                f"| {grid} {shape} | {variant} | {result.forwards} | "
                f"{statistics.median(times[grid, variant]):.2f} | "
                f"{'not timed' if loop is None else f'{loop:.2f}x'} | "
                f"{_ratio(times, grid, 'batched', variant):.2f}x |"
            )
    lines.append("")
    for grid in GRIDS:
        pairs = [("skip", "loop"), ("skip", "batched"), ("batched", "loop")]
        diffs = [
            f"{a} vs {b} {_diff(results, grid, a, b):.2e}"
            for a, b in pairs
            if (grid, a) in results and (grid, b) in results
        ]
        lines.append(f"- {grid}: max |grid difference| {', '.join(diffs)} (normalised values).")
    lines.append(
        "- per-round times (s): "
        + "; ".join(f"{g} {v} {[round(t, 2) for t in times[g, v]]}" for g, v in times)
    )
    return lines


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
