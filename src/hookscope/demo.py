"""The demo job on the embedded default model: logit lens, activation patching, attention."""

from __future__ import annotations

import time
from pathlib import Path

from .config import ExtractionConfig
from .hooked_model import HookedModel
from .lens import lens_logits, logit_lens
from .patching import activation_patching
from .points import parse_point, point_key

PROMPTS = [
    "The capital of France is",
    "The largest planet in the solar system is",
    "Water is made of hydrogen and",
]
TARGET = " Paris"
IOI_CLEAN = "When Mary and John went to the store, John gave a drink to"
IOI_CORRUPT = "When Mary and John went to the store, Mary gave a drink to"

__all__ = ["lens_logits", "run_demo"]


def run_demo(out_dir: str | Path = "hookscope-demo", print_fn=print) -> dict:
    """Run the demo and write its figures; returns a summary dict (used by the tests)."""
    from . import plot

    started = time.perf_counter()
    out = Path(out_dir)
    hm = HookedModel.from_pretrained()
    name = "SmolLM2-135M-Instruct"
    print_fn(f"{hm}\nloaded in {time.perf_counter() - started:.1f} s")
    tokenizer = hm.get_tokenizer()

    # 1. next tokens and the residual stream at the last position
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    cache = hm.forward(batch, ["last"], extraction_config=ExtractionConfig(extract_resid_out=True))
    print_fn("\n1. Top next token at the last position of each prompt:")
    top_tokens = []
    for row, prompt in enumerate(PROMPTS):
        probs = cache["logits"][row, 0].softmax(-1)
        top = int(probs.argmax())
        top_tokens.append(hm.to_string_tokens([top])[0])
        print_fn(f"   {prompt!r:48} -> {top_tokens[-1]!r}  (p={probs[top]:.2f})")
    cache_path = cache.save(out / "resid_out_last.safetensors")

    # 2. logit lens on the factual prompt
    lens = logit_lens(hm, PROMPTS[0], ["all"])
    target_id = tokenizer(TARGET, add_special_tokens=False)["input_ids"][0]
    rank = lens.rank(target_id)[:, 0, -1]
    prob = lens.prob(target_id)[:, 0, -1]
    tops = lens.top_k(1, example=0, position=-1)
    first_top_layer = next(
        (layer for layer, r in zip(lens.layers, rank.tolist(), strict=True) if r == 1), None
    )
    print_fn(
        f"\n2. Logit lens on {PROMPTS[0]!r} (last token): layer, top token, p({TARGET!r}), rank"
    )
    for index, layer in enumerate(lens.layers):
        if index % 3 == 2 or index >= len(lens.layers) - 4:
            print_fn(
                f"   {layer:>5}  {tops[index][0][0]!r:<12} {prob[index]:>7.3f}  {int(rank[index])}"
            )
    print_fn(f"   {TARGET!r} first becomes the top token at layer {first_top_layer}.")
    plot.lens_figure(lens, name, path=out / "logit_lens.png")

    # 3. activation patching on an IOI pair
    clean, corrupt = (tokenizer([t], return_tensors="pt") for t in (IOI_CLEAN, IOI_CORRUPT))
    mary, john = (
        tokenizer(t, add_special_tokens=False)["input_ids"][0] for t in (" Mary", " John")
    )
    sweep_start = time.perf_counter()
    result = activation_patching(hm, clean, corrupt, ([mary], [john]), point="resid_out")
    print_fn(
        f"\n3. Activation patching, resid_out, {IOI_CLEAN!r} -> ' Mary' vs ' John':\n"
        f"   logit diff clean {result.clean_metric[0]:.2f}, corrupt {result.corrupt_metric[0]:.2f}; "
        f"{result.values.numel()} sites in {result.forwards} batched forwards "
        f"({time.perf_counter() - sweep_start:.1f} s)"
    )
    positions = result.labels["position"]
    for layer in (0, 10, 20, 29):
        best = int(result.values[layer].abs().argmax())
        print_fn(
            f"   layer {layer:>2}: strongest at position {best} {positions[best]!r} "
            f"({result.values[layer, best]:+.2f})"
        )
    plot.patching_figure(result, name, path=out / "patching_resid_out.png")

    # 4. the head that moves the indirect object's name to the last position
    ids = clean["input_ids"][0]
    io_position = int((ids == mary).nonzero()[0])
    rows = hm.forward(
        clean,
        ["last"],
        extraction_config=ExtractionConfig(extract_attn_pattern=True, attn_pattern_all_keys=True),
    )
    points = [parse_point(key) for key in rows if key.startswith("pattern_")]
    scores = {(p.layer, p.head): float(rows[p.name][0, 0, io_position]) for p in points}
    layer, head = max(scores, key=scores.get)
    full = hm.forward(
        clean,
        ["all"],
        extraction_config=ExtractionConfig(
            extract_attn_pattern=True, attn_heads=[{"layer": layer, "head": head}]
        ),
    )
    pattern = full[point_key("pattern", layer, head)][0]
    tokens = hm.to_string_tokens(ids)
    print_fn(
        f"\n4. Head L{layer}H{head} sends {scores[(layer, head)]:.2f} of the last token's attention "
        f"to {tokens[io_position]!r} (the indirect object)."
    )
    plot.attention_figure(pattern, tokens, tokens, name, layer, head, path=out / "attention.png")

    top_id = lens.probs[:, 0].argmax(-1)
    page = plot.html_page(
        f"hookscope demo: {name}",
        [
            plot.heatmap_html(
                lens.probs[:, 0].max(-1).values,
                lens.layers,
                lens.tokens[0],
                f"Logit lens on {PROMPTS[0]!r}: top token per layer and position",
                "top-token probability",
                [[t for t in hm.to_string_tokens(r.tolist())] for r in top_id],
            ),
            plot.heatmap_html(
                result.values,
                result.labels["layer"],
                positions,
                "Activation patching (resid_out), normalised logit difference",
                "restored fraction",
            ),
            plot.heatmap_html(
                pattern,
                tokens,
                tokens,
                f"Attention pattern, layer {layer} head {head}",
                "probability",
            ),
        ],
        path=out / "index.html",
    )
    print_fn(
        f"\nWrote {out}/logit_lens.png, patching_resid_out.png, attention.png, index.html "
        f"({len(page) // 1024} KB) and {cache_path.name}."
    )
    print_fn(f"Done in {time.perf_counter() - started:.1f} s.")
    return {
        "top_tokens": top_tokens,
        "first_top_layer": first_top_layer,
        "cache_path": cache_path,
        "patching": result,
        "head": (layer, head),
        "out": out,
    }
