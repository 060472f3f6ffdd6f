"""Failed syscalls below Python: fail the Nth call of each file-system syscall of each protocol.

For every protocol (save, async save, overwrite, delete, prune, gc, recovery on open, import) this
checker

1. prepares the protocol's starting state once (a template directory: checkpoint directory plus
   SQLite catalog) and restores a copy of it before every run;
2. runs the protocol once in a forked process with ``faultshim.so`` counting, to learn how many
   calls of each syscall kind the protocol makes (only calls on paths under the run's directory,
   only between the start and the end of the protocol: setup and Python's own I/O are not counted);
3. for every kind, every N up to that count, and every errno of the kind (EIO; ENOSPC for writes;
   EROFS for renames and creates), runs the protocol in a fresh forked process in which the Nth
   call fails, then (faults off) makes a later save in the same process, then
4. checks in another fresh process (no faults) that a reopened manager sees the invariants.

Invariants after each fault:

- the protocol raised a ``CheckpointError`` (subclass) whose message names the failure (the
  errno's text, or SQLite's wording for it), or it succeeded;
- the process can go on: a later save (step 9) in the same process commits;
- after a reopen: no ``pending``/``deleting``/``corrupt``/``missing`` row, no ``.tmp``/``.old-``/
  ``.trash-`` directory, every step directory is a committed row's; every committed checkpoint
  loads, digests verified, with the content of its last committed save; the resume point
  (``load_last_checkpoint(fallback=False)``) is the newest committed step; nothing committed before
  was lost unless the protocol deleted it; a failed save/overwrite did not commit and left the
  previous copy; a successful one committed its new content;
- an fsync/fdatasync failure on the checkpoint's files or directories is fatal for that checkpoint:
  when one failed before the catalog commit completed, the checkpoint is not committed (never
  retried into success).

Why an LD_PRELOAD shim rather than ``strace --inject``: strace's ``when=N`` counts per traced thread,
and a save writes its files from several threads (and an async save from a background thread), so
"the Nth write" would inject one fault per thread; ptrace also multiplies the run time. The shim
counts per process across threads, from the protocol's start (``faultshim_start``). It sees what
goes through libc's wrappers: Python's ``os`` calls, SQLite's unix VFS, ckptdb's ``sync_file_range``
(``ctypes.CDLL(None)``). ``tests/checkers/test_faultcheck.py`` cross-checks one case with
``strace --inject`` on a real single-threaded step.

Usage::

    python scripts/faultcheck/faultcheck.py                       # everything (make faultcheck)
    python scripts/faultcheck/faultcheck.py --protocols save,delete --kinds fsync,rename
    python scripts/faultcheck/faultcheck.py --quick               # a sample: first/last N of each kind

Exit status 0 when there were no violations. The last line is machine-readable JSON.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
HERE = Path(__file__).resolve().parent

KINDS = [
    "write",
    "pwrite64",
    "fsync",
    "fdatasync",
    "rename",
    "renameat",
    "renameat2",
    "unlink",
    "unlinkat",
    "mkdir",
    "mkdirat",
    "rmdir",
    "openat",
    "sync_file_range",
    "ftruncate",
]
ERRNOS: dict[str, list[int]] = {k: [errno.EIO] for k in KINDS}
for _k in ("write", "pwrite64"):
    ERRNOS[_k] = [errno.EIO, errno.ENOSPC]
for _k in ("rename", "renameat", "renameat2", "mkdir", "mkdirat", "openat"):
    ERRNOS[_k] = [errno.EIO, errno.EROFS]
PROTOCOLS = ["save", "save_large", "async_save", "overwrite", "delete", "prune", "gc", "recovery", "import"]
LATER_STEP = 9
# SQLite's words for the errnos (sqlite3_errstr of SQLITE_IOERR / SQLITE_FULL / SQLITE_READONLY / SQLITE_CANTOPEN)
SQLITE_WORDS = ("disk I/O error", "database or disk is full", "readonly database", "unable to open database file")


# -- the shim ----------------------------------------------------------------------------------


def build_shim(out_dir: Path | None = None) -> Path:
    """Compile faultshim.c (cached by source mtime) and return the .so path."""
    src = HERE / "faultshim.c"
    out_dir = out_dir or Path(tempfile.gettempdir()) / "ckptdb-faultshim"
    out_dir.mkdir(parents=True, exist_ok=True)
    so = out_dir / f"faultshim-{int(src.stat().st_mtime)}.so"
    if not so.exists():
        tmp = so.with_suffix(f".{os.getpid()}.tmp")
        subprocess.run(
            ["gcc", "-O2", "-Wall", "-shared", "-fPIC", "-o", str(tmp), str(src), "-ldl", "-lpthread"], check=True
        )
        os.replace(tmp, so)
    return so


class Shim:
    def __init__(self) -> None:
        lib = ctypes.CDLL(None)
        try:
            lib.faultshim_start  # noqa: B018
        except AttributeError as e:
            raise SystemExit("faultshim.so is not preloaded (LD_PRELOAD)") from e
        lib.faultshim_start.argtypes = [ctypes.c_char_p]
        lib.faultshim_arm.argtypes = [ctypes.c_int, ctypes.c_long, ctypes.c_int]
        lib.faultshim_arm_suffix.argtypes = [ctypes.c_int, ctypes.c_long, ctypes.c_int, ctypes.c_char_p]
        lib.faultshim_count.restype = ctypes.c_long
        lib.faultshim_seq.restype = ctypes.c_long
        lib.faultshim_fired_seq.restype = ctypes.c_long
        lib.faultshim_fired_path.restype = ctypes.c_char_p
        self.lib = lib

    def start(self, root: Path) -> None:
        self.lib.faultshim_start(os.fsencode(root))

    def arm(self, kind: str, n: int, err: int, suffix: str = "") -> None:
        """Fail the Nth call of ``kind`` (counting only paths ending with ``suffix``, when given)."""
        self.lib.faultshim_arm_suffix(KINDS.index(kind), n, err, suffix.encode())

    def stop(self) -> None:
        self.lib.faultshim_stop()
        self.lib.faultshim_disarm()

    def counts(self) -> dict[str, int]:
        return {k: int(self.lib.faultshim_count(i)) for i, k in enumerate(KINDS)}

    def seq(self) -> int:
        return int(self.lib.faultshim_seq())

    def fired(self) -> tuple[bool, int, str]:
        return (
            bool(self.lib.faultshim_fired()),
            int(self.lib.faultshim_fired_seq()),
            self.lib.faultshim_fired_path().decode(),
        )


# -- states and protocols ----------------------------------------------------------------------


LARGE = 40 << 20  # bytes of the large save: past the 32 MiB window of streamed writeback (sync_file_range)


def make_state(seed: int, large: bool = False) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(seed)
    if large:
        return {"model": {"w": torch.full((LARGE // 4,), float(seed)), "b": torch.randn(4, generator=g)}, "seed": seed}
    return {
        "model": {"w": torch.randn(4, 4, generator=g), "b": torch.randn(4, generator=g)},
        "optimizer": {"state": {0: {"m": torch.randn(4, generator=g)}}, "param_groups": [{"lr": 0.1}]},
        "seed": seed,
    }


def import_state(step: int) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(step)
    return {"model": {"w": torch.randn(4, 4, generator=g)}, "step_nr": step}


def manager(d: Path, **kw: Any) -> Any:
    from ckptdb import FileCheckpointManager

    return FileCheckpointManager(d, run="fault", **kw)


def save(m: Any, step: int, seed: int, large: bool = False, **kw: Any) -> None:
    m.begin_checkpoint(step, **kw)
    m.save_state(make_state(seed, large))
    m.save_score(float(seed))
    m.commit_checkpoint()


def _die_in_child(fn: Callable[[], None]) -> None:
    """Run fn in a forked child that ends with os._exit (a writer that died mid-protocol)."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            fn()
        except BaseException:  # noqa: BLE001 - reported, then the child ends
            traceback.print_exc()
            code = 3
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) not in (0, 7):
        raise RuntimeError(f"setup child failed ({status})")


