"""A writer process for the asynchronous-save kill test: commits step 1 in the background, waits,
then starts step 2 in the background; its background thread prints KILLME mid-write and stalls
while the main thread goes on "training", so the parent can SIGKILL it there.

    python tests/integration/child_async.py DIR URL
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ckptdb import FileCheckpointManager, SaveOptions
from ckptdb.storage import writer
from tests.helpers import make_state

armed = False
said = threading.Lock()
_out = threading.Lock()


def say(msg: str) -> None:
    """One whole line at a time: two threads print here (print() writes text and newline separately)."""
    with _out:
        sys.stdout.write(msg + "\n")
        sys.stdout.flush()


def main() -> None:
    global armed
    directory, url = Path(sys.argv[1]), sys.argv[2]
    for cls in (writer._HashingFile, writer._DirectFile):  # buffered and O_DIRECT file objects

        def write(self: Any, data: bytes, orig_write: Any = cls.write) -> int:
            n: int = orig_write(self, data)
            if armed and self.size > 512 and threading.current_thread() is not threading.main_thread():
                if said.acquire(blocking=False):  # files are written in parallel threads: say it once
                    say("KILLME background-write")
                time.sleep(120)
            return n

        cls.write = write  # type: ignore[method-assign]
    m = FileCheckpointManager(directory, catalog=url, save_options=SaveOptions(blocking=False))
    m.begin_checkpoint(1)
    m.save_state(make_state(1, size=64))
    m.commit_checkpoint()
    m.wait()
    say("committed 1")
    armed = True
    m.begin_checkpoint(2)
    m.save_state(make_state(2, size=64))
    m.commit_checkpoint()
    say("training goes on")
    time.sleep(120)
    raise SystemExit("not killed")


if __name__ == "__main__":
    main()
