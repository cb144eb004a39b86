"""Self-checks, dtypes, gradients, threads, and the promise never to unpickle."""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from tiny_models import FAMILIES, PROMPTS, build_model, build_tokenizer

from hookscope import ExtractionConfig, HookedModel, HookscopeError, checks


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HOOKSCOPE_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_self_check_passes_on_every_family(family):
    report = HookedModel.from_hf(build_model(family), build_tokenizer()).self_check(
        print_report=False
    )
    assert report.passed, str(report)
    assert len(report.rows) == 9


def test_self_check_catches_a_wrong_spec_and_remembers():
    hm = HookedModel.from_hf(build_model("llama"), build_tokenizer())
    assert hm.self_check(print_report=False).passed
    # a wrong map: resid_mid read at the input norm instead of the pre-MLP norm
    for parts in hm.model_map.layers:
        parts.resid_mid_site = parts.block.input_layernorm
    with pytest.warns(UserWarning, match="outcome changed since the last run"):
        report = hm.self_check(print_report=False)
    failed = [row.name for row in report.rows if not row.passed]
    assert failed == ["residual decomposition"], str(report)
    assert "FAIL  residual decomposition" in str(report)
    # remembered, and read back only when asked
    (remembered,) = checks.remembered_results("llama").values()
    assert remembered == {row.name: row.name != "residual decomposition" for row in report.rows}
    assert checks.remembered_results("gpt2") == {}
    assert list(checks.remembered_results()) == [report.key]


def test_the_checks_are_a_registry_run_in_order(monkeypatch, tiny_llama):
    assert all(
        entry.description and "\n" not in entry.description for entry in checks.CHECKS.values()
    )

    def crashes(ctx):
        raise RuntimeError("broken on purpose\nsecond line")

    monkeypatch.setitem(checks.CHECKS, "crashes", checks.Check("crashes", "always raises", crashes))
    report = tiny_llama.self_check(remember=False, print_report=False)
    assert [row.name for row in report.rows] == list(checks.CHECKS)
    assert [row.name for row in report.rows if not row.passed] == ["crashes"]
    assert report.rows[-1].detail == "raised RuntimeError: broken on purpose"


# The files opened while a test records them (an audit hook sees every open, from Python or C).
_opened: list[str] | None = None


def _record_opens(event, args):
    if event == "open" and _opened is not None and isinstance(args[0], (str, bytes, Path)):
        _opened.append(os.fsdecode(args[0]))


sys.addaudithook(_record_opens)


def _files_opened(action) -> list[Path]:
    global _opened
    _opened = []
    try:
        action()
        return [Path(p).resolve() for p in _opened]
    finally:
        _opened = None


def _remember_a_failure(model) -> Path:
    """A records file saying an earlier self-check of ``model``'s architecture failed."""
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    key = f"{model.config.model_type}|{transformers.__version__}|{dtype}"
    path = checks.records_path()
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({key: {"resid chain": False}}))
    return path


def test_loading_reads_nothing_but_the_model(tiny_folder):
    model, tokenizer = build_model("llama"), build_tokenizer()
    records = _remember_a_failure(model)
    assert checks.remembered_results("llama")  # the file is there, and readable
    cache = records.parent.resolve()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wrapped = _files_opened(lambda: HookedModel.from_hf(model, tokenizer))
        loaded = _files_opened(lambda: HookedModel.from_pretrained(str(tiny_folder)))
    assert not [p for p in wrapped + loaded if p.is_relative_to(cache)]
    # the recorder works: it saw the folder's config and tokenizer files being read
    # (safetensors maps the weights from Rust, which Python's audit hooks do not see)
    assert {p.name for p in loaded if p.parent == tiny_folder.resolve()} >= {
        "config.json",
        "tokenizer_config.json",
    }


