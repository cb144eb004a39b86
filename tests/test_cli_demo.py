"""The command line and the demo."""

from __future__ import annotations

import json

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
    from hookscope import HookedModel
    from hookscope.demo import run_demo
    from hookscope.lens import lens_logits

    lines = []
    summary = run_demo(tmp_path, print_fn=lines.append)
    assert summary["top_tokens"][0] == " Paris"
    assert summary["first_top_layer"] is not None
    saved = ActivationCache.load(summary["cache_path"])
    assert saved["resid_out_29"].shape == (3, 1, 576)
    # the lens at the last layer is the model's own logits
    hm = HookedModel.from_pretrained()
    torch.testing.assert_close(
        lens_logits(hm, saved["resid_out_29"]), saved["logits"], rtol=1e-5, atol=1e-4
    )
    # the final layer at the last position restores the IOI logit difference
    result = summary["patching"]
    torch.testing.assert_close(result.values[-1, -1], torch.tensor(1.0), rtol=0, atol=1e-4)
    for name in ("logit_lens.png", "patching_resid_out.png", "attention.png", "index.html"):
        assert (tmp_path / name).stat().st_size > 1000, name
    assert any("first becomes the top token" in line for line in lines)


def test_extract_command_matches_extract_cache(tiny_folder, tmp_path, capsys):
    from tiny_models import PROMPTS

    from hookscope import ExtractionConfig, HookedModel

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"text": p}) for p in PROMPTS[:3]))
    code = main(
        [
            "extract",
            str(tiny_folder),
            "--prompts",
            str(prompts),
            "--points",
            "resid_out",
            "--positions",
            "last",
            "0:2",
            "--extract-mlp-out",
            "--layers",
            "1",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert code == 0, capsys.readouterr().err
    saved = ActivationCache.load(tmp_path / "out" / "activations.safetensors")
    hm = HookedModel.from_pretrained(str(tiny_folder))
    expected = hm.extract_cache(
        PROMPTS[:3],
        ["last", (0, 2)],
        extraction_config=ExtractionConfig(
            extract_resid_out=True, extract_mlp_out=True, layers=[1]
        ),
    )
    assert sorted(saved.tensors()) == sorted(expected.tensors())
    torch.testing.assert_close(saved["resid_out_1"], expected["resid_out_1"], rtol=1e-5, atol=1e-5)
    assert saved["mapping_index"] == {"last": [0], (0, 2): [1, 2]}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["extract", "--prompts", "missing.txt", "--out", "x"], "does not exist"),
        (
            ["extract", "--prompts", "{prompts}", "--points", "nope", "--out", "x"],
            "is not a point kind",
        ),
        (
            [
                "extract",
                "--prompts",
                "{prompts}",
                "--positions",
                "middle",
                "--points",
                "resid_out",
                "--out",
                "x",
            ],
            "unknown position item",
        ),
    ],
)
def test_cli_errors_are_one_line_with_a_hint(tiny_folder, tmp_path, capsys, argv, message):
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello world\n")
    argv = [a.replace("{prompts}", str(prompts)) for a in argv]
    argv.insert(1, str(tiny_folder))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("hookscope: error:") and message in err[0]
    assert err[1].startswith("hint:") and len(err) == 2


def test_patch_and_lens_commands(tiny_folder, tmp_path, capsys):
    tokenizer = build_tokenizer()
    single = [t for t in (" the", " cat", " dog", " mat") if len(tokenizer(t)["input_ids"]) == 1]
    assert len(single) >= 2
    code = main(
        [
            "patch",
            str(tiny_folder),
            "--clean",
            "The cat sat",
            "--corrupt",
            "The dog sat",
            "--correct",
            single[0],
            "--wrong",
            single[1],
            "--per",
            "layer",
            "--out",
            str(tmp_path),
        ]
    )
    out = capsys.readouterr()
    if code == 2:  # the pair may tokenize to different lengths with the tiny BPE
        assert "must align token by token" in out.err
    else:
        assert (tmp_path / "patching_resid_out.png").exists() and (
            tmp_path / "patching_resid_out.html"
        ).exists()
    assert (
        main(
            [
                "lens",
                str(tiny_folder),
                "--prompt",
                "The cat sat",
                "--target",
                single[0],
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    assert "layer   1" in capsys.readouterr().out and (tmp_path / "logit_lens.png").exists()


def test_check_command_remembers_only_when_asked(tiny_folder, tmp_path, monkeypatch, capsys):
    from hookscope.checks import CHECKS, records_path

    monkeypatch.setenv("HOOKSCOPE_CACHE", str(tmp_path / "cache"))
    assert main(["check", str(tiny_folder), "--no-remember"]) == 0
    assert f"{len(CHECKS)}/{len(CHECKS)} checks passed" in capsys.readouterr().out
    assert not (tmp_path / "cache").exists()
    assert main(["check", str(tiny_folder)]) == 0
    (stored,) = json.loads(records_path().read_text()).values()
    assert stored == dict.fromkeys(CHECKS, True)
