"""Shuffled streaming over a store: every real vector once per epoch, seeded, mixed across shards."""

from __future__ import annotations

import pytest
import torch
from tiny_models import VOCAB, build_model, build_tokenizer

from hookscope import ExtractionConfig, HookedModel
from hookscope.errors import HookscopeError
from hookscope.store_stream import ShuffledVectors, store_vectors

POINT = "resid_out_1"


def padded_batches(n_batches: int, size: int, length: int, seed: int = 0) -> list[dict]:
    """Tokenized batches ``[size, length]`` (right padding) whose first row is full length and
    whose other rows have 1..length real tokens (the store needs the same slot count per batch
    for ``"all"``: here ``length`` in every batch)."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        ids = torch.randint(3, VOCAB, (size, length), generator=generator)
        lengths = torch.randint(1, length + 1, (size,), generator=generator)
        lengths[0] = length
        mask = (torch.arange(length) < lengths[:, None]).long()
        batches.append({"input_ids": ids * mask, "attention_mask": mask})
    return batches


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A tiny Llama's resid_out_1 at every real token: 6 shards of 10 examples of 8 slots,
    padded slots in every shard."""
    hm = HookedModel.from_hf(build_model("llama"), build_tokenizer())
    config = ExtractionConfig.from_names([POINT], save_logits=False)
    folder = tmp_path_factory.mktemp("stream") / "acts"
    batches = padded_batches(6, 10, 8)
    return hm.extract_cache(batches, ["all"], extraction_config=config, output_dir=str(folder))


def _reference(store, slots=None) -> torch.Tensor:
    """The real vectors read whole (store[point] and its mask), independently of the reader."""
    values = store[POINT]
    mask = torch.cat([cache["position_mask"] for cache in store]).bool()
    if slots is not None:
        mask[:, : slots.start] = False
    return values[mask]


def _sorted_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows in a canonical order (lexicographic), to compare multisets of vectors."""
    for column in reversed(range(x.shape[1])):
        x = x[torch.sort(x[:, column], stable=True).indices]
    return x


def test_every_real_vector_once_per_epoch(store):
    reference = _reference(store)
    mask = torch.cat([cache["position_mask"] for cache in store])
    assert store.num_shards == 6 and not mask.all(), "the check needs shards and padding"
    stream = ShuffledVectors(store, POINT, batch_size=16, buffer_size=40, seed=3, epochs=2)
    batches = list(stream)
    sizes = [len(b) for b in batches]
    assert all(size == 16 for size in sizes[:-1])
    epoch = torch.cat(list(stream.epoch(0)))
    assert len(epoch) == len(reference) and sum(sizes) == 2 * len(reference)
    assert torch.equal(_sorted_rows(epoch), _sorted_rows(reference))
    assert torch.equal(_sorted_rows(torch.cat(list(stream.epoch(1)))), _sorted_rows(reference))
    assert not torch.equal(epoch, reference), "not shuffled"
    # the first batch mixes shards: its vectors come from more than one shard
    first = torch.cat(list(stream.epoch(0)))[:40]
    per_shard = [store_vectors(store, POINT, shards=[i]) for i in range(6)]
    owners = {i for v in first for i, s in enumerate(per_shard) if (s == v).all(-1).any()}
    assert len(owners) > 1


def test_seeds_reproduce_and_differ(store):
    def run(seed):
        return torch.cat(list(ShuffledVectors(store, POINT, 8, buffer_size=32, seed=seed)))

    assert torch.equal(run(5), run(5))
    assert not torch.equal(run(5), run(6))
    one = ShuffledVectors(store, POINT, 8, buffer_size=32, seed=5, epochs=2)
    assert not torch.equal(torch.cat(list(one.epoch(0))), torch.cat(list(one.epoch(1))))


def test_slots_shards_dtype_drop_last(store):
    reference = _reference(store, slots=slice(1, None))
    stream = ShuffledVectors(
        store, POINT, 7, buffer_size=20, slots=slice(1, None), dtype=torch.float64
    )
    got = torch.cat(list(stream))
    assert got.dtype == torch.float64
    assert torch.equal(_sorted_rows(got.float()), _sorted_rows(reference))
    held = store_vectors(store, POINT, shards=[5])
    assert torch.equal(held, _reference(store)[-len(held) :])
    dropped = list(ShuffledVectors(store, POINT, 7, shards=[0, 1], drop_last=True))
    assert all(len(b) == 7 for b in dropped)
    assert len(dropped) == len(store_vectors(store, POINT, shards=[0, 1])) // 7


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"point": "resid_out_9"}, "not in the store"),
        ({"batch_size": 0}, "batch_size"),
        ({"buffer_size": 2}, "buffer_size"),
        ({"shards": [6]}, "out of range"),
        ({"shards": [0, 0]}, r"shards \[0, 0\]: give each shard at most once"),
        ({"shards": []}, r"shards \[\]: give each shard at most once, and at least one"),
    ],
)
def test_bad_arguments(store, kwargs, message):
    arguments = {"point": POINT, "batch_size": 4, **kwargs}
    with pytest.raises(HookscopeError, match=message):
        ShuffledVectors(store, **arguments)


def test_max_norm_leaves_out_large_vectors(store):
    reference = _reference(store)
    limit = reference.norm(dim=-1).median().item()
    kept = reference[reference.norm(dim=-1) <= limit]
    got = torch.cat(list(ShuffledVectors(store, POINT, 16, buffer_size=32, max_norm=limit)))
    assert 0 < len(got) < len(reference)
    assert torch.equal(_sorted_rows(got), _sorted_rows(kept))
    assert torch.equal(store_vectors(store, POINT, max_norm=limit), kept)


def test_negative_slots_are_refused_not_read_as_last_tokens(store):
    """Slot -1 of a store at "all" is the longest example's last token only: store_vectors(...,
    slots=[-1]) used to return the few rows of full length instead of each example's last."""
    mask = torch.cat([cache["position_mask"] for cache in store]).bool()
    assert int(mask[:, -1].sum()) < len(mask)  # slot -1 is padding for most examples
    for slots in ([-1], slice(-1, None), slice(0, -2)):
        with pytest.raises(HookscopeError, match="slot indices >= 0"):
            store_vectors(store, POINT, slots=slots)
        with pytest.raises(HookscopeError, match="slot indices >= 0"):
            ShuffledVectors(store, POINT, 4, slots=slots)
    torch.testing.assert_close(store_vectors(store, POINT, slots=[7]), store[POINT][mask[:, 7], 7])
