"""Learned dictionaries (sparse autoencoders and transcoders) as data, their loaders, their
features as extractable points, and splicing them into the forward."""

from .core import ACTIVATIONS, Dictionary
from .features import dense_features, error_key, feature_ids_key, feature_key
from .loaders import detect_format, load_dictionary, save_dictionary
from .splice import Splice

__all__ = [
    "ACTIVATIONS",
    "Dictionary",
    "Splice",
    "dense_features",
    "detect_format",
    "error_key",
    "feature_ids_key",
    "feature_key",
    "load_dictionary",
    "save_dictionary",
]
