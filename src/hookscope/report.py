"""One self-contained HTML page per experiment, and the notebook views of hookscope's results.

    >>> report = Report("IOI on SmolLM2")
    >>> report.add(patching_result, prompts=(clean, corrupt), answers=(" Mary", " John"))
    >>> report.add(lens, target=paris_id)
    >>> report.add_attention(cache, tokens)            # pattern_L*H* keys, heads side by side
    >>> report.add_table([("clean", 6.12), ("corrupt", -5.49)], title="Baselines")
    >>> report.write("report.html")

The page needs no network: CSS and a few lines of JavaScript are inline. Every figure has axis
titles, a colour scale with values, a tooltip naming layer / position / token / value, and the
numbers it shows printed beside it. Tokens are shown with visible whitespace (``␣`` for a token
of spaces, ``⏎`` for a newline, ``⇥`` for a tab); the tooltip shows the raw token. All text
given by the user is escaped.

The same building blocks give the ``_repr_html_`` of :class:`~hookscope.cache.ActivationCache`,
:class:`~hookscope.patching.PatchingResult`, :class:`~hookscope.lens.LensResult` and
:class:`~hookscope.store.ActivationStore` (:func:`notebook_view`): there the tooltips are the
browser's own (``title=``), since a notebook may not run the page's script.
"""

from __future__ import annotations

import contextlib
import contextvars
import html
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from .errors import HookscopeError
from .plot import cut, printable

__all__ = ["Report", "notebook_view", "visible_token"]

_TIP_ATTRIBUTE = contextvars.ContextVar("hookscope_tip_attribute", default="data-tip")
_LABEL_CHARS = 14  # a longer token is cut in axis labels (the tooltip shows it whole)
_CELL_CHARS = 6  # text written inside a heatmap cell


# -- text --------------------------------------------------------------------------------------
_GLYPHS = {" ": "␣", "\n": "⏎", "\t": "⇥", "\r": "␍"}


def visible_token(token: str) -> str:
    """A token as it can be seen: newlines, tabs and carriage returns as ``⏎ ⇥ ␍``, a token of
    spaces only as ``␣`` (one per space), other control characters as escapes, ``∅`` for ''."""
    if token == "":
        return "∅"
    if token.isspace():
        return "".join(_GLYPHS.get(c) or printable(c) for c in token)
    return "".join(_GLYPHS[c] if c in "\n\t\r" else printable(c) for c in token)


class Plain(str):
    """An axis label that is a name (``last``, ``12``), not a token: shown as it is, unquoted."""


def _e(text: Any) -> str:
    """HTML-escaped text (quotes too: safe in attributes)."""
    return html.escape(str(text), quote=True)


def _fmt(value: float) -> str:
    """A value with 3 significant digits (``nan`` as ``n/a``)."""
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    return f"{value:.3g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"


