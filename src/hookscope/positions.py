"""The token-position language: ``target_token_positions`` items -> per-example index tensors.

Every item resolves **per example against that example's real tokens** (the positions where the
attention mask is 1), so with left or right padding ``0`` is the first real token and ``"last"``
the last real one. The items:

=========================  =====================================================================
``"last"`` / ``"first"``   the last / first real token
``"last-k"``               same as the integer ``-k`` (``"last-1"`` is ``"last"``)
``i`` (int)                the i-th real token; negative counts from the end
``(start, end)``           a slice of the real tokens, Python semantics (negatives allowed, ``end``
                           may equal the length); must select at least one token
``"all"``                  every real token
``"all-text"``             every text token (on a text-only model: every real token)
``"random-text-N"``        N distinct text tokens, drawn with a seed derived from the example's
                           own token ids (so a row draws the same tokens in any batch), sorted
``"inputs-partition-k"``   the k-th group of real tokens split at ``pivot_positions``
                           (``[0, p0)``, ``[p0, p1)``, ..., ``[p_last, length)``)
``"random-inputs-          N distinct tokens of partition k (default 1), drawn as
partition-k-N"``           ``random-text-N`` draws (easyroutine's spelling)
``"special"``              the tokenizer's special tokens (``all_special_ids``: BOS, EOS, chat
                           markers...) among the real tokens (easyroutine's spelling)
``"all-image"`` ...        image tokens (vision-language models, from the config's image token
                           id): ``all-image``, ``first-image``, ``last-image``, ``start-image`` /
                           ``end-image`` (the token before the first / after the last image
                           token), ``random-image-N``
``"first-image:k"`` ...    the same for image k of the example only (0-based in order of
                           appearance; negative counts from the end: ``"end-image:-1"``)
``{"text": " Mary"}`` ...  text anchors (``text`` / ``after`` / ``before`` / ``between``) and chat
``"user:last"`` ...        role items (``user:all``, ``turn-2:first``): resolved from each
                           example's exact text and token offsets, see
                           :mod:`hookscope.text_positions`
=========================  =====================================================================

Several images per example: images are numbered per example in order of appearance. An image
is a run of image tokens; the runs of one image are joined across the family's in-image markers
(Pixtral's ``[IMG_BREAK]`` rows, Idefics3 / SmolVLM tiles up to the ``<global-img>`` view; see
:func:`hookscope.vision.number_images`). Items without ``:k`` span all images of the example.

Items may select a different number of tokens per example (``"all"`` under padding). Each item
gets as many slots as its longest selection; shorter rows are padded, and ``mask`` says which
slots are real. Padded slots hold zeros in every extracted tensor.
"""

from __future__ import annotations

import functools
import re
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .errors import PositionError, choices
from .text_positions import (
    TextLayout,
    anchor_key,
    is_text_item,
    parse_anchor_key,
    resolve_text_item,
)
from .vision import ImageLayout, number_images

PositionItem = str | int | tuple[int, int]

NAMED_ITEMS = ("last", "first", "all", "all-text")
_IMAGE_ITEM = re.compile(r"^(?P<kind>all|first|last|start|end)-image(?::(?P<image>-?\d+))?$")
_LAST_K = re.compile(r"^last-(\d+)$")
_RANDOM_TEXT = re.compile(r"^random-text(?:-(\d+))?$")
_PARTITION = re.compile(r"^inputs-partition-(\d+)$")
_RANDOM_IMAGE = re.compile(r"^random-image(?:-(\d+))?$")
_RANDOM_PARTITION = re.compile(r"^random-inputs-partition-(\d+)(?:-(\d+))?$")


def _valid_choices() -> str:
    return (
        f"{choices(NAMED_ITEMS)}, 'last-k', 'random-text-N', 'inputs-partition-k' and "
        "'random-inputs-partition-k-N' (with pivot_positions), 'special', an int, a "
        "(start, end) tuple, a text anchor ({'text': ...}, {'after': ...}, {'before': ...}, "
        "{'between': [..., ...]}) or a chat role item ('user:last', 'assistant:all', "
        "'turn-2:first')"
    )


