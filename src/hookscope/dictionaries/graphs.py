"""Toward attribution graphs: direct effects of transcoder features, error nodes and token
embeddings on targets (logits, transcoder features) in the *frozen replacement model*.

A first working version of ``docs/attribution-graphs.md`` (read it for the design). One call of
the model, with:

- every MLP of a layer with a transcoder replaced by ``a @ W_dec / input_scale + error``, where
  ``a`` (the transcoder's features on the MLP's input) and ``error`` (the MLP's real output minus
  ``a @ W_dec / input_scale``, so it holds ``b_dec``) are **leaves**: the forward is the model's
  own, and no gradient runs through the MLP; the MLP of a layer without a transcoder is one
  error leaf (its whole output), so the edges stay exact whatever layers have transcoders;
- every norm frozen (``y = g * (x - centre(x)) * s + b`` with ``s`` detached:
  :class:`hookscope.analysis.FrozenNorm`) and every attention pattern frozen
  (``PatternEdit(op="freeze")``): the map from the leaves to a logit is then linear;
- the token embeddings as a leaf.

A **target** is one scalar per row: a logit at the example's last real token, de-meaned over the
vocabulary (``logit_t - mean_v logit_v``), or a transcoder feature's pre-activation at a position.
One ``autograd.grad`` of the sum of the rows' targets gives every row's gradient at every leaf
(rows do not interact), and the **edge** from a source to the row's target is ``leaf * grad``
summed over the leaf's width: ``a_s * (W_dec[s] / input_scale . g)`` for a feature.

**Completeness** (what makes the edges exact): a target equals the sum of its edges, counting
the additive parameters (biases of linear layers and norms, learned position embeddings) as
per-row leaves too, plus a constant for a feature target (its encoder bias:
``b_enc[i] - b_dec . W_enc[:, i]`` with ``subtract_decoder_bias``). Final logit softcapping
(Gemma2) is not linear: a logit target is the logit before the cap, ``cap * atanh(logit / cap)``.
Checked on Llama, Qwen2 (attention biases), Gemma2 (sandwich norms, softcapping), GPT-2
(LayerNorm, Conv1D, learned positions) and GPT-NeoX (parallel residual).

Rows are (example, target) pairs, mixed in batches: one forward and one backward serve
``batch_size`` of them. Limits of this first version: dense edge tables (``[rows, T, d_sae]`` per
layer), so small prompts and dictionaries; per-layer transcoders (no cross-layer ones); no
target selection or pruning (the graph of ``docs/attribution-graphs.md`` section 3 is built from
these rows).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..analysis import FrozenNorm, frozen_norm
from ..config import ExtractionConfig
from ..errors import HookscopeError
from ..hooks import ModuleHook, input_tensor, replacing_hook
from ..interventions import PatternEdit
from .core import Dictionary


@dataclass(frozen=True)
class LogitTarget:
    """The de-meaned logit of ``token`` at each example's last real token."""

    token: int


@dataclass(frozen=True)
class FeatureTarget:
    """The pre-activation of ``feature`` of the transcoder at ``layer``, at ``position`` (one
    position item, resolved per example: ``"last"``, an int, a text anchor)."""

    layer: int
    feature: int
    position: Any = "last"


@dataclass
class AttributionRows:
    """Edges into each (example, target) row of the frozen replacement model.

    Attributes:
        value: ``[examples, targets]``, each target's value (the real model's).
        constant: ``[examples, targets]``, the part of the value no source carries (a feature
            target's encoder bias).
        bias: ``[examples, targets]``, the edge from every additive parameter: the biases of
            linear layers and norms, and learned position embeddings (GPT-2's ``wpe``).
        embedding: ``[examples, targets, seq]``, the edge from each position's token embedding.
        features: ``{layer: [examples, targets, seq, d_sae]}``, ``a * grad`` per feature (0 where
            the feature is inactive).
        errors: ``{layer: [examples, targets, seq]}``, the edge from each error node, for
            every layer (a layer without a transcoder: its whole MLP output is the error node).
        attention_mask: ``[examples, seq]``, the batch's mask (edges at padding are 0).
        targets: the targets, in column order.
    """

    value: torch.Tensor
    constant: torch.Tensor
    bias: torch.Tensor
    embedding: torch.Tensor
    features: dict[int, torch.Tensor]
    errors: dict[int, torch.Tensor]
    attention_mask: torch.Tensor
    targets: list

    def total(self) -> torch.Tensor:
        """``[examples, targets]``: every edge plus the constant (equals :attr:`value`)."""
        total = self.embedding.sum(-1) + self.constant + self.bias
        for features in self.features.values():
            total = total + features.sum((-1, -2))
        for errors in self.errors.values():
            total = total + errors.sum(-1)
        return total


