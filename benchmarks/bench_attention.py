"""Attention patterns of one layer at "last" vs the plain SDPA forward vs the whole model on eager.

    python benchmarks/bench_attention.py [--repeats 10] [--write]

SmolLM2-135M-Instruct, float32, batch 8 x 128 tokens (left padding of 0..28 tokens per row).
Variants, interleaved in one run:
  sdpa                  plain HF forward, SDPA kernel
  hookscope_pattern     hookscope on the SDPA model: every head's pattern of layer 15, row "last"
                        (and logits), other layers untouched
  hookscope_pattern_all hookscope: layer 15 patterns for every query row (["all"] x ["all"])
  eager                 the same weights on eager attention, plain forward
  eager_attentions      eager with output_attentions=True (how one gets patterns without hookscope)
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

from hookscope import ExtractionConfig, HookedModel  # noqa: E402


def variants(hm: HookedModel, eager_model, batch: dict[str, torch.Tensor]) -> dict:
    """The timed variants (see the module docstring) on ``batch``; ``eager_model`` holds the
    same weights on eager attention."""
    position_ids = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    one_layer = ExtractionConfig(extract_attn_pattern=True, layers=[15])

    @torch.no_grad()
    def run(model, **kwargs):
        return model(**batch, position_ids=position_ids, use_cache=False, **kwargs)

    return {
        "sdpa": lambda: run(hm.hf_model),
        "hookscope_pattern": lambda: hm.forward(batch, ["last"], extraction_config=one_layer),
        "hookscope_pattern_all": lambda: hm.forward(batch, ["all"], extraction_config=one_layer),
        "eager": lambda: run(eager_model),
        "eager_attentions": lambda: run(eager_model, output_attentions=True),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--write", action="store_true", help="rewrite benchmarks/RESULTS_attention.md"
    )
    args = parser.parse_args()

    hm = HookedModel.from_pretrained(attn_implementation="sdpa")
    eager = HookedModel.from_pretrained(attn_implementation="eager").hf_model
    batch = make_batch(hm.hf_model.config.vocab_size)
    times = interleaved(variants(hm, eager, batch), args.repeats)
    text = "\n\n".join(
        [
            f"Machine: {machine()}",
            f"Command: `python benchmarks/bench_attention.py --repeats {args.repeats}`",
            "SmolLM2-135M-Instruct (float32), batch 8 x 128 tokens, left padding of 0..28 tokens.",
            table(times, "sdpa"),
        ]
    )
    print(text)
    if args.write:
        (Path(__file__).parent / "RESULTS_attention.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
