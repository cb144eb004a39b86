"""The classic analyses of a circuits tutorial: residual decomposition, the final norm as a frozen
linear map, direct logit attribution (DLA) and head detectors.

Everything here runs hookscope extractions (``hm.forward``), batched with padding, at the target
positions; nothing installs hooks of its own.

**Decomposition.** The residual stream entering layer ``L`` (the final residual for
``layer=None``) is the sum of what each part wrote, in order: ``embed`` (the input embeddings,
after any embedding scaling; GPT-2 splits it into ``embed`` and ``pos_embed``), then per layer
what attention adds and what the MLP adds. What a sub-block *adds* is ``attn_out_{l}`` /
``mlp_out_{l}`` on pre-norm families (parallel-residual ones included), and the post-norm outputs
``attn_out_post_norm_{l}`` / ``mlp_out_post_norm_{l}`` on sandwich-norm families (Gemma2/3,
OLMo2). With ``per_head=True`` attention is split into ``head_out_L{l}H{h}`` plus the output
projection's bias ``attn_bias_{l}`` (families with one: GPT-2, GPT-NeoX); on sandwich-norm
families each head goes through the post-attention norm frozen at the statistics of the whole
``attn_out_{l}`` (see below), so the heads still sum exactly to what attention adds.

**The frozen norm.** A norm ``y = g * (x - centre(x)) * s(x) + b`` with
``s(x) = 1 / sqrt(mean((x - centre(x))^2) + eps)`` is linear in ``x`` once ``s`` is fixed. DLA
fixes ``s`` at the statistics of the full residual and maps each component ``c`` to
``g * (c - centre(c)) * s(x)``: RMSNorm (no centring, no bias), LayerNorm (centring, bias), and
Gemma's ``1 + weight`` RMSNorm (``g = 1 + weight``). The components' images then sum to
``norm(x) - b`` exactly; the bias ``b`` is a constant term, not attributed to any component. This
is the standard DLA approximation: the scale is frozen, so a component's attribution is what it
contributes *given* the other components, not what removing it would change.

**Attribution.** Through the unembedding ``W_U`` (``[vocab, d_model]``, bias ``u``):
``logit[t] = W_U[t] . norm(x) + u[t]``, so ``sum_i attr_i = logit[t] - W_U[t] . b - u[t]``
(``LogitAttribution.constant`` holds ``W_U[t] . b + u[t]``), and for a logit difference the
differences of each. Families with final logit softcapping (Gemma2) attribute the logit *before*
the cap (``cap * atanh(logit / cap)``): the cap is not linear.

**Head detectors.** Previous-token, duplicate-token and induction scores of every head, from the
attention patterns hookscope reads under the model's own kernel (no switch to eager).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .config import ExtractionConfig
from .errors import HookscopeError
from .points import point_key
from .positions import normalize_items, resolve_positions

# -- the frozen final norm ---------------------------------------------------------------------


@dataclass
class FrozenNorm:
    """A norm as a linear map with its scale frozen (see the module docstring).

    Attributes:
        centre: True for LayerNorm (subtract the mean over ``d_model``), False for RMSNorm.
        gain: ``[d_model]`` effective gain (Gemma: ``1 + weight``), or None (no weight).
        bias: ``[d_model]``, or None: the constant term the components do not carry.
        eps: the norm's epsilon.
    """

    centre: bool
    gain: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float

    def scale(self, total: torch.Tensor) -> torch.Tensor:
        """``total [..., d_model]`` -> ``[..., 1]``, the norm's ``1 / sqrt(var + eps)``."""
        x = total.float()
        if self.centre:
            x = x - x.mean(-1, keepdim=True)
        return (x.pow(2).mean(-1, keepdim=True) + self.eps).rsqrt()

    def apply(self, components: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
        """``components [n, ..., d_model]`` through the norm frozen at ``total [..., d_model]``
        (the sum of the components): ``[n, ..., d_model]`` float32, summing to
        ``norm(total) - bias``."""
        c = components.float()
        if self.centre:
            c = c - c.mean(-1, keepdim=True)
        out = c * self.scale(total)
        return out * self.gain.float().to(out.device) if self.gain is not None else out

    def __call__(self, total: torch.Tensor) -> torch.Tensor:
        """The norm itself on ``total [..., d_model]`` (float32)."""
        out = self.apply(total.unsqueeze(0), total)[0]
        return out + self.bias.float().to(out.device) if self.bias is not None else out


def frozen_norm(module: torch.nn.Module, probe: torch.Tensor) -> FrozenNorm:
    """The :class:`FrozenNorm` of ``module`` (an RMSNorm, a LayerNorm or Gemma's ``1 + weight``
    RMSNorm), checked against the module's own output on ``probe [..., d_model]``.

    Raises:
        HookscopeError: when no form matches the module's output (a norm of another kind).
    """
    eps = next(
        (
            float(getattr(module, n))
            for n in ("variance_epsilon", "eps", "epsilon")
            if isinstance(getattr(module, n, None), float)
        ),
        1e-5,
    )
    name = type(module).__name__
    centre = isinstance(module, torch.nn.LayerNorm) or (
        "layernorm" in name.lower() and "rms" not in name.lower()
    )
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    gains = [None] if weight is None else [weight.detach(), 1 + weight.detach().float()]
    dtype = probe.dtype if weight is None else weight.dtype
    with torch.no_grad():
        expected = module(probe.to(dtype)).float()
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2  # a half-precision norm rounds
    for gain in gains:
        norm = FrozenNorm(centre, gain, None if bias is None else bias.detach(), eps)
        if (norm(probe) - expected).abs().max() <= tolerance * (1 + expected.abs().max()):
            return norm
    raise HookscopeError(
        f"the norm {name} is not an RMSNorm, a LayerNorm or Gemma's 1+weight RMSNorm "
        f"(none of these forms reproduces its output), so it cannot be frozen into a linear map."
    )


# -- residual decomposition --------------------------------------------------------------------


@dataclass
class ResidualDecomposition:
    """What each component wrote into the residual stream at the target positions.

    Attributes:
        components: ``[n_components, batch, P, d_model]`` float32, in model order.
        labels: the label of each component (``embed``, ``attn_out_3``, ``head_out_L3H1``, ...).
        layer_of: the layer of each component (-1 for the embeddings).
        residual: ``[batch, P, d_model]`` float32, the residual stream they sum to (the input of
            layer ``layer``; the final residual when ``layer == n_layers``).
        layer: the layer whose input is decomposed.
        position_mask: ``[batch, P]`` bool, False at the padded slots.
        tokens: per example, the string of each target position.
    """

    components: torch.Tensor
    labels: list[str]
    layer_of: list[int]
    residual: torch.Tensor
    layer: int
    position_mask: torch.Tensor
    tokens: list[list[str]]

    def accumulated(self) -> torch.Tensor:
        """``[layer + 1, batch, P, d_model]``: row ``l`` is the residual entering layer ``l``
        (row 0 the embeddings; the last row is :attr:`residual`)."""
        layer_of = torch.tensor(self.layer_of)
        return torch.stack(
            [self.components[layer_of < bound].sum(0) for bound in range(0, self.layer + 1)]
        )

    def __getitem__(self, label: str) -> torch.Tensor:
        """The component ``label`` ``[batch, P, d_model]``."""
        if label not in self.labels:
            raise HookscopeError(f"no component {label!r}; components: {self.labels}")
        return self.components[self.labels.index(label)]


def _layer_plan(hm: Any, layers: list[int], per_head: bool) -> ExtractionConfig:
    sandwich = hm.model_map.spec.attn_out_norm is not None
    return ExtractionConfig(
        extract_embed=True,
        extract_resid_out=bool(layers),
        extract_attn_out=True,
        extract_attn_out_post_norm=sandwich,
        extract_mlp_out_post_norm=sandwich,
        extract_mlp_out=not sandwich,
        extract_head_out=per_head,
        layers=layers or [0],
    )


def _output_bias(hm: Any, layer: int) -> torch.Tensor | None:
    o_proj = hm.model_map.attention_child(layer, hm.model_map.spec.o_proj, "output projection")
    bias = getattr(o_proj, "bias", None)
    return None if bias is None else bias.detach().float()


def _attention_parts(
    hm: Any, cache: Any, layer: int, per_head: bool
) -> list[tuple[str, torch.Tensor]]:
    """What attention adds in ``layer``: one ``(label, [batch, P, d_model])`` or one per head
    plus the output bias (through the frozen post-attention norm on sandwich-norm families)."""
    post_norm = hm.model_map.layers[layer].attn_out_norm
    if not per_head:
        kind = "attn_out" if post_norm is None else "attn_out_post_norm"
        return [(point_key(kind, layer), cache[point_key(kind, layer)].float())]
    parts = [
        (point_key("head_out", layer, h), cache[point_key("head_out", layer, h)].float())
        for h in range(hm.model_map.n_heads)
    ]
    bias = _output_bias(hm, layer)
    if bias is not None:
        shape = parts[0][1].shape
        parts.append((f"attn_bias_{layer}", bias.to(parts[0][1].device).expand(shape)))
    if post_norm is not None:
        attn_out = cache[point_key("attn_out", layer)]
        frozen = frozen_norm(post_norm, attn_out)
        mapped = frozen.apply(torch.stack([p for _, p in parts]), attn_out)
        parts = [(label, m) for (label, _), m in zip(parts, mapped, strict=True)]
    return parts


def _embedding_parts(hm: Any, cache: Any, ids: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """``embed`` (and ``pos_embed`` for absolute position embeddings, GPT-2's ``wpe``)."""
    embeddings = cache["input_embeddings"].float()
    if getattr(hm.model_map.decoder, "wpe", None) is None:
        return [("embed", embeddings)]
    with torch.no_grad():
        token = hm.model_map.embed(ids.to(hm.model_map.embed.weight.device)).float()
    token = token.to(embeddings.device)
    return [("embed", token), ("pos_embed", embeddings - token)]


def _position_items(target_token_positions: Any) -> list[Any]:
    """One position item (``"last"``, ``3``) or a list of items -> a list of items."""
    if isinstance(target_token_positions, str | int):
        return [target_token_positions]
    return list(target_token_positions)


def decompose_resid(
    hm: Any,
    inputs: Any,
    target_token_positions: Sequence[Any] = ("last",),
    layer: int | None = None,
    per_head: bool = False,
) -> ResidualDecomposition:
    """Decompose the residual stream entering ``layer`` (``None``: the final residual, what the
    final norm reads) at the target positions into what each component wrote.

    Args:
        inputs: strings, token ids or a tokenized batch (padded left or right).
        layer: ``0..n_layers``; ``n_layers`` or None is the final residual.
        per_head: split attention into heads (plus the output projection's bias).

    Returns:
        a :class:`ResidualDecomposition` whose components sum to ``residual``.

    Raises:
        HookscopeError: for a layer out of range.
    """
    n_layers = hm.model_map.n_layers
    layer = n_layers if layer is None else layer
    if not 0 <= layer <= n_layers:
        raise HookscopeError(f"layer {layer} is out of range: choose 0..{n_layers} (or None).")
    model_inputs = hm.prepare_inputs(inputs)
    layers = list(range(layer))
    items = _position_items(target_token_positions)
    cache = hm.forward(model_inputs, items, extraction_config=_layer_plan(hm, layers, per_head))
    positions = resolve_positions(
        normalize_items(items),
        model_inputs["attention_mask"],
        model_inputs["input_ids"],
    )
    ids = model_inputs["input_ids"].gather(1, positions.index.to(model_inputs["input_ids"].device))
    parts = _embedding_parts(hm, cache, ids)
    layer_of = [-1] * len(parts)
    for current in layers:
        block = _attention_parts(hm, cache, current, per_head)
        mlp = (
            "mlp_out" if hm.model_map.layers[current].mlp_out_norm is None else "mlp_out_post_norm"
        )
        block.append((point_key(mlp, current), cache[point_key(mlp, current)].float()))
        parts += block
        layer_of += [current] * len(block)
    residual = cache[f"resid_out_{layer - 1}"] if layer else cache["input_embeddings"]
    return ResidualDecomposition(
        components=torch.stack([p.to(residual.device) for _, p in parts]),
        labels=[label for label, _ in parts],
        layer_of=layer_of,
        residual=residual.float(),
        layer=layer,
        position_mask=positions.mask.to(residual.device),
        tokens=[
            [t if real else "" for t, real in zip(row, m.tolist(), strict=True)]
            for row, m in zip(hm.to_string_tokens(ids), positions.mask, strict=True)
        ],
    )


# -- direct logit attribution ------------------------------------------------------------------


@dataclass
class LogitAttribution:
    """Each component's direct contribution to a logit, a logit difference or a direction.

    Attributes:
        values: ``[n_components, batch, P]`` float32; they sum to :attr:`total`.
        labels: the label of each component (as in :class:`ResidualDecomposition`).
        total: ``[batch, P]``, the sum of the attributions: the model's logit (difference)
            minus :attr:`constant` (before any final logit softcapping).
        constant: ``[batch, P]``, the terms no component carries: the final norm's bias
            through the direction plus the unembedding bias of the answer (minus the other's).
        position_mask: ``[batch, P]`` bool; tokens: the string of each target position.
        layer_of: the layer of each component (-1 for the embeddings).
        n_heads: the heads per layer when the attribution is per head, else None.
    """

    values: torch.Tensor
    labels: list[str]
    layer_of: list[int]
    total: torch.Tensor
    constant: torch.Tensor
    position_mask: torch.Tensor
    tokens: list[list[str]]
    n_heads: int | None = None

    def mean(self) -> torch.Tensor:
        """``[n_components]``: the attribution averaged over the real target slots."""
        mask = self.position_mask.to(self.values.device).float()
        return (self.values * mask).sum((1, 2)) / mask.sum().clamp(min=1)

    def top(
        self, k: int = 10, example: int | None = None, position: int = -1
    ) -> list[tuple[str, float]]:
        """The ``k`` components of largest absolute attribution, ``(label, value)``: at one
        example and target slot, or averaged over all real slots (``example=None``)."""
        values = self.mean() if example is None else self.values[:, example, position]
        order = values.abs().argsort(descending=True)[:k]
        return [(self.labels[i], float(values[i])) for i in order]

    def heads(self) -> torch.Tensor:
        """``[n_layers, n_heads]``: each head's attribution averaged over the real slots."""
        if self.n_heads is None:
            raise HookscopeError(
                "this attribution is per layer: call logit_attribution(..., per_head=True)."
            )
        mean = self.mean()
        rows = [mean[i] for i, label in enumerate(self.labels) if label.startswith("head_out_")]
        return torch.stack(rows).reshape(-1, self.n_heads)

    def __str__(self) -> str:
        lines = [f"{'component':<20} {'attribution':>11}"]
        lines += [f"{label:<20} {value:>+11.3f}" for label, value in self.top(8)]
        return "\n".join(lines)

    def plot(self, path: Any = None) -> Any:
        """A heatmap (:func:`hookscope.plot.heatmap_figure`) of the mean attribution: layers x
        heads when per head, else layers x (attention, MLP); saved as PNG when ``path`` is given.
        The embeddings' share is in the title."""
        from .plot import heatmap_figure

        mean = self.mean()
        embed = sum(float(mean[i]) for i, at in enumerate(self.layer_of) if at < 0)
        if self.n_heads is not None:
            grid, columns = self.heads(), [f"H{h}" for h in range(self.n_heads)]
        else:
            n_layers = max(self.layer_of) + 1
            grid = torch.zeros(n_layers, 2)
            for i, (label, at) in enumerate(zip(self.labels, self.layer_of, strict=True)):
                if at >= 0:
                    grid[at, 1 if label.startswith("mlp_out") else 0] += mean[i]
            columns = ["attention", "MLP"]
        return heatmap_figure(
            grid,
            list(range(grid.shape[0])),
            columns,
            f"direct logit attribution (embeddings {embed:+.3f})",
            "head" if self.n_heads is not None else "component",
            "layer",
            "attribution",
            path=path,
            diverging=True,
        )


def _token_ids(hm: Any, answer: Any, batch: int) -> torch.Tensor:
    """An answer (a token id, a one-token string, or one per example) -> ``[batch]`` ids."""
    if isinstance(answer, torch.Tensor) and answer.dim() == 0:
        answer = int(answer)
    if isinstance(answer, int | str):
        answer = [answer] * batch
    if len(answer) != batch:
        raise HookscopeError(f"{len(answer)} answers for {batch} examples: give one per example.")
    ids = []
    for item in answer:
        if isinstance(item, str):
            encoded = hm.get_text_tokenizer()(item, add_special_tokens=False)["input_ids"]
            if len(encoded) != 1:
                raise HookscopeError(
                    f"the answer {item!r} is {len(encoded)} tokens {encoded}: give one token "
                    "(a string of one token, or its id)."
                )
            item = encoded[0]
        ids.append(int(item))
    return torch.tensor(ids)


def _directions(
    hm: Any, answer: Any, against: Any, batch: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``([batch, d_model] direction after the final norm, [batch] unembedding-bias term)``."""
    unembed = hm.hf_model.get_output_embeddings()
    if unembed is None:
        raise HookscopeError(f"{type(hm.hf_model).__name__} has no output embeddings: no DLA.")
    weight = unembed.weight.detach().float()
    bias = getattr(unembed, "bias", None)
    d_model = weight.shape[1]
    if isinstance(answer, torch.Tensor) and answer.is_floating_point():
        rows_ok = answer.dim() == 1 or (answer.dim() == 2 and answer.shape[0] == batch)
        if against is not None or answer.shape[-1] != d_model or not rows_ok:
            raise HookscopeError(
                f"a direction is a float tensor [d_model={d_model}] or [batch={batch}, d_model] with no "
                f"'against'; got shape {tuple(answer.shape)}."
            )
        return answer.float().to(weight.device).expand(batch, d_model), torch.zeros(batch)
    ids = _token_ids(hm, answer, batch).to(weight.device)
    direction, constant = weight[ids], torch.zeros(batch, device=weight.device)
    if bias is not None:
        constant = constant + bias.detach().float()[ids]
    if against is not None:
        other = _token_ids(hm, against, batch).to(weight.device)
        direction = direction - weight[other]
        if bias is not None:
            constant = constant - bias.detach().float()[other]
    return direction, constant.cpu()


def logit_attribution(
    hm: Any,
    inputs: Any,
    answer: Any,
    against: Any = None,
    target_token_positions: Sequence[Any] = ("last",),
    per_head: bool = False,
) -> LogitAttribution:
    """Direct logit attribution of every component of the final residual at the target positions.

    Args:
        answer: the logit to explain: a token id or one-token string, one per example (a list),
            or a float direction ``[d_model]`` / ``[batch, d_model]`` in the space after the
            final norm (then no ``against``).
        against: the token (or one per example) whose logit is subtracted: a logit difference.
        per_head: one component per head of every layer (plus output biases).

    Returns:
        a :class:`LogitAttribution` whose values sum to the model's logit (difference) minus
        its :attr:`~LogitAttribution.constant` (see the module docstring).
    """
    decomposition = decompose_resid(hm, inputs, target_token_positions, per_head=per_head)
    batch = decomposition.residual.shape[0]
    direction, unembed_constant = _directions(hm, answer, against, batch)
    norm = frozen_norm(hm.model_map.final_norm, decomposition.residual)
    mapped = norm.apply(decomposition.components, decomposition.residual)
    direction = direction.to(mapped.device)
    values = torch.einsum("nbpd,bd->nbp", mapped, direction)
    constant = unembed_constant.to(mapped.device)[:, None].expand(values.shape[1:])
    if norm.bias is not None:
        norm_term = direction @ norm.bias.float().to(mapped.device)
        constant = constant + norm_term[:, None]
    return LogitAttribution(
        values=values,
        labels=decomposition.labels,
        layer_of=decomposition.layer_of,
        total=values.sum(0),
        constant=constant.clone(),
        position_mask=decomposition.position_mask,
        tokens=decomposition.tokens,
        n_heads=hm.model_map.n_heads if per_head else None,
    )


# -- head detectors ----------------------------------------------------------------------------

DETECTORS = ("previous_token", "duplicate_token", "induction")


@dataclass
class HeadScores:
    """Per-head detector scores, pooled over every scored query of every example.

    Each score is the attention mass a head puts, averaged over the query positions that have a
    target, on: the previous token (``previous_token``); earlier copies of the query's token
    (``duplicate_token``); the tokens right after earlier copies of the query's token
    (``induction``; a query's own position is never a target).

    Attributes:
        scores: detector name -> ``[n_layers, n_heads]`` float32 in ``[0, 1]``.
        queries: detector name -> how many (example, query) pairs were scored.
    """

    scores: dict[str, torch.Tensor]
    queries: dict[str, int] = field(default_factory=dict)

    def __getitem__(self, detector: str) -> torch.Tensor:
        if detector not in self.scores:
            raise HookscopeError(f"no detector {detector!r}; detectors: {list(self.scores)}")
        return self.scores[detector]

    def top(self, detector: str, k: int = 5) -> list[tuple[int, int, float]]:
        """The ``k`` highest-scoring heads as ``(layer, head, score)``."""
        scores = self[detector]
        order = scores.flatten().argsort(descending=True)[:k]
        n_heads = scores.shape[1]
        return [(int(i) // n_heads, int(i) % n_heads, float(scores.flatten()[i])) for i in order]

    def __str__(self) -> str:
        lines = []
        for detector in self.scores:
            heads = ", ".join(
                f"L{layer}H{head} {score:.2f}" for layer, head, score in self.top(detector, 3)
            )
            lines.append(f"{detector:<16} {heads}")
        return "\n".join(lines)


def repeated_random_tokens(
    hm: Any, n_examples: int = 8, length: int = 20, seed: int = 0
) -> dict[str, torch.Tensor]:
    """``n_examples`` sequences of ``length`` random tokens repeated twice, after the BOS token
    when the tokenizer has one: ``{"input_ids", "attention_mask"}`` ``[n_examples, seq]``.
    Special tokens are never drawn."""
    tokenizer = hm.get_text_tokenizer()
    vocab = hm.hf_model.get_output_embeddings().weight.shape[0]
    allowed = torch.ones(min(vocab, len(tokenizer)), dtype=torch.bool)
    allowed[[i for i in tokenizer.all_special_ids if i < len(allowed)]] = False
    pool = allowed.nonzero().flatten()
    generator = torch.Generator().manual_seed(seed)
    half = pool[torch.randint(len(pool), (n_examples, length), generator=generator)]
    ids = torch.cat([half, half], 1)
    if tokenizer.bos_token_id is not None:
        ids = torch.cat([torch.full((n_examples, 1), tokenizer.bos_token_id), ids], 1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def detector_masks(input_ids: torch.Tensor, real: torch.Tensor) -> dict[str, torch.Tensor]:
    """``[batch, seq]`` ids and real-token mask -> detector name -> ``[batch, q, k]`` bool: the
    key positions each detector scores for each query (real tokens only, ``k < q``)."""
    seq = input_ids.shape[1]
    real = real.bool()
    q = torch.arange(seq)[:, None]
    k = torch.arange(seq)[None, :]
    both = real[:, :, None] & real[:, None, :] & (k < q)
    same = input_ids[:, :, None] == input_ids[:, None, :]
    # shifted[b, q, k] = same token at query q and at key k - 1 (a real key k - 1)
    shifted = torch.zeros_like(same)
    shifted[:, :, 1:] = same[:, :, :-1] & real[:, None, :-1]
    previous = real[:, None, :-1].new_zeros(same.shape)
    previous[:, 1:, :] = torch.eye(seq, dtype=torch.bool)[None, :-1, :].expand(len(real), -1, -1)
    return {
        "previous_token": both & previous,
        "duplicate_token": both & same,
        "induction": both & shifted,
    }


def _add_scores(
    hm: Any, chunk: dict[str, Any], sums: dict[str, torch.Tensor], counts: dict[str, int]
) -> None:
    """Add one batch's detector masses ``[n_layers, n_heads]`` to ``sums`` and its scored
    queries to ``counts``, from every head's pattern rows read under the model's own kernel."""
    config = ExtractionConfig(
        extract_attn_pattern=True, attn_pattern_all_keys=True, save_logits=False
    )
    cache = hm.forward(chunk, ["all"], extraction_config=config)
    ids, real = chunk["input_ids"].cpu(), chunk["attention_mask"].cpu()
    positions = resolve_positions(normalize_items(["all"]), real, ids)
    rows_real = positions.mask  # [batch, R]: the row is a real query
    query = positions.index.clamp(max=ids.shape[1] - 1)  # [batch, R] its absolute position
    targets, scored = {}, {}
    for name, mask in detector_masks(ids, real).items():
        # the mask at each row's query [batch, R, seq]; rows that score: a real query with a target
        targets[name] = mask.gather(1, query[..., None].expand(-1, -1, mask.shape[2]))
        scored[name] = targets[name].any(-1) & rows_real
        counts[name] += int(scored[name].sum())
    for layer in range(hm.model_map.n_layers):
        for head in range(hm.model_map.n_heads):
            pattern = cache[point_key("pattern", layer, head)].float().cpu()
            for name in DETECTORS:
                mass = (pattern * targets[name]).sum(-1)  # [batch, R]
                sums[name][layer, head] += mass[scored[name]].sum()


def detect_heads(hm: Any, inputs: Any = None, batch_size: int = 8) -> HeadScores:
    """Previous-token, duplicate-token and induction scores of every head (see
    :class:`HeadScores`), on ``inputs`` (strings or a tokenized batch; default:
    :func:`repeated_random_tokens`), batched by ``batch_size``, under the model's own kernel.

    Each batch holds every head's pattern, ``batch * n_layers * n_heads * seq^2`` floats: lower
    ``batch_size`` for long prompts."""
    if inputs is None:
        inputs = repeated_random_tokens(hm)
    model_inputs = hm.prepare_inputs(inputs)
    n_rows = model_inputs["input_ids"].shape[0]
    n_layers, n_heads = hm.model_map.n_layers, hm.model_map.n_heads
    sums = {name: torch.zeros(n_layers, n_heads) for name in DETECTORS}
    counts = dict.fromkeys(DETECTORS, 0)
    for start in range(0, n_rows, batch_size):
        chunk = {
            key: value[start : start + batch_size] if isinstance(value, torch.Tensor) else value
            for key, value in model_inputs.items()
        }
        _add_scores(hm, chunk, sums, counts)
    return HeadScores(
        scores={name: sums[name] / max(counts[name], 1) for name in DETECTORS},
        queries=counts,
    )
