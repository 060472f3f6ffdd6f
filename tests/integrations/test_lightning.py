"""The Lightning drop-in with the real Trainer: SIGKILL mid-save, resume, retention, best, DDP (2 processes)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("lightning")

import torch

from ckptdb import FileCheckpointManager
from ckptdb.catalog import Catalog
from ckptdb.catalog.models import State
from ckptdb.catalog.session import sqlite_url
from tests.helpers import work_dirs

CHILD = Path(__file__).with_name("lightning_child.py")
pytestmark = pytest.mark.timeout(600)


def run_child(d: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("CKPTDB_URL", None)
    return subprocess.run(
        [sys.executable, str(CHILD), str(d), *args], capture_output=True, text=True, timeout=400, env=env
    )


def catalog_of(d: Path) -> tuple[Catalog, int]:
    cat = Catalog(sqlite_url(d / "catalog.db"), create=False)
    return cat, cat.get_run(str(d.resolve())).id


def best_k_and_newest(cat: Catalog, run_id: int, k: int) -> set[int]:
    every = {c.step_nr: c.scores["val_loss"] for c in cat.checkpoints(run_id) if c.scores.get("val_loss") is not None}
    best = sorted(every, key=lambda s: (every[s], -s))[:k]
    return set(best) | {max(every)}


def test_sigkill_mid_save_then_resume_last(tmp_path: Path) -> None:
    r = run_child(tmp_path / "ref", "--out", str(tmp_path / "ref.pt"))
    assert r.returncode == 0, r.stderr[-3000:]
    d = tmp_path / "ck"
    r = run_child(d, "--kill-at", "16")
    assert r.returncode == -9, r.stderr[-3000:]
    assert work_dirs(d)  # the killed save's step_16.tmp-<token>

    r = run_child(d, "--out", str(tmp_path / "res.pt"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"Restored all states from the checkpoint at {d.resolve() / 'step_12'}" in r.stdout + r.stderr
    assert "RESULT global_step=24" in r.stdout
    ref, res = torch.load(tmp_path / "ref.pt"), torch.load(tmp_path / "res.pt")
    for k in ref:  # model, Adam state, StepLR and loops continued exactly
        assert torch.equal(ref[k], res[k]), k

    cat, run_id = catalog_of(d)
    kept = set(cat.committed_steps(run_id))
    assert kept == best_k_and_newest(cat, run_id, 2)
    assert not work_dirs(d)
    assert sorted(p.name for p in d.iterdir() if p.name.startswith("step_")) == sorted(f"step_{s}" for s in kept)
    assert not cat.in_states(run_id, [State.PENDING])
    newest = cat.newest_committed(run_id)
    assert newest is not None
    assert {"train_loss", "val_loss"} <= set(newest.scores)  # every logged metric
    # the checkpoint dict loads under weights_only (ckptdb's only load) with plain hyper_parameters
    state = FileCheckpointManager(d).load_checkpoint(newest.step_nr)
    assert state["hyper_parameters"] == {"hidden": 8, "lr": 0.05}
    assert type(state["hyper_parameters"]) is dict
    assert state["global_step"] == 24 and state["optimizer_states"] and state["lr_schedulers"]
    assert newest.user_metadata is not None and newest.user_metadata["layout"] == "lightning"


@pytest.mark.filterwarnings("ignore")
def test_best_and_last_from_the_catalog_in_a_fresh_trainer(tmp_path: Path) -> None:
    import lightning.pytorch as L

    from ckptdb.lightning import CatalogCheckpoint

    r = run_child(tmp_path / "ck", "--epochs", "4")
    assert r.returncode == 0, r.stderr[-3000:]
    d = (tmp_path / "ck").resolve()
    cat, run_id = catalog_of(d)
    best_step = cat.ranked_by_score(run_id, "val_loss", lower_better=True)[0][0]

    ckpt = CatalogCheckpoint(dirpath=d, monitor="val_loss", mode="min", save_top_k=2, save_last=True)
    assert ckpt.best_model_path == str(d / f"step_{best_step}")
    assert ckpt._find_last_checkpoints(SimpleNamespace(is_global_zero=True)) == {str(d / "step_16")}

    class M(L.LightningModule):
        def __init__(self, hidden: int = 8, lr: float = 0.05) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1))

        def validation_step(self, batch, batch_idx):
            self.log("v", self.net(batch[0]).mean())

    x = torch.utils.data.TensorDataset(torch.randn(8, 4), torch.randn(8, 1))
    trainer = L.Trainer(callbacks=[ckpt], logger=False, enable_progress_bar=False, accelerator="cpu")
    trainer.validate(M(), torch.utils.data.DataLoader(x, batch_size=4), ckpt_path="best")
    assert trainer.ckpt_path == str(d / f"step_{best_step}")


def test_ddp_two_processes_one_transaction_per_checkpoint(tmp_path: Path) -> None:
    d = tmp_path / "ck"
    r = run_child(d, "--devices", "2", "--epochs", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_child(d, "--devices", "2", "--epochs", "3")  # resumes on both ranks from the catalog's newest
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"Restored all states from the checkpoint at {d.resolve() / 'step_8'}" in r.stdout + r.stderr
    cat, run_id = catalog_of(d)
    rows = cat.checkpoints(run_id)
    assert sorted({c.step_nr for c in rows}) == [4, 8, 12]
    for c in rows:  # one writer (rank 0), one begin and one commit each
        assert c.world_size == 1
        events = [e["to_state"] for e in cat.events(c.id)]
        assert events[:2] == ["pending", "committed"], events
    assert not work_dirs(d)


def test_pytorch_lightning_package(tmp_path: Path) -> None:
    pytest.importorskip("pytorch_lightning")
    d = tmp_path / "ck"
    r = run_child(d, "--pl", "--epochs", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_child(d, "--pl", "--epochs", "3")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"Restored all states from the checkpoint at {d.resolve() / 'step_8'}" in r.stdout + r.stderr
    cat, run_id = catalog_of(d)
    assert set(cat.committed_steps(run_id)) == best_k_and_newest(cat, run_id, 2)
    newest = cat.newest_committed(run_id)
    assert newest is not None and newest.user_metadata is not None
    assert newest.user_metadata["package"] == "pytorch_lightning"
