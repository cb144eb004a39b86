"""Positions in the prompt's own terms: text anchors and chat roles, checked against the text.

Ground truth: the decoded ids at the selected positions equal the anchor / the message content
exactly, and a padded batch resolved by anchor gives what each prompt gives alone at the index
found by hand (from the token strings, not from hookscope)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_close_to_scale
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_models import PROMPTS, build_model, build_tokenizer

from hookscope import ExtractionConfig, HookedModel
from hookscope.errors import InputError, PositionError
from hookscope.interventions import Patch, Steer
from hookscope.text_positions import anchor_key, tokenize_with_offsets

IOI = [
    "When Mary and John went to the store, John gave a drink to",
    "Then Mary left",
    "After the long day at the store, Mary and John sat on the mat and talked",
]
RESID = ExtractionConfig(extract_resid_out=True)
MARY = {"text": " Mary"}


@pytest.fixture(scope="module")
def llama():
    return build_model("llama")


def _hm(llama, side: str) -> HookedModel:
    return HookedModel.from_hf(llama, build_tokenizer(side))


def _selected_text(hm: HookedModel, batch, item) -> list[str]:
    """Per row, the decoded ids at the positions ``item`` resolves to."""
    resolved = hm.position_context(batch).resolve([item])
    ids = batch["input_ids"]
    return [
        hm.get_tokenizer().decode(ids[row, resolved.index[row][resolved.mask[row]]])
        for row in range(len(ids))
    ]


def _between(text: str, first: str, second: str) -> str:
    """The text strictly between the first ``first`` and the next ``second`` (by hand)."""
    start = text.index(first) + len(first)
    return text[start : text.index(second, start)]


def _manual_index(tokenizer, prompt: str, token: str) -> int:
    """The index of ``token`` among the prompt's token strings (found by hand, independently)."""
    return tokenizer.convert_ids_to_tokens(tokenizer(prompt)["input_ids"]).index(token)


@pytest.mark.parametrize("side", ["left", "right"])
def test_anchor_tokens_are_the_anchor_text(llama, side):
    hm = _hm(llama, side)
    batch = hm.prepare_inputs(IOI)
    assert not batch["attention_mask"].bool().all()
    assert _selected_text(hm, batch, MARY) == [" Mary"] * 3
    # " store" is split into several tokens: all of them, exactly the word
    store = {"text": " store"}
    assert _selected_text(hm, hm.prepare_inputs([IOI[0], IOI[2]]), store) == [" store"] * 2
    split = hm.prepare_inputs([IOI[0]])
    assert len(hm.position_context(split).resolve([store]).index[0]) > 1
    first = _selected_text(hm, split, {"text": " store", "tokens": "first"})[0]
    last = _selected_text(hm, split, {"text": " store", "tokens": "last"})[0]
    assert " store".startswith(first) and " store".endswith(last) and first != " store"
    # "Mary" without its space: the token covering it is " Mary" (space merged into the word)
    assert _selected_text(hm, batch, {"text": "Mary"}) == [" Mary"] * 3


@pytest.mark.parametrize("side", ["left", "right"])
def test_after_before_between_and_occurrences(llama, side):
    hm = _hm(llama, side)
    batch = hm.prepare_inputs([IOI[0], IOI[2]])
    assert _selected_text(hm, batch, {"after": " Mary"}) == [" and", " and"]
    assert _selected_text(hm, batch, {"before": " Mary"}) == ["n", ","]  # "W" "he" "n" " Mary"
    assert _selected_text(hm, batch, {"text": " John", "occurrence": "last"}) == [" John"] * 2
    assert _selected_text(hm, batch, {"text": " John", "occurrence": "all"}) == [
        " John John",
        " John",
    ]
    assert _selected_text(hm, batch, {"between": ["Mary", " John"]}) == [" and", " and"]
    expected = [_between(text, "Mary", " the") for text in (IOI[0], IOI[2])]
    assert expected == [" and John went to", " and John sat on"]
    assert _selected_text(hm, batch, {"between": ["Mary", " the"]}) == expected
    one = hm.prepare_inputs([IOI[0]])
    assert _selected_text(hm, one, {"between": ["When", " John"]}) == [" Mary and"]


