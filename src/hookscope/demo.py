"""The demo job on the embedded default model: logit lens, activation patching, attention."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

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


@dataclass
class _Demo:
    """What every step of the demo shares: the model, where figures go, how to print."""

    hm: HookedModel
    out: Path
    say: Callable[[str], Any]
    name: str = "SmolLM2-135M-Instruct"
    head_scores: dict = field(default_factory=dict)  # (layer, head) -> attention to the IO

    @property
    def tokenizer(self) -> Any:
        return self.hm.get_tokenizer()

    def token_id(self, text: str) -> int:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"][0]


def _next_tokens(demo: _Demo) -> tuple[list[str], Path]:
    """Step 1: the top next token of each prompt; saves the last-position residual stream
    (``resid_out_l`` ``[3, 1, d_model]`` and logits). Returns (top tokens, saved file)."""
    batch = demo.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    config = ExtractionConfig(extract_resid_out=True)
    cache = demo.hm.forward(batch, ["last"], extraction_config=config)
    demo.say("\n1. Top next token at the last position of each prompt:")
    top_tokens = []
    for row, prompt in enumerate(PROMPTS):
        probs = cache["logits"][row, 0].softmax(-1)
        top = int(probs.argmax())
        top_tokens.append(demo.hm.to_string_tokens([top])[0])
        demo.say(f"   {prompt!r:48} -> {top_tokens[-1]!r}  (p={probs[top]:.2f})")
    return top_tokens, cache.save(demo.out / "resid_out_last.safetensors")


def _lens_step(demo: _Demo) -> tuple[Any, int | None]:
    """Step 2: the logit lens on the factual prompt; returns (lens, first layer where the
    target is the top token, or None)."""
    from . import plot

    lens = logit_lens(demo.hm, PROMPTS[0], ["all"])
    target_id = demo.token_id(TARGET)
    rank = lens.rank(target_id)[:, 0, -1]
    prob = lens.prob(target_id)[:, 0, -1]
    tops = lens.top_k(1, example=0, position=-1)
    first_top_layer = next(
        (layer for layer, r in zip(lens.layers, rank.tolist(), strict=True) if r == 1), None
    )
    demo.say(
        f"\n2. Logit lens on {PROMPTS[0]!r} (last token): layer, top token, p({TARGET!r}), rank"
    )
    for index, layer in enumerate(lens.layers):
        if index % 3 == 2 or index >= len(lens.layers) - 4:
            demo.say(
                f"   {layer:>5}  {tops[index][0][0]!r:<12} {prob[index]:>7.3f}  {int(rank[index])}"
            )
    demo.say(f"   {TARGET!r} first becomes the top token at layer {first_top_layer}.")
    plot.lens_figure(lens, demo.name, path=demo.out / "logit_lens.png")
    return lens, first_top_layer


def _patching_step(demo: _Demo, clean: Any, corrupt: Any) -> Any:
    """Step 3: activation patching of resid_out on the IOI pair; returns the PatchingResult
    (values ``[n_layers, n_positions]``)."""
    from . import plot

    mary, john = demo.token_id(" Mary"), demo.token_id(" John")
    sweep_start = time.perf_counter()
    result = activation_patching(demo.hm, clean, corrupt, ([mary], [john]), point="resid_out")
    demo.say(
        f"\n3. Activation patching, resid_out, {IOI_CLEAN!r} -> ' Mary' vs ' John':\n"
        f"   logit diff clean {result.clean_metric[0]:.2f}, corrupt {result.corrupt_metric[0]:.2f}; "
        f"{result.values.numel()} sites in {result.forwards} batched forwards "
        f"({time.perf_counter() - sweep_start:.1f} s)"
    )
    positions = result.labels["position"]
    for layer in (0, 10, 20, 29):
        best = int(result.values[layer].abs().argmax())
        demo.say(
            f"   layer {layer:>2}: strongest at position {best} {positions[best]!r} "
            f"({result.values[layer, best]:+.2f})"
        )
    plot.patching_figure(result, demo.name, path=demo.out / "patching_resid_out.png")
    return result


def _strongest_head(demo: _Demo, clean: Any, io_position: int) -> tuple[int, int, float]:
    """(layer, head, attention) of the head whose last-token row attends most to the
    indirect object."""
    rows = demo.hm.forward(
        clean,
        ["last"],
        extraction_config=ExtractionConfig(extract_attn_pattern=True, attn_pattern_all_keys=True),
    )
    points = [parse_point(key) for key in rows if key.startswith("pattern_")]
    scores = {(p.layer, p.head): float(rows[p.name][0, 0, io_position]) for p in points}
    demo.head_scores = scores
    layer, head = max(scores, key=scores.get)
    return layer, head, scores[(layer, head)]


def _head_step(demo: _Demo, clean: Any) -> tuple[tuple[int, int], torch.Tensor, list[str]]:
    """Step 4: the head that moves the indirect object's name to the last position; returns
    ((layer, head), its full pattern ``[seq, seq]``, the prompt's tokens)."""
    from . import plot

    ids = clean["input_ids"][0]
    io_position = int((ids == demo.token_id(" Mary")).nonzero()[0])
    layer, head, score = _strongest_head(demo, clean, io_position)
    full = demo.hm.forward(
        clean,
        ["all"],
        extraction_config=ExtractionConfig(
            extract_attn_pattern=True, attn_heads=[{"layer": layer, "head": head}]
        ),
    )
    pattern = full[point_key("pattern", layer, head)][0]
    tokens = demo.hm.to_string_tokens(ids)
    demo.say(
        f"\n4. Head L{layer}H{head} sends {score:.2f} of the last token's attention "
        f"to {tokens[io_position]!r} (the indirect object)."
    )
    plot.attention_figure(
        pattern, tokens, tokens, demo.name, layer, head, path=demo.out / "attention.png"
    )
    return (layer, head), pattern, tokens


def _html_page(demo: _Demo, lens: Any, result: Any, head_step: tuple, tops: list) -> str:
    """The demo's report, ``index.html`` (``hookscope.report``): patching, lens, attention of
    the name-mover head and its neighbours by score, and the top next tokens; returns its text."""
    from .report import Report

    (layer, head), _, tokens = head_step
    heads = [(layer, head)] + [h for h in _top_heads(demo, 4) if h != (layer, head)][:3]
    clean = demo.tokenizer([IOI_CLEAN], return_tensors="pt")
    patterns = demo.hm.forward(
        clean,
        ["all"],
        extraction_config=ExtractionConfig(
            extract_attn_pattern=True, attn_heads=[{"layer": a, "head": b} for a, b in heads]
        ),
    )
    report = Report(f"hookscope demo: {demo.name}", "Every number below is this run's.")
    report.add_table(
        [(repr(p), repr(t)) for p, t in zip(PROMPTS, tops, strict=True)],
        ["prompt", "top next token"],
        title="1. Top next token at the last position",
    )
    report.add(lens, title=f"2. Logit lens on {PROMPTS[0]!r}", target=demo.token_id(TARGET),
               prompt=PROMPTS[0], model=demo.name)  # fmt: skip
    report.add(result, title="3. Activation patching of resid_out on the IOI pair",
               prompts=(IOI_CLEAN, IOI_CORRUPT), answers=(" Mary", " John"), model=demo.name)  # fmt: skip
    report.add_attention(patterns, tokens, heads, title=f"4. Attention on {IOI_CLEAN!r}")
    page = report.html()
    report.write(demo.out / "index.html")
    return page


def _top_heads(demo: _Demo, count: int) -> list[tuple[int, int]]:
    """The ``count`` heads whose last-token row attends most to the indirect object."""
    scores = demo.head_scores
    return sorted(scores, key=scores.get, reverse=True)[:count]


def run_demo(out_dir: str | Path = "hookscope-demo", print_fn=print) -> dict:
    """Run the demo and write its figures; returns a summary dict (used by the tests)."""
    started = time.perf_counter()
    demo = _Demo(HookedModel.from_pretrained(), Path(out_dir), print_fn)
    print_fn(f"{demo.hm}\nloaded in {time.perf_counter() - started:.1f} s")
    top_tokens, cache_path = _next_tokens(demo)
    lens, first_top_layer = _lens_step(demo)
    clean, corrupt = (demo.tokenizer([t], return_tensors="pt") for t in (IOI_CLEAN, IOI_CORRUPT))
    result = _patching_step(demo, clean, corrupt)
    head_step = _head_step(demo, clean)
    page = _html_page(demo, lens, result, head_step, top_tokens)
    print_fn(
        f"\nWrote {demo.out}/logit_lens.png, patching_resid_out.png, attention.png, index.html "
        f"({len(page) // 1024} KB) and {cache_path.name}."
    )
    print_fn(f"Done in {time.perf_counter() - started:.1f} s.")
    return {
        "top_tokens": top_tokens,
        "first_top_layer": first_top_layer,
        "cache_path": cache_path,
        "patching": result,
        "head": head_step[0],
        "out": demo.out,
    }
