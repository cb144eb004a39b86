"""hookscope vs TransformerLens 4 (TransformerBridge) vs nnsight 0.8: the same extraction.

    make bench-peers      # creates .venv-peers with the same torch / transformers pins, then runs this

Residual stream after every layer at the last token, batch 8 x 128 (no padding: the peers have
no per-example position language), on SmolLM2-135M-Instruct and a tiny Llama. Interleaved
rounds, paired ratios against the plain HF forward (SDPA). TransformerBridge forces eager
attention and mutates the model it wraps, so it gets its own eager copy.
  hookscope     hm.forward(batch, ["last"], ExtractionConfig(extract_resid_out=True))
  tl_bridge     bridge.run_with_cache(tokens, names_filter=resid_post hooks)  (keeps [B, T, d])
  nnsight       with lm.trace(tokens): layer.output[:, -1].save() for every layer
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(Path(__file__).parent), str(ROOT / "tests")]

import torch  # noqa: E402
from common import dataset_prompts, interleaved, machine, table  # noqa: E402

from hookscope import ExtractionConfig, HookedModel  # noqa: E402


def variants(folder: Path, hm: HookedModel, tokens: torch.Tensor, eager_copy) -> dict:
    from nnsight import LanguageModel
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    bridge = TransformerBridge.boot_transformers(
        str(folder), hf_model=eager_copy, tokenizer=tokenizer
    )
    lm = LanguageModel(copy.deepcopy(hm.hf_model), tokenizer=tokenizer)
    n_layers = hm.model_map.n_layers
    names = {f"blocks.{layer}.hook_resid_post" for layer in range(n_layers)}
    config = ExtractionConfig(extract_resid_out=True)
    mask = torch.ones_like(tokens)

    @torch.no_grad()
    def hf():
        return hm.hf_model(input_ids=tokens, attention_mask=mask, use_cache=False)

    @torch.no_grad()
    def tl():
        return bridge.run_with_cache(tokens, names_filter=lambda name: name in names)

    @torch.no_grad()
    def nn():
        saved = []  # nnsight runs the block deferred: collect into an outer list
        with lm.trace(tokens):
            for layer in lm.model.layers:
                saved.append(layer.output[:, -1].save())
        return saved

    from importlib.metadata import version

    versions = f"transformer-lens {version('transformer-lens')}, nnsight {version('nnsight')}"
    return {
        "hf": hf,
        "hookscope": lambda: hm.forward(
            {"input_ids": tokens, "attention_mask": mask}, ["last"], extraction_config=config
        ),
        "tl_bridge": tl,
        "nnsight": nn,
    }, versions


def dataset_throughput(folder: Path, n: int) -> str:
    """Last-token residual stream of every layer for ``n`` short prompts: hookscope's batched,
    padding-correct extract_cache vs the per-prompt loops the peers need (no per-example
    positions under padding)."""
    import time

    from nnsight import LanguageModel
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompts = dataset_prompts(n)
    hm = HookedModel.from_pretrained()
    hm.config.batch_size = 32
    tokenizer = AutoTokenizer.from_pretrained(folder)
    bridge = TransformerBridge.boot_transformers(
        str(folder),
        hf_model=AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager"),
        tokenizer=tokenizer,
    )
    lm = LanguageModel(AutoModelForCausalLM.from_pretrained(folder), tokenizer=tokenizer)
    names = {f"blocks.{layer}.hook_resid_post" for layer in range(hm.model_map.n_layers)}
    encoded = [tokenizer(p, return_tensors="pt")["input_ids"] for p in prompts]

    def run_hookscope():
        hm.extract_cache(
            prompts,
            ["last"],
            extraction_config=ExtractionConfig(extract_resid_out=True, save_logits=False),
            sort_by_length=True,
        )

    @torch.no_grad()
    def run_tl():
        for ids in encoded:
            _, cache = bridge.run_with_cache(ids, names_filter=lambda name: name in names)
            [cache[name][:, -1].clone() for name in names]

    @torch.no_grad()
    def run_nnsight():
        for ids in encoded:
            saved = []
            with lm.trace(ids):
                for layer in lm.model.layers:
                    saved.append(layer.output[:, -1].save())

    rows = ["| tool | examples/s |", "| --- | ---: |"]
    for name, run in (
        ("hookscope (batch 32, sort_by_length)", run_hookscope),
        ("TransformerBridge loop", run_tl),
        ("nnsight loop", run_nnsight),
    ):
        start = time.perf_counter()
        run()
        rows.append(f"| {name} | {n / (time.perf_counter() - start):.1f} |")
    return (
        f"### Dataset throughput: {n} prompts, SmolLM2, last-token resid_out of 30 layers\n\n"
        + "\n".join(rows)
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--write", action="store_true")
    parser.add_argument(
        "--prompts", type=int, default=1000, help="prompts in the dataset-throughput row"
    )
    args = parser.parse_args()
    import tempfile

    from tiny_models import build_model, build_tokenizer
    from transformers import AutoModelForCausalLM

    from hookscope.loading import default_model_dir

    sections = [
        f"Machine: {machine()}",
        f"Command: `python benchmarks/bench_peers.py --repeats {args.repeats}` (in .venv-peers)",
    ]
    generator = torch.Generator().manual_seed(0)
    smol = default_model_dir()
    hm = HookedModel.from_pretrained()
    tokens = torch.randint(10, hm.hf_model.config.vocab_size, (8, 128), generator=generator)
    runs, versions = variants(
        smol, hm, tokens, AutoModelForCausalLM.from_pretrained(smol, attn_implementation="eager")
    )
    times = interleaved(runs, args.repeats)
    sections += [
        f"Peers: {versions}",
        f"### SmolLM2-135M-Instruct, batch 8 x 128\n\n{table(times, 'hf')}",
    ]
    print(sections[-1], flush=True)
    with tempfile.TemporaryDirectory() as folder:
        build_model("llama").save_pretrained(folder)
        build_tokenizer().save_pretrained(folder)
        tiny = HookedModel.from_hf(build_model("llama"), build_tokenizer())
        tokens = torch.randint(10, 320, (8, 128), generator=generator)
        runs, _ = variants(
            Path(folder), tiny, tokens, build_model("llama", attn_implementation="eager")
        )
        times = interleaved(runs, args.repeats * 4)
    sections.append(f"### tiny random Llama, batch 8 x 128\n\n{table(times, 'hf')}")
    print(sections[-1])
    sections.append(dataset_throughput(smol, args.prompts))
    print(sections[-1])
    if args.write:
        (Path(__file__).parent / "RESULTS_peers.md").write_text("\n\n".join(sections) + "\n")


if __name__ == "__main__":
    main()
