"""Model inputs: accept what users pass (strings, token lists, BatchEncoding, dicts), check it,
and add what a padding-correct forward needs (attention mask, position ids)."""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .errors import InputError
from .text_positions import TextLayout, render_conversation, tokenize_with_offsets
from .vision import computes_own_positions, first_position, prepare_multimodal

# Keys a batch may carry for the user's own purposes (batch_saver) that must not reach the model.
_NEVER_FORWARDED = ("labels",)


def model_input_names(model: nn.Module) -> frozenset[str]:
    """Named parameters of ``model.forward`` (``**kwargs`` excluded); cached per model class."""
    return _forward_parameters(type(model))


@functools.cache
def _forward_parameters(model_class: type) -> frozenset[str]:
    params = inspect.signature(model_class.forward).parameters.values()
    return frozenset(
        p.name
        for p in params
        if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name != "self"
    )


class TextBatch(dict):
    """A dict of model keyword arguments that also knows each example's text and token offsets
    (:class:`~hookscope.text_positions.TextLayout`) as an attribute, never as a key, so it never
    reaches the HF model. ``text_missing`` says why there is no layout (None when there is)."""

    text_layout: TextLayout | None = None
    text_missing: str | None = None


def tokenize(tokenizer: Any, texts: str | list[str]) -> TextBatch:
    """Tokenize one string or a list of strings into a padded batch, keeping each example's
    text and token offsets (when the tokenizer gives offsets) for text anchor positions."""
    if tokenizer is None:
        raise InputError("this HookedModel has no tokenizer: pass input_ids, not strings.")
    texts = texts if isinstance(texts, list) else [texts]
    encoded, offsets = tokenize_with_offsets(tokenizer, texts)
    batch = TextBatch(encoded)
    if isinstance(offsets, str):
        batch.text_missing = offsets
    else:
        batch.text_layout = TextLayout.from_batch(texts, offsets, encoded["attention_mask"])
    return batch


def tokenize_chat(
    tokenizer: Any, conversations: list, add_generation_prompt: bool = False, **template_kwargs: Any
) -> TextBatch:
    """Render each conversation with the tokenizer's own chat template and tokenize the batch,
    recording every message's content span (chat role position items such as ``"user:last"``).

    Raises:
        InputError: without a tokenizer, a chat template or offsets, or for a malformed
            conversation.
    """
    if tokenizer is None:
        raise InputError("this HookedModel has no tokenizer, so it has no chat template.")
    if conversations and isinstance(conversations[0], Mapping):
        conversations = [conversations]  # one conversation
    if not conversations or not all(isinstance(c, list) and c for c in conversations):
        raise InputError(
            "apply_chat_template takes a conversation (a list of {'role': ..., 'content': ...} "
            f"dicts) or a list of them, got {conversations!r:.80}."
        )
    rendered = [
        render_conversation(
            tokenizer, c, add_generation_prompt=add_generation_prompt, **template_kwargs
        )
        for c in conversations
    ]
    texts = [text for text, _ in rendered]
    # the template writes its own BOS / markers: the tokenizer must not add them again
    encoded, offsets = tokenize_with_offsets(tokenizer, texts, add_special_tokens=False)
    if isinstance(offsets, str):
        raise InputError(
            f"apply_chat_template records role spans from token offsets, but {offsets}."
        )
    batch = TextBatch(encoded)
    messages = [spans for _, spans in rendered]
    batch.text_layout = TextLayout.from_batch(texts, offsets, encoded["attention_mask"], messages)
    return batch


def _text_layout(inputs: Any) -> tuple[TextLayout | None, str | None]:
    """The text layout a batch carries: a :class:`TextBatch`'s, or one built from the
    ``offset_mapping`` and ``text`` (the exact strings) keys of a mapping."""
    if isinstance(inputs, TextBatch):
        return inputs.text_layout, inputs.text_missing
    if not isinstance(inputs, Mapping) or inputs.get("offset_mapping") is None:
        return None, None
    texts, mask = inputs.get("text"), inputs.get("attention_mask")
    if not (isinstance(texts, list) and all(isinstance(t, str) for t in texts)) or mask is None:
        return (
            None,
            "a batch with 'offset_mapping' also needs 'text' (the list of exact strings) and 'attention_mask'",
        )
    return TextLayout.from_batch(texts, inputs["offset_mapping"], mask), None


