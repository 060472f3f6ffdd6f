"""Hugging Face ``Trainer`` drop-in: ``CatalogCallback`` and ``last_checkpoint`` (``pip install ckptdb[hf]``).

The Trainer keeps writing its own ``output_dir/checkpoint-<N>/`` directories; the catalog
(SQLite ``output_dir/catalog.db`` by default) decides which of them exist, which is best, which are
deleted and where to resume. Protocol for one save (docs/integrations.md has the crash windows)::

    on_step_end / on_epoch_end   control.should_save: catalog row for step N 'pending'
                                 (the directory name checkpoint-N recorded on the row)
    Trainer._save_checkpoint     the Trainer writes checkpoint-N/ (model, optimizer, rng, trainer_state.json)
    on_save                      fsync + hash every file, then one transaction: 'pending' -> 'committed'
                                 with sizes, digests, the step's logged metrics as scores and the
                                 TrainingArguments and versions as metadata; pin the Trainer's best;
                                 apply retention (keep last N + best N + pins; newest never deleted)

A killed save leaves a pending row whose writer is dead: the next run (or ``ckptdb gc``) rolls it
back, and the callback removes its ``checkpoint-N`` directory when training starts.
:func:`last_checkpoint` only ever returns committed directories whose files have their recorded sizes.

Example:
    >>> from ckptdb.hf import CatalogCallback, last_checkpoint
    >>> trainer = Trainer(model=model, args=TrainingArguments(output_dir="out", save_steps=500,
    ...                   eval_strategy="steps", metric_for_best_model="eval_loss"),
    ...                   callbacks=[CatalogCallback(keep_last=2, keep_best=3)])
    >>> trainer.train(resume_from_checkpoint=last_checkpoint("out"))   # None: start fresh
"""

from __future__ import annotations

import logging
import os
import re
import secrets
from pathlib import Path
from typing import Any

import torch

from ckptdb import retention as policies
from ckptdb.catalog import CheckpointInfo, ShardInfo
from ckptdb.commit import jsonable as _jsonable
from ckptdb.errors import CheckpointError, InvalidArgumentError
from ckptdb.integrations import common
from ckptdb.manager import FileCheckpointManager
from ckptdb.recovery import hold_token, release_token
from ckptdb.storage.hashing import DEFAULT_ALGORITHM, hash_file, new_hasher
from ckptdb.storage.location import local_path
from ckptdb.storage.writer import fsync_dir, remove_tree

try:
    import transformers
    from transformers import TrainerCallback
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("ckptdb.hf needs transformers: pip install 'ckptdb[hf]'") from e

log = logging.getLogger("ckptdb.hf")

LAYOUT = "hf-trainer"  # user_metadata["layout"] of every row; directory = "checkpoint-<N>"
BEST_PIN = "hf-best"  # the pin that follows the Trainer's best checkpoint
_DIR_RE = re.compile(r"^checkpoint-(\d+)$")
_RNG_RE = re.compile(r"^rng_state_(\d+)\.pth$")


def dir_name(step_nr: int) -> str:
    """The Trainer's directory name for a step (``PREFIX_CHECKPOINT_DIR-<N>``)."""
    return f"checkpoint-{step_nr}"


def parse_dir(name: str) -> int | None:
    m = _DIR_RE.match(name)
    return int(m.group(1)) if m else None


