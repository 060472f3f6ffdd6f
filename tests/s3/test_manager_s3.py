"""FileCheckpointManager on an s3:// run (moto and SeaweedFS on loopback), end to end, with a real catalog."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ckptdb import FileCheckpointManager
from ckptdb.catalog import Catalog
from ckptdb.errors import CheckpointCorruptError, CheckpointExistsError, CheckpointNotFoundError, ObjectStoreError
from ckptdb.storage.objectstore import ObjectStore
from ckptdb.storage.s3client import MIN_PART_SIZE
from tests.helpers import assert_state_equal, make_state, save
from tests.s3_fixtures import Bucket

ROOT = Path(__file__).resolve().parents[2]


def manager(b: Bucket, catalog_url: str, **kw: object) -> FileCheckpointManager:
    return FileCheckpointManager(
        f"s3://{b.name}/runs/exp1",
        catalog=catalog_url,
        storage_options=b.storage_options(part_size=MIN_PART_SIZE, concurrency=4),
        **kw,  # type: ignore[arg-type]
    )


def objects(b: Bucket) -> list[str]:
    r = b.server.boto3_client().list_objects_v2(Bucket=b.name, Prefix="runs/exp1/")
    return sorted(o["Key"] for o in r.get("Contents", []))


@pytest.mark.parametrize("kind", ["moto", "seaweedfs"])
def test_save_load_resume_overwrite_delete(kind: str, request: pytest.FixtureRequest, catalog_url: str) -> None:
    srv = request.getfixturevalue(f"{kind}_server")
    b = Bucket(srv, srv.new_bucket())
    m = manager(b, catalog_url)
    assert isinstance(m.store, ObjectStore) and m.checkpoint_dir is None and m.run.name == f"s3://{b.name}/runs/exp1"
    save(m, 10)
    big = {"model": {"w": torch.randn(MIN_PART_SIZE // 2)}, "step_nr": 20}  # 10 MiB: a multipart upload
    m.begin_checkpoint(20)
    m.save_state(big)
    m.commit_checkpoint()
    assert m.get_step_numbers() == [10, 20]
    rows = {c.step_nr: c for c in m.get_checkpoints()}
    assert rows[20].directory == f"step_20.{rows[20].token}"  # the attempt's prefix is the committed name
    shards = Catalog(catalog_url).shards(rows[20].id)
    assert shards and all(s.remote_checksum and s.remote_checksum.startswith("crc32c:") for s in shards)
    assert set(objects(b)) == {
        f"runs/exp1/{c.directory}/{s.path}" for c in rows.values() for s in Catalog(catalog_url).shards(c.id)
    }
    m.close()

    again = manager(b, catalog_url)  # resume: another process would see the same
    step, state = again.load_last_checkpoint()
    assert step == 20 and torch.equal(state["model"]["w"], big["model"]["w"])
    assert_state_equal(again.load_checkpoint(10), make_state(10))
    with pytest.raises(CheckpointExistsError):
        again.begin_checkpoint(10)
    old = rows[10].directory
    save(again, 10, overwrite=True)  # a new attempt prefix; the old one goes after the commit
    new = {c.step_nr: c for c in again.get_checkpoints() if c.state == "committed"}[10]
    assert new.directory != old and not any(k.startswith(f"runs/exp1/{old}/") for k in objects(b))
    assert_state_equal(again.load_checkpoint(10), make_state(10))
    again.delete_checkpoint(20)
    assert again.get_step_numbers() == [10]
    assert not any(k.startswith(f"runs/exp1/{rows[20].directory}/") for k in objects(b))
    with pytest.raises(CheckpointNotFoundError):
        again.load_checkpoint(20)
    again.close()


def test_dead_writer_is_rolled_back_on_open(moto_bucket: Bucket, catalog_url: str, tmp_path: Path) -> None:
    """A writer SIGKILLed mid-upload: the next open aborts its row, its upload and its objects."""
    b = moto_bucket
    m = manager(b, catalog_url)
    save(m, 1)
    m.close()
    script = tmp_path / "writer.py"
    script.write_text(
        "import sys, time\n"
        "import torch\n"
        "from ckptdb import FileCheckpointManager\n"
        "m = FileCheckpointManager(sys.argv[1], catalog=sys.argv[2],"
        " storage_options={'part_size': 5 << 20, 'concurrency': 2})\n"
        "m.begin_checkpoint(2)\n"
        "print('begun', flush=True)\n"
        "m.save_state({'model': {'w': torch.randn(3 << 20)}})\n"
        "print('saved', flush=True)\n"
        "time.sleep(60)\n"
    )
    env = {**os.environ, **b.server.env(), "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen(
        [sys.executable, str(script), f"s3://{b.name}/runs/exp1", catalog_url], env=env, stdout=subprocess.PIPE
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == b"begun"
        assert child.stdout.readline().strip() == b"saved"  # its objects are uploaded, the row still pending
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
        if child.stdout is not None:
            child.stdout.close()
    pending = [c for c in Catalog(catalog_url).checkpoints(m.run.id) if c.state == "pending"]
    assert len(pending) == 1 and any(k.startswith(f"runs/exp1/{pending[0].directory}/") for k in objects(b))
    again = manager(b, catalog_url)  # its writer's pid is gone: the open's recovery rolls it back
    assert again.last_recovery is not None and again.last_recovery.rolled_back == [2]
    assert not any(k.startswith(f"runs/exp1/{pending[0].directory}/") for k in objects(b))
    assert again.get_step_numbers() == [1]
    assert_state_equal(again.load_checkpoint(1), make_state(1))
    again.close()


def test_missing_bucket_is_a_clear_error(moto_server: object, catalog_url: str) -> None:
    from ckptdb.testing.s3servers import S3Server

    assert isinstance(moto_server, S3Server)
    with pytest.raises(ObjectStoreError, match="does not exist"):
        FileCheckpointManager(
            "s3://no-such-bucket-ckptdb/x", catalog=catalog_url, storage_options=moto_server.storage_options()
        )


def test_retention_and_fallback_on_s3(moto_bucket: Bucket, catalog_url: str) -> None:
    from ckptdb.retention import KeepLast

    b = moto_bucket
    m = manager(b, catalog_url, retention=KeepLast(2))
    for step in (1, 2, 3, 4):
        save(m, step)
    assert m.get_step_numbers() == [3, 4]
    dirs = {c.step_nr: c.directory for c in m.get_checkpoints()}
    assert {k.split("/")[2] for k in objects(b)} == {dirs[3], dirs[4]}  # 1 and 2 are gone from the bucket
    # a file of the newest checkpoint vanishes behind the catalog's back: the load falls back and records it
    b.server.boto3_client().delete_object(Bucket=b.name, Key=f"runs/exp1/{dirs[4]}/model.pt")
    step, state = m.load_last_checkpoint()
    assert step == 3
    assert_state_equal(state, make_state(3))
    assert {c.step_nr: c.state for c in m.get_checkpoints()}[4] == "corrupt"  # as locally: one file of several gone
    m.close()


def test_async_save_on_s3(moto_bucket: Bucket, catalog_url: str) -> None:
    """SaveOptions(blocking=False): the commit (uploads included) runs in the background; values changed
    after save_state never reach the objects."""
    from ckptdb.options import SaveOptions

    m = manager(moto_bucket, catalog_url, save_options=SaveOptions(blocking=False))
    for step in (1, 2):
        state = make_state(step, size=1200)  # ~5.8 MiB of model: a multipart upload
        m.begin_checkpoint(step)
        m.save_state(state)
        state["model"]["w"].add_(1.0)  # after the call: must not reach the checkpoint
        m.commit_checkpoint()
    m.wait()
    assert m.get_step_numbers() == [1, 2]
    for step in (1, 2):
        assert_state_equal(m.load_checkpoint(step), make_state(step, size=1200))
    m.close()


def test_a_changed_byte_is_caught_by_the_load(moto_bucket: Bucket, catalog_url: str) -> None:
    """verify="digest" on S3 hashes the bytes the load downloads (one GET pass, not two): a same-size
    change behind the catalog's back is found, recorded, and the load falls back past it."""
    b = moto_bucket
    m = manager(b, catalog_url)
    for step in (1, 2):
        save(m, step)
    d2 = {c.step_nr: c.directory for c in m.get_checkpoints()}[2]
    c = b.server.boto3_client()
    key = f"runs/exp1/{d2}/model.pt"
    data = bytearray(c.get_object(Bucket=b.name, Key=key)["Body"].read())
    data[len(data) // 2] ^= 0xFF
    c.delete_object(Bucket=b.name, Key=key)
    c.put_object(Bucket=b.name, Key=key, Body=bytes(data))
    with pytest.raises(CheckpointCorruptError, match="xxh3"):
        m.load_checkpoint(2)
    assert {c.step_nr: c.state for c in m.get_checkpoints()}[2] == "corrupt"
    step, state = m.load_last_checkpoint()
    assert step == 1
    assert_state_equal(state, make_state(1))
    m.close()


def test_loads_of_files_ckptdb_wrote_use_the_fast_unpickler(moto_server: object, catalog_url: str) -> None:
    from ckptdb import LoadOptions
    from ckptdb.storage import unpickle

    b = Bucket(moto_server, moto_server.new_bucket())  # type: ignore[attr-defined]
    m = manager(b, catalog_url)
    state = {"model": {f"p{i}": torch.full((8,), float(i)) for i in range(50)}, "trainer": {"step": 3}}
    m.begin_checkpoint(3)
    m.save_state(state)
    m.commit_checkpoint()
    before = unpickle.fast_loads
    got = m.load_checkpoint(3)  # digests checked on the fetched bytes first
    assert unpickle.fast_loads == before + (2 if unpickle.enabled() else 0)
    assert_state_equal(got, state)
    sized = manager(b, catalog_url, load_options=LoadOptions(verify="size"))
    before = unpickle.fast_loads
    assert_state_equal(sized.load_checkpoint(3), state)
    assert unpickle.fast_loads == before  # no digest checked before unpickling: torch's unpickler
