"""Feature cards: what a dictionary feature responds to and what it writes.

A card for feature ``i`` of a :class:`~hookscope.dictionaries.Dictionary` holds

- its **top-activating examples** over a store (streamed shard by shard, never loaded whole):
  the examples whose largest activation of ``i`` (over their tokens) is largest, each with the
  token context around that token and every token's activation (highlighted in HTML by
  activation, relative to the feature's largest);
- its **logit effects**: the decoder direction through the unembedding, ``W_dec[i] @ W_U^T``
  ``[vocab]`` (norm-free: the final norm is left out, as TransformerLens' ``W_U`` after
  folding), the tokens it promotes (top) and suppresses (bottom);
- its **density**: the fraction of the store's tokens where it fires.

The store must hold the dictionary's ``reads`` point at every token (``"all"``) and the token
ids (``save_input_ids=True``); with ``"all"`` slot ``j`` of a row is its ``j``-th real token, which
sits at ``input_ids[row, j]`` under right padding (``input_ids[row, T - n + j]`` under left
padding of a row with ``n`` real tokens; pass the tokenizer the store was extracted with).

:func:`card_html` returns a self-contained HTML fragment (inline styles, every text escaped,
whitespace tokens made visible, no scripts or network); :func:`card_text` a plain-text form.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import HookscopeError
from ..plot import printable
from ..store import ActivationStore
from ..store_stream import refuse_negative_slots, select_slots
from .core import Dictionary


@dataclass
class CardExample:
    """One top-activating example: its index in the store (shard order), the slot of its
    largest activation, that activation, and a context of tokens with their activations."""

    example: int
    slot: int
    activation: float
    tokens: list[str]
    activations: list[float]
    focus: int  # index in ``tokens`` of the slot


@dataclass
class FeatureCard:
    """Everything shown for one feature (see the module docstring)."""

    feature: int
    dictionary: str
    examples: list[CardExample] = field(default_factory=list)
    top_logits: list[tuple[str, float]] = field(default_factory=list)
    bottom_logits: list[tuple[str, float]] = field(default_factory=list)
    density: float = 0.0

    def to_html(self) -> str:
        return card_html(self)

    def to_text(self) -> str:
        return card_text(self)


def logit_effects(dictionary: Dictionary, unembedding: torch.Tensor, feature: int) -> torch.Tensor:
    """``W_dec[feature] @ unembedding^T``: the feature's direct effect on each logit ``[vocab]``
    (``unembedding [vocab, d_out]``, e.g. ``hm.hf_model.get_output_embeddings().weight``)."""
    if unembedding.dim() != 2 or unembedding.shape[1] != dictionary.d_out:
        raise HookscopeError(
            f"unembedding has shape {list(unembedding.shape)}; expected [vocab, {dictionary.d_out}]."
        )
    direction = dictionary.W_dec[feature].to(unembedding.dtype) / dictionary.input_scale
    return unembedding.detach() @ direction.to(unembedding.device)


def _check_features(dictionary: Dictionary, features: Sequence[int]) -> list[int]:
    features = list(features)
    bad = [f for f in features if not (isinstance(f, int) and 0 <= f < dictionary.d_sae)]
    if bad or not features:
        raise HookscopeError(
            f"features {bad or features} are not feature indices 0..{dictionary.d_sae - 1}."
        )
    return features


@dataclass
class _Top:
    """The running top-``n`` examples of one feature: their max activation and rows (example
    index, slot of that max, activations ``[P]``, token ids ``[T]``, number of real slots)."""

    values: list[float] = field(default_factory=list)
    rows: list[tuple[int, int, torch.Tensor, torch.Tensor]] = field(default_factory=list)

    def offer(self, n: int, value: float, row: tuple) -> None:
        if len(self.values) == n and value <= self.values[-1]:
            return
        at = next((i for i, v in enumerate(self.values) if value > v), len(self.values))
        self.values.insert(at, value)
        self.rows.insert(at, row)
        del self.values[n:], self.rows[n:]


def _shard_activations(
    store: ActivationStore, dictionary: Dictionary, index: int, features: list[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(activations ``[B, P, n_features]`` (0 at padded slots), ``position_mask [B, P]``,
    ``input_ids [B, T]``) of shard ``index``."""
    data = store.shard(index, [dictionary.reads, "input_ids"])
    mask = data["position_mask"].bool()
    values = data[dictionary.reads]
    acts = torch.zeros(*mask.shape, len(features))
    with torch.no_grad():
        chosen = torch.tensor(features, device=values.device)  # only these (alone where it can)
        acts[mask] = dictionary.encode(values[mask], chosen).float().cpu()
    return acts, mask, data["input_ids"]


