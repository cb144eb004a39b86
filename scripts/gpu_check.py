"""GPU check: the core of the test suite on CUDA in bfloat16, plus the overhead benchmark row.

    make gpu-check            # or: python scripts/gpu_check.py [--dtype bfloat16]

Runs ``self_check`` (points, identities, padding, writes, bit-identity) on every tiny family and on
SmolLM2-135M, all on ``cuda`` in the given dtype, then times the plain forward against
last-token extraction of every layer on SmolLM2 (batch 8 x 128). Writes
``benchmarks/RESULTS_gpu.md``. The test suite itself never needs a GPU.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "benchmarks")]

import torch  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device here; run it on a machine with one.")
        return 1
    from bench_overhead import make_batch
    from common import interleaved, machine, table
    from tiny_models import FAMILIES, build_model, build_tokenizer

    from hookscope import ExtractionConfig, HookedModel

    dtype = getattr(torch, args.dtype)
    lines = [
        f"Machine: {machine()}",
        f"Command: `python scripts/gpu_check.py --dtype {args.dtype}`",
        "",
    ]
    failures = 0
    lines += ["| model | self-check |", "| --- | --- |"]
    for family in FAMILIES:
        hm = HookedModel.from_hf(build_model(family).to("cuda", dtype), build_tokenizer())
        report = hm.self_check(remember=False, print_report=False)
        failures += not report.passed
        failed = [r.name for r in report.rows if not r.passed]
        lines.append(
            f"| tiny {family} | {'pass' if report.passed else 'FAIL: ' + ', '.join(failed)} |"
        )
    smol = HookedModel.from_pretrained(device_map="cuda", torch_dtype=dtype)
    report = smol.self_check(remember=False, print_report=True)
    failures += not report.passed
    lines.append(f"| SmolLM2-135M | {'pass' if report.passed else 'FAIL'} |")

    batch = {k: v.cuda() for k, v in make_batch(smol.hf_model.config.vocab_size).items()}
    position_ids = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    config = ExtractionConfig(extract_resid_out=True)

    @torch.no_grad()
    def hf():
        return smol.hf_model(**batch, position_ids=position_ids, use_cache=False)

    times = interleaved(
        {"hf": hf, "last": lambda: smol.forward(batch, ["last"], extraction_config=config)},
        args.repeats,
    )
    lines += [
        "",
        f'SmolLM2-135M {args.dtype} on CUDA, batch 8 x 128, resid_out of every layer at "last":',
        "",
        table(times, "hf"),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    (ROOT / "benchmarks" / "RESULTS_gpu.md").write_text(text)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
