"""The one conformance suite for every Store (as zarr v3 does for its stores): the same tests, parametrised.

Stores: LocalStore on a temporary directory, ObjectStore on moto, ObjectStore on SeaweedFS (both S3
servers real, on loopback). Each test drives the Store interface only; the small ``Harness`` does
what only a test may do behind the store's back (plant an imported step, corrupt a file, leave a
dead writer's debris).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ckptdb.errors import (
    CheckpointCorruptError,
    CheckpointError,
    InvalidArgumentError,
    InvalidOperationError,
    ObjectStoreError,
)
from ckptdb.storage.hashing import new_hasher
from ckptdb.storage.location import ObjectLocation
from ckptdb.storage.objectstore import ObjectStore
from ckptdb.storage.s3client import MIN_PART_SIZE, S3Client
from ckptdb.storage.store import LocalStore, Store, open_store
from ckptdb.storage.writer import FileRecord, StepWriter, TorchFile
from tests.s3_fixtures import Bucket

HASH = "xxh3_128"
PART = MIN_PART_SIZE


def tok() -> str:
    return os.urandom(8).hex()


class Harness:
    kind: str
    store: Store

    def plant(self, directory: str, relpath: str, data: bytes) -> None:
        """Put a file where ckptdb did not write it (an imported fairseq2 step, a corruption)."""
        raise NotImplementedError

    def dead_writer(self, step_nr: int, token: str) -> None:
        """Leave what a writer killed mid-save leaves."""
        raise NotImplementedError

    def pending_uploads(self) -> int:
        return 0

    def broken(self) -> Store:
        """A store whose root cannot be used."""
        raise NotImplementedError


class LocalHarness(Harness):
    kind = "local"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.store = LocalStore(root / "ckpt", fsync=False)
        self.store.ensure_root()

    def plant(self, directory: str, relpath: str, data: bytes) -> None:
        p = self.store.root / directory / relpath
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)

    def dead_writer(self, step_nr: int, token: str) -> None:
        w = StepWriter(self.store.root, step_nr, token, hash_algorithm=HASH, fsync=False)
        w.open()
        (w.tmp_dir / "model.pt").write_bytes(os.urandom(1000))  # torn: never finished

    def broken(self) -> Store:
        (self.root / "file").write_text("not a directory")
        return LocalStore(self.root / "file" / "ckpt", fsync=False)


class ObjectHarness(Harness):
    def __init__(self, bucket: Bucket) -> None:
        self.kind = bucket.server.kind
        self.bucket = bucket
        self.opts = bucket.storage_options(part_size=PART, concurrency=4)
        self.store = open_store(f"s3://{bucket.name}/runs/exp1", storage_options=self.opts, object_store=True)
        assert isinstance(self.store, ObjectStore)
        self.client: S3Client = self.store.client
        self.store.ensure_root()

    def plant(self, directory: str, relpath: str, data: bytes) -> None:
        self.bucket.server.boto3_client().put_object(
            Bucket=self.bucket.name, Key=f"runs/exp1/{directory}/{relpath}", Body=data
        )

    def dead_writer(self, step_nr: int, token: str) -> None:
        assert isinstance(self.store, ObjectStore)
        d = self.store.attempt_dir(step_nr, token)
        self.client.put_bytes(self.bucket.name, self.store.key(d, "score.txt"), b"1.0")
        w = self.client.open_writer(self.bucket.name, self.store.key(d, "model.pt"))
        w.write(os.urandom(PART + 1))  # one part uploaded; the process "dies": never completed
        w._join()

    def pending_uploads(self) -> int:
        return len(self.client.list_uploads(self.bucket.name, "runs/"))

    def broken(self) -> Store:
        return ObjectStore(ObjectLocation(self.bucket.name + "-missing", "runs/exp1"), storage_options=self.opts)


@pytest.fixture(params=["local", "moto", "seaweedfs"])
def h(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    if request.param == "local":
        yield LocalHarness(tmp_path)
        return
    srv = request.getfixturevalue(f"{request.param}_server")
    yield ObjectHarness(Bucket(srv, srv.new_bucket()))


def state(n: int = 2 * PART // 4 + 1000, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(n, generator=g), "b": torch.arange(10)}


def write_attempt(store: Store, step_nr: int, token: str, *, seed: int = 0) -> dict[str, object]:
    w = store.open_writer(step_nr, token, hash_algorithm=HASH)
    w.open(create=True)
    w.write_torch_many(
        [TorchFile("model.pt", {"model": state(seed=seed)}), TorchFile("rank_0.pt", {"step": step_nr}, kind="trainer")]
    )
    w.write_bytes("score.txt", b"0.25")
    w.finalize()
    return {"writer": w, "records": dict(w.records)}


def test_write_finalize_publish_read_back(h: Harness) -> None:
    s, t = h.store, tok()
    out = write_attempt(s, 3, t)
    recs = out["records"]
    assert isinstance(recs, dict) and set(recs) == {"model.pt", "rank_0.pt", "score.txt"}
    assert recs["model.pt"].size_bytes > 2 * PART  # a multipart upload on an object store
    s.publish(3, t, previous=None)
    d = s.committed_dir(3, t)
    assert s.check_directory(3, d) == d
    assert s.exists(d) and d in s.list_entries()
    assert s.list_files(d) == {r.path: r.size_bytes for r in recs.values()}
    for r in recs.values():
        assert s.file_size(d, r.path) == r.size_bytes
        assert s.hash_file(d, r.path, HASH) == (r.size_bytes, r.digest)
        assert (r.checksum is not None) == (not s.is_local)
    s.check_files(d, list(recs.values()), 3, digest=True)
    loaded = s.load_torch(d, "model.pt", 3)
    assert torch.equal(loaded["model"]["w"], state()["w"])
    assert s.load_torch(d, "rank_0.pt", 3) == {"step": 3}
    assert s.read_bytes(d, "score.txt") == b"0.25"
    with s.open_read(d, "score.txt") as f:
        f.seek(2)
        assert f.read() == b"25"
    assert s.owner(d) == t
    with pytest.raises(CheckpointCorruptError):
        s.check_directory(3, "step_4" if not s.is_local else "../x")
    with pytest.raises(CheckpointCorruptError):
        s.check_directory(3, "step_3/../step_4")


def test_a_relpath_is_written_once(h: Harness) -> None:
    w = h.store.open_writer(1, tok(), hash_algorithm=HASH)
    w.open(create=True)
    w.write_bytes("score.txt", b"1")
    with pytest.raises(InvalidOperationError, match="already written"):
        w.write_bytes("score.txt", b"2")


def test_conditional_writes_refuse_an_existing_file(h: Harness) -> None:
    """Two writers that got the same token never mix or replace each other's files."""
    t = tok()
    first = write_attempt(h.store, 2, t)
    second = h.store.open_writer(2, t, hash_algorithm=HASH)
    with pytest.raises(FileExistsError):
        second.open(create=True)  # local: the directory exists
        second.write_bytes("score.txt", b"9.99")  # object store: If-None-Match: * refused
    d = h.store.attempt_dir(2, t)
    h.store.check_files(d, list(first["records"].values()), 2, digest=True)  # type: ignore[union-attr]
    assert h.store.read_bytes(d, "score.txt") == b"0.25"