def setup_debris(d: Path) -> None:
    """Steps 1, 2 committed; then three dead writers: a delete of step 1 claimed (row 'deleting'),
    an overwrite of step 2 dead between its two renames (step_2.old-T holds the committed copy), a
    save of step 3 dead before its commit (pending row + step_3.tmp-T)."""
    m = manager(d)
    save(m, 1, 1)
    save(m, 2, 2)
    m.close()
    from ckptdb import RecoveryOptions

    def dead_delete() -> None:
        import ckptdb.delete as mm

        def die(*a: Any, **k: Any) -> None:
            os._exit(7)

        mm.finish_delete = die  # type: ignore[attr-defined]
        manager(d, recovery_options=RecoveryOptions(on_open=False)).delete_checkpoint(1)

    def dead_overwrite() -> None:
        real = os.rename

        def rename(src: Any, dst: Any, *a: Any, **k: Any) -> None:
            if ".tmp-" in os.fspath(src) and os.path.basename(os.fspath(dst)) == "step_2":
                os._exit(7)
            real(src, dst, *a, **k)

        os.rename = rename  # type: ignore[assignment]
        m = manager(d, recovery_options=RecoveryOptions(on_open=False))
        m.begin_checkpoint(2, overwrite=True)
        m.save_state(make_state(102))
        m.commit_checkpoint()

    def dead_save() -> None:
        m = manager(d, recovery_options=RecoveryOptions(on_open=False))
        m.begin_checkpoint(3)
        m.save_state(make_state(3))
        os._exit(7)

    for fn in (dead_delete, dead_overwrite, dead_save):  # (each opens without recovery: the debris stays)
        _die_in_child(fn)
    names = sorted(p.name for p in d.iterdir())
    assert any(".old-" in n for n in names) and any(n.startswith("step_3.tmp-") for n in names), names


