"""The compiled path against the limits: dataset extraction over prompts of varied lengths.

    python benchmarks/bench_compile.py [--prompts 256] [--repeats 5] [--write]

SmolLM2-135M-Instruct (float32, SDPA), ``--prompts`` prompts of 8-160 tokens, batches of
``--batch-size`` sorted by length, ``resid_out`` of all 30 layers at ``"last"``
(``save_logits=False``). Four variants over the same batches, interleaved round by round:

- ``hf_eager``: the plain HF decoder (``hf_model.model``, ``use_cache=False``), eager, no
  hooks: the eager limit;
- ``hookscope_eager``: ``extract_cache(..., sort_by_length=True)`` (tokenizes, plans, hooks);
- ``hf_compiled``: ``torch.compile(decoder)`` over the batches shaped as the compiled path
  shapes them (on a CPU: exact lengths, dynamic shapes; elsewhere: length buckets), no hooks:
  the compiled limit;
- ``hookscope_compiled``: ``extract_cache(..., compile=True)``.

Ratios are medians of per-round ratios. Compile time (the first pass of each compiled variant,
every bucket compiled) is reported apart. Each pass's activations are checked against
``hookscope_eager``'s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from common import (  # noqa: E402
    compiled_limit,
    interleaved,
    machine,
    paired_ratio,
    steady_allocator,
    varied_prompts,
)

from hookscope import ExtractionConfig, HookedModel  # noqa: E402
from hookscope.compiled import BUCKET, dynamic_shapes  # noqa: E402
from hookscope.dataset import iter_batches  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--allocator",
        choices=["steady", "default"],
        default="steady",
        help="glibc malloc with fixed thresholds (common.steady_allocator), or its default",
    )
    parser.add_argument(
        "--write", action="store_true", help="rewrite RESULTS_compile.md's report (its notes stay)"
    )
    args = parser.parse_args()
    if args.allocator == "steady" and not steady_allocator():
        print("fixed malloc thresholds not available here: glibc's default", flush=True)
        args.allocator = "default"

    hm = HookedModel.from_pretrained()
    hm.config.batch_size = args.batch_size
    tokenizer = hm.get_text_tokenizer()
    prompts = varied_prompts(tokenizer, args.prompts)
    lengths = [len(ids) for ids in tokenizer(prompts)["input_ids"]]
    config = ExtractionConfig(extract_resid_out=True, save_logits=False)
    decoder = hm.model_map.decoder
    batches = [  # no KV cache, as hookscope's own forward
        {**hm.prepare_inputs(batch), "use_cache": False}
        for batch, _, _ in iter_batches(prompts, tokenizer, args.batch_size, sort_by_length=True)
    ]
    compiled_decoder, shaped = compiled_limit(hm, batches, args.batch_size)

    def plain(model, inputs):
        def run():
            with torch.no_grad():
                for batch in inputs:
                    model(**batch)

        return run

    last = {}

    def extract(compile_):
        def run():
            last[compile_] = hm.extract_cache(
                prompts, ["last"], extraction_config=config, sort_by_length=True, compile=compile_
            )

        return run

    variants = {
        "hf_eager": plain(decoder, batches),
        "hookscope_eager": extract(False),
        "hf_compiled": plain(compiled_decoder, shaped),
        "hookscope_compiled": extract(True),
    }
    first_pass = {}
    for name, run in variants.items():  # warm-up; the compiled ones compile every bucket
        start = time.perf_counter()
        run()
        first_pass[name] = time.perf_counter() - start
        print(f"{name}: first pass {first_pass[name]:.1f} s", flush=True)
    eager, compiled = (last[flag].stack("resid_out") for flag in (False, True))
    difference = ((compiled - eager).abs().max() / eager.abs().max()).item()
    print(f"max relative difference compiled vs eager: {difference:.1e}", flush=True)

    times = interleaved(variants, args.repeats, warmup=0)
    report = render(args, lengths, times, first_pass, difference, len(batches))
    print(report)
    if args.write:
        write_keeping_notes(Path(__file__).parent / "RESULTS_compile.md", report)


def write_keeping_notes(path: Path, report: str) -> None:
    """Replace the generated report at the top of ``path``; the hand-written sections after it
    (each starting ``## ``) stay."""
    old = path.read_text() if path.exists() else ""
    notes = old[old.index("\n## ") + 1 :] if "\n## " in old else ""
    path.write_text(report.rstrip("\n") + "\n\n" + notes if notes else report)


def render(args, lengths, times, first_pass, difference, n_batches) -> str:
    rows = [
        "| variant | median s per pass | vs hf_eager | vs hf_compiled |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, values in times.items():
        rows.append(
            f"| {name} | {statistics.median(values):.2f} | {paired_ratio(times, name, 'hf_eager'):.3f} "
            f"| {paired_ratio(times, name, 'hf_compiled'):.3f} |"
        )
    return "\n".join(
        [
            "# Compiled extraction against the eager and compiled limits",
            "",
            f"Machine: {machine()} | OMP threads {os.environ.get('OMP_NUM_THREADS', 'default')}",
            f"Command: `python benchmarks/bench_compile.py --prompts {args.prompts} "
            f"--batch-size {args.batch_size} --repeats {args.repeats} --allocator {args.allocator}` "
            "(malloc: "
            + (
                "fixed thresholds, common.steady_allocator"
                if args.allocator == "steady"
                else "glibc's default, adaptive"
            )
            + ")",
            "",
            f"SmolLM2-135M-Instruct, float32, SDPA; {args.prompts} prompts of "
            f"{min(lengths)}-{max(lengths)} tokens (mean {statistics.mean(lengths):.0f}), "
            f"{n_batches} batches of {args.batch_size} sorted by length; resid_out of all 30 "
            f"layers at the last token, save_logits=False. Compiled variants: "
            + (
                "dynamic shapes, each batch at its own length (hookscope: MLPs on real tokens only)"
                if dynamic_shapes("cpu")
                else f"each batch padded to a multiple of {BUCKET} tokens"
            )
            + f". {args.repeats} interleaved rounds.",
            "",
            *rows,
            "",
            "First pass (warm-up; the compiled variants compile every bucket in it): "
            + ", ".join(f"{k} {v:.0f} s" for k, v in first_pass.items())
            + ".",
            "Per-round seconds: "
            + "; ".join(f"{k} {[round(v, 2) for v in vals]}" for k, vals in times.items())
            + ".",
            f"Max difference compiled vs eager activations, relative to the largest: {difference:.1e}.",
            "",
        ]
    )


if __name__ == "__main__":
    main()
