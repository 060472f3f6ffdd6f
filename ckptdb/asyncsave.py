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
- The thread is not a daemon: a commit in flight when the program ends still finishes (the
  interpreter joins it at exit).
"""

from __future__ import annotations

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
    """Runs one checkpoint's commit in a background thread and keeps its outcome."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._step_nr: int | None = None
        self._error: BaseException | None = None
        self._lock = threading.Lock()

    @property
    def in_flight(self) -> int | None:
        """The step being committed, or None."""
        t = self._thread
        return self._step_nr if t is not None and t.is_alive() else None

    def submit(self, step_nr: int, fn: Callable[[], None]) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                raise InvalidOperationError(f"step {self._step_nr} is still being committed; call wait() first")
            if self._error is not None:
                raise InvalidOperationError("the previous background commit's error was not collected; call wait()")

            def run() -> None:
                try:
                    fn()
                except BaseException as e:  # noqa: BLE001 - kept and raised by wait()
                    self._error = e
                    # also logged: a program that never calls the manager again still hears of it
                    log.error("ckptdb: the background commit of step %d failed: %s", step_nr, e)

            self._step_nr = step_nr
            self._thread = threading.Thread(target=run, name=f"ckptdb-commit-{step_nr}", daemon=False)
            self._thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the commit in flight; raise its error (once) if it failed.

        Returns False when ``timeout`` expired first. Called from the background thread itself
        (e.g. by retention inside the commit) it returns at once.

        Raises:
            BackgroundCommitError: the background commit failed (the cause is chained).
        """
        t = self._thread
        if t is None or t is threading.current_thread():
            return True
        t.join(timeout)
        if t.is_alive():
            return False
        with self._lock:
            err, self._error = self._error, None
            step = self._step_nr
            self._thread = None
        if err is not None:
            if isinstance(err, BackgroundCommitError):
                raise err
            raise BackgroundCommitError(step if step is not None else -1, err) from err
        return True


__all__ = ["BackgroundCommitError", "BackgroundCommitter"]