def setup_fairseq2(d: Path) -> None:
    import torch
    import yaml

    d.mkdir(parents=True)
    (d / "model.yaml").write_text(yaml.safe_dump({"name": "toy", "model_family": "toy"}))
    for step in (1, 2):
        s = d / f"step_{step}"
        s.mkdir()
        st = import_state(step)
        torch.save({"model": st["model"]}, s / "model.pt")
        torch.save({"step_nr": step}, s / "rank_0.pt")
        (s / "score.txt").write_text(f"{float(step)}\n")


def setup_two(d: Path, **kw: Any) -> None:
    m = manager(d, **kw)
    save(m, 1, 1)
    save(m, 2, 2)
    m.close()


class Protocol:
    """setup() builds the starting state; run() is the protocol (faults on); later() goes on."""

    name = ""
    before: dict[int, int] = {1: 1, 2: 2}  # step -> seed committed before the protocol

    def setup(self, d: Path) -> None:
        setup_two(d)

    def open(self, d: Path) -> Any:
        return manager(d)

    def run(self, m: Any, d: Path) -> None:
        raise NotImplementedError

    def later(self, m: Any, d: Path) -> None:
        if m is None:
            m = manager(d)
        save(m, LATER_STEP, LATER_STEP)
        m.close()

    def expected(self, ok: bool) -> list[dict[int, int | None]]:
        """Acceptable final {step: seed} maps (LATER_STEP added by the caller)."""
        raise NotImplementedError


class Save(Protocol):
    name = "save"

    def run(self, m: Any, d: Path) -> None:
        save(m, 3, 3)

    def expected(self, ok: bool) -> list[dict[int, int | None]]:
        return [{1: 1, 2: 2, 3: 3}] if ok else [{1: 1, 2: 2}]


class SaveLarge(Save):
    name = "save_large"

    def run(self, m: Any, d: Path) -> None:
        save(m, 3, 3, large=True)


class AsyncSave(Save):
    name = "async_save"

    def open(self, d: Path) -> Any:
        from ckptdb import SaveOptions

        return manager(d, save_options=SaveOptions(blocking=False))

    def run(self, m: Any, d: Path) -> None:
        save(m, 3, 3)
        m.wait()


class Overwrite(Protocol):
    name = "overwrite"

    def run(self, m: Any, d: Path) -> None:
        save(m, 2, 102, overwrite=True)

    def expected(self, ok: bool) -> list[dict[int, int | None]]:
        return [{1: 1, 2: 102}] if ok else [{1: 1, 2: 2}]


class Delete(Protocol):
    name = "delete"

    def run(self, m: Any, d: Path) -> None:
        m.delete_checkpoint(2)

    def expected(self, ok: bool) -> list[dict[int, int | None]]:
        return [{1: 1}] if ok else [{1: 1}, {1: 1, 2: 2}]


