"""Positions in the prompt's own terms: text anchors and chat roles.

Both resolve per example from the **exact text** each example was tokenized from and the
tokenizer's **offset mapping** (the character span of every token), never by searching decoded
tokens. A token covers a character range when their spans overlap, so a word merged with its
leading space, or split into several tokens, is found whole.

Text anchors are dicts (stored under their canonical JSON string, see :func:`anchor_key`):

================================================  ====================================================
``{"text": " Mary"}``                             the tokens covering the substring
``{"after": "Answer:"}``                          the token right after the anchor's last token
``{"before": "Answer:"}``                         the token right before the anchor's first token
``{"between": ["Q:", "A:"]}``                     the tokens strictly between the two anchors
================================================  ====================================================

Options: ``"occurrence"`` (``"first"`` (default), ``"last"``, ``"all"`` or an int, negative from
the end) picks which match of the anchor (for ``between``, of the first anchor; the second is the
next match after it); ``"tokens"`` (``"all"`` (default), ``"first"``, ``"last"``) which of the
selected tokens.

Chat roles need a batch from :meth:`hookscope.HookedModel.apply_chat_template`, which records the
character span of every message's content in the rendered text: ``"user:last"``,
``"assistant:all"``, ``"system:first"`` (every message of that role; ``first`` is the first token
of its first message, ``last`` the last token of its last one), ``"user-1:all"`` (the role's
message 1, 0-based, negative from the end) and ``"turn-2:last"`` (message 2 of the conversation,
whatever its role). The template's own markers (``<|im_start|>user\\n``) are not content.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import InputError, PositionError

ANCHOR_KINDS = ("text", "after", "before", "between")
_ANCHOR_OPTIONS = ("occurrence", "tokens")
_WHICH = ("first", "last", "all")
ROLE_ITEM = re.compile(
    r"^(?:turn-(?P<turn>-?\d+)|(?P<role>[a-z_]+)(?:-(?P<index>-?\d+))?):(?P<which>first|last|all)$"
)


@dataclass(frozen=True)
class MessageSpan:
    """One chat message's content: its role, its number in the conversation and its character
    span ``[start, end)`` in the rendered text."""

    role: str
    turn: int
    start: int
    end: int


@dataclass
class TextLayout:
    """Each example's text and token offsets, in **real-token coordinates** (padding excluded,
    so the layout holds whatever the padding side, also after generation re-pads the prompt).

    Attributes:
        texts: the exact string of each example.
        offsets: per example, ``[n_real, 2]`` long character spans (``(0, 0)`` for tokens with
            no text, e.g. BOS).
        messages: per example, the chat messages' spans (empty without a chat template).
    """

    texts: list[str]
    offsets: list[torch.Tensor]
    messages: list[list[MessageSpan]] = field(default_factory=list)

    @classmethod
    def from_batch(
        cls,
        texts: Sequence[str],
        offset_mapping: torch.Tensor,
        attention_mask: torch.Tensor,
        messages: list[list[MessageSpan]] | None = None,
    ) -> TextLayout:
        """From a tokenizer's padded ``offset_mapping [batch, seq, 2]`` and ``attention_mask``
        ``[batch, seq]``."""
        offsets = torch.as_tensor(offset_mapping).long().cpu()
        mask = torch.as_tensor(attention_mask).bool().cpu()
        if offsets.shape[:2] != mask.shape or len(texts) != mask.shape[0]:
            raise InputError(
                f"offset_mapping has shape {list(offsets.shape)}, attention_mask "
                f"{list(mask.shape)} and there are {len(texts)} texts: they must describe one batch."
            )
        rows = [offsets[b][mask[b]] for b in range(mask.shape[0])]
        return cls(list(texts), rows, messages or [[] for _ in texts])


def tokenize_with_offsets(tokenizer: Any, texts: list[str], **kwargs: Any) -> tuple[dict, Any]:
    """``tokenizer(texts)`` as a padded batch, and the offset mapping ``[batch, seq, 2]`` when
    the tokenizer can give one (a fast tokenizer), else the reason it cannot (a string)."""
    if not getattr(tokenizer, "is_fast", False):
        name = type(tokenizer).__name__
        batch = dict(tokenizer(texts, return_tensors="pt", padding=True, **kwargs))
        return batch, f"the tokenizer ({name}) is not a fast tokenizer, so it gives no offsets"
    batch = dict(
        tokenizer(texts, return_tensors="pt", padding=True, return_offsets_mapping=True, **kwargs)
    )
    return batch, batch.pop("offset_mapping")


# -- items ---------------------------------------------------------------------------------------
def anchor_key(item: Mapping) -> str:
    """The canonical string of an anchor dict (its JSON, keys sorted): the key it gets in
    ``mapping_index`` and in a store's description.

    Raises:
        PositionError: for an unknown kind or option, or a value of the wrong type.
    """
    check_anchor(item)
    return json.dumps(dict(item), sort_keys=True, ensure_ascii=False)


def parse_anchor_key(item: object) -> dict | None:
    """The anchor dict of a canonical anchor string, else None."""
    if not (isinstance(item, str) and item.startswith("{")):
        return None
    try:
        parsed = json.loads(item)
    except json.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, dict) else None


def check_anchor(item: Mapping) -> None:
    """Check an anchor dict's form (see the module docstring)."""
    kinds = [k for k in item if k in ANCHOR_KINDS]
    unknown = [k for k in item if k not in ANCHOR_KINDS and k not in _ANCHOR_OPTIONS]
    if len(kinds) != 1 or unknown:
        raise PositionError(
            f"text anchor {dict(item)!r}: give exactly one of {list(ANCHOR_KINDS)} and optionally "
            f"{list(_ANCHOR_OPTIONS)}; unknown keys: {unknown}."
        )
    value = item[kinds[0]]
    anchors = value if kinds[0] == "between" else [value]
    if kinds[0] == "between" and not (isinstance(value, list | tuple) and len(value) == 2):
        raise PositionError(
            f"text anchor {dict(item)!r}: 'between' takes two strings, e.g. ['Q:', 'A:']."
        )
    if not all(isinstance(a, str) and a for a in anchors):
        raise PositionError(
            f"text anchor {dict(item)!r}: the anchor text must be a non-empty string."
        )
    occurrence = item.get("occurrence", "first")
    if not (
        occurrence in _WHICH or (isinstance(occurrence, int) and not isinstance(occurrence, bool))
    ):
        raise PositionError(
            f"text anchor {dict(item)!r}: 'occurrence' must be 'first', 'last', 'all' or an int, "
            f"got {occurrence!r}."
        )
    if item.get("tokens", "all") not in _WHICH:
        raise PositionError(
            f"text anchor {dict(item)!r}: 'tokens' must be 'first', 'last' or 'all', got "
            f"{item.get('tokens')!r}."
        )


