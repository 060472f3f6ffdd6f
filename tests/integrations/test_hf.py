"""The Hugging Face Trainer drop-in with the real Trainer: SIGKILL mid-save, resume, retention, fallback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import torch

from ckptdb.catalog import Catalog
from ckptdb.catalog.models import State
from ckptdb.catalog.session import sqlite_url
from ckptdb.hf import BEST_PIN, CatalogCallback, last_checkpoint
from ckptdb.verify import verify

CHILD = Path(__file__).with_name("hf_child.py")
pytestmark = pytest.mark.timeout(600)


def run_child(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    env.pop("CKPTDB_URL", None)
    return subprocess.run(
        [sys.executable, str(CHILD), str(out), *args], capture_output=True, text=True, timeout=300, env=env
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    d = tmp_path_factory.mktemp("hf-ref")
    r = run_child(d / "out", "--out", str(d / "w.pt"))
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(d / "w.pt")


def committed(out: Path) -> dict[int, dict[str, float | None]]:
    cat = Catalog(sqlite_url(out / "catalog.db"), create=False)
    run = cat.get_run(str(out.resolve()))
    return {c.step_nr: c.scores for c in cat.checkpoints(run.id, states=["committed"])}


@pytest.mark.parametrize("kill_in", ["trainer", "ckptdb"])
def test_sigkill_mid_save_then_resume(tmp_path: Path, reference: dict[str, torch.Tensor], kill_in: str) -> None:
    out = tmp_path / "out"
    r = run_child(out, "--kill-at", "20", "--kill-in", kill_in)
    assert r.returncode == -9, r.stderr[-3000:]
    assert (out / "checkpoint-20").is_dir()  # half-written (or written, never committed)
    assert 20 not in committed(out)
    assert last_checkpoint(out) == str(out.resolve() / "checkpoint-15")

    r = run_child(out, "--out", str(tmp_path / "w.pt"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"RESUME {out.resolve() / 'checkpoint-15'}" in r.stdout
    assert "RESULT global_step=30" in r.stdout
    final = torch.load(tmp_path / "w.pt")
    assert set(final) == set(reference)
    for k in reference:  # the Trainer restores model, optimizer, scheduler, RNG and data position
        assert torch.equal(final[k], reference[k]), k

    # retention: exactly best-2 by eval_loss + last-1 (the Trainer's best is pinned and among them)
    scores = committed(out)
    evals = {s: v["eval_loss"] for s, v in scores.items()}
    cat = Catalog(sqlite_url(out / "catalog.db"), create=False)
    run = cat.get_run(str(out.resolve()))
    all_evals = {c.step_nr: c.scores["eval_loss"] for c in cat.checkpoints(run.id) if "eval_loss" in c.scores}
    best2 = sorted(all_evals, key=lambda s: (all_evals[s], -s))[:2]
    assert set(scores) == set(best2) | {30}, (evals, all_evals)
    assert cat.pin_step(run.id, BEST_PIN) in scores
    assert all("loss" in v and "learning_rate" in v and "best_metric" in v for v in scores.values())
    # nothing half-written or uncommitted remains; every committed file verifies
    dirs = sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-"))
    assert dirs == sorted(f"checkpoint-{s}" for s in scores)
    assert not cat.in_states(run.id, [State.PENDING])
    assert verify(cat, run=run.name).ok

    # a damaged newest checkpoint is skipped (and recorded), the next older one returned
    (out / "checkpoint-30" / "optimizer.pt").write_bytes(b"torn")
    assert last_checkpoint(out) == str(out.resolve() / f"checkpoint-{max(s for s in scores if s != 30)}")
    assert 30 not in committed(out)


def test_save_total_limit_becomes_ckptdb_retention(tmp_path: Path) -> None:
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), save_total_limit=2, report_to=[], use_cpu=True)
    cb = CatalogCallback()
    cb.on_init_end(args, None, None)
    assert args.save_total_limit is None
    assert str(cb.policy) == "keep_last(2)"


def test_last_checkpoint_without_catalog(tmp_path: Path) -> None:
    (tmp_path / "checkpoint-10").mkdir()  # written without ckptdb: never a resume point
    assert last_checkpoint(tmp_path) is None
    assert not (tmp_path / "catalog.db").exists()
