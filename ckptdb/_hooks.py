"""Named points inside the protocols, where a test can stop a process (the race checker).

Every step of save / commit / publish, asynchronous commit, overwrite, delete, retention, gc,
recovery, verify and import calls ``hook("<protocol>.<point>")``. That is a no-op (one global
test) unless the process was started with ``CKPTDB_HOOK_DIR`` set (or :func:`configure` was
called), which the race checker (``scripts/racecheck.py``, docs/reliability.md) does:

- every point reached is appended to ``<dir>/trace`` (one ``name#k`` per line, ``k`` counting
  the times this process reached ``name``): the checker learns which points an operation passes;
- at the point named by ``CKPTDB_HOOK_STOP`` (``name`` or ``name#k``, default k = 1) the process
  writes ``<dir>/reached`` and blocks until ``<dir>/release`` exists (polled every 2 ms).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

_dir: Path | None = None
_stop: tuple[str, int] | None = None
_counts: dict[str, int] = {}
_lock = threading.Lock()


def _parse_stop(stop: str | None) -> tuple[str, int] | None:
    if not stop:
        return None
    name, _, k = stop.partition("#")
    return name, int(k) if k else 1


def configure(directory: str | os.PathLike[str] | None, stop: str | None = None) -> None:
    """Enable the hook points (``directory`` None disables them), stopping at ``stop`` (``name#k``)."""
    global _dir, _stop
    with _lock:
        _dir = Path(directory) if directory is not None else None
        _stop = _parse_stop(stop)
        _counts.clear()


def hook(name: str) -> None:
    """A named point of a protocol: nothing happens unless the race checker enabled the points."""
    if _dir is None:
        return
    _reached(name)


def _reached(name: str) -> None:
    d = _dir
    if d is None:
        return
    with _lock:
        k = _counts[name] = _counts.get(name, 0) + 1
        with open(d / "trace", "a") as f:
            f.write(f"{name}#{k}\n")
        stop_here = _stop == (name, k)
    if not stop_here:
        return
    tmp = d / f".reached-{os.getpid()}"
    tmp.write_text(f"{name}#{k}\n")
    os.replace(tmp, d / "reached")
    release = d / "release"
    while not release.exists():
        time.sleep(0.002)


if os.environ.get("CKPTDB_HOOK_DIR"):
    configure(os.environ["CKPTDB_HOOK_DIR"], os.environ.get("CKPTDB_HOOK_STOP"))