@dataclass
class ResolvedPositions:
    """Per-example token positions for one batch.

    Attributes:
        index: ``[batch, slots]`` long, absolute indices into the sequence axis of the batch.
        mask: ``[batch, slots]`` bool, False for slots that pad a shorter selection.
        mapping_index: each item -> its slot indices on the positions axis
            (``{"last": [0], 0: [1]}``).
        items: the items, in order.
        widths: number of slots of each item.
    """

    index: torch.Tensor
    mask: torch.Tensor
    mapping_index: dict[PositionItem, list[int]]
    items: list[PositionItem]
    widths: list[int]
    _on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, repr=False
    )
    _gather_cache: dict[tuple, tuple] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        #: True when no slot is padding (every item selects the same count in every row).
        self.all_valid = bool(self.mask.all())

    def place_on(self, device: torch.device) -> None:
        """Copy the index to ``device`` now, before the forward: a host-to-device copy inside
        a hook would wait for the GPU to drain mid-forward."""
        self.on(device)
        self.real_slots(device)

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(index, mask)`` on ``device``, copied once (hooks call this on every layer)."""
        if device not in self._on_device:
            self._on_device[device] = (self.index.to(device), self.mask.to(device))
        return self._on_device[device]

    def real_slots(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(rows, slots, seq_index)``: 1-D indices of the real (not padded) slots and the
        sequence position each selects, on ``device``; found on the CPU once (a ``nonzero`` on
        the GPU inside a hook would stall the forward)."""
        key = ("real", device)
        if key not in self._gather_cache:
            rows, slots = self.mask.nonzero(as_tuple=True)
            found = (rows, slots, self.index[rows, slots])
            self._gather_cache[key] = tuple(t.to(device) for t in found)
        return self._gather_cache[key]

    def select(self, hidden: torch.Tensor) -> torch.Tensor:
        """Gather the slots from ``hidden`` ``[batch, seq, *rest]`` -> ``[batch, slots, *rest]``.

        Only the selected rows are copied; padded slots are zero.
        """
        gather_index, padding = self._gather_index(hidden.device, hidden.shape[2:])
        selected = hidden.gather(1, gather_index)
        if padding is not None:
            # in place: `selected` is a fresh tensor, gather's grad does not need it
            selected.masked_fill_(padding, 0)
        return selected

    def _gather_index(
        self, device: torch.device, rest: torch.Size
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The expanded gather index and padded-slot mask for hidden states ``[*, *, *rest]``,
        built once per device and shape: every layer's hook reuses them (a hook runs per layer,
        so its Python cost counts on a launch-bound GPU)."""
        key = (device, rest)
        if key not in self._gather_cache:
            index, mask = self.on(device)
            ones = [1] * len(rest)
            gather_index = index.view(*index.shape, *ones).expand(*index.shape, *rest)
            padding = None if self.all_valid else ~mask.view(*mask.shape, *ones)
            self._gather_cache[key] = (gather_index, padding)
        return self._gather_cache[key]

    def average(self, selected: torch.Tensor) -> torch.Tensor:
        """Mean over each item's real slots: ``[batch, slots, *rest]`` -> ``[batch, items, *rest]``."""
        _, mask = self.on(selected.device)
        pieces, start = [], 0
        for width in self.widths:
            block = selected[:, start : start + width]
            weight = mask[:, start : start + width].to(selected.dtype)
            weight = weight.view(*weight.shape, *([1] * (selected.dim() - 2)))
            pieces.append((block * weight).sum(1) / weight.sum(1))
            start += width
        return torch.stack(pieces, dim=1)

    def averaged_mapping(self) -> dict[PositionItem, list[int]]:
        """The mapping index after :meth:`average`: one slot per item."""
        return {item: [i] for i, item in enumerate(self.items)}


