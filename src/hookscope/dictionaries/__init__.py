"""Learned dictionaries (sparse autoencoders and transcoders) as data, and their loaders."""

from .core import ACTIVATIONS, Dictionary

__all__ = ["ACTIVATIONS", "Dictionary"]
