"""The one-time note for each easyroutine spelling used: it names hookscope's spelling."""

from __future__ import annotations

import os
import sys
import warnings

_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ReferenceSpellingWarning(FutureWarning):
    """An easyroutine spelling was used; the message names hookscope's. Shown once per spelling
    (a ``FutureWarning``, so it is visible by default; silence it with
    ``warnings.filterwarnings("ignore", category=ReferenceSpellingWarning)``)."""


_NOTED: set[str] = set()


def note(old: str, new: str, why: str = "") -> None:
    """Warn once per process that ``old`` is easyroutine's spelling of hookscope's ``new``."""
    if old in _NOTED:
        return
    _NOTED.add(old)
    extra = f" ({why})" if why else ""
    warnings.warn(
        f"{old} is easyroutine's spelling; hookscope's is {new}{extra}.",
        ReferenceSpellingWarning,
        stacklevel=_caller_level(),
    )


def _caller_level() -> int:
    """The ``stacklevel`` of the first frame outside hookscope (the user's line)."""
    frame, level = sys._getframe(2), 2
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    return level


def forget_notes() -> None:
    """Show every note again (tests)."""
    _NOTED.clear()
