"""Asynchronous saves from CUDA tensors: the stall against a raw pinned device-to-host copy.

    python benchmarks/gpu_stall.py                      # 1 and 4 GiB of state per GPU, 5 repetitions
    python benchmarks/gpu_stall.py --gib 1 --write-docs docs/benchmarks.md

Under three minutes on one GPU. On a machine without CUDA it says so and exits 0.

- **raw pinned D2H copy** (the yardstick): the same tensors copied into pinned host buffers that
  are allocated once, ``non_blocking`` on a side stream per device, one event per device waited
  for: what any asynchronous checkpoint must at least pay before training may touch its tensors;
- **ckptdb async stall**: ``begin_checkpoint -> save_state -> commit_checkpoint`` with
  ``SaveOptions(blocking=False)`` (staging into ckptdb's reused pinned buffers, side streams,
  one event per device; ckptdb.storage.staging), after one warm-up save; target ≤ 1.2x the raw
  copy. The background write is waited for (untimed) before the next repetition. Beside the
  stall, the part of it spent staging (the walk and the copies): the rest is the catalog's
  ``begin_checkpoint`` row and the hand-over to the background writer;
- **end to end**: a small transformer with AdamW resident on the GPU, one training step, then
  a synchronous ckptdb save and an asynchronous one (stall and total), and a load that checks
  every tensor against the GPU's.

Every device the machine has gets its share of the state (an event per source device).
"""

from __future__ import annotations

import argparse
import gc
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ckptdb import FileCheckpointManager, SaveOptions  # noqa: E402

SECTION = "## GPU stall"
GB = 1e9


def gpu_state(gib: float, devices: list[torch.device]) -> dict[str, Any]:
    """A model + AdamW-moments-shaped state, split over ``devices``, float32."""
    per_dev = gib * (1 << 30) / 4 / 3  # floats per device and part (model, exp_avg, exp_avg_sq)
    model: dict[str, torch.Tensor] = {}
    moments: dict[int, dict[str, torch.Tensor]] = {}
    i = 0
    for dev in devices:
        left = int(per_dev)
        while left > 0:
            n = min(left, 1 << 24)  # 64 MiB tensors
            p = torch.randn(n, device=dev)
            model[f"{dev.type}{dev.index}.p{i}"] = p
            moments[i] = {"exp_avg": p * 0.01, "exp_avg_sq": p * p, "step": torch.tensor(1.0, device=dev)}
            left -= n
            i += 1
    return {"model": model, "optimizer": {"state": moments, "param_groups": [{"lr": 1e-4, "params": list(moments)}]}}


def tensors(obj: Any) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []

    def walk(v: Any) -> None:
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list | tuple):
            for x in v:
                walk(x)

    walk(obj)
    return out