def attribution_rows(
    hm: Any,
    inputs: Any,
    transcoders: Mapping[int, Dictionary] | Sequence[Dictionary],
    targets: Sequence[LogitTarget | FeatureTarget],
    batch_size: int = 16,
) -> AttributionRows:
    """Edges from every embedding, transcoder feature, error node and bias into each target,
    for every example of ``inputs``.

    Each (example, target) pair is one row of a batch; a forward and one backward serve
    ``batch_size`` rows (different prompts and targets mixed), so the whole table costs
    ``ceil(examples x targets / batch_size)`` forwards and backwards.

    Args:
        hm: the HookedModel.
        inputs: a batch (padded left or right), text, or ids.
        transcoders: per layer (``{layer: Dictionary}`` or a list), each reading ``mlp_in_{l}``
            (the MLP module's input) and writing ``mlp_out_{l}`` (its output).
        targets: :class:`LogitTarget` / :class:`FeatureTarget` items, each scored on every
            example.
        batch_size: rows per forward.

    Returns:
        An :class:`AttributionRows`.
    """
    inputs = hm.prepare_inputs(inputs)
    by_layer = _transcoders_by_layer(transcoders, hm.model_map.n_layers)
    _check_targets(targets, by_layer, hm)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise HookscopeError(f"batch_size must be a positive int, got {batch_size!r}.")
    where = _target_positions(hm, inputs, targets)  # [examples, targets] absolute positions
    examples, n_targets = where.shape
    sites = [(e, k) for e in range(examples) for k in range(n_targets)]
    parts = []
    for start in range(0, len(sites), batch_size):
        chunk = sites[start : start + batch_size]
        rows = torch.tensor([e for e, _ in chunk])
        batch = {k: v[rows.to(v.device)] if torch.is_tensor(v) else v for k, v in inputs.items()}
        row_targets = [(targets[k], int(where[e, k])) for e, k in chunk]
        parts.append(_frozen_rows(hm, batch, by_layer, row_targets))

    def table(get) -> torch.Tensor:
        joined = torch.cat([get(part) for part in parts])
        return joined.view(examples, n_targets, *joined.shape[1:])

    return AttributionRows(
        value=table(lambda p: p["value"]),
        constant=table(lambda p: p["constant"]),
        bias=table(lambda p: p["bias"]),
        embedding=table(lambda p: p["embedding"]),
        features={layer: table(lambda p, at=layer: p["features"][at]) for layer in by_layer},
        errors={
            layer: table(lambda p, at=layer: p["errors"][at])
            for layer in range(hm.model_map.n_layers)
        },
        attention_mask=inputs["attention_mask"].cpu(),
        targets=list(targets),
    )


def _target_positions(hm: Any, inputs: dict, targets: Sequence[Any]) -> torch.Tensor:
    """``[examples, targets]``: the absolute position each target is read at (a feature
    target's item, resolved per example on the whole batch; -1 for logits: the last token)."""
    examples = inputs["input_ids"].shape[0]
    columns = []
    for target in targets:
        if isinstance(target, LogitTarget):
            columns.append(torch.full((examples,), -1, dtype=torch.long))
            continue
        positions = hm.position_context(inputs).resolve([target.position])
        if positions.index.shape[1] != 1 or not bool(positions.mask.all()):
            raise HookscopeError(
                f"FeatureTarget position {target.position!r} must select exactly one token in "
                "every example."
            )
        columns.append(positions.index[:, 0].cpu())
    return torch.stack(columns, 1)


