"""fairseq2 passes the gang positionally (issue 10, item 14): ``FileCheckpointManager(dir, gang)``.

Real gloo process groups of 1 and 2 processes (``tests/distributed/worker_gang.py``); the other
parameters stay keyword-only.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ckptdb import FileCheckpointManager
from ckptdb.catalog.session import dispose_engines
from ckptdb.errors import InvalidArgumentError
from tests.distributed.launch import ROOT

pytestmark = pytest.mark.distributed


def _launch(world: int, tmp_path: Path, url: str) -> list[dict[str, object]]:
    out = tmp_path / f"out{world}"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    argv = [str(tmp_path / "ckpt"), url, str(out / "pg_init"), str(out)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.distributed.worker_gang", *argv, str(rank), str(world)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(world)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=180)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    results = []
    for rank in range(world):
        f = out / f"rank{rank}.json"
        assert f.exists(), f"rank {rank} wrote no result:\n{logs[rank][-4000:]}"
        r = json.loads(f.read_text())
        assert r["ok"], r.get("traceback") or r
        results.append(r)
    return results


@pytest.mark.parametrize("world", [1, 2])
def test_gang_given_positionally_as_fairseq2_does(tmp_path: Path, catalog_url: str, world: int) -> None:
    results = _launch(world, tmp_path, catalog_url)
    for rank, r in enumerate(results):
        assert (r["gang_rank"], r["gang_size"]) == (rank, world)
        assert r["step"] == 7 and r["steps"] == [7]
    dispose_engines()
    m = FileCheckpointManager(tmp_path / "ckpt", catalog=catalog_url)
    (c,) = [c for c in m.get_checkpoints() if c.state == "committed"]
    assert c.world_size == world
    assert sorted(p.name for p in (tmp_path / "ckpt" / "step_7").iterdir() if p.suffix == ".pt") == sorted(
        ["model.pt", *(f"rank_{r}.pt" for r in range(world))]
    )


def test_only_the_gang_is_positional(tmp_path: Path, catalog_url: str) -> None:
    params = list(inspect.signature(FileCheckpointManager).parameters.values())
    assert [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD] == ["checkpoint_dir", "gang"]
    assert all(p.kind is p.KEYWORD_ONLY for p in params[2:])
    # gang=None positionally: one process
    m = FileCheckpointManager(tmp_path / "a", None, catalog=catalog_url)
    assert (m.gang.rank, m.gang.size) == (0, 1)
    # a catalog URL in the gang's place is refused with a message that says so
    with pytest.raises(InvalidArgumentError, match="second positional argument is the gang"):
        FileCheckpointManager(tmp_path / "b", catalog_url)
    with pytest.raises(TypeError):
        FileCheckpointManager(tmp_path / "c", None, catalog_url)  # type: ignore[misc]
