"""Trainers, a prune loop and a gc loop as real processes on one catalog (SQLite: 5 processes,
PostgreSQL: 8): no deadlock, no double deletion, no error surfaced to a trainer, nothing deleted
that the policy keeps, a pending checkpoint never touched."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ckptdb.catalog import Catalog
from ckptdb.catalog.session import dispose_engines
from ckptdb.cleanup import gc, prune
from ckptdb.retention import Candidate, decide
from ckptdb.runstore import run_store
from tests.helpers import sql as rows
from tests.helpers import work_dirs
from tests.integration.child_cleanup import PENDING_STEP, PIN_STEP, POLICY, loss
from tests.s3_fixtures import Bucket

CHILD = str(Path(__file__).with_name("child_cleanup.py"))
STEPS = 12


@pytest.mark.timeout(240)
def test_trainers_prune_and_gc_at_once(tmp_path: Path, catalog_url: str) -> None:
    pg = catalog_url.startswith("postgresql")
    _trainers_prune_and_gc(tmp_path, catalog_url, str(tmp_path), (5, 2, 1) if pg else (3, 1, 1), None)


@pytest.mark.timeout(300)
@pytest.mark.postgres
def test_trainers_prune_and_gc_at_once_on_s3(
    tmp_path: Path, catalog_url: str, seaweedfs_bucket: Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same on s3:// runs (one bucket, SeaweedFS): gc never takes a live writer's prefix for foreign,
    prune and gc never delete twice, and no prefix but the kept checkpoints' is left."""
    if not catalog_url.startswith("postgresql"):
        pytest.skip("runs on S3 share a PostgreSQL catalog here (the SQLite variant is the local test)")
    for k, v in seaweedfs_bucket.server.env().items():
        monkeypatch.setenv(k, v)
    _trainers_prune_and_gc(tmp_path, catalog_url, f"s3://{seaweedfs_bucket.name}", (3, 2, 1), seaweedfs_bucket)


def _trainers_prune_and_gc(
    tmp_path: Path, catalog_url: str, root: str, counts: tuple[int, int, int], bucket: Bucket | None
) -> None:
    trainers, pruners, gcs = counts
    runs = [f"t{i}" for i in range(trainers)]
    stop = tmp_path / "stop"
    procs = [
        subprocess.Popen([sys.executable, CHILD, "trainer", catalog_url, root, r, str(STEPS)], text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for r in runs
    ]  # fmt: skip
    helpers = [
        subprocess.Popen([sys.executable, CHILD, "prune", catalog_url, str(stop), *runs], text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(pruners)
    ] + [
        subprocess.Popen([sys.executable, CHILD, "gc", catalog_url, str(stop)], text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(gcs)
    ]  # fmt: skip
    try:
        outs = [p.communicate(timeout=200) for p in procs]
        stop.touch()
        outs += [p.communicate(timeout=60) for p in helpers]
    finally:
        for p in procs + helpers:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(procs + helpers, outs, strict=True):
        assert p.returncode == 0, f"{p.args[2]} exited {p.returncode}:\n{out}\n{err}"
        assert "Traceback" not in err, err

    # no double deletion: every transition happened at most once per checkpoint
    assert (
        rows(
            catalog_url,
            "SELECT checkpoint_id, to_state, count(*) FROM checkpoint_events GROUP BY checkpoint_id, to_state "
            "HAVING count(*) > 1",
        )
        == []
    )
    assert rows(catalog_url, "SELECT count(*) FROM checkpoints WHERE state NOT IN ('committed', 'deleted')") == [(0,)]
    reasons = {r for (r,) in rows(catalog_url, "SELECT DISTINCT delete_reason FROM checkpoints WHERE state='deleted'")}
    assert reasons == {f"pruned by {POLICY}"}

    cat = Catalog(catalog_url)
    for run_name in runs:
        run = cat.get_run(run_name)
        ever = [Candidate(s, {"loss": loss(run_name, s)}) for s in range(1, STEPS + 1)] + [Candidate(PENDING_STEP)]
        expected = decide(POLICY, ever, {PIN_STEP: ["keep-me"]}).keep
        committed = cat.committed_steps(run.id)
        # nothing the policy keeps was deleted (deletions are final, so this holds at the end too)
        assert set(expected) <= set(committed), (run_name, expected, committed)
        assert PENDING_STEP in committed and PIN_STEP in committed
        prune(cat, run_name, POLICY, fsync=False)  # the side writer's late commit made more prunable
        assert cat.committed_steps(run.id) == expected
        if bucket is None:
            d = Path(run.checkpoint_dir)
            assert sorted(p.name for p in d.glob("step_*")) == sorted(f"step_{s}" for s in expected)
        else:  # exactly the kept checkpoints' prefixes, and no upload left behind
            store = run_store(run.checkpoint_dir)
            live = {c.directory for c in cat.checkpoints(run.id, states=["committed"])}
            assert set(store.list_entries()) == live and len(live) == len(expected)
            assert not store.client.list_uploads(store.bucket, f"{run_name}/")  # type: ignore[attr-defined]
    assert not gc(cat, fsync=False).total("removed")
    if bucket is None:
        assert all(not work_dirs(tmp_path / r) for r in runs)
    dispose_engines()
