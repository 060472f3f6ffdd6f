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
from typing import TYPE_CHECKING, Any

import yaml

from ckptdb import __version__, _hooks, _proc, validation
from ckptdb.catalog import Catalog, ShardInfo, WriterInfo, open_existing
from ckptdb.catalog.values import IMPORTED_TORCH_VERSION
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

if TYPE_CHECKING:
    from ckptdb.storage.objectstore import ObjectStore

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


def scan_objects(store: ObjectStore) -> tuple[list[FoundStep], dict[str, str], list[str]]:
    """:func:`scan` for a fairseq2 directory on an object store (one flat listing; nothing is hashed).

    fairseq2 writes ``step_<N>/`` objects in place there, or "renames" ``step_<N>.tmp/`` to it by copy
    and delete; each object is whole (a PUT is atomic), but a step may lack objects when its writer
    died. Skipped: a step whose ``step_<N>.tmp/`` still holds objects (the move is not finished), a
    step with a multipart upload in progress under it, and a step whose object names are a strict
    subset of what most steps hold (with a single step nothing is skipped on that last ground).
    """
    root = store.location.prefix + "/" if store.location.prefix else ""
    by_dir: dict[str, list[tuple[str, int]]] = {}
    scores_txt: dict[int, str] = {}
    for key, size in store.client.list_objects(store.bucket, root):
        rest = key[len(root) :]
        top, _, rel = rest.partition("/")
        if top == "scores" and rel.startswith("step_") and rel.endswith(".txt"):
            step = layout.parse_step_dir(rel[: -len(".txt")])
            if step is not None:
                scores_txt[step] = key
        if rel and top.startswith("step_"):
            by_dir.setdefault(top, []).append((rel, size))
    steps: list[FoundStep] = []
    skipped: dict[str, str] = {}
    warnings: list[str] = []
    uploading = {k[len(root) :].split("/", 1)[0] for k in store.client.list_uploads(store.bucket, root)}
    for name, files in sorted(by_dir.items()):
        step = layout.parse_step_dir(name)
        if step is None:
            skipped[name] = "unfinished or ckptdb work directory"
            continue
        if f"{name}.tmp" in by_dir:  # fairseq2's "rename" on S3 is copy + delete: not finished
            skipped[name] = f"{name}.tmp/ still holds objects: its move to {name}/ (copy + delete) is not finished"
            continue
        if name in uploading:
            skipped[name] = "a multipart upload under it is still in progress"
            continue
        if any(rel == layout.TOKEN_FILE for rel, _ in files):
            skipped[name] = "written by ckptdb (has a .ckptdb_token): already in some catalog"
            continue
        scores: dict[str, float] = {}
        score_key = store.key(name, layout.SCORE_FILE) if any(r == layout.SCORE_FILE for r, _ in files) else None
        for obj in (score_key, scores_txt.get(step)):
            if obj is None:
                continue
            value = _parse_score(
                bytes(store.client.read_bytes(store.bucket, obj)), f"s3://{store.bucket}/{obj}", warnings
            )
            if value is not None:
                scores["score"] = value
                break
        steps.append(FoundStep(step, sorted(files), scores, datetime.now(timezone.utc)))
    shapes = [frozenset(rel for rel, _ in s.files if rel != layout.SCORE_FILE) for s in steps]  # scores optional
    if len(steps) > 1:
        common = max(set(shapes), key=shapes.count)
        kept = []
        for s, shape in zip(steps, shapes, strict=True):
            if shape < common:
                missing = sorted(common - shape)
                skipped[layout.step_dir_name(s.step_nr)] = (
                    f"incomplete: lacks {', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''} "
                    "that the other steps hold (a writer that died mid-save?)"
                )
            else:
                kept.append(s)
        steps = kept
    steps.sort(key=lambda s: s.step_nr)
    return steps, skipped, warnings


def _parse_score(data: bytes, where: str, warnings: list[str]) -> float | None:
    text = data.decode(errors="replace").strip()
    try:
        return float(text.splitlines()[0])
    except (ValueError, IndexError):
        warnings.append(f"{where}: score {text[:40]!r} is not a number; not recorded")
        return None


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
    new_hasher(hash_algorithm)
    source: _Source
    if isinstance(loc, ObjectLocation):
        require_shared_catalog(loc, url)
        source = _ObjectSource(loc)
    else:
        assert isinstance(loc, LocalLocation)
        if not loc.path.is_dir():
            raise InvalidArgumentError(f"{str(loc.path)!r} is not a directory")
        source = _LocalSource(loc.path)
    d = source.name
    run_name = validation.name(run if run is not None else default_run_name(d), "run")
    steps, skipped, warnings = source.scan()
    _hooks.hook("import.after_scan")
    report = ImportReport(run_name, d, dry_run, skipped=skipped, warnings=warnings)
    meta_text = source.model_yaml()
    if meta_text is not None:
        try:
            loaded = yaml.safe_load(meta_text)
            report.model_metadata = loaded if isinstance(loaded, dict) else None
        except yaml.YAMLError as e:
            warnings.append(f"{d}/{layout.MODEL_METADATA_FILE}: not valid YAML ({e}); model metadata not recorded")

    catalog = open_existing(url) if dry_run else Catalog(url)
    known: set[int] = set()
    run_id: int | None = None
    if catalog is not None:
        if dry_run:
            try:
                info = catalog.get_run(run_name)
            except LookupError:
                info = None
            if info is not None and info.checkpoint_dir != d:
                raise InvalidArgumentError(
                    f"run {run_name!r} already exists with checkpoint_dir {info.checkpoint_dir!r}; pass --run"
                )
        else:
            info = catalog.ensure_run(run_name, d)
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
        torch_version=IMPORTED_TORCH_VERSION,
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
        shards = source.hash_step(found, hash_algorithm)
        try:
            user_metadata = source.metadata(found, report.warnings)
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


