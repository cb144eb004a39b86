"""Dataset extraction: the cost of streaming to disk, and resident memory against data size.

    python benchmarks/bench_store.py [--rss-sizes 10000] [--rss-workload early|all-layers]
                                     [--timing 128 --rounds 5 --prompt-set short|varied] [--write]

SmolLM2-135M-Instruct, batch 32, save_logits=False.

Timing: the last-token residual stream of all 30 layers (the rows of benchmarks/RESULTS.md), one
process, the model loaded once, variants interleaved round by round, ratios paired within a
round, every store written to a fresh folder:
  in-memory            hm.extract_cache(prompts)
  output_dir           hm.extract_cache(prompts, output_dir=DIR): batch i committed on the
                       writer thread during forward i + 1
  output_dir, between forwards    every batch committed before the next forward (forced)
The last column is the time the caller spent inside the store's write() and finish() (queueing,
and waiting for the last batches at the end).

Resident memory (each row a fresh subprocess; the peak is reset before extract_cache through
/proc/self/clear_refs, so model loading does not hide it):
  reserved    the in-memory path: buffers for the whole dataset reserved at the first batch
  merge       the in-memory path as before: every batch kept, concatenated at the end
  store       output_dir (the data is on disk: the growth is the forward's working set)
Workloads: "early" = 7 points (resid_in, resid_mid, resid_out, attn_in, attn_out, mlp_out,
resid_in_post_layernorm) of layers 0-1 at [0, "last"]: the forward stops after layer 1, so 10k
prompts run in minutes; "all-layers" = resid_out of all 30 layers at "last".
"growth" is the peak RSS during extract_cache minus the RSS before it; "after batch 1" is the
peak minus the peak reached by the end of the first batch's forward (the forward's working set
is then allocated), i.e. what keeping the results costs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

CHILD = r"""
import json, sys, time, torch
sys.path.insert(0, sys.argv[4])
from common import dataset_prompts
import hookscope.dataset
from hookscope import ExtractionConfig, HookedModel
n, mode, folder, workload = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[5]
hookscope.dataset._RESERVE = mode != "merge"
prompts = dataset_prompts(n)
hm = HookedModel.from_pretrained()
hm.config.batch_size = 32
def status(field):  # MB; VmHWM is the peak RSS since the last reset (not the model's loading)
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
first = []
def saver(batch):
    if not first:
        first.append(status("VmHWM"))
    return None
with open("/proc/self/clear_refs", "w") as handle:
    handle.write("5")  # reset the peak to the current RSS
base = status("VmRSS")
start = time.perf_counter()
if workload == "all-layers":  # the rows of RESULTS.md: 30 points [n, 1, 576]
    config, positions = ExtractionConfig(extract_resid_out=True, save_logits=False), ["last"]
    points = 30
else:  # "early": 14 points [n, 2, 576] of layers 0-1; the forward stops after layer 1
    config = ExtractionConfig(
        extract_resid_in=True, extract_resid_mid=True, extract_resid_out=True,
        extract_attn_in=True, extract_attn_out=True, extract_mlp_out=True,
        extract_resid_in_post_layernorm=True, layers=[0, 1], save_logits=False)
    positions, points = [0, "last"], 14
out = hm.extract_cache(prompts, positions, extraction_config=config, batch_saver=saver,
                       output_dir=folder if mode == "store" else None)
elapsed = time.perf_counter() - start
peak = status("VmHWM")
slots = len(positions)
data = points * n * slots * 576 * 4 + n * slots  # float32 activations and the position_mask
if mode != "store":
    assert out.memory_size() == data, (out.memory_size(), data)
print(json.dumps({"n": n, "mode": mode, "seconds": elapsed, "examples_per_s": n / elapsed,
                  "data_mb": data / 2**20, "peak_mb": peak, "growth_mb": peak - base,
                  "after_first_mb": peak - first[0]}))
