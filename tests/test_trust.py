"""Self-checks, dtypes, gradients, threads, and the promise never to unpickle."""

from __future__ import annotations

import re
import threading
import warnings
from pathlib import Path

import pytest
import torch
from tiny_models import FAMILIES, PROMPTS, build_model, build_tokenizer

from hookscope import ExtractionConfig, HookedModel, HookscopeError


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
    with pytest.warns(UserWarning, match="failed: \\['residual decomposition'\\]"):
        HookedModel.from_hf(build_model("llama"), build_tokenizer())


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
