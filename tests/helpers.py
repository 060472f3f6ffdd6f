"""Small builders shared by tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from sqlalchemy import create_engine, text

from ckptdb import FileCheckpointManager


def make_state(step: int, *, size: int = 8) -> dict[str, Any]:
    g = torch.Generator().manual_seed(step)
    model = {"w": torch.randn(size, size, generator=g), "b": torch.randn(size, generator=g)}
    optim = {
        "state": {0: {"exp_avg": torch.randn(size, generator=g), "step": torch.tensor(float(step))}},
        "param_groups": [{"lr": 0.001, "betas": (0.9, 0.999), "params": [0]}],
    }
    return {"model": model, "optimizer": optim, "step_nr": step, "epoch": step // 10}


def save(m: FileCheckpointManager, step: int, *, score: float | None = None, **kw: Any) -> None:
    m.begin_checkpoint(step, **kw)
    m.save_state(make_state(step))
    if score is not None:
        m.save_score(score)
    m.commit_checkpoint()


def assert_state_equal(a: Any, b: Any) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (set(a), set(b))
        for k in a:
            assert_state_equal(a[k], b[k])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_state_equal(x, y)
    else:
        assert a == b


def work_dirs(d: Path) -> list[str]:
    """Debris: anything in the checkpoint dir that is not a committed step, the catalog or model.yaml."""
    return sorted(p.name for p in d.iterdir() if ".tmp" in p.name or ".old-" in p.name or ".trash-" in p.name)


def insert_rows(
    catalog: Any,
    run_name: str,
    rows: list[tuple[int, str, dict[str, float | None]]],
    pins: dict[int, list[str]] | None = None,
) -> int:
    """Insert checkpoint rows (step, state, scores) and pins straight into a catalog (no files).

    For property tests of the retention query; returns the run id.
    """
    import secrets

    from ckptdb.catalog.models import Checkpoint, Pin, Score
    from ckptdb.catalog.store import _score_columns

    run = catalog.ensure_run(run_name, f"/nonexistent/{run_name}")
    with catalog.db.transaction() as s:
        for step, state, scores in rows:
            c = Checkpoint(
                run_id=run.id,
                step_nr=step,
                state=state,
                token=secrets.token_hex(8),
                directory=f"step_{step}",
                writer_host="h",
                writer_pid=1,
                ckptdb_version="t",
                torch_version="t",
                python_version="t",
                hash_algorithm="xxh3_128",
                model_preserved=False,
            )
            s.add(c)
            s.flush()
            for metric, value in scores.items():
                if value is not None:
                    v, raw = _score_columns(value)
                    s.add(Score(checkpoint_id=c.id, metric=metric, value=v, raw_value=raw))
        for step, labels in (pins or {}).items():
            for label in labels:
                s.add(Pin(run_id=run.id, step_nr=step, label=label))
    return int(run.id)


def sql(url: str, q: str, **params: object) -> list[tuple]:
    """Run one query on a catalog through a short-lived engine of the test's own (as a user's SQL would)."""
    engine = create_engine(url)
    try:
        with engine.connect() as c:
            return [tuple(r) for r in c.execute(text(q), params)]
    finally:
        engine.dispose()


def run_until_killme(argv: list[str]) -> list[str]:
    """Start a child process, SIGKILL it when it prints a line starting with KILLME; its stdout lines."""
    import signal
    import subprocess

    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        lines = []
        for line in proc.stdout:
            lines.append(line.strip())
            if line.startswith("KILLME"):
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(timeout=60)
        err = proc.stderr.read()
    assert proc.returncode == -signal.SIGKILL, (lines, err)
    return lines
