"""Stores and caches from elsewhere are untrusted input (issue 21).

Every path a manifest names stays inside the store folder; a malformed manifest, shard or cache
header gives hookscope's own error naming the field and the file, before any outside file is
opened or any tensor allocated; a fault or a crash at any step of a commit leaves the last
commit whole, and the same run resumes to the identical clean store.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from store_worker import assert_same_store, prompts
from tiny_models import build_model, build_tokenizer

import hookscope.cache
import hookscope.safetensors_files
import hookscope.store
from hookscope import ActivationCache, ExtractionConfig, HookedModel
from hookscope.errors import HookscopeError
from hookscope.store import MANIFEST, ActivationStore, StoreError

CONFIG = ExtractionConfig(extract_resid_out=True)
TEXTS = prompts(10)  # batches of 4: shards of 4, 4 and 2 examples

# -- every file Python opens is recorded: a read outside the store shows up here ---------------
OPENED: list[str] = []


def _audit(event: str, args: tuple) -> None:
    if event == "open" and isinstance(args[0], str | bytes | os.PathLike):
        OPENED.append(os.path.realpath(os.fsdecode(args[0])))


sys.addaudithook(_audit)


@pytest.fixture(scope="module")
def hm():
    model = HookedModel.from_hf(build_model("llama"), build_tokenizer())
    model.config.batch_size = 4
    return model


def extract(hm, folder: Path, texts=TEXTS, **kwargs):
    return hm.extract_cache(
        texts, ["last", 0], extraction_config=CONFIG, output_dir=str(folder), **kwargs
    )


@pytest.fixture(scope="module")
def pristine(hm, tmp_path_factory) -> Path:
    """A complete store of TEXTS (never changed: tests copy it)."""
    folder = tmp_path_factory.mktemp("pristine") / "acts"
    extract(hm, folder)
    return folder


@pytest.fixture(scope="module")
def expected(pristine) -> dict:
    store = ActivationStore.open(pristine)
    return {
        "keys": store.keys(),
        **{key: store[key] for key in store.keys()},
        "mapping_index": store.mapping_index,
        **{f"stats/{k}": v for k, v in store.stats("resid_out_1").items()},
    }


def copy_store(pristine: Path, root: Path) -> tuple[Path, Path]:
    """A copy of the store at ``root/acts`` and a sentinel outside it: a valid shard (a reader
    that followed a path out would read it without complaint)."""
    folder = root / "acts"
    shutil.copytree(pristine, folder)
    sentinel = root / "outside.safetensors"
    shutil.copy(pristine / "shard-00000.safetensors", sentinel)
    return folder, sentinel


def edit_manifest(folder: Path, change) -> dict:
    manifest = json.loads((folder / MANIFEST).read_text())
    change(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return manifest


def read_everything(folder: Path) -> dict:
    store = ActivationStore.open(folder)
    store.verify()
    return {
        "keys": store.keys(),
        **{key: store[key] for key in store.keys()},
        "mapping_index": store.mapping_index,
        **{f"stats/{k}": v for k, v in store.stats("resid_out_1").items()},
    }


def never_opened(sentinel: Path, since: int) -> None:
    assert os.path.realpath(sentinel) not in OPENED[since:]


# -- 1. confinement ----------------------------------------------------------------------------
ESCAPES = {
    "dotdot": lambda root: "../outside.safetensors",
    "absolute": lambda root: str(root / "outside.safetensors"),
    "dotdot inside a part": lambda root: "part-000/../../outside.safetensors",
    "symlink": lambda root: "link.safetensors",
}


@pytest.mark.parametrize("where", ["shard", "stats"])
@pytest.mark.parametrize("escape", sorted(ESCAPES))
def test_a_path_leading_out_of_the_store_is_refused_before_opening(
    hm, pristine, tmp_path, escape, where
):
    folder, sentinel = copy_store(pristine, tmp_path)
    (folder / "link.safetensors").symlink_to(sentinel)
    name = ESCAPES[escape](tmp_path)

    def point_out(manifest):
        if where == "shard":  # the sentinel passes the size and checksum checks
            manifest["shards"][0].update(
                file=name,
                bytes=sentinel.stat().st_size,
                sha256=hashlib.sha256(sentinel.read_bytes()).hexdigest(),
            )
        else:
            manifest["stats"] = name

    edit_manifest(folder, point_out)
    since = len(OPENED)
    with pytest.raises(StoreError, match="(leads outside|symbolic link leading outside) the st"):
        read_everything(folder)
    with pytest.raises(StoreError, match="outside the store"):
        extract(hm, folder)  # resuming it
    never_opened(sentinel, since)
    extract(hm, folder, overwrite=True)  # replaced without touching the outside file
    assert sentinel.read_bytes() == (pristine / "shard-00000.safetensors").read_bytes()
    assert len(ActivationStore.open(folder)) == len(TEXTS)


# -- 2. the manifest's schema ------------------------------------------------------------------
def _set(path: tuple, value):
    def change(manifest):
        *head, last = path
        target = manifest
        for key in head:
            target = target[key]
        if value is _DELETE:
            del target[last]
        else:
            target[last] = value

    return change


_DELETE = object()
SCHEMA = {
    "negative examples": (_set(("examples",), -5), "'examples' is -5"),
    "examples not adding up": (_set(("examples",), 11), "'examples' is 11, the shards hold 10"),
    "no checksum": (_set(("shards", 1, "sha256"), _DELETE), r"shards\[1\].sha256 must be 64 hex"),
    "gap between shards": (_set(("shards", 1, "examples"), [5, 8]), r"shards\[1\].examples"),
    "range as text": (_set(("shards", 0, "examples"), "0-4"), r"shards\[0\].examples"),
    "size as text": (_set(("shards", 0, "bytes"), "12"), r"shards\[0\].bytes"),
    "no file": (_set(("shards", 2, "file"), _DELETE), r"shards\[2\].file .*must be a file name"),
    "shards not a list": (_set(("shards",), {"0": 1}), "'shards' must be a list"),
    "unknown version": (_set(("format",), "hookscope.ActivationStore/9"), "ActivationStore/9"),
    "complete as text": (_set(("complete",), "yes"), "'complete' must be true or false"),
    "stats not a name": (_set(("stats",), 7), "'stats' of the manifest"),
    "stats removed": (_set(("stats",), _DELETE), "'stats' is missing, but 3 shards are committed"),
    "batch_saver not a list": (_set(("batch_saver",), "x"), "'batch_saver' must be null"),
}


@pytest.mark.parametrize("mutation", sorted(SCHEMA))
def test_a_malformed_manifest_names_the_field_and_the_folder(hm, pristine, tmp_path, mutation):
    change, message = SCHEMA[mutation]
    folder, _ = copy_store(pristine, tmp_path)
    edit_manifest(folder, change)
    with pytest.raises(StoreError, match=message) as opened:
        ActivationStore.open(folder)
    assert str(folder) in str(opened.value)
    with pytest.raises(StoreError, match=message):
        extract(hm, folder)  # the writer's resume checks it too


def test_a_manifest_that_is_not_an_object_is_named(pristine, tmp_path):
    folder, _ = copy_store(pristine, tmp_path)
    (folder / MANIFEST).write_text("[1, 2]")
    with pytest.raises(StoreError, match="the manifest must be a JSON object"):
        ActivationStore.open(folder)


# -- 3. bounded reads: a header claiming more than the file holds ------------------------------
def write_header(path: Path, header: dict | bytes, claimed_length: int | None = None) -> None:
    """Replace the safetensors header of ``path`` (its data kept)."""
    data = path.read_bytes()
    old_length = int.from_bytes(data[:8], "little")
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    length = len(raw) if claimed_length is None else claimed_length
    path.write_bytes(length.to_bytes(8, "little") + raw + data[8 + old_length :])


def header_of(path: Path) -> dict:
    data = path.read_bytes()
    return json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])


def huge_tensor(header: dict) -> dict:
    name = next(k for k in header if k != "__metadata__")
    header[name] = {"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 1 << 42]}
    return header


BOMBS = {
    "tensor larger than the file": (
        lambda path: write_header(path, huge_tensor(header_of(path))),
        "claims bytes 0..4398046511104",
    ),
    "absurd header length": (
        lambda path: write_header(path, header_of(path), claimed_length=1 << 60),
        "header claims 1152921504606846976 bytes",
    ),
    "header not JSON": (lambda path: write_header(path, b"{not json"), "header is not JSON"),
    "shorter than 8 bytes": (lambda path: path.write_bytes(b"\x01\x02"), "fewer than its 8-byte"),
    "unknown dtype": (
        lambda path: write_header(
            path,
            {
                k: {**v, "dtype": "F128"} if k != "__metadata__" else v
                for k, v in header_of(path).items()
            },
        ),
        "malformed header entry",
    ),
}


def resign(folder: Path, index: int) -> None:
    """Make the manifest agree with shard ``index`` as it now is (a crafted store)."""
    path = folder / f"shard-{index:05d}.safetensors"
    edit_manifest(
        folder,
        _set(("shards", index), {
            **json.loads((folder / MANIFEST).read_text())["shards"][index],
            "bytes": path.stat().st_size,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        }),
    )  # fmt: skip


@pytest.fixture
def no_safetensors_reads(monkeypatch):
    """safetensors' reader fails the test if called: a refusal must come before it."""

    def refuse(*args, **kwargs):
        raise AssertionError("safe_open was called on a file that should have been refused")

    monkeypatch.setattr(hookscope.cache, "safe_open", refuse)
    monkeypatch.setattr(hookscope.store, "safe_open", refuse)


