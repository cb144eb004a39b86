"""Feature cards: the true top activations over a store, the right tokens, escaped HTML."""

from __future__ import annotations

import copy

import pytest
import torch
from test_store_stream import padded_batches
from tiny_models import build_model, build_tokenizer

from hookscope import ExtractionConfig, HookedModel
from hookscope.dictionaries import Dictionary
from hookscope.dictionaries.cards import (
    CardExample,
    FeatureCard,
    card_html,
    card_text,
    cards_page,
    feature_cards,
    visible,
)
from hookscope.errors import HookscopeError

POINT = "resid_out_1"


def random_dictionary(d_in: int = 64, d_sae: int = 32, seed: int = 0) -> Dictionary:
    generator = torch.Generator().manual_seed(seed)
    W_dec = torch.nn.functional.normalize(torch.randn(d_sae, d_in, generator=generator), dim=1)
    return Dictionary(
        W_enc=W_dec.T.clone(), b_enc=torch.zeros(d_sae), W_dec=W_dec, b_dec=torch.zeros(d_in),
        activation="topk", reads=POINT, k=4, name="tiny",
    )  # fmt: skip


def _left_padded(batches: list[dict]) -> list[dict]:
    """The same rows with their real tokens moved to the end (left padding)."""
    out = []
    for batch in batches:
        ids, mask = batch["input_ids"].clone(), batch["attention_mask"].clone()
        for row in range(len(ids)):
            n = int(mask[row].sum())
            ids[row] = torch.cat([ids[row, n:], ids[row, :n]])
            mask[row] = torch.cat([mask[row, n:], mask[row, :n]])
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


@pytest.fixture(scope="module", params=["right", "left"])
def padded_store(request, tmp_path_factory):
    """(store of resid_out_1 + input_ids at 'all', its batches, tokenizer with that padding side)."""
    tokenizer = copy.deepcopy(build_tokenizer())
    tokenizer.padding_side = request.param
    hm = HookedModel.from_hf(build_model("llama"), tokenizer)
    config = ExtractionConfig.from_names([POINT], save_logits=False, save_input_ids=True)
    batches = padded_batches(4, 8, 10, seed=4)
    batches = batches if request.param == "right" else _left_padded(batches)
    folder = tmp_path_factory.mktemp(f"cards-{request.param}") / "acts"
    store = hm.extract_cache(batches, ["all"], extraction_config=config, output_dir=str(folder))
    return store, batches, tokenizer, hm


def test_top_examples_are_the_true_top_activations(padded_store):
    store, batches, tokenizer, hm = padded_store
    dictionary = random_dictionary()
    features = [0, 5, 17]
    unembedding = hm.hf_model.get_output_embeddings().weight
    cards = feature_cards(store, dictionary, features, tokenizer, unembedding, n_examples=5)
    # by hand: every real vector encoded, each example's max over its real slots
    values, mask = store[POINT], torch.cat([b["attention_mask"] for b in batches]).bool()
    mask = mask.sort(dim=1, descending=True, stable=True).values  # slot j real iff j < n
    acts = torch.where(mask[..., None], dictionary.encode(values), 0)
    real_ids = [b["input_ids"][r][b["attention_mask"][r].bool()] for b in batches for r in range(8)]
    for card, feature in zip(cards, features, strict=True):
        best, slot = acts[..., feature].max(dim=1)
        order = torch.argsort(best, descending=True, stable=True)[:5]
        assert [e.example for e in card.examples] == order.tolist()
        assert [e.activation for e in card.examples] == pytest.approx(best[order].tolist())
        for example in card.examples:
            assert example.slot == slot[example.example]
            ids = real_ids[example.example]
            start = max(0, example.slot - 12)
            expected = [tokenizer.decode([t]) for t in ids[start : example.slot + 5].tolist()]
            assert example.tokens == expected
            assert example.tokens[example.focus] == tokenizer.decode([int(ids[example.slot])])
            assert example.activations[example.focus] == pytest.approx(example.activation)
        assert card.density == pytest.approx((acts[..., feature] > 0).sum().item() / mask.sum())
        effects = unembedding.detach() @ dictionary.W_dec[feature]
        top = effects.topk(10).indices.tolist()
        assert [t for t, _ in card.top_logits] == [tokenizer.decode([i]) for i in top]
        assert card.bottom_logits[0][1] == pytest.approx(effects.min().item(), rel=1e-5)


