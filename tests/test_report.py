"""The HTML report and the notebook views: values, escaping, saved results, and each page
rendered in headless Chromium (no overflowing text, legends with values, tooltips that name
layer / position / token / value, the attention view's colours)."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess

import pytest
import torch
from tiny_models import PROMPTS, build_model, build_tokenizer

from hookscope import ExtractionConfig, HookedModel, HookscopeError
from hookscope.lens import logit_lens
from hookscope.patching import PatchingResult, activation_patching
from hookscope.report import ColorScale, Report, attention_view, visible_token
from hookscope.results import LensSummary, load_result, save_lens

CLEAN = {"input_ids": torch.tensor([[5, 6, 7, 8, 9]]), "attention_mask": torch.ones(1, 5).long()}
CORRUPT = {"input_ids": torch.tensor([[5, 60, 7, 8, 9]]), "attention_mask": torch.ones(1, 5).long()}
ANSWERS = ([3], [4])


def _result(values, axes, labels, normalized=True) -> PatchingResult:
    values = torch.as_tensor(values, dtype=torch.float32)
    return PatchingResult(
        values, values.unsqueeze(0), axes, labels, torch.tensor([2.0]), torch.tensor([-1.0]),
        "logit_diff", normalized, "activation", 3,
    )  # fmt: skip


# -- units -------------------------------------------------------------------------------------
def test_visible_tokens():
    assert visible_token(" ") == "␣"
    assert visible_token("  ") == "␣␣"
    assert visible_token("\n") == "⏎"
    assert visible_token("\t") == "⇥"
    assert visible_token("a\nb") == "a⏎b"
    assert visible_token(" John") == " John"
    assert visible_token("") == "∅"
    assert visible_token("\x00") == "\\x00"


def test_colour_bar_values_are_short():
    from hookscope.report import _tick

    assert [_tick(v) for v in (0.0, 0.25, -0.505, 54.9, 5720.4, 22880.0, 3.2e6, 1e-4)] == [
        "0", "0.25", "-0.505", "54.9", "5.72k", "22.9k", "3.2M", "1.0e-04"
    ]  # fmt: skip


def test_diverging_scale_is_centred_at_zero():
    scale = ColorScale(torch.tensor([-0.5, 2.0]), diverging=True)
    assert (scale.low, scale.high) == (-2.0, 2.0)
    assert scale.color(0.0) == "rgb(247,247,247)"  # white at 0
    assert scale.color(2.0) == "rgb(178,24,43)" and scale.color(-2.0) == "rgb(33,102,172)"
    assert scale.position(-1.0) == -0.5


def test_user_text_is_escaped():
    evil = "<script>alert(1)</script>"
    result = _result([[1.0, -1.0]], ["layer", "position"], {"layer": [0], "position": [evil, "&"]})
    report = Report(evil, evil).add(result, title=evil, prompts=(evil, "b"), answers=(" a", evil))
    report.add_table({evil: evil}, title=evil).add_text(evil, title=evil)
    page = report.html()
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert page.count("<script>") == 1  # the page's own script only


def test_report_names_the_prompts_answers_and_numbers():
    labels = {"layer": [0, 1], "position": ["When", " Mary", "\n"]}
    result = _result([[0.1, 0.9, 0.0], [0.2, -0.3, 1.0]], ["layer", "position"], labels)
    page = (
        Report("t")
        .add(result, prompts=("When Mary", "When John"), answers=(" Mary", " John"))
        .html()
    )
    assert "clean:   &#x27;When Mary&#x27;" in page and "corrupt: &#x27;When John&#x27;" in page
    assert "correct &#x27; Mary&#x27; vs wrong &#x27; John&#x27;" in page
    # the terminal's numbers: the baselines and the forwards, beside the figure
    for text in ("<td>clean logit_diff</td><td>2</td>", "<td>corrupt logit_diff</td><td>-1</td>",
                 "<td>forwards</td><td>3</td>", "<td>layer 1, position 2 &#x27;\\n&#x27;</td><td>1</td>"):  # fmt: skip
        assert text in page, text
    assert "⏎" in page  # the newline token is visible


def test_one_dimensional_result_is_a_bar_chart():
    result = _result([0.5, -0.25, 1.0], ["layer"], {"layer": [0, 1, 2]})
    page = Report("t").add(result).html()
    heights = [
        float(h)
        for h in re.findall(r'<rect x="[\d.]+" y="[\d.]+" width="\d+" height="([\d.]+)"', page)
    ]
    assert len(heights) == 3
    torch.testing.assert_close(
        torch.tensor(heights) / heights[2], torch.tensor([0.5, 0.25, 1.0]), atol=2e-3, rtol=0
    )
    assert "layer 1\nrestored fraction: -0.25" in html.unescape(page)


def test_a_bar_chart_with_inf_and_nan_keeps_its_scale():
    # before: inf became float max, the axis ran to 4e+38, the inf bar got y="-inf" and the
    # finite bars were flattened to nothing
    rect = r'<rect x="[\d.]+" y="([-\d.a-z]+)" width="\d+" height="([-\d.a-z]+)"'
    plain = re.findall(
        rect, Report("t").add(_result([0.5, 1.0], ["layer"], {"layer": [0, 1]})).html()
    )
    values = [0.5, float("inf"), 1.0, float("nan"), float("-inf")]
    page = Report("t").add(_result(values, ["layer"], {"layer": list(range(5))})).html()
    bars = re.findall(rect, page)
    assert [bars[0], bars[2]] == plain  # the finite bars as without the non-finite ones
    assert all(float(y) >= 0 and float(h) == 0.5 for y, h in (bars[1], bars[3], bars[4]))
    assert "e+38" not in page and not re.search(r'="-?inf"', page)  # no inf attribute
    assert "layer 1\nrestored fraction: inf" in html.unescape(page)


def test_three_dimensional_result_is_one_heatmap_per_head():
    values = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 4) - 10
    labels = {"layer": [0, 1], "head": [0, 1, 2], "position": ["a", "b", "c", "d"]}
    page = html.unescape(
        Report("t").add(_result(values, ["layer", "head", "position"], labels)).html()
    )
    assert page.count('<table class="hs-heat') == 3
    assert [f"head {h}" in page for h in range(3)] == [True] * 3
    value = float(values[1, 2, 3])  # layer 1, head 2, position 3
    assert (
        f"layer 1\nposition 3: 'd'\nrestored fraction (logit_diff; clean = 1, corrupt = 0): {value:.3g}"
        in page
    )


def test_saved_patching_result_round_trips(tmp_path):
    labels = {"layer": [0, 1], "head": [0, 1, 2]}
    result = _result([[0.1, 0.2, 0.3], [1 / 3, -2.5, 7.0]], ["layer", "head"], labels)
    result.context = {"clean": "a", "corrupt": "b"}
    loaded = PatchingResult.load(result.save(tmp_path / "r.json"))
    for name in ("values", "per_example", "clean_metric", "corrupt_metric"):
        assert torch.equal(getattr(loaded, name), getattr(result, name)), name
    assert (loaded.axes, loaded.labels, loaded.context) == (result.axes, labels, result.context)
    assert (loaded.metric, loaded.normalized, loaded.forwards) == ("logit_diff", True, 3)


def test_bad_saved_results_are_refused_naming_the_field(tmp_path):
    result = _result([[0.1, 0.2]], ["layer", "position"], {"layer": [0], "position": ["a", "b"]})
    data = json.loads(result.save(tmp_path / "r.json").read_text())
    data["values"] = [[0.1, 0.2, 0.3]]
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(
        HookscopeError, match=r"field 'values' has shape \[1, 3\], expected \[1, 2\]"
    ):
        load_result(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text('{"format": "x"}')
    with pytest.raises(HookscopeError, match="not a saved hookscope result"):
        load_result(tmp_path / "other.json")
    with pytest.raises(HookscopeError, match="does not know how to show a int"):
        Report("t").add(3)


# -- the tiny model's results ------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    hm = HookedModel.from_hf(build_model("llama"), build_tokenizer())
    config = ExtractionConfig(
        extract_attn_pattern=True, attn_pattern_all_keys=True, extract_resid_out=True
    )
    cache = hm.forward(PROMPTS[0], ["all"], extraction_config=config)
    return {
        "hm": hm,
        "grid": activation_patching(hm, CLEAN, CORRUPT, ANSWERS),
        "layers": activation_patching(hm, CLEAN, CORRUPT, ANSWERS, per="layer"),
        "heads": activation_patching(hm, CLEAN, CORRUPT, ANSWERS, point="head", per="head"),
        "lens": logit_lens(hm, PROMPTS[0], ["all"]),
        "cache": cache,
        "tokens": hm.to_string_tokens(hm.prepare_inputs(PROMPTS[0])["input_ids"][0]),
    }


def test_saved_lens_summary_holds_the_lens_values(tiny, tmp_path):
    lens, target = tiny["lens"], 17
    summary = load_result(save_lens(lens.summary(k=2, target=target), tmp_path / "lens.json"))
    assert isinstance(summary, LensSummary)
    top_p, top_id = lens.probs[:, 0].topk(2, dim=-1)
    torch.testing.assert_close(torch.tensor(summary.top_probs), top_p)
    assert summary.top_tokens[1][2] == tiny["hm"].to_string_tokens(top_id[1, 2].tolist())
    torch.testing.assert_close(torch.tensor(summary.target_prob), lens.prob(target)[:, 0])
    assert summary.target_rank == lens.rank(target)[:, 0].tolist()
    torch.testing.assert_close(torch.tensor(summary.kl), lens.kl_to_final()[:, 0])


def _report(tiny) -> Report:
    report = Report("tiny-llama <experiment>", "every section type")
    report.add(tiny["grid"], prompts=("clean prompt", "corrupt prompt"), answers=(" a", " b"))
    report.add(tiny["layers"]).add(tiny["heads"]).add(tiny["lens"], target=17)
    report.add_attention(tiny["cache"], tiny["tokens"], [(0, 1), (1, 0), (1, 3)])
    report.add(tiny["cache"]).add_table({"clean": 1.5}, title="numbers")
    return report.add_html("<div class='card'>a feature card</div>", title="cards")


def test_notebook_views(tiny, tmp_path):
    """Each result shows itself in a notebook: keys, shapes, dtypes; native tooltips."""
    cache, lens = tiny["cache"], tiny["lens"]
    view = cache._repr_html_()
    assert "<script" not in view and "data-tip" not in view and 'title="layer 1' in view
    assert "<td>resid_out_1</td><td>[1, 11, 64]</td><td>float32</td>" in view
    norm = float(cache["resid_out_1"][0, 3].norm())
    assert f'title="layer 1\nposition slot all[3]\nmean ||resid_out||: {norm:.3g}"' in view
    grid = tiny["grid"]._repr_html_()
    assert f"{float(tiny['grid'].values[1, 2]):.3g}" in grid and "<td>forwards</td>" in grid
    assert "top-token probability" in lens._repr_html_()
    store = tiny["hm"].extract_cache(
        PROMPTS[:3], ["last"], ExtractionConfig(extract_resid_out=True), output_dir=tmp_path / "s"
    )
    view = store._repr_html_()
    assert "<td>resid_out_1</td><td>[3, 1, 64]</td><td>f32</td>" in view
    assert "<td>examples</td><td>3</td>" in view


# -- headless Chromium -------------------------------------------------------------------------
_CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    _CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)"
)

# Runs in the page after its own script; writes what it found into <pre id="probe">.
_PROBE = """
<script>
(function () {
  const out = {overflow: [], scrolls: [], svgOutside: [], legends: [], tips: {}, attention: {}};
  for (const el of document.body.querySelectorAll("*")) {
    if (el.closest("svg") || ["SCRIPT", "STYLE"].includes(el.tagName)) continue;
    if (el.clientWidth > 0 && el.scrollWidth > el.clientWidth + 1) {
      (el.classList.contains("hs-scroll") ? out.scrolls : out.overflow).push(
        el.tagName + "." + el.className + ": " + el.textContent.slice(0, 40));
    }
  }
  out.pageWidth = [document.documentElement.scrollWidth, window.innerWidth];
  for (const svg of document.querySelectorAll("svg")) {
    const w = +svg.getAttribute("width"), h = +svg.getAttribute("height");
    for (const t of svg.querySelectorAll("text")) {
      const b = t.getBBox(), m = t.getCTM();
      const x0 = m.a * b.x + m.c * b.y + m.e, y0 = m.b * b.x + m.d * b.y + m.f;
      const x1 = m.a * (b.x + b.width) + m.c * (b.y + b.height) + m.e;
      const y1 = m.b * (b.x + b.width) + m.d * (b.y + b.height) + m.f;
      if (Math.min(x0, x1) < 0 || Math.max(x0, x1) > w || Math.min(y0, y1) < 0 || Math.max(y0, y1) > h)
        out.svgOutside.push(t.textContent);
    }
  }
  for (const fig of document.querySelectorAll(".hs-fig")) {
    const legend = fig.querySelector(".hs-legend");
    out.legends.push(legend ? [legend.querySelector(".hs-legend-title").textContent,
      [...legend.querySelectorAll(".hs-legend-ticks span")].map(s => s.textContent)] : null);
  }
  const tip = document.getElementById("hs-tip");
  function hover(el) {
    const r = el.getBoundingClientRect();
    el.dispatchEvent(new MouseEvent("mouseover", {bubbles: true, clientX: r.x + 2, clientY: r.y + 2}));
    return tip.style.display === "block" ? tip.textContent : null;
  }
  for (const [name, selector] of Object.entries(HOVER)) {
    out.tips[name] = hover(document.querySelector(selector));
  }
  const view = document.querySelector(".hs-attn");
  if (view) {
    const tok = view.querySelector('.hs-head[data-h="1"] .hs-tok[data-i="' + QUERY + '"]');
    hover(tok);
    tok.dispatchEvent(new MouseEvent("click", {bubbles: true}));  // pins the query
    out.attention.query = view.querySelector(".hs-query").textContent;
    out.attention.alphas = [...view.querySelectorAll(".hs-head")].map(panel =>
      [...panel.querySelectorAll(".hs-tok")].map(s => getComputedStyle(s).backgroundColor));
    out.attention.tip = hover(view.querySelector('.hs-head[data-h="2"] .hs-tok[data-i="1"]'));
  }
  const pre = document.createElement("pre"); pre.id = "probe";
  pre.textContent = JSON.stringify(out); document.body.appendChild(pre);
})();
</script>
"""


def _probe(page: str, tmp_path, hover: dict[str, str], query: int = 0, width: int = 1200) -> dict:
    """Render ``page`` in headless Chromium with the probe script; returns what it found."""
    script = _PROBE.replace("HOVER", json.dumps(hover)).replace("QUERY", str(query))
    path = tmp_path / "probed.html"
    path.write_text(page.replace("</body>", script + "</body>"), encoding="utf-8")
    run = _chromium(tmp_path, [f"--window-size={width},900", "--dump-dom", f"file://{path}"])
    found = re.search(r'<pre id="probe">(.*?)</pre>', run.stdout, re.S)
    assert found, run.stderr[-2000:]
    return json.loads(html.unescape(found.group(1)))


def _chromium(tmp_path, arguments: list[str]) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync",
             "--disable-background-networking", "--disable-component-update", "--hide-scrollbars",
             f"--user-data-dir={tmp_path / 'profile'}"]  # fmt: skip
    return subprocess.run(
        [_CHROMIUM, *flags, *arguments], capture_output=True, text=True, timeout=180
    )


def _expected_cell_tip(result: PatchingResult, row: int, col: int, label: str) -> str:
    position = result.labels["position"][col]
    return (
        f"layer {row}\nposition {col}: {position!r}\n{label}: {float(result.values[row, col]):.3g}"
    )


@needs_chromium
def test_report_renders_without_overflow_with_legends_and_tooltips(tiny, tmp_path):
    grid, heads = tiny["grid"], tiny["heads"]
    page = _report(tiny).html()
    assert re.search(r"(src|href)=", page) is None, "no external resources"
    hover = {
        "grid": "section:nth-of-type(1) table.hs-heat tr:nth-child(2) td:nth-of-type(3)",
        "bar": "section:nth-of-type(2) svg rect:nth-of-type(2)",
        "heads": "section:nth-of-type(3) table.hs-heat tr:nth-child(1) td:nth-of-type(4)",
        "lens": "section:nth-of-type(4) table.hs-heat tr:nth-child(2) td:nth-of-type(1)",
        "column": "section:nth-of-type(1) th.hs-col:nth-of-type(4)",
    }
    found = _probe(page, tmp_path, hover, query=5)
    assert found["overflow"] == [] and found["svgOutside"] == [], found
    assert found["scrolls"] == [] and found["pageWidth"][0] <= found["pageWidth"][1], found
    # hover: layer / position / token / value, as the numbers say
    label = "restored fraction (logit_diff; clean = 1, corrupt = 0)"
    assert found["tips"]["grid"] == _expected_cell_tip(grid, 1, 2, label)
    assert found["tips"]["column"] == f"position 2: {grid.labels['position'][2]!r}"
    layer_value = float(tiny["layers"].values[1])
    assert found["tips"]["bar"] == f"layer 1\nrestored fraction: {layer_value:.3g}"
    assert found["tips"]["heads"] == f"layer 0\nhead 3\n{label}: {float(heads.values[0, 3]):.3g}"
    lens = tiny["lens"]
    top_p, top_id = lens.probs[1, 0, 0].max(-1)
    top = tiny["hm"].to_string_tokens([int(top_id)])[0]
    lens_tip = found["tips"]["lens"].splitlines()
    assert lens_tip[:4] == [
        "layer 1",
        f"position 0: {lens.tokens[0][0]!r}",
        f"top-token probability: {float(top_p):.3g}",
        f"#1 {top!r} p={float(top_p):.3g}",
    ]
    assert lens_tip[-2].startswith(f"target {tiny['hm'].to_string_tokens([17])[0]!r}: p=")
    # legends: every heatmap has one whose ends are the colour scale's values
    legends = [legend for legend in found["legends"] if legend is not None]
    bound = float(grid.values.abs().max())
    assert [
        label,
        [f"{v:.3g}" for v in (-bound, -bound / 2)]
        + ["0"]
        + [f"{v:.3g}" for v in (bound / 2, bound)],
    ] in legends
    assert sum(legend[0] == "top-token probability" for legend in legends) == 1
    assert sum(legend[0] == "mean ||resid_out||" for legend in legends) == 1
    _check_attention(found["attention"], tiny)


def _check_attention(found: dict, tiny) -> None:
    """Hovering token 5 colours each head's tokens by that query's attention row; once it is
    clicked, hovering token 1 tells its weight from query 5."""
    tokens, cache = tiny["tokens"], tiny["cache"]
    assert found["query"] == f"{json.dumps(tokens[5])} (5)"
    for panel, (layer, head) in zip(found["alphas"], [(0, 1), (1, 0), (1, 3)], strict=True):
        row = cache[f"pattern_L{layer}H{head}"][0, 5]
        alphas = [float(re.search(r"rgba\(8, 48, 107, ([\d.]+)\)", c).group(1)) if "rgba" in c else 0.0 for c in panel]  # fmt: skip
        torch.testing.assert_close(
            torch.tensor(alphas), 0.85 * row, atol=3e-3, rtol=0
        )  # 1/255 steps
    weight = float(cache["pattern_L1H3"][0, 5, 1])
    assert (
        found["tip"]
        == f"L1H3\nquery 5: {json.dumps(tokens[5])}\nkey 1: {json.dumps(tokens[1])}\nattention: {weight:.3f}"
    )


def _nan_attention_page() -> str:
    patterns = torch.softmax(torch.randn(3, 4, 4), -1)
    patterns[2, 0, 1] = float("nan")  # e.g. a fully masked query row
    view = attention_view(patterns, ["a", "b", "c", "d"], ["H0", "H1", "H2"], "nan-view")
    return Report("NaN attention").add_html(view).html()


def test_page_data_is_strict_json_with_a_nan_weight_as_null():
    page = _nan_attention_page()
    text = re.search(r'id="nan-view-data">(.*?)</script>', page, re.S).group(1)
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON: {c}"))
    assert data["patterns"][2][0][1] is None and data["patterns"][2][0][0] is not None


@needs_chromium
def test_attention_with_a_nan_weight_renders_and_says_so(tmp_path):
    found = _probe(_nan_attention_page(), tmp_path, {}, query=0)["attention"]
    assert found["query"] == '"a" (0)'  # the page's script ran (JSON.parse did not throw)
    assert found["tip"] == 'H2\nquery 0: "a"\nkey 1: "b"\nattention: n/a (not a number)'


@needs_chromium
def test_notebook_views_render_without_overflow(tiny, tmp_path):
    from hookscope.report import page

    views = [tiny["cache"]._repr_html_(), tiny["grid"]._repr_html_(), tiny["lens"]._repr_html_()]
    found = _probe(page("views", "".join(views)), tmp_path, {}, width=1000)
    assert found["overflow"] == [] and found["scrolls"] == [], found
    assert all(legend is not None for legend in found["legends"]), found["legends"]


@needs_chromium
def test_report_screenshot_draws_the_figures(tiny, tmp_path):
    path = _report(tiny).write(tmp_path / "report.html")
    shot = tmp_path / "report.png"
    run = _chromium(tmp_path, ["--window-size=1200,2400", f"--screenshot={shot}", f"file://{path}"])
    from PIL import Image

    assert shot.exists(), run.stderr[-2000:]
    with Image.open(shot) as image:
        colors = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colors is not None and len(colors) > 50, "the figures drew something"


def test_report_command_renders_what_patch_and_lens_saved(tiny_folder, tmp_path, capsys):
    from hookscope.cli import main

    tokenizer = build_tokenizer()
    single = [t for t in (" the", " cat", " dog", " mat") if len(tokenizer(t)["input_ids"]) == 1]
    clean, corrupt = (f"The{word} sat on the mat" for word in single[:2])
    patch = ["patch", str(tiny_folder), "--clean", clean, "--corrupt", corrupt, "--per", "layer"]
    patch += ["--correct", single[0], "--wrong", single[1], "--out", str(tmp_path / "p")]
    assert main(patch) == 0, capsys.readouterr().err
    lens = ["lens", str(tiny_folder), "--prompt", "The cat sat", "--target", single[0]]
    assert main([*lens, "--out", str(tmp_path / "l")]) == 0, capsys.readouterr().err
    saved = load_result(tmp_path / "p" / "patching_resid_out.json")
    assert saved.axes == ["layer"] and saved.context["clean"] == clean
    page_path = tmp_path / "page.html"
    argv = ["report", str(tmp_path / "p" / "patching_resid_out.json")]
    argv += [str(tmp_path / "l" / "logit_lens.json"), "--title", "T <1>", "--out", str(page_path)]
    capsys.readouterr()
    assert main(argv) == 0
    assert capsys.readouterr().out.strip() == f"2 results -> {page_path}"
    page = html.unescape(page_path.read_text())
    assert "<title>T <1></title>" in page  # escaped in the file, <1> once unescaped
    assert f"clean:   {clean!r}" in page and f"correct {single[0]!r} vs wrong {single[1]!r}" in page
    assert f"layer 1\nrestored fraction: {float(saved.values[1]):.3g}" in page  # a bar's tooltip
    assert "Logit lens on resid_out: 'The cat sat'" in page
    (tmp_path / "bad.json").write_text("[1]")
    assert main(["report", str(tmp_path / "bad.json"), "--out", str(page_path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("hookscope: error:") and "not a saved hookscope result" in err[0]
