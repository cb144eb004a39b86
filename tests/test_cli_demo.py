"""The command line and the demo."""

from __future__ import annotations

import pytest
import torch
from tiny_models import build_model, build_tokenizer

from hookscope import ActivationCache
from hookscope.cli import main


def test_info_on_a_folder(tmp_path, capsys):
    build_model("gpt2").save_pretrained(tmp_path)
    build_tokenizer().save_pretrained(tmp_path)
    assert main(["info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "gpt2: 2 layers, 4 heads (4 KV), d_model 64" in out
    assert "transformer.h.0.attn" in out and "transformer.h.0.ln_2" in out
    assert "resid_out_{0..1}" in out


def test_bad_model_is_one_line_error(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hookscope: error: could not load") and "Traceback" not in err


@pytest.mark.real_model
def test_demo(tmp_path):
    from hookscope.demo import run_demo

    lines = []
    summary = run_demo(tmp_path, print_fn=lines.append)
    assert summary["top_tokens"][0] == " Paris"
    assert summary["first_top_layer"] is not None
    saved = ActivationCache.load(summary["cache_path"])
    assert saved["resid_out_29"].shape == (3, 1, 576)
    # The lens at the last layer is the model's own logits.
    from hookscope import HookedModel
    from hookscope.demo import lens_logits

    hm = HookedModel.from_pretrained()
    torch.testing.assert_close(
        lens_logits(hm, saved["resid_out_29"]), saved["logits"], rtol=1e-5, atol=1e-4
    )
    assert any("first becomes the top token" in line for line in lines)
