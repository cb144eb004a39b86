"""hookscope's safetensors writer: files safetensors itself reads back bit for bit, checksums
equal to the file's, views and odd dtypes, atomic and in-place writes, and running statistics."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from hookscope import ActivationCache
from hookscope.safetensors_files import write_safetensors
from hookscope.store import RunningStats

DTYPES = [
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool,
]  # fmt: skip
FALLBACK = [torch.float8_e4m3fn]  # written by safetensors' own writer


def _tensor(dtype: torch.dtype, shape: tuple) -> torch.Tensor:
    values = torch.randn(shape) * 50
    return values > 0 if dtype == torch.bool else values.to(dtype)


@pytest.mark.parametrize("atomic", [True, False])
@pytest.mark.parametrize("dtypes", [DTYPES, DTYPES + FALLBACK], ids=["streamed", "fallback"])
def test_every_dtype_reads_back_bit_for_bit_with_the_files_checksum(tmp_path, atomic, dtypes):
    base = torch.randn(4, 6)
    tensors = {str(d): _tensor(d, (3, 2, 5)) for d in dtypes}
    tensors |= {
        "view_a": base[:2],  # two views of one tensor (safetensors' writer refuses these)
        "view_b": base[2:],
        "strided": base.t(),  # not contiguous
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 4),
    }
    path = tmp_path / "sub" / "x.safetensors"
    digest = write_safetensors(path, tensors, {"note": "hi"}, atomic=atomic)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    back = load_file(path)
    assert back.keys() == tensors.keys()
    for name, value in tensors.items():
        assert back[name].dtype == value.dtype and back[name].shape == value.shape, name
        as_bytes = value.contiguous().reshape(-1).view(torch.uint8)
        assert torch.equal(back[name].reshape(-1).view(torch.uint8), as_bytes), name
    with safe_open(path, "pt") as handle:
        assert handle.metadata() == {"note": "hi"}
    assert os.listdir(path.parent) == ["x.safetensors"]  # no temporary file left


def test_a_link_in_the_way_is_replaced_never_written_through(tmp_path):
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"keep")
    link = tmp_path / "folder" / "shard.safetensors"
    link.parent.mkdir()
    link.symlink_to(outside)
    write_safetensors(link, {"a": torch.ones(2)}, atomic=False)
    assert outside.read_bytes() == b"keep" and not link.is_symlink()
    assert torch.equal(load_file(link)["a"], torch.ones(2))


def test_an_atomic_write_that_fails_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "x.safetensors"
    write_safetensors(path, {"a": torch.zeros(3)})
    monkeypatch.setattr("hookscope.safetensors_files._pieces", _failing)
    with pytest.raises(OSError, match="disk full"):
        write_safetensors(path, {"a": torch.ones(3)})
    assert torch.equal(load_file(path)["a"], torch.zeros(3))
    assert os.listdir(tmp_path) == ["x.safetensors"]


def _failing(tensors, metadata):
    yield b"12345678"
    raise OSError("disk full")


def test_a_cache_of_views_saves_and_loads_the_same_values(tmp_path):
    stacked = torch.randn(3, 2, 1, 5)  # two points as views of one tensor
    cache = ActivationCache(
        {
            "resid_out_0": stacked[:, 0],
            "resid_out_1": stacked[:, 1],
            "position_mask": torch.ones(3, 1, dtype=torch.bool),
            "mapping_index": {"last": [0]},
        }
    )
    digest = cache.save_sha256(tmp_path / "c.safetensors")
    assert digest == hashlib.sha256((tmp_path / "c.safetensors").read_bytes()).hexdigest()
    back = ActivationCache.load(tmp_path / "c.safetensors")
    assert torch.equal(back["resid_out_1"], stacked[:, 1])
    assert back["mapping_index"] == {"last": [0]}


def test_running_statistics_over_masked_slots_equal_a_hand_computation():
    torch.manual_seed(0)
    batches, stats = [], RunningStats()
    for size in (3, 5, 2):
        mask = torch.rand(size, 2) > 0.3
        mask[0] = True  # every slot has examples
        batch = {
            "position_mask": mask,
            "resid_out_0": torch.randn(size, 2, 4),
            "resid_out_1": torch.randn(size, 2, 4) * 3 + 1,
            "attn_pattern_0": torch.randn(size, 2, 7),
        }
        batches.append(batch)
        stats.update(ActivationCache({**batch, "mapping_index": {"last": [0], 0: [1]}}))
    mask = torch.cat([b["position_mask"] for b in batches])
    for key in ("resid_out_0", "resid_out_1", "attn_pattern_0"):
        values = torch.cat([b[key] for b in batches]).double()
        summary = stats.summary(key)
        for slot in range(2):
            real = values[mask[:, slot], slot]
            assert summary["count"][slot] == len(real)
            torch.testing.assert_close(summary["mean"][slot].double(), real.mean(0))
            torch.testing.assert_close(
                summary["var"][slot].double(), real.var(0, unbiased=False), rtol=1e-5, atol=1e-6
            )


@pytest.mark.parametrize(
    "metadata, tensors",
    [
        ({"run": 3}, {"a": torch.zeros(2)}),
        ({"note": None}, {"a": torch.zeros(2)}),
        ({"k": "v"}, {"__metadata__": torch.zeros(2)}),
    ],
    ids=["int-value", "none-value", "dunder-name"],
)
def test_a_header_safetensors_cannot_read_is_refused_and_the_old_file_kept(
    tmp_path, metadata, tensors
):
    """safetensors' reader takes only string metadata values and no tensor named
    '__metadata__': such a file would be unreadable, so nothing is written (an atomic save over
    a good file keeps it) and the error names the bad entry."""
    path = tmp_path / "cache.safetensors"
    write_safetensors(path, {"kept": torch.arange(3.0)})
    before = path.read_bytes()
    with pytest.raises(ValueError, match="metadata|tensor name"):
        write_safetensors(path, tensors, metadata)
    assert path.read_bytes() == before
    assert torch.equal(load_file(path)["kept"], torch.arange(3.0))
    with pytest.raises(ValueError, match="'run': 3"):
        ActivationCache({"resid_out_0": torch.zeros(1, 1, 2)}).save(path, metadata={"run": 3})
    assert path.read_bytes() == before


def test_a_negative_view_is_written_with_its_values(tmp_path):
    """A tensor with the negative bit set (torch's lazy negation of a view) is written as its
    values, not its storage."""
    base = torch.randn(2, 3)
    path = tmp_path / "neg.safetensors"
    write_safetensors(path, {"neg": base._neg_view(), "base": base})
    assert torch.equal(load_file(path)["neg"], -base)


def test_metadata_text_is_utf8_and_a_lone_surrogate_is_refused(tmp_path):
    """Non-ASCII metadata is written as UTF-8 (the header length counts its bytes) and read
    back exactly by safetensors; a lone surrogate (not UTF-8) is refused as safetensors' own
    writer refuses it, never written into a header safetensors cannot parse."""
    path = tmp_path / "text.safetensors"
    text = 'héllo ☃ 𝄞 日本\u2028 "quoted" \\'
    write_safetensors(path, {"a": torch.arange(3)}, {"text": text})
    with safe_open(path, "pt") as file:
        assert file.metadata() == {"text": text}
    assert torch.equal(load_file(path)["a"], torch.arange(3))
    before = path.read_bytes()
    with pytest.raises(UnicodeEncodeError):
        write_safetensors(path, {"a": torch.zeros(1)}, {"text": "ok \ud800"}, atomic=False)
    assert path.read_bytes() == before  # refused before the file was touched
    header_length = int.from_bytes(before[:8], "little")
    assert header_length % 8 == 0 and "日本".encode() in before[8 : 8 + header_length]


def test_a_header_over_safetensors_limit_is_refused_and_the_old_file_kept(tmp_path, monkeypatch):
    """safetensors refuses to read a header over its limit (100 MiB): such a file is never
    written (the limit lowered here to keep the test small)."""
    from hookscope import safetensors_files

    path = tmp_path / "big.safetensors"
    write_safetensors(path, {"a": torch.zeros(1)})
    before = path.read_bytes()
    monkeypatch.setattr(safetensors_files, "MAX_HEADER_BYTES", 256)
    with pytest.raises(ValueError, match="over the 256"):
        write_safetensors(path, {"a": torch.zeros(1)}, {"text": "x" * 300}, atomic=False)
    assert path.read_bytes() == before