def file_kind(relpath: str) -> str:
    """The shard kind recorded for a file the Trainer writes."""
    name = relpath.rsplit("/", 1)[-1]
    if name.startswith(("model", "pytorch_model", "adapter_model", "tf_model")):
        return "model"
    if name.startswith("optimizer"):
        return "optimizer"
    if name.startswith(("scheduler", "scaler")):
        return "scheduler"
    if name.startswith("rng_state"):
        return "rng"
    if name == "trainer_state.json":
        return "trainer_state"
    return "config" if name.endswith((".json", ".txt", ".model", ".bin")) else "state"


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _hash_tree(d: Path, algorithm: str, *, fsync: bool) -> list[ShardInfo]:
    """Every file under ``d``: fsynced (files, then directories) and hashed."""
    shards: list[ShardInfo] = []
    dirs = {d}
    for p in sorted(d.rglob("*")):
        if p.is_symlink():
            raise CheckpointError(f"{p}: symbolic links are not adopted into the catalog")
        if p.is_dir():
            dirs.add(p)
            continue
        rel = p.relative_to(d).as_posix()
        if fsync:
            _fsync_file(p)
        size, digest = hash_file(p, algorithm)
        m = _RNG_RE.match(p.name)
        shards.append(ShardInfo(rel, size, algorithm, digest, int(m.group(1)) if m else 0, file_kind(rel)))
    if fsync:
        for x in sorted(dirs, key=lambda q: len(q.parts), reverse=True):
            fsync_dir(x)
        fsync_dir(d.parent)
    return shards


def _is_distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if _is_distributed() else 1


