"""Logit lens values, figures (PNG / HTML, one rendered in headless Chromium)."""

from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser

import pytest
import torch
from PIL import Image
from tiny_models import PROMPTS, build_model, build_tokenizer

from hookscope import ExtractionConfig, HookedModel, plot
from hookscope.lens import lens_logits, logit_lens
from hookscope.patching import activation_patching


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2", "olmo2"])
def test_lens_at_last_layer_is_the_model_output(family):
    hm = HookedModel.from_hf(build_model(family), build_tokenizer())
    lens = logit_lens(hm, PROMPTS[0], ["all"])
    torch.testing.assert_close(lens.logits[-1], lens.final.float(), rtol=1e-5, atol=1e-5)
    assert lens.kl_to_final()[-1].abs().max() < 1e-5
    # every layer is normalised with its own statistics: the lens is norm(resid) @ W_U
    cache = hm.forward(
        PROMPTS[0], ["all"], extraction_config=ExtractionConfig(extract_resid_out=True)
    )
    torch.testing.assert_close(lens.logits[0], lens_logits(hm, cache["resid_out_0"]).float())


def test_lens_readouts_agree(tiny_llama):
    lens = logit_lens(tiny_llama, PROMPTS[:2], ["last", 0])
    token = 17
    ranks, probs, logits = lens.rank(token), lens.prob(token), lens.logit(token)
    best = lens.logits.argmax(-1)
    assert torch.all((ranks == 1) == (best == token))
    torch.testing.assert_close(probs, lens.logits.softmax(-1)[..., token])
    torch.testing.assert_close(logits, lens.logits[..., token])
    top = lens.top_k(3, example=1, position=0)
    assert len(top) == 2 and len(top[0]) == 3 and top[0][0][1] >= top[0][1][1]
    assert (
        lens.tokens[1][1]
        == tiny_llama.to_string_tokens(
            [int(tiny_llama.get_tokenizer()(PROMPTS[1])["input_ids"][0])]
        )[0]
    )


def _is_png(path) -> bool:
    with Image.open(path) as image:
        return image.format == "PNG" and image.size[0] > 100 and image.size[1] > 100


class _Checker(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.external = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.external += [v for k, v in attrs if k in ("src", "href") and v and "://" in v]


@pytest.fixture(scope="module")
def figures(tmp_path_factory, tiny_llama):
    out = tmp_path_factory.mktemp("figures")
    clean = {
        "input_ids": torch.tensor([[5, 6, 7, 8, 9]]),
        "attention_mask": torch.ones(1, 5, dtype=torch.long),
    }
    corrupt = {
        "input_ids": torch.tensor([[5, 60, 7, 8, 9]]),
        "attention_mask": torch.ones(1, 5, dtype=torch.long),
    }
    answers = ([3], [4])
    grid = activation_patching(tiny_llama, clean, corrupt, answers)
    heads = activation_patching(tiny_llama, clean, corrupt, answers, point="head", per="head")
    per_layer = activation_patching(tiny_llama, clean, corrupt, answers, per="layer")
    plot.patching_figure(per_layer, "tiny-llama", path=out / "per_layer.png")
    lens = logit_lens(tiny_llama, PROMPTS[0], ["all"])
    pattern = tiny_llama.forward(
        PROMPTS[0],
        ["all"],
        extraction_config=ExtractionConfig(
            extract_attn_pattern=True, attn_heads=[{"layer": 1, "head": 0}]
        ),
    )["pattern_L1H0"][0]
    tokens = lens.tokens[0]
    plot.patching_figure(grid, "tiny-llama", path=out / "grid.png")
    plot.patching_figure(heads, "tiny-llama", path=out / "heads.png")
    plot.lens_figure(lens, "tiny-llama", path=out / "lens.png")
    plot.attention_figure(pattern, tokens, tokens, "tiny-llama", 1, 0, path=out / "attention.png")
    plot.html_page(
        "tiny-llama figures",
        [
            plot.heatmap_html(
                grid.values,
                grid.labels["layer"],
                grid.labels["position"],
                "patching",
                "restored",
                row_name="layer",
                col_name="position",
            ),
            plot.heatmap_html(pattern, tokens, tokens, "attention", "probability"),
        ],
        path=out / "page.html",
    )
    return out


def test_png_figures(figures):
    for name in ("grid.png", "heads.png", "lens.png", "attention.png", "per_layer.png"):
        assert _is_png(figures / name), name


def test_html_page_is_self_contained(figures):
    text = (figures / "page.html").read_text()
    checker = _Checker()
    checker.feed(text)
    assert checker.tags.count("table") == 2 and "script" in checker.tags
    assert checker.external == [], "no network assets"
    assert "data-tip" in text and "layer" in text


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(
    _chromium() is None, reason="Debian's chromium is not installed (.ci/run installs it)"
)
def test_html_renders_in_headless_chromium(figures, tmp_path):
    shot = tmp_path / "page.png"
    run = subprocess.run(
        [
            _chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--window-size=1200,900",
            "--enable-logging=stderr",
            "--v=0",
            f"--screenshot={shot}",
            f"file://{figures / 'page.html'}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shot.exists() and _is_png(shot), run.stderr[-2000:]
    assert "Uncaught" not in run.stderr, "the page's script raised"
    with Image.open(shot) as image:
        colors = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colors is not None and len(colors) > 20, "the heatmaps drew something"
