"""The model loader: a run's model weights for evaluation or serving, chosen by the catalog.

No trainer, optimizer or process group is involved: the catalog picks the checkpoint (the
newest, the best by a metric, a pinned label or a step), the model file is verified against its
recorded size and digest, and only the model entry of ``model.pt`` is read (weights-only).

Example:
    >>> state_dict, card = load_model("checkpoints/", select="best", metric="valid_loss", lower_better=True)
    >>> model.load_state_dict(state_dict)
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptdb import _proc, validation
from ckptdb.catalog import Catalog, CheckpointInfo, RunInfo, ShardInfo
from ckptdb.catalog.models import State
from ckptdb.catalog.session import is_sql_url, masked, sqlite_url
from ckptdb.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointNotFoundError,
    InvalidArgumentError,
    UnsupportedCheckpointError,
)
from ckptdb.runstore import is_object_run, run_store
from ckptdb.storage import layout
from ckptdb.storage.location import LocalLocation, ObjectLocation, parse_location, require_shared_catalog, url_scheme
from ckptdb.storage.reader import load_torch, load_torch_checked
from ckptdb.storage.writer import FileRecord

log = logging.getLogger("ckptdb.loader")

# fairseq2 0.5+ writes each rank's model shard here; a single shard is the whole model.
_HEAD_SINGLE_SHARD = "model/pp_00/tp_00/sdp_00.pt"


@dataclass(frozen=True, slots=True)
class Selected:
    """The checkpoint ``load_model`` picked, and the run it belongs to."""

    run: RunInfo
    checkpoint: CheckpointInfo
    model_file: ShardInfo

    @property
    def path(self) -> Path:
        """The model file (validated: inside its step directory; else CheckpointCorruptError)."""
        c = self.checkpoint
        return layout.shard_path(
            layout.step_path(Path(self.run.checkpoint_dir), c.step_nr, c.directory), self.model_file.path, c.step_nr
        )


def _open(source: str | Path, run: str | None) -> tuple[Catalog, RunInfo]:
    from ckptdb.manager import default_run_name

    text = str(source)
    if "://" in text and url_scheme(text) not in ("file", "s3") and is_sql_url(text):  # a catalog URL
        catalog = Catalog(text, create=False)
        if run is None:
            only = catalog.only_run()
            if only is None:
                raise InvalidArgumentError(f"catalog {masked(text)} holds several runs (or none): pass run=")
            return catalog, only
        return catalog, catalog.get_run(run)
    loc = parse_location(text, what="source")
    if isinstance(loc, ObjectLocation):  # the shared catalog names it; no catalog lives in a bucket
        require_shared_catalog(loc, os.environ.get("CKPTDB_URL"))
        catalog = Catalog(os.environ["CKPTDB_URL"], create=False)
        return catalog, catalog.get_run(run if run is not None else default_run_name(loc.url))
    assert isinstance(loc, LocalLocation)
    d = loc.path
    if not d.is_dir():
        raise CheckpointNotFoundError(f"{str(d)!r} is not a checkpoint directory")
    url = os.environ.get("CKPTDB_URL") or sqlite_url(d / layout.CATALOG_FILE)
    if url.startswith("sqlite") and not (d / layout.CATALOG_FILE).exists():
        raise CheckpointNotFoundError(
            f"{str(d)!r} has no ckptdb catalog ({layout.CATALOG_FILE}); adopt it first with `ckptdb import {d}`"
        )
    catalog = Catalog(url, create=False)
    return catalog, catalog.get_run(run if run is not None else default_run_name(d))


def _model_file(info: CheckpointInfo, shards: list[ShardInfo]) -> ShardInfo:
    by_path = {s.path: s for s in shards}
    models = sorted(s.path for s in shards if s.kind == "model")
    if layout.model_file() in by_path:
        return by_path[layout.model_file()]
    if models == [_HEAD_SINGLE_SHARD]:
        return by_path[_HEAD_SINGLE_SHARD]
    if models:
        raise UnsupportedCheckpointError(
            f"step {info.step_nr}: the model is saved in {len(models)} shards ({', '.join(models[:4])}"
            f"{', ...' if len(models) > 4 else ''}); consolidating sharded models is not supported yet: "
            "save with save_consolidated_fsdp_model() or load it with the trainer's process group"
        )
    raise CheckpointNotFoundError(f"step {info.step_nr} has no model file", step_nr=info.step_nr)


def select_checkpoint(
    catalog: Catalog,
    run: RunInfo,
    select: str | int = "last",
    *,
    metric: str = "score",
    lower_better: bool = False,
) -> tuple[CheckpointInfo, ShardInfo]:
    """The catalog's answer to "which checkpoint": ``last``, ``best`` (by ``metric``), a pin label or a step."""
    step: int | None
    if isinstance(select, int) and not isinstance(select, bool):
        step = validation.step_nr(select)
    elif select == "last":
        found = catalog.newest_committed(run.id)
        if found is None:
            raise CheckpointNotFoundError(f"run {run.name!r} has no committed checkpoint")
        step = found.step_nr
    elif select == "best":
        ranked = catalog.ranked_by_score(run.id, validation.name(metric, "metric"), lower_better=lower_better)
        if not ranked:
            raise CheckpointNotFoundError(
                f"run {run.name!r} has no committed checkpoint with a finite {metric!r} score"
            )
        step = ranked[0][0]
    elif isinstance(select, str):
        step = catalog.pin_step(run.id, select)
        if step is None:
            raise CheckpointNotFoundError(
                f"run {run.name!r} has no pin labelled {select!r} (select is 'last', 'best', a pin label or a step)"
            )
    else:
        raise InvalidArgumentError(f"select must be 'last', 'best', a pin label or a step number, not {select!r}")

    info = catalog.live(run.id, step) or catalog.preserved_model(run.id, step)
    if info is None or info.state == State.DELETING.value:
        raise CheckpointNotFoundError(f"step {step} of run {run.name!r} has no committed checkpoint", step_nr=step)
    if info.state in (State.CORRUPT.value, State.MISSING.value):
        raise CheckpointCorruptError(
            step,
            str(Path(run.checkpoint_dir) / info.directory),
            "an intact checkpoint",
            f"state {info.state!r} in the catalog",
            missing=info.state == State.MISSING.value,
        )
    return info, _model_file(info, catalog.shards(info.id))


