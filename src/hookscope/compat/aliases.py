"""easyroutine's spellings of ``ExtractionConfig`` / ``HookedModelConfig`` fields and of point
names, rewritten to hookscope's (registered in ``keywords.FIELD_ALIASES`` and
``points.POINT_ALIASES``; each use notes hookscope's spelling once)."""

from __future__ import annotations

import re
from typing import Any

from .notes import note

# easyroutine 1.1.5's per-layer q/k/v cache keys: queries_L3 is hookscope's queries_3.
_QKV_NAME = re.compile(r"^(?P<kind>queries|keys|values)_L(?P<layer>\d+)$")


def point_from_reference(name: str) -> str | None:
    """hookscope's key for easyroutine's ``queries_L{l}`` / ``keys_L{l}`` / ``values_L{l}``."""
    if (match := _QKV_NAME.match(name)) is None:
        return None
    key = f"{match['kind']}_{match['layer']}"
    note(repr(name), repr(key))
    return key


def extraction_fields(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``ExtractionConfig`` keywords in easyroutine's spelling -> hookscope's.

    ``avg`` -> ``extract_avg``; ``extract_head_values_projected`` ->
    ``extract_values_vectors_projected``; ``avg_over_example`` turns the pattern and projected
    value requests into their running means over examples (``extract_avg_attn_pattern``,
    ``extract_avg_values_vectors_projected``), as easyroutine does.

    Raises:
        KeywordError: for easyroutine fields hookscope does not implement yet, naming what to
            use instead.
    """
    kwargs = dict(kwargs)
    for old, new in (
        ("avg", "extract_avg"),
        ("extract_head_values_projected", "extract_values_vectors_projected"),
    ):
        if old in kwargs:
            note(f"ExtractionConfig({old}=...)", f"ExtractionConfig({new}=...)")
            kwargs[new] = kwargs.pop(old)
    if kwargs.pop("avg_over_example", False):
        note(
            "ExtractionConfig(avg_over_example=True)",
            "extract_avg_attn_pattern / extract_avg_values_vectors_projected",
        )
        for per_example, mean in (
            ("extract_attn_pattern", "extract_avg_attn_pattern"),
            ("extract_values_vectors_projected", "extract_avg_values_vectors_projected"),
        ):
            if kwargs.pop(per_example, False):
                kwargs[mean] = True
    return kwargs


def model_config_fields(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``HookedModelConfig`` keywords: ``attn_implementation="custom_eager"`` (easyroutine's
    swapped-in attention modules) becomes ``"eager"``: hookscope reads patterns through
    transformers' attention interface and needs no custom modules."""
    if kwargs.get("attn_implementation") == "custom_eager":
        note(
            "attn_implementation='custom_eager'",
            "'eager' (or any kernel)",
            "hookscope reads attention patterns with any kernel and needs no custom modules",
        )
        kwargs = {**kwargs, "attn_implementation": "eager"}
    return kwargs


# easyroutine keywords of forward / extract_cache that hookscope does not take: what to do instead.
KEYWORD_HINTS = {
    "vocabulary_index": (
        "input-embedding gradients are not a cache key in hookscope yet; run forward with "
        "ExtractionConfig(keep_gradient=True) and hooks=[ModuleHook(hm.model_map.embed, keep)], "
        "where keep(module, args, output) calls output.retain_grad() and keeps output; "
        "backward() on a logit then fills output.grad (see docs/migrating-from-easyroutine.md)."
    ),
    "external_cache": (
        "not needed: running means (extract_avg_attn_pattern, ...) accumulate in the returned "
        "cache; merge caches with cache.cat(other)."
    ),
    "batch_idx": "not needed: running means accumulate in the returned cache.",
}


def register() -> None:
    """Add the rewriters to hookscope's registries (once)."""
    from .. import keywords, points

    keywords.KEYWORD_HINTS.update(KEYWORD_HINTS)
    keywords.FIELD_ALIASES["ExtractionConfig"] = extraction_fields
    keywords.FIELD_ALIASES["HookedModelConfig"] = model_config_fields
    if point_from_reference not in points.POINT_ALIASES:
        points.POINT_ALIASES.append(point_from_reference)