"""


def rss_rows(sizes: list[int], modes: list[str], workload: str) -> list[dict]:
    rows = []
    for n in sizes:
        for mode in modes:
            with tempfile.TemporaryDirectory() as folder:
                out = subprocess.run(
                    [sys.executable, "-c", CHILD, str(n), mode, folder + "/acts"]
                    + [str(Path(__file__).parent), workload],
                    capture_output=True,
                    text=True,
                    check=True,
                )
            rows.append({**json.loads(out.stdout.strip().splitlines()[-1]), "workload": workload})
            print(rows[-1], flush=True)
    return rows


def timing(n: int, rounds: int, prompt_set: str = "short") -> dict[str, list[float]]:
    """Seconds per run of each variant, interleaved (see the module docstring)."""
    from common import dataset_prompts, interleaved, varied_prompts

    import hookscope.dataset as dataset_module
    from hookscope import ExtractionConfig, HookedModel
    from hookscope.store import StoreWriter

    hm = HookedModel.from_pretrained()
    hm.config.batch_size = 32
    prompts = (
        dataset_prompts(n) if prompt_set == "short" else varied_prompts(hm.get_text_tokenizer(), n)
    )
    config = ExtractionConfig(extract_resid_out=True, save_logits=False)
    root = Path(tempfile.mkdtemp(prefix="bench-store-"))

    def run(folder_name: str | None, sync: bool = False, **options):
        def go():
            folder = None
            if folder_name is not None:
                folder = root / folder_name
                shutil.rmtree(folder, ignore_errors=True)
            WAITED.clear()
            writer = dataset_module.StoreWriter
            if sync:
                dataset_module.StoreWriter = lambda *a, **k: StoreWriter(
                    *a, **{**k, "background": False}
                )
            try:
                hm.extract_cache(
                    prompts, ["last"], extraction_config=config, output_dir=folder, **options
                )
            finally:
                dataset_module.StoreWriter = writer
            WAIT_BY_VARIANT.setdefault(label, []).append(sum(WAITED))

        label = folder_name or "in-memory"
        return go

    variants = {
        "in-memory": run(None),
        "output_dir": run("a"),
        "output_dir, between forwards": run("b", sync=True),
    }
    for method in ("write", "finish"):  # the caller's time spent in the store, per variant
        setattr(StoreWriter, method, _timed(getattr(StoreWriter, method)))
    try:
        times = interleaved(variants, repeats=rounds, warmup=1)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return times


WAITED: list[float] = []
WAIT_BY_VARIANT: dict[str, list[float]] = {}


def _timed(method):
    import functools
    import time

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            WAITED.append(time.perf_counter() - start)

    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rss-sizes", type=int, nargs="*", default=[10000])
    parser.add_argument("--rss-modes", nargs="+", default=["reserved", "merge", "store"])
    parser.add_argument(
        "--rss-workload",
        choices=["early", "all-layers"],
        default="early",
        help="early: 7 points of layers 0-1 at [0, last] (the forward stops after layer 1, so "
        "10k prompts run in minutes); all-layers: resid_out of all 30 at last",
    )
    parser.add_argument("--timing", type=int, default=128, help="prompts per timed run (0: skip)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--prompt-set",
        choices=["short", "varied"],
        default="short",
        help="timing prompts: short = 3-10 words (the store's worst case: the most data per "
        "token of forward); varied = 8-160 tokens (issue 19's dataset setting)",
    )
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    from common import machine, paired_ratio

    lines = [
        f"Machine: {machine()}",
        f"Command: `python benchmarks/bench_store.py --rss-sizes {' '.join(map(str, args.rss_sizes))} "
        f"--rss-workload {args.rss_workload} --timing {args.timing} --rounds {args.rounds} "
        f"--prompt-set {args.prompt_set}`",
        'SmolLM2-135M-Instruct, resid_out of all 30 layers at "last", batch 32, save_logits=False.',
    ]
    if args.timing:
        times = timing(args.timing, args.rounds, args.prompt_set)
        lines += [
            "",
            f"Time per run of {args.timing} {args.prompt_set} prompts, {args.rounds} interleaved "
            "rounds:",
            "",
            "| variant | median s | examples/s | ratio vs in-memory (median of paired) | "
            "min / max paired | caller's time in the store (write + finish), median |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        labels = {
            "in-memory": "in-memory",
            "output_dir": "a",
            "output_dir, between forwards": "b",
        }
        for name, values in times.items():
            pairs = [a / b for a, b in zip(values, times["in-memory"], strict=True)]
            median = statistics.median(values)
            waits = WAIT_BY_VARIANT.get(labels[name], [0.0])[1:]  # (after the warm-up)
            share = statistics.median(w / t for w, t in zip(waits, values, strict=True))
            lines.append(
                f"| {name} | {median:.2f} | {args.timing / median:.1f} | "
                f"{paired_ratio(times, name, 'in-memory'):.3f} | {min(pairs):.3f} / {max(pairs):.3f} | "
                f"{statistics.median(waits) * 1e3:.0f} ms ({share:.1%}) |"
            )
        print("\n".join(lines), flush=True)
    if args.rss_sizes:
        rows = rss_rows(args.rss_sizes, args.rss_modes, args.rss_workload)
        lines += [
            "",
            f"Resident memory, each row a fresh process (workload {args.rss_workload!r}):",
            "",
            "| prompts | mode | examples/s | data MB | peak RSS MB | growth MB | growth / data | "
            "growth after batch 1 MB | after batch 1 / data |",
            "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in rows:
            lines.append(
                f"| {r['n']} | {r['mode']} | {r['examples_per_s']:.0f} | {r['data_mb']:.0f} | "
                f"{r['peak_mb']:.0f} | {r['growth_mb']:.0f} | {r['growth_mb'] / r['data_mb']:.2f} | "
                f"{r['after_first_mb']:.0f} | {r['after_first_mb'] / r['data_mb']:.2f} |"
            )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        (Path(__file__).parent / "RESULTS_store.md").write_text(text)


if __name__ == "__main__":
    main()
