"""Saved results are strict JSON: NaN and +/-inf survive a round trip as the documented strings.

Ground truths: a strict JSON parser (no NaN / Infinity literals), the values saved, and
``math.isnan`` / ``math.isinf`` of what comes back.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from hookscope import HookscopeError
from hookscope.patching import PatchingResult
from hookscope.results import LensSummary, load_result, save_lens

NAN, INF = float("nan"), float("inf")


def strict_json(text: str):
    """``json.loads`` that refuses the non-standard NaN / Infinity / -Infinity literals."""

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def same_floats(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Exactly equal, NaN where NaN (torch.equal says NaN != NaN)."""
    return a.shape == b.shape and bool(
        torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))
    )


def patching_result() -> PatchingResult:
    values = torch.tensor([[0.25, NAN, INF], [-INF, 1 / 3, -0.0]])
    per_example = torch.stack([values, torch.tensor([[NAN, 1.0, -INF], [2.5, INF, 0.1]])])
    result = PatchingResult(
        values, per_example, ["layer", "head"], {"layer": [0, 1], "head": [0, 1, 2]},
        torch.tensor([INF, 2.0]), torch.tensor([NAN, -1.0]), "logit_diff", True, "activation", 4,
    )  # fmt: skip
    result.context = {"clean": "NaN", "corrupt": "b"}  # strings in context stay strings
    return result


def test_a_patching_result_with_nan_and_inf_is_strict_json_and_round_trips(tmp_path):
    result = patching_result()
    path = result.save(tmp_path / "r.json")
    data = strict_json(path.read_text(encoding="utf-8"))  # any JSON parser reads it
    assert data["values"] == [
        [0.25, "NaN", "Infinity"],
        ["-Infinity", float(result.values[1, 1]), -0.0],
    ]
    assert data["clean_metric"] == ["Infinity", 2.0] and data["corrupt_metric"] == ["NaN", -1.0]
    loaded = PatchingResult.load(path)
    for name in ("values", "per_example", "clean_metric", "corrupt_metric"):
        assert same_floats(getattr(loaded, name), getattr(result, name)), name
    assert math.isinf(loaded.values[0, 2]) and loaded.values[0, 2] > 0
    assert math.isinf(loaded.values[1, 0]) and loaded.values[1, 0] < 0
    assert math.isnan(loaded.per_example[1, 0, 0]) and math.isnan(loaded.corrupt_metric[0])
    assert loaded.context == {"clean": "NaN", "corrupt": "b"}  # not taken for a number


def test_a_lens_summary_with_nan_and_inf_is_strict_json_and_round_trips(tmp_path):
    summary = LensSummary(
        point="resid_out", layers=[0, 1], tokens=["a", "b"],
        top_tokens=[[["x"], ["y"]], [["z"], ["w"]]],
        top_probs=[[[0.5], [NAN]], [[1.0], [0.25]]],
        kl=[[INF, 0.0], [NAN, 0.125]],
        target="x", target_prob=[[0.5, -INF], [0.0, 1.0]], target_rank=[[0, 3], [1, 2]],
    )  # fmt: skip
    path = save_lens(summary, tmp_path / "lens.json")
    data = strict_json(path.read_text(encoding="utf-8"))
    assert data["kl"] == [["Infinity", 0.0], ["NaN", 0.125]]
    loaded = load_result(path)
    assert math.isinf(loaded.kl[0][0]) and loaded.kl[0][0] > 0 and math.isnan(loaded.kl[1][0])
    assert loaded.kl[0][1:] == [0.0] and loaded.kl[1][1] == 0.125
    assert math.isnan(loaded.top_probs[0][1][0]) and loaded.top_probs[1] == [[1.0], [0.25]]
    assert loaded.target_prob[0][1] == -INF and loaded.target_rank == [[0, 3], [1, 2]]


def test_a_non_finite_float_in_context_is_saved_as_its_string(tmp_path):
    result = patching_result()
    result.context = {"threshold": INF, "nested": {"score": NAN}}
    path = result.save(tmp_path / "r.json")
    strict_json(path.read_text(encoding="utf-8"))
    assert PatchingResult.load(path).context == {
        "threshold": "Infinity",
        "nested": {"score": "NaN"},
    }


def test_older_files_with_bare_nan_literals_still_load(tmp_path):
    result = patching_result()
    data = strict_json(result.save(tmp_path / "r.json").read_text(encoding="utf-8"))
    data["values"] = [[0.25, NAN, INF], [-INF, 0.5, 0.0]]  # as json.dumps(allow_nan=True) wrote
    old = tmp_path / "old.json"
    old.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="not strict JSON: NaN"):
        strict_json(old.read_text())  # bare literals, as before
    expected = torch.tensor([[0.25, NAN, INF], [-INF, 0.5, 0.0]])
    assert same_floats(load_result(old).values, expected)


def test_another_string_in_a_number_grid_is_refused_naming_the_field(tmp_path):
    data = strict_json(patching_result().save(tmp_path / "r.json").read_text(encoding="utf-8"))
    data["values"][0][1] = "nan"  # only the three documented spellings are numbers
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(HookscopeError, match="field 'values' is not a grid of numbers"):
        load_result(bad)


def test_a_lens_summary_reloads_its_floats_exactly(tmp_path):
    third, tiny = 1 / 3, 1e-300  # neither fits a float32
    summary = LensSummary(
        point="resid_out", layers=[0], tokens=["a"], top_tokens=[[["x"]]],
        top_probs=[[[third]]], kl=[[tiny]], target="x", target_prob=[[third]], target_rank=[[0]],
    )  # fmt: skip
    loaded = load_result(save_lens(summary, tmp_path / "lens.json"))
    assert loaded.top_probs == [[[third]]] and loaded.kl == [[tiny]]
    assert loaded.target_prob == [[third]] and loaded.target_rank == [[0]]
