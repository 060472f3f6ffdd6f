"""DCP-sharded state from two real gloo ranks into one S3 attempt, loaded back (resharded) in one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ckptdb.storage.location import ObjectLocation
from ckptdb.storage.objectstore import ObjectStore
from ckptdb.storage.s3client import MIN_PART_SIZE
from ckptdb.storage.writer import FileRecord
from tests.s3_fixtures import Bucket

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.distributed
def test_two_ranks_write_one_sharded_checkpoint(seaweedfs_bucket: Bucket, tmp_path: Path) -> None:
    b = seaweedfs_bucket
    token = os.urandom(8).hex()
    env = {**os.environ, **b.server.env(), "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.s3.child_dcp",
                str(r),
                "2",
                str(tmp_path / "pg"),
                b.name,
                "run",
                token,
                str(tmp_path / f"r{r}.json"),
            ],
            env=env,
            cwd=ROOT,
        )
        for r in range(2)
    ]
    try:
        assert [p.wait(timeout=240) for p in procs] == [0, 0]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    recs: dict[str, FileRecord] = {}
    for r in range(2):
        for d in json.loads((tmp_path / f"r{r}.json").read_text()):
            recs[d["path"]] = FileRecord(**d)
    assert set(recs) == {"sharded/.metadata", "sharded/__0_0.distcp", "sharded/__1_0.distcp"}
    assert {r.rank for r in recs.values() if r.path.endswith(".distcp")} == {0, 1}
    store = ObjectStore(ObjectLocation(b.name, "run"), storage_options=b.storage_options())
    d = store.attempt_dir(9, token)
    assert store.list_files(d) == {p: r.size_bytes for p, r in recs.items()}
    store.check_files(d, list(recs.values()), 9, digest=True)
    dst = {"model": {"w": torch.zeros(MIN_PART_SIZE)}, "step": 0}
    store.load_sharded(d, dst, recs, 9, process_group=None, verify="digest")  # resharded: 2 ranks -> 1 process
    assert torch.equal(dst["model"]["w"], torch.arange(MIN_PART_SIZE, dtype=torch.float32)) and dst["step"] == 9
