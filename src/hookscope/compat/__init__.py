"""Moving from easyroutine: its spellings, on top of hookscope.

``from hookscope.compat import HookedModel, ExtractionConfig, Intervention, LogitLens`` stands
for ``from easyroutine.interpretability import ...``. Importing this package (``import
hookscope`` does it, last) registers easyroutine's forms into hookscope's small registries, so
they are accepted everywhere; the core modules never import it:

* ``keywords.FIELD_ALIASES``: ``ExtractionConfig(avg=..., avg_over_example=...,
  extract_head_values_projected=...)``, ``HookedModelConfig(attn_implementation="custom_eager")``;
* ``points.POINT_ALIASES``: ``queries_L{l}`` / ``keys_L{l}`` / ``values_L{l}`` (cache keys,
  extraction and intervention points);
* ``interventions.CONVERTERS``: ``Intervention(type=..., activation=..., ...)`` and its dicts;
* ``hooks.HOOK_CONVERTERS``: ``{"component", "intervention"}`` hook dicts, with its
  ``(module, args, kwargs, output)`` signature;
* methods: ``HookedModel.compute_patching / predict / model_config / hf_tokenizer /
  is_multimodal / get_lm_head / get_last_layernorm / set_custom_modules /
  restore_original_modules / assert_module_exists / assert_all_modules_exist``,
  ``ActivationCache.memory_size(key) / memory_tree() / deferred_mode() / is_empty() / cuda()``.

Each easyroutine spelling, when used, warns once (:class:`ReferenceSpellingWarning`) naming
hookscope's. See ``docs/migrating-from-easyroutine.md``.
"""

from __future__ import annotations

from ..config import ExtractionConfig, HookedModelConfig
from ..hooked_model import HookedModel
from . import aliases, model, reference
from .lens import LogitLens
from .notes import ReferenceSpellingWarning
from .patching import compute_patching
from .reference import Intervention, from_reference, hook_from_reference, looks_like_reference

aliases.register()
reference.register()
model.register()

__all__ = [
    "ExtractionConfig",
    "HookedModel",
    "HookedModelConfig",
    "Intervention",
    "LogitLens",
    "ReferenceSpellingWarning",
    "compute_patching",
    "from_reference",
    "hook_from_reference",
    "looks_like_reference",
]
