"""The exceptions hookscope raises.

Every error caused by bad input is a :class:`HookscopeError`, which is also a ``ValueError`` so that
code written against the reference design (which raised plain ``ValueError``) keeps working. Each
message names the bad value and the valid choices.
"""

from __future__ import annotations

from collections.abc import Iterable


class HookscopeError(ValueError):
    """Base class of every input error hookscope raises."""


class PositionError(HookscopeError):
    """A token position item could not be resolved (unknown name, out of range, ...)."""


class ActivationPointError(HookscopeError):
    """An activation point name is malformed, unknown, or out of range for this model."""


class ArchitectureError(HookscopeError):
    """A part of the model (layers, attention, MLP, norms, ...) could not be found."""


class InputError(HookscopeError):
    """The model inputs are malformed (missing attention mask under padding, wrong shapes, ...)."""


class CompileError(HookscopeError):
    """A request the compiled path cannot run (run it with ``compile=False``)."""


class StoreError(HookscopeError):
    """An activation store that is missing, foreign, incomplete, corrupted, being written by
    another process, or holding other data or another extraction than the one asked for."""


def choices(values: Iterable[object], limit: int = 12) -> str:
    """Format valid choices for an error message: ``'a', 'b', 'c' (+3 more)``."""
    values = [repr(v) for v in values]
    shown = ", ".join(values[:limit])
    return shown + (f" (+{len(values) - limit} more)" if len(values) > limit else "")


class KeywordError(HookscopeError, TypeError):
    """A keyword argument or config field that does not exist (a misspelling would otherwise be
    ignored); also a ``TypeError``, as Python raises for unknown keywords."""
