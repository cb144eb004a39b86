"""Which shapes to compile on a CPU: the plain decoder, eager or compiled, over the same batches
with every batch padded to length buckets of 16 or 32 tokens, or run at its own length (static:
one graph per length; dynamic: one graph; dynamic with inductor's weight freezing). The measurement behind hookscope.compiled's shape
policy (RESULTS_compile.md, "Shape policy").

    python benchmarks/bench_compile_shapes.py [--prompts 256] [--rounds 2]

SmolLM2-135M-Instruct, float32, SDPA, batches of 32 sorted by length, prompts of 8-160 tokens
(common.varied_prompts). First passes (compiling) are reported apart; ratios are medians of
per-round ratios to the eager decoder, variants interleaved (order rotating each round).
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
from common import machine, varied_prompts  # noqa: E402

from hookscope import HookedModel  # noqa: E402
from hookscope.compiled import pad_to_bucket  # noqa: E402
from hookscope.dataset import iter_batches  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch._dynamo.config.recompile_limit = 64  # static exact lengths: one graph per batch

    hm = HookedModel.from_pretrained()
    tokenizer = hm.get_text_tokenizer()
    prompts = varied_prompts(tokenizer, args.prompts)
    decoder = hm.model_map.decoder
    batches = [
        {**hm.prepare_inputs(batch), "use_cache": False}
        for batch, _, _ in iter_batches(prompts, tokenizer, 32, sort_by_length=True)
    ]

    def shaped(multiple: int | None) -> list[dict]:
        side = tokenizer.padding_side
        return [
            pad_to_bucket(b, hm.hf_model, side, hm.pad_token_id, 32, multiple).model_inputs
            for b in batches
        ]

    static = torch.compile(decoder, dynamic=False)
    variants = {
        "eager, exact lengths": (decoder, shaped(None)),
        "compiled static, buckets of 32": (static, shaped(32)),
        "compiled static, buckets of 16": (static, shaped(16)),
        "compiled static, exact lengths": (static, shaped(None)),
        "compiled dynamic, exact lengths": (torch.compile(decoder, dynamic=True), shaped(None)),
        # inductor's weight freezing (oneDNN weight prepacking): bakes the weights into the graph
        "compiled dynamic + freezing, exact lengths": (
            torch.compile(decoder, dynamic=True, options={"freezing": True}),
            shaped(None),
        ),
    }

    def run(model, inputs) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            for batch in inputs:
                model(**batch)
        return time.perf_counter() - start

    first = {name: run(*variant) for name, variant in variants.items()}
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for round_ in range(args.rounds):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            times[name].append(run(*variants[name]))
    eager = times["eager, exact lengths"]
    print(f"Machine: {machine()}")
    print(f"{args.prompts} prompts, {len(batches)} batches of 32, {args.rounds} rounds\n")
    print("| decoder | tokens computed | first pass s | median s per pass | vs eager |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, (_, inputs) in variants.items():
        tokens = sum(b["input_ids"].numel() for b in inputs)
        ratio = statistics.median(t / e for t, e in zip(times[name], eager, strict=True))
        print(
            f"| {name} | {tokens:,} | {first[name]:.0f} | {statistics.median(times[name]):.2f} "
            f"| {ratio:.3f} |"
        )


if __name__ == "__main__":
    main()
