"""The background half of an asynchronous save: one commit at a time in its own thread.

``FileCheckpointManager`` with ``SaveOptions(blocking=False)`` (or ``commit_checkpoint(blocking=False)``)
stages the state into host buffers during ``save_state`` and hands the rest of the commit (writing,
hashing, fsync, rename, the catalog transaction, retention) to a :class:`BackgroundCommitter`.

Call order: ``submit(step_nr, fn)`` -> ``wait()`` (also implied by the manager's next call) -> ``submit`` ...

- At most one commit runs at a time; ``submit`` refuses while one is in flight (the manager waits
  first, in ``begin_checkpoint``).
- An exception in the background is kept and raised, once, by the next ``wait()``. The manager has
  already rolled the checkpoint back by then (its pending row aborted, its temporary directory
  removed); if the process dies instead, the row stays ``pending`` and recovery rolls it back on
  the next open, as for any dead writer.
- The worker thread is kept between commits; a commit in flight when the program ends still
  finishes (the executor's exit hook joins the worker).
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from collections.abc import Callable

from ckptdb.errors import CheckpointError, InvalidOperationError

log = logging.getLogger("ckptdb")


class BackgroundCommitError(CheckpointError):
    """A checkpoint committed in the background failed; it was rolled back (earlier ones are intact)."""

    def __init__(self, step_nr: int, cause: BaseException) -> None:
        super().__init__(
            f"step {step_nr}: the background commit failed ({type(cause).__name__}: {cause}); "
            "the checkpoint was rolled back, earlier checkpoints are intact"
        )
        self.step_nr = step_nr


class BackgroundCommitter:
    """Runs one checkpoint's commit at a time in a worker thread and keeps its outcome.

    The worker is one thread kept for the committer's life (a ``ThreadPoolExecutor`` of one):
    handing it a commit does not wait for a new thread to start (starting one waited up to the
    interpreter's 5 ms switch interval, inside the save's stall). The executor's exit hook lets a
    commit in flight, or queued, finish when the program ends.
    """

    def __init__(self) -> None:
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._future: concurrent.futures.Future[None] | None = None
        self._step_nr: int | None = None
        self._worker: int | None = None  # the worker thread's ident, once it has run a commit
        self._lock = threading.Lock()

    @property
    def in_flight(self) -> int | None:
        """The step being committed, or None."""
        f = self._future
        return self._step_nr if f is not None and not f.done() else None

    def submit(self, step_nr: int, fn: Callable[[], None]) -> None:
        with self._lock:
            f = self._future
            if f is not None and not f.done():
                raise InvalidOperationError(f"step {self._step_nr} is still being committed; call wait() first")
            if f is not None and f.exception() is not None:
                raise InvalidOperationError("the previous background commit's error was not collected; call wait()")

            def run() -> None:
                self._worker = threading.get_ident()
                try:
                    fn()
                except BaseException as e:
                    # also logged: a program that never calls the manager again still hears of it
                    log.error("ckptdb: the background commit of step %d failed: %s", step_nr, e)
                    raise

            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckptdb-commit")
            self._step_nr = step_nr
            self._future = self._pool.submit(run)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the commit in flight; raise its error (once) if it failed.

        Returns False when ``timeout`` expired first. Called from the worker thread itself
        (e.g. by retention inside the commit) it returns at once.

        Raises:
            BackgroundCommitError: the background commit failed (the cause is chained).
        """
        f = self._future
        if f is None or threading.get_ident() == self._worker:
            return True
        done, _ = concurrent.futures.wait([f], timeout)
        if not done:
            return False
        with self._lock:
            if self._future is not f:  # another thread collected it
                return True
            err = f.exception()
            step = self._step_nr
            self._future = None
        if err is not None:
            if isinstance(err, BackgroundCommitError):
                raise err
            raise BackgroundCommitError(step if step is not None else -1, err) from err
        return True


__all__ = ["BackgroundCommitError", "BackgroundCommitter"]
