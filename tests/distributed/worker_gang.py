"""One rank of the positional-gang test (issue 10, item 14).

    python -m tests.distributed.worker_gang DIR URL INIT OUT RANK WORLD

Joins a real gloo process group and builds the manager as fairseq2 does,
``FileCheckpointManager(checkpoint_dir, gang)``: the gang is the second positional argument. Saves
and commits a step with a per-rank state, loads it back, and writes ``OUT/rank<r>.json``.
"""

from __future__ import annotations

import json
import sys
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ckptdb import FileCheckpointManager
from ckptdb.options import SaveOptions
from tests.helpers import assert_state_equal


def run(checkpoint_dir: str, url: str, rank: int, world: int) -> dict[str, Any]:
    m = FileCheckpointManager(checkpoint_dir, dist.group.WORLD, catalog=url, save_options=SaveOptions(fsync=False))
    state = {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "trainer": {"rank": rank}}
    m.begin_checkpoint(7)
    m.save_state(state, replicated_keys={"model"})
    m.commit_checkpoint()
    step, loaded = m.load_last_checkpoint()
    assert_state_equal(loaded, state)
    return {"gang_rank": m.gang.rank, "gang_size": m.gang.size, "step": step, "steps": m.get_step_numbers()}


def main() -> None:
    checkpoint_dir, url, init, out = sys.argv[1:5]
    rank, world = int(sys.argv[5]), int(sys.argv[6])
    torch.set_num_threads(1)
    result: dict[str, Any] = {"ok": True}
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{init}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
        )
        result.update(run(checkpoint_dir, url, rank, world))
    except Exception as e:  # noqa: BLE001 - the test reads it
        result = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(result))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