@pytest.mark.parametrize("bomb", sorted(BOMBS))
def test_a_crafted_shard_header_is_refused_before_reading(
    pristine, tmp_path, bomb, no_safetensors_reads
):
    craft, message = BOMBS[bomb]
    folder, _ = copy_store(pristine, tmp_path)
    craft(folder / "shard-00000.safetensors")
    resign(folder, 0)  # checksums agree: only the header check stands in the way
    with pytest.raises(StoreError, match=message) as refused:
        ActivationStore.open(folder)["resid_out_0"]
    assert "shard-00000.safetensors" in str(refused.value)
    with pytest.raises(HookscopeError, match=message):
        ActivationCache.load(folder / "shard-00000.safetensors")


def test_a_crafted_stats_header_is_refused(pristine, tmp_path, no_safetensors_reads):
    folder, _ = copy_store(pristine, tmp_path)
    stats = folder / json.loads((folder / MANIFEST).read_text())["stats"]
    write_header(stats, huge_tensor(header_of(stats)))
    checksum = hashlib.sha256(stats.read_bytes()).hexdigest()
    edit_manifest(folder, _set(("stats_sha256",), checksum))  # only the header check is left
    with pytest.raises(StoreError, match="refused before reading it"):
        ActivationStore.open(folder).stats("resid_out_0")