class CatalogCallback(TrainerCallback):  # type: ignore[misc]
    """Adopts each ``checkpoint-N`` the Trainer writes as a committed catalog checkpoint; applies retention.

    Args:
        keep_last: keep the ``n`` newest checkpoints (None: no last-N rule).
        keep_best: keep the ``n`` best by ``metric`` (default ``args.metric_for_best_model``).
            With neither, nothing is deleted. The newest checkpoint, pinned ones and the Trainer's
            best (pinned as ``hf-best``) are always kept.
        metric: the score that ranks "best" (``eval_`` is prefixed like the Trainer does).
        greater_is_better: default: ``args.greater_is_better``.
        retention: a ckptdb policy used instead of keep_last / keep_best.
        catalog: SQLAlchemy URL; default ``CKPTDB_URL`` or SQLite ``output_dir/catalog.db``.
        run: the run's name (default: ``output_dir``'s absolute path).
        hash_algorithm, fsync: as in :class:`ckptdb.SaveOptions`.

    ``TrainingArguments.save_total_limit`` is turned off (with a warning, and used as ``keep_last``
    when that is not given): the Trainer's rotation deletes directories without the catalog.
    """

    def __init__(
        self,
        keep_last: int | None = None,
        keep_best: int | None = None,
        *,
        metric: str | None = None,
        greater_is_better: bool | None = None,
        retention: Any = None,
        catalog: str | None = None,
        run: str | None = None,
        hash_algorithm: str = DEFAULT_ALGORITHM,
        fsync: bool = True,
    ) -> None:
        for n, what in ((keep_last, "keep_last"), (keep_best, "keep_best")):
            if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
                raise InvalidArgumentError(f"{what} must be None or an integer >= 1, not {n!r}")
        new_hasher(hash_algorithm)
        self.keep_last = keep_last
        self.keep_best = keep_best
        self.metric = metric
        self.greater_is_better = greater_is_better
        self.retention = retention
        self.catalog_url = catalog
        self.run_name = run
        self.hash_algorithm = hash_algorithm
        self.fsync = fsync
        self.manager: FileCheckpointManager | None = None
        self.policy: Any = None
        self._pending: CheckpointInfo | None = None
        self._output_dir: Path | None = None

    # -- set-up -------------------------------------------------------------------------------

    def _policy(self, args: Any) -> Any:
        if self.retention is not None:
            return self.retention
        parts: list[Any] = []
        if self.keep_last:
            parts.append(policies.KeepLast(self.keep_last))
        if self.keep_best:
            metric = self.metric or args.metric_for_best_model
            if not metric:
                raise InvalidArgumentError(
                    "CatalogCallback(keep_best=...) needs metric= or TrainingArguments(metric_for_best_model=...)"
                )
            if not metric.startswith("eval_"):
                metric = f"eval_{metric}"
            gib = self.greater_is_better
            if gib is None:
                gib = args.greater_is_better if args.greater_is_better is not None else not metric.endswith("loss")
            parts.append(policies.KeepBest(self.keep_best, metric=metric, lower_better=not gib))
        return policies.AnyOf(*parts) if parts else None

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if args.save_total_limit:
            log.warning(
                "ckptdb: TrainingArguments(save_total_limit=%s) turned off: the Trainer's rotation deletes "
                "checkpoints behind the catalog's back; CatalogCallback applies ckptdb retention instead%s",
                args.save_total_limit,
                f" (keep_last={args.save_total_limit})" if self.keep_last is None and self.retention is None else "",
            )
            if self.keep_last is None:
                self.keep_last = int(args.save_total_limit)
            args.save_total_limit = None
        self.policy = self._policy(args)

    def _open(self, args: Any) -> FileCheckpointManager:
        if self.manager is None:
            d = local_path(args.output_dir, what="output_dir", by="CatalogCallback")
            self._output_dir = d
            self.manager = FileCheckpointManager(d, catalog=common.resolve_url(d, self.catalog_url), run=self.run_name)
            self.sweep()
        return self.manager

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.policy is None:
            self.policy = self._policy(args)
        if state.is_world_process_zero:
            self._open(args)  # recovery: roll back a killed save's row, finish deletions, sweep

    def sweep(self) -> list[str]:
        """Remove ``checkpoint-N`` directories of saves that never committed (rows this catalog began).

        A ``checkpoint-N`` the catalog has no row for at all (written before ckptdb was used) is
        left alone, with a warning: it is never returned by :func:`last_checkpoint`.
        """
        m = self.manager
        assert m is not None and self._output_dir is not None
        removed: list[str] = []
        for entry in sorted(os.scandir(self._output_dir), key=lambda e: e.name):
            step = parse_dir(entry.name)
            if step is None or not entry.is_dir(follow_symlinks=False):
                continue
            rows = [c for c in m.catalog.checkpoints(m.run.id, step_nr=step, with_scores=False)]
            if any(c.state in ("committed", "deleting", "corrupt", "missing", "pending") for c in rows):
                continue  # live (or being written by a live writer): not debris
            if any(c.directory == entry.name for c in rows):
                log.warning("ckptdb: removing %s: its save never committed", entry.path)
                remove_tree(Path(entry.path), fsync=self.fsync)
                removed.append(entry.name)
            else:
                log.warning("ckptdb: %s is not in the catalog (never resumed from); left alone", entry.path)
        return removed

    # -- saving -------------------------------------------------------------------------------

    def _begin(self, args: Any, step: int) -> CheckpointInfo:
        m = self._open(args)
        if self._pending is not None:
            if self._pending.step_nr == step:
                return self._pending
            self._abort("the Trainer did not save that step after all")
        assert self._output_dir is not None
        name = dir_name(step)
        live = m.catalog.live(m.run.id, step)
        if live is not None:  # the Trainer is about to rewrite that directory in place
            m.delete_checkpoint(step, missing_ok=True, reason="re-saved by the Trainer")
        elif (self._output_dir / name).exists() and any(
            c.directory == name for c in m.catalog.checkpoints(m.run.id, step_nr=step, with_scores=False)
        ):
            remove_tree(self._output_dir / name, fsync=self.fsync)  # a never-committed earlier save
        token = secrets.token_hex(8)
        info = m.catalog.begin(
            m.run.id,
            step,
            token,
            name,
            common.writer_info(_world_size()),
            hash_algorithm=self.hash_algorithm,
            overwrite=True,
        )
        hold_token(token, self)
        self._pending = info
        return info

    def _abort(self, reason: str) -> None:
        if self._pending is not None and self.manager is not None:
            self.manager.catalog.abort(self._pending.id, reason, common.who())
            release_token(self._pending.token)
        self._pending = None

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if control.should_save and state.is_world_process_zero:
            self._begin(args, state.global_step)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if control.should_save and state.is_world_process_zero:
            self._begin(args, state.global_step)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if _is_distributed():
            import torch.distributed as dist

            dist.barrier()  # every rank has written its files (rng_state_<rank>.pth)
        if state.is_world_process_zero:
            self.commit(args, state)

    def commit(self, args: Any, state: Any) -> CheckpointInfo | None:
        """Adopt ``checkpoint-<global_step>`` as a committed checkpoint, pin the best, apply retention."""
        step = int(state.global_step)
        info = self._begin(args, step)
        m = self.manager
        assert m is not None and self._output_dir is not None
        d = self._output_dir / info.directory
        if not d.is_dir():
            log.warning("ckptdb: %s does not exist after on_save; nothing committed", d)
            self._abort("the Trainer wrote no directory")
            return None
        try:
            shards = _hash_tree(d, self.hash_algorithm, fsync=self.fsync)
            committed = m.catalog.commit(
                info.id, shards, self._scores(state, step), self._metadata(args, state), common.who()
            )
        except BaseException:
            self._abort("adopting the Trainer's directory failed")
            raise
        release_token(info.token)
        self._pending = None
        self._pin_best(state)
        if self.policy is not None:
            m.apply_retention(self.policy)
        return committed

    @staticmethod
    def _scores(state: Any, step: int) -> dict[str, float]:
        scores: dict[str, float] = {}
        for entry in state.log_history:
            if entry.get("step") == step:
                scores.update(common.scalar_scores(entry, skip=frozenset({"step", "total_flos"})))
        if state.best_metric is not None:
            scores["best_metric"] = float(state.best_metric)
        return scores

    @staticmethod
    def _metadata(args: Any, state: Any) -> dict[str, Any]:
        import accelerate  # a dependency of the Trainer

        return _jsonable(
            {
                common.LAYOUT_KEY: LAYOUT,
                "global_step": state.global_step,
                "epoch": state.epoch,
                "best_metric": state.best_metric,
                "best_global_step": getattr(state, "best_global_step", None),
                "best_model_checkpoint": state.best_model_checkpoint,
                "versions": {
                    "transformers": transformers.__version__,
                    "accelerate": accelerate.__version__,
                    "torch": torch.__version__,
                },
                "training_args": args.to_dict(),
            }
        )

    def _pin_best(self, state: Any) -> None:
        best = getattr(state, "best_global_step", None)
        if not best and state.best_model_checkpoint:
            best = parse_dir(Path(state.best_model_checkpoint).name)
        m = self.manager
        if best and m is not None and m.catalog.live(m.run.id, int(best)) is not None:
            m.pin(int(best), BEST_PIN)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._abort("training ended before the Trainer saved that step")


