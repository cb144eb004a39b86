"""The TopK / BatchTopK trainer: recovers known sparse directions, reports honest held-out numbers."""

from __future__ import annotations

import pytest
import torch
from test_store_stream import padded_batches
from tiny_models import build_model, build_tokenizer

from hookscope import ExtractionConfig, HookedModel
from hookscope.dictionaries.training import evaluate_dictionary, train_dictionary
from hookscope.errors import HookscopeError
from hookscope.store_stream import store_vectors

D_IN, N_TRUE, ACTIVE = 24, 32, 3


def sparse_data(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(vectors ``[n, D_IN]``, true unit directions ``[N_TRUE, D_IN]``): each vector is an offset
    plus a sum of ``ACTIVE`` distinct directions with coefficients in [1, 2], plus small noise."""
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(N_TRUE, D_IN, generator=generator)
    directions /= directions.norm(dim=1, keepdim=True)
    chosen = torch.rand(n, N_TRUE, generator=generator).argsort(1)[:, :ACTIVE]
    codes = torch.zeros(n, N_TRUE).scatter(
        1, chosen, 1 + torch.rand(n, ACTIVE, generator=generator)
    )
    noise = 0.01 * torch.randn(n, D_IN, generator=generator)
    return codes @ directions + 0.5 + noise, directions


@pytest.fixture(scope="module")
def data():
    return sparse_data(12000, seed=7)  # not the trainer's seed: its init would be the truth


def _hand_explained_variance(dictionary, x: torch.Tensor) -> float:
    x = x.double()
    pre = (x * dictionary.input_scale - dictionary.b_dec.double()) @ dictionary.W_enc.double()
    pre = pre + dictionary.b_enc.double()
    if dictionary.activation == "topk":
        kth = pre.topk(dictionary.k, dim=1).values[:, -1:]
        f = torch.where(pre >= kth, pre.clamp_min(0), 0)
    else:
        f = torch.where(pre > dictionary.threshold.double(), pre, 0)
    x_hat = (f @ dictionary.W_dec.double() + dictionary.b_dec.double()) / dictionary.input_scale
    return 1 - ((x - x_hat) ** 2).sum().item() / ((x - x.mean(0)) ** 2).sum().item()


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_recovers_known_sparse_directions(data, activation):
    vectors, directions = data
    dictionary = train_dictionary(
        vectors, "resid_out_0", 64, ACTIVE, activation=activation, epochs=2, batch_size=128,
        lr=1e-2, dead_after=4000, seed=1,
    )  # fmt: skip
    report = dictionary.metadata["training"]
    held_out = vectors[-report["holdout_vectors"] :]
    assert report["explained_variance"] > 0.88
    assert report["explained_variance"] == pytest.approx(
        _hand_explained_variance(dictionary, held_out), abs=1e-6
    )
    cosines = (directions @ dictionary.W_dec.T).max(dim=1).values
    # most true directions have a decoder row within a few degrees (a random decoder: none)
    assert (cosines > 0.9).float().mean() >= 0.8, f"not recovered: {cosines.sort().values[:8]}"
    assert cosines.median() > 0.97
    chance = (directions @ torch.nn.functional.normalize(torch.randn(64, D_IN), dim=1).T).max(1)
    assert (chance.values > 0.9).sum() == 0
    assert torch.allclose(dictionary.W_dec.norm(dim=1), torch.ones(64), atol=1e-5)
    l0 = (dictionary.encode(held_out) > 0).sum(1).float()
    if activation == "topk":
        assert (l0 == ACTIVE).all() and report["l0"] == ACTIVE
    else:  # per-vector inference threshold: L0 == k on average, batched == one by one
        assert abs(l0.mean().item() - ACTIVE) < 0.5
        one_by_one = torch.cat([dictionary.encode(x[None]) for x in held_out[:50]])
        assert torch.allclose(one_by_one, dictionary.encode(held_out[:50]), atol=1e-5)
    # 64 features for 32 true directions: some are never needed and end up dead; a feature
    # that fired in none of the last 4000 training vectors hardly fires on held-out ones
    dead = report["dead_features"]
    assert 0.05 < report["dead_fraction"] == len(dead) / 64 < 0.6
    assert (dictionary.encode(held_out)[:, dead] > 0).float().mean() < 0.01
    assert report["history"][-1]["step"] == report["steps"]


def test_seed_reproduces(data):
    vectors = data[0][:3000]
    one, two = (train_dictionary(vectors, None, 64, 3, max_steps=5, batch_size=128) for _ in "ab")
    assert torch.equal(one.W_enc, two.W_enc) and torch.equal(one.b_dec, two.b_dec)


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    hm = HookedModel.from_hf(build_model("llama"), build_tokenizer())
    config = ExtractionConfig.from_names(["resid_out_1"], save_logits=False)
    folder = tmp_path_factory.mktemp("train") / "acts"
    batches = padded_batches(8, 16, 12, seed=2)
    return hm.extract_cache(batches, ["all"], extraction_config=config, output_dir=str(folder))


def test_trains_from_a_tiny_models_store(tiny_store):
    dictionary = train_dictionary(
        tiny_store, "resid_out_1", 256, 16, epochs=4, batch_size=128, lr=2e-3,
        slots=slice(1, None), holdout_shards=2,
    )  # fmt: skip
    report = dictionary.metadata["training"]
    assert dictionary.reads == dictionary.writes == "resid_out_1" and dictionary.d_in == 64
    held_out = store_vectors(tiny_store, "resid_out_1", slice(1, None), shards=[6, 7])
    trained = store_vectors(tiny_store, "resid_out_1", slice(1, None), shards=range(6))
    assert report["holdout_vectors"] == len(held_out)
    assert report["training_vectors"] == 4 * len(trained)
    assert report["explained_variance"] == pytest.approx(
        _hand_explained_variance(dictionary, held_out), abs=1e-6
    )
    assert report["explained_variance"] > 0.3  # ~20 steps on a random model's dense stream
    assert evaluate_dictionary(dictionary, held_out)["l0"] == 16


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"activation": "relu"}, "not one of"),
        ({"k": 0}, "k must be"),
        ({"k": 100}, "larger than d_sae"),
        ({"holdout_shards": 8}, "holdout_shards"),
    ],
)
def test_bad_arguments(tiny_store, kwargs, message):
    arguments = {"d_sae": 64, "k": 4, **kwargs}
    with pytest.raises(HookscopeError, match=message):
        train_dictionary(tiny_store, "resid_out_1", **arguments)


def test_max_norm_leaves_outliers_out_of_training_and_evaluation(data):
    vectors = data[0][:2000].clone()
    vectors[[5, 1990]] *= 1000  # one in the training part, one in the held-out part
    limit = 100 * vectors.norm(dim=1).median().item()
    dictionary = train_dictionary(
        vectors, None, 64, 3, max_steps=3, batch_size=128, holdout_fraction=0.05, max_norm=limit
    )
    report = dictionary.metadata["training"]
    assert report["holdout_vectors"] == int(1998 * 0.05)
    assert report["settings"]["max_norm"] == limit
    assert report["explained_variance"] == pytest.approx(
        _hand_explained_variance(dictionary, torch.cat([vectors[1900:1990], vectors[1991:]])),
        abs=1e-6,
    )


def test_evaluating_on_no_vectors_says_why():
    """An empty held-out set (all left out by max_norm) crashed with ZeroDivisionError."""
    dictionary = train_dictionary(
        torch.randn(512, 8), None, d_sae=16, k=2, max_steps=2, batch_size=64
    )
    with pytest.raises(HookscopeError, match="held-out set is empty"):
        evaluate_dictionary(dictionary, torch.empty(0, 8))