# -- ActivationCache.load's metadata -----------------------------------------------------------
@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("mapping_index", "{not json", "'mapping_index' is not valid JSON"),
        ("values", "[1, 2]", "'values' must be a JSON dict"),
        ("batch_saver", '"text"', "'batch_saver' must be a JSON dict"),
        ("tl_names", "{bad", "'tl_names' is not valid JSON"),
        ("mapping_index", '[["int", 0]]', "'mapping_index' is malformed"),
        ("pad_token_id", "one", "'pad_token_id' is malformed"),
    ],
)
def test_malformed_cache_metadata_names_the_file_and_field(tmp_path, field, value, message):
    cache = ActivationCache({"resid_out_0": torch.ones(2, 1, 3), "mapping_index": {"last": [0]}})
    path = cache.save(tmp_path / "cache.safetensors")
    header = header_of(path)
    header["__metadata__"][field] = value
    write_header(path, header)
    with pytest.raises(HookscopeError, match=message) as refused:
        ActivationCache.load(path)
    assert str(path) in str(refused.value)


def test_a_file_that_is_not_safetensors_is_named(tmp_path):
    path = tmp_path / "notes.safetensors"
    path.write_text("these are my notes, not a cache" * 10)
    with pytest.raises(HookscopeError, match="notes.safetensors is not a valid safetensors file"):
        ActivationCache.load(path)