def _transcoders_by_layer(transcoders: Any, n_layers: int) -> dict[int, Dictionary]:
    """``{layer: transcoder}``, each checked to read ``mlp_in_{l}`` and write ``mlp_out_{l}``."""
    items = transcoders.values() if isinstance(transcoders, Mapping) else transcoders
    by_layer: dict[int, Dictionary] = {}
    for dictionary in items:
        match = re.fullmatch(r"mlp_out_(\d+)", str(getattr(dictionary, "writes", "")))
        if not isinstance(dictionary, Dictionary) or match is None:
            raise HookscopeError(
                f"attribution graphs need transcoders writing mlp_out_{{l}}, got {dictionary!r:.80}."
            )
        layer = int(match[1])
        if dictionary.reads != f"mlp_in_{layer}" or not 0 <= layer < n_layers or layer in by_layer:
            raise HookscopeError(
                f"transcoder {dictionary.name!r} reads {dictionary.reads!r} and writes "
                f"{dictionary.writes!r}: a transcoder of layer l reads mlp_in_l and writes "
                f"mlp_out_l, l in 0..{n_layers - 1}, one per layer."
            )
        if isinstance(transcoders, Mapping) and [
            k for k, v in transcoders.items() if v is dictionary
        ] != [layer]:
            raise HookscopeError(
                f"transcoders[{[k for k, v in transcoders.items() if v is dictionary]}] writes "
                f"mlp_out_{layer}: key it by its layer."
            )
        by_layer[layer] = dictionary
    if not by_layer:
        raise HookscopeError("attribution graphs need at least one transcoder.")
    return by_layer


def _check_targets(targets: Sequence[Any], by_layer: dict[int, Dictionary], hm: Any) -> None:
    if not targets:
        raise HookscopeError("attribution_rows needs at least one target.")
    for target in targets:
        if isinstance(target, LogitTarget):
            continue
        if not isinstance(target, FeatureTarget):
            raise HookscopeError(
                f"targets must be LogitTarget or FeatureTarget, got {type(target).__name__}."
            )
        if target.layer not in by_layer:
            raise HookscopeError(
                f"FeatureTarget layer {target.layer} has no transcoder (layers with one: "
                f"{sorted(by_layer)})."
            )
        if not 0 <= target.feature < by_layer[target.layer].d_sae:
            raise HookscopeError(
                f"FeatureTarget feature {target.feature} is out of range: the transcoder of "
                f"layer {target.layer} has {by_layer[target.layer].d_sae} features."
            )


