"""Adopt an existing fairseq2-style checkpoint directory into a catalog (``ckptdb import``).

Both fairseq2 layouts are understood::

    v0.3 / v0.4                          0.5 and later (HEAD)
    checkpoint_dir/                      checkpoint_dir/
      model.yaml                           model.yaml
      step_<N>/                            scores/step_<N>.txt
        model.pt  rank_0.pt                step_<N>/
        replicated.pt  metadata.pt           model/pp_00/tp_00/sdp_00.pt
        score.txt                            optimizer/pp_00/tp_00/sdp_00.pt
      step_<N>.tmp/   (skipped)              trainer/rank_00.pt  data_reader/dp_00.pt

Every file of every ``step_<N>/`` directory is hashed and recorded as a committed checkpoint
with its shards and its score, one transaction per step. The user's files are never modified
(no ``.ckptdb_token`` is written): recovery and the manager treat a tokenless ``step_<N>``
directory as belonging to the step's live catalog row. Importing again adopts only steps the
catalog does not know yet. ``step_<N>.tmp`` directories (fairseq2's unfinished saves) and
directories written by ckptdb itself are skipped.

Example:
    >>> report = import_directory("sqlite:///ckpts/catalog.db", Path("ckpts"))
    >>> report.adopted
    [1000, 2000]
"""

from __future__ import annotations

import dataclasses
import os
import platform
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from ckptdb import __version__, _hooks, _proc, validation
from ckptdb.catalog import Catalog, ShardInfo, WriterInfo, open_existing
from ckptdb.errors import (
    CheckpointError,
    CheckpointExistsError,
    ConcurrentModificationError,
    InvalidArgumentError,
)
from ckptdb.storage import layout
from ckptdb.storage.hashing import DEFAULT_ALGORITHM, hash_file, new_hasher
from ckptdb.storage.location import LocalLocation, Location, ObjectLocation, parse_location, require_shared_catalog
from ckptdb.storage.store import open_store

_RANK_RE = re.compile(r"^(?:rank_(\d+)(?:\.\d+)?\.pt|trainer/rank_(\d+)\.pt)$")


@dataclass(frozen=True, slots=True)
class FoundStep:
    """One ``step_<N>/`` directory as found on disk (before hashing)."""

    step_nr: int
    files: list[tuple[str, int]]  # (relative path, size)
    scores: dict[str, float]
    written_at: datetime

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)


@dataclass
class ImportReport:
    run: str
    checkpoint_dir: str
    dry_run: bool
    adopted: list[int] = field(default_factory=list)  # steps recorded (or that would be, with dry_run)
    already: list[int] = field(default_factory=list)  # steps the catalog already has
    skipped: dict[str, str] = field(default_factory=dict)  # directory name -> why
    warnings: list[str] = field(default_factory=list)
    steps: list[FoundStep] = field(default_factory=list)  # details of the adopted steps
    model_metadata: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "checkpoint_dir": self.checkpoint_dir,
            "dry_run": self.dry_run,
            "adopted": self.adopted,
            "already_in_catalog": self.already,
            "skipped": self.skipped,
            "warnings": self.warnings,
            "steps": [
                {"step": s.step_nr, "files": len(s.files), "bytes": s.total_bytes, "scores": s.scores}
                for s in self.steps
            ],
            "model_metadata": self.model_metadata,
        }


def file_kind(relpath: str) -> str:
    """The shard kind ckptdb records for a fairseq2 file (model / rank / replicated / metadata / score / ...)."""
    top, _, rest = relpath.partition("/")
    name = relpath.rsplit("/", 1)[-1]
    if rest:  # HEAD layout: the top directory names the kind
        return {"trainer": "rank", "data_reader": "rank"}.get(top, top)
    if name == layout.SCORE_FILE:
        return "score"
    for stem, kind in (("model", "model"), ("replicated", "replicated"), ("rank_", "rank"), ("metadata", "metadata")):
        if name.startswith(stem):
            return kind
    return "state"