class Prune(Protocol):
    name = "prune"

    def run(self, m: Any, d: Path) -> None:
        # retention does not raise when removing a claimed step's files fails (documented: the step
        # stays 'deleting', a warning is logged, the next open or gc finishes it); what it returns
        # must be true: every step it says it deleted is gone
        deleted = m.keep_last_n_checkpoints(1)
        left = [s for s in deleted if (d / f"step_{s}").exists()]
        if left:
            raise AssertionError(f"keep_last_n_checkpoints returned {deleted}, but step_{left[0]} is still there")

    def expected(self, ok: bool) -> list[dict[int, int | None]]:
        return [{2: 2}] if ok else [{2: 2}, {1: 1, 2: 2}]


class Gc(Protocol):
    name = "gc"
    before = {2: 2}  # step 1's deletion was claimed: it goes

    def setup(self, d: Path) -> None:
        setup_debris(d)

    def open(self, d: Path) -> Any:
        from ckptdb.catalog.session import sqlite_url
        from ckptdb.catalog.store import Catalog

        return Catalog(sqlite_url(d / "catalog.db"))

    def run(self, m: Any, d: Path) -> None:
        from ckptdb.cleanup import gc
        from ckptdb.errors import CheckpointError

        rep = gc(m)
        if rep.errors:  # gc reports a run's failure instead of raising: surface it
            raise CheckpointError("; ".join(f"{k}: {v}" for k, v in rep.errors.items()))

    def later(self, m: Any, d: Path) -> None:
        super().later(None, d)

    def expected(self, ok: bool) -> list[dict[int, int | None]]:
        return [{2: 2}]


class Recovery(Gc):
    name = "recovery"

    def open(self, d: Path) -> Any:
        return None

    def run(self, m: Any, d: Path) -> None:
        manager(d).close()


class Import(Protocol):
    name = "import"
    before: dict[int, int] = {}

    def setup(self, d: Path) -> None:
        setup_fairseq2(d)

    def open(self, d: Path) -> Any:
        return None

    def run(self, m: Any, d: Path) -> None:
        from ckptdb.catalog.session import sqlite_url
        from ckptdb.importer import import_directory

        import_directory(sqlite_url(d / "catalog.db"), d, run="fault")

    def later(self, m: Any, d: Path) -> None:
        self.run(None, d)  # the same import again works (adopts what the failed one did not)
        super().later(None, d)

    def expected(self, ok: bool) -> list[dict[int, int | None]]:
        return [{1: 1, 2: 2}]  # after the later import: both adopted


ALL: dict[str, Protocol] = {
    p.name: p for p in (Save(), SaveLarge(), AsyncSave(), Overwrite(), Delete(), Prune(), Gc(), Recovery(), Import())
}


# -- one run -----------------------------------------------------------------------------------


