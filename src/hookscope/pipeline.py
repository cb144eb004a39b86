"""Internal: the one call pipeline: every entry point *plans* its call, then *runs* the plan.

``forward``, each batch of ``extract_cache``, ``generate`` (once, for all its steps), every
forward of a patching sweep and its baselines go through the same two functions:

1. :func:`plan_call` turns what the user asked for (inputs, target positions, an
   :class:`ExtractionConfig`, interventions, extra hooks) into a :class:`CallPlan`: the model
   inputs, the resolved positions, the registered-then-per-call interventions as hooks, the
   capture hooks, the attention requests. Every check happens here, before any forward.
2. :class:`Executor` runs a plan on its model: one call at a time per model, the model's
   attention switched to hookscope's function when the plan needs it, the hooks installed, the
   HF call run, everything removed in ``finally``. :meth:`CallPlan.cache` assembles the
   :class:`ActivationCache` from what the hooks captured.

Hook order on a module: interventions (marked ``first``, ahead of HF's own output-recording
hooks), then the caller's extra hooks (user hooks, a sweep's patch writes), then capture, which
sees the effect of both.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .archs import ModelMap
from .assemble import assemble_cache
from .attention import AttentionHooks
from .cache import ActivationCache
from .capture import StopForward, capture_hooks, plan_capture
from .config import ExtractionConfig
from .dictionaries.features import feature_hooks
from .editing import prepare
from .errors import HookscopeError, PositionError
from .hooks import ModuleHook, as_module_hook, installed
from .inputs import model_input_names, to_left_padding
from .interventions import Intervention, PatternEdit
from .plan import ExtractionPlan, plan_extraction
from .positions import PositionContext, ResolvedPositions
from .vision_points import vision_capture_hooks, vision_points
from .window import CallWindow, StepPositions

#: ``call(hf_model, model_inputs) -> output``: what the executor runs inside the hooks
ModelCall = Callable[[nn.Module, dict[str, Any]], Any]


def forward_call(model: nn.Module, model_inputs: dict[str, Any]) -> Any:
    """One plain HF forward."""
    return model(**model_inputs)


@dataclass
class CallPlan:
    """One planned call: everything the executor installs and runs, nothing left to decide.

    Attributes:
        model_map: the model the plan is for.
        model_inputs: keyword arguments of the HF call, on the model's device.
        config: the extraction config of the call.
        extraction: which points module hooks and the attention function capture.
        context: what positions resolve against (mask ``[batch, seq]``, ids, images).
        targets: the target positions ``[batch, P]`` (None in a generation without extraction).
        row_positions: the query rows of patterns, when they differ from the targets.
        window: which absolute positions each model call covers (generation steps).
        hooks: module hooks in installation order (interventions, extra hooks, capture).
        pattern_edits: resolved pattern edits by layer (applied by the attention function).
        sink: where the hooks write captured tensors, by cache key.
        attention: the attention requests and pattern edits, switched on for the call.
    """

    model_map: ModelMap
    model_inputs: dict[str, Any]
    config: ExtractionConfig
    extraction: ExtractionPlan
    context: PositionContext
    targets: ResolvedPositions | None
    row_positions: ResolvedPositions | None
    window: CallWindow
    hooks: list[ModuleHook]
    pattern_edits: dict[int, list]
    sink: dict[str, torch.Tensor]
    attention: AttentionHooks = field(init=False)

    def __post_init__(self) -> None:
        self.attention = AttentionHooks(
            self.model_map,
            self.extraction.attention,
            self.targets,
            self.row_positions,
            self.sink,
            all_keys=self.config.attn_pattern_all_keys,
            average=self.config.extract_avg,
            keep_gradient=self.config.keep_gradient,
            edits=self.pattern_edits,
            window=self.window,
        )

    def cache(self, output: Any, pad_token_id: int) -> ActivationCache:
        """The :class:`ActivationCache` of a finished forward (``output``: the HF output, or
        None when the forward stopped early)."""
        return assemble_cache(
            self.sink,
            output,
            self.targets,
            self.row_positions,
            self.config,
            self.extraction,
            self.model_inputs["input_ids"],
            pad_token_id,
            self.model_inputs.get("attention_mask"),
        )


def plan_call(
    hm: Any,
    inputs: Any,
    target_token_positions: Any,
    config: ExtractionConfig,
    *,
    interventions: Any = (),
    hooks: Sequence[ModuleHook | dict[str, Any]] = (),
    pivot_positions: Sequence[int] | None = None,
    seed: int = 0,
    example_offset: int = 0,
    model_kwargs: dict[str, Any] | None = None,
    generation: bool = False,
) -> CallPlan:
    """Plan one call of ``hm`` (a :class:`~hookscope.HookedModel`).

    Registered interventions (``hm.registered_interventions``) come first, then
    ``interventions``. With ``generation`` the plan is for ``hf_model.generate``: capture hooks
    follow the steps (targets in the prompt call, then each fed-back token), the model's cache
    setting is left to the caller, and what has no meaning per step is refused.

    Raises:
        PositionError, InputError, ActivationPointError, HookscopeError: for bad input, before
        any forward.
    """
    extraction = plan_extraction(config, hm.model_map, hm.dictionaries)
    if generation:
        _check_generation_request(config, extraction)
    model_inputs = _model_inputs(hm, inputs, model_kwargs, generation)
    context = hm.position_context(model_inputs, pivot_positions, seed)
    targets = _targets(context, target_token_positions, extraction, generation)
    row_positions = None
    if config.attn_pattern_row_positions is not None:
        row_positions = context.resolve(config.attn_pattern_row_positions)
    seq = context.attention_mask.shape[1]
    window = (
        CallWindow(seq) if generation else CallWindow(seq, 0, seq, example_offset=example_offset)
    )
    intervention_hooks, pattern_edits = prepare(
        [*hm.registered_interventions, *as_intervention_list(interventions)],
        hm.model_map,
        context,
        window,
        hm.vision_map,
    )
    if generation and pattern_edits:
        raise HookscopeError(
            "PatternEdit is not supported in generate yet; run forward on the prompt to study its effect."
        )
    sink: dict[str, torch.Tensor] = {}
    capture_positions = StepPositions(targets, window) if generation and targets else targets
    call_hooks = intervention_hooks + [as_module_hook(h) for h in hooks]
    # stopping after the last extracted layer would silently skip a caller's hooks further on
    stop_early = not generation and not hooks and not hm.persistent_hooks
    call_hooks += capture_hooks_for(
        hm, extraction, config, capture_positions, sink, stop_early, window=window
    )
    return CallPlan(
        hm.model_map, model_inputs, config, extraction, context, targets, row_positions, window, call_hooks,
        pattern_edits, sink,
    )  # fmt: skip


def _model_inputs(
    hm: Any, inputs: Any, model_kwargs: dict[str, Any] | None, generation: bool
) -> dict[str, Any]:
    """The HF call's keyword arguments. A single forward keeps no KV cache (the one place
    ``use_cache`` is set); ``generate`` gets left-padded prompts and derives positions itself."""
    model_inputs = hm.prepare_inputs(inputs)
    model_inputs.update(model_kwargs or {})
    if generation:
        model_inputs.pop("position_ids", None)  # generate derives them from the mask itself
        return to_left_padding(model_inputs)  # new tokens go right after each prompt
    if "use_cache" in model_input_names(hm.hf_model):
        model_inputs.setdefault("use_cache", False)
    return model_inputs


def as_intervention_list(interventions: Any) -> list:
    """``interventions`` as a list: one intervention (a dataclass or a reference-design dict)
    counts as a list of one; None as none."""
    if interventions is None:
        return []
    if isinstance(interventions, Intervention | PatternEdit | Mapping):
        return [interventions]
    return list(interventions)


def _targets(
    context: PositionContext, items: Any, extraction: ExtractionPlan, generation: bool
) -> ResolvedPositions | None:
    """The resolved target positions; ``["all"]`` for a forward that extracts nothing."""
    if items is None:
        if not extraction.is_empty():
            raise PositionError(
                "target_token_positions is required when activations are requested, "
                "e.g. target_token_positions=['last']."
            )
        if generation:
            return None
        items = ["all"]
    return context.resolve(items)


def capture_hooks_for(
    hm: Any,
    extraction: ExtractionPlan,
    config: ExtractionConfig,
    positions: Any,
    sink: dict[str, torch.Tensor],
    stop_early: bool = False,
    window: CallWindow | None = None,
) -> list[ModuleHook]:
    """Capture hooks for the plan's module points, dictionary features and vision points. With
    ``stop_early``, a forward that needs nothing after its last extracted layer stops there
    (``StopForward``, which :meth:`Executor.run` catches). ``window`` carries what a Splice
    received in the call (features of a spliced dictionary are read from it)."""
    if positions is None:
        return []
    stop_after = None
    last = extraction.last_layer()
    if stop_early and not config.save_logits and last is not None:
        stop_after = hm.model_map.layers[last].block
    options = dict(average=config.extract_avg, keep_gradient=config.keep_gradient)
    hooks = capture_hooks(plan_capture(extraction.points, hm.model_map), positions, sink, **options)
    hooks += feature_hooks(
        extraction.features, hm.model_map, positions, sink, top_k=config.feature_top_k,
        spliced=window.spliced if window is not None else None, **options,
    )  # fmt: skip
    if stop_after is not None:  # last: after every hook that reads that block
        hooks += capture_hooks([], positions, sink, stop_after=stop_after)
    return hooks + vision_capture_hooks(
        vision_points(config, hm.vision_map), hm.vision_map, sink, config.keep_gradient
    )


def _check_generation_request(config: ExtractionConfig, extraction: ExtractionPlan) -> None:
    if config.extract_avg:
        raise HookscopeError(
            "extract_avg is not supported in generate; average the returned slots."
        )
    if extraction.attention:
        raise HookscopeError(
            "attention patterns and per-head q/k/v are not extracted during generate; run forward "
            "on the generated sequences instead."
        )


class Executor:
    """Runs :class:`CallPlan` s on one HF model. There is one executor per model object (two
    HookedModels wrapping the same model share it), because hooks live on the shared modules:
    calls on one model cannot overlap, calls on different models never wait for each other."""

    _by_model: weakref.WeakKeyDictionary[nn.Module, Executor] = weakref.WeakKeyDictionary()
    _create_lock = threading.Lock()

    def __init__(self, hf_model: nn.Module):
        self.hf_model = hf_model
        self._busy = threading.Lock()
        self._owner: int | None = None  # the thread running a call, if any

    @classmethod
    def of(cls, hf_model: nn.Module) -> Executor:
        """The executor of ``hf_model`` (created on first use)."""
        with cls._create_lock:
            executor = cls._by_model.get(hf_model)
            if executor is None:
                executor = cls._by_model[hf_model] = cls(hf_model)
            return executor

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the model for one call; another thread, or a call started inside this one (a
        forward in a user hook), gets a clear error instead of mixed hooks."""
        if self._owner == threading.get_ident():
            raise HookscopeError(
                "a hooked call on this model was started inside another one (e.g. hm.forward "
                "inside a hook): the outer call's hooks and interventions would run in it too. "
                "Make the call after the outer one returns, or on another model."
            )
        if not self._busy.acquire(blocking=False):
            raise HookscopeError(
                "this model is running a hooked call in another thread: hooks live on the shared "
                "modules, so calls on one model cannot overlap. Use one model per thread "
                "(from_hf on a copy) or a lock around calls."
            )
        self._owner = threading.get_ident()
        try:
            yield
        finally:
            self._owner = None
            self._busy.release()

    def run(self, plan: CallPlan, call: ModelCall = forward_call) -> Any:
        """Install ``plan`` (attention scope, hooks), run ``call(hf_model, model_inputs)``,
        remove everything whatever happens. Returns the call's output (None when a capture
        hook stopped the forward early)."""
        grad_mode = torch.enable_grad() if plan.config.keep_gradient else torch.no_grad()
        with (
            self.exclusive(),
            grad_mode,
            _eager_if_compiled(self.hf_model),
            plan.attention.installed(),
            installed(self.hf_model, plan.hooks),
        ):
            try:
                return call(self.hf_model, plan.model_inputs)
            except StopForward:
                return None


def _is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` or one of its modules runs through ``torch.compile`` (``model.compile()``,
    ``model.forward = torch.compile(model.forward)``, compiled layers)."""
    for module in model.modules():
        own = module.__dict__  # instance attributes only: cheap on a model of many modules
        if own.get("_compiled_call_impl") is not None:
            return True
        if hasattr(own.get("forward"), "_torchdynamo_orig_callable"):
            return True
    return False


def _eager_if_compiled(model: nn.Module) -> Any:
    """Run a compiled model's own code for the call: torch.compile does not guard on module
    hooks, so a graph compiled without hookscope's hooks would silently skip them (a Steer with
    no effect, a point missing from the cache). Process-wide while the call runs (other compiled
    code runs eagerly meanwhile: slower, never wrong)."""
    if _is_compiled(model):
        return torch.compiler.set_stance("force_eager")
    return nullcontext()