def _rank(relpath: str) -> int:
    m = _RANK_RE.match(relpath)
    return int(m.group(1) or m.group(2)) if m else 0


def _read_score(path: Path, warnings: list[str]) -> float | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    try:
        return float(text.splitlines()[0])
    except (ValueError, IndexError):  # fairseq2 v0.3 writes "None" for save_score(None)
        warnings.append(f"{path}: score {text[:40]!r} is not a number; not recorded")
        return None


def scan(checkpoint_dir: Path) -> tuple[list[FoundStep], dict[str, str], list[str]]:
    """List the adoptable step directories (pure file-system reads; nothing is hashed)."""
    steps: list[FoundStep] = []
    skipped: dict[str, str] = {}
    warnings: list[str] = []
    for entry in sorted(os.scandir(checkpoint_dir), key=lambda e: e.name):
        if not entry.is_dir(follow_symlinks=False) or not entry.name.startswith("step_"):
            continue
        step = layout.parse_step_dir(entry.name)
        if step is None:
            skipped[entry.name] = "unfinished or ckptdb work directory"
            continue
        d = Path(entry.path)
        if (d / layout.TOKEN_FILE).exists():
            skipped[entry.name] = "written by ckptdb (has a .ckptdb_token): already in some catalog"
            continue
        files: list[tuple[str, int]] = []
        newest = 0.0
        for p in sorted(d.rglob("*")):
            if p.is_symlink():
                warnings.append(f"{p}: symbolic link not adopted")
                continue
            if not p.is_file():
                continue
            st = p.stat()
            files.append((p.relative_to(d).as_posix(), st.st_size))
            newest = max(newest, st.st_mtime)
        if not files:
            skipped[entry.name] = "empty directory"
            continue
        scores: dict[str, float] = {}
        for score_path in (d / layout.SCORE_FILE, checkpoint_dir / "scores" / f"step_{step}.txt"):
            value = _read_score(score_path, warnings)
            if value is not None:
                scores["score"] = value
                break
        at = datetime.fromtimestamp(newest or d.stat().st_mtime, tz=timezone.utc)
        steps.append(FoundStep(step, files, scores, at))
    steps.sort(key=lambda s: s.step_nr)
    return steps, skipped, warnings


def _read_metadata(step_dir: Path, found: FoundStep, warnings: list[str]) -> dict[str, Any] | None:
    """fairseq2's ``metadata.pt`` as JSON for the catalog (weights-only load; anything else is skipped)."""
    from ckptdb.commit import jsonable
    from ckptdb.storage.reader import load_torch

    if not any(p == layout.METADATA_FILE for p, _ in found.files):
        return None
    try:
        data = load_torch(step_dir / layout.METADATA_FILE, found.step_nr, mmap=False)
    except CheckpointError as e:
        warnings.append(f"{step_dir / layout.METADATA_FILE}: not recorded in the catalog ({e})")
        return None
    return jsonable(data) if isinstance(data, dict) else None


def _world_size(files: list[tuple[str, int]]) -> int:
    ranks = {_rank(p) for p, _ in files if _RANK_RE.match(p)}
    return max(1, len(ranks))


