"""Save and load throughput: ckptdb against the disk's limit and its peers, side by side, in one run.

    python benchmarks/save_load_bench.py                   # ~1 GiB of float32 state, 3 repetitions
    python benchmarks/save_load_bench.py --gib 1 4 --reps 3

Every figure comes from this run, on the same data, with the methods alternating within each
repetition (the host is shared and noisy: only ratios measured together count). Each row is the
median and min-max over ``--reps`` repetitions; GB = 1e9 bytes of tensor payload.

- writes: raw ``os.write`` of every tensor's bytes + ``fsync`` (the limit), ``torch.save`` + fsync,
  safetensors ``save_file`` + fsync, ``torch.distributed.checkpoint`` (2 threads, ``sync_files``),
  ckptdb synchronous (the whole ``begin -> save_state -> commit``, hashes and catalog included),
  ckptdb asynchronous (stall: until ``commit_checkpoint`` returns; total: until committed), and
  the copy of the state into preallocated buffers that the stall is measured against;
- loads, cold (``drop_caches`` before each, when running as root): raw read of the files into fresh
  memory (the limit), ``torch.load(weights_only=True)``, ckptdb ``load_checkpoint`` with digest
  verification and every tensor page touched, and ckptdb's lazy mmap load (``verify="size"``);
- catalog overhead per checkpoint (the begin and commit transactions) on SQLite and PostgreSQL;
- peak memory of each save, in a fresh interpreter (``VmHWM`` reset just before the save).

Writes the "Save and load throughput" section of docs/benchmarks.md and docs/bench_save_load.png.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ckptdb import FileCheckpointManager, LoadOptions, SaveOptions  # noqa: E402
from ckptdb.catalog import Catalog, ShardInfo, WriterInfo  # noqa: E402
from ckptdb.catalog.session import dispose_engines  # noqa: E402
from ckptdb.storage.writer import StepWriter, TorchFile  # noqa: E402

SECTION = "## Save and load throughput"
PG_DEFAULT = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
GB = 1e9


# -- the state -------------------------------------------------------------------------------


def make_state(total_gib: float, seed: int = 0) -> dict[str, Any]:
    """A transformer-like state: model ~50 %, Adam-like optimizer ~50 %, float32, random."""
    g = torch.Generator().manual_seed(seed)
    # 4 layers of qkv / proj / fc1 / fc2 plus an embedding: ~ (16 d + 17) d + 4 * 12 d^2 floats
    per_model = total_gib * (1 << 30) / 2 / 4
    d = 64
    while (16 * (d + 64) + 17) * (d + 64) + 48 * (d + 64) ** 2 <= per_model:
        d += 64
    model: dict[str, torch.Tensor] = {"embed.weight": torch.randn(16 * d + 17, d, generator=g)}
    for i in range(4):
        p = f"layers.{i}."
        model[p + "attn.qkv.weight"] = torch.randn(3 * d, d, generator=g)
        model[p + "attn.qkv.bias"] = torch.randn(3 * d, generator=g)
        model[p + "attn.proj.weight"] = torch.randn(d, d, generator=g)
        model[p + "ln1.weight"] = torch.ones(d)
        model[p + "fc1.weight"] = torch.randn(4 * d, d, generator=g)
        model[p + "fc2.weight"] = torch.randn(d, 4 * d, generator=g)
        model[p + "ln2.weight"] = torch.ones(d)
    optim = {
        "state": {i: {"step": torch.tensor(10.0), "exp_avg": t * 0.1} for i, t in enumerate(model.values())},
        "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8, "params": list(range(len(model)))}],
    }
    return {"model": model, "optimizer": optim, "step_nr": 1000}


def tensors(state: dict[str, Any]) -> list[torch.Tensor]:
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

    walk(state)
    return out


def payload_bytes(state: dict[str, Any]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors(state))


def flat(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v for k, v in state["model"].items()}
    for i, s in state["optimizer"]["state"].items():
        for k, v in s.items():
            out[f"optimizer.{i}.{k}"] = v
    return out


# -- helpers ---------------------------------------------------------------------------------


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            fsync_path(p)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(fd)
    os.close(fd)


def clear_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    os.sync()


def delete_all(mgr: FileCheckpointManager) -> None:
    for step in mgr.get_step_numbers():
        mgr.delete_checkpoint(step)


def can_drop_caches() -> bool:
    return os.geteuid() == 0 and os.access("/proc/sys/vm/drop_caches", os.W_OK)


def drop_caches() -> None:
    gc.collect()
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def timed(fn: Callable[[], Any]) -> float:
    gc.collect()
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def touch_all(obj: Any) -> None:
    """Read one float per 4 KiB page of every tensor (what materialising an mmap'd tensor costs)."""
    for t in tensors(obj):
        if t.numel() > 1024 and t.is_contiguous():
            t.reshape(-1)[:: 4096 // t.element_size()].sum()
        else:
            t.sum()


# -- write methods -----------------------------------------------------------------------------


def raw_write(state: dict[str, Any], d: Path) -> None:
    """The limit: every tensor's bytes os.write()n into one file per part (model / rest), fsync."""
    for name, part in (("model.bin", state["model"]), ("rank_0.bin", state["optimizer"])):
        fd = os.open(d / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for t in tensors(part):
                view = memoryview(t.numpy()).cast("B")
                while view:
                    view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)


def torch_save(state: dict[str, Any], d: Path) -> None:
    rest = {k: v for k, v in state.items() if k != "model"}
    for name, obj in (("model.pt", {"model": state["model"], "model_key": "model"}), ("rank_0.pt", rest)):
        with open(d / name, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())


def safetensors_save(state: dict[str, Any], d: Path) -> None:
    from safetensors.torch import save_file

    fl = flat(state)
    save_file({k: v for k, v in fl.items() if k.startswith("model.")}, d / "model.safetensors")
    save_file({k: v for k, v in fl.items() if not k.startswith("model.")}, d / "rank_0.safetensors")
    fsync_path(d / "model.safetensors")
    fsync_path(d / "rank_0.safetensors")


def dcp_save(state: dict[str, Any], d: Path) -> None:
    import torch.distributed.checkpoint as dcp

    sd = {"model": state["model"], "optimizer": {str(k): v for k, v in state["optimizer"]["state"].items()}}
    with warnings.catch_warnings():  # "torch.distributed is disabled ...: assuming a single process"
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(sd, storage_writer=dcp.FileSystemWriter(str(d / "dcp"), thread_count=2, sync_files=True))


# -- the run ---------------------------------------------------------------------------------


class Results:
    def __init__(self) -> None:
        self.rows: dict[tuple[float, str], list[float]] = {}
        self.kind: dict[str, str] = {}

    def add(self, gib: float, name: str, seconds: float, kind: str) -> None:
        self.rows.setdefault((gib, name), []).append(seconds)
        self.kind[name] = kind


def bench_size(gib: float, reps: int, base: Path, res: Results, log: Callable[[str], None]) -> dict[str, Any]:
    state = make_state(gib)
    nbytes = payload_bytes(state)
    log(f"[{gib} GiB] payload {nbytes / GB:.3f} GB in {len(tensors(state))} tensors")
    work = base / "w"
    ck_sync_dir, ck_async_dir = base / "ck_sync", base / "ck_async"
    for p in (work, ck_sync_dir, ck_async_dir):
        clear_dir(p)
    sync_mgr = FileCheckpointManager(ck_sync_dir)
    async_mgr = FileCheckpointManager(ck_async_dir, save_options=SaveOptions(blocking=False))
    step = [0]

    def ck_sync() -> None:
        step[0] += 1
        sync_mgr.begin_checkpoint(step[0])
        sync_mgr.save_state(state)
        sync_mgr.commit_checkpoint()

    def ck_async() -> tuple[float, float]:
        step[0] += 1
        gc.collect()
        t = time.perf_counter()
        async_mgr.begin_checkpoint(step[0])
        async_mgr.save_state(state)
        async_mgr.commit_checkpoint()
        stall = time.perf_counter() - t
        async_mgr.wait()
        return stall, time.perf_counter() - t

    # warm-up (untimed): the async manager allocates its staging buffers once, then reuses them
    ck_async()
    delete_all(async_mgr)
    sources = [t.untyped_storage() for t in tensors(state)]
    prealloc = [torch.empty(s.nbytes(), dtype=torch.uint8).untyped_storage() for s in sources]
    for a, src in zip(prealloc, sources, strict=True):
        a.copy_(src)

    def memcpy() -> None:  # what staging does at best: one memcpy per storage into faulted-in memory
        for a, src in zip(prealloc, sources, strict=True):
            a.copy_(src)

    def writer_only() -> None:
        step[0] += 1
        w = StepWriter(work, step[0], "bench", hash_algorithm="xxh3_128")
        w.open()
        rest = {k: v for k, v in state.items() if k != "model"}
        w.write_torch_many(
            [TorchFile("model.pt", {"model": state["model"], "model_key": "model"}), TorchFile("rank_0.pt", rest)]
        )
        w.finalize()

    # import and warm up the peers once (untimed): their first call pays imports and thread start-up
    clear_dir(work)
    small = {"model": {"w": torch.zeros(4)}, "optimizer": {"state": {0: {"exp_avg": torch.zeros(4)}}}}
    safetensors_save(small, work)
    dcp_save(small, work)

    writes: list[tuple[str, Callable[[], None]]] = [
        ("raw write + fsync (limit)", lambda: raw_write(state, work)),
        ("torch.save + fsync", lambda: torch_save(state, work)),
        ("safetensors save_file + fsync", lambda: safetensors_save(state, work)),
        ("DCP save (2 threads, sync_files)", lambda: dcp_save(state, work)),
        ("ckptdb sync save", ck_sync),
        ("ckptdb file writer alone (no catalog)", writer_only),
    ]
    for rep in range(reps):
        order = writes[rep % len(writes) :] + writes[: rep % len(writes)]
        for name, fn in order:
            clear_dir(work)
            delete_all(sync_mgr)
            os.sync()
            res.add(gib, name, timed(fn), "write")
            log(f"  rep {rep} {name}: {res.rows[(gib, name)][-1]:.3f} s")
        clear_dir(work)
        delete_all(async_mgr)
        os.sync()
        stall, total = ck_async()
        res.add(gib, "ckptdb async save: stall", stall, "stall")
        res.add(gib, "ckptdb async save: total", total, "write")
        res.add(gib, "copy state into preallocated buffers", timed(memcpy), "stall")
        log(f"  rep {rep} async stall {stall:.3f} s total {total:.3f} s")
    prealloc.clear()
    delete_all(async_mgr)
    async_mgr._staging.release()
    async_mgr.close()
    clear_dir(work)

    # loads: the last committed sync checkpoint
    delete_all(sync_mgr)
    ck_sync()
    last = step[0]
    step_dir = ck_sync_dir / f"step_{last}"
    files = [step_dir / "model.pt", step_dir / "rank_0.pt"]
    cold = can_drop_caches()
    temp = "cold" if cold else "warm (drop_caches not permitted)"

    def raw_read() -> None:  # one stream, into freshly allocated memory (what an eager load must do)
        for p in files:
            buf = torch.empty(p.stat().st_size, dtype=torch.uint8)
            with open(p, "rb", buffering=0) as f:
                f.readinto(memoryview(buf.numpy()))  # type: ignore[arg-type]

    def raw_read_limit() -> None:  # the device: both files at once, into a reused 8 MiB buffer each
        def read(p: Path) -> None:
            buf = bytearray(8 << 20)
            with open(p, "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass

        threads = [threading.Thread(target=read, args=(p,)) for p in files]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def torch_load() -> None:
        for p in files:
            torch.load(p, weights_only=True)

    def ck_load() -> None:
        touch_all(sync_mgr.load_checkpoint(last))

    def ck_load_eager() -> None:
        m = FileCheckpointManager(ck_sync_dir, load_options=LoadOptions(mmap=False))
        m.load_checkpoint(last)

    def ck_lazy() -> None:
        sync_mgr.load_checkpoint(last, verify="size")

    loads: list[tuple[str, Callable[[], None]]] = [
        (f"raw read, 2 files in parallel, reused buffers, {temp} (limit)", raw_read_limit),
        (f"raw read into fresh memory, 1 stream, {temp}", raw_read),
        (f"torch.load(weights_only=True), {temp}", torch_load),
        (f"ckptdb load_checkpoint (digest, mmap) + touch all, {temp}", ck_load),
        (f"ckptdb load_checkpoint (digest, mmap=False), {temp}", ck_load_eager),
        (f"ckptdb lazy load (verify='size', mmap), {temp}", ck_lazy),
    ]
    for rep in range(reps):
        order = loads[rep % len(loads) :] + loads[: rep % len(loads)]
        for name, fn in order:
            if cold:
                drop_caches()
            res.add(gib, name, timed(fn), "lazy" if "lazy" in name else "read")
            log(f"  rep {rep} {name}: {res.rows[(gib, name)][-1]:.3f} s")
    sync_mgr.close()
    info = {"payload_bytes": nbytes, "file_bytes": sum(p.stat().st_size for p in files), "cold": cold}

    gc.collect()
    dispose_engines()
    shutil.rmtree(base, ignore_errors=True)
    return info


def catalog_overhead(url: str, n: int) -> list[float]:
    """Seconds per checkpoint for the begin and commit transactions (3 files, one score)."""
    cat = Catalog(url)
    run = cat.ensure_run(f"bench-{uuid.uuid4().hex[:8]}", "/bench")
    w = WriterInfo("bench", os.getpid(), None, "bench", torch.__version__, "3", 1)
    files = [ShardInfo(p, 1 << 20, "xxh3_128", "0" * 32, 0, "rank") for p in ("model.pt", "rank_0.pt", "score.txt")]
    out = []
    for i in range(n + 2):
        t = time.perf_counter()
        c = cat.begin(run.id, i, uuid.uuid4().hex[:16], f"step_{i}", w, hash_algorithm="xxh3_128", overwrite=False)
        cat.commit(c.id, files, {"score": 0.5}, None, ("bench", os.getpid()))
        if i >= 2:  # the first two warm the connection pool and statement caches
            out.append(time.perf_counter() - t)
    return out


def pg_database(admin_url: str) -> tuple[str, Callable[[], None]] | None:
    try:
        from sqlalchemy import create_engine, text
        from sqlalchemy.engine import make_url

        eng = create_engine(admin_url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})
        name = f"ckptdb_bench_{uuid.uuid4().hex[:8]}"
        with eng.connect() as c:
            c.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as e:  # noqa: BLE001 - no server: the row says so
        print(f"PostgreSQL not measured: {e}".splitlines()[0], file=sys.stderr)
        return None

    def drop() -> None:
        dispose_engines()
        with eng.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        eng.dispose()

    return make_url(admin_url).set(database=name).render_as_string(hide_password=False), drop


MEM_CHILD = r"""
import gc, json, os, sys, time, shutil
sys.path.insert(0, {root!r})
from benchmarks.save_load_bench import make_state, torch_save, payload_bytes
from ckptdb import FileCheckpointManager, SaveOptions
mode, gib, d = sys.argv[1], float(sys.argv[2]), sys.argv[3]
from pathlib import Path
d = Path(d); shutil.rmtree(d, ignore_errors=True); d.mkdir(parents=True)
state = make_state(gib)
mgr = None
if mode.startswith("ckptdb"):
    mgr = FileCheckpointManager(d / "c", save_options=SaveOptions(blocking=mode == "ckptdb_sync"))
gc.collect()
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0
before = rss()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5\n")
if mode == "torch_save":
    torch_save(state, d)
else:
    for step in (1, 2):
        mgr.begin_checkpoint(step)
        mgr.save_state(state)
        mgr.commit_checkpoint()
    mgr.wait()
print(json.dumps({{"before": before, "peak": hwm(), "state": payload_bytes(state)}}))
shutil.rmtree(d, ignore_errors=True)
"""


def peak_memory(gib: float, base: Path) -> dict[str, dict[str, int]]:
    out = {}
    code = MEM_CHILD.format(root=str(ROOT))
    for mode in ("torch_save", "ckptdb_sync", "ckptdb_async"):
        r = subprocess.run(
            ["/bin/sh", "-c", 'exec "$0" -c "$1" "$2" "$3" "$4"', sys.executable, code, mode, str(gib), str(base)],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        if r.returncode != 0:
            print(f"peak memory {mode} failed: {r.stderr[-500:]}", file=sys.stderr)
            continue
        out[mode] = json.loads(r.stdout.strip().splitlines()[-1])
    shutil.rmtree(base, ignore_errors=True)
    return out


# -- reporting -------------------------------------------------------------------------------

NOTES = [
    "**raw write + fsync** is the limit for saves: the tensor bytes `os.write`n into two files "
    "(model / rest), each fsynced. No format, no hash. Every save row writes the same bytes (plus a "
    "few KB of format) and ends durable (fsync).",
    "**ckptdb sync save** is the whole `begin_checkpoint -> save_state -> commit_checkpoint`: the "
    "catalog's begin and commit transactions, xxh3-128 of every byte, both files fsynced, directory "
    "fsyncs and the rename. **ckptdb file writer alone** is its data path without the catalog "
    "(`StepWriter`: torch's zip format without CRC32, written to the fd, streamed writeback, both "
    "files in parallel).",
    "**raw read (limit)** reads both files at once into reused buffers after `drop_caches`: the "
    "device. `raw read into fresh memory` is what any eager load also pays: page faults on new memory.",
    "**ckptdb load_checkpoint (digest, mmap) + touch all** is the default load: digests of both "
    "files computed in parallel (the cold read), then `torch.load(mmap=True)` and one read per 4 KiB "
    "page of every tensor, so the tensors are resident. `mmap=False` reads the (now cached) files "
    "again into fresh memory: page faults make it slower.",
    "**ckptdb lazy load** (`verify='size'`, mmap) reads no tensor data: its time is the catalog "
    "queries and the zip directory, the same at every size. It checks only sizes (see "
    "docs/architecture.md, Loading).",
    "The host is a shared 2-vCPU VM: single figures move by ±30 % between runs; ratios within one "
    "run are what the targets are judged on. The min-max columns show the spread.",
]


def fmt_row(name: str, xs: list[float], nbytes: int, limit: float | None, kind: str) -> str:
    med = statistics.median(xs)
    rng = f"{min(xs):.3f}-{max(xs):.3f}"
    if kind == "lazy":
        return f"| {name} | {med * 1e3:.1f} ms | {min(xs) * 1e3:.1f}-{max(xs) * 1e3:.1f} ms | (lazy) | |"
    gbs = nbytes / GB / med
    ratio = f"{limit / med:.2f}x" if limit else ""
    if kind == "stall":
        return f"| {name} | {med:.3f} s | {rng} s | {gbs:.2f} | |"
    return f"| {name} | {med:.3f} s | {rng} s | {gbs:.2f} | {ratio} |"


def render(res: Results, infos: dict[float, dict[str, Any]], cat: dict[str, list[float]], mem: dict, args: Any) -> str:
    lines = [SECTION, ""]
    lines.append(
        f"`python benchmarks/save_load_bench.py --gib {' '.join(str(g) for g in args.gib)} --reps {args.reps}` "
        f"(also `make bench`), run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on this machine "
        f"({os.cpu_count()} CPUs, torch {torch.__version__}). Every figure below is from that one run, "
        "methods alternating within each repetition; median and min-max over the repetitions; "
        "GB/s = 1e9 bytes of tensor payload per second; *vs limit* = the limit's median time / this "
        "row's median time (above 1.00x: faster than the limit)."
    )
    lines.append("")
    for gib, info in infos.items():
        nbytes = info["payload_bytes"]
        lines.append(f"### {gib:g} GiB state ({nbytes / GB:.2f} GB payload, files {info['file_bytes'] / GB:.2f} GB)")
        lines.append("")
        lines.append("| operation | median | min-max | GB/s | vs limit |")
        lines.append("|---|---:|---:|---:|---:|")
        names = [n for (g, n) in res.rows if g == gib]
        wlimit = statistics.median(res.rows[(gib, "raw write + fsync (limit)")])
        rlimit_name = next(n for n in names if n.startswith("raw read") and n.endswith("(limit)"))
        rlimit = statistics.median(res.rows[(gib, rlimit_name)])
        for n in names:
            kind = res.kind[n]
            lim = wlimit if kind == "write" else rlimit if kind == "read" else None
            lines.append(fmt_row(n, res.rows[(gib, n)], nbytes, lim, kind))
        med = {n: statistics.median(res.rows[(gib, n)]) for n in names}
        stall = med["ckptdb async save: stall"]
        cp = med["copy state into preallocated buffers"]
        sync = med["ckptdb sync save"]
        ck_load = next(v for n, v in med.items() if n.startswith("ckptdb load_checkpoint (digest, mmap)"))
        lazy = next(v for n, v in med.items() if n.startswith("ckptdb lazy load"))

        def verdict(ok: bool) -> str:
            return "met" if ok else "**not met**"

        lines.append("")
        lines.append("| target (medians of this run) | measured | verdict |")
        lines.append("|---|---:|---|")
        lines.append(f"| sync save ≥ 0.95x raw write+fsync | {wlimit / sync:.2f}x | {verdict(wlimit / sync >= 0.95)} |")
        for peer in ("torch.save + fsync", "safetensors save_file + fsync"):
            lines.append(f"| sync save vs {peer} (≥ 1.00x) | {med[peer] / sync:.2f}x | {verdict(med[peer] >= sync)} |")
        lines.append(
            f"| async stall ≤ 1.5x copy into preallocated buffers | {stall / cp:.2f}x | {verdict(stall <= 1.5 * cp)} |"
        )
        ok_load = verdict(rlimit / ck_load >= 0.9)
        lines.append(
            f"| load (digest, every page touched) ≥ 0.9x raw cold read | {rlimit / ck_load:.2f}x | {ok_load} |"
        )
        lines.append(f"| lazy load returns in milliseconds | {lazy * 1e3:.0f} ms | {verdict(lazy < 0.1)} |")
        lines.append("")
        lines.append(
            "The async stall is `begin_checkpoint` + `save_state` (staging copy into the reused buffers) + "
            "`commit_checkpoint` (hand-off), measured from CPU tensors after one warm-up save. "
            "**The GPU stall (device-to-pinned-host copies) was not measured: no GPU on this machine.**"
        )
        lines.append("")
    lines.append("### Catalog overhead per checkpoint (begin + commit transactions, 3 files, 1 score)")
    lines.append("")
    lines.append("| catalog | median | min-max | n | target < 10 ms (median) |")
    lines.append("|---|---:|---:|---:|---|")
    for k, xs in cat.items():
        m = statistics.median(xs)
        ok = "met" if m < 0.010 else "**not met**"
        lines.append(f"| {k} | {m * 1e3:.2f} ms | {min(xs) * 1e3:.2f}-{max(xs) * 1e3:.2f} ms | {len(xs)} | {ok} |")
    lines.append("")
    if mem:
        lines.append(f"### Peak memory of a save ({args.mem_gib:g} GiB state; fresh interpreter, VmHWM)")
        lines.append("")
        lines.append("| save | state | RSS before | extra peak | extra / state | target |")
        lines.append("|---|---:|---:|---:|---:|---|")
        labels = {
            "torch_save": "torch.save (2 files)",
            "ckptdb_sync": "ckptdb sync (2 saves)",
            "ckptdb_async": "ckptdb async (2 saves)",
        }
        for k, v in mem.items():
            extra = v["peak"] - v["before"]
            r = extra / v["state"]
            target = {
                "ckptdb_sync": "extra ≤ 0.10: " + ("met" if r <= 0.10 else "**not met**"),
                "ckptdb_async": "one staged copy (≤ 1.10): " + ("met" if r <= 1.10 else "**not met**"),
            }.get(k, "")
            lines.append(
                f"| {labels[k]} | {v['state'] / 2**30:.2f} GiB | {v['before'] / 2**30:.2f} GiB | "
                f"{extra / 2**30:.2f} GiB | {r:.2f} | {target} |"
            )
        lines.append("")
    lines.append("![save and load throughput](bench_save_load.png)")
    lines.append("")
    lines.append("How to read this:")
    lines.append("")
    for note in NOTES:
        lines.append(f"- {note}")
    lines.append("")
    return "\n".join(lines)


def write_doc(path: Path, section: str) -> None:
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    if SECTION in text:
        start = text.index(SECTION)
        nxt = text.find("\n## ", start + len(SECTION))
        text = text[:start] + section + ("\n" + text[nxt + 1 :] if nxt != -1 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text.rstrip("\n") + "\n")


def plot(res: Results, infos: dict[float, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(infos)
    fig, axes = plt.subplots(1, len(sizes), figsize=(9 * len(sizes), 6), squeeze=False)
    for ax, gib in zip(axes[0], sizes, strict=True):
        nbytes = infos[gib]["payload_bytes"]
        names = [n for (g, n) in res.rows if g == gib and res.kind[n] in ("write", "read")]
        med = [nbytes / GB / statistics.median(res.rows[(gib, n)]) for n in names]
        lo = [m - nbytes / GB / max(res.rows[(gib, n)]) for n, m in zip(names, med, strict=True)]
        hi = [nbytes / GB / min(res.rows[(gib, n)]) - m for n, m in zip(names, med, strict=True)]
        colors = ["black" if "limit" in n else "tab:green" if n.startswith("ckptdb") else "tab:gray" for n in names]
        y = range(len(names))
        ax.barh(list(y), med, xerr=[lo, hi], color=colors, capsize=3)
        ax.set_yticks(list(y))
        ax.set_yticklabels(names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("GB/s (median, min-max)")
        ax.set_title(f"{gib:g} GiB state: saves (with fsync) and loads")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, nargs="+", default=[1.0], help="state sizes in GiB (default 1)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=ROOT / ".benchtmp", help="scratch directory (same disk as the repo)")
    ap.add_argument("--pg-url", default=os.environ.get("CKPTDB_BENCH_PG_URL", PG_DEFAULT), help="'' to skip")
    ap.add_argument("--catalog-n", type=int, default=30)
    ap.add_argument("--mem-gib", type=float, default=None, help="state size for peak memory (default: smallest)")
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    ap.add_argument("--plot", type=Path, default=ROOT / "docs" / "bench_save_load.png")
    ap.add_argument("--no-doc", action="store_true", help="print the table only")
    args = ap.parse_args()
    args.mem_gib = args.mem_gib or min(args.gib)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    res = Results()
    infos = {}
    for gib in args.gib:
        infos[gib] = bench_size(gib, args.reps, args.dir / f"g{gib:g}", res, log)
    cat: dict[str, list[float]] = {}
    args.dir.mkdir(parents=True, exist_ok=True)
    db = args.dir / f"bench-{uuid.uuid4().hex[:6]}.db"
    cat["SQLite (WAL, synchronous=FULL)"] = catalog_overhead(f"sqlite:///{db}", args.catalog_n)
    dispose_engines()
    db.unlink(missing_ok=True)
    pg = pg_database(args.pg_url) if args.pg_url else None
    if pg is not None:
        url, drop = pg
        try:
            cat["PostgreSQL (local)"] = catalog_overhead(url, args.catalog_n)
        finally:
            drop()
    log("peak memory ...")
    mem = peak_memory(args.mem_gib, args.dir / "mem")
    section = render(res, infos, cat, mem, args)
    print(section)
    if not args.no_doc:
        write_doc(args.doc, section)
        plot(res, infos, args.plot)
        log(f"wrote {args.doc} and {args.plot}")
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