def test_ioi_resid_at_the_name_equals_manual_indices_one_by_one(llama):
    """The name token moves between prompts of different lengths: the batch extracted at
    {"text": " Mary"} equals each prompt alone extracted at its hand-found index."""
    for side in ("left", "right"):
        hm = _hm(llama, side)
        tokenizer = hm.get_tokenizer()
        batched = hm.forward(IOI, [MARY, "last"], extraction_config=RESID)
        assert batched["mapping_index"] == {anchor_key(MARY): [0], "last": [1]}
        indices = [_manual_index(tokenizer, prompt, "ĠMary") for prompt in IOI]
        assert len(set(indices)) > 1  # the name really moves
        for row, (prompt, index) in enumerate(zip(IOI, indices, strict=True)):
            alone = hm.forward(prompt, [index], extraction_config=RESID)
            for layer in range(2):
                key = f"resid_out_{layer}"
                assert_close_to_scale(batched[key][row, 0], alone[key][0, 0], msg=f"{side} {row}")


def test_steer_and_patch_at_an_anchor_equal_manual_indices(llama):
    hm = _hm(llama, "left")
    vector = torch.randn(64, generator=torch.Generator().manual_seed(0))
    steer = [Steer(point="resid_out_0", positions=MARY, vector=vector, coefficient=3.0)]
    batched = hm.forward(IOI, ["last"], interventions=steer)
    for row, prompt in enumerate(IOI):
        index = _manual_index(hm.get_tokenizer(), prompt, "ĠMary")
        by_hand = [Steer(point="resid_out_0", positions=[index], vector=vector, coefficient=3.0)]
        alone = hm.forward(prompt, ["last"], interventions=by_hand)
        plain = hm.forward(prompt, ["last"])
        assert_close_to_scale(batched["logits"][row], alone["logits"][0], msg=f"row {row}")
        assert not torch.allclose(alone["logits"], plain["logits"])
    # patch the name token of the clean prompts into corrupt ones where it sits elsewhere
    clean = hm.forward(IOI, [MARY], extraction_config=RESID)
    corrupt = ["Later on, " + prompt.replace("John", "Anne") for prompt in IOI]
    patch = Patch(point="resid_out_0", positions=[MARY], source=clean)
    patched = hm.forward(corrupt, ["last"], interventions=patch)
    before = hm.forward(corrupt, [MARY], extraction_config=RESID)
    for row, prompt in enumerate(corrupt):
        index = _manual_index(hm.get_tokenizer(), prompt, "ĠMary")
        delta = clean["resid_out_0"][row, 0] - before["resid_out_0"][row, 0]
        by_hand = [Steer(point="resid_out_0", positions=[index], vector=delta)]
        alone = hm.forward(prompt, ["last"], interventions=by_hand)
        assert_close_to_scale(patched["logits"][row], alone["logits"][0], rtol=1e-4)


def test_generate_steers_at_the_anchor(llama):
    hm = _hm(llama, "right")  # generate re-pads to the left: the text layout must follow
    vector = torch.randn(64, generator=torch.Generator().manual_seed(1)) * 4
    greedy = dict(max_new_tokens=4, do_sample=False)
    steer = [Steer(point="resid_out_0", positions=MARY, vector=vector)]
    batched = hm.generate(IOI[:2], interventions=steer, return_text=True, **greedy)
    assert batched != hm.generate(IOI[:2], return_text=True, **greedy)  # the steer acts
    for row, prompt in enumerate(IOI[:2]):
        index = _manual_index(hm.get_tokenizer(), prompt, "ĠMary")
        by_hand = [Steer(point="resid_out_0", positions=[index], vector=vector)]
        assert (
            batched[row]
            == hm.generate(prompt, interventions=by_hand, return_text=True, **greedy)[0]
        )
    # extraction at an anchor during generate: the prompt call's values, as in a forward
    cache = hm.generate(IOI, target_token_positions=[MARY], extraction_config=RESID, **greedy)
    forward = hm.forward(IOI, [MARY], extraction_config=RESID)
    assert cache["mapping_index"][anchor_key(MARY)] == [0]  # then the "generated" slot
    assert_close_to_scale(cache["resid_out_1"][:, :1], forward["resid_out_1"])