def prepare_inputs(
    inputs: Any,
    model: nn.Module,
    tokenizer: Any,
    device: torch.device,
) -> dict[str, Any]:
    """Turn ``inputs`` into keyword arguments for ``model`` on ``device``.

    Accepts a string, a list of strings, a ``[batch, seq]`` (or ``[seq]``) id tensor, or a mapping
    (``BatchEncoding``, dict) with ``input_ids`` and usually ``attention_mask``. Keys the model
    does not take (a dataset's ``label``...) are dropped. Adds ``attention_mask`` (all ones) when
    there is no padding, and ``position_ids`` derived from the mask when there is padding, so a
    padded row computes exactly what it computes alone (absolute position embeddings under left
    padding would otherwise shift); models with multimodal positions (Qwen2-VL) derive their own.
    Vision-language inputs are checked and completed by :func:`hookscope.vision.prepare_multimodal`.

    Raises:
        InputError: for a missing ``input_ids``, mismatched shapes, or padding without a mask.
    """
    if isinstance(inputs, str) or (
        isinstance(inputs, list) and inputs and isinstance(inputs[0], str)
    ):
        _check_all_strings(inputs)
        inputs = tokenize(tokenizer, inputs)
    elif isinstance(inputs, torch.Tensor):
        inputs = {"input_ids": inputs}
    layout, missing = _text_layout(inputs)
    if not isinstance(inputs, Mapping):
        raise InputError(
            f"inputs must be a string, a list of strings, an id tensor or a mapping with input_ids; "
            f"got {type(inputs).__name__}."
        )
    accepted = model_input_names(model) - set(_NEVER_FORWARDED)
    kwargs = {k: v for k, v in inputs.items() if k in accepted and v is not None}
    input_ids = kwargs.get("input_ids")
    if input_ids is None and "text" in inputs:  # a DataLoader over records collates them so
        raise InputError(
            f"inputs have no input_ids but a 'text' field (keys: {sorted(inputs)}): a DataLoader "
            "over records gives such batches; pass the list of records itself to extract_cache "
            "(it batches and tokenizes them), or tokenize in a collate_fn."
        )
    if input_ids is None:
        raise InputError(f"inputs have no input_ids (keys: {sorted(inputs)}).")
    input_ids = _as_id_tensor(input_ids, "input_ids")
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.dim() != 2:
        raise InputError(f"input_ids must be [batch, seq], got shape {list(input_ids.shape)}.")
    kwargs["input_ids"] = input_ids

    mask = kwargs.get("attention_mask")
    if mask is None:
        pad_id = getattr(tokenizer, "pad_token_id", None)
        if pad_id is not None and input_ids.shape[0] > 1 and bool((input_ids == pad_id).any()):
            raise InputError(
                f"input_ids contain the pad token (id {pad_id}) but no attention_mask was given: "
                "pass the tokenizer's attention_mask (or attention_mask=torch.ones_like(input_ids) "
                "if that id is a real token here)."
            )
        mask = torch.ones_like(input_ids)
    mask = _as_id_tensor(mask, "attention_mask")
    if mask.dim() == 1:
        mask = mask.unsqueeze(0)
    if mask.shape != input_ids.shape:
        raise InputError(
            f"attention_mask has shape {list(mask.shape)} but input_ids has {list(input_ids.shape)}."
        )
    _check_values(input_ids, mask, model)
    kwargs["attention_mask"] = mask
    prepare_multimodal(kwargs, model, accepted)
    _add_padded_positions(kwargs, model, accepted)
    prepared = TextBatch(
        {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    )
    prepared.text_layout, prepared.text_missing = layout, missing
    return prepared


def _add_padded_positions(
    kwargs: dict[str, Any], model: nn.Module, accepted: frozenset, always: bool = False
) -> None:
    """Under padding, ``position_ids`` counted over each row's real tokens (unless given, or
    the model derives its own), so a padded row computes exactly what it computes alone.
    ``always``: also without padding (the positions the model would count itself; the
    compiled path keeps one set of inputs, as a new set would compile a new graph)."""
    mask = kwargs["attention_mask"]
    if (
        (always or not bool(mask.bool().all()))
        and "position_ids" in accepted
        and kwargs.get("position_ids") is None
        and not computes_own_positions(accepted)
    ):
        position_ids = mask.long().cumsum(-1) - 1 + first_position(model)
        kwargs["position_ids"] = position_ids.masked_fill(mask == 0, 1)


def _check_all_strings(texts: str | list) -> None:
    """A list of prompts holds only strings (a tokenizer's own error would not say which)."""
    for index, text in enumerate(texts if isinstance(texts, list) else [texts]):
        if not isinstance(text, str):
            raise InputError(
                f"item {index} of a list of strings is a {type(text).__name__} ({text!r:.80}); "
                "pass a list of strings, or one tokenized batch."
            )


def _as_id_tensor(value: Any, name: str) -> torch.Tensor:
    """``value`` (a tensor or nested lists) as a tensor; ragged lists raise naming ``name``."""
    try:
        return torch.as_tensor(value)
    except (ValueError, TypeError) as error:
        raise InputError(
            f"{name} is not a rectangular batch ({error}); tokenize with padding=True "
            "(and return_tensors='pt')."
        ) from None


def _check_values(input_ids: torch.Tensor, mask: torch.Tensor, model: nn.Module) -> None:
    """Integer ids inside the vocabulary, and a mask of 0s and 1s (position ids are counted
    from it: a 2 would shift every later position)."""
    if input_ids.is_floating_point() or input_ids.dtype == torch.bool or input_ids.is_complex():
        raise InputError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}.")
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(embeddings, "num_embeddings", None)
    if input_ids.numel() and vocab is not None:
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= vocab:
            bad = low if low < 0 else high
            raise InputError(
                f"input_ids holds token id {bad}, outside this model's vocabulary "
                f"(valid ids: 0..{vocab - 1})."
            )
    empty = torch.nonzero(mask.sum(1) == 0).flatten().tolist() if mask.dim() == 2 else []
    if mask.shape[-1] == 0 or empty:
        raise InputError(
            f"example {empty[0] if empty else 0} has no tokens (an empty string?); every example "
            "needs at least one real token."
        )
    if mask.numel() and not bool(((mask == 0) | (mask == 1)).all()):
        found = sorted({float(v) for v in mask.unique().tolist()} - {0.0, 1.0})[:3]
        raise InputError(
            f"attention_mask must hold only 0 (padding) and 1 (real token), found {found}."
        )


