"""Logit lens: read any residual-stream point with the model's own final norm and unembedding.

Each layer's residual is normalised with its own statistics (the final norm module applied to
it), exactly as the model normalises its last layer (Gemma's ``1 + weight``, GPT-2's LayerNorm
with bias), and the head's final logit softcapping is applied where the model has one. At the
last layer the lens is therefore the model's own logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .config import ExtractionConfig
from .errors import HookscopeError
from .points import parse_point
from .positions import normalize_items, resolve_positions
from .progress import ProgressBar, real_tokens


def lens_logits(hm: Any, residual: torch.Tensor) -> torch.Tensor:
    """``residual [..., d_model]`` -> logits ``[..., vocab]`` through the final norm and unembedding."""
    unembed = hm.hf_model.get_output_embeddings()
    if unembed is None:
        raise HookscopeError(
            f"{type(hm.hf_model).__name__} has no output embeddings: no logit lens."
        )
    with torch.no_grad():
        logits = unembed(hm.model_map.final_norm(residual))
    cap = getattr(hm.hf_model.config.get_text_config(), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


@dataclass
class LensResult:
    """Lens readouts of one batch.

    Attributes:
        logits: ``[layers, batch, P, vocab]`` (float32).
        layers: the layer of each row (the ``point`` of that layer, e.g. ``resid_out_{l}``).
        tokens: per example, the string of each target position.
        final: ``[batch, P, vocab]``, the model's own logits at the targets.
    """

    logits: torch.Tensor
    layers: list[int]
    tokens: list[list[str]]
    final: torch.Tensor
    point: str
    to_string: Any

    @property
    def probs(self) -> torch.Tensor:
        return self.logits.softmax(-1)

    def top_k(
        self, k: int = 5, example: int = 0, position: int = -1
    ) -> list[list[tuple[str, float]]]:
        """Per layer, the k most likely tokens ``(string, probability)`` at one position."""
        vocab, (_, examples, slots) = self.logits.shape[-1], self.logits.shape[:3]
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= vocab:
            raise HookscopeError(
                f"top_k: k must be an int in 0..{vocab} (the vocabulary), got {k!r}."
            )
        if not -examples <= example < examples or not -slots <= position < slots:
            raise HookscopeError(
                f"top_k: example {example!r} / position {position!r} out of range: the lens holds "
                f"{examples} example(s) x {slots} position slot(s)."
            )
        probs = self.probs[:, example, position]
        values, ids = probs.topk(k, dim=-1)
        return [
            list(zip(self.to_string(ids[row].tolist()), values[row].tolist(), strict=True))
            for row in range(len(self.layers))
        ]

    def rank(self, token_id: int) -> torch.Tensor:
        """``[layers, batch, P]``: 1 + how many tokens score above ``token_id``."""
        token_id = self._token(token_id)
        chosen = self.logits[..., token_id : token_id + 1]
        return (self.logits > chosen).sum(-1) + 1

    def prob(self, token_id: int) -> torch.Tensor:
        """``[layers, batch, P]`` probability of ``token_id``."""
        return self.probs[..., self._token(token_id)]

    def logit(self, token_id: int) -> torch.Tensor:
        """``[layers, batch, P]`` logit of ``token_id``."""
        return self.logits[..., self._token(token_id)]

    def _token(self, token_id: int) -> int:
        """``token_id`` checked against the vocabulary (a negative id would index from its end)."""
        vocab = self.logits.shape[-1]
        if isinstance(token_id, bool) or not isinstance(token_id, int) or not 0 <= token_id < vocab:
            raise HookscopeError(
                f"token id {token_id!r} is not in this vocabulary (valid ids: 0..{vocab - 1})."
            )
        return token_id

    def summary(self, example: int = 0, k: int = 3, target: int | None = None, **context: Any):
        """What a report shows of one example (top-k tokens per layer and position, KL, the
        ``target`` token id's probability and rank), small enough to save: a
        :class:`hookscope.results.LensSummary`; ``context`` (``prompt=``, ``model=``) names it."""
        from .results import lens_summary

        return lens_summary(self, example=example, k=k, target=target, context=context)

    def save(self, path: Any, example: int = 0, k: int = 3, target: int | None = None, **context):
        """Write :meth:`summary` as JSON (``hookscope report`` renders it); returns the path."""
        from .results import save_lens

        return save_lens(self.summary(example, k, target, **context), path)

    def _repr_html_(self) -> str:
        from .report import notebook_view

        return notebook_view(self)

    def kl_to_final(self) -> torch.Tensor:
        """``[layers, batch, P]``: KL(final || layer), how far each layer's readout is from the
        model's output distribution."""
        final = self.final.float().log_softmax(-1)
        layer = self.logits.log_softmax(-1)
        return (final.exp() * (final - layer)).sum(-1)


def logit_lens(
    hm: Any,
    inputs: Any,
    target_token_positions: Sequence[Any] = ("last",),
    layers: Sequence[int] | None = None,
    point: str = "resid_out",
    batch_size: int | None = None,
    progress: bool = False,
) -> LensResult:
    """Run ``inputs`` and read ``point`` (``resid_out``, ``resid_mid``, ``resid_in``) of every
    layer through the lens at the target positions.

    ``inputs`` run as one batch; with ``batch_size``, a list of prompts runs ``batch_size`` at a
    time (with a progress bar when ``progress``), and the target positions must select the
    same number of slots in every batch (``"last"``, ``0``, ``-2``; not ``"all"``)."""
    flags = {
        "resid_out": "extract_resid_out",
        "resid_mid": "extract_resid_mid",
        "resid_in": "extract_resid_in",
    }
    if point not in flags:
        raise HookscopeError(
            f"the logit lens reads residual points {sorted(flags)}, got {point!r}."
        )
    items = normalize_items(  # "last" is one item, not the letters l, a, s, t
        list(target_token_positions)
        if isinstance(target_token_positions, tuple)
        else target_token_positions
    )
    config = ExtractionConfig(**{flags[point]: True}, layers=layers)
    parts = [
        _lens_batch(hm, batch, items, config, point)
        for batch in _lens_batches(hm, inputs, batch_size, progress)
    ]
    widths = {part.logits.shape[2] for part in parts}
    if len(widths) > 1:
        raise HookscopeError(
            f"logit_lens(batch_size={batch_size}): the positions {items!r} select a different "
            f"number of slots in different batches ({sorted(widths)}); use positions every "
            "prompt has the same number of (e.g. 'last', 0), or batch_size=None."
        )
    return LensResult(
        logits=torch.cat([part.logits for part in parts], 1),
        layers=parts[0].layers,
        tokens=[row for part in parts for row in part.tokens],
        final=torch.cat([part.final for part in parts], 0),
        point=point,
        to_string=hm.to_string_tokens,
    )


def _lens_batches(hm: Any, inputs: Any, batch_size: int | None, progress: bool):
    """The model inputs of each batch: ``inputs`` whole, or a list of prompts in chunks."""
    if batch_size is None:
        yield hm.prepare_inputs(inputs)
        return
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise HookscopeError(f"batch_size must be a positive int or None, got {batch_size!r}.")
    if not isinstance(inputs, list) or not all(isinstance(text, str) for text in inputs):
        raise HookscopeError(
            "logit_lens(batch_size=...) batches a list of prompts; pass one batch with "
            "batch_size=None."
        )
    with ProgressBar(len(inputs), "logit lens", progress, unit="ex") as bar:
        for start in range(0, len(inputs), batch_size):
            batch = hm.prepare_inputs(inputs[start : start + batch_size])
            yield batch
            bar.update(len(batch["input_ids"]), real_tokens(batch))


def _lens_batch(hm: Any, model_inputs: dict, items: list, config: Any, point: str) -> LensResult:
    """The lens of one batch (``logits [layers, batch, P, vocab]``)."""
    cache = hm.forward(model_inputs, items, extraction_config=config)
    chosen = sorted(parse_point(key).layer for key in cache if key.startswith(point + "_"))
    positions = resolve_positions(
        items,
        model_inputs["attention_mask"],
        model_inputs["input_ids"],
    )
    ids = model_inputs["input_ids"].gather(1, positions.index.to(model_inputs["input_ids"].device))
    tokens = [
        [
            text if real else ""
            for text, real in zip(hm.to_string_tokens(row_ids), row_mask.tolist(), strict=True)
        ]
        for row_ids, row_mask in zip(ids, positions.mask, strict=True)
    ]
    return LensResult(
        logits=lens_logits(hm, cache.stack(point)).float(),  # in the model's dtype, as it does
        layers=chosen,
        tokens=tokens,
        final=cache["logits"],
        point=point,
        to_string=hm.to_string_tokens,
    )
