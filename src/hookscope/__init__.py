"""hookscope: look inside HuggingFace transformers and change them while they run.

The public API is what this package exports (``hookscope.__all__``)::

    from hookscope import HookedModel, ExtractionConfig          # extract
    from hookscope import Ablation, Patch, Steer, PatternEdit    # intervene
    from hookscope import activation_patching, logit_lens        # analyse

Modules whose docstring says *internal* (``pipeline``, ``editing``, ``capture``, ``plan``,
``assemble``, ``scoped_attention``, ``window``, ``keywords``) may change between versions; the
reference design's (easyroutine's) spellings live in :mod:`hookscope.compat`, which sits on
top: it registers them into small registries in the core, which never imports it.
"""

from .analysis import (
    HeadScores,
    LogitAttribution,
    ResidualDecomposition,
    decompose_resid,
    detect_heads,
    logit_attribution,
    repeated_random_tokens,
)
from .archs import ArchSpec, ModelMap
from .cache import ActivationCache
from .config import ExtractionConfig, HookedModelConfig
from .dictionaries import Dictionary, Splice, load_dictionary, save_dictionary
from .errors import (
    ActivationPointError,
    ArchitectureError,
    HookscopeError,
    InputError,
    KeywordError,
    PositionError,
)
from .hooked_model import HookedModel
from .hooks import ModuleHook
from .interventions import (
    Ablation,
    Custom,
    InterventionContext,
    Patch,
    PatternEdit,
    Steer,
    intervention_from_dict,
)
from .lens import LensResult, logit_lens
from .patching import PatchingResult, activation_patching, attribution_patching
from .points import KINDS, Point, parse_point
from .steering import steering_vector
from .store import ActivationStore, StoreError

__version__ = "0.1.0"

__all__ = [
    "KINDS",
    "Ablation",
    "ActivationCache",
    "ActivationPointError",
    "ActivationStore",
    "ArchSpec",
    "ArchitectureError",
    "Custom",
    "Dictionary",
    "HeadScores",
    "ExtractionConfig",
    "HookedModel",
    "HookedModelConfig",
    "HookscopeError",
    "InputError",
    "InterventionContext",
    "KeywordError",
    "LensResult",
    "LogitAttribution",
    "ModelMap",
    "ModuleHook",
    "Patch",
    "PatchingResult",
    "PatternEdit",
    "Point",
    "PositionError",
    "ResidualDecomposition",
    "Splice",
    "Steer",
    "steering_vector",
    "StoreError",
    "__version__",
    "activation_patching",
    "attribution_patching",
    "decompose_resid",
    "detect_heads",
    "intervention_from_dict",
    "load_dictionary",
    "logit_attribution",
    "logit_lens",
    "parse_point",
    "repeated_random_tokens",
    "save_dictionary",
]

# Last, on top of every core module: registers easyroutine's spellings (hookscope.compat).
from . import compat  # noqa: E402, F401
