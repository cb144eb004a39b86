"""Dictionary encode/decode against hand computations, and its input checks."""

import pytest
import torch

from hookscope.dictionaries import Dictionary
from hookscope.errors import HookscopeError

pytestmark = pytest.mark.unit


def _dictionary(activation="relu", **kw):
    g = torch.Generator().manual_seed(0)
    return Dictionary(
        W_enc=torch.randn(6, 10, generator=g),
        b_enc=torch.randn(10, generator=g),
        W_dec=torch.randn(10, 6, generator=g),
        b_dec=torch.randn(6, generator=g),
        activation=activation,
        reads="resid_out_1",
        **kw,
    )


def test_relu_encode_decode_by_hand():
    d = _dictionary(input_scale=2.0)
    x = torch.randn(4, 6)
    pre = (x * 2.0 - d.b_dec) @ d.W_enc + d.b_enc
    f = d.encode(x)
    torch.testing.assert_close(f, pre.clamp(min=0))
    torch.testing.assert_close(d.decode(f), (f @ d.W_dec + d.b_dec) / 2.0)


def test_topk_keeps_k_largest_per_vector():
    d = _dictionary("topk", k=3)
    x = torch.randn(5, 6)
    pre = d.pre_activations(x)
    f = d.encode(x)
    for row_pre, row_f in zip(pre, f, strict=True):
        top = row_pre.topk(3).indices
        expected = torch.zeros(10)
        expected[top] = row_pre[top].clamp(min=0)
        torch.testing.assert_close(row_f, expected)


def test_jumprelu_and_batchtopk_threshold_are_per_vector():
    threshold = torch.full((10,), 0.5)
    jump = _dictionary("jumprelu", threshold=threshold)
    x = torch.randn(7, 6)
    pre = jump.pre_activations(x)
    torch.testing.assert_close(jump.encode(x), torch.where(pre > 0.5, pre, 0.0))
    batch = _dictionary("batchtopk", threshold=threshold, k=2)
    # batched == one by one: the inference rule does not look across the batch
    one_by_one = torch.stack([batch.encode(row) for row in x])
    torch.testing.assert_close(batch.encode(x), one_by_one)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"activation": "gelu"}, "not one of"),
        ({"activation": "topk"}, "needs k"),
        ({"activation": "jumprelu"}, "needs threshold"),
        ({"name": "my sae"}, "letters, digits"),
        ({"input_scale": 0.0}, "input_scale"),
    ],
)
def test_bad_dictionaries_are_refused(kwargs, message):
    activation = kwargs.pop("activation", "relu")
    with pytest.raises(HookscopeError, match=message):
        _dictionary(activation, **kwargs)


def test_wrong_shapes_are_named():
    with pytest.raises(HookscopeError, match="b_enc has shape"):
        Dictionary(
            W_enc=torch.zeros(6, 10),
            b_enc=torch.zeros(9),
            W_dec=torch.zeros(10, 6),
            b_dec=torch.zeros(6),
            activation="relu",
            reads="resid_out_0",
        )


def test_device_copy_is_remade_after_the_dictionary_is_edited():
    """on(device) kept its first copy forever: after d.W_dec[3] *= 2 (or d.k = 2) a model on
    another device kept splicing and steering with the old weights."""
    d = _dictionary("topk", k=3)
    first = d.on("meta")
    assert d.on("meta") is first and d.on("cpu") is d  # cached; the CPU holds d itself
    with torch.no_grad():
        d.W_dec[3] *= 2
    edited = d.on("meta")
    assert edited is not first and edited.W_dec.device.type == "meta"
    d.k = 2
    assert d.on("meta").k == 2
    assert d.on("meta") is d.on("meta")
    with torch.inference_mode():  # inference tensors keep no version counter
        frozen = _dictionary("relu")
    assert frozen.on("meta") is frozen.on("meta")


@pytest.mark.parametrize("activation, kw", [("relu", {}), ("topk", {"k": 3})])
def test_encode_with_an_index_of_every_feature_in_another_order_follows_the_index(activation, kw):
    """An index of length d_sae is not "every feature in order" unless it is arange: a
    permutation, or duplicates, come back in the index's order (they once came back unpermuted)."""
    d = _dictionary(activation, **kw)
    x = torch.randn(4, 6)
    full = d.encode(x)
    for index in (torch.arange(10).flip(0), torch.tensor([0, 0, 1, 2, 3, 4, 5, 6, 7, 8])):
        torch.testing.assert_close(d.encode(x, index), full[..., index])
