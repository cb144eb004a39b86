"""Internal: the opt-in compiled path (``forward(..., compile=True)``, ``extract_cache(...,
compile=True)``).

The HF model runs under ``torch.compile`` with hookscope's capture *inside* the graph: capture
hooks are installed before the compiled call, dynamo traces them with the model (no graph
break), and each hook gathers its target positions in the graph. Only the gathered slots leave
it, so the compiler sees the whole forward, model kernels (SDPA) included.

Recompiles are bounded, by one of two shape policies (:func:`dynamic_shapes`):

* on a CPU, *dynamic shapes*: the graph is compiled once with a symbolic sequence length and
  every batch runs at its own length (a short batch is still padded with copies of its last row
  up to ``batch_size``: dynamo recompiles for a new batch size). Dynamo specializes sizes of 1:
  a one-token batch, one position slot or one real token gets a graph of its own (a few more
  per point set at most). Padding to buckets costs more tokens
  than compiling gains on a CPU: on SmolLM2 (256 prompts of 8-160 tokens, batches of 32),
  buckets of 32 tokens ran 1.006x the eager decoder, of 16 0.967x, exact lengths 0.879x
  (dynamic) and 0.891x (static, one compile per length: 234 s of compiling).
* on an accelerator, *buckets*: every batch is padded to a bucket length (the next multiple of
  :data:`BUCKET`, on the tokenizer's padding side, the attention mask making the padding exact)
  and a short batch with copies of its last row up to ``batch_size``, so a dataset compiles
  once per bucket, for static shapes (what CUDA graphs need to record each bucket; they are
  not used yet, and this policy is unmeasured on a GPU).

Under dynamic shapes each layer's MLP runs on the batch's real tokens alone, padding and filler
rows skipped (:mod:`hookscope.compiled_unpad`): on SmolLM2 over those prompts 11 % of the tokens
computed are padding, and the MLP holds most of a layer's matrix products.

What is compiled: the module points (residual stream, attention / MLP outputs, per-head outputs,
q/k/v) at target positions, logits, ``extract_avg``. What is not (an error naming it and the
eager alternative, never a silent fallback): interventions, extra or persistent hooks (Python
callbacks that change the forward), attention patterns and per-head q/k/v read by hookscope's
attention function, vision points, dictionary features and reconstruction errors,
``keep_gradient``, inputs other than token ids and masks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .cache import ActivationCache
from .capture import CaptureSite, plan_capture
from .compiled_unpad import RealTokens, unpadding_hooks
from .config import ExtractionConfig
from .errors import CompileError
from .hooks import ModuleHook, installed, reading_hook
from .inputs import _add_padded_positions, model_input_names
from .pipeline import CallPlan
from .plan import ExtractionPlan
from .positions import ResolvedPositions
from .vision_points import vision_points

#: sequence lengths are padded up to a multiple of this (one compiled graph per bucket)
BUCKET = 32
#: model inputs the compiled path takes: [batch, seq] tensors it can pad, and flags
_PADDED_INPUTS = {"input_ids": None, "attention_mask": 0, "position_ids": 1, "token_type_ids": 0}
_FLAGS = {"use_cache"}
#: dynamo recompiles a function at most this many times (one per bucket and extraction)
_RECOMPILE_LIMIT = 64


def dynamic_shapes(device: torch.device | str) -> bool:
    """The shape policy of the module docstring: dynamic shapes on a CPU, buckets elsewhere."""
    return torch.device(device).type == "cpu"


def bucket_length(seq: int, multiple: int = BUCKET) -> int:
    """``seq`` rounded up to a multiple of ``multiple`` (the length a batch is padded to)."""
    return max(multiple, math.ceil(seq / multiple) * multiple)


def check_compilable(
    hm: Any, config: ExtractionConfig, extraction: ExtractionPlan, interventions: Any, hooks: Any
) -> None:
    """Refuse what the compiled graph cannot hold, naming it and the eager way.

    Raises:
        CompileError: for interventions, hooks, attention-function points, vision points,
            dictionary features or ``keep_gradient``.
    """
    refused = []
    if hm.registered_interventions or interventions:
        refused.append("interventions (registered or per call)")
    if hooks or hm.persistent_hooks:
        refused.append("extra or persistent hooks (Python callbacks)")
    if extraction.attention:
        layers = sorted({request.layer for request in extraction.attention})
        refused.append(
            f"attention patterns / per-head q,k,v (read by the attention function, layers {layers})"
        )
    if vision_points(config, hm.vision_map):
        refused.append("vision points")
    if config.keep_gradient:
        refused.append("keep_gradient=True")
    if extraction.features:  # encoded by eager hooks the compiled graph does not install
        names = [request.dictionary.name for request in extraction.features]
        refused.append(f"dictionary features / reconstruction errors of {names}")
    if refused:
        raise CompileError(
            f"compile=True cannot run {', '.join(refused)}: the compiled path captures module "
            "points (resid/attn/mlp/head outputs, q/k/v projections) and logits at positions. "
            "Pass compile=False for this call (the eager path runs everything)."
        )


@dataclass
class _Slots:
    """What the in-graph hooks read (the gather index of this call) and write (by cache key).
    One object per compiled forward, so dynamo sees the same object on every call."""

    index: torch.Tensor | None = None  # [batch, slots] long
    keep: torch.Tensor | None = None  # [batch, slots] bool, False at padded slots
    found: dict[str, torch.Tensor] = field(default_factory=dict)

    def select(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden [batch, seq, *rest]`` -> ``[batch, slots, *rest]`` (padded slots zero)."""
        ones = [1] * (hidden.dim() - 2)
        index = self.index.view(*self.index.shape, *ones).expand(
            *self.index.shape, *hidden.shape[2:]
        )
        keep = self.keep.view(*self.keep.shape, *ones)
        return hidden.gather(1, index).masked_fill(~keep, 0)