def top_activations(
    store: ActivationStore,
    dictionary: Dictionary,
    features: Sequence[int],
    n: int = 8,
    slots: slice | None = None,
) -> tuple[dict[int, _Top], dict[int, float]]:
    """Stream ``store`` once: for each feature, its ``n`` examples with the largest activation
    (over the example's real slots, only ``slots`` when given; ties: the earlier example), and
    its density (fraction of those slots where it fires).

    Returns ``({feature: _Top}, {feature: density})``; example indices count in shard order.
    """
    features = _check_features(dictionary, features)
    missing = [k for k in (dictionary.reads, "input_ids") if k not in store.keys()]
    if missing:
        raise HookscopeError(
            f"feature cards need {missing} in the store (extract {dictionary.reads!r} at 'all' "
            "with save_input_ids=True)."
        )
    _check_store_positions(store)
    refuse_negative_slots(slots)  # slot -1 is a padded slot, not each example's last token
    tops = {f: _Top() for f in features}
    fired, total, offset = torch.zeros(len(features)), 0, 0
    for index in range(store.num_shards):
        acts, mask, ids = _shard_activations(store, dictionary, index, features)
        real = mask.sum(1).tolist()  # real slots per row (before ``slots``: for the context)
        if slots is not None:
            mask = select_slots(mask, slots)
            acts = acts * mask[..., None]
        fired += (acts > 0).sum((0, 1)).float()
        total += int(mask.sum())
        best, where = acts.max(dim=1)  # [B, n_features]
        for column, feature in enumerate(features):
            for row in range(len(acts)):
                if best[row, column] > 0:
                    record = (
                        offset + row,
                        int(where[row, column]),
                        acts[row, :, column].clone(),  # a view would keep the whole shard
                        ids[row].clone(),
                        real[row],
                    )
                    tops[feature].offer(n, float(best[row, column]), record)
        offset += len(acts)
    density = {f: float(fired[c]) / max(total, 1) for c, f in enumerate(features)}
    return tops, density


def _check_store_positions(store: ActivationStore) -> None:
    """Cards read slot ``j`` as the ``j``-th real token: true of a store extracted at ``"all"``
    only (at ``["last", 0]`` or ``(1, 3)`` slot 0 is another token, and the card would show the
    wrong one)."""
    items = list(store.mapping_index)
    config = store.manifest.get("description", {}).get("extraction_config", {})
    if items != ["all"] or config.get("extract_avg"):
        raise HookscopeError(
            f"feature cards need a store extracted at ['all'] (slot j = the j-th real token, not "
            f"averaged); this one holds positions {items}"
            f"{' averaged' if config.get('extract_avg') else ''}."
        )


def _context(record: tuple, tokenizer: Any, before: int, after: int) -> CardExample:
    """The example of ``record`` with ``before`` / ``after`` tokens around its max slot."""
    example, slot, acts, ids, n_real = record
    start, stop = max(0, slot - before), min(n_real, slot + after + 1)
    # slot j is the j-th real token: at j under right padding, at T - n_real + j under left
    shift = len(ids) - n_real if getattr(tokenizer, "padding_side", "right") == "left" else 0
    tokens = [tokenizer.decode([t]) for t in ids[start + shift : stop + shift].tolist()]
    values = acts[start:stop].tolist()
    return CardExample(example, slot, float(acts[slot]), tokens, values, slot - start)


