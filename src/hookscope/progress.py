"""Internal: progress bars for long operations (dataset extraction and store writes, patching
sweeps), in rows/s with a tokens/s readout.

A bar is drawn only when asked (``progress=True``) *and* someone can see it: stderr is a
terminal, or the code runs in a Jupyter kernel (tqdm's notebook widget). It always goes to
stderr, never stdout, so a command's printed output (JSON included) stays clean, and it appears
only once the operation has run for ``delay`` seconds, so quick calls print nothing.
"""

from __future__ import annotations

import sys
from typing import Any

DELAY = 2.0  # seconds an operation runs before its bar appears


def _in_notebook() -> bool:
    """Whether this runs in a Jupyter kernel (whose stderr is not a terminal but shows bars)."""
    shell = sys.modules.get("IPython")
    get = getattr(shell, "get_ipython", None)
    return get is not None and type(get()).__name__ == "ZMQInteractiveShell"


def visible(progress: bool) -> bool:
    """Whether a bar asked for with ``progress`` can be seen (see the module docstring)."""
    if not progress:
        return False
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty()) or _in_notebook()


class ProgressBar:
    """A tqdm bar on stderr counting rows (``unit``) with tokens/s beside it, or nothing.

    Args:
        total: rows expected (None when unknown); initial: rows already done (a resumed run).
        description: the bar's label, e.g. ``"extract"``.
        enabled: ``progress`` as the caller was given it (shown only when :func:`visible`).
        delay: seconds before the bar first appears (default :data:`DELAY`).
    """

    def __init__(
        self,
        total: int | None,
        description: str,
        enabled: bool,
        unit: str = "ex",
        initial: int = 0,
        delay: float | None = None,
    ):
        self.bar: Any = None
        self.tokens = 0
        if visible(enabled):
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total,
                initial=initial,
                unit=unit,
                desc=description,
                file=sys.stderr,
                delay=DELAY if delay is None else delay,
                dynamic_ncols=True,
            )

    def update(self, rows: int, tokens: int = 0) -> None:
        """``rows`` more done, holding ``tokens`` real tokens."""
        if self.bar is None:
            return
        self.tokens += tokens
        self.bar.update(rows)
        elapsed = max(self.bar.format_dict["elapsed"], 1e-9)
        self.bar.set_postfix_str(f"{self.tokens / elapsed:.0f} tok/s", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def real_tokens(batch: Any) -> int:
    """The real (attention-mask) tokens of a batch, 0 when it has no mask."""
    mask = batch.get("attention_mask") if hasattr(batch, "get") else None
    return int(mask.sum()) if hasattr(mask, "sum") else 0
