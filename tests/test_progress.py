"""Progress bars: on stderr only, only when someone can see them, with rows/s and tokens/s."""

from __future__ import annotations

import io
import sys

import pytest
import torch
from tiny_models import PROMPTS

from hookscope import ExtractionConfig, progress
from hookscope.patching import activation_patching


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _terminal(monkeypatch) -> _Terminal:
    """stderr as a terminal, bars shown at once (called in the test body: pytest's capture
    replaces sys.stderr after the fixtures are set up)."""
    fake = _Terminal()
    monkeypatch.setattr(sys, "stderr", fake)
    monkeypatch.setattr(progress, "DELAY", 0.0)
    return fake


def _pair():
    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 8, 10]])
    clean = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    corrupt = {"input_ids": ids.flip(1), "attention_mask": torch.ones_like(ids)}
    return clean, corrupt


def test_patching_sweep_bar_goes_to_stderr_with_rates(tiny_llama, monkeypatch, capsys):
    terminal = _terminal(monkeypatch)
    clean, corrupt = _pair()
    result = activation_patching(
        tiny_llama, clean, corrupt, ([3, 3], [4, 4]), batch_size=3, progress=True
    )
    shown = terminal.getvalue()
    rows = 2 * result.values.numel()  # examples x sites
    assert "patching sweep: 100%" in shown and f"{rows}/{rows}" in shown, shown
    assert "row/s" in shown and "tok/s" in shown, shown
    assert capsys.readouterr().out == ""  # stdout stays clean (CLI JSON output)


def test_extract_bar_counts_examples(tiny_llama, monkeypatch, capsys):
    terminal = _terminal(monkeypatch)
    tiny_llama.extract_cache(
        PROMPTS[:3], ["last"], ExtractionConfig(extract_resid_out=True), progress=True
    )
    shown = terminal.getvalue()
    assert "extract: 100%" in shown and "3/3" in shown and "tok/s" in shown, shown
    assert capsys.readouterr().out == ""


def test_no_bar_when_off_or_not_a_terminal(tiny_llama, monkeypatch, capsys):
    monkeypatch.setattr(progress, "DELAY", 0.0)
    clean, corrupt = _pair()
    activation_patching(tiny_llama, clean, corrupt, ([3, 3], [4, 4]), progress=True)
    captured = capsys.readouterr()  # pytest's stderr is not a terminal
    assert captured.err == "" and captured.out == ""
    fake = _Terminal()
    monkeypatch.setattr(sys, "stderr", fake)
    activation_patching(tiny_llama, clean, corrupt, ([3, 3], [4, 4]), progress=False)
    assert fake.getvalue() == ""
    assert not progress.visible(False) and progress.visible(True)


def test_lens_over_prompts_in_batches_is_the_one_batch_lens(tiny_llama, monkeypatch, capsys):
    from hookscope import HookscopeError, logit_lens

    whole = logit_lens(tiny_llama, list(PROMPTS), ["last", 0])
    terminal = _terminal(monkeypatch)
    batched = logit_lens(tiny_llama, list(PROMPTS), ["last", 0], batch_size=2, progress=True)
    torch.testing.assert_close(batched.logits, whole.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(batched.final.float(), whole.final.float(), rtol=1e-4, atol=1e-4)
    assert batched.tokens == whole.tokens and batched.layers == whole.layers
    shown = terminal.getvalue()
    n = len(PROMPTS)
    assert "logit lens: 100%" in shown and f"{n}/{n}" in shown and "tok/s" in shown, shown
    assert capsys.readouterr().out == ""
    lengths = [len(tiny_llama.prepare_inputs(p)["input_ids"][0]) for p in PROMPTS]
    assert len(set(lengths)) > 1  # so "all" selects different widths per batch
    with pytest.raises(HookscopeError, match="select a different number of slots"):
        logit_lens(tiny_llama, sorted(PROMPTS, key=len), ["all"], batch_size=1)
    with pytest.raises(HookscopeError, match="batches a list of prompts"):
        logit_lens(tiny_llama, PROMPTS[0], batch_size=2)


@pytest.mark.parametrize("skip_unchanged", [True, False])
def test_a_failed_sweep_or_extraction_closes_its_bar(
    tiny_llama, monkeypatch, capsys, skip_unchanged
):
    # before, an error mid-loop left the tqdm bar open while its traceback lived (a notebook
    # keeps the last one): still registered, so later bars were drawn one line lower
    from tqdm.auto import tqdm

    from hookscope import patching

    _terminal(monkeypatch)
    calls = []

    def failing_metric(*args, **kwargs):
        calls.append(1)
        if len(calls) > 2:  # the two baselines pass, the sweep's first forward fails
            raise RuntimeError("metric failed")
        return metric(*args, **kwargs)

    metric = patching._metric
    # other tests' bars (e.g. transformers' weight loading) may still be registered: only new
    # bars of this test count
    before = set(tqdm._instances)

    monkeypatch.setattr("hookscope.patching._metric", failing_metric)
    clean, corrupt = _pair()
    with pytest.raises(RuntimeError, match="metric failed") as failed:
        activation_patching(
            tiny_llama, clean, corrupt, ([3, 3], [4, 4]), progress=True,
            skip_unchanged=skip_unchanged,
        )  # fmt: skip
    assert len(calls) == 3 and failed.traceback and not set(tqdm._instances) - before
    monkeypatch.undo()
    _terminal(monkeypatch)

    def failing_saver(batch):
        raise RuntimeError("saver failed")

    with pytest.raises(RuntimeError, match="saver failed") as failed:
        tiny_llama.extract_cache(
            PROMPTS[:3], ["last"], ExtractionConfig(extract_resid_out=True), progress=True,
            batch_saver=failing_saver,
        )  # fmt: skip
    assert failed.traceback and not set(tqdm._instances) - before