def test_self_check_without_remembering_reads_and_writes_nothing(monkeypatch, tiny_llama):
    cache = checks.records_path().parent
    report = tiny_llama.self_check(remember=False, print_report=False)
    assert report.passed and not cache.exists()
    records = _remember_a_failure(tiny_llama.hf_model)
    before = records.read_text()
    monkeypatch.setenv(checks.REMEMBER_ENV, "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the remembered failure would warn "outcome changed"
        opened = _files_opened(lambda: tiny_llama.self_check(print_report=False))
    assert not [p for p in opened if p.is_relative_to(cache.resolve())]
    assert records.read_text() == before and sorted(cache.iterdir()) == [records]
    monkeypatch.setenv(checks.REMEMBER_ENV, "nope")
    with pytest.raises(HookscopeError, match="HOOKSCOPE_REMEMBER_CHECKS='nope' is not one of"):
        tiny_llama.self_check(print_report=False)


def test_self_check_remembers_under_hookscope_cache(monkeypatch, tmp_path, tiny_llama):
    monkeypatch.setenv("HOOKSCOPE_CACHE", str(tmp_path / "elsewhere"))
    assert checks.records_path() == tmp_path / "elsewhere" / "self_checks.json"
    report = tiny_llama.self_check(print_report=False)
    stored = json.loads(checks.records_path().read_text())
    assert stored == {report.key: {row.name: True for row in report.rows}}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_keeps_dtype_and_identities(dtype):
    hm = HookedModel.from_hf(build_model("llama").to(dtype), build_tokenizer())
    report = hm.self_check(print_report=False)
    assert report.passed, str(report)
    cache = hm.forward(
        PROMPTS[:2],
        ["last"],
        extraction_config=ExtractionConfig(extract_resid_out=True, extract_head_out=True),
    )
    assert cache["resid_out_1"].dtype == dtype and cache["head_out_L1H0"].dtype == dtype
    full = HookedModel.from_hf(build_model("llama"), build_tokenizer())
    reference = full.forward(
        PROMPTS[:2], ["last"], extraction_config=ExtractionConfig(extract_resid_out=True)
    )
    scale = reference["resid_out_1"].abs().max()
    assert (cache["resid_out_1"].float() - reference["resid_out_1"]).abs().max() < 0.05 * scale


def test_no_graph_is_kept_without_keep_gradient(tiny_llama):
    with torch.enable_grad():
        cache = tiny_llama.forward(
            PROMPTS[0], ["last"], extraction_config=ExtractionConfig(extract_resid_out=True)
        )
    assert all(t.grad_fn is None and not t.requires_grad for t in cache.tensors().values())
    kept = tiny_llama.forward(
        PROMPTS[0],
        ["last"],
        extraction_config=ExtractionConfig(extract_resid_out=True, keep_gradient=True),
    )
    assert kept["resid_out_1"].grad_fn is not None


def test_two_threads_on_one_model_get_a_clear_error(tiny_llama):
    started, release = threading.Event(), threading.Event()

    def slow(module, args, output):
        started.set()
        release.wait(5)

    errors = []

    def first():
        tiny_llama.forward(
            PROMPTS[0],
            ["last"],
            hooks=[{"component": "model.layers.0.output", "intervention": slow}],
        )

    thread = threading.Thread(target=first)
    thread.start()
    started.wait(5)
    try:
        tiny_llama.forward(PROMPTS[0], ["last"])
    except HookscopeError as error:
        errors.append(str(error))
    finally:
        release.set()
        thread.join()
    assert errors and "another thread" in errors[0]
    # afterwards the model works again
    tiny_llama.forward(PROMPTS[0], ["last"])


def test_threads_on_separate_models_are_serialised_and_correct():
    models = [HookedModel.from_hf(build_model("llama", seed=s), build_tokenizer()) for s in (0, 1)]
    config = ExtractionConfig(extract_attn_pattern=True, layers=[1])
    expected = [m.forward(PROMPTS[0], ["all"], extraction_config=config) for m in models]
    results = [None, None]

    def work(index):
        for _ in range(5):
            results[index] = models[index].forward(PROMPTS[0], ["all"], extraction_config=config)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, expected, strict=True):
        assert torch.equal(got["pattern_L1H0"], want["pattern_L1H0"])


def test_nothing_unpickles():
    source = "\n".join(
        p.read_text() for p in Path(__file__).parents[1].joinpath("src").rglob("*.py")
    )
    code_that_unpickles = (
        r"import pickle|from pickle|pickle\.loads?\(|torch\.load\(|weights_only=False"
    )
    assert not re.search(code_that_unpickles, source)
    assert "trust_remote_code=True" not in source


def test_trust_remote_code_is_off_by_default(monkeypatch):
    from hookscope import HookedModelConfig, loading

    seen = {}

    def fake_from_pretrained(source, **kwargs):
        seen.update(kwargs)
        raise OSError("stop here")

    monkeypatch.setattr(loading.AutoModelForCausalLM, "from_pretrained", fake_from_pretrained)
    with pytest.raises(HookscopeError):
        loading.load_model_and_tokenizer(HookedModelConfig(model_name="some/model"))
    assert seen.get("trust_remote_code") is False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(HookscopeError):
            loading.load_model_and_tokenizer(
                HookedModelConfig(model_name="some/model", trust_remote_code=True)
            )
    assert seen.get("trust_remote_code") is True
