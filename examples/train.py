"""ckptdb demo: train, get SIGKILLed mid-run, resume from the catalog, finish, list the catalog.

    python examples/train.py                       # the whole demo (what `make demo` runs)
    python examples/train.py --worker DIR --steps N  # just the training loop (resumes by itself)

The training loop is what a user writes: a small MLP on synthetic regression data, a checkpoint
every ``--every`` steps with a validation loss as the score, and retention "last 2 + best 3 by
valid_loss". Set ``CKPTDB_URL=postgresql+psycopg://...`` to use a PostgreSQL catalog instead of
the SQLite file inside the checkpoint directory.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from ckptdb import AnyOf, CheckpointNotFoundError, FileCheckpointManager, KeepBest, KeepLast


def make_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w_true = torch.randn(16, 1, generator=g)
    x = torch.randn(2048, 16, generator=g)
    y = x @ w_true + 0.1 * torch.randn(2048, 1, generator=g)
    return x[:1792], y[:1792], x[1792:], y[1792:]


def train(checkpoint_dir: Path, steps: int, every: int) -> None:
    torch.manual_seed(0)
    # big enough (~13 MB of model + optimizer state) that a save takes a visible moment to write and fsync
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 1024),
        torch.nn.ReLU(),
        torch.nn.Linear(1024, 1024),
        torch.nn.ReLU(),
        torch.nn.Linear(1024, 1),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y, vx, vy = make_data()
    manager = FileCheckpointManager(
        checkpoint_dir,
        retention=AnyOf(KeepLast(2), KeepBest(3, metric="valid_loss", lower_better=True)),
    )
    manager.save_model_metadata(family="mlp", config={"in": 16, "hidden": 1024, "out": 1})

    start = 0
    try:
        start, state = manager.load_last_checkpoint()
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        print(f"resumed from step {start} (decided by the catalog)", flush=True)
    except CheckpointNotFoundError:
        print("no checkpoint yet: starting from scratch", flush=True)

    for step in range(start + 1, steps + 1):
        idx = torch.randint(0, x.shape[0], (64,))
        loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % every == 0:
            with torch.no_grad():
                valid_loss = torch.nn.functional.mse_loss(model(vx), vy).item()
            print(f"step {step}: saving (valid_loss={valid_loss:.4f})", flush=True)
            manager.begin_checkpoint(step_nr=step)
            manager.save_state(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "step_nr": step,
                    "rng": torch.get_rng_state(),
                }
            )
            manager.save_score(valid_loss, metric="valid_loss")
            manager.commit_checkpoint()  # also applies the retention policy
            print(f"step {step}: committed; kept steps {manager.get_step_numbers()}", flush=True)
            time.sleep(0.05)
    print(f"finished at step {steps}", flush=True)


def demo(out: Path) -> int:
    if out.exists():
        shutil.rmtree(out)
    ckpt = out / "checkpoints"
    me = [sys.executable, __file__, "--worker", str(ckpt), "--steps", "400", "--every", "25"]
    print(f"== 1. train in a subprocess; SIGKILL it while it saves its 6th checkpoint ({ckpt})")
    child = subprocess.Popen(me, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    saves = 0
    for line in child.stdout:
        print("   trainer:", line.rstrip())
        if "saving" in line:
            saves += 1
            if saves == 6:
                time.sleep(0.01)  # it is now inside begin_checkpoint / save_state / commit_checkpoint
                child.send_signal(signal.SIGKILL)
                break
    child.wait()
    print(f"   trainer exit status {child.returncode} (killed: {child.returncode == -signal.SIGKILL})")
    print("   left on disk:", sorted(p.name for p in ckpt.iterdir()))
    pending = [p.name for p in ckpt.iterdir() if ".tmp-" in p.name]
    if pending:
        print(f"   the kill landed mid-save: {pending[0]} is a dead writer's half-written checkpoint")
    print("== 2. run the same script again: it resumes from the newest committed checkpoint")
    rc = subprocess.call(me)
    if rc != 0:
        return rc
    print(
        "   on disk now (the half-written directory is gone, its row is 'aborted'):",
        sorted(p.name for p in ckpt.iterdir()),
    )
    print("== 3. the catalog: `ckptdb ls --dir ...`")
    cli = [sys.executable, "-m", "ckptdb.cli"]
    subprocess.check_call([*cli, "ls", "--dir", str(ckpt)])
    subprocess.check_call([*cli, "ls", "--dir", str(ckpt), str(ckpt.resolve()), "--all"])
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", type=Path, help="run the training loop with this checkpoint directory")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--every", type=int, default=25)
    p.add_argument("--out", type=Path, default=Path("demo-out"))
    args = p.parse_args()
    if args.worker is not None:
        train(args.worker, args.steps, args.every)
        return 0
    return demo(args.out)


if __name__ == "__main__":
    sys.exit(main())
