"""hookscope: look inside HuggingFace transformers and change them while they run.

Public names::

    from hookscope import HookedModel, HookedModelConfig, ExtractionConfig, ActivationCache
"""

from .archs import ArchSpec, ModelMap
from .cache import ActivationCache
from .config import ExtractionConfig, HookedModelConfig
from .errors import (
    ActivationPointError,
    ArchitectureError,
    HookscopeError,
    InputError,
    PositionError,
    StoreError,
)
from .hooked_model import HookedModel
from .hooks import ModuleHook
from .points import KINDS, Point, parse_point
from .store import ActivationSaver, ActivationStore

__version__ = "0.1.0"

__all__ = [
    "KINDS",
    "ActivationCache",
    "ActivationPointError",
    "ActivationSaver",
    "ActivationStore",
    "ArchSpec",
    "ArchitectureError",
    "ExtractionConfig",
    "HookedModel",
    "HookedModelConfig",
    "HookscopeError",
    "InputError",
    "ModelMap",
    "ModuleHook",
    "Point",
    "PositionError",
    "StoreError",
    "__version__",
    "parse_point",
]
