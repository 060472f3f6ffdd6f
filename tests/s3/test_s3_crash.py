"""Killed writers and a killed server: what is left on the object store, and that removing the attempt
by its token's prefix leaves nothing (no object, no incomplete multipart upload) and touches nothing else."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from ckptdb.errors import ObjectStoreError
from ckptdb.storage.location import ObjectLocation
from ckptdb.storage.objectstore import ObjectStore
from ckptdb.storage.s3client import MIN_PART_SIZE
from ckptdb.testing.s3servers import start_seaweedfs
from tests.s3_fixtures import Bucket

ROOT = Path(__file__).resolve().parents[2]


def wait_for(cond, timeout: float = 60.0, what: str = "") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.mark.parametrize("kind", ["moto", "seaweedfs"])
def test_writer_sigkilled_mid_upload(kind: str, request: pytest.FixtureRequest) -> None:
    srv = request.getfixturevalue(f"{kind}_server")
    b = Bucket(srv, srv.new_bucket())
    store = ObjectStore(ObjectLocation(b.name, "run"), storage_options=b.storage_options(part_size=MIN_PART_SIZE))
    survivor = store.open_writer(7, os.urandom(8).hex(), hash_algorithm="xxh3_128")
    survivor.write_bytes("score.txt", b"0.5")
    token = os.urandom(8).hex()
    env = {**os.environ, **srv.env(), "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.s3.child_upload", srv.endpoint, b.name, "run", "7", token],
        env=env,
        stdout=subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == b"model-done"
        attempt = store.attempt_dir(7, token)
        c, raw = store.client, srv.boto3_client()

        def uploading() -> bool:
            ups = raw.list_multipart_uploads(Bucket=b.name, Prefix=f"run/{attempt}/").get("Uploads", [])
            return bool(ups) and bool(
                raw.list_parts(Bucket=b.name, Key=ups[0]["Key"], UploadId=ups[0]["UploadId"]).get("Parts")
            )

        wait_for(uploading, what="a part of the child's upload")
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
        if child.stdout is not None:
            child.stdout.close()
    # what a dead writer leaves: its complete file and an incomplete upload, never a partial object
    assert store.file_size(attempt, "model.pt") is not None
    assert store.file_size(attempt, "rank_0.pt") is None
    assert c.list_uploads(b.name, f"run/{attempt}/") == [f"run/{attempt}/rank_0.pt"]
    store.remove_tree(attempt)  # what recovery / gc do, by the token the catalog names
    assert not store.exists(attempt) and c.list_uploads(b.name, "run/") == []
    assert store.list_files(survivor.directory) == {"score.txt": 3}


def test_server_killed_mid_upload_is_a_clear_error(tmp_path: Path) -> None:
    srv = start_seaweedfs()
    try:
        b = Bucket(srv, srv.new_bucket())
        store = ObjectStore(
            ObjectLocation(b.name, "run"),
            storage_options=b.storage_options(
                part_size=MIN_PART_SIZE, concurrency=2, max_attempts=2, connect_timeout=1, read_timeout=5
            ),
        )
        w = store.client.open_writer(b.name, "run/step_1.0123456789abcdef/model.pt")
        chunk = os.urandom(MIN_PART_SIZE)
        w.write(chunk)
        w.write(chunk)
        w._join()
        killer = threading.Thread(target=srv.stop)
        killer.start()
        killer.join()
        t = time.monotonic()
        with pytest.raises(ObjectStoreError, match="did not answer after 2 attempts"):
            for _ in range(4):
                w.write(chunk)
            w.close()
        assert time.monotonic() - t < 60
    finally:
        srv.stop()


def test_server_killed_mid_save_then_restarted(tmp_path: Path, catalog_url: str) -> None:
    """The S3 server dies during save_state: the save fails clearly and is rolled back in the catalog;
    after a restart (same data) the next open removes the attempt's leftovers; step 1 is untouched."""
    from ckptdb import FileCheckpointManager
    from ckptdb.errors import CheckpointError
    from tests.helpers import assert_state_equal, make_state, save

    root, port = tmp_path / "weed", None
    srv = start_seaweedfs(root=root)
    port = int(srv.endpoint.rsplit(":", 1)[1])
    try:
        b = Bucket(srv, srv.new_bucket())
        opts = b.storage_options(
            part_size=MIN_PART_SIZE, concurrency=2, max_attempts=2, connect_timeout=1, read_timeout=5
        )
        m = FileCheckpointManager(f"s3://{b.name}/run", catalog=catalog_url, storage_options=opts)
        save(m, 1)
        raw = srv.boto3_client()
        m.begin_checkpoint(2)
        err: list[BaseException] = []

        def saver() -> None:
            try:
                m.save_state({"model": {"w": torch.randn(30 * MIN_PART_SIZE // 4)}})  # 150 MiB
            except BaseException as e:  # noqa: BLE001 - inspected below
                err.append(e)

        t = threading.Thread(target=saver)
        t.start()
        wait_for(lambda: bool(raw.list_multipart_uploads(Bucket=b.name, Prefix="run/").get("Uploads")), what="upload")
        srv.stop()
        t.join(120)
        assert not t.is_alive() and err and isinstance(err[0], CheckpointError)
        assert {c.step_nr: c.state for c in m.get_checkpoints()} == {1: "committed", 2: "aborted"}
        attempt = next(c.directory for c in m.get_checkpoints() if c.step_nr == 2)
        m.close()
        srv = start_seaweedfs(root=root, s3_port=port)
        left = raw.list_multipart_uploads(Bucket=b.name, Prefix=f"run/{attempt}/").get("Uploads", [])
        assert left  # the rollback could not reach the server: its upload is still there
        again = FileCheckpointManager(f"s3://{b.name}/run", catalog=catalog_url, storage_options=opts)
        assert again.last_recovery is not None and attempt in again.last_recovery.removed
        assert not raw.list_multipart_uploads(Bucket=b.name, Prefix="run/").get("Uploads")
        keys = [o["Key"] for o in raw.list_objects_v2(Bucket=b.name, Prefix="run/").get("Contents", [])]
        assert keys and all(not k.startswith(f"run/{attempt}/") for k in keys)
        assert_state_equal(again.load_checkpoint(1), make_state(1))
        again.close()
    finally:
        srv.stop()