def last_checkpoint(
    output_dir: str | os.PathLike[str],
    *,
    catalog: str | None = None,
    run: str | None = None,
    verify: str = "size",
) -> str | None:
    """The newest committed ``checkpoint-N`` under ``output_dir`` to resume from, or None.

    Only committed checkpoints are candidates (a save killed midway is never returned). Each
    candidate's files are checked against the catalog, sizes by default (``verify="digest"``
    re-hashes them); a damaged newest one is skipped, recorded as ``corrupt`` / ``missing``, and
    the next older one returned.

    Example:
        >>> trainer.train(resume_from_checkpoint=last_checkpoint("out"))
    """
    if verify not in ("size", "digest"):
        raise InvalidArgumentError(f"verify must be 'size' or 'digest', not {verify!r}")
    d = local_path(output_dir, what="output_dir", by="last_checkpoint")
    cat = common.open_existing(common.resolve_url(d, catalog))
    if cat is None:
        return None
    info = None
    run_info = common.find_run(cat, d, run)
    if run_info is not None:
        info = common.newest_intact(cat, run_info, d, digest=verify == "digest")
    return None if info is None else str(d / info.directory)


__all__ = ["BEST_PIN", "LAYOUT", "CatalogCallback", "dir_name", "file_kind", "last_checkpoint", "parse_dir"]