def test_extract_cache_and_store_record_anchor_items(llama, tmp_path):
    hm = _hm(llama, "right")
    items = [MARY, {"after": " Mary"}]
    cache = hm.extract_cache(IOI, items, extraction_config=RESID)
    alone = hm.forward(IOI, items, extraction_config=RESID)
    assert torch.equal(cache["resid_out_1"], alone["resid_out_1"])
    store = hm.extract_cache(IOI, items, extraction_config=RESID, output_dir=str(tmp_path / "s"))
    assert store.mapping_index == {anchor_key(MARY): [0], anchor_key({"after": " Mary"}): [1]}
    assert torch.equal(store["resid_out_1"], cache["resid_out_1"])


def _chat_tokenizer(side: str):
    tokenizer = copy.deepcopy(build_tokenizer(side))
    tokenizer.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
    )
    return tokenizer


CONVERSATIONS = [
    [
        {"role": "system", "content": "The cat sat on the mat"},
        {"role": "user", "content": "A dog barked"},
        {"role": "assistant", "content": "Hello world"},
    ],
    [
        {"role": "user", "content": "The capital of France is Paris"},
        {"role": "assistant", "content": "A dog"},
        {"role": "user", "content": "Hello"},
    ],
]


@pytest.mark.parametrize("side", ["left", "right"])
def test_chat_roles_select_exactly_the_message_content(llama, side):
    hm = HookedModel.from_hf(llama, _chat_tokenizer(side))
    batch = hm.apply_chat_template(CONVERSATIONS)
    assert not batch["attention_mask"].bool().all()
    prepared = hm.prepare_inputs(batch)
    assert _selected_text(hm, prepared, "user:all") == [
        "A dog barked",
        "The capital of France is ParisHello",  # both user messages' tokens
    ]
    assert _selected_text(hm, prepared, "user-0:all") == [
        "A dog barked",
        "The capital of France is Paris",
    ]
    assert _selected_text(hm, prepared, "user--1:all") == ["A dog barked", "Hello"]
    assert _selected_text(hm, prepared, "assistant:all") == ["Hello world", "A dog"]
    assert _selected_text(hm, prepared, "turn-0:all") == [
        "The cat sat on the mat",
        "The capital of France is Paris",
    ]
    context = hm.position_context(prepared)
    for item, whole, pick in [
        ("user:last", "user--1:all", -1),
        ("assistant:first", "assistant:all", 0),
    ]:
        one, every = context.resolve([item]), context.resolve([whole])
        for row in range(2):
            real = every.index[row][every.mask[row]]
            assert int(one.index[row, 0]) == int(real[pick])
    contents = [m["content"] for m in (CONVERSATIONS[0][1], CONVERSATIONS[1][2])]
    lasts = _selected_text(hm, prepared, "user:last")
    assert all(c.endswith(t) and t for c, t in zip(contents, lasts, strict=True))
    # the batch gives, row by row, what each conversation gives alone
    items = ["user:last", "assistant:all", "turn-0:first"]
    batched = hm.forward(batch, items, extraction_config=RESID)
    for row, conversation in enumerate(CONVERSATIONS):
        alone = hm.forward(hm.apply_chat_template(conversation), items, extraction_config=RESID)
        for item in items:  # widths differ per batch: compare each item's real slots
            mine, its = batched["mapping_index"][item], alone["mapping_index"][item]
            assert batched["position_mask"][row, mine].sum() == len(its)
            assert_close_to_scale(
                batched["resid_out_1"][row, mine[: len(its)]], alone["resid_out_1"][0, its]
            )


