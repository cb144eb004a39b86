"""Property tests over store life cycles: runs on a folder with the same, extended, changed or
shorter prompts, killed after some batches, resumed, overwritten.

The invariant after every step: either the call succeeded and the folder holds exactly what a
clean run on the prompts it now holds writes (the asked prompts; their first committed batches
after a kill), or it raised a StoreError and the folder is byte for byte what it was.
"""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from store_worker import assert_same_store, prompts
from tiny_models import build_model, build_tokenizer

from hookscope import ExtractionConfig, HookedModel
from hookscope.store import LOCK, ActivationStore, StoreError

BATCH = 3
POOL = prompts(12)
OTHER = ["Hello world", "A dog barked", "The capital of France is Paris"]
CONFIG = ExtractionConfig(extract_resid_out=True)


class Killed(Exception):
    """Stands for a SIGKILL / Ctrl-C after some committed batches."""


@pytest.fixture(scope="module")
def hm():
    model = HookedModel.from_hf(build_model("llama"), build_tokenizer())
    model.config.batch_size = BATCH
    return model


def run(hm, folder: Path, texts: list[str], kill_after: int | None = None, overwrite=False):
    """extract_cache to ``folder``; ``kill_after``: raise Killed after that many batches ran."""
    done = []

    def saver(batch):
        if kill_after is not None and len(done) == kill_after:
            raise Killed
        done.append(1)
        return {"length": batch["attention_mask"].sum(1)}

    return hm.extract_cache(
        texts,
        ["last", 0],
        extraction_config=CONFIG,
        output_dir=str(folder),
        batch_saver=saver,
        overwrite=overwrite,
    )


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != LOCK}


STEP = st.tuples(
    st.sampled_from(["same", "extend", "changed", "shorter", "fresh"]),
    st.integers(0, 11),  # a size or an index, as the kind needs
    st.one_of(st.none(), st.integers(0, 2)),  # kill after this many batches
    st.sampled_from([False, False, False, True]),  # overwrite
)


def asked_prompts(kind: str, number: int, held: list[str] | None) -> list[str]:
    held = held or []
    if kind == "same" and held:
        return list(held)
    if kind == "extend" and len(held) < len(POOL):
        return held + [p for p in POOL if p not in held][: 1 + number % 5]
    if kind == "changed" and held:
        changed = list(held)
        changed[number % len(held)] = OTHER[number % len(OTHER)]
        return changed
    if kind == "shorter" and len(held) > 1:
        return held[: 1 + number % (len(held) - 1)]
    return POOL[number % 4 : number % 4 + 1 + number % 8]


def expected_outcome(held, asked, kill_after, overwrite) -> tuple[str, list[str] | None]:
    """("error", held) or ("ok" / "killed", the prompts the folder then holds)."""
    fresh = held is None or overwrite
    if not fresh and asked[: len(held)] != held:
        return "error", held  # other data, or more examples than asked
    kept = 0 if fresh else len(held) // BATCH  # a short last batch is run again whole
    if not fresh and len(held) == len(asked):
        return "ok", asked
    batches = -(-len(asked) // BATCH)
    if kill_after is not None and batches - kept > kill_after:
        return "killed", asked[: (kept + kill_after) * BATCH]
    return "ok", asked


CLEAN: dict[tuple[str, ...], ActivationStore] = {}
CLEAN_ROOT = tempfile.mkdtemp(prefix="hookscope-clean-")


def clean_store(hm, texts: list[str]) -> ActivationStore:
    if tuple(texts) not in CLEAN:
        CLEAN[tuple(texts)] = run(hm, Path(CLEAN_ROOT) / str(len(CLEAN)), texts)
    return CLEAN[tuple(texts)]


@settings(
    max_examples=int(os.environ.get("LIFECYCLE_EXAMPLES", "15")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(steps=st.lists(STEP, min_size=2, max_size=4))
def test_store_life_cycles(hm, steps):
    with tempfile.TemporaryDirectory() as root:
        folder = Path(root) / "acts"
        held: list[str] | None = None
        for kind, number, kill_after, overwrite in steps:
            asked = asked_prompts(kind, number, held)
            outcome, after = expected_outcome(held, asked, kill_after, overwrite)
            if os.environ.get("LIFECYCLE_LOG"):
                print("STEP", kind, outcome, len(held or []), len(asked), kill_after, overwrite)
            before = snapshot(folder) if folder.exists() else None
            if outcome == "error":
                with pytest.raises(StoreError, match=str(folder)):
                    run(hm, folder, asked, kill_after, overwrite)
                assert snapshot(folder) == before
                continue
            if outcome == "killed":
                with pytest.raises(Killed):
                    run(hm, folder, asked, kill_after, overwrite)
            else:
                run(hm, folder, asked, kill_after, overwrite)
            held = after
            store = ActivationStore.open(folder)
            assert store.complete == (outcome == "ok") and len(store) == len(held)
            if held:
                assert_same_store(store, clean_store(hm, held))


def test_a_writer_in_another_thread_is_refused(hm, tmp_path):
    started, release = threading.Event(), threading.Event()
    errors = []

    def slow_saver(batch):
        started.set()
        release.wait(30)
        return {}

    def first():
        try:
            hm.extract_cache(
                POOL[:6],
                ["last"],
                extraction_config=CONFIG,
                output_dir=str(tmp_path / "a"),
                batch_saver=slow_saver,
            )
        except Exception as error:  # reported below
            errors.append(error)

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert started.wait(30)
        with pytest.raises(StoreError, match="being written by another thread"):
            hm.extract_cache(
                POOL[:6], ["last"], extraction_config=CONFIG, output_dir=str(tmp_path / "a")
            )
    finally:
        release.set()
        thread.join(60)
    assert not errors and len(ActivationStore.open(tmp_path / "a")) == 6


def test_a_failed_run_releases_the_folder(hm, tmp_path):
    """An error in extract_cache releases the folder's writer lock at once (even while the
    error's traceback, as in a notebook, keeps the writer object alive): another thread
    resumes it to the same store as a clean run."""
    folder = tmp_path / "a"
    with pytest.raises(Killed) as killed:  # its traceback holds the writer (as a notebook's does)
        run(hm, folder, POOL[:7], kill_after=1)
    outcome = []

    def other_thread():
        try:
            outcome.append(len(run(hm, folder, POOL[:7])))
        except StoreError as error:
            outcome.append(str(error))

    thread = threading.Thread(target=other_thread)
    thread.start()
    thread.join(60)
    assert outcome == [7], outcome
    del killed
    assert_same_store(ActivationStore.open(folder), clean_store(hm, POOL[:7]))