def is_text_item(item: object) -> bool:
    """True for anchor strings (:func:`anchor_key`) and chat role items."""
    return parse_anchor_key(item) is not None or (
        isinstance(item, str) and ROLE_ITEM.match(item) is not None
    )


def _needs_layout(item: object, layout: TextLayout | None, missing: str | None) -> TextLayout:
    if layout is not None:
        return layout
    raise PositionError(
        f"position item {item!r} names text, so it needs each example's text and the tokenizer's "
        f"offsets, and this batch has none ({missing or 'the inputs were already token ids'}). "
        "Pass the prompts as strings (or records with 'text'), or hm.apply_chat_template(...) for "
        "chat roles, or a batch with 'offset_mapping' and 'text' (the exact strings); hookscope "
        "never searches decoded tokens."
    )


def resolve_text_item(
    item: str, layout: TextLayout | None, missing: str | None = None
) -> list[list[int]]:
    """Per example, the real-token indices a text anchor or role item selects.

    Raises:
        PositionError: without text offsets, or naming the example (and its text) that the
            item does not fit.
    """
    layout = _needs_layout(item, layout, missing)
    anchor = parse_anchor_key(item)
    if anchor is not None:
        return [_anchor_row(anchor, item, b, layout) for b in range(len(layout.texts))]
    return [_role_row(item, b, layout) for b in range(len(layout.texts))]


def _covering(offsets: torch.Tensor, start: int, end: int) -> list[int]:
    """Indices of the tokens whose character span overlaps ``[start, end)``."""
    hit = (offsets[:, 0] < end) & (offsets[:, 1] > start) & (offsets[:, 1] > offsets[:, 0])
    return torch.nonzero(hit).flatten().tolist()


