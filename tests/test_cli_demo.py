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
    assert "vision" not in out and "projector_out" not in out  # a text-only model


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
    # the output shown in the README is this run's (rules in tests/test_readme.py)
    from test_readme import README, matches_shown, output_lines, readme_blocks

    shown = next(
        b.code
        for b in readme_blocks(README.read_text(encoding="utf-8"))
        if b.marker == ("output-of", "tests/test_cli_demo.py::test_demo")
    )
    printed = "\n".join(lines).replace(str(tmp_path), "hookscope-demo")
    assert matches_shown(["...", *output_lines(shown)], output_lines(printed)), printed


def _extract_argv(folder, prompts, out, *extra):
    return [
        "extract",
        str(folder),
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
        str(out),
        *extra,
    ]


def test_extract_command_matches_extract_cache(tiny_folder, tmp_path, capsys):
    from tiny_models import PROMPTS

    from hookscope import ExtractionConfig, HookedModel
    from hookscope.store import ActivationStore

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"text": p}) for p in PROMPTS[:3]))
    code = main(_extract_argv(tiny_folder, prompts, tmp_path / "out", "--batch-size", "2"))
    assert code == 0, capsys.readouterr().err
    assert f"3 prompts -> {tmp_path / 'out'}/ (2 shards" in capsys.readouterr().out
    store = ActivationStore.open(tmp_path / "out")
    assert store.complete and len(store) == 3
    hm = HookedModel.from_pretrained(str(tiny_folder))
    expected = hm.extract_cache(
        PROMPTS[:3],
        ["last", (0, 2)],
        extraction_config=ExtractionConfig(
            extract_resid_out=True, extract_mlp_out=True, layers=[1]
        ),
    )
    assert sorted(k for k in store.keys() if not k.startswith("batch_saver")) == sorted(
        expected.tensors()
    )
    for key in ("resid_out_1", "mlp_out_1", "logits"):
        torch.testing.assert_close(store[key], expected[key], rtol=1e-5, atol=1e-5)
    assert store.mapping_index == {"last": [0], (0, 2): [1, 2]}
    assert json.loads((tmp_path / "out" / "prompts.json").read_text()) == PROMPTS[:3]


