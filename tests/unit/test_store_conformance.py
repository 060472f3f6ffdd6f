"""The Store conformance suite: the same tests for every implementation of ckptdb.storage.store.Store.

Each case gives a fresh, empty store and a way to damage a file behind its back. An object store
adds its own case to ``STORE_KINDS`` (a real server on loopback; see issue 12).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from ckptdb.errors import CheckpointCorruptError, InvalidOperationError
from ckptdb.storage.hashing import new_hasher
from ckptdb.storage.store import LocalStore, Store
from ckptdb.storage.writer import FileRecord, TorchFile

ALGO = "sha256"
T1, T2 = "00112233aabbccdd", "44556677eeff0011"


@dataclass
class Case:
    store: Store
    tamper: Callable[[str, str, bytes], None]  # (directory, relpath, new bytes): a change behind the store's back


def _local(tmp_path: Path) -> Iterator[Case]:
    root = tmp_path / "ckpts"
    root.mkdir()
    store = LocalStore(root, fsync=True)

    def tamper(directory: str, relpath: str, data: bytes) -> None:
        (root / directory / relpath).write_bytes(data)

    yield Case(store, tamper)


def _object(server_fixture: str) -> Callable[[Path, pytest.FixtureRequest], Iterator[Case]]:
    """An ObjectStore on a real S3 server on loopback (tests/s3_fixtures.py), in a fresh bucket."""

    def make(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Case]:
        from ckptdb.storage.store import open_store

        srv = request.getfixturevalue(server_fixture)
        bucket = srv.new_bucket()
        store = open_store(f"s3://{bucket}/run", storage_options=srv.storage_options(), object_store=True)
        raw = srv.boto3_client()

        def tamper(directory: str, relpath: str, data: bytes) -> None:
            raw.put_object(Bucket=bucket, Key=f"run/{directory}/{relpath}", Body=data)  # unconditional

        yield Case(store, tamper)

    return make


STORE_KINDS: dict[str, Callable[[Path, pytest.FixtureRequest], Iterator[Case]]] = {
    "local": lambda tmp_path, _request: _local(tmp_path),
    "moto": _object("moto_server"),
    "seaweedfs": _object("seaweedfs_server"),
}


@pytest.fixture(params=sorted(STORE_KINDS))
def case(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Case]:
    yield from STORE_KINDS[request.param](tmp_path, request)


def _digest(data: bytes) -> str:
    h = new_hasher(ALGO)
    h.update(data)
    return h.hexdigest()


def _write(store: Store, step: int, token: str, value: int) -> list[str]:
    """One finished attempt with a torch file, a nested file and score.txt; returns its relpaths."""
    w = store.open_writer(step, token, hash_algorithm=ALGO)
    w.open(create=True)
    w.write_torch_many(
        [TorchFile("model.pt", {"w": torch.full((4,), value)}, 0, "model"), TorchFile("sub/rank_0.pt", {"v": value})]
    )
    w.write_bytes("score.txt", f"{value}\n".encode(), kind="score")
    w.finalize()
    return sorted(w.records)


def test_names_are_disjoint_and_checked(case: Case) -> None:
    s = case.store
    assert s.attempt_dir(3, T1) != s.attempt_dir(3, T2)
    assert s.committed_dir(3, T1) == s.check_directory(3, s.committed_dir(3, T1))
    for bad in ("../x", "step_4", "/abs", ""):
        with pytest.raises(CheckpointCorruptError):
            s.check_directory(3, bad)


def test_write_publish_read(case: Case) -> None:
    s = case.store
    w = s.open_writer(7, T1, hash_algorithm=ALGO)
    w.open(create=True)
    # local: the directory exists from open(); an object store's prefix exists from its first object
    assert (s.exists(w.directory) or not s.is_local) and w.directory == s.attempt_dir(7, T1)
    rec = w.write_torch("model.pt", {"w": torch.arange(5)}, kind="model")
    score = w.write_bytes("score.txt", b"0.5\n", kind="score")
    with pytest.raises(InvalidOperationError, match="already written"):
        w.write_bytes("score.txt", b"again")
    assert score.size_bytes == 4 and score.digest == _digest(b"0.5\n")
    assert s.hash_file(w.directory, "model.pt", ALGO) == (rec.size_bytes, rec.digest)
    w.finalize()
    published = s.publish(7, T1)
    d = s.committed_dir(7, T1)
    assert published.superseded is None and s.isdir(d) and s.owner(d) == T1
    assert s.list_files(d) == {"model.pt": rec.size_bytes, "score.txt": 4}
    assert s.file_size(d, "model.pt") == rec.size_bytes and s.file_size(d, "nope.pt") is None
    assert s.read_bytes(d, "score.txt") == b"0.5\n"
    with s.open_read(d, "model.pt") as f:
        assert torch.load(io.BytesIO(f.read()), weights_only=True)["w"].tolist() == [0, 1, 2, 3, 4]
    assert s.load_torch(d, "model.pt", 7)["w"].tolist() == [0, 1, 2, 3, 4]
    s.check_files(d, [rec, score], 7, digest=True)
    assert d in s.list_entries()


def test_check_files_finds_damage(case: Case) -> None:
    s = case.store
    _write(s, 1, T1, 1)
    s.publish(1, T1)
    d = s.committed_dir(1, T1)
    sizes = s.list_files(d)
    score = s.read_bytes(d, "score.txt")
    rec = FileRecord("score.txt", sizes["score.txt"], ALGO, _digest(score))
    s.check_files(d, [rec], 1, digest=True)
    case.tamper(d, "score.txt", b"9\n")  # same size, other bytes
    s.check_files(d, [rec], 1, digest=False)
    with pytest.raises(CheckpointCorruptError, match="does not match"):
        s.check_files(d, [rec], 1, digest=True)
    case.tamper(d, "score.txt", b"10\n")
    with pytest.raises(CheckpointCorruptError, match="expected 2 bytes, found 3 bytes"):
        s.check_files(d, [rec], 1, digest=False)
    with pytest.raises(CheckpointCorruptError) as ei:
        s.check_files(d, [FileRecord("gone.pt", 3, ALGO, "00")], 1, digest=False)
    assert ei.value.missing


def test_abort_removes_only_its_attempt(case: Case) -> None:
    s = case.store
    _write(s, 2, T1, 1)
    s.publish(2, T1)
    w = s.open_writer(2, T2, hash_algorithm=ALGO)
    w.open(create=True)
    w.write_bytes("score.txt", b"1\n")
    w.abort()
    w.abort()  # idempotent
    assert not s.exists(s.attempt_dir(2, T2))
    assert s.load_torch(s.committed_dir(2, T1), "model.pt", 2)["w"].tolist() == [1, 1, 1, 1]


def test_overwrite_publish_and_undo(case: Case) -> None:
    s = case.store
    _write(s, 4, T1, 1)
    s.publish(4, T1)
    old = s.committed_dir(4, T1)
    _write(s, 4, T2, 2)
    p = s.publish(4, T2, previous=old)
    new = s.committed_dir(4, T2)
    assert s.load_torch(new, "model.pt", 4)["w"].tolist() == [2, 2, 2, 2]
    s.unpublish(4, T2, p)  # the catalog commit failed: the committed copy is the old one again
    assert s.load_torch(old, "model.pt", 4)["w"].tolist() == [1, 1, 1, 1] and s.owner(old) == T1
    assert isinstance(s.whereabouts(4, T2, p), str)
    p = s.publish(4, T2, previous=old)  # and this time the commit stands
    assert p.superseded is not None
    s.remove_tree(p.superseded)
    assert s.load_torch(new, "model.pt", 4)["w"].tolist() == [2, 2, 2, 2] and s.owner(new) == T2
    assert sorted(s.list_entries()) == [new]


def test_set_aside_then_remove(case: Case) -> None:
    s = case.store
    for step, token in ((5, T1), (6, T2)):
        _write(s, step, token, step)
        s.publish(step, token)
    d5, d6 = s.committed_dir(5, T1), s.committed_dir(6, T2)
    handle = s.set_aside(d5, 5)
    assert not s.exists(d5) or not s.is_local  # local: renamed away at once; object store: a no-op
    s.remove(handle)
    s.remove(handle)  # idempotent
    assert not s.exists(d5) and s.list_entries() == [d6]
    assert s.load_torch(d6, "model.pt", 6)["w"].tolist() == [6, 6, 6, 6]


def test_remove_files_keeps_the_model(case: Case) -> None:
    s = case.store
    _write(s, 8, T1, 8)
    s.publish(8, T1)
    d = s.committed_dir(8, T1)
    s.remove_files(d, {"model.pt", "score.txt"})
    assert sorted(s.list_files(d)) == ["model.pt", "score.txt"] and s.owner(d) == T1
