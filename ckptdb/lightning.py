"""PyTorch Lightning drop-in: ``CatalogCheckpoint`` (install with ``pip install ckptdb[lightning]``).

Uses the ``lightning`` package (``lightning.pytorch``) when installed, else ``pytorch_lightning``;
:mod:`ckptdb.pytorch_lightning` always uses ``pytorch_lightning``. See docs/integrations.md.

Example:
    >>> from ckptdb.lightning import CatalogCheckpoint
    >>> ckpt = CatalogCheckpoint(dirpath="checkpoints", monitor="val_loss", mode="min", save_top_k=3,
    ...                          save_last=True, every_n_train_steps=500)
    >>> trainer = L.Trainer(callbacks=[ckpt])
    >>> trainer.fit(model, ckpt_path="last")     # the newest committed checkpoint
    >>> trainer.test(model, ckpt_path="best")    # best by val_loss, from the catalog
"""

from __future__ import annotations

import importlib.util

from ckptdb.integrations.lightning_impl import build, default_policy, plain

PACKAGE = "lightning.pytorch" if importlib.util.find_spec("lightning") is not None else "pytorch_lightning"
if importlib.util.find_spec(PACKAGE.split(".")[0]) is None:
    raise ImportError("ckptdb.lightning needs Lightning: pip install 'ckptdb[lightning]'")

_classes = build(PACKAGE)
CatalogCheckpoint = _classes.CatalogCheckpoint
CatalogCheckpointIO = _classes.CatalogCheckpointIO

__all__ = ["PACKAGE", "CatalogCheckpoint", "CatalogCheckpointIO", "default_policy", "plain"]