def _in_child(fn: Callable[[], Any], timeout: float = 120.0) -> Any:
    """fn() in a forked child; its JSON-able result (or {'crash': traceback})."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            out = fn()
        except BaseException:  # noqa: BLE001 - reported to the parent
            out = {"crash": traceback.format_exc()}
        data = json.dumps(out).encode()
        with os.fdopen(w, "wb") as f:
            f.write(data)
        os._exit(0)
    os.close(w)
    chunks = []
    deadline = time.monotonic() + timeout
    with os.fdopen(r, "rb") as f:
        import select

        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return {"crash": f"timed out after {timeout}s (hang)"}
            ready, _, _ = select.select([f], [], [], left)
            if not ready:
                continue
            b = os.read(f.fileno(), 1 << 20)
            if not b:
                break
            chunks.append(b)
    os.waitpid(pid, 0)
    try:
        out = json.loads(b"".join(chunks) or b"null")
    except ValueError:
        return {"crash": "child wrote garbage"}
    return {"crash": "child died without a result"} if out is None else out


def faulted(proto: Protocol, work: Path, kind: str | None, n: int, err: int, suffix: str = "") -> dict[str, Any]:
    """The protocol with the Nth call of kind failing (kind None: count only; ``suffix``: count only
    paths ending so); then the later save."""
    from ckptdb.catalog import store
    from ckptdb.errors import CheckpointError

    shim = Shim()
    d = work / "ck"
    out: dict[str, Any] = {"commit_seq": None}
    in_protocol = [False]
    real_commit = store.Catalog.commit

    def commit(self: Any, *a: Any, **k: Any) -> Any:
        info = real_commit(self, *a, **k)
        if in_protocol[0] and out["commit_seq"] is None:
            out["commit_seq"] = shim.seq()
        return info

    store.Catalog.commit = commit  # type: ignore[method-assign]
    m = proto.open(d)
    if kind is not None:
        shim.arm(kind, n, err, suffix)
    shim.start(work)
    in_protocol[0] = True
    try:
        proto.run(m, d)
        out["error"] = None
    except BaseException as e:  # noqa: BLE001 (what escaped is the point)
        out["error"] = type(e).__name__
        out["is_checkpoint_error"] = isinstance(e, CheckpointError)
        out["message"] = str(e)
        out["trace"] = traceback.format_exc()[-3000:]
    finally:
        out["counts"] = shim.counts()
        out["fired"], out["fired_seq"], out["fired_path"] = shim.fired()
        shim.stop()
        in_protocol[0] = False
    if out["commit_seq"] is not None and out["commit_seq"] == 0:
        out["commit_seq"] = None
    try:
        if isinstance(m, store.Catalog):
            m = None
        proto.later(m, d)
        out["later"] = None
    except BaseException as e:  # noqa: BLE001
        out["later"] = f"{type(e).__name__}: {e}"
        out["later_trace"] = traceback.format_exc()[-3000:]
    return out


def check(proto: Protocol, work: Path, res: dict[str, Any], kind: str | None, err: int) -> list[str]:
    """The invariants after a reopen (fresh process, no faults); the list of violations."""
    from sqlalchemy import create_engine, text

    from ckptdb import LoadOptions
    from ckptdb.catalog.session import sqlite_url

    v: list[str] = []
    d = work / "ck"
    ok = res.get("error") is None
    fired = bool(res.get("fired"))
    if "crash" in res:
        return [f"faulted process crashed: {res['crash'][-800:]}"]
    if not ok:
        if not res.get("is_checkpoint_error"):
            v.append(f"{res['error']} escaped (not a CheckpointError): {res.get('message')}")
        msg = res.get("message") or ""
        words = (os.strerror(err), *SQLITE_WORDS)
        if fired and not any(w in msg for w in words):
            v.append(f"the error does not say what happened: {msg!r}")
        if not fired:
            v.append(f"failed although no fault fired: {res['error']}: {msg}")
    if res.get("later") is not None:
        v.append(f"the process cannot go on: the later save failed: {res['later']}")
    # fsync: fatal for the checkpoint
    # ckptdb syncs with fsync(); fdatasync() is SQLite's (its files, and its directory after creating
    # the WAL, whose result SQLite itself ignores: unixSync + UNIXFILE_DIRSYNC): judged by the rules above
    if (
        fired
        and kind == "fsync"
        and proto.name in ("save", "save_large", "async_save", "overwrite")
        and res.get("fired_path", "").startswith(str(d))
        and not res["fired_path"].endswith(("catalog.db", "catalog.db-wal", "catalog.db-shm", "catalog.db-journal"))
        and res.get("commit_seq") is not None
        and res["fired_seq"] < res["commit_seq"]
    ):
        v.append(f"fsync failure on {res['fired_path']} was followed by a successful commit (retried into success)")
    try:
        m = manager(d, load_options=LoadOptions(fallback=False))
    except Exception as e:  # noqa: BLE001
        return [*v, f"reopen failed: {type(e).__name__}: {e}"]
    try:
        eng = create_engine(sqlite_url(d / "catalog.db"))
        with eng.connect() as c:
            rows = c.execute(
                text(
                    "SELECT c.step_nr, c.state FROM checkpoints c JOIN runs r ON r.id = c.run_id WHERE r.name = 'fault'"
                )
            ).fetchall()
        eng.dispose()
        bad = sorted((s, st) for s, st in rows if st in ("pending", "deleting", "corrupt", "missing"))
        if bad:
            v.append(f"rows left after recovery: {bad}")
        committed = sorted(s for s, st in rows if st == "committed")
        debris = sorted(p.name for p in d.iterdir() if any(t in p.name for t in (".tmp", ".old-", ".trash-")))
        if debris:
            v.append(f"debris after recovery: {debris}")
        step_dirs = sorted(int(p.name[5:]) for p in d.iterdir() if p.name.startswith("step_") and p.name[5:].isdigit())
        if step_dirs != committed:
            v.append(f"step directories {step_dirs} != committed rows {committed}")
        got: dict[int, int | None] = {}
        for s in committed:
            try:
                st = m.load_checkpoint(s, verify="digest")
            except Exception as e:  # noqa: BLE001
                v.append(f"committed step {s} does not load/verify: {type(e).__name__}: {e}")
                continue
            got[s] = int(st["seed"]) if "seed" in st else (int(st["step_nr"]) if proto.name == "import" else None)
            if proto.name == "import":
                exp = import_state(s)
                import torch

                if not torch.equal(st["model"]["w"], exp["model"]["w"]):
                    v.append(f"imported step {s} has other content")
            else:
                import torch

                exp = make_state(int(st.get("seed", -1)), large=st["model"]["w"].numel() * 4 == LARGE)
                if not torch.equal(st["model"]["w"], exp["model"]["w"]):
                    v.append(f"step {s} content does not match its seed")
        if committed:
            try:
                last_step, _ = m.load_last_checkpoint(verify="digest")
                if last_step != max(committed):
                    v.append(f"resume point {last_step} != newest committed {max(committed)}")
            except Exception as e:  # noqa: BLE001
                v.append(f"load_last_checkpoint failed: {type(e).__name__}: {e}")
        later_ok = res.get("later") is None
        choices = [{**c, LATER_STEP: LATER_STEP} if later_ok else dict(c) for c in proto.expected(ok)]
        if got not in choices:
            what = "succeeded" if ok else f"raised {res.get('error')}"
            v.append(f"protocol {what}; committed {{step: seed}} = {got}, expected one of {choices}")
    finally:
        m.close()
    return v


# -- the enumeration ---------------------------------------------------------------------------


def restore(template: Path, work: Path) -> None:
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(template, work, symlinks=True)


def make_template(proto: Protocol, template: Path, work: Path) -> None:
    """Build the starting state at work's path (the catalog records absolute paths), copy it aside."""
    if work.exists():
        shutil.rmtree(work)
    (work / "ck").parent.mkdir(parents=True)

    def build() -> dict[str, Any]:
        proto.setup(work / "ck")
        return {"ok": True}

    res = _in_child(build)
    if "crash" in res:
        raise RuntimeError(f"setup of {proto.name} failed: {res['crash']}")
    if template.exists():
        shutil.rmtree(template)
    shutil.copytree(work, template, symlinks=True)


