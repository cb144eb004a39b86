"""The public API is what the package root exports, and each export is the real object."""

from __future__ import annotations

import hookscope


def test_root_exports_the_api():
    from hookscope.interventions import Ablation, Patch, PatternEdit, Steer
    from hookscope.lens import logit_lens
    from hookscope.patching import activation_patching, attribution_patching

    for name in hookscope.__all__:
        assert hasattr(hookscope, name), name
    assert hookscope.Ablation is Ablation and hookscope.Patch is Patch
    assert hookscope.Steer is Steer and hookscope.PatternEdit is PatternEdit
    assert hookscope.activation_patching is activation_patching
    assert hookscope.attribution_patching is attribution_patching
    assert hookscope.logit_lens is logit_lens


def test_internal_modules_say_so():
    import importlib

    for name in ("pipeline", "editing", "assemble", "scoped_attention", "window", "keywords"):
        module = importlib.import_module(f"hookscope.{name}")
        assert module.__doc__.startswith("Internal:"), name
