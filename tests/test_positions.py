"""The position language, resolved per example: hand-computed cases and property tests."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hookscope import PositionError
from hookscope.positions import normalize_items, resolve_positions


def _mask(lengths, total, side):
    rows = []
    for n in lengths:
        pad = [0] * (total - n)
        rows.append(pad + [1] * n if side == "left" else [1] * n + pad)
    return torch.tensor(rows)


def test_hand_computed_left_padding():
    # row 0: 5 real tokens at 0..4; row 1: 3 real tokens at 2..4 (left padded)
    mask = _mask([5, 3], 5, "left")
    resolved = resolve_positions(normalize_items(["last", "first", 1, -2, (0, 2)]), mask)
    assert resolved.mapping_index == {"last": [0], "first": [1], 1: [2], -2: [3], (0, 2): [4, 5]}
    assert resolved.index.tolist() == [[4, 0, 1, 3, 0, 1], [4, 2, 3, 3, 2, 3]]
    assert resolved.mask.all()


def test_hand_computed_right_padding_and_variable_width():
    mask = _mask([4, 2], 4, "right")
    resolved = resolve_positions(normalize_items(["all", "last-1", "last-2"]), mask)
    assert resolved.mapping_index == {"all": [0, 1, 2, 3], "last-1": [4], "last-2": [5]}
    assert resolved.index[0].tolist() == [0, 1, 2, 3, 3, 2]
    assert resolved.index[1, :2].tolist() == [0, 1] and resolved.index[1, 4:].tolist() == [1, 0]
    assert resolved.mask.tolist() == [[True] * 6, [True, True, False, False, True, True]]


def test_select_zeroes_padded_slots_and_average_ignores_them():
    mask = _mask([3, 1], 3, "right")
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).view(2, 3, 2) + 1
    resolved = resolve_positions(["all"], mask)
    selected = resolved.select(hidden)
    assert selected[0].tolist() == hidden[0].tolist()
    assert selected[1].tolist() == [hidden[1, 0].tolist(), [0, 0], [0, 0]]
    averaged = resolved.average(selected)
    assert torch.equal(averaged[0, 0], hidden[0].mean(0))
    assert torch.equal(averaged[1, 0], hidden[1, 0])


def test_partitions_follow_pivots():
    mask = _mask([6], 6, "right")
    items = ["inputs-partition-0", "inputs-partition-1", "inputs-partition-2"]
    resolved = resolve_positions(items, mask, pivot_positions=[2, 4])
    assert resolved.index.tolist() == [[0, 1, 2, 3, 4, 5]]
    assert resolved.mapping_index == {items[0]: [0, 1], items[1]: [2, 3], items[2]: [4, 5]}
    with pytest.raises(PositionError, match="inputs-partition-0..2"):
        resolve_positions(["inputs-partition-3"], mask, pivot_positions=[2, 4])
    with pytest.raises(PositionError, match="needs pivot_positions"):
        resolve_positions(["inputs-partition-0"], mask)


def test_random_text_is_seeded_by_content_not_batch_position():
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [0, 0, 11, 12, 13, 14]])
    mask = (ids != 0).long()
    batched = resolve_positions(["random-text-3"], mask, ids, seed=1)
    alone = resolve_positions(["random-text-3"], mask[1:], ids[1:], seed=1)
    assert batched.index[1].tolist() == alone.index[0].tolist()
    assert len(set(batched.index[0].tolist())) == 3
    other_seed = resolve_positions(["random-text-3"], mask, ids, seed=2)
    assert other_seed.index.shape == batched.index.shape


@pytest.mark.parametrize(
    "item, message",
    [
        ("middle", "unknown position item 'middle'"),
        ("last-0", "unknown position item"),
        (True, "is a bool"),
        ([1, 2], "write a slice as a tuple"),
        ((1, 2, 3), "a slice must be a"),
        (1.5, "has type float"),
    ],
)
def test_malformed_items_raise_with_valid_choices(item, message):
    with pytest.raises(PositionError, match=message):
        normalize_items([item])


def test_empty_and_duplicate_items():
    with pytest.raises(PositionError, match="empty"):
        normalize_items([])
    with pytest.raises(PositionError, match="appears twice"):
        normalize_items(["last", "last"])


@pytest.mark.parametrize("item", [3, -4, (0, 5), (4, 5), "random-text-4"])
def test_out_of_range_names_the_example(item):
    mask = _mask([6, 3], 6, "left")
    with pytest.raises(PositionError, match="example 1, which has 3 real tokens"):
        resolve_positions([item], mask, torch.ones(2, 6, dtype=torch.long))


# -- property tests ----------------------------------------------------------------------------
_ITEM = st.one_of(
    st.sampled_from(["last", "first", "all", "all-text", "last-1", "last-2", "random-text-2"]),
    st.integers(-2, 1),
    st.tuples(st.integers(-2, 0), st.integers(1, 2)),
)


@settings(max_examples=150, deadline=None)
@given(
    lengths=st.lists(st.integers(2, 7), min_size=1, max_size=4),
    extra=st.integers(0, 3),
    side=st.sampled_from(["left", "right"]),
    items=st.lists(_ITEM, min_size=1, max_size=4, unique=True),
)
def test_batched_resolution_equals_one_by_one(lengths, extra, side, items):
    total = max(lengths) + extra
    mask = _mask(lengths, total, side)
    ids = torch.randint(3, 100, mask.shape, generator=torch.Generator().manual_seed(len(lengths)))
    hidden = torch.randn(len(lengths), total, 3)
    alone_rows = []
    for row, n in enumerate(lengths):
        real = mask[row].bool()
        try:
            alone_rows.append(
                resolve_positions(
                    items, torch.ones(1, n, dtype=torch.long), ids[row : row + 1, real]
                )
            )
        except PositionError:
            # An item that does not fit one example alone must not fit the batch either.
            with pytest.raises(PositionError, match="out of range for example"):
                resolve_positions(normalize_items(items), mask, ids)
            return
    batched = resolve_positions(normalize_items(items), mask, ids)
    selected = batched.select(hidden)
    for row, alone in enumerate(alone_rows):
        real = mask[row].bool()
        alone_selected = alone.select(hidden[row : row + 1, real])
        for item in items:
            slots = batched.mapping_index[item]
            width = len(alone.mapping_index[item])
            real_slots = slots[:width]
            assert (
                batched.mask[row, real_slots].all() and not batched.mask[row, slots[width:]].any()
            )
            assert torch.equal(
                selected[row, real_slots], alone_selected[0, alone.mapping_index[item]]
            )


@settings(max_examples=100, deadline=None)
@given(
    item=st.one_of(
        st.text(min_size=1, max_size=12),
        st.integers(-50, 50),
        st.tuples(st.integers(-50, 50), st.integers(-50, 50)),
    ),
    length=st.integers(1, 6),
)
def test_any_item_resolves_or_raises_position_error(item, length):
    try:
        items = normalize_items([item])
        resolved = resolve_positions(
            items, torch.ones(1, length, dtype=torch.long), torch.ones(1, length, dtype=torch.long)
        )
    except PositionError:
        return
    assert ((resolved.index >= 0) & (resolved.index < length)).all()


def test_image_items_need_image_tokens():
    mask = torch.ones(2, 6, dtype=torch.long)
    with pytest.raises(PositionError, match="text-only model"):
        resolve_positions(normalize_items(["end-image"]), mask)
    image = torch.tensor([[0, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    with pytest.raises(PositionError, match="example 1 has no image token"):
        resolve_positions(["all-image"], mask, image_numbers=image)


def test_image_items_hand_computed():
    # row 0: left padding 1, then [t, i, i, i, t]; row 1: [t, t, i, i, t, t]
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    image = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 0, 1, 1, 0, 0]], dtype=torch.bool)
    ids = torch.arange(12).view(2, 6)
    items = [
        "all-image",
        "first-image",
        "last-image",
        "start-image",
        "end-image",
        "all-text",
        "random-image-2",
        "random-text-2",
    ]
    resolved = resolve_positions(normalize_items(items), mask, ids, image_numbers=image)
    slots = resolved.mapping_index
    assert resolved.index[0, slots["all-image"]].tolist() == [2, 3, 4]
    assert (
        resolved.index[1, slots["all-image"][:2]].tolist() == [2, 3]
        and not resolved.mask[1, slots["all-image"][2]]
    )
    assert resolved.index[:, slots["first-image"]].flatten().tolist() == [2, 2]
    assert resolved.index[:, slots["last-image"]].flatten().tolist() == [4, 3]
    assert resolved.index[:, slots["start-image"]].flatten().tolist() == [1, 1]
    assert resolved.index[:, slots["end-image"]].flatten().tolist() == [5, 4]
    assert resolved.index[0, slots["all-text"]][resolved.mask[0, slots["all-text"]]].tolist() == [
        1,
        5,
    ]
    assert resolved.index[1, slots["all-text"]].tolist() == [0, 1, 4, 5]
    for row in range(2):
        drawn = resolved.index[row, slots["random-image-2"]].tolist()
        assert all(image[row, i] for i in drawn) and len(set(drawn)) == 2
        text = resolved.index[row, slots["random-text-2"]].tolist()
        assert not any(image[row, i] for i in text) and all(mask[row, i] for i in text)
