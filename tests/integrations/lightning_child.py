"""A tiny Lightning run for the tests: save every epoch, optionally SIGKILL itself inside a save.

python lightning_child.py DIR [--epochs E] [--kill-at STEP] [--out weights.pt] [--devices 2] [--pl]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

import torch
from torch.utils.data import DataLoader, TensorDataset

p = argparse.ArgumentParser()
p.add_argument("dir")
p.add_argument("--epochs", type=int, default=6)
p.add_argument("--kill-at", type=int, default=-1)
p.add_argument("--out", default="")
p.add_argument("--devices", type=int, default=1)
p.add_argument("--pl", action="store_true", help="use pytorch_lightning instead of lightning.pytorch")
a = p.parse_args()

if a.pl:
    import pytorch_lightning as L

    from ckptdb.pytorch_lightning import CatalogCheckpoint
else:
    import lightning.pytorch as L

    from ckptdb.lightning import CatalogCheckpoint

from ckptdb import FileCheckpointManager  # noqa: E402

STEPS_PER_EPOCH = 4


class Tiny(L.LightningModule):
    def __init__(self, hidden: int = 8, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        # a validation loss that goes down, then up, then down: best-k is not simply the newest
        loss = torch.nn.functional.mse_loss(self.net(x), y) + 0.05 * ((self.current_epoch * 7) % 5)
        self.log("val_loss", loss, sync_dist=True)

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)}


def data(n: int, seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = x.sum(dim=1, keepdim=True).sin()
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False)


if a.kill_at >= 0:  # SIGKILL inside the save of step kill_at: files written, catalog row still pending
    original = FileCheckpointManager.commit_checkpoint

    def commit_then_die(self, *args, **kwargs):
        if self._open is not None and self._open.step_nr == a.kill_at:
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, *args, **kwargs)

    FileCheckpointManager.commit_checkpoint = commit_then_die

L.seed_everything(0)
ckpt = CatalogCheckpoint(dirpath=a.dir, monitor="val_loss", mode="min", save_top_k=2, save_last=True)
trainer = L.Trainer(
    max_epochs=a.epochs,
    callbacks=[ckpt],
    accelerator="cpu",
    devices=a.devices,
    strategy="ddp" if a.devices > 1 else "auto",
    logger=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    num_sanity_val_steps=0,
)
model = Tiny()
trainer.fit(model, data(8 * STEPS_PER_EPOCH * a.devices, 1), data(16, 2), ckpt_path="last")
if trainer.is_global_zero:
    print(f"RESULT global_step={trainer.global_step} best={ckpt.best_model_path} last={ckpt.last_model_path}")
    if a.out:
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, a.out)