def test_extract_refuses_blank_lines_with_their_number(tiny_folder, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("The cat sat\n\nA dog\n")
    assert main(_extract_argv(tiny_folder, prompts, tmp_path / "out")) == 2
    assert f"{prompts}:2 is blank" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    prompts.write_text("The cat sat\nA dog\n\n")  # blank lines at the end shift nothing
    assert main(_extract_argv(tiny_folder, prompts, tmp_path / "out")) == 0
    assert "2 prompts ->" in capsys.readouterr().out


def test_extract_refuses_other_prompts_unless_overwrite(tiny_folder, tmp_path, capsys):
    from hookscope.store import ActivationStore

    out, first, second = tmp_path / "out", tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_text("The cat sat\nA dog\n")
    second.write_text("A dog\nThe cat sat\n")
    assert main(_extract_argv(tiny_folder, first, out)) == 0
    before = ActivationStore.open(out)["resid_out_1"]
    capsys.readouterr()
    assert main(_extract_argv(tiny_folder, second, out)) == 2
    err = capsys.readouterr().err
    assert "holds a store of other prompts; pass --overwrite" in err
    torch.testing.assert_close(ActivationStore.open(out)["resid_out_1"], before, rtol=0, atol=0)
    assert main([*_extract_argv(tiny_folder, first, out), "--layers", "0"]) == 2  # other config
    err = capsys.readouterr().err.splitlines()
    assert "different extraction" in err[0]
    assert err[1] == "hint: pass --overwrite to replace that store, or choose another --out"
    assert main(_extract_argv(tiny_folder, second, out, "--overwrite")) == 0
    after = ActivationStore.open(out)["resid_out_1"]
    torch.testing.assert_close(after, before.flip(0), rtol=1e-5, atol=1e-5)  # rows swapped
    # the same command again keeps the complete store
    assert main(_extract_argv(tiny_folder, second, out)) == 0
    torch.testing.assert_close(ActivationStore.open(out)["resid_out_1"], after, rtol=0, atol=0)


def test_overwrite_deletes_only_a_hookscope_store(tiny_folder, tmp_path, capsys):
    prompts, out = tmp_path / "p.txt", tmp_path / "mine"
    prompts.write_text("The cat sat\n")
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    assert main(_extract_argv(tiny_folder, prompts, out, "--overwrite")) == 2
    assert "is not a hookscope store" in capsys.readouterr().err
    assert (out / "thesis.tex").read_text() == "precious"
    # a run stopped before its first write left only its prompts: the next run starts there
    (out / "thesis.tex").unlink()
    (out / "prompts.json").write_text('["another prompt"]')
    assert main(_extract_argv(tiny_folder, prompts, out)) == 0
    assert json.loads((out / "prompts.json").read_text()) == ["The cat sat"]


def test_ctrl_c_stops_in_one_line_and_the_rerun_resumes(tiny_folder, tmp_path, monkeypatch, capsys):
    from hookscope.store import ActivationStore, StoreWriter

    prompts = tmp_path / "p.txt"
    prompts.write_text("The cat sat on the mat\nA dog\nHello there world\nParis is\n")
    assert main(_extract_argv(tiny_folder, prompts, tmp_path / "whole", "--batch-size", "1")) == 0
    whole = ActivationStore.open(tmp_path / "whole")
    write, written = StoreWriter.write, []

    def interrupted_after_one_batch(self, cache):
        if written:
            raise KeyboardInterrupt
        written.append(len(cache["position_mask"]))
        write(self, cache)

    monkeypatch.setattr(StoreWriter, "write", interrupted_after_one_batch)
    capsys.readouterr()
    argv = _extract_argv(tiny_folder, prompts, tmp_path / "out", "--batch-size", "1")
    assert main(argv) == 130
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if line.startswith("hookscope:")]
    assert "Traceback" not in err and len(said) == 1, err
    assert said[0] == (
        f"hookscope: interrupted; 1 of 4 prompts are saved in {tmp_path / 'out'}/: "
        "run the same command again to resume"
    )

    def counted(self, cache):
        written.append(len(cache["position_mask"]))
        write(self, cache)

    monkeypatch.setattr(StoreWriter, "write", counted)
    assert main(argv) == 0
    assert written == [1, 1, 1, 1]  # the rerun wrote the three missing batches only
    resumed = ActivationStore.open(tmp_path / "out")
    assert resumed.complete and len(resumed) == 4 and resumed.keys() == whole.keys()
    for key in whole.keys():
        assert torch.equal(resumed[key], whole[key]), key


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
        (["extract", "--prompts", "{prompts}", "--out", "x"], "nothing to extract"),
        (
            [
                "extract",
                "--prompts",
                "{prompts}",
                "--logits-only",
                "--no-save-logits",
                "--out",
                "x",
            ],
            "leave nothing to extract",
        ),
        (
            ["extract", "--prompts", "{prompts}", "--points", "resid_out,nope", "--out", "x"],
            "'nope' is not a point kind",
        ),
    ],
)
def test_cli_errors_are_one_line_with_a_hint(
    tiny_folder, tmp_path, monkeypatch, capsys, argv, message
):
    monkeypatch.chdir(tmp_path)
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello world\n")
    argv = [a.replace("{prompts}", str(prompts)) for a in argv]
    argv.insert(1, str(tiny_folder))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("hookscope: error:") and message in err[0]
    assert err[1].startswith("hint:") and len(err) == 2
    assert not (tmp_path / "x").exists()  # nothing written before every argument is checked


@pytest.mark.parametrize("per", ["layer", "position"])
def test_patch_and_lens_commands(tiny_folder, tmp_path, capsys, per):
    tokenizer = build_tokenizer()
    single = [t for t in (" the", " cat", " dog", " mat") if len(tokenizer(t)["input_ids"]) == 1]
    assert len(single) >= 2
    clean, corrupt = (f"The{word} sat on the mat" for word in single[:2])
    assert len(tokenizer(clean)["input_ids"]) == len(tokenizer(corrupt)["input_ids"])
    argv = ["patch", str(tiny_folder), "--clean", clean, "--corrupt", corrupt]
    argv += ["--correct", single[0], "--wrong", single[1], "--per", per, "--out", str(tmp_path)]
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    grid = "layer 2," if per == "layer" else "layer 2 x position "
    assert f"PatchingResult(activation patching, logit_diff normalised, {grid}" in out
    assert (tmp_path / "patching_resid_out.png").stat().st_size > 1000
    assert (tmp_path / "patching_resid_out.html").stat().st_size > 1000
    lens_argv = ["lens", str(tiny_folder), "--prompt", "The cat sat", "--target", single[0]]
    assert main([*lens_argv, "--out", str(tmp_path)]) == 0
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


