"""Internal: unknown keywords raise: a misspelled option must never be ignored.

hookscope's entry points take extra keywords for the HF model (``forward(..., output_router_logits=True)``).
HF forwards accept ``**kwargs`` and drop what they do not know, so a misspelled hookscope option
(``extract_config=`` for ``extraction_config=``) would run and return the wrong thing. Here an
extra keyword passes only when the model's ``forward`` names it; anything else raises, naming the
closest valid keyword.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import typing
from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

from .errors import KeywordError


def closest(word: str, valid: Iterable[str]) -> str | None:
    """The valid keyword closest to ``word`` (None when nothing is close)."""
    matches = difflib.get_close_matches(word, sorted(set(valid)), n=1, cutoff=0.6)
    return matches[0] if matches else None


def raise_unknown_keyword(
    word: str, valid: Iterable[str], where: str, also_close: Iterable[str] = ()
) -> typing.NoReturn:
    """Raise the error for ``word``, naming the closest of ``valid`` (or of ``also_close``,
    valid keywords too many to list)."""
    valid = sorted(set(valid))
    guess = closest(word, [*valid, *also_close])
    hint = f"; did you mean {guess!r}?" if guess else ""
    raise KeywordError(
        f"{where} got an unexpected keyword argument {word!r}{hint} Valid keywords: {valid}."
    )


def own_keywords(function: Callable[..., Any]) -> set[str]:
    """The named parameters of ``function`` (what a caller may spell)."""
    return {
        name
        for name, p in inspect.signature(function).parameters.items()
        if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and name != "self"
    }


@functools.cache
def typed_kwargs(function: Callable[..., Any]) -> frozenset[str]:
    """The keys of a ``**kwargs: Unpack[SomeTypedDict]`` parameter (transformers 5 forwards take
    ``output_hidden_states``, ``output_attentions``... this way); empty for a bare ``**kwargs``."""
    keys: set[str] = set()
    for p in inspect.signature(function).parameters.values():
        if p.kind is not p.VAR_KEYWORD:
            continue
        for typed in typing.get_args(p.annotation):
            keys |= set(getattr(typed, "__required_keys__", ()))
            keys |= set(getattr(typed, "__optional_keys__", ()))
    return frozenset(keys)


#: What to use instead of another library's keywords that hookscope does not take (registered by
#: :mod:`hookscope.compat`): keyword -> the hint its error gives.
KEYWORD_HINTS: dict[str, str] = {}

#: hookscope's own options set elsewhere than where a caller looks: keyword -> where it lives.
MISPLACED_KEYWORDS: dict[str, str] = {
    "batch_size": (
        "extract_cache batches a list of prompts by the model's config: set "
        "hm.config.batch_size = 32 (forward runs its inputs as one batch; a DataLoader brings "
        "its own batches)."
    ),
}


def check_model_kwargs(
    model_kwargs: dict[str, Any],
    model: nn.Module,
    entry_point: Callable[..., Any],
    extra_valid: Iterable[str] = (),
) -> None:
    """Raise for any of ``model_kwargs`` that ``model.forward`` does not name.

    Args:
        model_kwargs: the extra keywords an entry point received.
        model: the HF model they would be passed to.
        entry_point: the hookscope function that received them (its own keywords are suggested).
        extra_valid: other keywords that pass (e.g. generation options).

    Raises:
        KeywordError: naming the unknown keyword, the closest valid one and the valid ones.
    """
    from .inputs import model_input_names

    if not model_kwargs:
        return
    extra_valid = set(extra_valid)
    named = model_input_names(model) | typed_kwargs(type(model).forward)
    accepted = named | extra_valid
    for word in model_kwargs:
        if word not in accepted and word in KEYWORD_HINTS:
            raise KeywordError(
                f"{entry_point.__name__}() does not take {word!r} (easyroutine's keyword): "
                f"{KEYWORD_HINTS[word]}"
            )
        if word not in accepted and word in MISPLACED_KEYWORDS:
            raise KeywordError(
                f"{entry_point.__name__}() does not take {word!r}: {MISPLACED_KEYWORDS[word]}"
            )
        if word not in accepted:
            valid = own_keywords(entry_point) | named
            raise_unknown_keyword(word, valid, f"{entry_point.__name__}()", extra_valid)


#: Rewriters of other libraries' field spellings, by dataclass name (registered by
#: :mod:`hookscope.compat`): each takes the keyword arguments and returns them in hookscope's
#: spelling, before unknown fields are rejected.
FIELD_ALIASES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {}


def reject_unknown_fields(cls: type) -> type:
    """Make a dataclass raise :class:`KeywordError` for an unknown field, naming the closest
    one (``ExtractionConfig(extract_resid_outt=True)`` names ``extract_resid_out``).
    Spellings registered in :data:`FIELD_ALIASES` are rewritten first."""
    init = cls.__init__
    valid = own_keywords(init)

    @functools.wraps(init)
    def checked_init(self, *args: Any, **kwargs: Any) -> None:
        if (rewrite := FIELD_ALIASES.get(cls.__name__)) is not None:
            kwargs = rewrite(kwargs)
        for word in kwargs:
            if word not in valid:
                raise_unknown_keyword(word, valid, cls.__name__)
        init(self, *args, **kwargs)

    cls.__init__ = checked_init
    return cls