# -- 4. faults while writing -------------------------------------------------------------------
def failing_on_call(real, number: int, error: BaseException, after: bool = False):
    """``real``, raising ``error`` on its ``number``-th call (1-based; after doing it when
    ``after``). ``calls`` counts them."""

    def wrapper(*args, **kwargs):
        wrapper.calls += 1
        if wrapper.calls != number:
            return real(*args, **kwargs)
        if after:
            real(*args, **kwargs)
        raise error

    wrapper.calls = 0
    return wrapper


FAULTS = {
    "disk full writing a shard": (
        hookscope.cache.ActivationCache, "save_sha256",
        OSError(errno.ENOSPC, "No space left on device"),
    ),
    "permission denied writing the statistics": (
        hookscope.store, "write_safetensors", PermissionError(errno.EACCES, "Permission denied")
    ),
    "disk full writing the manifest": (
        hookscope.store, "_write_json", OSError(errno.ENOSPC, "No space left on device")
    ),
}  # fmt: skip


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_a_write_fault_leaves_the_last_commit_and_says_so(hm, tmp_path, monkeypatch, fault):
    owner, name, error = FAULTS[fault]
    # the 2nd call is batch 1's (the manifest: the 1st is the new store's empty manifest)
    number = 3 if name == "_write_json" else 2
    monkeypatch.setattr(owner, name, failing_on_call(getattr(owner, name), number, error))
    folder = tmp_path / "acts"
    with pytest.raises(StoreError) as failed:
        extract(hm, folder)
    message = str(failed.value)
    assert str(folder) in message and "batch 1" in message, message
    assert "4 committed examples are intact" in message and error.strerror in message
    monkeypatch.undo()
    with pytest.warns(UserWarning, match="incomplete store"):
        kept = ActivationStore.open(folder)
    kept.verify()
    assert len(kept) == 4 and len(kept.manifest["shards"]) == 1
    clean = extract(hm, tmp_path / "clean")
    assert_same_store(extract(hm, folder), clean)  # resumed; the lock was released


class Crash(BaseException):
    """Stands for the process dying at one step of a commit."""


# the steps of a commit: the shard and statistics files (opened, then written; in place, as
# no manifest names them yet) and the manifest (written to a temporary file, renamed)
STEPS = [
    (hookscope.safetensors_files, "_pieces"),
    (os, "replace"),
]


def test_a_crash_at_every_step_of_a_commit_leaves_whole_shards_and_resumes(
    hm, tmp_path, monkeypatch
):
    texts = TEXTS[:6]
    clean = extract(hm, tmp_path / "clean", texts)
    crashes = 0
    for where in range(len(STEPS)):
        for after in (False, True):
            number = 1
            while True:
                folder = tmp_path / f"acts-{where}-{after}-{number}"
                owner, name = STEPS[where]
                monkeypatch.setattr(
                    owner, name, failing_on_call(getattr(owner, name), number, Crash(), after)
                )
                try:
                    extract(hm, folder, texts)
                except Crash:
                    crashes += 1
                    monkeypatch.undo()
                    check_crashed_store(folder, clean)
                    assert_same_store(extract(hm, folder, texts), clean)
                    number += 1
                    continue
                monkeypatch.undo()
                break
    # 2 batches of 2 files each; the manifest renamed when opened, at each commit, at the end
    assert crashes >= 2 * (4 + 4)