def locate_model(
    source: str | Path,
    *,
    run: str | None = None,
    select: str | int = "last",
    metric: str = "score",
    lower_better: bool = False,
) -> tuple[Catalog, Selected]:
    catalog, run_info = _open(source, run)
    info, model = select_checkpoint(catalog, run_info, select, metric=metric, lower_better=lower_better)
    return catalog, Selected(run_info, info, model)


def load_model(
    source: str | Path,
    *,
    run: str | None = None,
    select: str | int = "last",
    metric: str = "score",
    lower_better: bool = False,
    verify: bool = True,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Load a run's model state dict and its ``model.yaml`` metadata.

    Args:
        source: a checkpoint directory (its own SQLite catalog, or ``CKPTDB_URL``), an ``s3://`` run
            (its catalog from ``CKPTDB_URL``; the server from the AWS environment) or a catalog URL.
        run: the run's name. Default: the directory's run, or the catalog's only run.
        select: ``"last"`` (newest committed), ``"best"`` (by ``metric``), a pin label, or a step number.
        metric, lower_better: how ``"best"`` ranks (finite scores only; ties go to the later step).
        verify: check the model file's size and digest against the catalog first (a mismatch marks
            the checkpoint corrupt and raises).

    Returns:
        ``(state_dict, model_metadata)``: only the model entry, and the run's ``model.yaml`` card (or None).

    Raises:
        CheckpointNotFoundError: no such run, step, pin, or no committed / scored checkpoint.
        CheckpointCorruptError: the model file differs from the catalog.
        UnsupportedCheckpointError: the model is sharded (consolidation is not implemented yet).
    """
    catalog, sel = locate_model(source, run=run, select=select, metric=metric, lower_better=lower_better)
    m = sel.model_file
    if is_object_run(sel.run.checkpoint_dir):
        payload = _load_object_model(catalog, sel, verify=verify)
        return _model_entry(sel, payload), sel.run.model_metadata
    try:
        step_dir = layout.step_path(Path(sel.run.checkpoint_dir), sel.checkpoint.step_nr, sel.checkpoint.directory)
        rec = FileRecord(m.path, m.size_bytes, m.hash_algorithm, m.digest, trusted=sel.checkpoint.saved_by_ckptdb)
        if verify:  # one read: the digest is taken from the mapped pages
            payload = load_torch_checked(step_dir, rec, sel.checkpoint.step_nr)
        else:
            payload = load_torch(
                layout.shard_path(step_dir, m.path, sel.checkpoint.step_nr), sel.checkpoint.step_nr, mmap=True
            )
    except CheckpointCorruptError as e:
        if sel.checkpoint.state == State.COMMITTED.value:
            gone = (
                e.missing and not (Path(sel.run.checkpoint_dir) / layout.step_dir_name(sel.checkpoint.step_nr)).exists()
            )
            _mark(catalog, sel, State.MISSING if gone else State.CORRUPT, e)
        raise
    return _model_entry(sel, payload), sel.run.model_metadata


def _mark(catalog: Catalog, sel: Selected, state: State, e: CheckpointCorruptError) -> None:
    try:
        catalog.mark_damaged(sel.checkpoint.id, state, f"load_model: {e}", (_proc.hostname(), os.getpid()))
    except CheckpointError as err:
        log.warning("ckptdb: could not record damage of step %d: %s", sel.checkpoint.step_nr, err)


def _load_object_model(catalog: Catalog, sel: Selected, *, verify: bool) -> Any:
    """The model file of an ``s3://`` run: parallel ranged GETs into memory, the digest checked on the
    bytes fetched (one download), then a weights-only ``torch.load``; damage is recorded as on a local run."""
    c, m = sel.checkpoint, sel.model_file
    store = run_store(sel.run.checkpoint_dir)
    try:
        directory = store.check_directory(c.step_nr, c.directory)
        rec = FileRecord(m.path, m.size_bytes, m.hash_algorithm, m.digest, checksum=m.remote_checksum)
        if not verify:
            store.check_files(directory, [rec], c.step_nr, digest=False)  # sizes only (one HEAD)
            return store.load_torch(directory, m.path, c.step_nr)
        return store.load_torch(directory, m.path, c.step_nr, expect=rec)  # digest of the bytes fetched
    except CheckpointCorruptError as e:
        if c.state == State.COMMITTED.value:
            gone = e.missing and not store.exists(c.directory)
            _mark(catalog, sel, State.MISSING if gone else State.CORRUPT, e)
        raise


def _model_entry(sel: Selected, payload: Any) -> dict[str, Any]:
    m = sel.model_file
    if not isinstance(payload, dict):
        raise CheckpointCorruptError(sel.checkpoint.step_nr, m.path, "a dict", type(payload).__name__)
    if m.path == _HEAD_SINGLE_SHARD:
        state_dict = payload
    else:
        key = payload.get("model_key", "model")
        if key not in payload:
            raise CheckpointCorruptError(
                sel.checkpoint.step_nr, m.path, f"a {key!r} entry", ", ".join(map(str, payload))
            )
        state_dict = payload[key]
    return dict(state_dict)


__all__ = ["Selected", "load_model", "locate_model", "select_checkpoint"]
