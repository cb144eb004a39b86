"""Figures: PNG through matplotlib (``pip install hookscope[plot]``) and self-contained
interactive HTML (no network assets: inline CSS and a few lines of JavaScript for tooltips).

Every figure has labelled axes, token strings as tick labels, and a title naming the model and
the metric. Each ``*_figure`` function returns a matplotlib ``Figure`` and saves it when given a
path; :func:`heatmap_html` / :func:`html_page` build the interactive page.
"""

from __future__ import annotations

import html
import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .errors import HookscopeError


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:  # pragma: no cover - exercised only without matplotlib
        raise HookscopeError(
            "PNG figures need matplotlib: pip install 'hookscope[plot]'."
        ) from error
    return plt


def heatmap_figure(
    values: torch.Tensor,
    row_labels: Sequence[Any],
    col_labels: Sequence[Any],
    title: str,
    xlabel: str,
    ylabel: str,
    colorbar_label: str,
    cell_text: Sequence[Sequence[str]] | None = None,
    path: str | Path | None = None,
    diverging: bool = False,
):
    """A labelled heatmap of ``values [rows, cols]``; saved as PNG when ``path`` is given."""
    plt = _pyplot()
    values = values.detach().float().cpu().numpy()
    rows, cols = values.shape
    fig, ax = plt.subplots(figsize=(max(5.5, 0.55 * cols + 2.5), max(3.0, 0.32 * rows + 1.8)))
    if diverging:
        bound = float(abs(values).max()) or 1.0
        image = ax.imshow(values, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto")
    else:
        image = ax.imshow(values, cmap="viridis", aspect="auto")
    ax.set_xticks(
        range(cols), [printable(str(c)) for c in col_labels], rotation=60, ha="right", fontsize=8
    )
    ax.set_yticks(range(rows), [printable(str(r)) for r in row_labels], fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(textwrap.fill(title, 60), fontsize=10)
    fig.colorbar(image, ax=ax, label=colorbar_label)
    if cell_text is not None:
        low, high = image.get_clim()
        for r in range(rows):
            for c in range(cols):
                bright = (values[r, c] - low) / ((high - low) or 1.0) > 0.6  # viridis: yellow
                ax.text(
                    c,
                    r,
                    printable(cell_text[r][c]),
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="black" if bright and not diverging else "white",
                )
    return _finish(fig, path)


def bar_figure(
    values: torch.Tensor,
    labels: Sequence[Any],
    title: str,
    xlabel: str,
    ylabel: str,
    path: str | Path | None = None,
):
    """A labelled bar chart of ``values [n]`` from 0 (blue below, red above); saved as PNG when
    ``path`` is given."""
    plt = _pyplot()
    values = values.detach().float().cpu().numpy()
    fig, ax = plt.subplots(figsize=(max(5.5, 0.28 * len(values) + 2.0), 3.4))
    ax.bar(range(len(values)), values, color=["#b2182b" if v >= 0 else "#2166ac" for v in values])
    ax.axhline(0, color="#333", linewidth=0.8)
    ax.set_xticks(range(len(values)), [printable(str(label)) for label in labels], fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(textwrap.fill(title, 70), fontsize=10)
    return _finish(fig, path)


def patching_figure(result: Any, model_name: str, path: str | Path | None = None):
    """A patching result from a ``PatchingResult``: a heatmap of a grid (layers x positions, or
    layers x heads), a bar chart of a per-layer result."""
    metric = f"{result.metric}{' (normalised: clean=1, corrupt=0)' if result.normalized else ''}"
    if result.values.dim() == 1:
        axis = result.axes[0]
        title = f"{model_name}: {result.method} patching per {axis}, {metric}"
        return bar_figure(result.values, result.labels[axis], title, axis, metric, path=path)
    if result.values.dim() != 2:
        raise HookscopeError(
            f"a patching figure needs a 1-D or 2-D result, got axes {result.axes} (draw one "
            "slice, e.g. result.values[:, head], or use hookscope.report.Report)."
        )
    x_axis, y_axis = result.axes[1], result.axes[0]
    return heatmap_figure(
        result.values,
        result.labels[y_axis],
        result.labels[x_axis],
        f"{model_name}: {result.method} patching, {metric}",
        x_axis,
        y_axis,
        metric,
        path=path,
        diverging=True,
    )


def attention_figure(
    pattern: torch.Tensor,
    query_tokens: Sequence[str],
    key_tokens: Sequence[str],
    model_name: str,
    layer: int,
    head: int,
    path: str | Path | None = None,
):
    """An attention pattern ``[queries, keys]`` with tokens on both axes."""
    return heatmap_figure(
        pattern,
        query_tokens,
        key_tokens,
        f"{model_name}: attention pattern, layer {layer} head {head}",
        "key (attended-to) token",
        "query token",
        "attention probability",
        path=path,
    )


def lens_figure(lens: Any, model_name: str, example: int = 0, path: str | Path | None = None):
    """Logit-lens heatmap: layers x positions, colour = probability of the top token, which is
    written in each cell."""
    probs = lens.probs[:, example]  # [layers, P, vocab]
    top_p, top_id = probs.max(-1)
    text = [[_short(t) for t in lens.to_string(row.tolist())] for row in top_id]
    return heatmap_figure(
        top_p,
        lens.layers,
        lens.tokens[example],
        f"{model_name}: logit lens on {lens.point} (top token and its probability)",
        "position",
        "layer",
        "top-token probability",
        cell_text=text,
        path=path,
    )


def _finish(fig, path: str | Path | None):
    """Lay out ``fig``; when ``path`` is given, save it as PNG (creating folders) and close it."""
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        _pyplot().close(fig)
    return fig


def printable(text: str) -> str:
    """Token strings as labels: control characters written as escapes (fonts lack glyphs);
    shared by the HTML report and the feature cards."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def cut(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters, the last one ``…`` when it was longer."""
    return text if len(text) <= width else text[: width - 1] + "…"


def _short(token: str, width: int = 8) -> str:
    return cut(token.replace("\n", "\\n"), width)


def heatmap_html(
    values: torch.Tensor,
    row_labels: Sequence[Any],
    col_labels: Sequence[Any],
    title: str,
    value_label: str,
    cell_text: Sequence[Sequence[str]] | None = None,
    row_name: str = "row",
    col_name: str = "column",
) -> str:
    """One interactive heatmap as an HTML fragment: hover a cell for its row, column and value."""
    row_labels = [printable(str(r)) for r in row_labels]
    col_labels = [printable(str(c)) for c in col_labels]
    values = values.detach().float().cpu()
    bound = float(values.abs().max()) or 1.0
    signed = bool((values < 0).any())
    head = "".join(f"<th class='col'>{html.escape(str(c))}</th>" for c in col_labels)
    body = []
    for r, label in enumerate(row_labels):
        cells = []
        for c, col in enumerate(col_labels):
            value = float(values[r, c])
            color = _color(value / bound, signed)
            tip = f"{row_name} {label!r}, {col_name} {col!r}: {value_label} = {value:.4g}"
            text = html.escape(cell_text[r][c]) if cell_text is not None else ""
            ink = "color:#fff;" if abs(value / bound) > 0.55 else ""
            cells.append(
                f"<td style='background:{color};{ink}' data-tip='{html.escape(tip, quote=True)}'>{text}</td>"
            )
        body.append(f"<tr><th>{html.escape(str(label))}</th>{''.join(cells)}</tr>")
    return (
        f"<section><h2>{html.escape(title)}</h2><table class='heat'><tr><th></th>{head}</tr>"
        f"{''.join(body)}</table></section>"
    )


def _color(x: float, signed: bool) -> str:
    if math.isnan(x):
        return "#ccc"
    if signed:  # blue (negative) - white - red (positive)
        r, g, b = (
            (255, int(255 * (1 - x)), int(255 * (1 - x)))
            if x >= 0
            else (int(255 * (1 + x)), int(255 * (1 + x)), 255)
        )
    else:  # white -> dark blue
        r, g, b = int(255 * (1 - 0.85 * x)), int(255 * (1 - 0.7 * x)), int(255 - 90 * x)
    return f"rgb({r},{g},{b})"


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }}
table.heat {{ border-collapse: collapse; font-size: 11px; margin-bottom: 2em; }}
table.heat td {{ width: 2.6em; height: 1.6em; text-align: center; border: 1px solid #fff; }}
table.heat th {{ font-weight: normal; padding: 0 4px; white-space: nowrap; }}
table.heat th.col {{ writing-mode: vertical-rl; transform: rotate(180deg); }}
#tip {{ position: fixed; background: #222; color: #fff; padding: 3px 6px; font-size: 12px;
        border-radius: 3px; pointer-events: none; display: none; }}
</style></head><body>
<h1>{title}</h1>
{body}
<div id="tip"></div>
<script>
const tip = document.getElementById("tip");
document.querySelectorAll("td[data-tip]").forEach(cell => {{
  cell.addEventListener("mousemove", e => {{
    tip.textContent = cell.dataset.tip; tip.style.display = "block";
    tip.style.left = (e.clientX + 12) + "px"; tip.style.top = (e.clientY + 12) + "px";
  }});
  cell.addEventListener("mouseleave", () => {{ tip.style.display = "none"; }});
}});
</script></body></html>
"""


def html_page(title: str, sections: Sequence[str], path: str | Path | None = None) -> str:
    """A self-contained HTML page of heatmap sections; written to ``path`` when given."""
    page = _PAGE.format(title=html.escape(title), body="\n".join(sections))
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(page, encoding="utf-8")
    return page