def _in_graph_hook(site: CaptureSite, slots: _Slots) -> ModuleHook:
    def store(hidden: torch.Tensor) -> None:
        selected = slots.select(hidden)
        for key, where in site.writes:
            slots.found[key] = where.read(selected)

    return reading_hook(site.module, site.when, store)


class CompiledForward:
    """One compiled forward of one model for one set of points (``save_logits`` included):
    its capture hooks (the same function objects on every call, so dynamo's guards on module
    hooks hold) and the ``torch.compile`` d function that runs the model with them."""

    def __init__(
        self,
        hm: Any,
        extraction: ExtractionPlan,
        sites: list[CaptureSite],
        save_logits: bool,
        dynamic: bool,
        pre_hooked: bool = False,
    ):
        self.hf_model = hm.hf_model
        self.save_logits = save_logits
        # without logits the decoder alone runs (no unembedding of every position), unless a
        # module above it has pre-hooks (a user's torch hooks, which the eager path runs)
        whole = save_logits or pre_hooked
        self.target: nn.Module = hm.hf_model if whole else hm.model_map.decoder
        self.slots = _Slots()
        self.projections = _projections(sites)
        self.hooks = [_in_graph_hook(site, self.slots) for site in sites]
        # dynamic shapes: MLPs over real tokens only (compiled_unpad), after the capture hooks
        self.real = RealTokens() if dynamic else None
        if self.real is not None:
            self.hooks += unpadding_hooks(_unpaddable_mlps(hm.model_map, sites), self.real)
        # nothing is read after the last extracted layer: the decoder runs its layers up to it
        self.cut = None if save_logits else LayersCut.after(hm.model_map, extraction.last_layer())
        self.compiled: Callable[..., dict[str, torch.Tensor]] = torch.compile(
            self._run, dynamic=dynamic
        )

    def _run(self, model_inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        output = self.target(**model_inputs)
        found = dict(self.slots.found)
        if self.save_logits:
            found["logits"] = self.slots.select(output.logits)
        return found

    def __call__(
        self, model_inputs: dict[str, Any], index: torch.Tensor, keep: torch.Tensor, own_rows: int
    ) -> dict[str, torch.Tensor]:
        """Run on padded inputs ``[rows, bucket]`` (rows from ``own_rows`` on are fillers);
        ``index``/``keep`` ``[rows, slots]`` on the model's device. Returns each key's
        ``[rows, slots, ...]`` slots."""
        self.slots.index, self.slots.keep = index, keep
        if self.real is not None:
            self.real.index = RealTokens.of(model_inputs, own_rows)
        self.slots.found.clear()
        try:
            # one graph per bucket: allow that many recompiles during hookscope's calls only
            # (the process-wide setting is left as the user set it). Guards on module hooks:
            # dynamo skips them by default, and all models of one class share a code object's
            # graphs, so a graph traced on another model (or before a hook was added) would run
            # here without this model's own hooks.
            limit = max(torch._dynamo.config.recompile_limit, _RECOMPILE_LIMIT)
            with torch._dynamo.config.patch(recompile_limit=limit, skip_nnmodule_hook_guards=False):
                with installed(self.hf_model, self.hooks), LayersCut.applied(self.cut):
                    return self.compiled(model_inputs)
        finally:
            self.slots.found.clear()
            self.slots.index = self.slots.keep = None
            if self.real is not None:
                self.real.clear()


@dataclass
class LayersCut:
    """The decoder's layer list cut after the last layer a forward reads: while applied, the
    decoder's ``spec.layers`` attribute (``layers``, GPT-2's ``h``) holds the first layers only,
    the same modules; the eager path stops there by raising, which a compiled graph cannot."""

    decoder: nn.Module
    attribute: str
    full: nn.ModuleList
    kept: nn.ModuleList

    @classmethod
    def after(cls, model_map: Any, last_layer: int | None) -> LayersCut | None:
        """The cut after ``last_layer`` (None: nothing to cut, or a later point is read)."""
        full = getattr(model_map.decoder, model_map.spec.layers)
        if last_layer is None or last_layer + 1 >= len(full):
            return None
        kept = nn.ModuleList(list(full)[: last_layer + 1])
        return cls(model_map.decoder, model_map.spec.layers, full, kept)

    @staticmethod
    @contextmanager
    def applied(cut: LayersCut | None) -> Iterator[None]:
        """Run the block with ``cut`` applied (nothing for None); the full list is back after."""
        if cut is None:
            yield
            return
        setattr(cut.decoder, cut.attribute, cut.kept)
        try:
            yield
        finally:
            setattr(cut.decoder, cut.attribute, cut.full)


def _unpaddable_mlps(model_map: Any, sites: list[CaptureSite]) -> list[nn.Module]:
    """Every layer's MLP, but one with a capture hook strictly inside it (its hooks would see
    the gathered tokens, not ``[rows, seq, ...]``): none of hookscope's points today."""
    hooked = {id(site.module) for site in sites}
    return [
        layer.mlp
        for layer in model_map.layers
        if not any(id(m) in hooked for m in layer.mlp.modules() if m is not layer.mlp)
    ]


def compiled_forward_for(
    hm: Any, extraction: ExtractionPlan, save_logits: bool, dynamic: bool
) -> CompiledForward:
    """The :class:`CompiledForward` of ``hm`` for these points and shape policy (built once,
    kept on ``hm``; built again when a weight its per-head points read was replaced)."""
    pre_hooked = not save_logits and _pre_hooked_above(hm.hf_model, hm.model_map.decoder)
    key = (tuple(p.name for p in extraction.points), save_logits, dynamic, pre_hooked)
    store = hm.__dict__.setdefault("_compiled_forwards", {})
    forward = store.get(key)
    sites = plan_capture(extraction.points, hm.model_map)  # planned every call, as eagerly
    if forward is None or forward.projections != _projections(sites):
        forward = store[key] = CompiledForward(
            hm, extraction, sites, save_logits, dynamic, pre_hooked
        )
    return forward


def _projections(sites: list[CaptureSite]) -> list[int | None]:
    """Where each block of ``W_O`` the sites' per-head points are read through lives: a view
    of the weight taken when planned, stale once the weight is replaced (``module.weight =
    ...``, ``load_state_dict(assign=True)``); the eager path plans every call."""
    return [
        None if where.project is None else where.project.data_ptr()
        for site in sites
        for _, where in site.writes
    ]


def _pre_hooked_above(hf_model: nn.Module, decoder: nn.Module) -> bool:
    """Whether the HF model, or a module between it and the decoder, has forward pre-hooks
    (a user's torch hooks: the decoder called alone would skip them)."""
    for name, module in hf_model.named_modules():
        if module is decoder:
            path = name.split(".") if name else []
            above = [hf_model.get_submodule(".".join(path[:i])) for i in range(len(path))]
            return any(m._forward_pre_hooks for m in above)
    return False


@dataclass
class Padded:
    """A batch padded to its bucket: the model inputs ``[rows, bucket]`` and how to undo it."""

    model_inputs: dict[str, Any]
    rows: int  # the batch's own rows (the rest copy its last row)
    shift: int  # added to every sequence index (left padding), else 0


def pad_to_bucket(
    model_inputs: dict[str, Any],
    hf_model: nn.Module,
    padding_side: str,
    pad_id: int,
    rows: int,
    multiple: int | None = BUCKET,
) -> Padded:
    """Pad ``[batch, seq]`` inputs to ``[max(batch, rows), bucket_length(seq, multiple)]``: new
    columns on ``padding_side`` (pad id, mask 0, position 1), new rows copies of the last one.
    ``multiple=None`` (dynamic shapes): no new columns, only the rows (a graph compiled with
    dynamic shapes still recompiles for a new batch size; not for a new length).

    Raises:
        CompileError: for inputs other than token ids, masks, positions and flags.
    """
    other = sorted(k for k in model_inputs if k not in _PADDED_INPUTS and k not in _FLAGS)
    if other:
        raise CompileError(
            f"compile=True takes token ids and masks only, got {other}; pass compile=False."
        )
    batch, seq = model_inputs["input_ids"].shape
    extra = 0 if multiple is None else bucket_length(seq, multiple) - seq
    padded = dict(model_inputs)
    for name, fill in _PADDED_INPUTS.items():
        if padded.get(name) is not None:
            fill = pad_id if fill is None else fill
            padded[name] = _pad_columns(padded[name], extra, padding_side, fill)
    # the new padding columns need position ids counted over real tokens, as any padded batch
    if padded.get("attention_mask") is not None:
        _add_padded_positions(padded, hf_model, model_input_names(hf_model), always=True)
    for name in _PADDED_INPUTS:
        if padded.get(name) is not None:
            padded[name] = _pad_rows(padded[name], max(rows - batch, 0))
    return Padded(padded, batch, extra if padding_side == "left" else 0)


def _pad_columns(tensor: torch.Tensor, extra: int, side: str, fill: int) -> torch.Tensor:
    if extra == 0:
        return tensor
    block = tensor.new_full((tensor.shape[0], extra), fill)
    return torch.cat([block, tensor] if side == "left" else [tensor, block], dim=1)


def _pad_rows(tensor: torch.Tensor, extra: int) -> torch.Tensor:
    if extra == 0:
        return tensor
    return torch.cat([tensor, tensor[-1:].expand(extra, -1)], dim=0)


def compiled_cache(hm: Any, plan: CallPlan, interventions: Any, hooks: Any) -> ActivationCache:
    """Run ``plan`` through ``hm``'s compiled forward and assemble its cache (the same keys,
    shapes and values as the eager path, to dtype tolerance).

    Raises:
        CompileError: for what the compiled path cannot run (see :func:`check_compilable`).
    """
    config = plan.config
    check_compilable(hm, config, plan.extraction, interventions, hooks)
    targets: ResolvedPositions = plan.targets
    side = getattr(hm.get_text_tokenizer(), "padding_side", "right")
    device = plan.model_inputs["input_ids"].device
    dynamic = dynamic_shapes(device)
    padded = pad_to_bucket(
        plan.model_inputs,
        hm.hf_model,
        side,
        hm.pad_token_id,
        hm.config.batch_size,
        multiple=None if dynamic else BUCKET,
    )
    extra_rows = padded.model_inputs["input_ids"].shape[0] - padded.rows
    index = _pad_rows(targets.index.to(device) + padded.shift, extra_rows)
    keep = _pad_rows(targets.mask.to(device), extra_rows)
    compiled = compiled_forward_for(hm, plan.extraction, config.save_logits, dynamic)
    with hm.executor.exclusive(), torch.no_grad():
        found = compiled(padded.model_inputs, index, keep, padded.rows)
    for key, value in found.items():
        value = value[: padded.rows]
        plan.sink[key] = targets.average(value) if config.extract_avg else value
    logits = plan.sink.pop("logits", None)
    cache = plan.cache(None, hm.pad_token_id)
    if logits is not None:
        cache["logits"] = logits
    return cache
