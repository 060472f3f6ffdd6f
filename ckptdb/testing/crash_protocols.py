"""The protocols the crash-state checker records (:mod:`ckptdb.testing.crashcheck`).

    python -m ckptdb.testing.crash_protocols setup PROTOCOL ROOT   # the base state (not traced)
    python -m ckptdb.testing.crash_protocols run PROTOCOL ROOT     # the protocol (traced)
    python -m ckptdb.testing.crash_protocols stage STAGE ROOT      # one crashed writer (setup's helper)

``ROOT`` is a fresh directory: ``ROOT/ckpt`` is the checkpoint directory with its SQLite catalog
(``ROOT/ckpt/catalog.db``), ``ROOT/outside/`` and ``ROOT/ckpt/step_99/`` (a user's directory
unknown to the catalog) are sentinels nothing may change. Every base state holds committed
checkpoints; ``recovery`` and ``gc`` start from the debris of three crashed processes (a dead
writer, an overwrite killed between publish and commit, a deletion killed after its claim).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

ACK = b"@@crashcheck-ack@@"  # written to stderr once the protocol returned to its caller

PROTOCOLS = (
    "save",
    "async_save",
    "overwrite",
    "delete",
    "prune",
    "save_retention",
    "gc",
    "recovery",
    "import",
)

# steps a protocol may legitimately remove or replace (the rest of the base's committed steps must stay)
MAY_REMOVE: dict[str, frozenset[int]] = {
    "delete": frozenset({1}),
    "prune": frozenset({1, 2}),
    "save_retention": frozenset({1, 2}),
}
MAY_REPLACE: dict[str, frozenset[int]] = {"overwrite": frozenset({1})}


def make_state(step: int, size: int = 8) -> dict[str, Any]:
    g = torch.Generator().manual_seed(step)
    return {
        "model": {"w": torch.randn(size, size, generator=g), "b": torch.randn(size, generator=g)},
        "optimizer": {"state": {0: {"step": torch.tensor(float(step))}}, "param_groups": [{"lr": 0.1, "params": [0]}]},
        "step_nr": step,
    }


def ckpt_dir(root: Path) -> Path:
    return root / "ckpt"


def _manager(root: Path, **kw: Any) -> Any:
    from ckptdb import FileCheckpointManager

    return FileCheckpointManager(ckpt_dir(root), **kw)


def _save(m: Any, step: int, *, overwrite: bool = False, value: int | None = None) -> None:
    m.begin_checkpoint(step, overwrite=overwrite)
    m.save_state(make_state(step if value is None else value))
    m.save_score(float(step))
    m.commit_checkpoint()


def _stage(name: str, root: Path) -> None:
    """A process that crashes (``os._exit``) at one point of a protocol."""
    import ckptdb.delete as delete_mod
    import ckptdb.storage.writer as writer_mod
    from ckptdb.options import RecoveryOptions

    no_recovery = RecoveryOptions(on_open=False)  # each stage leaves its debris for the next
    if name == "dead_writer":
        m = _manager(root, recovery_options=no_recovery)
        m.begin_checkpoint(5)
        m.save_state(make_state(5))
        os._exit(9)
    if name == "overwrite_published":  # published step 2's new copy, .old- holds the committed one
        orig = writer_mod.publish

        def publish_then_die(*a: Any, **k: Any) -> bool:
            orig(*a, **k)
            os._exit(9)

        writer_mod.publish = publish_then_die  # type: ignore[assignment]
        m = _manager(root, recovery_options=no_recovery)
        _save(m, 2, overwrite=True, value=202)
    if name == "delete_claimed":  # step 1 marked 'deleting', nothing removed
        delete_mod.finish_delete = lambda *a, **k: os._exit(9)  # type: ignore[assignment]
        m = _manager(root, recovery_options=no_recovery)
        m.delete_checkpoint(1)
    raise SystemExit(f"unknown stage {name}")


def _run_stage(name: str, root: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "ckptdb.testing.crash_protocols", "stage", name, str(root)], check=False)
    if r.returncode != 9:
        raise SystemExit(f"stage {name} exited {r.returncode}, not 9")


def setup(protocol: str, root: Path) -> None:
    (root / "outside").mkdir(parents=True)
    (root / "outside" / "keep.txt").write_text("a file next to the run: nothing may change it\n")
    d = ckpt_dir(root)
    d.mkdir()
    if protocol == "import":  # fairseq2's own layout, no catalog yet
        for step in (1, 2):
            sd = d / f"step_{step}"
            sd.mkdir()
            torch.save(make_state(step), sd / "model.pt")
            (sd / "score.txt").write_text(f"{float(step)}\n")
        return
    foreign = d / "step_99"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("a user's directory, not in the catalog\n")
    steps = (1, 2, 3) if protocol in ("prune", "save_retention") else (1, 2)
    with _manager(root) as m:
        for step in steps:
            _save(m, step)
    if protocol in ("gc", "recovery"):
        for stage in ("dead_writer", "overwrite_published", "delete_claimed"):
            _run_stage(stage, root)


def _mutate(name: str, root: Path) -> None:
    """Put a known bug back (``CKPTDB_CRASH_MUTANT``), to show the checker catches it."""
    from ckptdb.storage import writer

    if name == "no_publish_fsync":  # publish's rename is never made durable before the commit
        orig = writer.fsync_dir
        top = ckpt_dir(root).resolve()

        def fsync_dir(path: Path) -> None:
            if Path(path).resolve() != top:
                orig(path)

        writer.fsync_dir = fsync_dir
    else:
        raise SystemExit(f"unknown mutant {name}")


def run(protocol: str, root: Path) -> None:
    from ckptdb.options import SaveOptions

    if os.environ.get("CKPTDB_CRASH_MUTANT"):
        _mutate(os.environ["CKPTDB_CRASH_MUTANT"], root)

    if protocol == "save":
        with _manager(root) as m:
            _save(m, 3)
    elif protocol == "async_save":
        with _manager(root, save_options=SaveOptions(blocking=False)) as m:
            _save(m, 3)
    elif protocol == "overwrite":
        with _manager(root) as m:
            _save(m, 1, overwrite=True, value=101)
    elif protocol == "delete":
        with _manager(root) as m:
            m.delete_checkpoint(1)
    elif protocol == "prune":
        with _manager(root) as m:
            m.keep_last_n_checkpoints(1)
    elif protocol == "save_retention":
        from ckptdb.retention import KeepLast

        with _manager(root, retention=KeepLast(2)) as m:
            _save(m, 4)
    elif protocol == "gc":
        from ckptdb.catalog import Catalog
        from ckptdb.catalog.session import sqlite_url
        from ckptdb.cleanup import gc

        rep = gc(Catalog(sqlite_url(ckpt_dir(root) / "catalog.db"), create=False))
        if rep.errors or rep.refused:
            raise SystemExit(f"gc: {rep.errors} {rep.refused}")
    elif protocol == "recovery":
        with _manager(root):
            pass
    elif protocol == "import":
        from ckptdb.catalog.session import sqlite_url
        from ckptdb.importer import import_directory

        import_directory(sqlite_url(ckpt_dir(root) / "catalog.db"), ckpt_dir(root))
    else:
        raise SystemExit(f"unknown protocol {protocol}")
    os.write(2, ACK + b"\n")


def main(argv: list[str]) -> None:
    what, name, root = argv[0], argv[1], Path(argv[2])
    if what == "setup":
        setup(name, root)
    elif what == "run":
        run(name, root)
    elif what == "stage":
        _stage(name, root)
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
