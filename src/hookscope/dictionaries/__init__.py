"""Learned dictionaries (sparse autoencoders and transcoders) as data, and their loaders."""

from .core import ACTIVATIONS, Dictionary
from .graphs import AttributionRows, FeatureTarget, LogitTarget, attribution_rows
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
    "AttributionRows",
    "Dictionary",
    "FeatureAblation",
    "FeatureAttribution",
    "FeatureClamp",
    "FeatureIntervention",
    "FeaturePatch",
    "FeatureScale",
    "FeatureSteer",
    "FeatureTarget",
    "LogitTarget",
    "attribution_rows",
    "feature_attribution",
    "feature_intervention_from_dict",
    "feature_patching",
]
