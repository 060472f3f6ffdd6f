"""The cyclic garbage collector paused while ckptdb builds or walks many objects at once.

Loading a file of 50 000 tensors builds ~10 objects per tensor; pickling one, staging one for an
asynchronous save, allocate as many. Every 700 allocations the collector runs, and every so often
it walks every object of the process (the whole training program's heap, not only the checkpoint):
for 50 000 tensors that was ~1 s of a ~2 s load. Those objects are freed by reference counting; the
cyclic collector has nothing to find among them. Pausing it postpones collection of other cycles
by the length of a save or load; nothing is lost.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

_gc_lock = threading.Lock()
_gc_pausers = 0
_gc_was_enabled = False


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """No cyclic garbage collection inside the block (see the module's docstring). Collection resumes
    when the last of the threads inside such a block at once leaves it; a program that had the
    collector off keeps it off."""
    global _gc_pausers, _gc_was_enabled
    with _gc_lock:
        if _gc_pausers == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_pausers += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pausers -= 1
            if _gc_pausers == 0 and _gc_was_enabled:
                gc.enable()


__all__ = ["paused_gc"]