# -- one forward and one backward per target ---------------------------------------------------
class _FrozenReplacement:
    """The hooks of one frozen replacement forward and the tensors they leave behind."""

    def __init__(self, hm: Any, by_layer: dict[int, Dictionary], device: torch.device):
        self.hm, self.model_map = hm, hm.model_map
        self.by_layer = {layer: d.to(device) for layer, d in by_layer.items()}
        self.mlp_in: dict[int, torch.Tensor] = {}
        self.pre: dict[int, torch.Tensor] = {}
        self.leaves: dict[str, torch.Tensor] = {}
        # each norm as a linear map with its scale to freeze, checked against the module on a
        # probe now (calling a module inside its own hook would run the hook again)
        self.norms: dict[int, FrozenNorm] = {
            id(module): frozen_norm(module, _probe(module, hm.model_map.d_model, device))
            for module in _norm_modules(hm.model_map)
        }

    def hooks(self) -> list[ModuleHook]:
        hooks = [replacing_hook(self.model_map.embed, "output", self._embedding_leaf)]
        hooks += [replacing_hook(m, "output", self._bias_leaf) for m in _biased(self.hm)]
        hooks += [
            replacing_hook(m, "output", self._position_leaf) for m in _position_embeddings(self.hm)
        ]
        for layer, parts in enumerate(self.model_map.layers):
            hooks.append(replacing_hook(parts.mlp, "input", self._stash_mlp_in(layer)))
            splice = self._splice(layer) if layer in self.by_layer else self._whole_error(layer)
            hooks.append(replacing_hook(parts.mlp, "output", splice))
        return hooks + [self._frozen_norm_hook(m) for m in _norm_modules(self.model_map)]

    def pattern_freezes(self) -> list[PatternEdit]:
        return [PatternEdit(layer=layer, op="freeze") for layer in range(self.model_map.n_layers)]

    def _embedding_leaf(self, module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
        self.leaves["embedding"] = tensor.detach().requires_grad_(True)
        return self.leaves["embedding"]

    def _bias_leaf(self, module: nn.Module, output: torch.Tensor) -> torch.Tensor:
        """``x @ W + b`` as ``(x @ W) + leaf``, the leaf a per-row copy of ``b``."""
        bias = module.bias.detach().to(output.dtype).expand_as(output)
        leaf = bias.clone().requires_grad_(True)
        self.leaves[f"bias_{len(self.leaves)}"] = leaf
        return output - bias + leaf

    def _position_leaf(self, module: nn.Module, output: torch.Tensor) -> torch.Tensor:
        leaf = output.detach().requires_grad_(True)
        self.leaves[f"bias_{len(self.leaves)}"] = leaf
        return leaf

    def _stash_mlp_in(self, layer: int):
        def stash(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
            self.mlp_in[layer] = tensor
            return tensor.detach()  # the MLP itself runs outside the graph

        return stash

    def _splice(self, layer: int):
        d = self.by_layer[layer]

        def splice(module: nn.Module, output: torch.Tensor) -> torch.Tensor:
            self.pre[layer] = d.pre_activations(self.mlp_in[layer])  # in the graph (targets)
            features = d.activate(self.pre[layer]).detach().requires_grad_(True)
            written = features @ d.W_dec / d.input_scale
            error = (output.to(written.dtype) - written).detach().requires_grad_(True)
            self.leaves[f"features_{layer}"], self.leaves[f"error_{layer}"] = features, error
            return (written + error).to(output.dtype)

        return splice

    def _whole_error(self, layer: int):
        """A layer without a transcoder: its whole MLP output is one error node."""

        def leaf(module: nn.Module, output: torch.Tensor) -> torch.Tensor:
            self.leaves[f"error_{layer}"] = output.detach().requires_grad_(True)
            return self.leaves[f"error_{layer}"]

        return leaf

    def _frozen_norm_hook(self, module: nn.Module) -> ModuleHook:
        def frozen(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            x = input_tensor(mod, args, kwargs)
            norm = self.norms[id(mod)]
            y = norm.apply(x.unsqueeze(0), x.detach())[0]
            if norm.bias is not None:
                leaf = norm.bias.float().to(y.device).expand_as(y).clone().requires_grad_(True)
                self.leaves[f"bias_{len(self.leaves)}"] = leaf
                y = y + leaf
            return y.to(output.dtype)

        return ModuleHook(module, frozen, "output", with_kwargs=True)


def _probe(module: nn.Module, d_model: int, device: torch.device) -> torch.Tensor:
    """A random input ``[4, width]`` for a norm (its weight's width, else d_model)."""
    weight = getattr(module, "weight", None)
    width = weight.shape[-1] if isinstance(weight, torch.Tensor) else d_model
    generator = torch.Generator().manual_seed(0)
    return torch.randn(4, width, generator=generator).to(device)


def _biased(hm: Any) -> list[nn.Module]:
    """Modules (not norms) of the text decoder and the unembedding whose output adds a bias
    parameter: linear layers (``nn.Linear``, GPT-2's ``Conv1D``)."""
    norms = {id(m) for m in _norm_modules(hm.model_map)}
    modules = [*hm.model_map.decoder.modules(), hm.hf_model.get_output_embeddings()]
    return [
        m
        for m in modules
        if m is not None
        and id(m) not in norms
        and isinstance(getattr(m, "bias", None), nn.Parameter)
        and not list(m.children())
    ]


def _position_embeddings(hm: Any) -> list[nn.Module]:
    """Embedding tables of the decoder other than the token embedding (learned positions)."""
    return [
        m
        for m in hm.model_map.decoder.modules()
        if isinstance(m, nn.Embedding) and m is not hm.model_map.embed
    ]


def _norm_modules(model_map: Any) -> list[nn.Module]:
    """Every norm module of the text decoder (leaf modules named ``*Norm*``)."""
    return [
        module
        for module in model_map.decoder.modules()
        if "norm" in type(module).__name__.lower() and not list(module.children())
    ]


def _frozen_rows(
    hm: Any, batch: dict, by_layer: dict[int, Dictionary], row_targets: list[tuple[Any, int]]
) -> dict[str, Any]:
    """One frozen forward and one backward over ``batch``: row ``r``'s edges into its own
    target ``row_targets[r]`` (a target and the absolute position it is read at)."""
    device = batch["input_ids"].device
    frozen = _FrozenReplacement(hm, by_layer, device)
    with _no_parameter_gradients(hm.hf_model):
        cache = hm.forward(
            batch,
            ["last"],
            extraction_config=ExtractionConfig(keep_gradient=True),
            hooks=frozen.hooks(),
            interventions=frozen.pattern_freezes(),
        )
        value, constant = _target_values(hm, frozen, row_targets, cache["logits"][:, 0])
        leaves = list(frozen.leaves.values())
        # a leaf downstream of every target (a later layer's features) has no path: no gradient
        gradients = torch.autograd.grad(value.sum(), leaves, allow_unused=True)
    edges = {
        name: (leaf.detach() * (0 if grad is None else grad)).float()
        for (name, leaf), grad in zip(frozen.leaves.items(), gradients, strict=True)
    }
    mask = batch["attention_mask"].to(device).bool()
    return {
        "value": value.detach().float().cpu(),
        "constant": constant.float().cpu(),
        "embedding": (edges["embedding"].sum(-1) * mask).cpu(),
        "bias": sum(
            (_per_row(edges[n], mask) for n in edges if n.startswith("bias_")),
            torch.zeros(mask.shape[0], device=mask.device),
        ).cpu(),
        "features": {
            layer: (edges[f"features_{layer}"] * mask.unsqueeze(-1)).cpu() for layer in by_layer
        },
        "errors": {
            layer: (edges[f"error_{layer}"].sum(-1) * mask).cpu()
            for layer in range(hm.model_map.n_layers)
        },
    }


def _target_values(
    hm: Any, frozen: _FrozenReplacement, row_targets: list[tuple[Any, int]], last_logits
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(value [rows], constant [rows])``: each row's own target, in the graph."""
    logits = last_logits.float()
    cap = _final_logit_cap(hm)
    if cap is not None:  # the cap is not linear: attribute the logit before it
        logits = cap * torch.atanh((logits / cap).clamp(-1 + 1e-7, 1 - 1e-7))
    values, constants = [], []
    for row, (target, position) in enumerate(row_targets):
        if isinstance(target, LogitTarget):
            values.append(logits[row, target.token] - logits[row].mean())
            constants.append(torch.zeros(()))
            continue
        d = frozen.by_layer[target.layer]
        values.append(frozen.pre[target.layer][row, position, target.feature].float())
        bias = d.b_enc[target.feature]
        if d.subtract_decoder_bias:
            bias = bias - d.b_dec @ d.W_enc[:, target.feature]
        constants.append(bias.detach().float().cpu())
    return torch.stack(values), torch.stack(constants)


def _per_row(edges: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[batch, seq, ...]`` edges -> ``[batch]``, real positions only."""
    edges = edges.sum(tuple(range(2, edges.dim()))) if edges.dim() > 2 else edges
    return (edges * mask).sum(-1)


def _final_logit_cap(hm: Any) -> float | None:
    config = hm.hf_model.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(config, "final_logit_softcapping", None)


class _no_parameter_gradients:
    """Within the block, the model's parameters do not require gradients (only the leaves do:
    no parameter gradient is computed or kept); restored on exit."""

    def __init__(self, model: nn.Module):
        self.params = [p for p in model.parameters() if p.requires_grad]

    def __enter__(self) -> None:
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc: Any) -> None:
        for p in self.params:
            p.requires_grad_(True)