def normalize_items(target_token_positions: object) -> list[PositionItem]:
    """Accept a list of items (or one str / int item) and check each item's form.

    Raises:
        PositionError: for an empty list, duplicates, or an item of the wrong type or name.
    """
    if isinstance(target_token_positions, str | int | Mapping) and not isinstance(
        target_token_positions, bool
    ):
        target_token_positions = [target_token_positions]
    if isinstance(target_token_positions, tuple) or not isinstance(
        target_token_positions, Sequence
    ):
        raise PositionError(
            f"target_token_positions must be a list of items, got {target_token_positions!r}. "
            f"Wrap a slice in a list: [(2, 5)]. Valid items: {_valid_choices()}."
        )
    items = [_canonical(item) for item in target_token_positions]
    if not items:
        raise PositionError(
            f"target_token_positions is empty. Valid items: {_valid_choices()}; e.g. ['last']."
        )
    for item in items:
        _check_form(item)
    seen = set()
    for item in items:
        if item in seen:
            raise PositionError(f"position item {item!r} appears twice in {items!r}.")
        seen.add(item)
    return items


def _canonical(item: object) -> object:
    """A text anchor (a dict, or its JSON string) as its checked canonical string; other items
    as given."""
    if isinstance(item, Mapping):
        return anchor_key(item)
    parsed = parse_anchor_key(item)
    return item if parsed is None else anchor_key(parsed)


def _check_form(item: object) -> None:
    if isinstance(item, bool):
        raise PositionError(f"position item {item!r} is a bool. Valid items: {_valid_choices()}.")
    if isinstance(item, int):
        return
    if isinstance(item, tuple):
        if len(item) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in item):
            return
        raise PositionError(
            f"position item {item!r}: a slice must be a (start, end) tuple of two ints."
        )
    if isinstance(item, list):
        raise PositionError(
            f"position item {item!r} is a list; write a slice as a tuple: {tuple(item)!r}."
        )
    if not isinstance(item, str):
        raise PositionError(
            f"position item {item!r} has type {type(item).__name__}. Valid items: {_valid_choices()}."
        )
    if _IMAGE_ITEM.match(item) or _RANDOM_IMAGE.match(item):
        return  # checked against the batch's image tokens when resolved
    if item in NAMED_ITEMS or item == "special" or is_text_item(item):
        return
    match = _LAST_K.match(item)
    if match and int(match.group(1)) >= 1:
        return
    match = _RANDOM_TEXT.match(item)
    if match and (match.group(1) is None or int(match.group(1)) >= 1):
        return
    if _PARTITION.match(item):
        return
    match = _RANDOM_PARTITION.match(item)
    if match and (match.group(2) is None or int(match.group(2)) >= 1):
        return
    raise PositionError(f"unknown position item {item!r}. Valid items: {_valid_choices()}.")


def _example_seed(token_ids: torch.Tensor, seed: int) -> int:
    """A seed from the example's own real token ids, so a row draws alike in any batch."""
    data = token_ids.to(torch.int64).cpu().numpy().tobytes()
    return zlib.crc32(data, seed & 0xFFFFFFFF)


def _out_of_range(item: PositionItem, row: int, length: int, detail: str) -> PositionError:
    return PositionError(
        f"position item {item!r} is out of range for example {row}, which has {length} real "
        f"tokens ({detail})."
    )


def _first_bad_row(bad: torch.Tensor) -> int | None:
    rows = torch.nonzero(bad).flatten()
    return int(rows[0]) if rows.numel() else None


