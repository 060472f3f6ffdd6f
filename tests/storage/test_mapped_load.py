"""The verified mapped load (issue 14): ``torch.load(mmap=True)`` first, then the mapped pages read in
by several threads and hashed in order. Damage anywhere in the file (tensor bytes, the pickle, the zip
directory) is still found, recorded and never returned; the result equals the plain load."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from ckptdb import CheckpointCorruptError, FileCheckpointManager
from ckptdb.loader import load_model
from ckptdb.storage import checks, reader
from ckptdb.storage.writer import FileRecord

pytestmark = pytest.mark.skipif(reader._populate is None, reason="no MADV_POPULATE_READ on this host")


@pytest.fixture(autouse=True)
def _small_files_mapped(monkeypatch: pytest.MonkeyPatch) -> None:
    # every file takes the mapped path, and is cut into many pieces (several threads at once)
    monkeypatch.setattr(reader, "_MAPPED_MIN", 0)
    monkeypatch.setattr(reader, "_POP_CHUNK", 64 << 10)


def _state() -> dict[str, object]:
    g = torch.Generator().manual_seed(0)
    return {
        "model": {"w": torch.randn(300_000, generator=g), "b": torch.randn(17, generator=g)},
        "optimizer": {"state": {0: {"m": torch.randn(200_000, generator=g)}}, "param_groups": [{"lr": 0.1}]},
    }


def _save(tmp_path: Path, url: str) -> tuple[FileCheckpointManager, Path]:
    mgr = FileCheckpointManager(tmp_path / "ck", catalog=url)
    mgr.begin_checkpoint(1)
    mgr.save_state(_state())
    mgr.commit_checkpoint()
    return mgr, tmp_path / "ck" / "step_1"


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


def test_mapped_load_equals_the_plain_load(tmp_path: Path, catalog_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    mgr, _ = _save(tmp_path, catalog_url)

    def no_second_read(*a: object, **k: object) -> None:
        raise AssertionError("the digest must come from the mapped pages, not a read() of the file")

    monkeypatch.setattr(checks, "hash_file", no_second_read)
    got = mgr.load_checkpoint(1)
    want = _state()
    assert torch.equal(got["model"]["w"], want["model"]["w"])  # type: ignore[index]
    assert torch.equal(got["optimizer"]["state"][0]["m"], want["optimizer"]["state"][0]["m"])  # type: ignore[index]
    assert got["optimizer"]["param_groups"] == [{"lr": 0.1}]
    mgr.close()


@pytest.mark.parametrize("where", ["tensor", "end"])
def test_a_flipped_byte_is_found_recorded_and_resume_falls_back(tmp_path: Path, catalog_url: str, where: str) -> None:
    mgr, _ = _save(tmp_path, catalog_url)
    mgr.begin_checkpoint(2)
    mgr.save_state(_state())
    mgr.commit_checkpoint()
    model = tmp_path / "ck" / "step_2" / "model.pt"
    size = model.stat().st_size
    # in the middle of a tensor's bytes, or in the zip's central directory at the end
    _flip(model, size // 2 if where == "tensor" else size - 30)
    with pytest.raises(CheckpointCorruptError):
        mgr.load_checkpoint(2)
    assert mgr.catalog.live(mgr.run.id, 2).state == "corrupt"  # type: ignore[union-attr]
    step, state = mgr.load_last_checkpoint()
    assert step == 1 and torch.equal(state["model"]["w"], _state()["model"]["w"])  # type: ignore[index]
    mgr.close()


def test_load_model_checks_the_digest_of_the_mapped_file(tmp_path: Path, catalog_url: str) -> None:
    mgr, step_dir = _save(tmp_path, catalog_url)
    mgr.close()
    sd, _ = load_model(catalog_url)  # the catalog's only run
    assert torch.equal(sd["w"], _state()["model"]["w"])  # type: ignore[index]
    model = step_dir / "model.pt"
    _flip(model, model.stat().st_size // 3)
    with pytest.raises(CheckpointCorruptError):
        load_model(catalog_url)
    rec = FileRecord("model.pt", model.stat().st_size, "xxh3_128", "0" * 32)
    with pytest.raises(CheckpointCorruptError, match="xxh3_128"):
        reader.load_torch_checked(step_dir, rec, 1)


def test_a_file_that_no_longer_loads_is_reported_as_damage(tmp_path: Path) -> None:
    path = tmp_path / "step_1" / "x.pt"
    path.parent.mkdir()
    torch.save({"t": torch.arange(100_000)}, path)
    from ckptdb.storage.hashing import hash_file

    _, digest = hash_file(path, "xxh3_128")
    rec = FileRecord("x.pt", path.stat().st_size, "xxh3_128", digest)
    assert torch.equal(reader.load_torch_checked(path.parent, rec, 1)["t"], torch.arange(100_000))
    with open(path, "r+b") as f:  # zero the zip's end-of-central-directory record: not loadable
        f.seek(-22, os.SEEK_END)
        f.write(bytes(22))
    with pytest.raises(CheckpointCorruptError, match="xxh3_128"):
        reader.load_torch_checked(path.parent, rec, 1)
