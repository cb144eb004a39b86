"""The demo job: the embedded default model, its residual stream, and a logit-lens readout."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .config import ExtractionConfig
from .hooked_model import HookedModel

PROMPTS = [
    "The capital of France is",
    "The largest planet in the solar system is",
    "Water is made of hydrogen and",
]
TARGET = " Paris"


def lens_logits(hm: HookedModel, resid: torch.Tensor) -> torch.Tensor:
    """Read a residual-stream tensor ``[..., d_model]`` with the model's own final norm and
    unembedding -> ``[..., vocab]``. At the last layer this is exactly the model's logits."""
    with torch.no_grad():
        return hm.hf_model.get_output_embeddings()(hm.model_map.final_norm(resid))


def run_demo(out_dir: str | Path = "hookscope-demo", print_fn=print) -> dict:
    """Run the demo; returns a small summary dict (used by the tests)."""
    started = time.perf_counter()
    hm = HookedModel.from_pretrained()
    loaded = time.perf_counter()
    print_fn(f"{hm}\nloaded in {loaded - started:.1f} s")

    tokenizer = hm.get_tokenizer()
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    cache = hm.forward(batch, ["last"], extraction_config=ExtractionConfig(extract_resid_out=True))
    print_fn("\nTop next token at the last position of each prompt:")
    top_tokens = []
    for row, prompt in enumerate(PROMPTS):
        probs = cache["logits"][row, 0].softmax(-1)
        top = int(probs.argmax())
        token = hm.to_string_tokens([top])[0]
        top_tokens.append(token)
        print_fn(f"  {prompt!r:48} -> {token!r}  (p={probs[top]:.2f})")

    target_id = tokenizer(TARGET, add_special_tokens=False)["input_ids"][0]
    residual = cache.stack("resid_out")[:, 0, 0]  # [layers, d_model], first prompt, last token
    probs = lens_logits(hm, residual).softmax(-1)
    print_fn(f"\nLogit lens on {PROMPTS[0]!r} (last token), layer by layer:")
    print_fn(
        f"  {'layer':>5}  {'|resid_out|':>11}  {'top token':<14} {'p(' + TARGET + ')':>9}  rank"
    )
    first_top_layer = None
    for layer in range(hm.model_map.n_layers):
        top = int(probs[layer].argmax())
        rank = int((probs[layer] > probs[layer, target_id]).sum()) + 1
        if rank == 1 and first_top_layer is None:
            first_top_layer = layer
        print_fn(
            f"  {layer:>5}  {residual[layer].norm():>11.1f}  {hm.to_string_tokens([top])[0]!r:<14} "
            f"{probs[layer, target_id]:>9.3f}  {rank}"
        )
    print_fn(f"\n{TARGET!r} first becomes the top token at layer {first_top_layer}.")

    out = Path(out_dir)
    path = cache.save(out / "resid_out_last.safetensors")
    print_fn(f"Saved the cache ({len(cache)} keys) to {path}")
    print_fn(f"Done in {time.perf_counter() - started:.1f} s.")
    return {"top_tokens": top_tokens, "first_top_layer": first_top_layer, "cache_path": path}
