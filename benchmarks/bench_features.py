"""Dictionary features over a dataset at "last" vs extracting the point they read.

    python benchmarks/bench_features.py [--repeats 5] [--write]

SmolLM2-135M-Instruct (float32), ``extract_cache`` over 8 batches of 8 x 128 tokens (left padding
of 0..12 tokens per row; ``--batches`` / ``--batch`` / ``--seq`` change it), at ``["last"]``, no logits (the forward stops after layer 15). The
dictionary is a random TopK SAE on ``resid_out_15`` (d_sae = 16 x 576 = 9216, k = 64): timings
depend on shapes, not on values. Variants, interleaved in one run:
  resid            extract resid_out_15 (the baseline: the point the dictionary reads)
  features         features_res15, dense [batch, 1, 9216]
  features_topk    features_res15 / feature_ids_res15, the top 64 per slot
  features_error   features and reconstruction_error_res15
The issue's target: features at "last" >= 0.9x the throughput of extraction without them (a
time ratio <= 1.11).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from bench_overhead import make_batch  # noqa: E402
from common import interleaved, machine, table  # noqa: E402

from hookscope import Dictionary, ExtractionConfig, HookedModel  # noqa: E402


def dictionary(d_model: int = 576, expansion: int = 16, k: int = 64) -> Dictionary:
    g = torch.Generator().manual_seed(0)
    d_sae = d_model * expansion
    return Dictionary(
        W_enc=torch.randn(d_model, d_sae, generator=g) / d_model**0.5,
        b_enc=torch.zeros(d_sae),
        W_dec=torch.randn(d_sae, d_model, generator=g) / d_sae**0.5,
        b_dec=torch.zeros(d_model),
        activation="topk",
        k=k,
        reads="resid_out_15",
        name="res15",
    )


def variants(hm: HookedModel, batches: list[dict[str, torch.Tensor]]) -> dict:
    configs = {
        "resid": ExtractionConfig(extract_resid_out=True, layers=[15], save_logits=False),
        "features": ExtractionConfig(extract_features=["res15"], save_logits=False),
        "features_topk": ExtractionConfig(
            extract_features=["res15"], feature_top_k=64, save_logits=False
        ),
        "features_error": ExtractionConfig(
            extract_features=["res15"], extract_reconstruction_error=True, save_logits=False
        ),
    }
    return {
        name: (lambda c=config: hm.extract_cache(batches, ["last"], extraction_config=c))
        for name, config in configs.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--write", action="store_true", help="rewrite RESULTS_features.md")
    args = parser.parse_args()
    hm = HookedModel.from_pretrained(attn_implementation="sdpa")
    hm.attach_dictionary(dictionary())
    vocab = hm.hf_model.config.vocab_size
    batches = [make_batch(vocab, batch=args.batch, seq=args.seq) for _ in range(args.batches)]
    times = interleaved(variants(hm, batches), args.repeats)
    text = "\n\n".join(
        [
            f"Machine: {machine()}",
            f"Command: `python benchmarks/bench_features.py --repeats {args.repeats} "
            f"--batches {args.batches} --batch {args.batch} --seq {args.seq}`",
            f"SmolLM2-135M-Instruct (float32), extract_cache over {args.batches} batches of "
            f"{args.batch} x {args.seq} tokens at "
            '["last"], no logits; a TopK SAE on resid_out_15 (d_sae 9216, k 64). Ratios are '
            "times (lower is faster); throughput relative to `resid` is 1 / ratio.",
            table(times, "resid"),
        ]
    )
    print(text)
    if args.write:
        (Path(__file__).parent / "RESULTS_features.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
