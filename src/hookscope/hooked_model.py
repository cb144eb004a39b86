"""HookedModel: the facade. Loading, accessors and hook registration; each entry point plans its
call and runs it through :mod:`hookscope.pipeline` (forward, generate) or a module around it
(:mod:`hookscope.dataset`, :mod:`hookscope.patching`); :mod:`hookscope.compat` adds the
reference design's methods (``compute_patching``, ``predict``, ...) on top."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .archs import ModelMap, resolve_architecture
from .cache import ActivationCache
from .config import ExtractionConfig, HookedModelConfig
from .dataset import DatasetRun
from .errors import HookscopeError, InputError, PositionError
from .hooks import ModuleHook, as_module_hook, get_module, register
from .inputs import prepare_inputs, tokenize_chat
from .interventions import AnyIntervention, PatternEdit, image_text_block
from .keywords import check_model_kwargs
from .loading import DEFAULT_MODEL_ID, load_model_and_tokenizer, prepare_tokenizer, split_processor
from .pipeline import Executor, as_intervention_list, capture_hooks_for, plan_call
from .plan import plan_extraction
from .positions import PositionContext, PositionItem, ResolvedPositions, normalize_items
from .store import ActivationStore
from .vision import (
    PIXEL_FIELDS,
    ImageLayout,
    VisionMap,
    find_vision_map,
    image_layout,
    image_placeholder,
    number_images,
)


class HookedModel:
    """A HuggingFace model, wrapped in place, that extracts activations at chosen positions.

    Build it with :meth:`from_pretrained` (a folder, hub id, ``.gguf`` file, or nothing for the
    embedded default SmolLM2-135M-Instruct) or :meth:`from_hf` (an already-built model).

    Attributes:
        hf_model: the wrapped ``PreTrainedModel`` (the same object: nothing is copied).
        model_map: where layers, attention, MLP and norms live, and the model's dimensions.
        config: the :class:`HookedModelConfig` it was built from.
    """

    def __init__(
        self,
        config: HookedModelConfig | None = None,
        *,
        hf_model: nn.Module | None = None,
        tokenizer: Any = None,
        processor: Any = None,
    ):
        self.config = config or HookedModelConfig()
        loaded_here = hf_model is None
        if loaded_here:
            hf_model, tokenizer = load_model_and_tokenizer(self.config)
        self.hf_model = hf_model
        if processor is None:
            tokenizer, processor = split_processor(tokenizer)
        elif tokenizer is None:
            tokenizer = getattr(processor, "tokenizer", None)
        self.tokenizer = prepare_tokenizer(tokenizer)
        self.processor = processor
        self.model_map: ModelMap = resolve_architecture(hf_model)
        #: the vision encoder and projector of a vision-language model (None for text-only)
        self.vision_map: VisionMap | None = find_vision_map(hf_model)
        #: how image tokens form images in input_ids (None for text-only models)
        self.image_layout: ImageLayout | None = image_layout(hf_model.config, self.tokenizer)
        self.model_name = self.config.model_name or (
            DEFAULT_MODEL_ID if loaded_here else type(hf_model).__name__
        )
        self._language_only = False  # use_language_model_only()
        self._persistent_handles: list[RemovableHandle] = []
        self._registered_interventions: list[AnyIntervention] = []
        self._dictionaries: dict[str, Any] = {}  # attach_dictionary

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, model_name: str | None = None, **kwargs: Any) -> HookedModel:
        """Load and wrap a model. ``kwargs`` are :class:`HookedModelConfig` fields
        (``device_map``, ``torch_dtype``, ``attn_implementation``, ``batch_size``, ...)."""
        return cls(HookedModelConfig(model_name=model_name, **kwargs))

    @classmethod
    def from_hf(cls, model: nn.Module, tokenizer: Any = None, processor: Any = None) -> HookedModel:
        """Wrap an already-built HF model in place (its weights are not copied). ``tokenizer``
        may be a vision-language processor (``from_hf(model, processor)``). A
        ``torch.compile(model)`` wrapper is unwrapped (hooked calls run the model's own code)."""
        model = getattr(model, "_orig_mod", model) if _is_compile_wrapper(model) else model
        config = HookedModelConfig(
            model_name=getattr(model, "name_or_path", None) or None,
            attn_implementation=getattr(model.config, "_attn_implementation", None),
        )
        return cls(config, hf_model=model, tokenizer=tokenizer, processor=processor)

    def __repr__(self) -> str:
        m = self.model_map
        return (
            f"HookedModel({self.model_name!r}, {m.model_type}: {m.n_layers} layers, "
            f"{m.n_heads} heads ({m.n_kv_heads} KV), d_model {m.d_model}, on {self.device()})"
        )

    # -- accessors -----------------------------------------------------------------------------
    def get_tokenizer(self) -> Any:
        """The tokenizer (or the processor, for a vision-language model that has one, unless
        :meth:`use_language_model_only` is on)."""
        if self.processor is not None and not self._language_only:
            return self.processor
        return self.tokenizer

    def get_image_placeholder(self) -> str:
        """The text that stands for one image in a prompt, as the processor expects it
        (``"<image>"``, Gemma3's ``"<start_of_image>"``, Qwen2-VL's
        ``"<|vision_start|><|image_pad|><|vision_end|>"``, Pixtral's ``"[IMG]"``).

        Raises:
            HookscopeError: for a model without a processor.
        """
        return image_placeholder(self.get_processor(), self.hf_model.config)

    def use_language_model_only(self) -> HookedModel:
        """Treat this vision-language model as its language model: text-only inputs, the
        vision encoder never runs (inputs with pixels raise), ``get_tokenizer()`` gives the text
        tokenizer. Every accessor keeps working (the model is not replaced). Returns self."""
        self._language_only = True
        return self

    def use_full_model(self) -> HookedModel:
        """Undo :meth:`use_language_model_only`. Returns self."""
        self._language_only = False
        return self

    def prepare_inputs(self, inputs: Any, device: Any = None) -> dict[str, Any]:
        """``inputs`` as keyword arguments of the HF forward on ``device`` (default: the
        model's), checked and completed (see :func:`hookscope.inputs.prepare_inputs`).

        Raises:
            InputError: for malformed inputs, or pixels under :meth:`use_language_model_only`.
        """
        if self._language_only and isinstance(inputs, Mapping):
            pixels = [f for f in PIXEL_FIELDS if inputs.get(f) is not None]
            if pixels:
                raise InputError(
                    f"use_language_model_only() is on, but the inputs carry {', '.join(pixels)}: "
                    "pass text only, or call use_full_model() first."
                )
        return prepare_inputs(
            inputs, self.hf_model, self.get_text_tokenizer(), device or self.device()
        )

    def get_text_tokenizer(self) -> Any:
        """The text tokenizer, also for a model with a processor."""
        if self.processor is not None and hasattr(self.processor, "tokenizer"):
            return self.processor.tokenizer
        return self.tokenizer

    def get_processor(self) -> Any:
        """The multimodal processor. Raises for a text-only model (use :meth:`get_tokenizer`)."""
        if self.processor is None:
            raise HookscopeError(
                f"{self.model_name!r} is a text-only model and has no processor; use get_tokenizer()."
            )
        return self.processor

    def image_mask(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        """``[batch, seq]`` True at image tokens (from the config's image token id), or None for
        a model without one. Image position items (``"all-image"``, ...) are resolved from it."""
        return None if self.image_layout is None else input_ids == self.image_layout.token

    def image_numbers(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        """``[batch, seq]`` long: k at the tokens of each example's k-th image (0-based),
        -1 elsewhere; None for a model without images. ``"first-image:k"`` and the other
        ``:k`` items address these images."""
        return None if self.image_layout is None else number_images(input_ids, self.image_layout)

    def image_text_block(
        self,
        direction: str = "text-to-image",
        layers: list[int] | None = None,
        heads: list[int] | str = "all",
    ) -> list[PatternEdit]:
        """Interventions that cut attention between text and image tokens in ``layers``
        (default: every layer) for ``heads``: ``"text-to-image"`` (text queries may not attend
        to image keys), ``"image-to-text"`` or ``"both"``. Pass them as ``interventions=``.

        Raises:
            PositionError: on a model without an image token.
        """
        if self.image_layout is None:
            raise PositionError(
                f"image_text_block: {self.model_name!r} has no image token id in its config "
                "(a text-only model)."
            )
        return image_text_block(self.model_map.n_layers, direction, layers, heads)

    def apply_chat_template(
        self, conversations: list, add_generation_prompt: bool = False, **template_kwargs: Any
    ) -> dict[str, Any]:
        """Render conversations (each a list of ``{"role", "content"}`` dicts; one conversation
        is a batch of one) with the tokenizer's own chat template and tokenize them into a padded
        batch for any call. The batch records each message's content span, so chat role items
        (``"user:last"``, ``"assistant:all"``, ``"turn-2:first"``) and text anchors resolve on it
        (see :mod:`hookscope.text_positions`)."""
        return tokenize_chat(
            self.get_text_tokenizer(), conversations, add_generation_prompt, **template_kwargs
        )

    def position_context(
        self, model_inputs: dict[str, Any], pivot_positions=None, seed: int = 0
    ) -> PositionContext:
        """What position items resolve against for these prepared inputs (see
        :class:`hookscope.positions.PositionContext`)."""
        ids = model_inputs["input_ids"]
        special = frozenset(getattr(self.tokenizer, "all_special_ids", None) or ())
        return PositionContext(
            model_inputs["attention_mask"], ids, pivot_positions, seed, self.image_layout, special,
            getattr(model_inputs, "text_layout", None), getattr(model_inputs, "text_missing", None),
        )  # fmt: skip

    def device(self) -> torch.device:
        """The device of the first parameter (where inputs go)."""
        return next(self.hf_model.parameters()).device

    def eval(self) -> HookedModel:
        """Put the model in evaluation mode. Returns self."""
        self.hf_model.eval()
        return self

    def get_module_from_string(self, component: str) -> nn.Module:
        """The real submodule for a path like ``"model.layers[0].self_attn"``."""
        return get_module(self.hf_model, component)

    def to_string_tokens(self, tokens: torch.Tensor | Sequence[int]) -> list:
        """Decode each token id on its own: ``[15496, 995]`` -> ``["Hello", " world"]``.

        A ``[batch, seq]`` tensor gives one list per row.
        """
        tokenizer = self.get_text_tokenizer()
        if isinstance(tokens, torch.Tensor):
            if tokens.dim() == 2:
                return [self.to_string_tokens(row) for row in tokens]
            tokens = tokens.tolist()
        return [tokenizer.decode([int(t)]) for t in tokens]

    # -- hooks ---------------------------------------------------------------------------------
    def register_forward_hook(
        self, component: str, hook_function: Callable[..., Any], when: str = "output"
    ) -> RemovableHandle:
        """Add a persistent hook on a module path; it runs in every forward until
        :meth:`remove_hooks` removes it. ``hook_function(module, args, output)``."""
        handle = register(self.hf_model, ModuleHook(component, hook_function, when))
        self._persistent_handles.append(handle)
        return handle

    @property
    def persistent_hooks(self) -> tuple[RemovableHandle, ...]:
        """The handles of the hooks added by :meth:`register_forward_hook` or :meth:`set_hooks`
        and not removed yet."""
        return tuple(h for h in self._persistent_handles if h.id in (h.hooks_dict_ref() or {}))

    def create_hooks(
        self,
        positions: ResolvedPositions,
        sink: dict[str, torch.Tensor],
        extraction_config: ExtractionConfig,
    ) -> list[ModuleHook]:
        """The module hooks that capture ``extraction_config``'s points at ``positions`` into
        ``sink`` (attention patterns and per-head q/k/v are read by hookscope's attention
        function instead; :meth:`forward` installs both)."""
        extraction = plan_extraction(extraction_config, self.model_map, self.dictionaries)
        return capture_hooks_for(self, extraction, extraction_config, positions, sink)

    # -- dictionaries --------------------------------------------------------------------------
    def attach_dictionary(self, dictionary: Any, replace: bool = False) -> None:
        """Make ``dictionary`` (a :class:`hookscope.dictionaries.Dictionary`) extractable by its
        name: ``ExtractionConfig(extract_features=[name])`` gives ``features_{name}`` and
        ``reconstruction_error_{name}`` (see :mod:`hookscope.dictionaries.features`). The object
        itself is kept (its tensors are copied to a layer's device once, when first used there).

        Raises:
            HookscopeError: a name already attached (unless ``replace``), or not a Dictionary.
            ActivationPointError: points out of range or widths that do not fit this model.
        """
        from .dictionaries import Dictionary
        from .dictionaries.features import dictionary_points

        if not isinstance(dictionary, Dictionary):
            raise HookscopeError(
                f"attach_dictionary takes a hookscope.dictionaries.Dictionary, got "
                f"{type(dictionary).__name__}; load files with load_dictionary(path)."
            )
        if dictionary.name in self._dictionaries and not replace:
            raise HookscopeError(
                f"a dictionary named {dictionary.name!r} is attached already; detach it, pass "
                "replace=True, or give this one another name."
            )
        dictionary_points(dictionary, self.model_map)
        self._dictionaries[dictionary.name] = dictionary

    def detach_dictionary(self, name: str) -> None:
        """Forget the attached dictionary ``name``.

        Raises:
            HookscopeError: naming the attached dictionaries when ``name`` is not one.
        """
        if name not in self._dictionaries:
            raise HookscopeError(
                f"no dictionary named {name!r} is attached; attached: {sorted(self._dictionaries)}."
            )
        del self._dictionaries[name]

    @property
    def dictionaries(self) -> dict[str, Any]:
        """The attached dictionaries by name (a copy)."""
        return dict(self._dictionaries)

    def self_check(self, remember: bool = True, print_report: bool = True):
        """Verify hookscope against this model (points, identities, padding, writes); returns a
        :class:`hookscope.checks.CheckReport` and prints it as a table."""
        from .checks import self_check

        return self_check(self, remember=remember, print_report=print_report)

    def register_interventions(self, interventions: Sequence[AnyIntervention]) -> None:
        """Keep ``interventions`` active in every later forward, extract_cache and generate
        (before those passed per call), until :meth:`clean_interventions`."""
        self._registered_interventions = as_intervention_list(interventions)

    @property
    def registered_interventions(self) -> tuple[AnyIntervention, ...]:
        """The interventions kept by :meth:`register_interventions` (applied first in every call)."""
        return tuple(self._registered_interventions)

    @property
    def executor(self) -> Executor:
        """What runs this model's planned calls (one call at a time per model object)."""
        return Executor.of(self.hf_model)

    def clean_interventions(self) -> None:
        """Drop the interventions kept by :meth:`register_interventions`."""
        self._registered_interventions = []

    def set_hooks(self, hooks: Iterable[ModuleHook | dict[str, Any]]) -> list[RemovableHandle]:
        """Register hooks now and return their handles (remove them with :meth:`remove_hooks`).
        Prefer ``forward(..., hooks=[...])``, which removes them whatever happens."""
        handles = []
        try:
            for hook in hooks:
                handles.append(register(self.hf_model, as_module_hook(hook)))
        except BaseException:
            self.remove_hooks(handles)
            raise
        self._persistent_handles.extend(handles)  # kept: they run in every later forward
        return handles

    def remove_hooks(self, hook_handlers: Iterable[RemovableHandle] | None = None) -> None:
        """Remove the given handles, or (with no argument) every persistent hook."""
        if hook_handlers is None:
            hook_handlers, self._persistent_handles = self._persistent_handles, []
        for handle in hook_handlers:
            handle.remove()

    # -- forward -------------------------------------------------------------------------------
    def forward(
        self,
        inputs: Any,
        target_token_positions: Sequence[PositionItem] | PositionItem | None = None,
        pivot_positions: Sequence[int] | None = None,
        extraction_config: ExtractionConfig | None = None,
        hooks: Sequence[ModuleHook | dict[str, Any]] | None = None,
        move_to_cpu: bool = False,
        seed: int = 0,
        interventions: Sequence[AnyIntervention] | None = None,
        example_offset: int = 0,
        names: Sequence[str] | None = None,
        compile: bool = False,
        **model_kwargs: Any,
    ) -> ActivationCache:
        """Run one batch and return the requested activations at the target positions.

        Args:
            inputs: tokenizer output (``input_ids``, ``attention_mask``), a dict, an id tensor,
                or raw text (a string or list of strings).
            target_token_positions: position items (see ``hookscope.positions``), resolved per
                example against its real tokens. With nothing requested it defaults to ``["all"]``
                (logits at every real position).
            pivot_positions: split points for ``"inputs-partition-k"`` items.
            extraction_config: what to extract; default: logits only.
            hooks: extra module hooks active for this call only (removed whatever happens);
                they run before hookscope's capture hooks, so the cache sees their effect.
            move_to_cpu: move the cache to the CPU before returning it.
            seed: base seed of random position items.
            interventions: ablations, patches, steering, pattern edits or custom functions active
                for this call (after any registered ones). The cache records each point's value
                after the interventions at that point.
            example_offset: index of this batch's first example in a dataset, so a ``Patch``
                whose source cache spans the dataset reads the right rows (``extract_cache``
                sets it).
            names: the points to extract by name instead of ``extraction_config``: cache keys or
                TransformerLens hook names (``["blocks.3.hook_resid_post"]``), see
                :meth:`ExtractionConfig.from_names`. The cache answers to the names given.
            compile: run the model under ``torch.compile`` with the capture inside the graph
                (see :mod:`hookscope.compiled`): the batch is padded to a length bucket (one
                compile per bucket, seconds to minutes each), the values are the eager path's to
                dtype tolerance. Module points and logits only; anything else raises
                :class:`~hookscope.compiled.CompileError`.
            **model_kwargs: passed to the HF forward.

        Returns:
            An :class:`ActivationCache` with ``[batch, positions, ...]`` tensors, ``logits``,
            ``mapping_index`` and ``position_mask``.

        Raises:
            PositionError, InputError, ActivationPointError: for bad input, before the forward.
        """
        check_model_kwargs(model_kwargs, self.hf_model, HookedModel.forward)
        config = _extraction_config(extraction_config, names, self.model_map)
        _check_flags(compile=compile, move_to_cpu=move_to_cpu)
        plan = plan_call(
            self,
            inputs,
            target_token_positions,
            config,
            interventions=interventions,
            hooks=list(hooks or []),
            pivot_positions=pivot_positions,
            seed=seed,
            example_offset=example_offset,
            model_kwargs=model_kwargs,
        )
        if compile:
            from .compiled import compiled_cache

            cache = compiled_cache(self, plan, interventions, hooks)
        else:
            cache = plan.cache(self.executor.run(plan), self.pad_token_id)
        return cache.cpu() if move_to_cpu else cache

    __call__ = forward

    @property
    def pad_token_id(self) -> int:
        """The tokenizer's pad id (0 when it has none): how padded caches are filled."""
        pad = getattr(self.get_text_tokenizer(), "pad_token_id", None)
        return int(pad) if pad is not None else 0

    # -- datasets ------------------------------------------------------------------------------
    def extract_cache(
        self,
        dataloader: Iterable[Any],
        target_token_positions: Sequence[PositionItem] | PositionItem,
        extraction_config: ExtractionConfig | None = None,
        batch_saver: Callable[[Any], dict[str, Any] | None] | None = None,
        move_to_cpu_after_forward: bool = True,
        pivot_positions: Sequence[int] | None = None,
        hooks: Sequence[ModuleHook | dict[str, Any]] | None = None,
        seed: int = 0,
        interventions: Sequence[AnyIntervention] | None = None,
        progress: bool = False,
        output_dir: str | None = None,
        sort_by_length: bool = False,
        names: Sequence[str] | None = None,
        overwrite: bool = False,
        store_dtype: str | None = None,
        compile: bool = False,
        **model_kwargs: Any,
    ) -> ActivationCache | ActivationStore:
        """Run :meth:`forward` over every batch and merge the results in order.

        Args:
            dataloader: an iterable of batches (dicts / ``BatchEncoding`` with ``input_ids`` and
                ``attention_mask``, plus any fields of your own), or a list of strings or of
                records (``{"text": ..., "label": ...}``), batched here by ``config.batch_size``.
            batch_saver: ``batch -> dict`` of things to keep per batch (labels, ids); merged
                across batches into ``cache["batch_saver"]``. For a list of records it gets the
                batch's records (a list of dicts), e.g.
                ``lambda records: {"label": torch.tensor([r["label"] for r in records])}``.
            move_to_cpu_after_forward: move each batch's activations off the accelerator at once.
            progress: show a progress bar (examples/s, tokens/s).
            output_dir: stream each batch to this folder (sharded safetensors + manifest, see
                ``hookscope.store``) instead of memory, and return an :class:`ActivationStore`.
                Started again with the same arguments, a killed run resumes after its last
                committed shard. A folder that holds other examples (or more), or another
                extraction, raises a ``StoreError`` naming the first difference.
            overwrite: replace whatever store ``output_dir`` holds (see ``hookscope.store``).
            sort_by_length: (lists of strings) batch prompts of similar length together to waste
                little on padding; results come back in the original order.
            names: the points by name instead of ``extraction_config`` (see :meth:`forward`).
            store_dtype: ``"float16"``, ``"bfloat16"`` or ``"float32"``: keep the activations
                (every floating-point value but ``batch_saver`` fields) in this dtype, in the
                store (recorded in its manifest; a resume must ask the same) or in memory.
                None: as computed.
            compile: run each batch compiled, the capture inside the graph (see
                :meth:`forward`); with ``sort_by_length`` few length buckets, few compiles.

        Returns:
            One :class:`ActivationCache` with every example in dataloader order, or the
            :class:`ActivationStore` written to ``output_dir``.
        """
        check_model_kwargs(model_kwargs, self.hf_model, HookedModel.extract_cache)
        _check_flags(
            compile=compile,
            sort_by_length=sort_by_length,
            overwrite=overwrite,
            progress=progress,
            move_to_cpu_after_forward=move_to_cpu_after_forward,
        )
        _check_output_dir(output_dir)
        config = _extraction_config(extraction_config, names, self.model_map)
        run = DatasetRun(
            self,
            normalize_items(target_token_positions),  # fail before the loop
            config,
            batch_saver=batch_saver,
            sort_by_length=sort_by_length,
            store_dtype=store_dtype,
            forward_options=dict(
                pivot_positions=pivot_positions,
                hooks=hooks,
                move_to_cpu=move_to_cpu_after_forward,
                seed=seed,
                interventions=interventions,
                compile=compile,
                **model_kwargs,
            ),
        )
        return run.extract(dataloader, output_dir, overwrite=overwrite, progress=progress)

    # -- generation ----------------------------------------------------------------------------
    def generate(
        self,
        inputs: Any,
        generation_config: Any = None,
        target_token_positions: Sequence[PositionItem] | None = None,
        return_text: bool = False,
        interventions: Sequence[AnyIntervention] | None = None,
        extraction_config: ExtractionConfig | None = None,
        **generate_kwargs: Any,
    ) -> torch.Tensor | list[str] | ActivationCache:
        """HF ``generate`` with interventions and extraction active (KV cache on or off).

        Args:
            inputs: text, ids, or a tokenizer batch (left padding for batched prompts).
            generation_config / **generate_kwargs: passed to HF ``generate``
                (``max_new_tokens``, ``do_sample``, ``use_cache``, ...).
            target_token_positions: prompt positions to extract at (with ``extraction_config``).
            return_text: return the decoded new text per example.
            interventions: applied with their ``apply_to``: ``"prompt"`` positions, each
                ``"generated"`` token, or ``"both"`` (after registered ones).
            extraction_config: module-level points to extract; the prompt call gives the target
                positions, each later call one slot (``mapping_index["generated"]``) for the token
                it feeds back.

        Returns:
            The sequences ``[batch, prompt + new]`` (or the new text when ``return_text``); with an
            ``extraction_config``, an :class:`ActivationCache` that also holds ``sequences``,
            ``generated_logits`` ``[batch, new, vocab]`` and ``text`` when asked.
        """
        from .generation import generate

        _check_flags(return_text=return_text)
        return generate(
            self,
            inputs,
            generation_config=generation_config,
            target_token_positions=target_token_positions,
            return_text=return_text,
            interventions=interventions,
            extraction_config=extraction_config,
            **generate_kwargs,
        )


def _check_flags(**flags: Any) -> None:
    """Refuse a flag that is not a bool (``compile="no"`` or ``"False"`` would compile)."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise InputError(f"{name} must be True or False, got {value!r}.")


def _check_output_dir(output_dir: Any) -> None:
    """Refuse an ``output_dir`` that is no path (``3`` would fail deep in ``os``)."""
    if output_dir is not None and not isinstance(output_dir, str | os.PathLike):
        raise InputError(
            f"output_dir must be a folder path (str or pathlib.Path) or None, got {output_dir!r}."
        )


def _is_compile_wrapper(model: nn.Module) -> bool:
    """Whether ``model`` is what ``torch.compile(module)`` returns (the module is ``_orig_mod``)."""
    from torch._dynamo.eval_frame import OptimizedModule

    return isinstance(model, OptimizedModule)


def _extraction_config(
    config: ExtractionConfig | None, names: Sequence[str] | None, model_map: ModelMap
) -> ExtractionConfig:
    """The config of a call that got ``extraction_config``, ``names`` or neither."""
    if config is not None and not isinstance(config, ExtractionConfig):
        raise InputError(
            f"extraction_config must be an ExtractionConfig, got {type(config).__name__}; "
            "for a dict write ExtractionConfig(**d)."
        )
    if names is None:
        return config or ExtractionConfig()
    if config is not None:
        raise InputError(
            "pass names or extraction_config, not both; for more options use "
            "extraction_config=ExtractionConfig.from_names(names, hm.model_map, save_logits=False)."
        )
    return ExtractionConfig.from_names(names, model_map)