def feature_cards(
    store: ActivationStore,
    dictionary: Dictionary,
    features: Sequence[int],
    tokenizer: Any,
    unembedding: torch.Tensor | None = None,
    n_examples: int = 8,
    n_logits: int = 10,
    context: tuple[int, int] = (12, 4),
    slots: slice | None = None,
) -> list[FeatureCard]:
    """One :class:`FeatureCard` per feature, from one pass over ``store``.

    Args:
        store: holds ``dictionary.reads`` at ``"all"`` and ``input_ids``.
        tokenizer: the store's tokenizer (decodes tokens; its ``padding_side`` places slots).
        unembedding: ``[vocab, d_out]`` for logit effects (none: no logit lists), e.g.
            ``hm.hf_model.get_output_embeddings().weight``.
        context: tokens shown (before, after) the most active token of each example.
        slots: only these slots (``slice(1, None)`` skips each example's first token).
    """
    tops, density = top_activations(store, dictionary, features, n_examples, slots)
    cards = []
    for feature in tops:
        card = FeatureCard(feature, dictionary.name, density=density[feature])
        card.examples = [_context(r, tokenizer, *context) for r in tops[feature].rows]
        if unembedding is not None:
            effects = logit_effects(dictionary, unembedding, feature).float().cpu()
            for target, largest in ((card.top_logits, True), (card.bottom_logits, False)):
                values, ids = effects.topk(n_logits, largest=largest)
                target += [
                    (tokenizer.decode([i]), v)
                    for i, v in zip(ids.tolist(), values.tolist(), strict=True)
                ]
        cards.append(card)
    return cards


_VISIBLE = {" ": "\u00b7", "\n": "\u21b5", "\t": "\u2192", "\r": "\u240d"}


def visible(token: str) -> str:
    """``token`` with whitespace made visible (space ·, newline ↵, tab →), other control
    characters as escapes (as in plots and reports); empty as ∅."""
    return "".join(_VISIBLE.get(c) or printable(c) for c in token) or "\u2205"


def card_text(card: FeatureCard) -> str:
    """A plain-text card: density, logit effects, and each example with the most active
    token in [[brackets]] and every firing token followed by its activation."""
    lines = [f"feature {card.feature} of {card.dictionary}: fires on {card.density:.2%} of tokens"]
    for title, items in (("promotes", card.top_logits), ("suppresses", card.bottom_logits)):
        if items:
            lines.append(f"  {title}: " + ", ".join(f"{visible(t)!s} {v:+.2f}" for t, v in items))
    for example in card.examples:
        parts = []
        for index, (token, value) in enumerate(
            zip(example.tokens, example.activations, strict=True)
        ):
            text = visible(token)
            text = f"[[{text}]]" if index == example.focus else text
            parts.append(f"{text}({value:.1f})" if value > 0 else text)
        lines.append(f"  {example.activation:7.2f}  #{example.example}: " + " ".join(parts))
    return "\n".join(lines)


def _token_span(token: str, value: float, peak: float, focus: bool) -> str:
    alpha = 0.0 if peak <= 0 else max(0.0, min(1.0, value / peak))
    border = "border-bottom:2px solid #c00;" if focus else ""
    title = html.escape(f"{token!r}: {value:.3f}", quote=True)
    return (
        f'<span title="{title}" style="background:rgba(255,120,0,{alpha:.2f});{border}'
        f'white-space:pre;font-family:monospace">{html.escape(visible(token))}</span>'
    )


def card_html(card: FeatureCard) -> str:
    """A self-contained HTML fragment (inline styles, escaped text, no script, no network)."""
    peak = max((e.activation for e in card.examples), default=0.0)
    head = html.escape(f"Feature {card.feature} of {card.dictionary}")
    parts = [
        '<div class="hookscope-feature-card" style="font-family:sans-serif;border:1px solid #ccc;'
        'padding:8px;margin:8px 0">',
        f"<h3 style='margin:0 0 4px'>{head}</h3>",
        f"<div>fires on {card.density:.2%} of tokens</div>",
    ]
    for title, items in (("promotes", card.top_logits), ("suppresses", card.bottom_logits)):
        if items:
            cells = ", ".join(f"<code>{html.escape(visible(t))}</code> {v:+.2f}" for t, v in items)
            parts.append(f"<div><b>{title}</b>: {cells}</div>")
    parts.append("<table style='border-collapse:collapse'>")
    for example in card.examples:
        spans = "".join(
            _token_span(t, v, peak, i == example.focus)
            for i, (t, v) in enumerate(zip(example.tokens, example.activations, strict=True))
        )
        parts.append(
            f"<tr><td style='padding-right:8px'>{example.activation:.2f}</td>"
            f"<td>#{example.example}</td><td>{spans}</td></tr>"
        )
    parts.append("</table></div>")
    return "\n".join(parts)


def cards_page(cards: Sequence[FeatureCard], title: str = "Feature cards") -> str:
    """A complete HTML page holding ``cards`` (for saving to a file)."""
    body = "\n".join(card_html(card) for card in cards)
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"</head><body>{body}</body></html>"
    )