def test_slots_skip_first_token(padded_store):
    store, batches, tokenizer, _ = padded_store
    (card,) = feature_cards(store, random_dictionary(), [3], tokenizer, slots=slice(1, None))
    assert card.examples and all(e.slot >= 1 for e in card.examples)


def _card_with(token: str) -> FeatureCard:
    example = CardExample(0, 1, 2.0, ["a", token, " \n"], [0.0, 2.0, 1.0], 1)
    return FeatureCard(7, "tiny", [example], [(token, 1.5)], [("\t", -1.0)], 0.25)


def test_html_escapes_and_shows_whitespace():
    card = _card_with("<script>alert(1)</script>")
    html = card_html(card)
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "\u00b7\u21b5" in html  # " \n" shown as a middle dot and a return arrow
    assert "\u2192" in html  # the tab of the logit list
    assert "http" not in html and "<script" not in cards_page([card]).lower()
    assert "rgba(255,120,0,1.00)" in html and "rgba(255,120,0,0.50)" in html
    text = card_text(card)
    assert "[[<script>alert(1)</script>]](2.0)" in text and "\u00b7\u21b5(1.0)" in text
    assert "fires on 25.00% of tokens" in text


def test_visible_marks_whitespace_and_escapes_control_characters():
    assert visible(" a\n\tb\r") == "\u00b7a\u21b5\u2192b\u240d"
    assert visible("x\x00\x1b") == "x\\x00\\x1b"
    assert visible("") == "\u2205"


def test_bad_input(padded_store):
    store, _, tokenizer, _ = padded_store
    with pytest.raises(HookscopeError, match="not feature indices"):
        feature_cards(store, random_dictionary(), [32], tokenizer)
    other = random_dictionary()
    other.reads = "resid_out_0"
    with pytest.raises(HookscopeError, match="resid_out_0"):
        feature_cards(store, other, [0], tokenizer)
    # slot -1 is a padded slot that only the longest prompts fill, not each one's last token
    with pytest.raises(HookscopeError, match="slot indices >= 0"):
        feature_cards(store, random_dictionary(), [0], tokenizer, slots=slice(-3, None))


def test_trained_dictionary_fields_round_trip_the_native_format(tmp_path):
    from hookscope.dictionaries import load_dictionary, save_dictionary

    dictionary = random_dictionary()
    dictionary.activation, dictionary.threshold = "batchtopk", torch.full((32,), 0.25)
    dictionary.input_scale, dictionary.metadata = 0.5, {"training": {"l0": 4.0}}
    loaded = load_dictionary(save_dictionary(dictionary, tmp_path / "d"))
    for key in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
        assert torch.equal(getattr(loaded, key), getattr(dictionary, key))
    assert (loaded.activation, loaded.k, loaded.reads, loaded.writes) == (
        "batchtopk",
        4,
        POINT,
        POINT,
    )
    assert loaded.input_scale == 0.5 and loaded.metadata == dictionary.metadata
    x = torch.randn(5, 64)
    assert torch.equal(loaded.reconstruct(x), dictionary.reconstruct(x))
    with pytest.raises(HookscopeError, match="format"):
        load_dictionary(tmp_path)


def test_a_store_not_at_all_positions_is_refused(tmp_path):
    """Slot j was read as the j-th real token whatever the store's positions: a store at
    ["last", 0] showed token 1 as the most active one when it was token 0 (slot 1)."""
    hm = HookedModel.from_hf(build_model("llama"), build_tokenizer())
    config = ExtractionConfig.from_names([POINT], save_logits=False, save_input_ids=True)
    prompts = ["the cat sat on the mat", "a dog ran"]
    for positions, folder in ((["last", 0], "a"), ([(1, 3)], "b")):
        store = hm.extract_cache(prompts, positions, extraction_config=config,
                                 output_dir=str(tmp_path / folder))  # fmt: skip
        with pytest.raises(HookscopeError, match=r"extracted at \['all'\]"):
            feature_cards(store, random_dictionary(), [0], hm.tokenizer)
    averaged = ExtractionConfig.from_names(
        [POINT], save_logits=False, save_input_ids=True, extract_avg=True
    )
    store = hm.extract_cache(prompts, ["all"], extraction_config=averaged,
                             output_dir=str(tmp_path / "c"))  # fmt: skip
    with pytest.raises(HookscopeError, match="averaged"):
        feature_cards(store, random_dictionary(), [0], hm.tokenizer)
