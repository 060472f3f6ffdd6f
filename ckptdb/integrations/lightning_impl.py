"""The Lightning drop-in, written once for both packages (``lightning.pytorch`` and ``pytorch_lightning``).

:func:`build` makes the two classes for one package; :mod:`ckptdb.lightning` and
:mod:`ckptdb.pytorch_lightning` expose them. How it hooks into Lightning 2.x:

- ``CatalogCheckpoint`` subclasses ``ModelCheckpoint``: Lightning's triggers (``every_n_train_steps``,
  ``every_n_epochs``, ``train_time_interval``, validation end, exceptions) decide *when*; the save
  itself, retention, "best" and "last" are ckptdb's. One checkpoint per global step, stored as
  ``dirpath/step_<N>/`` (ckptdb's ordinary layout: ``model.pt`` holds ``state_dict``,
  ``rank_0.pt`` the rest of Lightning's dict, ``metadata.pt`` Lightning's file name and versions).
- In ``setup`` it wraps the strategy's ``CheckpointIO`` in ``CatalogCheckpointIO``: a save to
  ``dirpath/step_<N>`` becomes one catalog commit (begin, write + hash + fsync, commit: one
  transaction, on global rank 0 only; Lightning's strategy calls the IO there); a load of such a
  path is a verified, weights-only catalog load. Every other path goes to the wrapped IO unchanged.
- ``ckpt_path="last"``: Lightning asks every ``ModelCheckpoint`` for ``_find_last_checkpoints``;
  ours answers the newest *committed* step whose files have their recorded sizes (a damaged one is
  skipped and marked). ``ckpt_path="best"``: ``best_model_path`` is read from the catalog.
"""

from __future__ import annotations

import argparse
import importlib
import logging
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from weakref import proxy

import torch

from ckptdb import retention as retention_policies
from ckptdb.catalog import Catalog
from ckptdb.errors import InvalidArgumentError, UnsupportedCheckpointError
from ckptdb.integrations import common
from ckptdb.manager import FileCheckpointManager
from ckptdb.options import LoadOptions, RecoveryOptions, SaveOptions
from ckptdb.storage import layout
from ckptdb.storage.location import local_path

log = logging.getLogger("ckptdb.lightning")

LAYOUT = "lightning"  # recorded in every checkpoint's metadata; directories are ckptdb's step_<N>
_built: dict[str, SimpleNamespace] = {}


def plain(value: Any) -> Any:
    """Lightning's checkpoint dict with containers made loadable by ``torch.load(weights_only=True)``.

    ``AttributeDict`` (``save_hyperparameters()``), other ``Mapping`` subclasses and
    ``argparse.Namespace`` become plain dicts; anything else that needs a full unpickler is left
    for ckptdb's save-time check to refuse, naming its key.
    """
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, argparse.Namespace):
        value = vars(value)
    if isinstance(value, Mapping):
        items = {k: plain(v) for k, v in value.items()}
        return OrderedDict(items) if type(value) is OrderedDict else items
    if type(value) in (list, tuple):
        return type(value)(plain(v) for v in value)
    return value


def default_policy(*, monitor: str | None, mode: str, save_top_k: int) -> Any:
    """ModelCheckpoint's arguments as a ckptdb retention policy (None: keep everything)."""
    if save_top_k == -1:
        return None
    if monitor is None:
        return retention_policies.KeepLast(max(1, save_top_k))
    parts: list[Any] = [retention_policies.KeepLast(1)]
    if save_top_k > 0:
        parts.append(retention_policies.KeepBest(save_top_k, metric=monitor, lower_better=mode == "min"))
    return retention_policies.AnyOf(*parts)