def test_check_files_finds_missing_short_and_changed_files(h: Harness) -> None:
    t = tok()
    recs = list(write_attempt(h.store, 4, t)["records"].values())  # type: ignore[union-attr]
    d = h.store.attempt_dir(4, t)
    h.store.check_files(d, recs, 4, digest=False)
    h.store.remove_files(d, keep={"model.pt", "rank_0.pt"})
    with pytest.raises(CheckpointCorruptError) as ei:
        h.store.check_files(d, recs, 4, digest=False)
    assert ei.value.missing and ei.value.path.endswith("score.txt")
    if not h.store.is_local:
        h.store.remove_files(d, keep={"model.pt"})  # an object is replaced only by deleting it first
    h.plant(d, "rank_0.pt", b"short")
    with pytest.raises(CheckpointCorruptError, match="bytes"):
        h.store.check_files(d, [r for r in recs if r.path == "rank_0.pt"], 4, digest=False)
    model = next(r for r in recs if r.path == "model.pt")
    if not h.store.is_local:
        h.store.remove_files(d, keep=set())
    data = bytearray(h.store.read_bytes(d, "model.pt")) if h.store.is_local else bytearray(model.size_bytes)
    data[-1] ^= 0xFF
    h.plant(d, "model.pt", bytes(data))
    h.store.check_files(d, [model], 4, digest=False)  # same size: only the digest tells
    with pytest.raises(CheckpointCorruptError, match=HASH):
        h.store.check_files(d, [model], 4, digest=True)