def test_clear_errors(llama):
    hm = _hm(llama, "right")
    with pytest.raises(
        PositionError, match=r"' John' is not in example 1; its text: 'Then Mary left'"
    ):
        hm.forward([IOI[0], IOI[1]], [{"after": "Mary", "occurrence": 0}, {"text": " John"}])
    ids = build_tokenizer()(IOI, return_tensors="pt", padding=True)
    with pytest.raises(PositionError, match="names text.*already token ids"):
        hm.forward(ids, [MARY])
    with pytest.raises(PositionError, match="give exactly one of"):
        hm.forward(IOI, [{"txt": " Mary"}])
    with pytest.raises(PositionError, match="'occurrence' must be"):
        hm.forward(IOI, [{"text": " Mary", "occurrence": "second"}])
    with pytest.raises(
        PositionError,
        match=r"example 0 has 1 occurrences; occurrence 1 is out of range \(valid: -1\.\.0\)",
    ):
        hm.forward(IOI, [{"text": " Mary", "occurrence": 1}])
    with pytest.raises(PositionError, match="no chat messages recorded.*apply_chat_template"):
        hm.forward(IOI, ["user:last"])
    with pytest.raises(PositionError, match="at the end of the prompt"):
        hm.forward(["Hello Mary"], [{"after": "Mary"}])
    with pytest.raises(InputError, match="has no chat template"):
        hm.apply_chat_template(CONVERSATIONS)
    chat = HookedModel.from_hf(llama, _chat_tokenizer("right"))
    with pytest.raises(PositionError, match="no 'system' message"):
        chat.forward(chat.apply_chat_template(CONVERSATIONS), ["system:all"])


def test_a_tokenized_batch_with_offsets_and_texts_resolves_anchors(llama):
    hm = _hm(llama, "left")
    encoded = hm.get_tokenizer()(
        IOI, return_tensors="pt", padding=True, return_offsets_mapping=True
    )
    batch = {**encoded, "text": IOI}
    from_ids = hm.forward(batch, [MARY], extraction_config=RESID)
    from_strings = hm.forward(IOI, [MARY], extraction_config=RESID)
    assert torch.equal(from_ids["resid_out_1"], from_strings["resid_out_1"])
    with pytest.raises(PositionError, match="also needs 'text'"):
        hm.forward({k: v for k, v in encoded.items()}, [MARY])


def test_a_tokenizer_without_offsets_says_so():
    class Slow:
        is_fast = False

        def __call__(self, texts, **kwargs):
            return {"input_ids": torch.ones(len(texts), 2, dtype=torch.long)}

    _, missing = tokenize_with_offsets(Slow(), ["a"])
    assert "Slow) is not a fast tokenizer" in missing


SMOL_CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Name a colour of the sky on a clear summer day"},
        {"role": "assistant", "content": "Blue."},
    ],
]


@pytest.mark.real_model
@pytest.mark.parametrize("side", ["left", "right"])
def test_smollm2_chat_template_roles(side):
    hm = HookedModel.from_pretrained()
    tokenizer = copy.deepcopy(hm.get_tokenizer())
    tokenizer.padding_side = side
    hm = HookedModel.from_hf(hm.hf_model, tokenizer)
    batch = hm.apply_chat_template(SMOL_CHATS, add_generation_prompt=True)
    prepared = hm.prepare_inputs(batch)
    assert not prepared["attention_mask"].bool().all()
    assert _selected_text(hm, prepared, "user:all") == [
        "What is the capital of France?",
        "Name a colour of the sky on a clear summer day",
    ]
    assert _selected_text(hm, prepared, "turn-0:all") == [
        "What is the capital of France?",
        "Answer in one word.",
    ]
    assert _selected_text(hm, prepared, "user:last") == ["?", " day"]
    # the template's markers are not content: the token after the user's content is <|im_end|>
    one = hm.prepare_inputs(hm.apply_chat_template(SMOL_CHATS[0]))
    after = _selected_text(hm, one, {"after": "France?"})[0]
    assert after == "<|im_end|>"
    items = ["user:last", "user:first"]
    batched = hm.forward(batch, items, extraction_config=ExtractionConfig(extract_resid_out=True))
    for row, chat in enumerate(SMOL_CHATS):
        alone = hm.forward(
            hm.apply_chat_template(chat, add_generation_prompt=True),
            items,
            extraction_config=ExtractionConfig(extract_resid_out=True),
        )
        for layer in (0, 29):
            key = f"resid_out_{layer}"
            assert_close_to_scale(batched[key][row], alone[key][0], rtol=1e-4, msg=f"{key} {row}")
    # a chat batch generates as usual (the template's generation prompt is kept)
    text = hm.generate(batch, return_text=True, max_new_tokens=8, do_sample=False)
    assert "Paris" in text[0]