def build(package: str) -> SimpleNamespace:
    """The two classes for ``package``: ``"lightning.pytorch"`` or ``"pytorch_lightning"``."""
    if package in _built:
        return _built[package]
    pl = importlib.import_module(package)
    callbacks = importlib.import_module(f"{package}.callbacks")
    try:
        plugins_io = importlib.import_module(f"{package}.plugins.io")
        CheckpointIO = plugins_io.CheckpointIO
    except (ImportError, AttributeError):  # pragma: no cover - older layouts
        CheckpointIO = importlib.import_module(f"{package}.plugins").CheckpointIO
    ModelCheckpoint = callbacks.ModelCheckpoint

    class CatalogCheckpointIO(CheckpointIO):  # type: ignore[misc,valid-type]
        """A ``CheckpointIO`` whose saves to ``<dirpath>/step_<N>`` are catalog commits.

        Installed by :class:`CatalogCheckpoint` in ``setup``; other paths go to ``wrapped``.
        """

        def __init__(self, callback: Any, wrapped: Any) -> None:
            super().__init__()
            self.callback = callback
            self.wrapped = wrapped

        def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
            step = self.callback.step_of(path)
            if step is None:
                self.wrapped.save_checkpoint(checkpoint, path, storage_options=storage_options)
                return
            if storage_options is not None:
                raise InvalidArgumentError("CatalogCheckpointIO: storage_options are not supported")
            self.callback.commit(checkpoint, step)

        def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> Any:
            step = self.callback.step_of(path)
            if step is None:
                kw = {} if weights_only is None else {"weights_only": weights_only}
                return self.wrapped.load_checkpoint(path, map_location=map_location, **kw)
            return self.callback.load(step)

        def remove_checkpoint(self, path: Any) -> None:
            step = self.callback.step_of(path)
            if step is None:
                self.wrapped.remove_checkpoint(path)
            else:
                self.callback.writer.delete_checkpoint(step, missing_ok=True, reason="lightning remove_checkpoint")

        def teardown(self) -> None:
            self.wrapped.teardown()

    class CatalogCheckpoint(ModelCheckpoint):  # type: ignore[misc,valid-type]
        """``ModelCheckpoint`` whose saves, retention, "best" and "last" come from a ckptdb catalog.

        The familiar arguments keep their meaning; the differences (docs/integrations.md):
        one checkpoint per global step in ``dirpath/step_<N>/`` (``filename`` is recorded as
        metadata, not used as a path); "last" is the newest committed step (no ``last.ckpt``
        copy); retention is ckptdb's top-k + newest + pins and survives resume; every logged
        metric is a score. ``save_top_k=-1`` keeps everything.

        Args:
            catalog: SQLAlchemy URL; default ``CKPTDB_URL`` or SQLite ``dirpath/catalog.db``.
            run: the run's name in the catalog (default: ``dirpath``'s absolute path).
            retention: a ckptdb policy replacing the one derived from ``save_top_k``/``monitor``
                (e.g. ``AnyOf(KeepLast(2), KeepBest(3, metric="val_loss", lower_better=True))``).
            save_options, load_options: :mod:`ckptdb.options` (loads verify digests by default).

        Example:
            >>> ckpt = CatalogCheckpoint(dirpath="checkpoints", monitor="val_loss", save_top_k=3,
            ...                          save_last=True, every_n_train_steps=500)
            >>> trainer = L.Trainer(callbacks=[ckpt])
            >>> trainer.fit(model, ckpt_path="last")
        """

        def __init__(
            self,
            dirpath: Any = None,
            filename: str | None = None,
            monitor: str | None = None,
            *args: Any,
            catalog: str | None = None,
            run: str | None = None,
            retention: Any = None,
            save_options: SaveOptions | None = None,
            load_options: LoadOptions | None = None,
            **kwargs: Any,
        ) -> None:
            self._best_model_path = ""
            self._catalog_url = catalog
            self._run_name = run
            self._save_options = save_options
            self._load_options = load_options
            self._writer: FileCheckpointManager | None = None
            self._reader: FileCheckpointManager | None = None
            self._view: tuple[str, Catalog | None] | None = None
            self._refreshed = False
            super().__init__(dirpath, filename, monitor, *args, **kwargs)
            if self.save_last == "link":  # type: ignore[has-type]
                self.save_last = True  # "last" is a catalog query: there is nothing to link
            self.policy = (
                retention
                if retention is not None
                else default_policy(monitor=monitor, mode=self.mode, save_top_k=self.save_top_k)
            )

        # -- where things are -------------------------------------------------------------

        @property
        def best_model_path(self) -> str:
            if not self._refreshed and self.dirpath is not None:
                self.refresh()
            return self._best_model_path

        @best_model_path.setter
        def best_model_path(self, value: str) -> None:
            self._best_model_path = value

        def _directory(self, trainer: Any = None) -> Path:
            if self.dirpath is None and trainer is not None:
                return Path(self._ModelCheckpoint__resolve_ckpt_dir(trainer)).expanduser().resolve()
            if self.dirpath is None:
                raise InvalidArgumentError("CatalogCheckpoint: dirpath is not known before setup()")
            return local_path(self.dirpath, what="dirpath", by="CatalogCheckpoint")

        def _url(self, d: Path) -> str:
            return common.resolve_url(d, self._catalog_url)

        def step_of(self, path: Any) -> int | None:
            """N for ``<dirpath>/step_<N>``; None for any other path (left to the wrapped IO)."""
            if self.dirpath is None or path is None:
                return None
            p = Path(str(path)).expanduser().resolve()
            if p.parent != self._directory():
                return None
            return layout.parse_step_dir(p.name)

        @property
        def writer(self) -> FileCheckpointManager:
            """The manager that saves and deletes (global rank 0; opening it runs recovery)."""
            if self._writer is None:
                d = self._directory()
                self._writer = FileCheckpointManager(
                    d,
                    catalog=self._url(d),
                    run=self._run_name,
                    retention=self.policy,
                    save_options=self._save_options,
                    load_options=self._load_options,
                )
            return self._writer

        def _loader(self, trainer_rank_zero: bool) -> FileCheckpointManager:
            if trainer_rank_zero:
                return self.writer
            if self._reader is None:  # other ranks read; recovery is rank 0's business
                d = self._directory()
                self._reader = FileCheckpointManager(
                    d,
                    catalog=self._url(d),
                    run=self._run_name,
                    load_options=self._load_options,
                    recovery_options=RecoveryOptions(on_open=False),
                )
            return self._reader

        def _catalog(self, d: Path) -> Catalog | None:
            url = self._url(d)
            if self._view is None or self._view[0] != url or self._view[1] is None:
                self._view = (url, common.open_existing(url))
            return self._view[1]

        # -- Lightning hooks ----------------------------------------------------------------

        def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
            super().setup(trainer, pl_module, stage)
            _refuse_unsupported(trainer.strategy)
            io = trainer.strategy.checkpoint_io
            if not isinstance(io, CatalogCheckpointIO):
                trainer.strategy.checkpoint_io = CatalogCheckpointIO(self, io)
            else:
                io.callback = self
            if trainer.is_global_zero:
                _ = self.writer  # open the catalog and recover a crashed writer before anything loads
            trainer.strategy.barrier("ckptdb setup")
            self.refresh()

        def _ModelCheckpoint__warn_if_dir_not_empty(self, dirpath: Any) -> None:
            pass  # the directory holds the catalog and earlier steps by design

        def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
            for m in (self._writer, self._reader):
                if m is not None:
                    m.close()

        def _find_last_checkpoints(self, trainer: Any) -> set[str]:
            d = self._directory(trainer)
            catalog = self._catalog(d)
            if catalog is None:
                return set()
            run = common.find_run(catalog, d, self._run_name)
            if run is None:
                return set()
            info = common.newest_intact(catalog, run, d, mark=trainer.is_global_zero)
            return set() if info is None else {str(d / info.directory)}

        def state_dict(self) -> dict[str, Any]:
            state = dict(super().state_dict())
            state["best_model_path"] = self._best_model_path
            state["ckptdb_run"] = self._run_name
            return state

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            # Lightning's copy of best/last is a snapshot; the catalog is the truth (it survives resume)
            if self.dirpath is not None:
                self.refresh()

        def _save_topk_checkpoint(self, trainer: Any, monitor_candidates: dict[str, Any]) -> None:
            if self.save_top_k == 0 and not self.save_last:
                return
            if self.monitor is not None and self.monitor not in monitor_candidates:
                m = (
                    f"CatalogCheckpoint(monitor={self.monitor!r}) could not find the monitored key in the logged "
                    f"metrics: {sorted(monitor_candidates)}; the checkpoint is saved without that score"
                )
                if not self.save_last:
                    log.warning("%s (save_last=False: skipped)", m)
                    return
                log.warning(m)
            if not self.save_last and not self._would_rank(trainer, monitor_candidates):
                return
            self._save_step(trainer, monitor_candidates)

        def _save_last_checkpoint(self, trainer: Any, monitor_candidates: dict[str, Any]) -> None:
            if not self.save_last or self._last_global_step_saved == trainer.global_step:
                return
            self._save_step(trainer, monitor_candidates)

        def _save_checkpoint(self, trainer: Any, filepath: str) -> None:  # on_exception's path
            self._save_step(trainer, self._monitor_candidates(trainer), filename=filepath)

        def _remove_checkpoint(self, trainer: Any, filepath: str) -> None:
            pass  # retention is the catalog's

        # -- saving ----------------------------------------------------------------------------

        def _would_rank(self, trainer: Any, candidates: dict[str, Any]) -> bool:
            """save_last=False: save only what enters the top k (rank 0 decides, every rank follows)."""
            if self.monitor is None or self.save_top_k == -1:
                return True
            decision = True
            if trainer.is_global_zero:
                current = common.scalar_scores({self.monitor: candidates.get(self.monitor)}).get(self.monitor)
                ranked = self.writer.catalog.ranked_by_score(
                    self.writer.run.id, self.monitor, lower_better=self.mode == "min"
                )
                if not common.finite(current):
                    decision = False
                elif len(ranked) >= self.save_top_k:
                    kth = ranked[self.save_top_k - 1][1]
                    assert current is not None and kth is not None
                    decision = current <= kth if self.mode == "min" else current >= kth
            return bool(trainer.strategy.broadcast(decision))

        def _save_step(self, trainer: Any, candidates: dict[str, Any], *, filename: str | None = None) -> None:
            step = trainer.global_step
            path = str(self._directory() / layout.step_dir_name(step))
            metrics = {k: v for k, v in trainer.callback_metrics.items()}
            self._pending = {
                "scores": common.scalar_scores(metrics),
                "filename": filename or self.format_checkpoint_name(candidates),
                "epoch": int(trainer.current_epoch),
            }
            try:
                trainer.save_checkpoint(path, self.save_weights_only)
            finally:
                self._pending = {}
            self._last_global_step_saved = step
            self._last_checkpoint_saved = path
            trainer.strategy.barrier("ckptdb commit")
            self.refresh()
            if trainer.is_global_zero:
                for logger in trainer.loggers:
                    logger.after_save_checkpoint(proxy(self))

        def commit(self, checkpoint: dict[str, Any], step: int) -> None:
            """One catalog commit (called by the IO on global rank 0)."""
            pending = getattr(self, "_pending", None) or {}
            m = self.writer
            state = plain(checkpoint)
            m.begin_checkpoint(step, overwrite=True)
            try:
                m.save_state(state, model_key="state_dict" if "state_dict" in state else "model")
                m.save_metadata(
                    {
                        common.LAYOUT_KEY: LAYOUT,
                        "package": package,
                        "lightning_version": str(getattr(pl, "__version__", "")),
                        "filename": str(pending.get("filename") or ""),
                        "epoch": int(checkpoint.get("epoch", pending.get("epoch", 0)) or 0),
                        "global_step": int(checkpoint.get("global_step", step) or step),
                        "weights_only": "optimizer_states" not in checkpoint,
                        "hyper_parameters": state.get("hyper_parameters", {}),
                    }
                )
                for metric, value in pending.get("scores", {}).items():
                    m.save_score(value, metric=metric)
            except BaseException:
                m.abort_checkpoint()
                raise
            m.commit_checkpoint()

        def load(self, step: int) -> dict[str, Any]:
            """Lightning's checkpoint dict of committed ``step`` (verified, weights-only)."""
            import torch.distributed as dist

            zero = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
            return self._loader(zero).load_checkpoint(step)

        # -- reading the catalog --------------------------------------------------------------

        def refresh(self) -> None:
            """Set best/last/top-k attributes from the catalog (every rank reads it)."""
            self._refreshed = True
            d = self._directory()
            catalog = self._catalog(d)
            run = None if catalog is None else common.find_run(catalog, d, self._run_name)
            if catalog is None or run is None:
                return
            committed = catalog.checkpoints(run.id, states=["committed"])
            if not committed:
                return
            newest = committed[-1]
            self.last_model_path = str(d / newest.directory) if self.save_last else ""
            if self.monitor is None:
                self._best_model_path = str(d / newest.directory)
                return
            sign = 1.0 if self.mode == "min" else -1.0
            scored = [
                (c, float(c.scores[self.monitor] or 0.0))
                for c in committed
                if common.finite(c.scores.get(self.monitor))
            ]
            scored.sort(key=lambda cs: (sign * cs[1], -cs[0].step_nr))
            k = len(scored) if self.save_top_k < 1 else self.save_top_k
            top = scored[:k]
            self.best_k_models = {str(d / c.directory): torch.tensor(v) for c, v in top}
            if top:
                self._best_model_path = str(d / top[0][0].directory)
                self.best_model_score = torch.tensor(top[0][1])
                if len(top) == k:
                    self.kth_best_model_path = str(d / top[-1][0].directory)
                    self.kth_value = torch.tensor(top[-1][1])

    def _refuse_unsupported(strategy: Any) -> None:
        name = type(strategy).__name__
        sharded = getattr(strategy, "_state_dict_type", None) == "sharded"
        if name in ("ModelParallelStrategy", "DeepSpeedStrategy") or (name == "FSDPStrategy" and sharded):
            raise UnsupportedCheckpointError(
                f"CatalogCheckpoint: {name} writes sharded checkpoints itself (through torch.distributed."
                "checkpoint), bypassing CheckpointIO, so ckptdb could not commit them. Use "
                "FSDPStrategy(state_dict_type='full') (a consolidated checkpoint through ckptdb), or "
                "ckptdb.FileCheckpointManager(gang=...) with save_state() of DTensor state dicts in your own loop"
            )

    ns = SimpleNamespace(CatalogCheckpoint=CatalogCheckpoint, CatalogCheckpointIO=CatalogCheckpointIO, package=package)
    _built[package] = ns
    return ns


__all__ = ["LAYOUT", "build", "default_policy", "plain"]
