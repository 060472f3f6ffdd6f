"""Small builders shared by tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

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