def test_pattern_edit_and_records_at_anchors(llama):
    """A pattern edit that blocks the last token from attending to the name equals, per prompt,
    the same edit at the hand-found index; records with 'text' resolve anchors too."""
    from hookscope.interventions import PatternEdit

    hm = _hm(llama, "left")
    edit = PatternEdit(
        layer=1, query_positions=["last"], key_positions=MARY, stage="pre", op="block"
    )
    batched = hm.forward(IOI, ["last"], interventions=[edit])
    for row, prompt in enumerate(IOI):
        index = _manual_index(hm.get_tokenizer(), prompt, "ĠMary")
        by_hand = PatternEdit(
            layer=1, query_positions=["last"], key_positions=[index], stage="pre", op="block"
        )
        alone = hm.forward(prompt, ["last"], interventions=[by_hand])
        assert_close_to_scale(batched["logits"][row], alone["logits"][0], msg=f"row {row}")
        assert not torch.allclose(alone["logits"], hm.forward(prompt, ["last"])["logits"])
    records = [{"text": prompt, "label": i} for i, prompt in enumerate(IOI)]
    from_records = hm.extract_cache(records, [MARY], extraction_config=RESID)
    from_strings = hm.forward(IOI, [MARY], extraction_config=RESID)
    assert_close_to_scale(from_records["resid_out_1"], from_strings["resid_out_1"])


def test_anchor_strings_are_checked_and_the_cli_passes_them_through():
    from hookscope.cli import _positions
    from hookscope.positions import normalize_items

    assert normalize_items(['{"text":" Mary"}', MARY][:1]) == [anchor_key(MARY)]
    with pytest.raises(PositionError, match="appears twice"):
        normalize_items(['{"text":" Mary"}', MARY])
    with pytest.raises(PositionError, match="give exactly one of"):
        normalize_items(['{"txt": " Mary"}'])
    with pytest.raises(PositionError, match="unknown position item 'user:middle'"):
        normalize_items(["user:middle"])
    parsed = _positions(["user:last", '{"after": "Answer:"}', "first-image:0", "2:5", "-1", "last"])
    assert parsed == ["user:last", '{"after": "Answer:"}', "first-image:0", (2, 5), -1, "last"]


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_any_substring_is_covered_exactly_by_its_tokens(llama, data):
    """For any substring of any prompt in a padded batch (either side), the selected tokens'
    text is exactly the text of the tokens whose character spans overlap it, taken from the
    tokenizer's offsets of that prompt alone, and contains the substring."""
    side = data.draw(st.sampled_from(["left", "right"]))
    hm = _hm(llama, side)
    prompts = data.draw(st.lists(st.sampled_from(PROMPTS + IOI), min_size=2, max_size=3))
    row = data.draw(st.integers(0, len(prompts) - 1))
    text = prompts[row]
    start = data.draw(st.integers(0, len(text) - 1))
    end = data.draw(st.integers(start + 1, len(text)))
    anchor = text[start:end]
    # every prompt must contain it for the batch to resolve: use it in the chosen row only
    batch = [p if i == row else p + " " + anchor for i, p in enumerate(prompts)]
    selected = _selected_text(hm, hm.prepare_inputs(batch), {"text": anchor})[row]
    alone = hm.get_tokenizer()(text, return_offsets_mapping=True)
    first_match = text.index(anchor)
    spans = [
        (a, b)
        for a, b in alone["offset_mapping"]
        if a < first_match + len(anchor) and b > first_match and b > a
    ]
    assert selected == text[spans[0][0] : spans[-1][1]]
    assert anchor in selected


