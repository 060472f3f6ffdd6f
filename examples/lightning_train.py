"""ckptdb + PyTorch Lightning: train, get SIGKILLed while saving, resume with ckpt_path="last".

    python examples/lightning_train.py            # the whole demo (about a minute on a CPU)
    python examples/lightning_train.py --worker DIR [--kill-at STEP]

The only ckptdb lines in the training script are the import and the ``CatalogCheckpoint``; the
resume line is Lightning's own ``trainer.fit(model, ckpt_path="last")``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from ckptdb.lightning import CatalogCheckpoint


class Regressor(L.LightningModule):
    def __init__(self, hidden: int = 64, lr: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()  # plain values: the checkpoint loads under weights_only
        self.net = torch.nn.Sequential(torch.nn.Linear(16, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1))

    def training_step(self, batch, batch_idx):
        loss = torch.nn.functional.mse_loss(self.net(batch[0]), batch[1])
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def loaders() -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1280, 16, generator=g)
    y = x @ torch.randn(16, 1, generator=g) + 0.1 * torch.randn(1280, 1, generator=g)
    return (
        DataLoader(TensorDataset(x[:1024], y[:1024]), batch_size=64),
        DataLoader(TensorDataset(x[1024:], y[1024:]), batch_size=128),
    )


def worker(checkpoint_dir: str, kill_at: int) -> None:
    if kill_at >= 0:  # demo only: die inside the save of step kill_at (its files written, not committed)
        from ckptdb import FileCheckpointManager

        commit = FileCheckpointManager.commit_checkpoint

        def commit_or_die(self, *a, **kw):
            if self._open is not None and self._open.step_nr == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return commit(self, *a, **kw)

        FileCheckpointManager.commit_checkpoint = commit_or_die

    L.seed_everything(0)
    ckpt = CatalogCheckpoint(dirpath=checkpoint_dir, monitor="val_loss", mode="min", save_top_k=2, save_last=True)
    trainer = L.Trainer(max_epochs=8, callbacks=[ckpt], accelerator="cpu", logger=False, enable_progress_bar=False)
    train, val = loaders()
    trainer.fit(Regressor(), train, val, ckpt_path="last")  # the newest committed checkpoint, if any
    trainer.validate(Regressor(), val, ckpt_path="best")  # best by val_loss, chosen by the catalog
    print(f"best: {ckpt.best_model_path}  score {float(ckpt.best_model_score):.4f}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", metavar="DIR")
    p.add_argument("--kill-at", type=int, default=-1)
    a = p.parse_args()
    if a.worker:
        worker(a.worker, a.kill_at)
        return
    d = Path("demo-out/lightning")
    shutil.rmtree(d, ignore_errors=True)
    me = [sys.executable, __file__, "--worker", str(d)]
    print("== training; SIGKILL while saving step 80")
    print("   exit status", subprocess.run([*me, "--kill-at", "80"]).returncode)
    print("== same command again: resumes from the newest committed step")
    subprocess.run(me, check=True)
    subprocess.run([sys.executable, "-m", "ckptdb.cli", "ls", "--dir", str(d), str(d.resolve())], check=True)


if __name__ == "__main__":
    main()
