"""Real process groups (gloo over ``file://``) at world sizes 1, 2 and 4: per-rank layouts, FSDP2
through torch.distributed.checkpoint, consolidated models, and failures (an exception on one rank,
a SIGKILLed rank). Each test starts its ranks as subprocesses (tests/distributed/worker.py).

Run alone with ``pytest -m distributed``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ckptdb import CheckpointCorruptError, FileCheckpointManager
from ckptdb.catalog.session import dispose_engines
from tests.distributed.launch import ROOT, check_ok, launch
from tests.helpers import assert_state_equal, work_dirs

pytestmark = pytest.mark.distributed


def _sqlite(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'catalog.db'}"


def _reopen(tmp_path: Path, url: str) -> FileCheckpointManager:
    dispose_engines()  # the workers changed the catalog behind this process's back
    return FileCheckpointManager(tmp_path / "ckpt", catalog=url)


def _states(m: FileCheckpointManager) -> dict[int, str]:
    return {c.step_nr: c.state for c in m.get_checkpoints()}


@pytest.mark.parametrize("world", [1, 2])
def test_ddp_per_rank_round_trip(tmp_path: Path, world: int) -> None:
    url = _sqlite(tmp_path)
    results = launch("ddp", world, tmp_path, url=url)
    check_ok(results)
    expected = sorted(
        [".ckptdb_token", "model.pt", "replicated.pt", "score.txt", *(f"rank_{r}.pt" for r in range(world))]
    )
    for res in results:  # retention (KeepLast(1)) and listing were decided once and agreed by every rank
        assert res["steps"] == [20] and res["last"] == 20 and res["files"] == expected
    m = _reopen(tmp_path, url)
    assert m.get_step_numbers() == [20]
    (c,) = [c for c in m.get_checkpoints() if c.state == "committed"]
    assert c.world_size == world and c.file_count == len(expected) - 1  # the token file is not a shard
    assert work_dirs(tmp_path / "ckpt") == []


def test_ddp_catalog_backends(tmp_path: Path, catalog_url: str) -> None:
    """The same DDP round trip with the catalog on SQLite and (with --db-url) PostgreSQL."""
    check_ok(launch("ddp", 2, tmp_path, url=catalog_url))
    assert _reopen(tmp_path, catalog_url).get_step_numbers() == [20]


def test_tensor_parallel_suffixes(tmp_path: Path) -> None:
    """dp=2 x tp=2: model/replicated once per tp rank, rank files per (dp, tp); each rank loads its own."""
    url = _sqlite(tmp_path)
    results = launch("tp", 4, tmp_path, url=url)
    check_ok(results)
    files = [".ckptdb_token", "model.0.pt", "model.1.pt", "rank_0.0.pt", "rank_0.1.pt", "rank_1.0.pt"]
    files += ["rank_1.1.pt", "replicated.0.pt", "replicated.1.pt"]
    assert all(r["files"] == sorted(files) and r["steps"] == [3] for r in results)


def test_fsdp2_sharded_save_then_load_at_other_world_sizes(tmp_path: Path) -> None:
    """Saved by FSDP2 at world size 2; loaded at world size 4 (FSDP2) and in one process without a
    process group; parameters and optimizer state are identical (compared in the workers). The
    consolidated model.pt loads here, in the test process, without any process group."""
    url = _sqlite(tmp_path)
    saved = launch("fsdp_save", 2, tmp_path, url=url)
    check_ok(saved)
    assert saved[0]["files"] == [
        ".ckptdb_token",
        "model.pt",
        "rank_0.pt",
        "rank_1.pt",
        "sharded/.metadata",
        "sharded/__0_0.distcp",
        "sharded/__1_0.distcp",
    ]
    m = _reopen(tmp_path, url)
    (c,) = [c for c in m.get_checkpoints() if c.step_nr == 5]
    assert c.state == "committed" and c.world_size == 2
    # every DCP file is in the catalog with its digest, and verifies
    assert m.load_checkpoint(5, verify="digest")["trainer"] == {"rank": 0}
    expected = torch.load(tmp_path / "expected.pt", weights_only=True)
    assert_state_equal(m.load_checkpoint(5)["model"], expected["model"])  # consolidated, no process group

    for world, pg in ((4, True), (1, False)):
        results = launch("fsdp_load", world, tmp_path, url=url, process_group=pg)
        check_ok(results)
        assert all(r["step"] == 5 and {"model", "optimizer"} <= set(r["keys"]) for r in results)

    # here too, in this process: plain tensors, a subset of the keys, no process group
    model_sd = {k: torch.zeros_like(v) for k, v in expected["model"].items()}
    m.load_sharded_state(5, {"model": model_sd})
    assert_state_equal(model_sd, expected["model"])
    # a flipped byte in one rank's shard file is caught against the catalog's digest and recorded
    shard = tmp_path / "ckpt" / "step_5" / "sharded" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorruptError, match=r"__1_0\.distcp"):
        m.load_sharded_state(5, {"model": model_sd})
    assert _states(m)[5] == "corrupt"


def test_one_rank_raising_fails_every_rank_with_the_same_error(tmp_path: Path) -> None:
    url = _sqlite(tmp_path)
    results = launch("raising", 2, tmp_path, url=url)
    check_ok(results)
    r0, r1 = (r["errors"] for r in results)
    assert r0 == r1, (r0, r1)  # same type and message on every rank
    (refused_type, refused), (failed_type, failed) = r0
    assert refused_type == "InvalidArgumentError" and "state['trainer']['obj']" in refused
    assert failed_type == "CheckpointError" and "rank_1.pt" in failed and "rolled back" in failed
    assert all(r["steps"] == [1, 3] and r["still_open"] is False for r in results)
    m = _reopen(tmp_path, url)
    assert _states(m) == {1: "committed", 2: "aborted", 3: "committed"}
    assert work_dirs(tmp_path / "ckpt") == []
    assert m.last_recovery is not None and not m.last_recovery.changed


@pytest.mark.parametrize("victim", [1, 0], ids=["worker-killed", "coordinator-killed"])
def test_sigkilled_rank_fails_the_others_and_next_open_recovers(tmp_path: Path, victim: int) -> None:
    url = _sqlite(tmp_path)
    timeout = 20
    results = launch("kill", 2, tmp_path, url=url, victim=victim, pg_timeout=timeout)
    killed, survivor = results[victim], results[1 - victim]
    assert killed["rc"] == -signal.SIGKILL and killed.get("missing")
    assert survivor["ok"], survivor
    assert survivor["commit_error"] is not None and survivor["commit_error"][0] == "RankLostError"
    assert survivor["failed_after"] < timeout
    m = _reopen(tmp_path, url)
    assert m.get_step_numbers() == [1]
    assert work_dirs(tmp_path / "ckpt") == []
    if victim == 0:  # the coordinator died holding a pending row: the next open rolls it back
        assert m.last_recovery is not None and m.last_recovery.rolled_back == [2]
    assert _states(m) == {1: "committed", 2: "aborted"}
    assert m.load_checkpoint(1)["trainer"] == {"rank": 0}
    m.begin_checkpoint(2)  # and saving goes on
    m.save_state({"x": torch.zeros(1)})
    m.commit_checkpoint()
    assert m.get_step_numbers() == [1, 2]


def test_example_train_distributed_runs(tmp_path: Path) -> None:
    """examples/train_distributed.py (FSDP2 on gloo, spawned ranks) trains, checkpoints and commits."""
    ckpt = tmp_path / "ckpt"
    args = ["--nproc", "2", "--steps", "4", "--every", "2", "--checkpoint-dir", str(ckpt)]
    proc = subprocess.run(
        [sys.executable, "examples/train_distributed.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "step 4:" in proc.stdout
    dispose_engines()
    m = FileCheckpointManager(ckpt)
    assert m.get_step_numbers() == [2, 4]
    assert set(m.load_checkpoint(4)["model"]) == {"0.weight", "0.bias", "2.weight", "2.bias"}


def test_hung_rank_fails_the_others_within_the_process_group_timeout(tmp_path: Path) -> None:
    """A rank that stays alive but stops taking part is detected by the process group's timeout."""
    url = _sqlite(tmp_path)
    timeout = 4
    results = launch("kill", 2, tmp_path, url=url, victim=1, how="stall", pg_timeout=timeout)
    hung, survivor = results[1], results[0]
    assert hung["rc"] == 3 and hung.get("missing")
    assert survivor["ok"] and survivor["commit_error"][0] == "RankLostError", survivor
    assert timeout - 1 < survivor["failed_after"] < timeout + 10
    m = _reopen(tmp_path, url)
    assert m.get_step_numbers() == [1] and _states(m) == {1: "committed", 2: "aborted"}
    assert work_dirs(tmp_path / "ckpt") == []