def test_message_content_that_also_appears_in_the_markers(llama):
    """Contents equal to parts of the template's markers ("user", "s" of "<s>", a newline) are
    still located at the message, not in the markers."""
    hm = HookedModel.from_hf(llama, _chat_tokenizer("right"))
    chat = [
        {"role": "user", "content": "user"},
        {"role": "assistant", "content": "s"},
        {"role": "user", "content": "assistant"},
    ]
    batch = hm.apply_chat_template([chat, CONVERSATIONS[0]])
    texts = _selected_text(hm, hm.prepare_inputs(batch), "turn-1:all")
    assert texts == ["s", "A dog barked"]
    assert _selected_text(hm, hm.prepare_inputs(batch), "user:all") == [
        "userassistant",
        "A dog barked",
    ]
    spans = batch.text_layout.messages[0]
    assert [batch.text_layout.texts[0][m.start : m.end] for m in spans] == [
        "user",
        "s",
        "assistant",
    ]
    opening = len("<s>user\n")
    after_first = opening + len("user</s>\n") + len("<s>assistant\n")
    after_second = after_first + len("s</s>\n") + len("<s>user\n")
    assert [m.start for m in spans] == [opening, after_first, after_second]  # [8, 30, 44]


def test_a_template_that_changes_the_content_is_refused(llama):
    tokenizer = _chat_tokenizer("right")
    tokenizer.chat_template = "{% for m in messages %}<s>{{ m['content'] | trim }}</s>{% endfor %}"
    hm = HookedModel.from_hf(llama, tokenizer)
    with pytest.raises(InputError, match="not rendered verbatim by the chat template"):
        hm.apply_chat_template([{"role": "user", "content": " padded "}])


def test_patching_sweep_at_an_anchor_across_prompts_of_different_lengths():
    """A per-layer sweep that patches only the name token, which sits at a different index in
    each (left-padded) prompt: batched equals the per-example reference, the patched tokens are
    exactly ' Mary', and patching elsewhere-only changes nothing at layer 0's input."""
    from hookscope import HookscopeError
    from hookscope.patching import activation_patching

    tokenizer = build_tokenizer("left")
    hm = HookedModel.from_hf(build_model("llama"), tokenizer)
    prompts = ["When Mary went to the store", "Then the cat and Mary sat on the mat"]
    clean = hm.prepare_inputs(prompts)
    corrupt = {k: v.clone() for k, v in clean.items()}
    chosen = hm.position_context(clean).resolve([{"text": " Mary"}])
    for row in range(2):
        index = chosen.index[row][chosen.mask[row]]
        assert tokenizer.decode(clean["input_ids"][row, index]).strip() == "Mary"
        corrupt["input_ids"][row, index] = 100  # another token in the name's place
    assert chosen.index[0, 0] != chosen.index[1, 0]  # the name moves between the prompts
    answers = (torch.tensor([5, 9]), torch.tensor([7, 11]))
    items = [{"text": " Mary"}]
    kwargs = dict(point="resid_in", per="layer", positions=items)
    fast = activation_patching(hm, clean, corrupt, answers, batch_size=3, **kwargs)
    slow = activation_patching(hm, clean, corrupt, answers, batched=False, **kwargs)
    torch.testing.assert_close(fast.per_example, slow.per_example, rtol=1e-5, atol=1e-5)
    # at layer 0's input only the name differs, so patching it restores the clean run exactly
    torch.testing.assert_close(fast.per_example[:, 0], torch.ones(2), rtol=0, atol=1e-4)
    with pytest.raises(HookscopeError, match="positions= chooses"):
        activation_patching(hm, clean, corrupt, answers, per="position", positions=items)
