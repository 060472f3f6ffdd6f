"""Property-based: random operation sequences, crashes and corruption included, against a model.

The model is a dict of intact committed steps (seed, score) plus the set of steps known to be damaged.
Crash injection: a manager is abandoned mid-checkpoint (never closed, as a killed process would
leave it) and a new one opened, whose recovery must roll the orphan back; files are bit-flipped,
truncated or removed behind the catalog's back and ``verify`` must notice. Retention is checked
against the pure rule :func:`ckptdb.retention.decide`.
"""

from __future__ import annotations

import gc
import math
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from ckptdb import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    FileCheckpointManager,
    InvalidOperationError,
    SaveOptions,
)
from ckptdb.catalog.session import dispose_engines
from ckptdb.retention import Candidate, KeepBest, KeepLast, decide
from ckptdb.verify import verify
from tests.helpers import assert_state_equal, make_state, work_dirs

STEPS = st.integers(min_value=0, max_value=6)
SCORES = st.one_of(
    st.floats(min_value=-10, max_value=10, allow_nan=False), st.sampled_from([math.nan, math.inf, -math.inf])
)


class CheckpointMachine(RuleBasedStateMachine):
    template: Path
    shared_url: str | None = None  # PostgreSQL: one database, one run (a fresh directory) per example

    def __init__(self) -> None:
        super().__init__()
        # tmpfs when there is one: the machine checks logic, not durability (the torture checks that)
        shm = "/dev/shm" if Path("/dev/shm").is_dir() else None
        self.tmp = Path(tempfile.mkdtemp(prefix="ckptdb-stateful-", dir=shm))
        self.dir = self.tmp / "ckpt"
        if self.shared_url is not None:
            self.url = self.shared_url
        else:
            db = self.tmp / "catalog.db"
            shutil.copyfile(self.template, db)
            self.url = f"sqlite:///{db}"
        self.m = self._open()
        self.committed: dict[int, tuple[int, float | None]] = {}  # step -> (seed, score)
        self.damaged: set[int] = set()
        self.pending: tuple[int, int, float | None] | None = None  # (step, seed, score)
        self.seed = 1000

    def _open(self) -> FileCheckpointManager:
        return FileCheckpointManager(self.dir, catalog=self.url, save_options=SaveOptions(fsync=False))

    def teardown(self) -> None:
        self.m.close()
        dispose_engines()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- writing --------------------------------------------------------------------------------

    @rule(step=STEPS, overwrite=st.booleans())
    def begin_and_save(self, step: int, overwrite: bool) -> None:
        if self.pending is not None:
            with pytest.raises(InvalidOperationError):
                self.m.begin_checkpoint(step)
            return
        if step in self.committed and not overwrite:  # a damaged step is saved again freely
            with pytest.raises(CheckpointExistsError):
                self.m.begin_checkpoint(step)
            return
        self.seed += 1
        self.m.begin_checkpoint(step, overwrite=overwrite)
        self.m.save_state(make_state(self.seed))
        self.pending = (step, self.seed, None)

    @precondition(lambda self: self.pending is not None)
    @rule(score=SCORES)
    def score(self, score: float) -> None:
        assert self.pending is not None
        self.m.save_score(score)
        self.pending = (self.pending[0], self.pending[1], score)

    @precondition(lambda self: self.pending is not None)
    @rule()
    def commit(self) -> None:
        assert self.pending is not None
        step, seed, score = self.pending
        self.m.commit_checkpoint()
        self.pending = None
        self.committed[step] = (seed, score)
        self.damaged.discard(step)

    @precondition(lambda self: self.pending is not None)
    @rule()
    def abort(self) -> None:
        self.m.abort_checkpoint()
        self.pending = None

    # -- deleting -------------------------------------------------------------------------------

    @rule(step=STEPS)
    def delete(self, step: int) -> None:
        if step in self.committed or step in self.damaged:
            self.m.delete_checkpoint(step)
            self.committed.pop(step, None)
            self.damaged.discard(step)
        else:
            with pytest.raises(CheckpointNotFoundError):
                self.m.delete_checkpoint(step)

    def _retention(self, policy: KeepLast | KeepBest) -> None:
        candidates = [Candidate(s, {"score": sc}) for s, (_, sc) in self.committed.items()]
        expected = decide(policy, candidates).delete
        assert self.m.apply_retention(policy) == expected
        for s in expected:
            self.committed.pop(s)

    @rule(n=st.integers(min_value=1, max_value=3))
    def keep_last(self, n: int) -> None:
        self._retention(KeepLast(n))

    @rule(n=st.integers(min_value=1, max_value=3), lower_better=st.booleans())
    def keep_best(self, n: int, lower_better: bool) -> None:
        self._retention(KeepBest(n, lower_better=lower_better))

    # -- crashes, reopening, damage -------------------------------------------------------------

    @rule()
    def reopen(self) -> None:
        self.m.close()
        self.pending = None
        self.m = self._open()

    @rule()
    def crash(self) -> None:
        """Abandon the manager mid-checkpoint (no close, no abort), as a killed writer would."""
        self.m = None  # type: ignore[assignment]
        gc.collect()
        self.pending = None
        self.m = self._open()
        assert work_dirs(self.dir) == []

    @precondition(lambda self: bool(self.committed))
    @rule(data=st.data(), how=st.sampled_from(["flip", "truncate", "unlink", "rmdir", "add"]))
    def damage(self, data: st.DataObject, how: str) -> None:
        step = data.draw(st.sampled_from(sorted(self.committed)))
        d = self.dir / f"step_{step}"
        busy = self.pending is not None and self.pending[0] == step
        if busy:  # an overwrite of this step is in flight: the damage is undone after the check
            backup = self.tmp / "busy-backup"
            shutil.copytree(d, backup)
        f = d / "rank_0.pt"
        if how == "flip":
            b = bytearray(f.read_bytes())
            b[len(b) // 2] ^= 0x10
            f.write_bytes(bytes(b))
        elif how == "truncate":
            f.write_bytes(f.read_bytes()[:-7])
        elif how == "unlink":
            f.unlink()
        elif how == "rmdir":
            shutil.rmtree(d)
        else:
            (d / "stray.bin").write_bytes(b"x")
        # force: removing the only committed step's directory leaves what looks like an empty mount
        # point, which verify refuses to judge unless told the files are really gone
        (result,) = verify(self.m.catalog, run=self.m.run_name, step_nr=step, force=True).results
        if busy:
            # verify does not judge a copy whose overwrite is in flight: damage found there is 'busy'
            # and marks nothing. It answers 'busy' only where it finds damage (intact files are 'ok',
            # a stray file alone 'extra'). The copy is put back as it was (an abort or crash keeps
            # it as the committed copy), so the model stays as it is
            shutil.rmtree(d, ignore_errors=True)
            backup.rename(d)
            assert result.result == ("extra" if how == "add" else "busy"), result
            assert result.state_after == "committed", result
            return
        if how == "add":
            assert result.result == "extra" and result.state_after == "committed"
            return
        assert result.result == ("corrupt" if how in ("flip", "truncate") else "missing"), result
        self.committed.pop(step)
        self.damaged.add(step)

    @rule()
    def load_last(self) -> None:
        if not self.committed:
            with pytest.raises(CheckpointNotFoundError):
                self.m.load_last_checkpoint()
            return
        step, state = self.m.load_last_checkpoint()
        assert step == max(self.committed)
        assert_state_equal(state, make_state(self.committed[step][0]))

    # -- invariants -----------------------------------------------------------------------------

    @invariant()
    def catalog_matches_model(self) -> None:
        assert self.m.get_step_numbers() == sorted(self.committed)
        states = {c.step_nr: c.state for c in self.m.get_checkpoints() if c.state in ("corrupt", "missing")}
        assert set(states) == self.damaged
        dirs = sorted(p.name for p in self.dir.iterdir() if ".tmp-" in p.name)
        assert len(dirs) == (1 if self.pending is not None else 0)
        assert not [p for p in self.dir.iterdir() if ".old-" in p.name or ".trash-" in p.name]


def test_random_operation_sequences(sqlite_template: Path, catalog_url: str) -> None:
    """On SQLite (a copy of the template per example) and on PostgreSQL (one database of this test's
    own; each example is a run of its own, named after its fresh directory)."""
    CheckpointMachine.template = sqlite_template
    postgres = not catalog_url.startswith("sqlite")
    CheckpointMachine.shared_url = catalog_url if postgres else None
    # crash() collects the abandoned manager with gc.collect(); the objects that exist before the
    # machine starts (torch, pytest, hypothesis) are frozen out of those collections, each of which
    # walked them all (0.14 s a crash, 70 % of the test's time)
    gc.freeze()
    try:
        run_state_machine_as_test(
            CheckpointMachine,
            settings=settings(
                max_examples=20 if postgres else 30,
                stateful_step_count=25,
                deadline=None,
                database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
            ),
        )
    finally:
        gc.unfreeze()