@pytest.mark.parametrize("mmap", [True, False])
def test_load_torch_checks_the_bytes_it_loads(h: Harness, mmap: bool) -> None:
    """``load_torch(expect=)``: size and digest checked (on an object store: on the one download the load uses)."""
    t = tok()
    recs = write_attempt(h.store, 5, t)["records"]
    assert isinstance(recs, dict)
    model = recs["model.pt"]
    d = h.store.attempt_dir(5, t)
    loaded = h.store.load_torch(d, "model.pt", 5, mmap=mmap, expect=model)
    w = loaded["model"]["w"]
    assert torch.equal(w, state()["w"])
    w.add_(1.0)  # the tensors are the caller's: writable (copy-on-write where mapped)
    assert torch.equal(w, state()["w"] + 1.0)
    assert torch.equal(h.store.load_torch(d, "model.pt", 5, mmap=mmap)["model"]["w"], state()["w"])
    # one byte of tensor data changed, same size: torch.load alone does not notice, the digest does
    data = bytearray(h.store.read_bytes(d, "model.pt"))
    data[len(data) // 2] ^= 0xFF
    if not h.store.is_local:
        h.store.remove_files(d, keep={"rank_0.pt", "score.txt"})
    h.plant(d, "model.pt", bytes(data))
    assert not torch.equal(h.store.load_torch(d, "model.pt", 5, mmap=mmap)["model"]["w"], state()["w"])
    with pytest.raises(CheckpointCorruptError, match=HASH):
        h.store.load_torch(d, "model.pt", 5, mmap=mmap, expect=model)
    h.store.remove_files(d, keep={"rank_0.pt", "score.txt"})
    with pytest.raises(CheckpointCorruptError) as ei:
        h.store.load_torch(d, "model.pt", 5, mmap=mmap, expect=model)
    assert ei.value.missing


def test_load_torch_many_into_the_callers_tensors(h: Harness) -> None:
    """``load_torch_many(into=)``: the same objects, the tensors loaded into the targets (a local store
    reads large files straight into them; an object store copies after the checked download)."""
    t = tok()
    recs = write_attempt(h.store, 6, t)["records"]
    assert isinstance(recs, dict)
    d = h.store.attempt_dir(6, t)
    target = {"model": {"w": torch.zeros_like(state()["w"]), "b": torch.zeros(10, dtype=torch.int64)}}
    items = [(p, recs[p]) for p in ("model.pt", "rank_0.pt")]
    model, rank = h.store.load_torch_many(d, items, 6, into=target)
    assert model["model"]["w"] is target["model"]["w"] and model["model"]["b"] is target["model"]["b"]
    assert torch.equal(target["model"]["w"], state()["w"]) and torch.equal(target["model"]["b"], torch.arange(10))
    assert rank == {"step": 6}
    bad = {"model": {"w": torch.zeros(3)}}
    (err,) = h.store.load_torch_many(d, items, 6, into=bad)
    assert isinstance(err, InvalidArgumentError) and "['model']['w']" in str(err)
    assert torch.equal(bad["model"]["w"], torch.zeros(3))


def test_removing_an_attempt_touches_nothing_else(h: Harness) -> None:
    s = h.store
    a, b, c, p = tok(), tok(), tok(), tok()
    write_attempt(s, 1, a)
    write_attempt(s, 1, b, seed=1)
    write_attempt(s, 10, c)
    write_attempt(s, 2, p)
    s.publish(2, p)
    h.plant("step_1", "model.pt", b"imported fairseq2 checkpoint")  # an imported step_<N>/
    keep = {d: s.list_files(d) for d in (s.attempt_dir(1, b), s.attempt_dir(10, c), s.committed_dir(2, p), "step_1")}
    s.open_writer(1, a, hash_algorithm=HASH).abort()
    assert not s.exists(s.attempt_dir(1, a))
    for d, files in keep.items():
        assert s.list_files(d) == files, d
    handle = s.set_aside(s.committed_dir(2, p), 2)  # delete protocol: set aside under the lock, remove after
    s.remove(handle)
    assert not s.exists(s.committed_dir(2, p))
    s.remove(handle)  # idempotent
    assert s.list_files("step_1") == {"model.pt": len(b"imported fairseq2 checkpoint")}
    assert s.list_files(s.attempt_dir(10, c)) == keep[s.attempt_dir(10, c)]


def test_debris_of_a_dead_writer_is_removed(h: Harness) -> None:
    s = h.store
    t, other = tok(), tok()
    write_attempt(s, 6, other)
    h.dead_writer(5, t)
    assert s.exists(s.attempt_dir(5, t)) and s.attempt_dir(5, t) in s.list_entries()
    assert h.pending_uploads() == (0 if s.is_local else 1)
    s.remove_tree(s.attempt_dir(5, t))
    assert not s.exists(s.attempt_dir(5, t))
    assert h.pending_uploads() == 0  # the incomplete multipart upload was aborted
    assert set(s.list_files(s.attempt_dir(6, other))) == {"model.pt", "rank_0.pt", "score.txt"}
    s.remove_tree(s.attempt_dir(5, t))  # a missing one is fine


def test_an_unusable_root_is_a_clear_error(h: Harness) -> None:
    broken = h.broken()
    with pytest.raises(CheckpointError) as ei:
        broken.ensure_root()
    if isinstance(ei.value, ObjectStoreError):
        assert "does not exist" in str(ei.value)


def test_wrong_credentials_are_a_clear_error(h: Harness) -> None:
    if not isinstance(h, ObjectHarness) or h.kind == "moto":
        pytest.skip(f"{h.kind} checks no credentials")
    bad = ObjectStore(
        ObjectLocation(h.bucket.name, "runs/exp1"), storage_options={**h.opts, "secret_access_key": "wrong"}
    )
    with pytest.raises(ObjectStoreError, match="refused the credentials"):
        bad.ensure_root()
    w = bad.open_writer(1, tok(), hash_algorithm=HASH)
    with pytest.raises(ObjectStoreError, match="refused the credentials"):
        w.write_torch_many([TorchFile("model.pt", {"x": torch.zeros(3)})])


def test_sharded_state_round_trip(h: Harness) -> None:
    """DCP (one process, no process group): the same ``sharded/`` files and records on every store."""
    s, t = h.store, tok()
    w = s.open_writer(8, t, hash_algorithm=HASH)
    w.open(create=True)
    src = {"model": {"w": torch.randn(PART // 4 + 5), "b": torch.arange(7)}, "step": 8}
    recs = w.write_sharded(src, rank=0, process_group=None)
    assert set(recs) == {"sharded/.metadata", "sharded/__0_0.distcp"} and set(w.records) == set(recs)
    w.finalize()
    s.publish(8, t)
    d = s.committed_dir(8, t)
    assert s.list_files(d) == {r.path: r.size_bytes for r in recs.values()}
    s.check_files(d, list(recs.values()), 8, digest=True)
    dst = {"model": {"w": torch.zeros(PART // 4 + 5), "b": torch.zeros(7, dtype=torch.long)}, "step": 0}
    s.load_sharded(d, dst, recs, 8, process_group=None, verify="digest")
    assert torch.equal(dst["model"]["w"], src["model"]["w"]) and torch.equal(dst["model"]["b"], src["model"]["b"])
    assert dst["step"] == 8
    # a damaged shard is refused before DCP reads it
    data = bytearray(s.read_bytes(d, "sharded/__0_0.distcp"))
    data[-1] ^= 0xFF
    if not s.is_local:
        s.remove_files(d, keep={"sharded/.metadata"})
    h.plant(d, "sharded/__0_0.distcp", bytes(data))
    with pytest.raises(CheckpointCorruptError):
        s.load_sharded(d, dst, recs, 8, process_group=None, verify="digest")


def test_an_object_in_the_legacy_torch_format_loads(h: Harness) -> None:
    """A file saved without torch's zip format (an imported old fairseq2 step) cannot be memory-mapped:
    the object store's load falls back to reading it from the buffer."""
    if h.store.is_local:
        pytest.skip("a local mmap load of a legacy file is refused by torch itself")
    import io

    buf = io.BytesIO()
    torch.save({"model": state(n=1000)}, buf, _use_new_zipfile_serialization=False)
    h.plant("step_6", "model.pt", buf.getvalue())
    for mmap in (True, False):
        assert torch.equal(h.store.load_torch("step_6", "model.pt", 6, mmap=mmap)["model"]["w"], state(n=1000)["w"])


# -- the interface, case by case (merged from the former tests/unit/test_store_conformance.py) -------

ALGO = "sha256"
T1, T2 = "00112233aabbccdd", "44556677eeff0011"


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


def test_names_are_disjoint_and_checked(h: Harness) -> None:
    s = h.store
    assert s.attempt_dir(3, T1) != s.attempt_dir(3, T2)
    assert s.committed_dir(3, T1) == s.check_directory(3, s.committed_dir(3, T1))
    for bad in ("../x", "step_4", "/abs", ""):
        with pytest.raises(CheckpointCorruptError):
            s.check_directory(3, bad)


def test_write_publish_read(h: Harness) -> None:
    s = h.store
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


def test_check_files_finds_damage(h: Harness) -> None:
    s = h.store
    _write(s, 1, T1, 1)
    s.publish(1, T1)
    d = s.committed_dir(1, T1)
    sizes = s.list_files(d)
    score = s.read_bytes(d, "score.txt")
    rec = FileRecord("score.txt", sizes["score.txt"], ALGO, _digest(score))
    s.check_files(d, [rec], 1, digest=True)
    h.plant(d, "score.txt", b"9\n")  # same size, other bytes
    s.check_files(d, [rec], 1, digest=False)
    with pytest.raises(CheckpointCorruptError, match="does not match"):
        s.check_files(d, [rec], 1, digest=True)
    h.plant(d, "score.txt", b"10\n")
    with pytest.raises(CheckpointCorruptError, match="expected 2 bytes, found 3 bytes"):
        s.check_files(d, [rec], 1, digest=False)
    with pytest.raises(CheckpointCorruptError) as ei:
        s.check_files(d, [FileRecord("gone.pt", 3, ALGO, "00")], 1, digest=False)
    assert ei.value.missing


def test_abort_removes_only_its_attempt(h: Harness) -> None:
    s = h.store
    _write(s, 2, T1, 1)
    s.publish(2, T1)
    w = s.open_writer(2, T2, hash_algorithm=ALGO)
    w.open(create=True)
    w.write_bytes("score.txt", b"1\n")
    w.abort()
    w.abort()  # idempotent
    assert not s.exists(s.attempt_dir(2, T2))
    assert s.load_torch(s.committed_dir(2, T1), "model.pt", 2)["w"].tolist() == [1, 1, 1, 1]


def test_overwrite_publish_and_undo(h: Harness) -> None:
    s = h.store
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


def test_set_aside_then_remove(h: Harness) -> None:
    s = h.store
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


def test_remove_files_keeps_the_model(h: Harness) -> None:
    s = h.store
    _write(s, 8, T1, 8)
    s.publish(8, T1)
    d = s.committed_dir(8, T1)
    s.remove_files(d, {"model.pt", "score.txt"})
    assert sorted(s.list_files(d)) == ["model.pt", "score.txt"] and s.owner(d) == T1


def test_checksum_is_the_servers_or_none(h: Harness) -> None:
    """``Store.checksum``: an object store's full-object CRC32C from HEAD (what ``verify --remote-checksum``
    compares); a local store keeps none."""
    s = h.store
    _write(s, 9, T1, 9)
    s.publish(9, T1)
    d = s.committed_dir(9, T1)
    before = s.checksum(d, "score.txt")
    assert s.checksum(d, "nope.pt") is None
    if s.is_local:
        assert before is None
        return
    assert before is not None and before.startswith("crc32c:")