class RawCopy:
    """The yardstick: pinned host buffers allocated once, D2H on a side stream per device, one event each."""

    def __init__(self, ts: list[torch.Tensor]) -> None:
        self.ts = ts
        self.bufs = [torch.empty(t.numel() * t.element_size(), dtype=torch.uint8, pin_memory=True) for t in ts]
        self.streams = {t.device: torch.cuda.Stream(device=t.device) for t in ts}

    def run(self) -> None:
        for dev, s in self.streams.items():
            s.wait_stream(torch.cuda.current_stream(dev))
        for t, b in zip(self.ts, self.bufs, strict=True):
            with torch.cuda.stream(self.streams[t.device]):
                b.copy_(t.reshape(-1).view(torch.uint8), non_blocking=True)
        events = []
        for s in self.streams.values():
            ev = torch.cuda.Event()
            ev.record(s)
            events.append(ev)
        for ev in events:
            ev.synchronize()


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def bench_stall(gib: float, reps: int, work: Path) -> dict[str, Any]:
    devices = [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    state = gpu_state(gib, devices)
    ts = tensors(state)
    nbytes = sum(t.numel() * t.element_size() for t in ts)
    raw = RawCopy(ts)
    raw.run()  # warm-up
    mgr = FileCheckpointManager(work / "stall", save_options=SaveOptions(blocking=False))
    step = [0]

    def ck() -> float:
        step[0] += 1
        for s in mgr.get_step_numbers():
            mgr.delete_checkpoint(s)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        mgr.begin_checkpoint(step[0])
        mgr.save_state(state)
        mgr.commit_checkpoint()
        stall = time.perf_counter() - t0
        mgr.wait()
        return stall

    ck()  # warm-up: allocates ckptdb's pinned staging buffers
    raws, stalls, staging = [], [], []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        raw.run()
        raws.append(time.perf_counter() - t0)
        mgr._staging.reset_stats()
        stalls.append(ck())
        staging.append(mgr._staging.seconds)
    # the staged copy is what was on the GPU
    loaded = mgr.load_checkpoint(step[0])
    for k, v in state["model"].items():
        if not torch.equal(loaded["model"][k], v.cpu()):
            raise SystemExit(f"async save from CUDA: {k} differs after load")
    mgr.close()
    del raw, ts, loaded
    state.clear()
    gc.collect()
    torch.cuda.empty_cache()
    return {"gib": gib, "devices": len(devices), "bytes": nbytes, "raw": raws, "stall": stalls, "staging": staging}


def bench_model(work: Path, reps: int) -> dict[str, Any]:
    dev = torch.device("cuda", 0)
    torch.manual_seed(0)
    model = torch.nn.TransformerEncoder(
        torch.nn.TransformerEncoderLayer(1024, 16, 4096, batch_first=True), num_layers=12
    ).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(8, 128, 1024, device=dev)
    model(x).square().mean().backward()
    opt.step()
    opt.zero_grad()
    state = {"model": model.state_dict(), "optimizer": opt.state_dict()}
    nbytes = sum(t.numel() * t.element_size() for t in tensors(state))
    sync_mgr = FileCheckpointManager(work / "model_sync")
    async_mgr = FileCheckpointManager(work / "model_async", save_options=SaveOptions(blocking=False))
    out: dict[str, Any] = {"bytes": nbytes, "sync": [], "stall": [], "total": []}
    for step in range(reps + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        sync_mgr.begin_checkpoint(step)
        sync_mgr.save_state(state)
        sync_mgr.commit_checkpoint()
        t_sync = time.perf_counter() - t0
        t0 = time.perf_counter()
        async_mgr.begin_checkpoint(step)
        async_mgr.save_state(state)
        async_mgr.commit_checkpoint()
        t_stall = time.perf_counter() - t0
        async_mgr.wait()
        t_total = time.perf_counter() - t0
        if step:  # step 0 warms up (imports, staging buffers)
            out["sync"].append(t_sync)
            out["stall"].append(t_stall)
            out["total"].append(t_total)
        # training goes on: the next save sees new values
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    loaded = async_mgr.load_checkpoint(reps)
    # both saves of the last step were taken from the same GPU state
    ref = sync_mgr.load_checkpoint(reps)
    for k, v in ref["model"].items():
        if not torch.equal(loaded["model"][k], v):
            raise SystemExit(f"end to end: {k} differs between the sync and the async save")
    sync_mgr.close()
    async_mgr.close()
    return out


def render(sts: list[dict[str, Any]], md: dict[str, Any], command: str) -> str:
    st0 = sts[0]
    lines = [
        SECTION,
        "",
        f"`{command}`, run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on "
        f"{torch.cuda.get_device_name(0)} x {st0['devices']} (torch {torch.__version__}); medians of "
        f"{len(st0['raw'])} repetitions. The stall is `begin_checkpoint` to `commit_checkpoint` "
        "returning; 'staging' is the part of it spent walking the state and copying it.",
        "",
        "| state | operation | median | GB/s |",
        "|---|---|---:|---:|",
    ]
    for st in sts:
        gb = st["bytes"] / GB
        raw, stall, stg = median(st["raw"]), median(st["stall"]), median(st["staging"])
        size = f"{st['gib']:g} GiB"
        lines += [
            f"| {size} | raw pinned D2H copy (side stream, event per device) | {raw * 1e3:.1f} ms | {gb / raw:.2f} |",
            f"| {size} | ckptdb async save: stall | {stall * 1e3:.1f} ms | {gb / stall:.2f} |",
            f"| {size} | of which staging (walk + copies) | {stg * 1e3:.1f} ms | {gb / stg:.2f} |",
        ]
    mb = md["bytes"] / GB
    lines += [
        f"| {mb:.2f} GB transformer + AdamW on the GPU | sync save, end to end | "
        f"{median(md['sync']) * 1e3:.1f} ms | {mb / median(md['sync']):.2f} |",
        f"| same | async save: stall | {median(md['stall']) * 1e3:.1f} ms | {mb / median(md['stall']):.2f} |",
        f"| same | async save: total | {median(md['total']) * 1e3:.1f} ms | {mb / median(md['total']):.2f} |",
        "",
        "| target | state | measured | verdict |",
        "|---|---|---:|---|",
    ]
    for st in sts:
        r = median(st["stall"]) / median(st["raw"])
        lines.append(
            f"| async stall from CUDA tensors ≤ 1.2x the raw pinned D2H copy | {st['gib']:g} GiB | {r:.2f}x | "
            f"{'met' if r <= 1.2 else '**not met**'} |"
        )
    lines.append("")
    return "\n".join(lines)


def write_doc(path: Path, section: str) -> None:
    text = path.read_text()
    if SECTION in text:
        start = text.index(SECTION)
        nxt = text.find("\n## ", start + len(SECTION))
        text = text[:start] + section + ("\n" + text[nxt + 1 :] if nxt != -1 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text.rstrip("\n") + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--gib", type=float, nargs="+", default=[1.0, 4.0], help="states per GPU for the stall (default 1 and 4 GiB)"
    )
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dir", type=Path, default=None, help="scratch directory (default: a temporary one)")
    ap.add_argument("--write-docs", type=Path, default=None, help="replace the GPU section of this file")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print(
            "gpu_stall.py: no CUDA device here (torch.cuda.is_available() is False, torch "
            f"{torch.__version__}): nothing measured. Run it on a machine with a GPU.",
            file=sys.stderr,
        )
        return 0
    command = "python benchmarks/gpu_stall.py " + " ".join(sys.argv[1:])
    work = Path(tempfile.mkdtemp(prefix="ckptdb-gpu-", dir=args.dir))
    try:
        t0 = time.perf_counter()
        sts = [bench_stall(g, args.reps, work) for g in args.gib]
        gc.collect()
        md = bench_model(work, max(2, args.reps // 2))
        section = render(sts, md, command)
        print(section)
        print(f"total {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        if args.write_docs:
            write_doc(args.write_docs, section)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