def check_crashed_store(folder: Path, clean: ActivationStore) -> None:
    """The folder opens with whole committed shards only, holding the clean store's first
    examples (or it is not a store yet: the crash came before the first manifest)."""
    if not (folder / MANIFEST).exists():
        return
    store = ActivationStore.open(folder) if _complete(folder) else _open_incomplete(folder)
    store.verify()
    held = len(store)
    assert held in (0, 4, 6)
    for key in store.keys():
        assert torch.equal(store[key], clean[key][:held]), key


def _complete(folder: Path) -> bool:
    return json.loads((folder / MANIFEST).read_text())["complete"]


def _open_incomplete(folder: Path) -> ActivationStore:
    with pytest.warns(UserWarning, match="incomplete store"):
        return ActivationStore.open(folder)


# -- 5. fuzzing: mutated manifests and shard headers -------------------------------------------
FIELDS = st.sampled_from(
    [
        ("examples",), ("complete",), ("stats",), ("format",), ("shards",), ("description",),
        ("shards", 0, "file"), ("shards", 1, "examples"), ("shards", 1, "bytes"),
        ("shards", 2, "sha256"), ("shards", 0, "data_sha256"), ("shards", 2, "examples"),
        ("stats_sha256",), ("previous_stats",),
    ]
)  # fmt: skip
VALUES = st.one_of(
    st.just(_DELETE),
    st.integers(-(2**70), 2**70),
    st.sampled_from(
        [
            "../outside.safetensors", "part-000/../../outside.safetensors", "link.safetensors",
            "OUTSIDE", "", None, True, [0, 4], [-4, 0], [4, 2], {"a": 1}, "x" * 64, 1.5,
        ]
    ),
)  # fmt: skip
PATH_FIELDS = st.sampled_from(
    [("shards", 0, "file"), ("shards", 2, "file"), ("stats",), ("previous_stats",)]
)
ESCAPING = st.sampled_from(
    ["../outside.safetensors", "part-000/../../outside.safetensors", "link.safetensors", "OUTSIDE"]
)
MUTATION = st.one_of(
    st.tuples(st.just("flip manifest byte"), st.integers(0, 10**6), st.integers(1, 255)),
    st.tuples(st.just("set manifest field"), FIELDS, VALUES),
    st.tuples(st.just("set manifest field"), PATH_FIELDS, ESCAPING),
    st.tuples(st.just("flip shard header byte"), st.integers(0, 10**6), st.integers(1, 255)),
    st.tuples(st.just("flip re-signed shard header byte"), st.integers(0, 10**6), st.integers(1, 255)),
)  # fmt: skip
FUZZ = settings(
    max_examples=int(os.environ.get("STORE_FUZZ_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def mutate(folder: Path, sentinel: Path, mutation: tuple) -> bool:
    """Apply ``mutation``; True when the store is re-signed (its data may then legitimately
    differ, so only the kind of outcome is checked)."""
    kind, *args = mutation
    if kind == "flip manifest byte":
        flip(folder / MANIFEST, *args)
    elif kind == "set manifest field":
        path, value = args
        value = str(sentinel) if value == "OUTSIDE" else value
        try:
            edit_manifest(folder, _set(path, value))
        except (KeyError, IndexError, TypeError, ValueError, AttributeError):
            pass  # the manifest was made unreadable or that field is gone: nothing to set
    else:
        shard = folder / "shard-00001.safetensors"
        length = int.from_bytes(shard.read_bytes()[:8], "little")
        flip(shard, args[0] % (8 + length), args[1])
        if kind == "flip re-signed shard header byte":
            try:
                resign(folder, 1)
            except (KeyError, IndexError, TypeError, ValueError, AttributeError):
                pass  # the manifest was made unreadable: nothing to re-sign
            return True
    return False


def flip(path: Path, position: int, mask: int) -> None:
    data = bytearray(path.read_bytes())
    data[position % len(data)] ^= mask
    path.write_bytes(bytes(data))


@FUZZ
@given(mutations=st.lists(MUTATION, min_size=1, max_size=3))
def test_a_mutated_store_opens_correctly_or_raises_hookscopes_error(
    pristine, expected, tmp_path_factory, mutations
):
    root = tmp_path_factory.mktemp("fuzz")
    folder, sentinel = copy_store(pristine, root)
    (folder / "link.safetensors").symlink_to(sentinel)
    resigned = any([mutate(folder, sentinel, m) for m in mutations])
    since = len(OPENED)
    try:
        with warnings.catch_warnings():  # a mutation may clear ``complete``
            warnings.simplefilter("ignore")
            got = read_everything(folder)
            cache = ActivationCache.load(folder / "shard-00001.safetensors")
    except HookscopeError:
        got = None
    never_opened(sentinel, since)
    if got is not None and not resigned:
        assert_same_data(got, expected, mutations)
        assert torch.equal(cache["resid_out_0"], expected["resid_out_0"][4:8])


def assert_same_data(got: dict, expected: dict, mutations: object) -> None:
    """Every key read back equals the pristine store's value (tensors exactly)."""
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        same = (
            torch.equal(got[key], value) if isinstance(value, torch.Tensor) else got[key] == value
        )
        assert same, (key, mutations)


def test_a_shard_holding_other_examples_than_its_range_is_refused(pristine, tmp_path):
    folder, _ = copy_store(pristine, tmp_path)
    # shard 1 replaced by shard 2 (2 examples, not 4), checksums made to agree
    shutil.copy(folder / "shard-00002.safetensors", folder / "shard-00001.safetensors")
    resign(folder, 1)
    with pytest.raises(StoreError, match=r"shard-00001.safetensors of .* holds 2 examples") as bad:
        ActivationStore.open(folder)["resid_out_0"]
    assert "examples [4, 8] say 4" in str(bad.value)


def test_statistics_swapped_or_damaged_are_refused(pristine, tmp_path):
    folder, _ = copy_store(pristine, tmp_path)
    manifest = edit_manifest(folder, lambda m: None)
    assert manifest["stats_sha256"] and manifest["previous_stats"]
    # the manifest pointed at the statistics of the batch before (a real file of the store)
    edit_manifest(folder, _set(("stats",), manifest["previous_stats"]))
    with pytest.raises(StoreError, match="statistics file stats-00001.safetensors of .* corrupted"):
        ActivationStore.open(folder).stats("resid_out_1")
    edit_manifest(folder, _set(("stats",), manifest["stats"]))
    flip(folder / manifest["stats"], -3, 0x40)
    with pytest.raises(StoreError, match="does not match the manifest's stats_sha256"):
        ActivationStore.open(folder).stats("resid_out_1")


@settings(FUZZ, max_examples=int(os.environ.get("STORE_FUZZ_EXAMPLES", "40")) // 3)
@given(mutations=st.lists(MUTATION, min_size=1, max_size=3), overwrite=st.booleans())
def test_a_mutated_store_resumes_or_is_refused_and_overwrite_never_reaches_outside(
    hm, pristine, expected, tmp_path_factory, mutations, overwrite
):
    root = tmp_path_factory.mktemp("fuzz-writer")
    folder, sentinel = copy_store(pristine, root)
    (folder / "link.safetensors").symlink_to(sentinel)
    resigned = any([mutate(folder, sentinel, m) for m in mutations])
    since = len(OPENED)
    got = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            extract(hm, folder, overwrite=overwrite)
            got = read_everything(folder)
        except HookscopeError as error:
            # overwrite replaces any store of hookscope's format; only a foreign one is kept
            assert not overwrite or "not a hookscope activation-store manifest" in str(error)
    never_opened(sentinel, since)
    assert sentinel.read_bytes() == (pristine / "shard-00000.safetensors").read_bytes()
    if got is not None and not resigned:  # a resumed store holds the clean store's data
        assert_same_data(got, expected, mutations)
