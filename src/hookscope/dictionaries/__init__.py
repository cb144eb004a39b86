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

__all__ = [
    "ACTIVATIONS",
    "Dictionary",
    "FeatureAblation",
    "FeatureClamp",
    "FeatureIntervention",
    "FeaturePatch",
    "FeatureScale",
    "FeatureSteer",
    "feature_intervention_from_dict",
]
