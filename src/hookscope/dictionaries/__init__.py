"""Learned dictionaries (sparse autoencoders and transcoders) as data, and their loaders."""

from .core import ACTIVATIONS, Dictionary
from .interventions import (
    FeatureAblation,
    FeatureClamp,
    FeatureIntervention,
    FeaturePatch,
    FeatureScale,
    FeatureSteer,
    feature_intervention_from_dict,
)
from .patching import FeatureAttribution, feature_attribution, feature_patching

__all__ = [
    "ACTIVATIONS",
    "Dictionary",
    "FeatureAblation",
    "FeatureAttribution",
    "FeatureClamp",
    "FeatureIntervention",
    "FeaturePatch",
    "FeatureScale",
    "FeatureSteer",
    "feature_attribution",
    "feature_intervention_from_dict",
    "feature_patching",
]
