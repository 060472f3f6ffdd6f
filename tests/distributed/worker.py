"""One rank of a distributed test: ``python -m tests.distributed.worker <spec.json> <rank>``.

Joins a real gloo process group (``init_method=file://``), runs a scenario against a
FileCheckpointManager, and writes ``<out>/rank<r>.json``: ``{"ok", "error_type", "error",
"elapsed", ...data}``. Tensors are compared here, in the worker; the test process only reads the
JSON and the catalog.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ckptdb import FileCheckpointManager, KeepLast
from ckptdb.options import SaveOptions
from tests.helpers import assert_state_equal

Spec = dict[str, Any]


def _mgr(spec: Spec, **kw: Any) -> FileCheckpointManager:
    return FileCheckpointManager(spec["dir"], catalog=spec["url"], save_options=SaveOptions(fsync=False), **kw)


def _files(spec: Spec, step: int) -> list[str]:
    d = Path(spec["dir"]) / f"step_{step}"
    return sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file())


# -- DDP-style: model and optimizer replicated, trainer state per rank ------------------------------


def ddp(spec: Spec, rank: int, world: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    ddp_model = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(ddp_model.parameters(), lr=0.1)
    m = _mgr(spec, gang=dist.group.WORLD, retention=KeepLast(1))
    for step in (10, 20):
        x = torch.randn(2, 4, generator=torch.Generator().manual_seed(rank * 100 + step))
        ddp_model(x).sum().backward()
        opt.step()
        opt.zero_grad()
        m.begin_checkpoint(step)
        m.save_state(
            {"model": model.state_dict(), "optimizer": opt.state_dict(), "trainer": {"rank": rank, "step": step}},
            replicated_keys={"model", "optimizer"},
        )
        m.save_score(float(step), metric="score")
        m.commit_checkpoint()
    steps = m.get_step_numbers()
    last, state = m.load_last_checkpoint()
    assert_state_equal(state["model"], model.state_dict())
    assert_state_equal(state["optimizer"], opt.state_dict())
    assert state["trainer"] == {"rank": rank, "step": 20}, state["trainer"]
    return {"steps": steps, "last": last, "files": _files(spec, last)}


# -- tensor parallel: dp x tp = 2 x 2, every file suffixed with the tp rank -------------------------


def tp(spec: Spec, rank: int, world: int) -> dict[str, Any]:
    tp_size = 2
    dp_size = world // tp_size
    tp_groups = [dist.new_group([d * tp_size + t for t in range(tp_size)]) for d in range(dp_size)]
    dp_groups = [dist.new_group([d * tp_size + t for d in range(dp_size)]) for t in range(tp_size)]
    dp_rank, tp_rank = divmod(rank, tp_size)
    m = _mgr(spec, gang=dist.group.WORLD, dp_gang=dp_groups[tp_rank], tp_gang=tp_groups[dp_rank])
    # this tp rank's slice of a column-parallel weight (identical across dp ranks)
    shard = torch.arange(6.0).reshape(2, 3) + 100 * tp_rank
    state = {
        "model": {"w": shard},
        "optimizer": {"state": {0: {"exp_avg": shard * 2}}, "param_groups": [{"lr": 0.1, "params": [0]}]},
        "trainer": {"rank": rank, "dp_rank": dp_rank, "tp_rank": tp_rank},
    }
    m.begin_checkpoint(3)
    m.save_state(state, replicated_keys={"model", "optimizer"})
    m.commit_checkpoint()
    loaded = m.load_checkpoint(3)
    assert_state_equal(loaded, state)
    return {"files": _files(spec, 3), "steps": m.get_step_numbers()}


# -- FSDP2: sharded save at one world size, load at another ------------------------------------------


def _fsdp_model(world: int, seed: int, shard: bool) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    if shard:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in (model[0], model[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    return model, opt


def _full_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True) if dist.is_initialized() else None
    model_sd, optim_sd = get_state_dict(model, opt, options=opts)
    return {"model": model_sd, "optimizer": optim_sd}


def fsdp_save(spec: Spec, rank: int, world: int) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, opt = _fsdp_model(world, seed=0, shard=True)
    for i in range(2):
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(rank * 10 + i))
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    model_sd, optim_sd = get_state_dict(model, opt)
    m = _mgr(spec, gang=dist.group.WORLD)
    m.begin_checkpoint(5)
    m.save_state({"model": model_sd, "optimizer": optim_sd, "trainer": {"rank": rank}})
    m.save_consolidated_fsdp_model(model)
    m.commit_checkpoint()
    full = _full_state(model, opt)
    if rank == 0:
        torch.save(full, spec["expected"])
    return {"files": _files(spec, 5)}


def fsdp_load(spec: Spec, rank: int, world: int) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    distributed = dist.is_initialized()
    model, opt = _fsdp_model(world, seed=1, shard=distributed)
    model_sd, optim_sd = get_state_dict(model, opt)  # initialises the optimizer state to load into
    m = _mgr(spec, gang=dist.group.WORLD if distributed else None)
    sharded = {"model": model_sd, "optimizer": optim_sd}
    step, state = m.load_last_checkpoint(sharded_state=sharded)
    set_state_dict(model, opt, model_state_dict=model_sd, optim_state_dict=optim_sd)
    full = _full_state(model, opt)
    if rank == 0:
        expected = torch.load(spec["expected"], weights_only=True)
        assert_state_equal(full["model"], expected["model"])
        assert_state_equal(full["optimizer"], expected["optimizer"])
    # and training goes on from there
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(99))
    model(x).pow(2).mean().backward()
    opt.step()
    return {"step": step, "keys": sorted(state)}


# -- failures --------------------------------------------------------------------------------------


class Unsaveable:
    pass


def raising(spec: Spec, rank: int, world: int) -> dict[str, Any]:
    m = _mgr(spec, gang=dist.group.WORLD)
    state = {"trainer": {"rank": rank}}
    m.begin_checkpoint(1)
    m.save_state(state)
    m.commit_checkpoint()
    errors: list[list[str]] = []

    def expect_error(fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - recorded for the test to compare across ranks
            errors.append([type(e).__name__, str(e)])
        else:
            errors.append(["none", ""])

    m.begin_checkpoint(2)
    # 1. rank 1 refuses a value: every rank raises the same error, the checkpoint stays open
    expect_error(lambda: m.save_state({"trainer": {"obj": Unsaveable()}} if rank == 1 else state))
    # 2. a real disk error on rank 1 only (its file's path is taken by a directory): rolled back everywhere
    if rank == 1:
        assert m._open is not None
        (m._open.writer.tmp_dir / "rank_1.pt").mkdir()
    expect_error(lambda: m.save_state(state))
    still_open = m._open is not None
    # the gang is still usable: the next checkpoint commits
    m.begin_checkpoint(3)
    m.save_state(state)
    m.commit_checkpoint()
    return {"errors": errors, "still_open": still_open, "steps": m.get_step_numbers()}


def kill(spec: Spec, rank: int, world: int) -> dict[str, Any]:
    m = _mgr(spec, gang=dist.group.WORLD)
    state = {"trainer": {"rank": rank}, "model": {"w": torch.full((64, 64), float(rank))}}
    m.begin_checkpoint(1)
    m.save_state(state)
    m.commit_checkpoint()
    m.begin_checkpoint(2)
    m.save_state(state)
    if rank == spec["victim"]:
        if spec.get("how", "kill") == "kill":
            os.kill(os.getpid(), signal.SIGKILL)  # a real SIGKILL, mid-save: files written, commit not reached
        time.sleep(2 * spec["pg_timeout"])  # a hung rank: alive, but never reaches the commit
        os._exit(3)
    started = time.monotonic()
    try:
        m.commit_checkpoint()
    except Exception as e:  # noqa: BLE001 - reported to the test
        return {"commit_error": [type(e).__name__, str(e)], "failed_after": time.monotonic() - started}
    return {"commit_error": None, "failed_after": time.monotonic() - started}


SCENARIOS: dict[str, Callable[[Spec, int, int], dict[str, Any]]] = {
    "ddp": ddp,
    "tp": tp,
    "fsdp_save": fsdp_save,
    "fsdp_load": fsdp_load,
    "raising": raising,
    "kill": kill,
}


def main() -> None:
    spec: Spec = json.loads(Path(sys.argv[1]).read_text())
    rank = int(sys.argv[2])
    world = int(spec["world"])
    torch.set_num_threads(1)
    out = Path(spec["out"])
    result: dict[str, Any] = {"ok": True}
    started = time.monotonic()
    try:
        if spec.get("process_group", True):
            dist.init_process_group(
                "gloo",
                init_method=f"file://{spec['init_file']}",
                rank=rank,
                world_size=world,
                timeout=timedelta(seconds=spec.get("pg_timeout", 60)),
            )
        result.update(SCENARIOS[spec["scenario"]](spec, rank, world))
    except Exception as e:  # noqa: BLE001 - the test reads it
        result = {"ok": False, "error_type": type(e).__name__, "error": str(e), "traceback": traceback.format_exc()}
    result["elapsed"] = time.monotonic() - started
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    if dist.is_initialized() and result["ok"] and spec["scenario"] != "kill":
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
