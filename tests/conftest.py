import inspect
import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
# Tests never write to the user's home: hookscope's cache (the converted default model, the
# remembered self-check outcomes) and matplotlib's font cache go to .hookscope-cache/ in the
# repository unless set.
_REPO_CACHE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".hookscope-cache"
)
os.environ.setdefault("HOOKSCOPE_CACHE", _REPO_CACHE)
os.environ.setdefault("MPLCONFIGDIR", os.path.join(_REPO_CACHE, "matplotlib"))

import pytest  # noqa: E402
import torch  # noqa: E402
from tiny_models import FAMILIES  # noqa: E402
from tiny_vlms import VLM_FAMILIES  # noqa: E402

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

# Property tests draw the same examples on every run (CI must not flake); set
# HYPOTHESIS_PROFILE=explore locally to search new ones.
from hypothesis import settings  # noqa: E402

settings.register_profile("deterministic", derandomize=True)
settings.register_profile("explore", derandomize=False, max_examples=400)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))


@pytest.fixture(scope="session")
def tiny_llama():
    """A HookedModel around a tiny random Llama (4 heads, 2 KV heads, 2 layers)."""
    from tiny_models import build_model, build_tokenizer

    from hookscope import HookedModel

    return HookedModel.from_hf(build_model("llama"), build_tokenizer())


def hook_snapshot(model: torch.nn.Module) -> set:
    """Every forward (pre-)hook registered on any submodule, as (module, kind, hook id).

    Compare snapshots rather than expecting none: transformers itself installs persistent
    output-capturing hooks the first time ``output_hidden_states=True`` is used.
    """
    return {
        (name, kind, hook_id)
        for name, module in model.named_modules()
        for kind, hooks in (("fwd", module._forward_hooks), ("pre", module._forward_pre_hooks))
        for hook_id in hooks
    }


def assert_close_to_scale(
    actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5, msg: str = ""
):
    """|actual - expected| <= rtol * max|expected| elementwise: float32 noise relative to the
    tensor's scale (real models carry "massive activations" of ~1e3 beside values near 0, so an
    elementwise relative tolerance is meaningless and an absolute one depends on the model)."""
    if expected.dtype == torch.bool:
        assert torch.equal(actual, expected), msg
        return
    scale = expected.abs().max().item()
    worst = (actual - expected).abs().max().item()
    assert worst <= rtol * scale + 1e-7, f"{msg}: max diff {worst:.3e} > {rtol} x scale {scale:.3e}"


def assert_batch_equals_one_by_one(hooked, tokenizer, prompts, positions, config, rtol=1e-5):
    """A padded batch gives, row by row, what each prompt gives alone (every tensor key)."""
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    assert not batch["attention_mask"].bool().all(), "the check needs padding"
    batched = hooked.forward(batch, positions, extraction_config=config)
    for row, prompt in enumerate(prompts):
        alone = hooked.forward(
            tokenizer(prompt, return_tensors="pt"), positions, extraction_config=config
        )
        assert alone["mapping_index"] == batched["mapping_index"]
        for key, value in alone.tensors().items():
            assert_close_to_scale(batched[key][row], value[0], rtol=rtol, msg=f"{key} row {row}")


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    """Every tiny family (tests/tiny_models.py FAMILIES), one module-scoped run each."""
    return request.param


@pytest.fixture(scope="module")
def hooked(family):
    """A HookedModel around the tiny model of ``family``."""
    from tiny_models import build_model, build_tokenizer

    from hookscope import HookedModel

    return HookedModel.from_hf(build_model(family), build_tokenizer())


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """The tiny Llama and its tokenizer saved as an HF folder (for from_pretrained paths)."""
    from tiny_models import build_model, build_tokenizer

    folder = tmp_path_factory.mktemp("tiny-llama")
    build_model("llama").save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=sorted(VLM_FAMILIES))
def vlm(request):
    """A tiny vision-language model with its offline processor, one per supported family."""
    from tiny_vlms import build_vlm

    return build_vlm(request.param)


# Test tiers (as TransformerLens's tests/unit, integration, acceptance): every test gets exactly
# one marker. acceptance: the real embedded SmolLM2 (marked real_model); integration: builds or
# loads a model (tiny ones from tests/tiny_models.py / tiny_vlms.py), seen in the source of the
# test, of the module's helpers it calls, or of its fixtures; unit: no model at all.
_BUILDS_A_MODEL = re.compile(
    r"\b(build_model|build_vlm|HookedModel|from_pretrained|from_hf|AutoModel\w*|Llama\w*Config)\b"
)
TIERS = ("unit", "integration", "acceptance")


def _sources(function, module, seen: set) -> list[str]:
    """The source of ``function`` and of every function of the test suite (``module``'s own or
    imported from tests/) that it names, recursively."""
    function = inspect.unwrap(function)
    if function in seen or not inspect.isfunction(function):
        return []
    seen.add(function)
    try:
        texts = [inspect.getsource(function)]
    except (OSError, TypeError):
        return []
    for name in re.findall(r"\b\w+\b", texts[0]):
        helper = getattr(module, name, None)
        if inspect.isfunction(helper) and _in_test_suite(helper):
            texts += _sources(helper, inspect.getmodule(helper), seen)
    return texts


def _in_test_suite(function) -> bool:
    path = inspect.getsourcefile(function) or ""
    return os.path.dirname(os.path.abspath(path)) == os.path.dirname(os.path.abspath(__file__))


def _tier(item) -> str:
    if item.get_closest_marker("real_model"):
        return "acceptance"
    seen: set = set()
    texts = _sources(item.function, item.module, seen)
    for definitions in item._fixtureinfo.name2fixturedefs.values():
        for definition in definitions:
            module = inspect.getmodule(definition.func)
            texts += _sources(definition.func, module, seen) if module else []
    return "integration" if any(_BUILDS_A_MODEL.search(t) for t in texts) else "unit"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if isinstance(item, pytest.Function):
            item.add_marker(_tier(item))
