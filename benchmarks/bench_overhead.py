"""Overhead of extraction: plain HF forward vs hookscope extracting the residual stream.

    python benchmarks/bench_overhead.py [--repeats 15] [--write]

Batch 8 x 128 tokens (left-padded rows of different lengths), on the embedded SmolLM2-135M and
on a tiny random Llama. Variants, interleaved in one run:
  hf            plain ``model(**batch)``
  hf_hidden     plain HF with ``output_hidden_states=True`` (the usual way to get the stream)
  last          hookscope, ``resid_out`` of every layer at ``"last"``
  all           hookscope, ``resid_out`` of every layer at every position (``"all"``)
  last_nologit  hookscope at ``"last"`` with ``save_logits=False``
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))

import torch  # noqa: E402
from common import interleaved, machine, table  # noqa: E402

from hookscope import ExtractionConfig, HookedModel  # noqa: E402


def make_batch(vocab: int, batch: int = 8, seq: int = 128) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(10, vocab, (batch, seq), generator=generator)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for row in range(batch):
        mask[row, : row * 4] = 0  # left padding of 0..28 tokens
    return {"input_ids": ids, "attention_mask": mask}


def bench(
    hm: HookedModel, repeats: int, batch: dict[str, torch.Tensor] | None = None
) -> dict[str, list[float]]:
    """Plain HF forward (with / without hidden states) vs hookscope extracting every layer's
    resid_out at "last" / "all" positions, interleaved; ``batch`` defaults to 8 x 128."""
    batch = batch if batch is not None else make_batch(hm.hf_model.config.vocab_size)
    position_ids = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    resid = ExtractionConfig(extract_resid_out=True)
    no_logits = ExtractionConfig(extract_resid_out=True, save_logits=False)

    @torch.no_grad()
    def hf():
        return hm.hf_model(**batch, position_ids=position_ids, use_cache=False)

    @torch.no_grad()
    def hf_hidden():
        return hm.hf_model(
            **batch, position_ids=position_ids, use_cache=False, output_hidden_states=True
        )

    variants = {
        "hf": hf,
        "hf_hidden": hf_hidden,
        "last": lambda: hm.forward(batch, ["last"], extraction_config=resid),
        "all": lambda: hm.forward(batch, ["all"], extraction_config=resid),
        "last_nologit": lambda: hm.forward(batch, ["last"], extraction_config=no_logits),
    }
    return interleaved(variants, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument(
        "--write", action="store_true", help="rewrite benchmarks/RESULTS_overhead.md"
    )
    args = parser.parse_args()
    from tiny_models import build_model, build_tokenizer

    sections = [
        f"Machine: {machine()}",
        f"Command: `python benchmarks/bench_overhead.py --repeats {args.repeats}`",
        "Batch: 8 x 128 tokens, left padding of 0..28 tokens per row.",
    ]
    for label, hm in (
        ("SmolLM2-135M-Instruct (float32, sdpa)", HookedModel.from_pretrained()),
        (
            "tiny random Llama (2 layers, d_model 64)",
            HookedModel.from_hf(build_model("llama"), build_tokenizer()),
        ),
    ):
        times = bench(hm, args.repeats)
        sections.append(f"### {label}\n\n{table(times, 'hf')}")
        print(sections[-1], flush=True)
    text = "\n\n".join(sections) + "\n"
    if args.write:
        (Path(__file__).parent / "RESULTS_overhead.md").write_text(text)


if __name__ == "__main__":
    main()