def to_left_padding(model_inputs: dict[str, Any]) -> dict[str, Any]:
    """``model_inputs`` with every row's padding moved to the left (generation appends new
    tokens on the right, so a right-padded prompt would continue after its pad tokens).

    Every ``[batch, seq]`` tensor that lines up with the attention mask (``input_ids``,
    ``token_type_ids``, ...) is rotated the same way; a batch already left-padded is returned
    as is.

    Raises:
        InputError: when a row's real tokens are not one contiguous run (no padding side).
    """
    mask = model_inputs.get("attention_mask")
    if mask is None or mask.dim() != 2 or bool(mask[:, -1].bool().all()):
        return model_inputs
    real = mask.bool()
    seq = real.shape[1]
    count = real.sum(1)
    last = seq - 1 - real.flip(1).int().argmax(1)  # last real token of each row
    first = real.int().argmax(1)
    if bool(((last - first + 1) != count)[count > 0].any()):
        raise InputError(
            "an attention_mask row has padding inside the prompt (its real tokens are not one "
            "contiguous run), so there is no side to pad on; pass left- or right-padded prompts."
        )
    shift = (seq - 1 - last).unsqueeze(1)  # how far each row moves right
    index = (torch.arange(seq, device=mask.device).unsqueeze(0) - shift) % seq
    out = copy.copy(model_inputs)  # a TextBatch keeps its text layout (in real-token terms)
    for key, value in model_inputs.items():
        if isinstance(value, torch.Tensor) and value.shape[:2] == mask.shape:
            gather = index.view(*index.shape, *[1] * (value.dim() - 2)).expand_as(value)
            out[key] = value.gather(1, gather.to(value.device))
    return out