class _Source:
    """Where the fairseq2 directory lives: a local directory or an object-store prefix."""

    name: str  # the run's checkpoint_dir in the catalog

    def scan(self) -> tuple[list[FoundStep], dict[str, str], list[str]]:
        raise NotImplementedError

    def model_yaml(self) -> str | None:
        raise NotImplementedError

    def hash_step(self, found: FoundStep, algorithm: str) -> list[ShardInfo]:
        raise NotImplementedError

    def metadata(self, found: FoundStep, warnings: list[str]) -> dict[str, Any] | None:
        raise NotImplementedError


class _LocalSource(_Source):
    def __init__(self, d: Path) -> None:
        self.d = d
        self.name = str(d)

    def scan(self) -> tuple[list[FoundStep], dict[str, str], list[str]]:
        return scan(self.d)

    def model_yaml(self) -> str | None:
        p = self.d / layout.MODEL_METADATA_FILE
        return p.read_text() if p.is_file() else None

    def _step_dir(self, found: FoundStep) -> Path:
        # the same validation loads use: what is recorded here must resolve inside step_<N>/
        return layout.step_path(self.d, found.step_nr, layout.step_dir_name(found.step_nr))

    def hash_step(self, found: FoundStep, algorithm: str) -> list[ShardInfo]:
        step_dir = self._step_dir(found)
        shards = []
        for rel, _ in found.files:
            size, digest = hash_file(layout.shard_path(step_dir, rel, found.step_nr), algorithm)
            shards.append(ShardInfo(rel, size, algorithm, digest, _rank(rel), file_kind(rel)))
        return shards

    def metadata(self, found: FoundStep, warnings: list[str]) -> dict[str, Any] | None:
        return _read_metadata(self._step_dir(found), found, warnings)


class _ObjectSource(_Source):
    """A fairseq2 directory under ``s3://bucket/prefix``: every object streamed through the hash (parallel
    ranged GETs, no temporary file); the server's full-object checksum is recorded when it keeps one."""

    def __init__(self, loc: ObjectLocation) -> None:
        store = open_store(loc, object_store=True)
        from ckptdb.storage.objectstore import ObjectStore

        assert isinstance(store, ObjectStore)
        store.ensure_root()  # a missing bucket or wrong credentials: a clear error before anything else
        self.store = store
        self.name = store.url

    def scan(self) -> tuple[list[FoundStep], dict[str, str], list[str]]:
        return scan_objects(self.store)

    def model_yaml(self) -> str | None:
        key = self.store.location.key(layout.MODEL_METADATA_FILE)
        if self.store.client.head(self.store.bucket, key) is None:
            return None
        return bytes(self.store.client.read_bytes(self.store.bucket, key)).decode(errors="replace")

    def hash_step(self, found: FoundStep, algorithm: str) -> list[ShardInfo]:
        name = layout.step_dir_name(found.step_nr)
        shards = []
        for rel, _ in found.files:
            layout.check_relpath(rel, found.step_nr)
            meta = self.store.stat(name, rel)
            size, digest = self.store.hash_file(name, rel, algorithm)
            checksum = meta.checksum if meta is not None and meta.size == size else None
            shards.append(ShardInfo(rel, size, algorithm, digest, _rank(rel), file_kind(rel), remote_checksum=checksum))
        return shards

    def metadata(self, found: FoundStep, warnings: list[str]) -> dict[str, Any] | None:
        from ckptdb.commit import jsonable

        if not any(p == layout.METADATA_FILE for p, _ in found.files):
            return None
        name = layout.step_dir_name(found.step_nr)
        try:
            data = self.store.load_torch(name, layout.METADATA_FILE, found.step_nr, mmap=False)
        except CheckpointError as e:
            warnings.append(f"{self.store.describe(name, layout.METADATA_FILE)}: not recorded in the catalog ({e})")
            return None
        return jsonable(data) if isinstance(data, dict) else None


__all__ = ["FoundStep", "ImportReport", "file_kind", "import_directory", "scan", "scan_objects"]
