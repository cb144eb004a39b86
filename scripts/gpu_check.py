"""GPU check: hookscope's self-check on CUDA in bfloat16, plus the benchmark rows on a GPU.

    make gpu-check            # or: python scripts/gpu_check.py [--dtype bfloat16] [--device cuda]

1. ``self_check`` (points vs HF hidden states, identities, padded == one-by-one, writes,
   bit-identity of the untouched forward) on every tiny family and on a SmolLM2-135M model,
   on the device in the given dtype.
2. Overhead: plain HF forward vs last-token / all-position extraction of every layer's
   resid_out, at batch 8 x 128 and 32 x 512 (left padding).
3. Attention: the variants of ``benchmarks/bench_attention.py`` (one layer's patterns at "last" / all
   rows vs plain SDPA vs eager, with and without ``output_attentions``).
4. Dataset throughput: 1,000 prompts, last-token resid_out of every layer: hookscope's batched
   ``extract_cache`` (eager and ``compile=True``) vs the plain HF decoder over the same batches
   (eager, and compiled without hooks: the two limits) and a batch-size-1 loop over HF
   ``output_hidden_states`` (what the reference design does), with tokens/s and peak device
   memory. The compiled rows were added without a GPU to run them on (not run yet).

The SmolLM2 weights are the embedded GGUF when it is installed; on a machine without it (the
GPU machines here cannot carry the 94 MB file) a model of the same architecture and shape with
random weights stands in: every check and timing depends on the shapes, not on the values.
Writes ``benchmarks/RESULTS_gpu.md``. The test suite itself never needs a GPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "benchmarks"), str(ROOT / "src")]

import torch  # noqa: E402


def smollm2(device: str, dtype: torch.dtype, attn: str = "sdpa", random_weights: bool = False):
    """The embedded SmolLM2-135M, or a random model of its exact architecture."""
    from hookscope import HookedModel

    reason = "--random-weights"
    if not random_weights:
        try:
            hm = HookedModel.from_pretrained(
                device_map=device, torch_dtype=dtype, attn_implementation=attn
            )
            return hm, "SmolLM2-135M-Instruct (embedded GGUF weights)"
        except Exception as error:  # noqa: BLE001 - any failure means "not installed here"
            reason = f"embedded model unavailable: {type(error).__name__}"
    from common import smollm2_config
    from tiny_models import build_tokenizer
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(smollm2_config(), attn_implementation=attn, dtype=dtype)
    model = model.to(device).eval()
    return (
        HookedModel.from_hf(model, build_tokenizer()),
        f"SmolLM2-135M architecture, random weights ({reason})",
    )


def dataset_throughput(hm, n: int, device: str) -> list[str]:
    """Examples/s, tokens/s and peak device memory over the same batches of 32 (sorted by
    length): hookscope's extract_cache eager and compiled (``compile=True``) next to the plain
    HF decoder eager (the eager limit) and ``torch.compile`` d without hooks over the same
    shapes as compile=True (the compiled limit), and a batch-size-1 loop over HF
    ``output_hidden_states`` (what the reference design does)."""
    from common import compiled_limit, dataset_prompts

    from hookscope import ExtractionConfig
    from hookscope.dataset import iter_batches

    prompts = dataset_prompts(n)
    tokenizer = hm.get_text_tokenizer()
    config = ExtractionConfig(extract_resid_out=True, save_logits=False)
    hm.config.batch_size = 32
    batches = [
        {**hm.prepare_inputs(b), "use_cache": False}
        for b, _, _ in iter_batches(prompts, tokenizer, 32, True)
    ]
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    compiled_decoder, shaped = compiled_limit(hm, batches, 32)

    def run_hookscope(compile_: bool):
        return lambda: hm.extract_cache(
            prompts, ["last"], extraction_config=config, sort_by_length=True, compile=compile_
        )

    def run_plain(model, inputs):
        def run():
            for batch in inputs:
                model(**batch)

        return run

    @torch.no_grad()
    def run_loop():
        rows = []
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
            hidden = hm.hf_model(ids, output_hidden_states=True, use_cache=False).hidden_states
            rows.append(torch.stack([h[:, -1] for h in hidden[1:]]).cpu())

    lines = [
        "| tool | examples/s | real tokens/s | peak device MB |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, run in (
        ("plain HF decoder, eager, batch 32 (the eager limit)", run_plain(hm.model_map.decoder, batches)),
        ("torch.compile(decoder), the shapes of compile=True, no hooks (the compiled limit)", run_plain(compiled_decoder, shaped)),
        ("hookscope extract_cache (batch 32, sort_by_length)", run_hookscope(False)),
        ("hookscope extract_cache compile=True", run_hookscope(True)),
        ("HF output_hidden_states, batch-size-1 loop", run_loop),
    ):  # fmt: skip
        with torch.no_grad():
            run()  # warm-up (kernels, allocator, compiles)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        with torch.no_grad():
            run()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else float("nan")
        lines.append(f"| {name} | {n / seconds:.1f} | {tokens / seconds:.0f} | {peak:.0f} |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu for a dry run")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--prompts", type=int, default=1000)
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="use SmolLM2's architecture with random weights even where the GGUF is installed",
    )
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "RESULTS_gpu.md"))
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu-check: no CUDA device here; run it on a machine with one.")
        return 1
    from bench_attention import variants as attention_variants
    from bench_overhead import bench as bench_overhead
    from bench_overhead import make_batch
    from common import interleaved, machine, table
    from tiny_models import FAMILIES, build_model, build_tokenizer

    from hookscope import HookedModel

    dtype = getattr(torch, args.dtype)

    def on_device(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {key: value.to(args.device) for key, value in batch.items()}

    lines = [
        f"Machine: {machine()}",
        f"Command: `python scripts/gpu_check.py --dtype {args.dtype} --device {args.device}`",
        "",
        "### Self-check on the device",
        "",
        "| model | self-check |",
        "| --- | --- |",
    ]
    failures = 0

    def record(label: str, hm) -> None:
        nonlocal failures
        report = hm.self_check(remember=False, print_report=False)
        failures += not report.passed
        failed = [f"{r.name} ({r.detail})" for r in report.rows if not r.passed]
        lines.append(f"| {label} | {'pass' if report.passed else 'FAIL: ' + '; '.join(failed)} |")
        print(lines[-1], flush=True)

    for family in FAMILIES:
        record(
            f"tiny {family}",
            HookedModel.from_hf(build_model(family).to(args.device, dtype), build_tokenizer()),
        )
    smol, smol_label = smollm2(args.device, dtype, random_weights=args.random_weights)
    record(smol_label, smol)

    for batch_size, seq in ((8, 128), (32, 512)):
        batch = on_device(make_batch(smol.hf_model.config.vocab_size, batch_size, seq))
        times = bench_overhead(smol, args.repeats, batch)
        lines += [
            "",
            f"### Overhead: {smol_label}, {args.dtype}, batch {batch_size} x {seq}, "
            "resid_out of every layer",
            "",
            table(times, "hf"),
        ]
        print("\n".join(lines[-3:]), flush=True)

    eager, _ = smollm2(args.device, dtype, attn="eager", random_weights=args.random_weights)
    eager.hf_model.load_state_dict(smol.hf_model.state_dict())
    batch = on_device(make_batch(smol.hf_model.config.vocab_size))
    lines += [
        "",
        f"### Attention: layer 15 patterns, {args.dtype}, batch 8 x 128",
        "",
        table(interleaved(attention_variants(smol, eager.hf_model, batch), args.repeats), "sdpa"),
    ]
    print(lines[-1], flush=True)
    del eager

    lines += [
        "",
        f"### Dataset throughput: {args.prompts} prompts, last-token resid_out of every layer",
        "",
        *dataset_throughput(smol, args.prompts, args.device),
    ]
    print("\n".join(lines[-4:]), flush=True)

    text = "\n".join(lines) + "\n"
    Path(args.output).write_text(text)
    print(f"\nwrote {args.output}; {failures} self-check failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