def points(count: int, quick: bool) -> list[int]:
    if not quick or count <= 3:
        return list(range(1, count + 1))
    return sorted({1, 2, count // 2, count})


def enumerate_protocol(
    proto: Protocol, base: Path, kinds: list[str], quick: bool, log_fn: Callable[[str], None]
) -> dict[str, Any]:
    template, work = base / f"{proto.name}.template", base / proto.name
    t0 = time.monotonic()
    make_template(proto, template, work)
    restore(template, work)
    dry = _in_child(lambda: faulted(proto, work, None, 0, 0))
    if "crash" in dry or dry.get("error") or dry.get("later"):
        raise RuntimeError(f"dry run of {proto.name} failed: {json.dumps(dry)[:3000]}")
    dry_v = _in_child(lambda: check(proto, work, dry, None, 0))
    if isinstance(dry_v, dict) or dry_v:
        raise RuntimeError(f"dry run of {proto.name} violates the invariants: {dry_v}")
    counts = dry["counts"]
    log_fn(f"{proto.name}: calls in the protocol (dry run): " + ", ".join(f"{k} {c}" for k, c in counts.items() if c))
    out: dict[str, Any] = {"counts": counts, "kinds": {}, "violations": []}
    for kind in kinds:
        stats = {"injected": 0, "not_reached": 0, "raised": 0, "harmless": 0, "violations": 0}
        for n in points(counts.get(kind, 0), quick):
            for err in ERRNOS[kind]:
                restore(template, work)
                res = _in_child(lambda kind=kind, n=n, err=err: faulted(proto, work, kind, n, err))
                if not res.get("fired") and "crash" not in res:
                    stats["not_reached"] += 1
                    continue
                stats["injected"] += 1
                viol = _in_child(lambda res=res, kind=kind, err=err: check(proto, work, res, kind, err))
                if isinstance(viol, dict):
                    viol = [f"checker crashed: {viol.get('crash', '')[-1500:]}"]
                if res.get("error"):
                    stats["raised"] += 1
                else:
                    stats["harmless"] += 1
                if viol:
                    stats["violations"] += 1
                    rec = {
                        "protocol": proto.name,
                        "kind": kind,
                        "n": n,
                        "errno": errno.errorcode[err],
                        "fired_path": res.get("fired_path"),
                        "error": res.get("error"),
                        "message": res.get("message"),
                        "violations": viol,
                        "trace": res.get("trace"),
                        "later_trace": res.get("later_trace"),
                    }
                    out["violations"].append(rec)
                    log_fn(f"VIOLATION {proto.name} {kind}#{n} {errno.errorcode[err]}: {viol}")
                elif res.get("error"):
                    out.setdefault("samples", {}).setdefault(kind, res.get("message"))
        out["kinds"][kind] = stats
    out["seconds"] = round(time.monotonic() - t0, 1)
    return out


def warm_up(d: Path) -> None:
    """One save, load and delete in this (parent) process, before the forks, in a directory of its
    own, with no fault armed: SQLAlchemy's mappers and result processors are set up once here
    instead of in every child (1.3 s -> 0.2 s per injection). Its engines are disposed of, so no
    child inherits a connection."""
    from ckptdb.catalog.session import dispose_engines

    m = manager(d)
    save(m, 1, 1)
    m.load_last_checkpoint()
    m.delete_checkpoint(1)
    m.close()
    dispose_engines()
    shutil.rmtree(d, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--protocols", default=",".join(PROTOCOLS))
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--quick", action="store_true", help="N in {1, 2, middle, last} only")
    ap.add_argument("--dir", type=Path, default=None, help="work directory (default: a new temporary one)")
    ap.add_argument("--json-out", type=Path, default=None, help="write the full result here")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args(argv)

    if "faultshim" not in os.environ.get("LD_PRELOAD", ""):  # re-exec with the shim preloaded
        so = build_shim()
        env = dict(os.environ, LD_PRELOAD=f"{so} {os.environ.get('LD_PRELOAD', '')}".strip())
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        env.setdefault("CKPTDB_URL", "")
        env.pop("CKPTDB_URL")
        os.execve(sys.executable, [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:])], env)

    logging.disable(logging.CRITICAL)  # the errors are judged, not logged
    # imported once, before the forks (the catalog stack too: warm_up below, since ``import ckptdb``
    # alone is light and every child would otherwise import and set it up again)
    import torch  # noqa: F401

    protos = [ALL[p] for p in args.protocols.split(",") if p]
    kinds = [k for k in args.kinds.split(",") if k]
    for k in kinds:
        if k not in KINDS:
            raise SystemExit(f"unknown kind {k!r}; one of {KINDS}")
    base = args.dir or Path(tempfile.mkdtemp(prefix="ckptdb-faultcheck-"))
    base.mkdir(parents=True, exist_ok=True)
    warm_up(base / "warm-up")
    t0 = time.monotonic()
    summary: dict[str, Any] = {"protocols": {}, "violations": 0, "injected": 0}

    def log_fn(s: str) -> None:
        print(s, flush=True)

    try:
        for p in protos:
            r = enumerate_protocol(p, base.resolve(), kinds, args.quick, log_fn)
            inj = sum(s["injected"] for s in r["kinds"].values())
            summary["protocols"][p.name] = r
            summary["injected"] += inj
            summary["violations"] += len(r["violations"])
            print(
                f"{p.name}: {inj} faults injected, {len(r['violations'])} violations, {r['seconds']} s; "
                + ", ".join(f"{k} {s['injected']}" for k, s in r["kinds"].items() if s["injected"]),
                flush=True,
            )
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    summary["seconds"] = round(time.monotonic() - t0, 1)
    if args.json_out:
        args.json_out.write_text(json.dumps(summary, indent=1))
    short = {
        "injected": summary["injected"],
        "violations": summary["violations"],
        "seconds": summary["seconds"],
        "per_protocol": {
            k: {"injected": sum(s["injected"] for s in r["kinds"].values()), "violations": len(r["violations"])}
            for k, r in summary["protocols"].items()
        },
    }
    print(json.dumps(short))
    return 1 if summary["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
