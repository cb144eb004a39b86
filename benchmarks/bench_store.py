"""Dataset extraction: peak memory and throughput, streamed to disk vs held in memory.

    python benchmarks/bench_store.py [--sizes 1000 10000] [--write]

SmolLM2-135M-Instruct, last-token residual stream of all 30 layers, batch 32. Each row runs in
a fresh subprocess so its peak resident memory (ru_maxrss) is its own:
  store      hm.extract_cache(..., output_dir=DIR)   (shards on disk, memory flat)
  in-memory  hm.extract_cache(...)                   (the reference design's approach: every
             batch kept and concatenated in memory)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

CHILD = r"""
import json, resource, sys, time, torch
sys.path.insert(0, sys.argv[4])
from common import dataset_prompts
from hookscope import ExtractionConfig, HookedModel
n, mode, folder = int(sys.argv[1]), sys.argv[2], sys.argv[3]
prompts = dataset_prompts(n)
hm = HookedModel.from_pretrained()
hm.config.batch_size = 32
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
config = ExtractionConfig(extract_resid_out=True, save_logits=False)
out = hm.extract_cache(prompts, ["last"], extraction_config=config,
                       output_dir=folder if mode == "store" else None)
elapsed = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"n": n, "mode": mode, "seconds": elapsed, "examples_per_s": n / elapsed,
                  "peak_mb": peak / 1024, "growth_mb": (peak - base) / 1024}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    from common import machine

    rows = []
    for n in args.sizes:
        for mode in ("store", "in-memory"):
            with tempfile.TemporaryDirectory() as folder:
                out = subprocess.run(
                    [
                        sys.executable,
                        "-c",
                        CHILD,
                        str(n),
                        mode,
                        folder + "/acts",
                        str(Path(__file__).parent),
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                )
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    lines = [
        f"Machine: {machine()}",
        f"Command: `python benchmarks/bench_store.py --sizes {' '.join(map(str, args.sizes))}`",
        'SmolLM2-135M-Instruct, resid_out of all 30 layers at "last", batch 32, save_logits=False.',
        "",
        "| prompts | mode | examples/s | peak RSS MB | growth during extraction MB |",
        "| ---: | --- | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {r['n']} | {r['mode']} | {r['examples_per_s']:.0f} | {r['peak_mb']:.0f} | {r['growth_mb']:.0f} |"
        for r in rows
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        (Path(__file__).parent / "RESULTS_store.md").write_text(text)


if __name__ == "__main__":
    main()
