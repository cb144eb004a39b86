"""Learned dictionaries (sparse autoencoders and transcoders) as data, their loaders, their
features as extractable points, splicing them into the forward, feature interventions,
feature patching and attribution."""

from .core import ACTIVATIONS, Dictionary
from .features import dense_features, error_key, feature_ids_key, feature_key
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
from .loaders import detect_format, load_dictionary, save_dictionary
from .patching import FeatureAttribution, feature_attribution, feature_patching
from .splice import Splice

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
    "Splice",
    "attribution_rows",
    "dense_features",
    "detect_format",
    "error_key",
    "feature_attribution",
    "feature_ids_key",
    "feature_intervention_from_dict",
    "feature_key",
    "feature_patching",
    "load_dictionary",
    "save_dictionary",
]
