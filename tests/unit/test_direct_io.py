"""The O_DIRECT file writer and the read-ahead digest pass (issue 14): same bytes, same digests,
plain torch files, whatever the sizes and the filesystem."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from ckptdb.storage import hashing, writer
from ckptdb.storage.hashing import hash_file
from ckptdb.storage.writer import StepWriter, TorchFile


def _state(n: int) -> dict[str, object]:
    g = torch.Generator().manual_seed(n)
    # a storage larger than one direct buffer, one that straddles buffer ends, many small ones
    big = torch.randn((writer._DBUF // 4) + 12345, generator=g)
    return {
        "big": big,
        "view": big[7:99],
        "odd": torch.randn(3 * (writer._DBUF // 4) // 2 + 1, generator=g),
        "small": [torch.randn(k, generator=g) for k in range(1, 40)],
        "n": n,
    }


def _write(tmp_path: Path, step: int, obj: object, *, direct: bool) -> tuple[Path, writer.FileRecord]:
    w = StepWriter(tmp_path, step, f"tok{step}", hash_algorithm="xxh3_128", direct=direct)
    w.open()
    rec = w.write_torch_many([TorchFile("model.pt", obj)])[0]
    w.finalize()
    return w.tmp_dir / "model.pt", rec


def test_direct_and_buffered_files_are_identical_plain_torch_files(tmp_path: Path) -> None:
    obj = _state(3)
    p_direct, r_direct = _write(tmp_path, 1, obj, direct=True)
    p_buf, r_buf = _write(tmp_path, 2, obj, direct=False)
    assert p_direct.read_bytes() == p_buf.read_bytes()
    assert r_direct.size_bytes % 4096 != 0  # the padded last block was truncated away
    assert (r_direct.size_bytes, r_direct.digest) == (r_buf.size_bytes, r_buf.digest)
    assert hash_file(p_direct, "xxh3_128") == (r_direct.size_bytes, r_direct.digest)
    back = torch.load(p_direct, weights_only=True)
    assert torch.equal(back["big"], obj["big"]) and torch.equal(back["odd"], obj["odd"])  # type: ignore[arg-type]
    assert back["view"].untyped_storage().data_ptr() == back["big"].untyped_storage().data_ptr()  # still shared
    assert [t.tolist() for t in back["small"]] == [t.tolist() for t in obj["small"]]  # type: ignore[attr-defined]


def test_direct_writer_on_tmpfs(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK):
        pytest.skip("no writable /dev/shm")
    d = shm / f"ckptdb-direct-{os.getpid()}"
    d.mkdir()
    try:
        obj = _state(4)
        p, rec = _write(d, 1, obj, direct=True)  # O_DIRECT refused (EINVAL) or accepted: same file
        assert hash_file(p, "xxh3_128") == (rec.size_bytes, rec.digest)
        assert torch.equal(torch.load(p, weights_only=True)["odd"], obj["odd"])  # type: ignore[arg-type]
    finally:
        import shutil

        shutil.rmtree(d)


def test_an_empty_state_and_repeated_saves_reuse_the_buffers(tmp_path: Path) -> None:
    for step in range(3):
        p, rec = _write(tmp_path, step, {}, direct=True)
        assert torch.load(p, weights_only=True) == {}
        assert hash_file(p, "xxh3_128") == (rec.size_bytes, rec.digest)


@pytest.mark.parametrize("size", [0, 1, 8 << 20, (8 << 20) + 3, (5 << 20) * 3 + 7, (10 << 20) - 1])
def test_readahead_digest_equals_the_plain_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int) -> None:
    monkeypatch.setattr(hashing, "_CHUNK", 1 << 20)  # helpers start at 8 chunks: small files use them too
    monkeypatch.setattr(hashing, "_SEGMENT", 3 << 20)  # several segments, helpers waiting for the hash
    p = tmp_path / "f"
    p.write_bytes(os.urandom(size))
    assert hash_file(p, "xxh3_128", readahead=True) == hash_file(p, "xxh3_128")
    assert hash_file(p, "sha256", readahead=True) == hash_file(p, "sha256")


@pytest.mark.parametrize("direct", [True, False])
def test_files_written_at_once_carry_no_crc32_and_the_switch_is_given_back(tmp_path: Path, direct: bool) -> None:
    """Every file of a save is written without torch's per-record CRC32 (ckptdb's digest covers the
    bytes), also the ones written by the other threads of a save: torch's switch is per thread in
    recent torch, and before the fix only the first thread turned its own off, so the optimizer's
    file of every save paid ~1.5 GB/s of CRC32 on the critical path. The caller's switch is its
    own again afterwards."""
    import threading
    import zipfile

    before = torch.serialization.get_crc32_options()
    # tensors of 4 MiB: each file lets go of the serialising turn during their writes, so the
    # files' threads overlap (small files would be written one after the other)
    files = [
        TorchFile(f"f{i}.pt", {"t": [torch.randn(1 << 20) for _ in range(4)], "i": torch.arange(5 + i)})
        for i in range(3)
    ]
    try:
        torch.serialization.set_crc32_options(True)
        w = StepWriter(tmp_path, 1, "tok", hash_algorithm="xxh3_128", direct=direct)
        w.open()
        recs = w.write_torch_many(files)
        w.finalize()
        assert torch.serialization.get_crc32_options() is True  # this thread's switch, given back
        seen: list[bool] = []
        t = threading.Thread(target=lambda: seen.append(torch.serialization.get_crc32_options()))
        t.start()
        t.join()
        assert seen == [True]  # the default elsewhere is untouched
    finally:
        torch.serialization.set_crc32_options(before)
    for rec in recs:
        path = w.tmp_dir / rec.path
        with zipfile.ZipFile(path) as z:
            crcs = {i.filename.split("/", 1)[1]: i.CRC for i in z.infolist()}
        assert crcs and set(crcs.values()) == {0}, f"{rec.path} has CRC32s: {crcs}"
        assert hash_file(path, "xxh3_128") == (rec.size_bytes, rec.digest)
        torch.load(path, weights_only=True)
