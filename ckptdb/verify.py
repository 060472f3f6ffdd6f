"""Verify committed checkpoints against the catalog: every file's size and digest, re-hashed from disk.

``ckptdb verify`` and :func:`verify` re-read every recorded file of the selected checkpoints with the
algorithm its shard row was written with (so rows written under an older default keep verifying),
and record the outcome on the checkpoint row (``verified_at``, ``verify_result``):

=============  =============================================  ===========================
result         what was found                                 checkpoint state afterwards
=============  =============================================  ===========================
``ok``         every file present, sizes and digests match    unchanged (``committed``)
``extra``      all recorded files intact, plus files the       unchanged (loads ignore them)
               catalog does not know (reported by name)
``corrupt``    a file's size or digest differs                ``corrupt``
``missing``    files (or the whole step directory) are gone,   ``missing``
               none of the remaining ones altered
``busy``       the step is being overwritten or deleted        unchanged (not judged)
=============  =============================================  ===========================

A checkpoint already marked ``corrupt`` / ``missing`` is re-checked with ``include_damaged=True``
(CLI ``--all``); when its files match again (restored from a backup) it becomes ``committed``.
Nothing here unpickles a file: verification reads bytes only.

Example:
    >>> report = verify(Catalog(url), run="exp1")
    >>> report.ok, [r.step_nr for r in report.bad]
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

from ckptdb import _hooks, _proc
from ckptdb.catalog import Catalog, CheckpointInfo, RunInfo, ShardInfo
from ckptdb.catalog.models import State
from ckptdb.errors import CheckpointCorruptError, CheckpointDirUnavailableError
from ckptdb.runstore import is_object_run, local_dir, run_store
from ckptdb.storage import layout
from ckptdb.storage.hashing import hash_file
from ckptdb.storage.store import Store

OK = "ok"
EXTRA = "extra"
CORRUPT = "corrupt"
MISSING = "missing"
BUSY = "busy"

ProgressFn = Callable[[int], None]


@dataclass(frozen=True, slots=True)
class FileProblem:
    """One bad file. ``problem``: ``missing`` | ``size`` | ``digest`` | ``checksum`` | ``unreadable`` | ``unsafe`` |
    ``extra``. ``checksum``: the object store's full-object checksum differs from the one recorded at the upload.

    ``unsafe``: the catalog's path leads outside the step directory (never followed).
    """

    path: str  # relative to the step directory
    problem: str
    expected: str | None = None  # e.g. "xxh3_128:<hex>" or "1234 bytes"
    actual: str | None = None

    def describe(self) -> str:
        if self.problem == "extra":
            return f"{self.path}: not in the catalog (added behind its back)"
        if self.problem == "missing":
            return f"{self.path}: missing (expected {self.expected})"
        if self.problem == "unsafe":
            return f"{self.path}: unsafe path in the catalog: expected {self.expected}, found {self.actual}"
        return f"{self.path}: {self.problem} mismatch: expected {self.expected}, actual {self.actual}"


@dataclass(frozen=True, slots=True)
class CheckpointResult:
    """The outcome of verifying one checkpoint."""

    run: str
    step_nr: int
    checkpoint_id: int
    directory: str
    state_before: str
    state_after: str
    result: str
    files_checked: int
    bytes_hashed: int
    problems: tuple[FileProblem, ...] = ()
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.result in (OK, BUSY)

    def as_dict(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "step": self.step_nr,
            "directory": self.directory,
            "state_before": self.state_before,
            "state": self.state_after,
            "result": self.result,
            "files_checked": self.files_checked,
            "bytes_hashed": self.bytes_hashed,
            "problems": [
                {"path": p.path, "problem": p.problem, "expected": p.expected, "actual": p.actual}
                for p in self.problems
            ],
            "note": self.note,
        }


@dataclass
class VerifyReport:
    results: list[CheckpointResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    @property
    def bad(self) -> list[CheckpointResult]:
        return [r for r in self.results if not r.ok]


class ProgressBar(Protocol):
    """What :func:`verify` draws progress on: ``set_label()`` per checkpoint, ``bar(n)`` per n bytes read."""

    def set_label(self, label: str) -> None: ...
    def __call__(self, n: int) -> None: ...
    def close(self) -> None: ...


class Progress:
    """A one-line progress bar on a stream (stderr), redrawn at most every 1 % of the work."""

    def __init__(self, total_bytes: int, stream: IO[str] | None = None, *, width: int = 30) -> None:
        self.total = max(total_bytes, 1)
        self.done = 0
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.label = ""
        self._last = -1

    def set_label(self, label: str) -> None:
        self.label = label
        self._draw(force=True)

    def __call__(self, n: int) -> None:
        self.done += n
        self._draw()

    def _draw(self, *, force: bool = False) -> None:
        pct = min(100, self.done * 100 // self.total)
        if pct == self._last and not force:
            return
        self._last = pct
        fill = pct * self.width // 100
        gib = 1 << 30
        self.stream.write(
            f"\rverify [{'#' * fill}{'.' * (self.width - fill)}] {pct:3d}% "
            f"{self.done / gib:.2f}/{self.total / gib:.2f} GiB {self.label[:40]:<40}"
        )
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


def hash_with_progress(path: Path, algorithm: str, progress: ProgressFn | None = None) -> tuple[int, str]:
    """Read ``path`` once: (size in bytes, hex digest), reporting bytes read to ``progress``."""
    return hash_file(path, algorithm, progress)


def check_files(
    step_dir: Path,
    shards: Iterable[ShardInfo],
    *,
    digest: bool = True,
    progress: ProgressFn | None = None,
) -> tuple[list[FileProblem], int, int]:
    """Compare the files under ``step_dir`` with their shard rows (no catalog access, no unpickling).

    Returns (problems, files checked, bytes hashed). Files present on disk but not in ``shards``
    come back as ``extra`` problems.
    """
    problems: list[FileProblem] = []
    checked = hashed = 0
    known = {layout.TOKEN_FILE}
    for s in shards:
        known.add(s.path)
        checked += 1
        try:
            path = layout.shard_path(step_dir, s.path, 0)
        except CheckpointCorruptError as e:
            problems.append(FileProblem(s.path, "unsafe", "a path inside the step directory", e.actual))
            continue
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            problems.append(FileProblem(s.path, "missing", f"{s.size_bytes} bytes", None))
            continue
        except OSError as e:
            problems.append(FileProblem(s.path, "unreadable", f"{s.size_bytes} bytes", str(e)))
            continue
        if size != s.size_bytes:
            problems.append(FileProblem(s.path, "size", f"{s.size_bytes} bytes", f"{size} bytes"))
            if progress is not None:
                progress(s.size_bytes)
            continue
        if not digest:
            continue
        try:
            _, actual = hash_with_progress(path, s.hash_algorithm, progress)
        except OSError as e:
            problems.append(FileProblem(s.path, "unreadable", f"{s.hash_algorithm}:{s.digest}", str(e)))
            continue
        hashed += size
        if actual != s.digest:
            problems.append(
                FileProblem(s.path, "digest", f"{s.hash_algorithm}:{s.digest}", f"{s.hash_algorithm}:{actual}")
            )
    if step_dir.is_dir():
        for p in sorted(step_dir.rglob("*")):
            rel = p.relative_to(step_dir).as_posix()
            if p.is_symlink() and rel not in known:  # never followed
                problems.append(FileProblem(rel, "extra", None, f"a symbolic link to {os.readlink(p)!r}"))
            elif p.is_file() and rel not in known:
                problems.append(FileProblem(rel, "extra", None, f"{p.stat().st_size} bytes"))
    return problems, checked, hashed


def check_object_files(
    store: Any,
    directory: str,
    shards: Iterable[ShardInfo],
    *,
    digest: bool = True,
    remote_checksum: bool = False,
    progress: ProgressFn | None = None,
) -> tuple[list[FileProblem], int, int, int]:
    """:func:`check_files` for a step on an object store (``store``: an ``ObjectStore``).

    One HEAD per object gives its size and the server's full-object checksum, compared with the shard
    row's ``size_bytes`` and ``remote_checksum``. With ``digest`` the object is then streamed through
    the row's hash (parallel ranged GETs, no temporary file) -- except with ``remote_checksum``, where
    a matching server checksum stands for the bytes and nothing is downloaded; objects without a
    recorded or a server checksum are re-hashed. Objects under the step's prefix that the catalog
    does not know come back as ``extra``.

    Returns (problems, objects checked, bytes hashed, objects judged by the server's checksum alone).
    """
    problems: list[FileProblem] = []
    checked = hashed = by_checksum = 0
    known: set[str] = set()
    for s in shards:
        known.add(s.path)
        checked += 1
        try:
            layout.check_relpath(s.path, 0)
        except CheckpointCorruptError as e:
            problems.append(FileProblem(s.path, "unsafe", "a path inside the step directory", e.actual))
            continue
        meta = store.stat(directory, s.path)  # a failed request (after retries) raises: never judged as damage
        if meta is None:
            problems.append(FileProblem(s.path, "missing", f"{s.size_bytes} bytes", None))
            continue
        if meta.size != s.size_bytes:
            problems.append(FileProblem(s.path, "size", f"{s.size_bytes} bytes", f"{meta.size} bytes"))
            if progress is not None:
                progress(s.size_bytes)
            continue
        if s.remote_checksum and meta.checksum and s.remote_checksum != meta.checksum:
            problems.append(FileProblem(s.path, "checksum", s.remote_checksum, f"{meta.checksum} (the server's)"))
            if progress is not None:
                progress(s.size_bytes)
            continue
        if not digest:
            continue
        if remote_checksum and s.remote_checksum and meta.checksum:
            by_checksum += 1
            if progress is not None:
                progress(s.size_bytes)
            continue
        try:
            _, actual = store.hash_file(directory, s.path, s.hash_algorithm, progress)
        except FileNotFoundError:  # deleted between the HEAD and the GET
            problems.append(FileProblem(s.path, "missing", f"{s.size_bytes} bytes", None))
            continue
        hashed += s.size_bytes
        if actual != s.digest:
            problems.append(
                FileProblem(s.path, "digest", f"{s.hash_algorithm}:{s.digest}", f"{s.hash_algorithm}:{actual}")
            )
    for rel, size in sorted(store.list_files(directory).items()):
        if rel not in known and rel != layout.TOKEN_FILE:
            problems.append(FileProblem(rel, "extra", None, f"{size} bytes"))
    return problems, checked, hashed, by_checksum


def classify(problems: Iterable[FileProblem]) -> str:
    """``corrupt`` beats ``missing`` beats ``extra`` beats ``ok``."""
    kinds = {p.problem for p in problems}
    if kinds & {"size", "digest", "checksum", "unreadable", "unsafe"}:
        return CORRUPT
    if "missing" in kinds:
        return MISSING
    if "extra" in kinds:
        return EXTRA
    return OK


def select(
    catalog: Catalog,
    *,
    run: str | None = None,
    step_nr: int | None = None,
    include_damaged: bool = False,
) -> list[tuple[RunInfo, CheckpointInfo]]:
    """The checkpoints to verify: committed ones (plus corrupt / missing with ``include_damaged``)."""
    states = [State.COMMITTED.value]
    if include_damaged:
        states += [State.CORRUPT.value, State.MISSING.value]
    runs = [catalog.get_run(run)] if run is not None else [catalog.get_run(r["run"]) for r in catalog.list_runs()]
    out = []
    for r in runs:
        for c in catalog.checkpoints(r.id, states=states, step_nr=step_nr, with_scores=False):
            out.append((r, c))
    return out


def _busy(catalog: Catalog, run: RunInfo, info: CheckpointInfo) -> str | None:
    """Why ``info`` must not be judged now (an overwrite or a delete is under way), or None."""
    now = catalog.live(run.id, info.step_nr)
    if now is None or now.id != info.id:
        return "replaced or deleted during verification"
    if now.state == State.DELETING.value:
        return "being deleted"
    from ckptdb.recovery import set_aside_copy

    local = local_dir(run.checkpoint_dir)  # nothing is ever set aside on an object store
    aside = set_aside_copy(local, now) if local is not None else None
    if aside is not None:  # never damage: an overwrite set the copy aside and did not finish
        return f"its copy is set aside in {aside.name} (the next open or `ckptdb gc` moves it back)"
    pending = [c for c in catalog.in_states(run.id, [State.PENDING]) if c.step_nr == info.step_nr]
    if pending:
        return "being overwritten (a pending checkpoint of the same step exists)"
    return None


def verify_one(
    catalog: Catalog,
    run: RunInfo,
    info: CheckpointInfo,
    *,
    digest: bool = True,
    record: bool = True,
    progress: ProgressFn | None = None,
    who: tuple[str, int] | None = None,
    remote_checksum: bool = False,
    store: Store | None = None,
) -> CheckpointResult:
    """Verify one checkpoint and record the outcome in the catalog (``record=False``: only report).

    ``remote_checksum``: on an object store, trust a matching server checksum instead of downloading
    (see :func:`check_object_files`). ``store``: the run's store, when the caller has it open.
    """
    shards = catalog.shards(info.id)
    note = ""
    if is_object_run(run.checkpoint_dir):
        store = store if store is not None else run_store(run.checkpoint_dir)
        try:
            directory = store.check_directory(info.step_nr, info.directory)
        except CheckpointCorruptError as e:
            step_dir_s = f"{store.url}/{info.directory}"
            problems, checked, hashed = [FileProblem(info.directory, "unsafe", e.expected, e.actual)], 0, 0
        else:
            step_dir_s = store.describe(directory)
            problems, checked, hashed, trusted = check_object_files(
                store, directory, shards, digest=digest, remote_checksum=remote_checksum, progress=progress
            )
            if trusted:
                note = f"{trusted} object(s) judged by the server's checksum, not downloaded"
        result = classify(problems)
        _hooks.hook("verify.after_hash")
        return _record(catalog, run, info, step_dir_s, result, problems, checked, hashed, record, who, note)
    if remote_checksum:
        note = "a local run has no server checksums: every file was re-hashed"
    try:
        step_dir = layout.step_path(Path(run.checkpoint_dir), info.step_nr, info.directory)
    except CheckpointCorruptError as e:  # the row's directory leads elsewhere: judged without a look
        step_dir = Path(run.checkpoint_dir) / info.directory
        problems, checked, hashed = [FileProblem(info.directory, "unsafe", e.expected, e.actual)], 0, 0
        result = CORRUPT
    else:
        problems, checked, hashed = check_files(step_dir, shards, digest=digest, progress=progress)
        result = classify(problems)
        _hooks.hook("verify.after_hash")
        if not step_dir.exists() and shards:
            result = MISSING
    return _record(catalog, run, info, str(step_dir), result, problems, checked, hashed, record, who, note)


def _record(
    catalog: Catalog,
    run: RunInfo,
    info: CheckpointInfo,
    step_dir: str,
    result: str,
    problems: list[FileProblem],
    checked: int,
    hashed: int,
    record: bool,
    who: tuple[str, int] | None,
    note: str,
) -> CheckpointResult:
    """Judge ``result`` (never while an overwrite or delete is under way) and record it on the row."""
    state_after = info.state
    if result in (CORRUPT, MISSING):
        reason = _busy(catalog, run, info)
        if reason is not None:
            st = info.state
            return CheckpointResult(run.name, info.step_nr, info.id, step_dir, st, st, BUSY, 0, 0, (), reason)
    if record:
        who = who or (_proc.hostname(), os.getpid())
        if result in (CORRUPT, MISSING):
            bad = "; ".join(p.describe() for p in problems if p.problem != "extra")
            if catalog.mark_damaged(info.id, State(result), f"verify: {bad}"[:2000], who):
                state_after = result
            else:
                note = "changed by another process; not marked"
        else:
            if info.state != State.COMMITTED.value:
                if catalog.mark_intact(info.id, "verify: every file matches the catalog again", who):
                    state_after = State.COMMITTED.value
            catalog.record_verified(info.id, result)
    return CheckpointResult(
        run.name, info.step_nr, info.id, step_dir, info.state, state_after, result, checked, hashed,
        tuple(problems), note,
    )  # fmt: skip


def verify(
    catalog: Catalog,
    *,
    run: str | None = None,
    step_nr: int | None = None,
    include_damaged: bool = False,
    digest: bool = True,
    record: bool = True,
    progress_stream: IO[str] | None = None,
    force: bool = False,
    progress: Callable[[int], ProgressBar] | None = None,
    remote_checksum: bool = False,
) -> VerifyReport:
    """Verify the selected checkpoints (every run's committed ones by default).

    Args:
        catalog: the catalog to check against (and record results in).
        run: only this run (by name).
        step_nr: only this step.
        include_damaged: also re-check checkpoints already marked ``corrupt`` / ``missing``.
        digest: re-hash file contents (``False``: sizes only).
        record: write ``verified_at`` / ``verify_result`` and state changes to the catalog.
        progress_stream: draw a progress bar here (e.g. ``sys.stderr``); None: no bar.
        force: judge a run even when its directory is absent or holds none of its committed
            checkpoints (by default that refuses: it is far more often an unmounted filesystem
            than every checkpoint lost).
        progress: makes the progress bar, given the total bytes to read (e.g. the CLI's rich bar);
            takes precedence over ``progress_stream``.
        remote_checksum: on ``s3://`` runs, compare each object's full-object checksum kept by the
            server (one HEAD) with the one recorded at the upload, and download only the objects for
            which either is absent; local runs are re-hashed as without it (they have no server checksum).

    Raises:
        CheckpointDirUnavailableError: a selected run's directory is absent or holds none of its
            committed checkpoints (and not ``force``); nothing was changed.
    """
    chosen = select(catalog, run=run, step_nr=step_nr, include_damaged=include_damaged)
    stores: dict[int, Store] = {}
    for r in {r.id: r for r, _ in chosen}.values():
        if is_object_run(r.checkpoint_dir):
            stores[r.id] = run_store(r.checkpoint_dir)
        if not force:
            require_directory(catalog, r, stores.get(r.id) or Path(r.checkpoint_dir))
    bar: ProgressBar | None = None
    total = sum(c.total_bytes or 0 for _, c in chosen)
    if progress is not None:
        bar = progress(total)
    elif progress_stream is not None:
        bar = Progress(total, progress_stream)
    report = VerifyReport()
    try:
        for r, c in chosen:
            if bar is not None:
                bar.set_label(f"{r.name[-24:]} step {c.step_nr}")
            report.results.append(
                verify_one(
                    catalog,
                    r,
                    c,
                    digest=digest,
                    record=record,
                    progress=bar,
                    remote_checksum=remote_checksum,
                    store=stores.get(r.id),
                )
            )
    finally:
        if bar is not None:
            bar.close()
    return report


def directory_unavailable(catalog: Catalog, run: RunInfo, checkpoint_dir: Path | Store) -> str | None:
    """Why ``checkpoint_dir`` cannot be judged now, or None.

    When the run has committed checkpoints but its directory is absent, or holds none of them
    (neither ``step_<N>`` nor a ``step_<N>.old-*`` copy of any committed step), the likeliest cause
    is an unmounted filesystem (an empty mount point), not the loss of every checkpoint: nothing
    may be marked ``missing`` on that evidence.
    """
    rows = catalog.in_states(run.id, [State.COMMITTED])
    committed = {c.step_nr for c in rows}
    directories = {c.directory for c in rows}  # `step_<N>`, or `checkpoint-<N>` for HF Trainer runs
    if not committed:
        return None
    if isinstance(checkpoint_dir, Store):
        if checkpoint_dir.local_root is None:
            return _prefix_unavailable(run, checkpoint_dir, committed, directories)
        checkpoint_dir = checkpoint_dir.local_root
    what = f"run {run.name!r}: the catalog has {len(committed)} committed checkpoint(s), but {str(checkpoint_dir)!r}"
    if not checkpoint_dir.is_dir():
        return f"{what} does not exist (not mounted?)"
    try:
        names = os.listdir(checkpoint_dir)
    except OSError as e:
        return f"{what} cannot be listed ({e})"
    for name in names:
        if name in directories:
            return None
        step = layout.parse_step_dir(name)
        if step is None:
            wd = layout.parse_work_dir(name)
            step = wd.step_nr if wd is not None and wd.kind == "old" else None
        if step in committed:
            return None
    return f"{what} holds none of them (an empty mount point?)"


def _prefix_unavailable(run: RunInfo, store: Store, committed: set[int], directories: set[str]) -> str | None:
    """:func:`directory_unavailable` on an object store: the bucket must answer (a missing bucket or
    wrong credentials raise ``ObjectStoreError`` naming them), and the prefix must hold at least one
    committed checkpoint's objects (else: a wrong endpoint, bucket or prefix far more often than loss)."""
    store.ensure_root()
    names = set(store.list_entries())
    if names & directories:
        return None
    return (
        f"run {run.name!r}: the catalog has {len(committed)} committed checkpoint(s), but {store.url} "
        "holds none of them (another endpoint or account? check AWS_ENDPOINT_URL / the profile)"
    )


def require_directory(catalog: Catalog, run: RunInfo, checkpoint_dir: Path | Store) -> None:
    """Raise :class:`CheckpointDirUnavailableError` when :func:`directory_unavailable` says so."""
    why = directory_unavailable(catalog, run, checkpoint_dir)
    if why is not None:
        raise CheckpointDirUnavailableError(
            f"{why}; refusing to judge its files (nothing was changed): mount it or restore it, "
            "or pass --force if every checkpoint is really gone",
            run=run.name,
            checkpoint_dir=str(checkpoint_dir.url if isinstance(checkpoint_dir, Store) else checkpoint_dir),
        )


def intact_sizes(checkpoint_dir: Path, info: CheckpointInfo, shards: Iterable[ShardInfo]) -> list[FileProblem]:
    """The cheap check (one ``stat`` per file): size problems and missing files, no hashing."""
    try:
        step_dir = layout.step_path(checkpoint_dir, info.step_nr, info.directory)
    except CheckpointCorruptError as e:
        return [FileProblem(info.directory, "unsafe", e.expected, e.actual)]
    problems, _, _ = check_files(step_dir, shards, digest=False)
    return [p for p in problems if p.problem != "extra"]


def mark_damaged_by_size(
    catalog: Catalog, run: RunInfo, checkpoint_dir: Path, steps: Iterable[int], who: tuple[str, int]
) -> list[int]:
    """Stat the files of the committed ``steps`` (no hashing); mark those with missing or resized files.

    Retention calls this on the checkpoints it is about to keep, so a checkpoint damaged behind the
    catalog's back is never counted as one of the kept "last N" / "best N". Returns the steps marked.
    """
    marked: list[int] = []
    if directory_unavailable(catalog, run, checkpoint_dir) is not None:
        return marked  # unmounted or emptied: nothing to judge by
    for step in steps:
        info = catalog.live(run.id, step)
        if info is None or info.state != State.COMMITTED.value:
            continue
        problems = intact_sizes(checkpoint_dir, info, catalog.shards(info.id))
        if not problems or _busy(catalog, run, info) is not None:
            continue
        state = State(classify(problems))
        bad = "; ".join(p.describe() for p in problems)
        if catalog.mark_damaged(info.id, state, f"retention size check: {bad}"[:2000], who):
            marked.append(step)
    return marked


__all__ = [
    "CheckpointResult",
    "FileProblem",
    "Progress",
    "VerifyReport",
    "check_files",
    "check_object_files",
    "classify",
    "directory_unavailable",
    "intact_sizes",
    "mark_damaged_by_size",
    "require_directory",
    "select",
    "verify",
    "verify_one",
]