def import_directory(
    url: str,
    checkpoint_dir: Path | str | Location,
    *,
    run: str | None = None,
    dry_run: bool = False,
    hash_algorithm: str = DEFAULT_ALGORITHM,
) -> ImportReport:
    """Adopt ``checkpoint_dir``'s committed fairseq2 checkpoints into the catalog at ``url``.

    Args:
        url: catalog URL (created when new, unless ``dry_run``).
        checkpoint_dir: the directory holding ``step_<N>/`` directories (and ``model.yaml``).
        run: the run's name; default: the directory's absolute path, as FileCheckpointManager names it.
        dry_run: report what would be adopted; write nothing, hash nothing.
        hash_algorithm: ``xxh3_128`` (default), ``sha256`` or ``blake3``.
    """
    from ckptdb.manager import default_run_name

    loc = parse_location(checkpoint_dir)
    if isinstance(loc, ObjectLocation):
        require_shared_catalog(loc, url)
        open_store(loc)  # the object store's importer is not wired in yet: raises
    assert isinstance(loc, LocalLocation)
    d = loc.path
    if not d.is_dir():
        raise InvalidArgumentError(f"{str(d)!r} is not a directory")
    new_hasher(hash_algorithm)
    run_name = validation.name(run if run is not None else default_run_name(d), "run")
    steps, skipped, warnings = scan(d)
    _hooks.hook("import.after_scan")
    report = ImportReport(run_name, str(d), dry_run, skipped=skipped, warnings=warnings)
    meta_path = d / layout.MODEL_METADATA_FILE
    if meta_path.is_file():
        try:
            loaded = yaml.safe_load(meta_path.read_text())
            report.model_metadata = loaded if isinstance(loaded, dict) else None
        except yaml.YAMLError as e:
            warnings.append(f"{meta_path}: not valid YAML ({e}); model metadata not recorded")

    catalog = open_existing(url) if dry_run else Catalog(url)
    known: set[int] = set()
    run_id: int | None = None
    if catalog is not None:
        if dry_run:
            try:
                info = catalog.get_run(run_name)
            except LookupError:
                info = None
            if info is not None and info.checkpoint_dir != str(d):
                raise InvalidArgumentError(
                    f"run {run_name!r} already exists with checkpoint_dir {info.checkpoint_dir!r}; pass --run"
                )
        else:
            info = catalog.ensure_run(run_name, str(d))
        if info is not None:
            run_id = info.id
            for c in catalog.checkpoints(info.id, with_scores=False):
                if c.state in ("committed", "deleting", "corrupt", "missing", "pending") or c.model_preserved:
                    known.add(c.step_nr)

    who = WriterInfo(
        host=_proc.hostname(),
        pid=os.getpid(),
        start_time=_proc.process_start_time(os.getpid()),
        ckptdb_version=__version__,
        torch_version="unknown",
        python_version=platform.python_version(),
        boot_id=_proc.boot_id(),
        pid_ns=_proc.pid_namespace(),
    )
    for found in steps:
        if found.step_nr in known:
            report.already.append(found.step_nr)
            continue
        if dry_run:
            report.adopted.append(found.step_nr)
            report.steps.append(found)
            continue
        assert catalog is not None and run_id is not None
        # the same validation loads use: what is recorded here must resolve inside step_<N>/
        step_dir = layout.step_path(d, found.step_nr, layout.step_dir_name(found.step_nr))
        shards = []
        for rel, _ in found.files:
            size, digest = hash_file(layout.shard_path(step_dir, rel, found.step_nr), hash_algorithm)
            shards.append(ShardInfo(rel, size, hash_algorithm, digest, _rank(rel), file_kind(rel)))
        try:
            user_metadata = _read_metadata(step_dir, found, report.warnings)
            _hooks.hook("import.before_adopt")
            catalog.adopt(
                run_id,
                found.step_nr,
                layout.step_dir_name(found.step_nr),
                shards,
                found.scores,
                dataclasses.replace(who, world_size=_world_size(found.files)),
                hash_algorithm=hash_algorithm,
                written_at=found.written_at,
                reason=f"imported from {d} by ckptdb import",
                user_metadata=user_metadata,
            )
        except (CheckpointExistsError, ConcurrentModificationError):  # a concurrent import got there first
            report.already.append(found.step_nr)
            continue
        report.adopted.append(found.step_nr)
        report.steps.append(found)
    if not dry_run and catalog is not None and run_id is not None and report.model_metadata is not None:
        catalog.set_model_metadata(run_id, report.model_metadata)
    return report


__all__ = ["FoundStep", "ImportReport", "file_kind", "import_directory", "scan"]