def _pick(values: list, which: object, what: str, item: str, row: int, text: str) -> list:
    """``values`` narrowed by ``which`` (first / last / all / an int)."""
    if which == "all":
        return values
    if which == "first":
        return values[:1]
    if which == "last":
        return values[-1:]
    if not -len(values) <= which < len(values):
        raise PositionError(
            f"position item {item!r}: example {row} has {len(values)} {what}; "
            f"{what.rstrip('s')} {which} is out of range (valid: {-len(values)}..{len(values) - 1}); "
            f"its text: {text!r}."
        )
    return [values[which]]


def _not_found(item: str, anchor: str, row: int, text: str) -> PositionError:
    return PositionError(
        f"position item {item!r}: anchor {anchor!r} is not in example {row}; its text: {text!r}."
    )


def _matches(text: str, anchor: str, begin: int = 0) -> list[int]:
    """Start characters of every (possibly overlapping) occurrence of ``anchor`` from ``begin``."""
    found, at = [], text.find(anchor, begin)
    while at >= 0:
        found.append(at)
        at = text.find(anchor, at + 1)
    return found


def _anchor_row(anchor: dict, item: str, row: int, layout: TextLayout) -> list[int]:
    """One example's real-token indices for an anchor dict."""
    text, offsets = layout.texts[row], layout.offsets[row]
    kind = next(k for k in anchor if k in ANCHOR_KINDS)
    first = anchor[kind][0] if kind == "between" else anchor[kind]
    starts = _matches(text, first)
    if not starts:
        raise _not_found(item, first, row, text)
    chosen = _pick(starts, anchor.get("occurrence", "first"), "occurrences", item, row, text)
    selected: list[int] = []
    for start in chosen:
        covering = _covering(offsets, start, start + len(first))
        if not covering:
            raise PositionError(
                f"position item {item!r}: no token of example {row} covers {first!r} (characters "
                f"{start}..{start + len(first)}); its text: {text!r}."
            )
        selected += _anchor_tokens(kind, anchor, covering, item, row, layout)
    tokens = sorted(set(selected))
    return _pick(tokens, anchor.get("tokens", "all"), "tokens", item, row, text)


def _anchor_tokens(
    kind: str, anchor: dict, covering: list[int], item: str, row: int, layout: TextLayout
) -> list[int]:
    """The tokens one match selects, given the tokens ``covering`` the (first) anchor."""
    text, offsets = layout.texts[row], layout.offsets[row]
    n = len(offsets)
    if kind == "text":
        return covering
    if kind == "after" or kind == "before":
        index = covering[-1] + 1 if kind == "after" else covering[0] - 1
        if not 0 <= index < n:
            raise PositionError(
                f"position item {item!r}: in example {row} the anchor is at the "
                f"{'end' if kind == 'after' else 'start'} of the prompt, so there is no token "
                f"{kind} it; its text: {text!r}."
            )
        return [index]
    second = anchor["between"][1]
    after = int(offsets[covering[-1], 1])
    ends = _matches(text, second, after)
    if not ends:
        raise _not_found(item, second, row, text)
    stop = _covering(offsets, ends[0], ends[0] + len(second))[0]
    if stop <= covering[-1] + 1:
        raise PositionError(
            f"position item {item!r}: in example {row} no token lies between the two anchors; "
            f"its text: {text!r}."
        )
    return list(range(covering[-1] + 1, stop))


def _role_row(item: str, row: int, layout: TextLayout) -> list[int]:
    """One example's real-token indices for a chat role item."""
    match = ROLE_ITEM.match(item)
    messages, text = layout.messages[row], layout.texts[row]
    if not messages:
        raise PositionError(
            f"position item {item!r}: example {row} has no chat messages recorded; build the "
            "batch with hm.apply_chat_template(conversations) to use role items."
        )
    if match["turn"] is not None:
        chosen = _pick(messages, int(match["turn"]), "messages", item, row, text)
    else:
        chosen = [m for m in messages if m.role == match["role"]]
        if not chosen:
            roles = sorted({m.role for m in messages})
            raise PositionError(
                f"position item {item!r}: example {row} has no {match['role']!r} message (roles: "
                f"{roles}); its text: {text!r}."
            )
        if match["index"] is not None:
            chosen = _pick(
                chosen, int(match["index"]), f"{match['role']} messages", item, row, text
            )
    tokens = sorted({t for m in chosen for t in _covering(layout.offsets[row], m.start, m.end)})
    if not tokens:
        raise PositionError(
            f"position item {item!r}: the selected message of example {row} is empty (no token)."
        )
    return _pick(tokens, match["which"], "tokens", item, row, text)


