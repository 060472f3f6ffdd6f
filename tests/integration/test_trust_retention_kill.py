"""Issue 10, item 7: SIGKILL a real process while it removes the model files of model-only steps
(the leftovers of preserve_model deletions that a later keep_* call drops); the next open finishes
the removal: the disk and the catalog end as if the call had completed, with no debris. The same on an
object-store run (SeaweedFS): the points there are the no-op set-aside, the mark, and after the mark
before the prefix's objects are deleted (see child_retention.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from ckptdb import FileCheckpointManager
from ckptdb.storage.objectstore import ObjectStore, parse_attempt_dir
from tests.helpers import make_state, run_until_killme, sql, work_dirs
from tests.s3_fixtures import Bucket

CHILD = Path(__file__).with_name("child_retention.py")


def _steps(m: FileCheckpointManager) -> dict[int, list[str]]:
    """step number -> file names, of what the run's storage holds (debris fails the assertion)."""
    store = m.store
    if isinstance(store, ObjectStore):
        names = store.list_entries()
        assert all(parse_attempt_dir(n) for n in names), names
        root = store.location.prefix + "/"
        assert store.client.list_uploads(store.bucket, root) == []
        return {parse_attempt_dir(n)[0]: sorted(store.list_files(n)) for n in names}  # type: ignore[index]
    d = m.checkpoint_dir
    assert d is not None and work_dirs(d) == [], sorted(p.name for p in d.iterdir())
    return {int(p.name[5:]): sorted(f.name for f in p.iterdir()) for p in d.glob("step_*")}


@pytest.fixture(params=["local", "seaweedfs"])
def where(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str | Path:
    if request.param == "local":
        return tmp_path / "ckpt"
    bucket: Bucket = request.getfixturevalue("seaweedfs_bucket")
    for k, v in bucket.server.env().items():
        monkeypatch.setenv(k, v)
    return f"s3://{bucket.name}/ckpt"


@pytest.mark.parametrize("point", ["after_claim", "after_rename", "before_mark"])
def test_sigkill_mid_model_removal_is_finished_by_next_open(catalog_url: str, point: str, where: str | Path) -> None:
    directory = where
    lines = run_until_killme([sys.executable, str(CHILD), str(directory), catalog_url, point])
    assert lines[-1] == f"KILLME {point}", lines
    # killed mid-way: both model-only steps were claimed ('deleting') in one transaction; after the
    # rename to trash, step 1's row was marked deleted in the same transaction (its trash is debris)
    states = sql(catalog_url, "SELECT step_nr, state FROM checkpoints ORDER BY step_nr")
    first = "deleted" if point == "after_rename" else "deleting"
    assert states[:2] == [(1, first), (2, "deleting")], states

    m = FileCheckpointManager(directory, catalog=catalog_url, run="exp")
    finished = [2] if point == "after_rename" else [1, 2]
    assert m.last_recovery is not None and sorted(m.last_recovery.deletions_finished) == finished
    files = _steps(m)
    assert sorted(files) == [3, 4]
    assert [f for f in files[3] if f != ".ckptdb_token"] == ["model.pt", "score.txt"], files
    rows = sql(catalog_url, "SELECT step_nr, state, model_preserved FROM checkpoints ORDER BY step_nr")
    assert [(s, st, bool(p)) for s, st, p in rows] == [
        (1, "deleted", False),
        (2, "deleted", False),
        (3, "deleted", True),
        (4, "committed", False),
    ]
    left = sql(
        catalog_url,
        "SELECT c.step_nr, count(*) FROM shards s JOIN checkpoints c ON c.id = s.checkpoint_id "
        "WHERE s.removed_at IS NULL AND c.step_nr IN (1, 2) GROUP BY c.step_nr",
    )
    assert left == []  # the catalog lists no file of steps 1 and 2 as present
    # the trainer goes on: step 5, then the pattern removes step 3's model
    m.begin_checkpoint(5)
    m.save_state(make_state(5))
    m.commit_checkpoint()
    assert m.keep_last_n_checkpoints(2) == [3]
    assert m.keep_last_n_checkpoints(1, preserve_model=True) == [4]
    assert sorted(_steps(m)) == [4, 5]
    again = FileCheckpointManager(directory, catalog=catalog_url, run="exp")
    assert again.last_recovery is not None and not again.last_recovery.changed
