"""Model support: declarative specs per ``model_type`` plus structural discovery."""

from .model_map import LayerParts, ModelMap, resolve_architecture
from .specs import SPECS, ArchSpec

__all__ = ["SPECS", "ArchSpec", "LayerParts", "ModelMap", "resolve_architecture"]