def test_sigint_stops_a_real_run_in_one_line(tiny_folder, tmp_path):
    """A real SIGINT to ``hookscope extract``: status 130, one line, a consistent partial store."""
    import os
    import signal
    import subprocess
    import sys
    import threading
    import time
    from pathlib import Path

    import hookscope
    from hookscope.store import ActivationStore

    prompts, out = tmp_path / "p.txt", tmp_path / "out"
    prompts.write_text("\n".join(f"prompt number {i} about the cat" for i in range(3000)))
    env = {**os.environ, "PYTHONPATH": str(Path(hookscope.__file__).parents[1])}
    argv = [sys.executable, "-m", "hookscope", "extract", str(tiny_folder), "--prompts"]
    argv += [str(prompts), "--points", "resid_out", "--batch-size", "1", "--out", str(out)]
    parent_state = (signal.getsignal(signal.SIGINT), signal.pthread_sigmask(signal.SIG_BLOCK, []))
    process = subprocess.Popen(
        argv, env=env, stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint
    )
    # drain stderr (the progress bar) as it comes, so the child never blocks on a full pipe
    chunks: list[str] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(process.stderr.readline, "")))
    reader.start()
    deadline = time.monotonic() + 300
    while _committed(out) < 3 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be interrupted"
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
        reader.join(30)
    err = "".join(chunks)
    said = [line.split("\r")[-1] for line in err.splitlines() if "hookscope:" in line]
    assert process.returncode == 130 and "Traceback" not in err, (parent_state, err[-2000:])
    with pytest.warns(UserWarning, match="incomplete store"):
        store = ActivationStore.open(out)
    assert said == [
        f"hookscope: interrupted; {len(store)} of 3000 prompts are saved in {out}/: "
        "run the same command again to resume"
    ]
    assert 3 <= len(store) < 3000 and not store.complete
    store.verify()
    assert store["resid_out_1"].shape[0] == len(store)


def _default_sigint() -> None:
    """In the child: SIGINT as a shell gives it (default action, not blocked), whatever the
    test process inherited or set (the suite's own state must not decide the test)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _committed(out) -> int:
    from hookscope.cli import _committed_examples

    return _committed_examples(out)


def test_extract_on_ray_writes_the_same_store(tiny_folder, tmp_path, capsys):
    pytest.importorskip("ray")
    from hookscope.store import ActivationStore

    prompts = tmp_path / "p.txt"
    prompts.write_text("The cat sat on the mat\nA dog\nHello there world\nParis is\nThe end\n")
    argv = _extract_argv(tiny_folder, prompts, tmp_path / "local", "--batch-size", "2")
    assert main(argv) == 0
    ray_argv = _extract_argv(tiny_folder, prompts, tmp_path / "ray", "--batch-size", "2")
    ray_argv += ["--ray", "local", "--workers", "2"]
    assert main(ray_argv) == 0, capsys.readouterr().err
    assert "5 prompts -> " in capsys.readouterr().out
    local, ray = ActivationStore.open(tmp_path / "local"), ActivationStore.open(tmp_path / "ray")
    for key in ("resid_out_1", "mlp_out_1", "logits"):
        torch.testing.assert_close(ray[key], local[key], rtol=1e-5, atol=1e-6)
    other = tmp_path / "other.txt"
    other.write_text("A dog\n")
    assert main([*ray_argv[:3], str(other), *ray_argv[4:]]) == 2  # another run's store
    assert "holds a store of other prompts" in capsys.readouterr().err


def test_every_verb_explains_itself_with_a_description_and_an_example():
    import argparse

    from hookscope.cli import build_parser

    parser = build_parser()
    verbs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(verbs.choices) == {"demo", "info", "check", "extract", "patch", "lens", "report"}
    for name, verb in verbs.choices.items():
        text = verb.format_help()
        assert verb.description and verb.description.split("\n")[0] in text, name
        example = text.split("Examples:\n", 1)[1]
        assert f"hookscope {name}" in example, name
        for action in verb._actions:
            assert action.help and action.help != argparse.SUPPRESS, (name, action.dest)


def test_extract_points_comma_separated_equals_space_separated(tiny_folder, tmp_path, capsys):
    from hookscope.store import ActivationStore

    prompts = tmp_path / "p.txt"
    prompts.write_text("the cat sat\na dog ran home\n")
    stores = {}
    for form, points in {"comma": ["resid_out,mlp_out"], "space": ["resid_out", "mlp_out"]}.items():
        argv = ["extract", str(tiny_folder), "--prompts", str(prompts), "--points", *points]
        assert main([*argv, "--layers", "1", "--out", str(tmp_path / form)]) == 0
        stores[form] = ActivationStore.open(tmp_path / form)
    keys = sorted(k for k in stores["comma"].keys() if not k.startswith("batch_saver"))
    assert keys == ["logits", "mlp_out_1", "position_mask", "resid_out_1"]
    assert stores["space"].keys() == stores["comma"].keys()
    for key in keys:
        assert torch.equal(stores["comma"][key], stores["space"][key]), key


def test_extract_logits_only_saves_only_the_logits(tiny_folder, tmp_path, capsys):
    from hookscope.store import ActivationStore

    prompts = tmp_path / "p.txt"
    prompts.write_text("the cat sat\n")
    argv = ["extract", str(tiny_folder), "--prompts", str(prompts), "--logits-only"]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 0
    store = ActivationStore.open(tmp_path / "out")
    keys = sorted(k for k in store.keys() if not k.startswith("batch_saver"))
    assert keys == ["logits", "position_mask"]