def _item_range(
    item: PositionItem, lengths: torch.Tensor, pivot_positions: Sequence[int] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A contiguous item as ``(start, count)`` per row, in real-token coordinates.

    Raises:
        PositionError: naming the first example the item does not fit.
    """
    if isinstance(item, str) and (match := _LAST_K.match(item)):
        item = -int(match.group(1))
    if isinstance(item, int):
        row = _first_bad_row((item < -lengths) | (item >= lengths))
        if row is not None:
            n = int(lengths[row])
            raise _out_of_range(item, row, n, f"valid ints: {-n}..{n - 1}")
        start = torch.full_like(lengths, item) if item >= 0 else lengths + item
        return start, torch.ones_like(lengths)
    if isinstance(item, tuple):
        start, end = (torch.full_like(lengths, bound) for bound in item)
        row = _first_bad_row(
            (start < -lengths) | (start > lengths) | (end < -lengths) | (end > lengths)
        )
        if row is not None:
            n = int(lengths[row])
            raise _out_of_range(item, row, n, f"slice bounds must lie in {-n}..{n}")
        start = torch.where(start < 0, start + lengths, start)
        end = torch.where(end < 0, end + lengths, end)
        row = _first_bad_row(end <= start)
        if row is not None:
            raise _out_of_range(item, row, int(lengths[row]), "the slice selects no token")
        return start, end - start
    if item == "last":
        return lengths - 1, torch.ones_like(lengths)
    if item == "first":
        return torch.zeros_like(lengths), torch.ones_like(lengths)
    if item in ("all", "all-text"):
        return torch.zeros_like(lengths), lengths
    if match := _PARTITION.match(item):
        return _partition(int(match.group(1)), lengths, pivot_positions)
    raise PositionError(f"unknown position item {item!r}. Valid items: {_valid_choices()}.")


def _partition(
    group: int, lengths: torch.Tensor, pivot_positions: Sequence[int] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    if not pivot_positions:
        raise PositionError(
            f"position item 'inputs-partition-{group}' needs pivot_positions (a list of ints that "
            "split the real tokens into groups), got none."
        )
    if isinstance(pivot_positions, int | str) or len(set(pivot_positions)) != len(pivot_positions):
        raise PositionError(
            f"pivot_positions must be a list of distinct ints (a repeated pivot makes an empty "
            f"group), got {pivot_positions!r}."
        )
    pivots = sorted(pivot_positions)
    if group > len(pivots):
        raise PositionError(
            f"position item 'inputs-partition-{group}': {len(pivots)} pivot(s) make "
            f"{len(pivots) + 1} groups, valid: inputs-partition-0..{len(pivots)}."
        )
    row = _first_bad_row((pivots[0] <= 0) | (pivots[-1] >= lengths))
    if row is not None:
        raise PositionError(
            f"pivot_positions {list(pivot_positions)} must lie in 1..{int(lengths[row]) - 1} for "
            f"example {row}, which has {int(lengths[row])} real tokens."
        )
    start = torch.full_like(lengths, ([0, *pivots])[group])
    end = lengths if group == len(pivots) else torch.full_like(lengths, pivots[group])
    return start, end - start


def _random_draw(
    item: str,
    count: int,
    candidates: list[torch.Tensor],
    lengths: torch.Tensor,
    real_ids: list[torch.Tensor] | None,
    seed: int,
) -> list[list[int]]:
    """``count`` distinct indices per row among that row's ``candidates``, seeded by its tokens."""
    if real_ids is None:
        raise PositionError(f"position item {item!r} needs input_ids to seed its draw.")
    draws = []
    for row, (ids, pool) in enumerate(zip(real_ids, candidates, strict=True)):
        if len(pool) < count:
            raise _out_of_range(
                item,
                row,
                int(lengths[row]),
                f"cannot draw {count} distinct tokens from {len(pool)}",
            )
        generator = torch.Generator().manual_seed(_example_seed(ids, seed))
        draws.append(sorted(pool[torch.randperm(len(pool), generator=generator)[:count]].tolist()))
    return draws


def _image_lists(
    item: str, image_real: list[torch.Tensor] | None, lengths: torch.Tensor
) -> list[list[int]]:
    """Per row, indices into the real tokens that an image item selects.

    ``image_real[b]`` holds, per real token of row b, its image number (-1: not an image token).
    ``first-image`` / ``last-image``: the first / last image token; ``all-image``: every image
    token; ``start-image`` / ``end-image``: the token just before the first / just after the
    last image token (the processor's start / end marker where it emits one). With ``:k``, of
    image k only; without, of all images of the example."""
    if image_real is None:
        raise PositionError(
            f"position item {item!r} addresses image tokens, but this model has no image token id "
            f"(a text-only model). Valid items here: {_valid_choices()}."
        )
    match = _IMAGE_ITEM.match(item)
    kind, which = match["kind"], match["image"]
    lists = []
    for row, numbers in enumerate(image_real):
        n_images = int(numbers.max()) + 1 if numbers.numel() else 0
        if n_images == 0:
            raise PositionError(f"position item {item!r}: example {row} has no image token.")
        selected = numbers >= 0
        if which is not None:
            k = int(which)
            if not -n_images <= k < n_images:
                raise PositionError(
                    f"position item {item!r}: example {row} has {n_images} image(s); valid image "
                    f"numbers: 0..{n_images - 1} or -{n_images}..-1."
                )
            selected = numbers == (k % n_images)
        where = torch.nonzero(selected).flatten().tolist()
        n = int(lengths[row])
        chosen = {
            "all": where,
            "first": [where[0]],
            "last": [where[-1]],
            "start": [where[0] - 1],
            "end": [where[-1] + 1],
        }[kind]
        if not all(0 <= i < n for i in chosen):
            raise _out_of_range(
                item, row, n, "the image touches the sequence edge: no marker there"
            )
        lists.append(chosen)
    return lists


def _from_lists(lists: list[list[int]], lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row index lists -> ``(relative [batch, width], valid [batch, width])``; padded slots
    point at the row's last real token."""
    width = max(len(row) for row in lists)
    relative = (lengths - 1).unsqueeze(1).repeat(1, width)
    valid = torch.zeros(len(lists), width, dtype=torch.bool)
    for row, chosen in enumerate(lists):
        relative[row, : len(chosen)] = torch.tensor(chosen, dtype=torch.long)
        valid[row, : len(chosen)] = True
    return relative, valid


def _needs_rows(item: PositionItem) -> bool:
    """True for items resolved row by row (random draws, image items, ``all-text``)."""
    return isinstance(item, str) and bool(
        _IMAGE_ITEM.match(item)
        or item == "all-text"
        or _RANDOM_TEXT.match(item)
        or _RANDOM_IMAGE.match(item)
        or _RANDOM_PARTITION.match(item)
        or item == "special"
        or is_text_item(item)
    )


@dataclass
class _Rows:
    """Per-row views of one batch, indexed by real token (only built when an item needs them):
    ``ids[b]`` its token ids, ``images[b]`` each token's image number (-1: text), ``text[b]``
    the real-token indices of its text tokens. Each is None when its input was not given."""

    lengths: torch.Tensor
    ids: list[torch.Tensor] | None = None
    special_ids: frozenset[int] = frozenset()
    images: list[torch.Tensor] | None = None
    text: list[torch.Tensor] | None = None
    text_layout: TextLayout | None = None
    text_missing: str | None = None


def _rows(
    real: torch.Tensor,
    lengths: torch.Tensor,
    input_ids: torch.Tensor | None,
    image_numbers: torch.Tensor | None,
) -> _Rows:
    """The per-row views of a batch whose row b's j-th real token sits at ``real[b, j]``."""
    n_real = lengths.tolist()
    rows = _Rows(lengths)
    if input_ids is not None:
        ids = input_ids.detach().to("cpu")
        rows.ids = [ids[b, real[b, :n]] for b, n in enumerate(n_real)]
    if image_numbers is not None:
        numbers = image_numbers.detach().to("cpu")
        if numbers.dtype == torch.bool:
            numbers = number_images(numbers.long(), ImageLayout(token=1))
        rows.images = [numbers[b, real[b, :n]] for b, n in enumerate(n_real)]
    rows.text = [
        torch.arange(n) if rows.images is None else torch.nonzero(rows.images[b] < 0).flatten()
        for b, n in enumerate(n_real)
    ]
    return rows


def _resolve_random(item: str, rows: _Rows, seed: int) -> list[list[int]]:
    """Per row, the sorted real-token indices a ``random-*`` item draws."""
    text_random, image_random = _RANDOM_TEXT.match(item), _RANDOM_IMAGE.match(item)
    count = int((text_random or image_random).group(1) or 1)
    pool = rows.text
    if image_random:
        pool = [torch.tensor(r) for r in _image_lists("all-image", rows.images, rows.lengths)]
    return _random_draw(item, count, pool, rows.lengths, rows.ids, seed)


def _resolve_random_partition(
    item: str, rows: _Rows, pivot_positions: Sequence[int] | None, seed: int
) -> list[list[int]]:
    """Per row, the sorted real-token indices ``random-inputs-partition-k-N`` draws from
    partition k (``inputs-partition-k``)."""
    match = _RANDOM_PARTITION.match(item)
    group, count = int(match.group(1)), int(match.group(2) or 1)
    start, width = _partition(group, rows.lengths, pivot_positions)
    pool = [torch.arange(int(a), int(a) + int(n)) for a, n in zip(start, width, strict=True)]
    return _random_draw(item, count, pool, rows.lengths, rows.ids, seed)


def _special_lists(rows: _Rows) -> list[list[int]]:
    """Per row, the real-token indices of the tokenizer's special tokens.

    Raises:
        PositionError: when the tokenizer has none, or naming the first example without one.
    """
    if not rows.special_ids or rows.ids is None:
        raise PositionError(
            "position item 'special' needs the tokenizer's special token ids and the input ids; "
            "this call has none."
        )
    special = torch.tensor(sorted(rows.special_ids))
    lists = [torch.nonzero(torch.isin(ids, special)).flatten().tolist() for ids in rows.ids]
    for row, found in enumerate(lists):
        if not found:
            raise PositionError(
                f"position item 'special': example {row} has no special token (ids "
                f"{sorted(rows.special_ids)})."
            )
    return lists


def _resolve_item(
    item: PositionItem,
    rows: _Rows,
    pivot_positions: Sequence[int] | None,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One item -> ``(relative [batch, width], valid [batch, width])``: indices into each row's
    real tokens, and which slots are real (padded slots point at the row's last real token)."""
    lengths = rows.lengths
    if is_text_item(item):
        lists = resolve_text_item(item, rows.text_layout, rows.text_missing)
        _check_layout_lengths(item, rows)
        return _from_lists(lists, lengths)
    if isinstance(item, str) and (_RANDOM_TEXT.match(item) or _RANDOM_IMAGE.match(item)):
        return _from_lists(_resolve_random(item, rows, seed), lengths)
    if item == "special":
        return _from_lists(_special_lists(rows), lengths)
    if isinstance(item, str) and _RANDOM_PARTITION.match(item):
        return _from_lists(_resolve_random_partition(item, rows, pivot_positions, seed), lengths)
    if _IMAGE_ITEM.match(str(item)):
        return _from_lists(_image_lists(item, rows.images, lengths), lengths)
    if item == "all-text" and rows.images is not None:
        return _from_lists([p.tolist() for p in rows.text], lengths)
    start, count = _item_range(item, lengths, pivot_positions)
    offsets = torch.arange(int(count.max()))
    valid = offsets < count.unsqueeze(1)
    relative = torch.where(valid, start.unsqueeze(1) + offsets, (lengths - 1).unsqueeze(1))
    return relative, valid


def _check_layout_lengths(item: PositionItem, rows: _Rows) -> None:
    """The text layout describes this batch: one row per example, one offset per real token."""
    layout_lengths = [len(o) for o in rows.text_layout.offsets]
    if layout_lengths != rows.lengths.tolist():
        raise PositionError(
            f"position item {item!r}: the batch's text offsets describe {layout_lengths} real "
            f"tokens per example but the attention mask has {rows.lengths.tolist()}; the inputs "
            "were changed after tokenizing."
        )


def resolve_positions(
    items: Sequence[PositionItem],
    attention_mask: torch.Tensor,
    input_ids: torch.Tensor | None = None,
    pivot_positions: Sequence[int] | None = None,
    seed: int = 0,
    image_numbers: torch.Tensor | None = None,
    special_ids: frozenset[int] = frozenset(),
    text_layout: TextLayout | None = None,
    text_missing: str | None = None,
) -> ResolvedPositions:
    """Resolve ``items`` for every row of a batch.

    Args:
        items: position items, already checked by :func:`normalize_items`.
        attention_mask: ``[batch, seq]``, 1 for real tokens.
        input_ids: ``[batch, seq]``, used to seed random items.
        pivot_positions: split points for ``inputs-partition-k``.
        seed: base seed for random items.
        image_numbers: ``[batch, seq]``, the image number of each image token and -1 elsewhere
            (:func:`hookscope.vision.number_images`), or a bool mask whose every run of True is
            one image. Image items need it, and text items (``all-text``, ``random-text-N``)
            then skip image tokens.
        special_ids: the tokenizer's special token ids (the ``special`` item).
        text_layout: each example's text and token offsets (text anchors, chat roles; see
            :mod:`hookscope.text_positions`); ``text_missing`` says why there is none.

    Raises:
        PositionError: naming the item and the example it does not fit.
    """
    mask = attention_mask.detach().to("cpu").bool()
    lengths = mask.sum(1)
    row = _first_bad_row(lengths == 0)
    if row is not None:
        raise PositionError(f"example {row} has no real token (its attention mask is all 0).")
    # real[b, j] = sequence index of row b's j-th real token (stable sort keeps their order).
    real = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
    rows = _Rows(lengths)
    if any(_needs_rows(item) for item in items):  # per-row lists only for the items that need them
        rows = _rows(real, lengths, input_ids, image_numbers)
        rows.special_ids = frozenset(special_ids)
        rows.text_layout, rows.text_missing = text_layout, text_missing
    columns, valid, mapping, widths = [], [], {}, []
    for item in items:
        relative, block_valid = _resolve_item(item, rows, pivot_positions, seed)
        first = sum(widths)
        mapping[item] = list(range(first, first + relative.shape[1]))
        widths.append(relative.shape[1])
        columns.append(real.gather(1, relative))
        valid.append(block_valid)
    return ResolvedPositions(
        index=torch.cat(columns, dim=1),
        mask=torch.cat(valid, dim=1),
        mapping_index=mapping,
        items=list(items),
        widths=widths,
    )


@dataclass(frozen=True)
class PositionContext:
    """What position items of one batch resolve against: its attention mask ``[batch, seq]``,
    input ids, the image layout, ``pivot_positions``, the seed of random items and the
    tokenizer's special token ids."""

    attention_mask: torch.Tensor
    input_ids: torch.Tensor | None = None
    pivot_positions: Sequence[int] | None = None
    seed: int = 0
    image_layout: ImageLayout | None = None
    special_ids: frozenset[int] = frozenset()
    text_layout: TextLayout | None = None
    text_missing: str | None = None

    @functools.cached_property
    def image_numbers(self) -> torch.Tensor | None:
        """The batch's images, numbered once however many items resolve against it."""
        if self.image_layout is None or self.input_ids is None:
            return None
        return number_images(self.input_ids, self.image_layout)

    def resolve(self, items: object) -> ResolvedPositions:
        """Check ``items`` (:func:`normalize_items`) and resolve them for every row. The result
        is already on the batch's device, so no hook copies an index mid-forward."""
        items = normalize_items(items)
        resolved = resolve_positions(
            items,
            self.attention_mask,
            self.input_ids,
            self.pivot_positions,
            self.seed,
            self.image_numbers if any(_needs_rows(item) for item in items) else None,
            self.special_ids,
            self.text_layout,
            self.text_missing,
        )
        resolved.place_on(self.attention_mask.device)
        return resolved
