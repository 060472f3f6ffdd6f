"""Loads into the caller's tensors (``load_checkpoint(..., into=state)``, issue 14).

The direct way (files read once straight into the targets, hashed on the way) and the copy way
(load, then copy) give the same result as a plain load; the targets' memory is reused; a bad pair
is refused before any byte is written; damage is found, recorded, and resume falls back."""

from __future__ import annotations

import collections
import hashlib
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptdb import CheckpointCorruptError, FileCheckpointManager, InvalidArgumentError
from ckptdb.storage import into as into_mod
from ckptdb.storage import reader

pytestmark = pytest.mark.skipif(reader._populate is None, reason="no mapped loads on this host")


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every file takes the direct way, in pieces of 64 KiB (many per tensor, several readers);
    returns the sizes of the files read straight into targets."""
    monkeypatch.setattr(into_mod, "DIRECT_MIN", 0)
    monkeypatch.setattr(into_mod, "_PIECE", 64 << 10)
    seen: list[int] = []
    real = into_mod.read_into

    def counted(path: Path, size: int, *a: Any, **k: Any) -> str:
        seen.append(size)
        return real(path, size, *a, **k)

    monkeypatch.setattr(into_mod, "read_into", counted)
    return seen


def _state(seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    model = collections.OrderedDict(
        w=torch.randn(300_001, generator=g), b=torch.randn(17, generator=g), h=torch.randn(64, 33, generator=g)
    )
    model._metadata = {"": {"version": 3}}  # type: ignore[attr-defined]
    base = torch.randn(1000, generator=g)
    return {
        "model": model,
        "optimizer": {
            "state": {0: {"m": torch.randn(200_000, generator=g), "step": torch.tensor(float(seed))}},
            "param_groups": [{"lr": 0.1, "params": [0]}],
        },
        "tied": {"a": base, "b": base, "view": base[10:20]},
        "step_nr": 7 + seed,
    }


def _targets() -> dict[str, Any]:
    """Preallocated tensors at the paths of :func:`_state`, filled with a marker."""
    s = _state()
    out = {
        "model": {k: torch.full_like(v, -1.0) for k, v in s["model"].items()},
        "optimizer": {"state": {0: {k: torch.full_like(v, -1.0) for k, v in s["optimizer"]["state"][0].items()}}},
        "tied": {"a": torch.full((1000,), -1.0), "view": torch.full((10,), -1.0)},
        "extra": torch.full((5,), -1.0),  # not in the checkpoint: left alone
    }
    return out


def _save(mgr: FileCheckpointManager, step: int, seed: int) -> None:
    mgr.begin_checkpoint(step)
    mgr.save_state(_state(seed))
    mgr.commit_checkpoint()


def _check(got: dict[str, Any], into: dict[str, Any], seed: int) -> None:
    want = _state(seed)
    for k, v in want["model"].items():
        assert torch.equal(got["model"][k], v), k
        assert got["model"][k] is into["model"][k]  # the target itself, filled in place
    assert got["model"]._metadata == {"": {"version": 3}}
    for k, v in want["optimizer"]["state"][0].items():
        assert torch.equal(got["optimizer"]["state"][0][k], v)
        assert got["optimizer"]["state"][0][k] is into["optimizer"]["state"][0][k]
    assert got["optimizer"]["param_groups"] == [{"lr": 0.1, "params": [0]}]
    assert got["step_nr"] == 7 + seed
    assert torch.equal(into["tied"]["a"], want["tied"]["a"]) and got["tied"]["a"] is into["tied"]["a"]
    assert torch.equal(into["tied"]["view"], want["tied"]["view"])
    assert got["tied"]["b"] is got["tied"]["a"]  # one tensor in the checkpoint: one in the result
    assert torch.equal(into["extra"], torch.full((5,), -1.0))


def test_direct_load_into_targets_equals_the_plain_load(tmp_path: Path, catalog_url: str, reads: list[int]) -> None:
    mgr = FileCheckpointManager(tmp_path / "ck", catalog=catalog_url)
    _save(mgr, 1, 0)
    into = _targets()
    ptrs = [into["model"]["w"].data_ptr(), into["optimizer"]["state"][0]["m"].data_ptr()]
    got = mgr.load_checkpoint(1, into=into)
    assert len(reads) == 2  # model.pt and rank_0.pt, both straight into the targets
    _check(got, into, 0)
    assert [got["model"]["w"].data_ptr(), got["optimizer"]["state"][0]["m"].data_ptr()] == ptrs
    plain = mgr.load_checkpoint(1)
    assert torch.equal(plain["model"]["h"], got["model"]["h"])
    mgr.close()


@pytest.mark.parametrize("way", ["small files (copy)", "verify=size (copy)", "buffered reads"])
def test_the_other_ways_give_the_same_result(
    tmp_path: Path, way: str, reads: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    mgr = FileCheckpointManager(tmp_path / "ck")
    _save(mgr, 1, 0)
    into = _targets()
    if way == "small files (copy)":
        monkeypatch.setattr(into_mod, "DIRECT_MIN", 1 << 40)
        got = mgr.load_checkpoint(1, into=into)
        assert reads == []
    elif way == "verify=size (copy)":
        got = mgr.load_checkpoint(1, into=into, verify="size")
        assert reads == []
    else:
        monkeypatch.setenv("CKPTDB_NO_DIRECT", "1")
        got = mgr.load_checkpoint(1, into=into)
        assert len(reads) == 2
    _check(got, into, 0)
    mgr.close()


def test_non_contiguous_and_parameter_targets(tmp_path: Path, reads: list[int]) -> None:
    mgr = FileCheckpointManager(tmp_path / "ck")
    _save(mgr, 1, 0)
    h = torch.full((33, 64), -1.0).t()  # the right shape, not contiguous: filled after the digest check
    w = torch.nn.Parameter(torch.full((300_001,), -1.0))  # a model's parameter, requires_grad
    got = mgr.load_checkpoint(1, into={"model": {"h": h, "w": w}})
    want = _state(0)["model"]
    assert torch.equal(h, want["h"]) and got["model"]["h"] is h
    assert torch.equal(w.detach(), want["w"]) and got["model"]["w"] is w and w.requires_grad
    mgr.close()


@pytest.mark.parametrize("direct", [True, False])
def test_one_saved_tensor_at_two_paths_fills_both_targets(
    tmp_path: Path, reads: list[int], monkeypatch: pytest.MonkeyPatch, direct: bool
) -> None:
    """Tied in the checkpoint (one tensor saved under two keys), untied in ``into``: both are loaded."""
    if not direct:
        monkeypatch.setattr(into_mod, "DIRECT_MIN", 1 << 40)
    mgr = FileCheckpointManager(tmp_path / "ck")
    w = torch.randn(100_000)
    mgr.begin_checkpoint(1)
    mgr.save_state({"model": {"embed": w, "head": w}})
    mgr.commit_checkpoint()
    a, b = torch.zeros(100_000), torch.zeros(100_000)
    got = mgr.load_checkpoint(1, into={"model": {"embed": a, "head": b}})
    assert torch.equal(a, w) and torch.equal(b, w)
    assert got["model"]["embed"] is got["model"]["head"]  # still one tensor in the result
    mgr.close()


@pytest.mark.parametrize("direct", [True, False])
def test_a_mismatched_target_is_refused_before_anything_is_written(
    tmp_path: Path, reads: list[int], monkeypatch: pytest.MonkeyPatch, direct: bool
) -> None:
    if not direct:
        monkeypatch.setattr(into_mod, "DIRECT_MIN", 1 << 40)
    mgr = FileCheckpointManager(tmp_path / "ck")
    _save(mgr, 1, 0)
    into = _targets()
    into["optimizer"]["state"][0]["m"] = torch.full((3, 3), -1.0)  # in rank_0.pt, read after model.pt
    with pytest.raises(InvalidArgumentError, match=r"into\['optimizer'\]\['state'\]\[0\]\['m'\].*shape \(200000,\)"):
        mgr.load_checkpoint(1, into=into)
    assert reads == []
    assert torch.equal(into["model"]["w"], torch.full((300_001,), -1.0))  # model.pt's targets untouched
    into["optimizer"]["state"][0]["m"] = torch.zeros(200_000, dtype=torch.float64)
    with pytest.raises(InvalidArgumentError, match=r"torch\.float64"):
        mgr.load_checkpoint(1, into=into)
    into["optimizer"]["state"][0]["m"] = torch.zeros(200_000, device="meta")
    with pytest.raises(InvalidArgumentError, match="meta device"):
        mgr.load_checkpoint(1, into=into)

    class Sub(torch.Tensor):
        pass

    into["optimizer"]["state"][0]["m"] = torch.zeros(200_000).as_subclass(Sub)
    with pytest.raises(InvalidArgumentError, match="Sub, not a plain tensor"):
        mgr.load_checkpoint(1, into=into)
    assert torch.equal(into["model"]["w"], torch.full((300_001,), -1.0))
    assert mgr.catalog.live(mgr.run.id, 1).state == "committed"  # type: ignore[union-attr]  # bad input, not damage
    mgr.close()


def test_damage_is_found_recorded_and_resume_falls_back_into_the_targets(tmp_path: Path, reads: list[int]) -> None:
    mgr = FileCheckpointManager(tmp_path / "ck")
    _save(mgr, 1, 0)
    _save(mgr, 2, 1)
    model = tmp_path / "ck" / "step_2" / "model.pt"
    with open(model, "r+b") as f:  # one byte in the middle of a tensor's bytes
        f.seek(model.stat().st_size // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x40]))
    into = _targets()
    with pytest.raises(CheckpointCorruptError):
        mgr.load_checkpoint(2, into=into)
    assert mgr.catalog.live(mgr.run.id, 2).state == "corrupt"  # type: ignore[union-attr]
    step, got = mgr.load_last_checkpoint(into=into)
    assert step == 1
    _check(got, into, 0)  # the targets hold step 1 now, whatever step 2's read left in them
    mgr.close()


def test_read_into_a_file_shorter_than_its_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(into_mod, "_PIECE", 64 << 10)
    p = tmp_path / "f"
    data = bytes(range(256)) * 1000  # 256 000 bytes: 4 pieces
    p.write_bytes(data)
    dst = torch.zeros(100_000, dtype=torch.uint8)
    digest = into_mod.read_into(p, len(data), "sha256", [(70_000, 100_000, dst.data_ptr())], 3)
    assert digest == hashlib.sha256(data).hexdigest()
    assert torch.equal(dst, torch.frombuffer(bytearray(data[70_000:170_000]), dtype=torch.uint8))
    monkeypatch.setattr(into_mod, "_PIECE", 128 << 10)  # kept buffers of another size are not reused
    assert into_mod.read_into(p, len(data), "sha256", [], 3) == hashlib.sha256(data).hexdigest()
    monkeypatch.setattr(into_mod, "_PIECE", 64 << 10)
    with pytest.raises(CheckpointCorruptError, match="ended early"):
        into_mod.read_into(p, len(data) + 5000, "sha256", [], 3)
    with pytest.raises(CheckpointCorruptError, match="ended early"):  # every reader fails, none hangs
        into_mod.read_into(p, len(data) * 20, "sha256", [(0, 100_000, dst.data_ptr())], 3)
    with pytest.raises(IsADirectoryError):  # a read error is raised as it is
        into_mod.read_into(tmp_path, 1 << 20, "sha256", [], 3)
