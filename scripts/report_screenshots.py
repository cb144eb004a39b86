"""The README's pictures of the report: run the embedded SmolLM2-135M-Instruct, build a report
and a notebook view, render them in headless Chromium and crop one PNG per section into docs/.

    python scripts/report_screenshots.py            # writes docs/report-*.png
    python scripts/report_screenshots.py --keep DIR # also keeps the pages in DIR

Needs Debian's chromium (``/usr/bin/chromium``); no network.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from PIL import Image

from hookscope import ExtractionConfig, HookedModel, activation_patching, logit_lens, plot
from hookscope.report import Report, notebook_fragment, page

ROOT = Path(__file__).resolve().parents[1]
CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mary and John went to the store, Mary gave a drink to"
FACT = "The capital of France is"
HEADS = [(24, 4), (23, 0), (23, 1), (23, 7)]

# Hovers a cell (the tooltip is then part of the screenshot) and writes each section's box.
_PROBE = """<script>
(function () {
  const hover = document.querySelector(HOVER);
  if (hover) {
    const r = hover.getBoundingClientRect();
    hover.dispatchEvent(new MouseEvent("mouseover", {bubbles: true, clientX: r.x + r.width / 2,
                                                     clientY: r.y + r.height / 2}));
  }
  const boxes = [...document.querySelectorAll(".hs-section")].map(s => {
    const r = s.getBoundingClientRect();
    return [r.x, r.y + window.scrollY, r.width, r.height];
  });
  const pre = document.createElement("pre"); pre.id = "boxes"; pre.style.display = "none";
  pre.textContent = JSON.stringify(boxes); document.body.appendChild(pre);
})();
</script>"""


def build(hm: HookedModel) -> tuple[str, str]:
    """(the report page, a page of notebook views) of the embedded model's IOI and lens runs;
    draws the PNG figures of the lens and of head L24H4 into docs/ on the way."""
    tokenizer = hm.get_tokenizer()
    clean, corrupt = (tokenizer([t], return_tensors="pt") for t in (CLEAN, CORRUPT))
    answers = (" Mary", " John")
    grid = activation_patching(hm, clean, corrupt, answers, point="resid_out")
    per_layer = activation_patching(hm, clean, corrupt, answers, point="attn_out", per="layer")
    lens = logit_lens(hm, FACT, ["all"])
    paris = tokenizer(" Paris", add_special_tokens=False)["input_ids"][0]
    config = ExtractionConfig(
        extract_attn_pattern=True,
        attn_heads=[{"layer": layer, "head": head} for layer, head in HEADS],
    )
    patterns = hm.forward(clean, ["all"], extraction_config=config)
    tokens = hm.to_string_tokens(clean["input_ids"][0])
    report = Report("IOI and a fact on SmolLM2-135M-Instruct")
    context = {"prompts": (CLEAN, CORRUPT), "answers": answers, "model": "SmolLM2-135M-Instruct"}
    report.add(grid, point="resid_out", **context)
    report.add(per_layer, point="attn_out", **context)
    report.add(lens, target=paris, prompt=FACT, model="SmolLM2-135M-Instruct")
    report.add_attention(patterns, tokens, HEADS, title=f"Attention on {CLEAN!r}")
    batch = tokenizer([FACT, "Hello"], return_tensors="pt", padding=True)
    cache = hm.forward(batch, ["last", 0], extraction_config=ExtractionConfig(
        extract_resid_out=True, layers=list(range(0, 30, 3))))  # fmt: skip
    name = "SmolLM2-135M-Instruct"
    small_png(plot.lens_figure(lens, name), ROOT / "docs" / "plot-lens.png")
    pattern = patterns["pattern_L24H4"][0]
    small_png(
        plot.attention_figure(pattern, tokens, tokens, name, 24, 4),
        ROOT / "docs" / "plot-attention.png",
    )
    return report.html(), page("A notebook view", notebook_fragment(cache._repr_html_()))


def small_png(figure, path: Path) -> None:
    """A matplotlib figure as a compact PNG (96 colours)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, dpi=90)
    with Image.open(buffer) as image:
        image.convert("RGB").quantize(colors=96, method=Image.Quantize.MEDIANCUT).save(
            path, optimize=True
        )


def shoot(html: str, folder: Path, name: str, hover: str, height: int) -> list[Image.Image]:
    """Each section of ``html`` as an image, with the cell ``hover`` (a CSS selector) hovered."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    path = folder / f"{name}.html"
    path.write_text(html.replace("</body>", _PROBE.replace("HOVER", json.dumps(hover)) + "</body>"))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
             f"--user-data-dir={folder / 'profile'}", f"--window-size=1100,{height}"]  # fmt: skip
    dom = subprocess.run([chromium, *flags, "--dump-dom", f"file://{path}"], capture_output=True,
                         text=True, timeout=300).stdout  # fmt: skip
    boxes = json.loads(re.search(r'<pre id="boxes"[^>]*>(.*?)</pre>', dom, re.S).group(1))
    shot = folder / f"{name}.png"
    subprocess.run([chromium, *flags, f"--screenshot={shot}", f"file://{path}"],
                   capture_output=True, timeout=300, check=True)  # fmt: skip
    with Image.open(shot) as image:
        image = image.convert("RGB")
        return [
            image.crop((int(x) - 8, int(y) + 4, int(x + w) + 8, int(y + h))) for x, y, w, h in boxes
        ]


def save_small(image: Image.Image, path: Path) -> None:
    """A compact PNG: trimmed of blank margin on the right, 128 colours."""
    pixels = image.load()
    right = max(
        (x for x in range(image.width) for y in range(0, image.height, 2) if pixels[x, y] != (255, 255, 255)),
        default=image.width,
    )  # fmt: skip
    image = image.crop((0, 0, min(image.width, right + 12), image.height))
    image.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", help="also keep the pages and full screenshots here")
    args = parser.parse_args()
    folder = Path(args.keep or tempfile.mkdtemp())
    folder.mkdir(parents=True, exist_ok=True)
    report, views = build(HookedModel.from_pretrained())
    cell = "section:nth-of-type(1) table.hs-heat tr:nth-child(21) td:nth-of-type(10)"
    sections = shoot(report, folder, "report", cell, 4200)
    names = ["report-patching", "report-bars", "report-lens", "report-attention"]
    for image, name in zip(sections, names, strict=True):
        save_small(image, ROOT / "docs" / f"{name}.png")
    (view,) = shoot(views, folder, "views", "table.hs-heat tr:nth-child(4) td:nth-of-type(1)", 1400)
    save_small(view, ROOT / "docs" / "notebook-cache.png")
    for name in [*names, "notebook-cache", "plot-lens", "plot-attention"]:
        print(f"docs/{name}.png: {(ROOT / 'docs' / f'{name}.png').stat().st_size // 1024} KB")


if __name__ == "__main__":
    main()