# -- chat templates ------------------------------------------------------------------------------
def render_conversation(
    tokenizer: Any, conversation: Sequence[Mapping], **template_kwargs: Any
) -> tuple[str, list[MessageSpan]]:
    """The chat template's rendering of ``conversation`` and each message's content span in it.

    The conversation is rendered once more with each content replaced by a unique sentinel:
    where the sentinels land, with the contents put back, gives the spans when that rebuilds the
    rendering exactly. Otherwise (a template that inspects the content) message i's content is
    the last occurrence in the rendering of the first i+1 messages (only the template's closing
    markers follow it) when that is a prefix of the whole, else the next one after message i-1.

    Raises:
        InputError: for a tokenizer without a chat template, a malformed conversation, or
            content the template does not render verbatim.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise InputError(
            f"the tokenizer ({type(tokenizer).__name__}) has no chat template: set "
            "tokenizer.chat_template, or pass plain strings and use text anchors such as "
            "{'text': ...} instead of role items."
        )
    messages = list(conversation)
    for index, message in enumerate(messages):
        if not (isinstance(message, Mapping) and isinstance(message.get("content"), str)):
            raise InputError(
                f"message {index} of a conversation is {message!r:.80}; each message must be a "
                "dict with 'role' and a string 'content'."
            )
    full = tokenizer.apply_chat_template(messages, tokenize=False, **template_kwargs)
    spans = _spans_by_sentinels(tokenizer, messages, full, template_kwargs)
    if spans is None:
        spans = _spans_by_prefixes(tokenizer, messages, full)
    return full, spans


def _spans_by_sentinels(
    tokenizer: Any, messages: list, full: str, template_kwargs: dict
) -> list[MessageSpan] | None:
    """The content spans from a rendering with sentinel contents, or None when putting the
    contents back does not rebuild ``full`` exactly."""
    sentinels = [f"\x00hookscope-message-{i}\x00" for i in range(len(messages))]
    masked = [{**m, "content": s} for m, s in zip(messages, sentinels, strict=True)]
    try:
        rendered = tokenizer.apply_chat_template(masked, tokenize=False, **template_kwargs)
    except Exception:  # a template that rejects the sentinel: use the other way
        return None
    text, spans, cursor = "", [], 0
    for index, (message, sentinel) in enumerate(zip(messages, sentinels, strict=True)):
        at = rendered.find(sentinel, cursor)
        if at < 0 or rendered.count(sentinel) != 1:
            return None
        text += rendered[cursor:at]
        start = len(text)
        text += message["content"]
        spans.append(MessageSpan(str(message.get("role")), index, start, len(text)))
        cursor = at + len(sentinel)
    text += rendered[cursor:]
    return spans if text == full else None


def _spans_by_prefixes(tokenizer: Any, messages: list, full: str) -> list[MessageSpan]:
    """The content spans found in renderings of the conversation's prefixes (see
    :func:`render_conversation`)."""
    spans, after = [], 0
    for index, message in enumerate(messages):
        content = message["content"]
        prefix = tokenizer.apply_chat_template(messages[: index + 1], tokenize=False)
        start = prefix.rfind(content) if full.startswith(prefix) else -1
        if start < after:
            start = full.find(content, after)
        if start < 0 or not content:
            raise InputError(
                f"message {index} ({message.get('role')!r}) content {content!r:.80} is not rendered "
                "verbatim by the chat template (empty, or changed by it), so its tokens cannot be "
                "located."
            )
        spans.append(MessageSpan(str(message.get("role")), index, start, start + len(content)))
        after = start + len(content)
    return spans


def selected_text(hm: Any, inputs: Any, items: object) -> list[dict]:
    """What each position item selects, as text: per example, ``{item: decoded tokens}`` (the
    real slots of the item, decoded together). A quick check that an anchor or a role item
    lands where you mean it to, on any inputs a call takes."""
    prepared = hm.prepare_inputs(inputs)
    resolved = hm.position_context(prepared).resolve(items)
    ids, tokenizer = prepared["input_ids"].cpu(), hm.get_text_tokenizer()
    index, mask = resolved.index.cpu(), resolved.mask.cpu()
    return [
        {
            item: tokenizer.decode(ids[row, index[row, slots][mask[row, slots]]])
            for item, slots in resolved.mapping_index.items()
        }
        for row in range(len(ids))
    ]
