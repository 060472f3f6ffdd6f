"""Processes for the concurrency test: a trainer saving to its own run with a retention policy, a
``prune`` loop and a ``gc`` loop, all on one catalog.

    python tests/integration/child_cleanup.py trainer URL ROOT RUN STEPS    (ROOT: a directory or s3://bucket)
    python tests/integration/child_cleanup.py prune URL STOPFILE RUN...
    python tests/integration/child_cleanup.py gc URL STOPFILE

Exit status 0 only when nothing went wrong; any error is printed.
"""

from __future__ import annotations

import logging
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from ckptdb import (
    AnyOf,
    CheckpointNotFoundError,
    FileCheckpointManager,
    KeepBest,
    KeepEvery,
    KeepLast,
    SaveOptions,
    cleanup,
)
from ckptdb.catalog import Catalog

POLICY = AnyOf(KeepLast(2), KeepBest(2, metric="loss", lower_better=True), KeepEvery(10))
PENDING_STEP = 1_000_000
PIN_STEP = 3


class _Fail(logging.Handler):
    """A trainer must never see a failure, not even one that is only logged."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.bad: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if "failed" in msg or "could not" in msg or "stays 'deleting'" in msg:
            self.bad.append(msg)


def loss(run: str, step: int) -> float:
    return random.Random(f"{run}:{step}").uniform(0, 1)


def trainer(url: str, root: str, run: str, steps: int) -> None:
    fail = _Fail()
    logging.getLogger("ckptdb").addHandler(fail)
    opts = SaveOptions(fsync=False)
    where = f"{root}/{run}" if root.startswith("s3://") else Path(root) / run  # ROOT: a directory or s3://bucket
    m = FileCheckpointManager(where, catalog=url, run=run, retention=POLICY, save_options=opts)
    # a second writer in this process keeps one checkpoint pending for the whole run
    side = FileCheckpointManager(where, catalog=url, run=run, save_options=opts)
    side.begin_checkpoint(PENDING_STEP)
    side.save_state({"model": {"w": torch.full((4,), 7.0)}, "step_nr": PENDING_STEP})
    for step in range(1, steps + 1):
        m.begin_checkpoint(step)
        m.save_state({"model": {"w": torch.full((4,), float(step))}, "step_nr": step})
        m.save_score(loss(run, step), metric="loss")
        m.commit_checkpoint()
        if step == PIN_STEP:
            m.pin(step, "keep-me")  # pinned while it is the newest: never deletable
    side.commit_checkpoint()  # the pending row and its directory were left alone
    state = side.load_checkpoint(PENDING_STEP)
    assert torch.equal(state["model"]["w"], torch.full((4,), 7.0)) and state["step_nr"] == PENDING_STEP
    if fail.bad:
        raise SystemExit(f"trainer {run} logged failures: {fail.bad}")
    print(f"trainer {run} done", flush=True)


def pruner(url: str, stop: str, runs: list[str]) -> None:
    cat = Catalog(url)
    rounds = deleted = 0
    while True:
        stopping = Path(stop).exists()
        for run in runs:
            try:
                rep = cleanup.prune(cat, run, POLICY, fsync=False)
            except CheckpointNotFoundError:
                continue  # the trainer has not opened its run yet
            if rep.failed:
                raise SystemExit(f"prune {run} failed: {rep.failed}")
            deleted += len(rep.deleted)
        rounds += 1
        if stopping:
            break
    print(f"prune: {rounds} rounds, {deleted} deleted", flush=True)


def gcer(url: str, stop: str) -> None:
    cat = Catalog(url)
    rounds = 0
    while True:
        stopping = Path(stop).exists()
        rep = cleanup.gc(cat, fsync=False)
        if rep.errors or rep.total("marked_missing") or rep.total("rolled_back") or rep.total("foreign"):
            raise SystemExit(f"gc found trouble: {rep}")
        rounds += 1
        if stopping:
            break
    print(f"gc: {rounds} rounds", flush=True)


if __name__ == "__main__":
    role, url = sys.argv[1], sys.argv[2]
    if role == "trainer":
        trainer(url, sys.argv[3], sys.argv[4], int(sys.argv[5]))
    elif role == "prune":
        pruner(url, sys.argv[3], sys.argv[4:])
    else:
        gcer(url, sys.argv[3])