def _tick(value: float) -> str:
    """A colour-bar value, short: 3 significant digits, thousands as ``k``, millions as ``M``."""
    if abs(value) < 1e-12:
        return "0"
    for scale, suffix in ((1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}" if abs(value) >= 1e-3 else f"{value:.1e}"


def _tip(text: str) -> str:
    """The attribute that carries a tooltip: ``data-tip`` on a report page (its own tooltip),
    ``title`` in a notebook view."""
    return f' {_TIP_ATTRIBUTE.get()}="{_e(text)}"'


def _json_script(element_id: str, data: Any) -> str:
    """Data for the page's script, safe inside ``<script>`` (no ``</`` can close it) and strict
    JSON (the page's ``JSON.parse`` rejects NaN: callers write a missing number as None)."""
    text = json.dumps(data, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")
    return f'<script type="application/json" id="{_e(element_id)}">{text}</script>'


# -- colour scales -----------------------------------------------------------------------------
_BLUE, _WHITE, _RED = (33, 102, 172), (247, 247, 247), (178, 24, 43)
_SEQUENTIAL = ((247, 251, 255), (107, 174, 214), (8, 48, 107))


def _mix(a: tuple, b: tuple, t: float) -> tuple[int, int, int]:
    return tuple(round(x + (y - x) * t) for x, y in zip(a, b, strict=True))


class ColorScale:
    """Values -> colours: diverging (blue < 0 < red, centred at 0, symmetric bound) or
    sequential (white -> dark blue from ``low`` to ``high``)."""

    def __init__(self, values: torch.Tensor, diverging: bool):
        finite = values[torch.isfinite(values)] if values.numel() else values
        self.diverging = diverging
        if diverging:
            bound = float(finite.abs().max()) if finite.numel() else 1.0
            self.low, self.high = -(bound or 1.0), bound or 1.0
        else:
            self.low = min(0.0, float(finite.min())) if finite.numel() else 0.0
            high = float(finite.max()) if finite.numel() else 1.0
            self.high = high if high > self.low else self.low + 1.0

    def position(self, value: float) -> float:
        """Where ``value`` sits on the scale: -1..1 (diverging) or 0..1."""
        if self.diverging:
            return max(-1.0, min(1.0, value / self.high))
        return max(0.0, min(1.0, (value - self.low) / (self.high - self.low)))

    def color(self, value: float) -> str:
        if math.isnan(value):
            return "#ccc"
        t = self.position(value)
        if self.diverging:
            rgb = _mix(_WHITE, _RED, t) if t >= 0 else _mix(_WHITE, _BLUE, -t)
        else:
            rgb = _mix(*_SEQUENTIAL[:2], 2 * t) if t < 0.5 else _mix(*_SEQUENTIAL[1:], 2 * t - 1)
        return "rgb({},{},{})".format(*rgb)

    def ink(self, value: float) -> str:
        """Text colour readable on ``color(value)``."""
        dark = not math.isnan(value) and abs(self.position(value)) > (
            0.6 if self.diverging else 0.55
        )
        return "#fff" if dark else "#222"

    def legend(self, label: str) -> str:
        """A colour bar with five values under it and ``label`` above it."""
        steps = [self.low + (self.high - self.low) * i / 10 for i in range(11)]
        gradient = ", ".join(self.color(v) for v in steps)
        ticks = "".join(
            f"<span>{_tick(self.low + (self.high - self.low) * i / 4)}</span>" for i in range(5)
        )
        return (
            f'<div class="hs-legend"><div class="hs-legend-title">{_e(label)}</div>'
            f'<div class="hs-legend-bar" style="background:linear-gradient(to right, {gradient})">'
            f'</div><div class="hs-legend-ticks">{ticks}</div></div>'
        )


# -- figures -----------------------------------------------------------------------------------
def heatmap(
    values: torch.Tensor,
    rows: tuple[str, Sequence[Any]],
    columns: tuple[str, Sequence[Any]],
    value_label: str,
    diverging: bool = False,
    cell_text: Sequence[Sequence[str]] | None = None,
    cell_tips: Sequence[Sequence[str]] | None = None,
) -> str:
    """``values [rows, columns]`` as a table of coloured cells with axis titles and a legend.

    ``rows`` / ``columns`` are ``(axis title, labels)``; a label that is a token string is
    shown with visible whitespace. Each cell's tooltip names its row, column and value (plus
    ``cell_tips[r][c]`` when given).
    """
    values = values.detach().float().cpu()
    scale = ColorScale(values, diverging)
    (row_axis, row_labels), (col_axis, col_labels) = rows, columns
    header = "".join(
        f'<th class="hs-col"{_tip(_axis_tip(col_axis, c, label))}><span>'
        f"{_e(cut(_label(label), _LABEL_CHARS))}</span></th>"
        for c, label in enumerate(col_labels)
    )
    body = []
    for r, row_label in enumerate(row_labels):
        cells = []
        for c, col_label in enumerate(col_labels):
            value = float(values[r, c])
            tip = "\n".join(
                [_axis_tip(row_axis, r, row_label), _axis_tip(col_axis, c, col_label)]
                + [f"{value_label}: {_fmt(value)}"]
                + ([cell_tips[r][c]] if cell_tips is not None else [])
            )
            text = _e(cut(visible_token(cell_text[r][c]), _CELL_CHARS)) if cell_text else ""
            style = f"background:{scale.color(value)};color:{scale.ink(value)}"
            cells.append(f'<td style="{style}"{_tip(tip)}>{text}</td>')
        row_th = _e(cut(_label(row_label), _LABEL_CHARS))
        body.append(f'<tr><th class="hs-row">{row_th}</th>{"".join(cells)}</tr>')
    wide = " hs-wide" if cell_text else " hs-big" if values.numel() <= 64 else ""
    table = f'<table class="hs-heat{wide}">{"".join(body)}<tr><th></th>{header}</tr></table>'
    return _framed(table, row_axis, col_axis, scale.legend(value_label))


def _label(label: Any) -> str:
    if isinstance(label, Plain) or not isinstance(label, str):
        return str(label)
    return visible_token(label)


def _axis_tip(axis: str, index: int, label: Any) -> str:
    """``layer 3`` or ``position 5: ' John'`` (a token label is shown raw, quoted)."""
    if isinstance(label, str) and not isinstance(label, Plain):
        return f"{axis} {index}: {label!r}"
    return f"{axis} {label}"


def _framed(figure: str, y_title: str, x_title: str, legend: str) -> str:
    """A figure with its y-axis title on the left, x-axis title under it, legend beside it."""
    return (
        f'<div class="hs-fig"><div class="hs-ytitle"><span>{_e(y_title)}</span></div>'
        f'<div><div class="hs-scroll">{figure}</div><div class="hs-xtitle">{_e(x_title)}</div>'
        f"</div>{legend}</div>"
    )


def bar_chart(
    values: torch.Tensor, axis: tuple[str, Sequence[Any]], value_label: str, diverging: bool = True
) -> str:
    """``values [n]`` as an SVG bar chart from 0, with a y axis of values and axis titles."""
    values = values.detach().float().cpu()
    title, labels = axis
    n = len(values)
    finite = values.masked_fill(~torch.isfinite(values), 0.0)  # inf must not set the axis
    low = min(0.0, float(finite.min())) if n else 0.0
    high = max(0.0, float(finite.max())) if n else 1.0
    low, high, ticks = _nice_ticks(low, high)
    step = max(14, min(40, 640 // max(n, 1)))
    left, top, plot_h, bottom = 64, 12, 200, 58
    width, height = left + step * n + 16, top + plot_h + bottom
    y_of = lambda v: top + plot_h * (high - v) / (high - low)  # noqa: E731
    scale = ColorScale(values, diverging)
    parts = [_bar_axes(ticks, y_of, left, step * n, top, plot_h, value_label, title, width)]
    every = max(1, math.ceil(n / 32))
    for i, (value, label) in enumerate(zip(values.tolist(), labels, strict=True)):
        x = left + i * step
        drawn = value if math.isfinite(value) else 0.0  # nan / inf: a grey mark at 0
        y0, y1 = sorted((y_of(0.0), y_of(drawn)))
        tip = f"{_axis_tip(title, i, label)}\n{value_label}: {_fmt(value)}"
        fill = scale.color(value) if math.isfinite(value) else "#ccc"
        parts.append(
            f'<rect x="{x + 1}" y="{y0:.1f}" width="{step - 2}" height="{max(y1 - y0, 0.5):.1f}" '
            f'fill="{fill}" stroke="#555" stroke-width="0.5"{_tip(tip)}/>'
        )
        if i % every == 0:
            text = _e(cut(_label(label), 8))
            parts.append(
                f'<text class="hs-tick" x="{x + step / 2}" y="{top + plot_h + 14}" '
                f'text-anchor="end" transform="rotate(-45 {x + step / 2} {top + plot_h + 14})">'
                f"{text}</text>"
            )
    svg = (
        f'<svg class="hs-bars" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'role="img">{"".join(parts)}</svg>'
    )
    return f'<div class="hs-fig"><div class="hs-scroll">{svg}</div></div>'


def _bar_axes(ticks, y_of, left, plot_w, top, plot_h, value_label, x_title, width) -> str:
    """The y axis (ticks, grid lines, title), the zero line and the x-axis title of a bar chart."""
    parts = []
    for tick in ticks:
        y = y_of(tick)
        parts.append(
            f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e3e3e3"/>'
            f'<text class="hs-tick" x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">'
            f"{_fmt(tick)}</text>"
        )
    zero = y_of(0.0)
    parts.append(
        f'<line x1="{left}" x2="{left + plot_w}" y1="{zero:.1f}" y2="{zero:.1f}" stroke="#333"/>'
        f'<line x1="{left}" x2="{left}" y1="{top}" y2="{top + plot_h}" stroke="#333"/>'
        f'<text class="hs-axis-title" x="14" y="{top + plot_h / 2}" text-anchor="middle" '
        f'transform="rotate(-90 14 {top + plot_h / 2})">{_e(cut(value_label, 34))}</text>'
        f'<text class="hs-axis-title" x="{left + plot_w / 2}" y="{top + plot_h + 52}" '
        f'text-anchor="middle">{_e(x_title)}</text>'
    )
    return "".join(parts)


def _nice_ticks(low: float, high: float) -> tuple[float, float, list[float]]:
    """A rounded range covering ``[low, high]`` and its ticks (about five)."""
    if high - low <= 0:
        high = low + 1.0
    raw = (high - low) / 4
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    low, high = math.floor(low / step) * step, math.ceil(high / step) * step
    count = round((high - low) / step)
    return low, high, [low + i * step for i in range(count + 1)]


def key_values(rows: Sequence[tuple[Any, Any]], header: Sequence[str] | None = None) -> str:
    """A small table of numbers or text (floats written with 3 significant digits)."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header) if header else ""
    body = "".join(
        "<tr>" + "".join(f"<td>{_e(_cell(v))}</td>" for v in row) + "</tr>" for row in rows
    )
    return f'<table class="hs-nums">{f"<tr>{head}</tr>" if head else ""}{body}</table>'


def _cell(value: Any) -> str:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, float):
        return _fmt(value)
    return str(value)


def section(title: str, subtitle: str | None, figures: Sequence[str], numbers: str = "") -> str:
    """One block of the page: a title, what it shows, its figures and its numbers beside them."""
    sub = f'<p class="hs-sub">{_e(subtitle)}</p>' if subtitle else ""
    side = f'<div class="hs-side">{numbers}</div>' if numbers else ""
    return (
        f'<section class="hs-section"><h2>{_e(title)}</h2>{sub}<div class="hs-body">'
        f'<div class="hs-figures">{"".join(figures)}</div>{side}</div></section>'
    )


# -- attention ---------------------------------------------------------------------------------
def attention_view(
    patterns: torch.Tensor, tokens: Sequence[str], head_labels: Sequence[str], element_id: str
) -> str:
    """Heads side by side, each the prompt's tokens; hovering a token (the query) colours every
    token by the attention it receives from that query, in every head; a click pins the query.

    Args:
        patterns: ``[heads, seq, seq]`` attention probabilities (query rows, key columns).
        tokens: the ``seq`` token strings.
    """
    patterns = patterns.detach().float().cpu()
    spans = "".join(
        f'<span class="hs-tok" data-i="{i}">{_e(visible_token(t))}</span>'
        for i, t in enumerate(tokens)
    )
    panels = "".join(
        f'<div class="hs-head" data-h="{h}"><div class="hs-head-title">{_e(label)}</div>'
        f'<div class="hs-toks">{spans}</div></div>'
        for h, label in enumerate(head_labels)
    )
    data = {
        "tokens": list(tokens),
        "heads": list(head_labels),
        "patterns": [  # a NaN weight (e.g. a fully masked query row) is shown as "n/a"
            [[round(v, 4) if math.isfinite(v) else None for v in row] for row in head]
            for head in patterns.tolist()
        ],
    }
    legend = _alpha_legend("attention from the query")
    return (
        f'<div class="hs-attn" id="{_e(element_id)}">{_json_script(element_id + "-data", data)}'
        f'<div class="hs-attn-help">Hover a token to see where it attends; click it to keep it as '
        f"the query and hover the others to read their weights (click again to let go); "
        f'<span class="hs-query-note">query: <b class="hs-query"></b></span></div>'
        f'<div class="hs-heads">{panels}</div>{legend}</div>'
    )


def _alpha_legend(label: str) -> str:
    """The attention view's colour bar: the same dark blue, opacity 0.85 x weight."""
    ticks = "".join(f"<span>{_tick(i / 4)}</span>" for i in range(5))
    return (
        f'<div class="hs-legend"><div class="hs-legend-title">{_e(label)}</div>'
        f'<div class="hs-legend-bar" style="background:linear-gradient(to right, '
        f'rgba(8,48,107,0), rgba(8,48,107,0.85))"></div>'
        f'<div class="hs-legend-ticks">{ticks}</div></div>'
    )


# -- the page ----------------------------------------------------------------------------------
_CSS = """
.hs-root { font-family: system-ui, -apple-system, Segoe UI, sans-serif; color: #222; }
.hs-root h1 { font-size: 1.5em; margin: 0 0 .2em; }
.hs-root h2 { font-size: 1.1em; margin: 0 0 .2em; }
.hs-sub { margin: 0 0 .6em; color: #555; font-size: 13px; white-space: pre-wrap;
  overflow-wrap: anywhere; }
.hs-section { border-top: 1px solid #ddd; padding: 1em 0 1.4em; }
.hs-body { display: flex; flex-wrap: wrap; gap: 1.5em; align-items: flex-start; }
.hs-figures { min-width: 0; max-width: 100%; }
.hs-fig { display: flex; align-items: flex-start; gap: .6em; margin-bottom: 1em; }
.hs-scroll { overflow-x: auto; max-width: 100%; }
.hs-ytitle { writing-mode: vertical-rl; transform: rotate(180deg); font-size: 12px;
  font-weight: 600; align-self: center; white-space: nowrap; }
.hs-xtitle { text-align: center; font-size: 12px; font-weight: 600; margin-top: .3em; }
table.hs-heat { border-collapse: collapse; font-size: 10px; }
table.hs-heat td { min-width: 1.9em; height: 1.45em; padding: 0 2px; text-align: center;
  border: 1px solid #fff; white-space: nowrap; cursor: default; }
table.hs-heat.hs-wide td { min-width: 4.4em; }
table.hs-heat.hs-big td { min-width: 2.8em; height: 2.2em; }
table.hs-heat th { font-weight: normal; padding: 0 4px; white-space: nowrap; color: #444; }
table.hs-heat th.hs-row { text-align: right; }
table.hs-heat th.hs-col { vertical-align: top; padding: 3px 0 0; }
table.hs-heat th.hs-col span { writing-mode: vertical-rl; transform: rotate(180deg);
  white-space: pre; display: inline-block; font-family: ui-monospace, monospace; }
.hs-legend { font-size: 11px; width: 180px; flex: none; }
.hs-legend-title { font-weight: 600; margin-bottom: 2px; overflow-wrap: anywhere; }
.hs-legend-bar { height: 12px; border: 1px solid #999; }
.hs-legend-ticks { display: flex; justify-content: space-between; gap: 4px; margin-top: 1px; }
.hs-legend-ticks span { font-variant-numeric: tabular-nums; }
svg.hs-bars text { font-size: 10px; fill: #333; }
svg.hs-bars text.hs-axis-title { font-size: 12px; font-weight: 600; }
table.hs-nums { border-collapse: collapse; font-size: 12px; }
table.hs-nums td, table.hs-nums th { padding: 1px 8px; border-bottom: 1px solid #eee;
  text-align: left; white-space: pre; font-variant-numeric: tabular-nums; }
table.hs-nums th { border-bottom: 1px solid #999; }
.hs-side { max-width: 100%; overflow-x: auto; }
.hs-heads { display: flex; flex-wrap: wrap; gap: .8em; margin: .5em 0; }
.hs-head { width: 250px; border: 1px solid #ddd; border-radius: 4px; padding: 4px 6px; }
.hs-head-title { font-weight: 600; font-size: 12px; margin-bottom: 3px; }
.hs-toks { font-family: ui-monospace, monospace; font-size: 12px; line-height: 1.7;
  overflow-wrap: anywhere; }
.hs-tok { white-space: pre-wrap; border-radius: 2px; padding: 0 1px; cursor: pointer; }
.hs-tok.hs-selected { outline: 2px solid #e08000; }
.hs-attn-help { font-size: 12px; color: #555; }
.hs-raw { max-width: 100%; overflow-x: auto; }
#hs-tip { position: fixed; background: #222; color: #fff; padding: 4px 7px; font-size: 12px;
  border-radius: 3px; pointer-events: none; display: none; white-space: pre; z-index: 10;
  font-family: ui-monospace, monospace; }
"""

_SCRIPT = """
(function () {
  const tip = document.getElementById("hs-tip");
  function place(e) {
    const w = tip.offsetWidth, h = tip.offsetHeight;
    let x = e.clientX + 14, y = e.clientY + 14;
    if (x + w > window.innerWidth) x = Math.max(0, e.clientX - w - 8);
    if (y + h > window.innerHeight) y = Math.max(0, e.clientY - h - 8);
    tip.style.left = x + "px"; tip.style.top = y + "px";
  }
  document.addEventListener("mouseover", e => {
    const cell = e.target.closest("[data-tip]");
    if (!cell) { tip.style.display = "none"; return; }
    tip.textContent = cell.getAttribute("data-tip"); tip.style.display = "block"; place(e);
  });
  document.addEventListener("mousemove", e => { if (tip.style.display === "block") place(e); });
  document.querySelectorAll(".hs-attn").forEach(view => {
    const data = JSON.parse(document.getElementById(view.id + "-data").textContent);
    const last = data.tokens.length - 1;
    let pinned = null;  // a clicked query stays while other tokens are hovered
    function show(q) {
      view.querySelector(".hs-query").textContent = JSON.stringify(data.tokens[q]) + " (" + q + ")";
      view.querySelectorAll(".hs-head").forEach(panel => {
        const row = data.patterns[+panel.dataset.h][q];
        panel.querySelectorAll(".hs-tok").forEach(span => {
          const k = +span.dataset.i, a = row[k];
          span.style.background = a === null ? "none" : "rgba(8,48,107," + (0.85 * a).toFixed(3) + ")";
          span.style.color = a !== null && a > 0.5 ? "#fff" : "#222";
          span.classList.toggle("hs-selected", k === q);
          span.setAttribute("data-tip", data.heads[+panel.dataset.h] + "\\nquery " + q + ": " +
            JSON.stringify(data.tokens[q]) + "\\nkey " + k + ": " + JSON.stringify(data.tokens[k]) +
            "\\nattention: " + (a === null ? "n/a (not a number)" : a.toFixed(3)));
        });
      });
    }
    view.addEventListener("mouseover", e => {
      const span = e.target.closest(".hs-tok");
      if (span && pinned === null) show(+span.dataset.i);
    });
    view.addEventListener("click", e => {
      const span = e.target.closest(".hs-tok");
      if (!span) return;
      const q = +span.dataset.i;
      pinned = pinned === q ? null : q;
      show(q);
    });
    view.querySelector(".hs-heads").addEventListener("mouseleave", () => show(pinned ?? last));
    show(last);
  });
})();
"""


def page(title: str, body: str, subtitle: str = "") -> str:
    """The whole self-contained HTML document."""
    sub = f'<p class="hs-sub">{_e(subtitle)}</p>' if subtitle else ""
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}"
        f"body {{ margin: 1.5em; }}</style></head>"
        f'<body class="hs-root"><h1>{_e(title)}</h1>{sub}{body}<div id="hs-tip"></div>'
        f"<script>{_SCRIPT}</script></body></html>\n"
    )


class Report:
    """An experiment's results as one offline HTML page.

    Each ``add*`` method appends a section and returns the report (calls chain);
    :meth:`write` writes the page, :meth:`html` returns it, and in a notebook the report
    shows itself.
    """

    def __init__(self, title: str, subtitle: str = ""):
        self.title, self.subtitle = title, subtitle
        self.sections: list[str] = []

    def add(self, result: Any, title: str | None = None, **options: Any) -> Report:
        """Add a result by its type: a ``PatchingResult`` (options ``prompts``, ``answers``),
        a ``LensResult`` or saved lens summary (options ``target``, ``example``, ``prompt``),
        an ``ActivationCache`` (activation norms), an ``ActivationStore``, a string (a
        paragraph), or rows of a table (a list of tuples or a dict)."""
        from . import results

        self.sections.append(results.section_of(result, title, options))
        return self

    def add_attention(
        self,
        patterns: Any,
        tokens: Sequence[str],
        heads: Sequence[Any] | None = None,
        title: str | None = None,
        example: int = 0,
    ) -> Report:
        """Attention patterns, heads side by side (hover a token to see where it attends).

        Args:
            patterns: an ``ActivationCache`` holding ``pattern_L{l}H{h}`` keys extracted at
                every position (``["all"]``, ``attn_pattern_all_keys=True``), a dict
                ``{"L24H4": [seq, seq]}``, or a tensor ``[heads, seq, seq]``.
            tokens: the ``seq`` token strings of ``example``.
            heads: which heads of a cache (``[(24, 4), ...]``), or the labels of a tensor's
                heads; default: every pattern key in the cache.
        """
        from .results import attention_section

        self.sections.append(attention_section(patterns, tokens, heads, title, example, self))
        return self

    def add_html(self, fragment: str, title: str | None = None) -> Report:
        """A raw HTML fragment (e.g. feature cards), inserted as it is: it is *not* escaped,
        so pass only HTML you built; ``title`` is escaped."""
        figure = f'<div class="hs-raw">{fragment}</div>'
        self.sections.append(section(title, None, [figure]) if title else figure)
        return self

    def add_text(self, text: str, title: str | None = None) -> Report:
        """A paragraph of plain text (escaped)."""
        paragraph = f'<p class="hs-sub">{_e(text)}</p>'
        self.sections.append(section(title, None, [paragraph]) if title else paragraph)
        return self

    def add_table(
        self, rows: Any, header: Sequence[str] | None = None, title: str | None = None
    ) -> Report:
        """A table of numbers or text: a dict (name -> value) or a list of tuples."""
        if isinstance(rows, dict):
            rows, header = list(rows.items()), header or ["name", "value"]
        rows = [tuple(row) if isinstance(row, list | tuple) else (row,) for row in rows]
        self.sections.append(section(title or "Table", None, [key_values(rows, header)]))
        return self

    def html(self) -> str:
        return page(self.title, "\n".join(self.sections), self.subtitle)

    def write(self, path: str | Path) -> Path:
        """Write the page (UTF-8) to ``path``; returns the path."""
        path = Path(path)
        if path.is_dir():
            raise HookscopeError(f"Report.write: {str(path)!r} is a folder; give a file name.")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.html(), encoding="utf-8")
        return path

    def _repr_html_(self) -> str:
        with _title_tips():
            return notebook_fragment("\n".join(self.sections))

    def __repr__(self) -> str:
        return f"Report({self.title!r}, {len(self.sections)} sections)"


# -- notebook views ----------------------------------------------------------------------------
@contextlib.contextmanager
def _title_tips() -> Iterator[None]:
    token = _TIP_ATTRIBUTE.set("title")
    try:
        yield
    finally:
        _TIP_ATTRIBUTE.reset(token)


def notebook_fragment(body: str) -> str:
    """A fragment with its own styles (no script: tooltips are ``title`` attributes)."""
    return f'<div class="hs-root"><style>{_CSS}</style>{body}</div>'


def notebook_view(result: Any) -> str:
    """The ``_repr_html_`` of a cache, patching result, lens result or store."""
    from . import results

    with _title_tips():
        return notebook_fragment(results.notebook_section(result))
