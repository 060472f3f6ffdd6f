"""ckptdb's save and load on S3 against raw requests of the same bytes and against the peers (issue 12).

    python benchmarks/s3_save_bench.py [--server seaweedfs|moto] [--mib 256] [--reps 9]
        [--peers-python .venv-s3fs/bin/python | --no-peers]
        [--write-docs docs/benchmarks.md] [--plot docs/bench_s3.png]

One server (SeaweedFS ``weed mini`` on loopback by default) and one bucket for every method; the
same state (8 float32 tensors, ``--mib`` MiB, a fixed seed); ckptdb's part size and concurrency
(16 MiB parts, 8 in flight) everywhere a method takes them. Each repetition runs every method once,
in an order rotated by one each repetition, saves first, then the loads of what each method
saved. Reported: the median seconds per method, the ratio to the raw runs (raw median time /
method median time, so > 1 is faster than raw) and the paired ratio (the median over reps of raw
time / method time within the same rep: less moved by a slow stretch of the shared machine).

Saves:

* raw multipart (boto3): the bytes of ``torch.save(state)`` (serialised beforehand, not timed)
  uploaded by a plain boto3 thread pool (benchmarks/s3_clients.py ``boto3_put``): the baseline;
* raw multipart + CRC32C: the same with the checksums ckptdb sends (a CRC32C per part, the whole
  object's at completion), which the server verifies: what that costs, apart from ckptdb;
* ckptdb save: ``FileCheckpointManager("s3://...", catalog=<SQLite>)`` ``begin_checkpoint`` /
  ``save_state`` / ``commit_checkpoint``: serialisation, xxh3 + CRC32C, the multipart upload and
  the catalog commit, all timed;
* DCP FsspecWriter / s3fs and torch.save -> s3fs: benchmarks/s3_peers.py, in a child interpreter
  that has s3fs (``--peers-python``; s3fs's aiobotocore pins an older botocore than ckptdb's dev
  environment, so it lives in its own venv: see that file).

Loads: raw ranged GETs (boto3, a fresh buffer); ckptdb ``load_checkpoint`` with the default
``verify="digest"`` and with ``verify="size"``; DCP ``FsspecReader``; ``torch.load`` from s3fs.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.s3_clients import boto3_get, boto3_put
from benchmarks.s3_peers import make_state, state_sha1
from ckptdb import FileCheckpointManager
from ckptdb.storage.s3client import DEFAULT_CONCURRENCY, DEFAULT_PART_SIZE
from ckptdb.testing.s3servers import S3Server, start_server

SECTION = "## S3: ckptdb against raw requests and the peers"
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PEERS_PYTHON = str(ROOT / ".venv-s3fs" / "bin" / "python")  # `make bench-s3` creates it

RAW_PUT = "raw multipart upload (boto3)"
RAW_PUT_CRC = "raw multipart + CRC32C (boto3)"
CK_SAVE = "ckptdb save"
DCP_SAVE = "DCP FsspecWriter / s3fs"
TS_SAVE = "torch.save -> s3fs"
RAW_GET = "raw ranged GETs (boto3)"
CK_LOAD = "ckptdb load (verify=digest)"
CK_LOAD_SIZE = "ckptdb load (verify=size)"
DCP_LOAD = "DCP FsspecReader / s3fs"
TS_LOAD = "torch.load <- s3fs"


class Peers:
    """benchmarks/s3_peers.py in a child interpreter, one command at a time."""

    def __init__(self, python: str, srv: S3Server, bucket: str, mib: int, part: int, conc: int) -> None:
        here = Path(__file__).resolve().parent
        self.proc = subprocess.Popen(
            [
                python,
                str(here / "s3_peers.py"),
                f"--endpoint={srv.endpoint}",
                f"--key={srv.access_key}",
                f"--secret={srv.secret_key}",
                f"--region={srv.region}",
                f"--bucket={bucket}",
                f"--mib={mib}",
                f"--part={part}",
                f"--concurrency={conc}",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.hello = self._reply()

    def _reply(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the peers' child ended (exit status {self.proc.wait()})")
        return dict(json.loads(line))

    def run(self, op: str, method: str, name: str) -> float:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, "method": method, "name": name}) + "\n")
        self.proc.stdin.flush()
        return float(self._reply()["sec"])

    def close(self) -> None:
        if self.proc.poll() is None and self.proc.stdin is not None:
            self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


def _timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) of ``fn()``."""
    c, t = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - t, time.process_time() - c


class Results:
    def __init__(self) -> None:
        self.sec: dict[str, list[float]] = {}
        self.cpu: dict[str, list[float]] = {}

    def add(self, name: str, sec: float, cpu: float | None = None) -> None:
        self.sec.setdefault(name, []).append(sec)
        if cpu is not None:
            self.cpu.setdefault(name, []).append(cpu)

    def med(self, name: str) -> float:
        return statistics.median(self.sec[name])

    def ratio(self, base: str, name: str) -> float:
        return self.med(base) / self.med(name)

    def paired(self, base: str, name: str) -> float:
        return statistics.median(b / m for b, m in zip(self.sec[base], self.sec[name], strict=True))


def run(args: argparse.Namespace) -> tuple[Results, dict[str, Any]]:
    part, conc = DEFAULT_PART_SIZE, DEFAULT_CONCURRENCY
    state = make_state(args.mib)
    buf = io.BytesIO()
    torch.save(state, buf)
    data = memoryview(buf.getvalue())
    nbytes = len(data)
    res = Results()
    tmp = Path(tempfile.mkdtemp(prefix="ckptdb-s3bench-"))
    info: dict[str, Any] = {"bytes": nbytes, "part": part, "conc": conc, "reps": args.reps, "server": args.server}
    peers: Peers | None = None
    try:
        with start_server(args.server) as srv:
            c = srv.boto3_client()
            bucket = srv.new_bucket()
            mgr = FileCheckpointManager(
                f"s3://{bucket}/run", catalog=f"sqlite:///{tmp}/catalog.db", storage_options=srv.storage_options()
            )
            if not args.no_peers:
                peers = Peers(args.peers_python, srv, bucket, args.mib, part, conc)
                if peers.hello["sha1"] != state_sha1(state):
                    raise RuntimeError("the peers' child made a different state (another torch version?)")
                info["peers_torch"] = peers.hello["torch"]
            step = [0]

            def ck_save() -> None:
                step[0] += 1
                mgr.begin_checkpoint(step_nr=step[0])
                mgr.save_state(state)
                mgr.commit_checkpoint()

            def raw_get(name: str) -> None:
                out = memoryview(bytearray(nbytes))  # a fresh buffer, as a load needs
                boto3_get(c, bucket, name, out, part, conc)

            # warm-up (not timed): the server allocates its volumes on the first writes
            boto3_put(c, bucket, "warmup", data, part, conc)
            ck_save()
            if peers is not None:
                peers.run("save", "ts", "warmup-ts")
                peers.run("save", "dcp", "warmup-dcp")
            saves: list[tuple[str, Callable[[int], tuple[float, float | None]]]] = [
                (RAW_PUT, lambda i: _timed(lambda: boto3_put(c, bucket, f"raw{i}", data, part, conc))),
                (RAW_PUT_CRC, lambda i: _timed(lambda: boto3_put(c, bucket, f"rawc{i}", data, part, conc, crc=True))),
                (CK_SAVE, lambda i: _timed(ck_save)),
            ]
            loads: list[tuple[str, Callable[[int], tuple[float, float | None]]]] = [
                (RAW_GET, lambda i: _timed(lambda: raw_get(f"raw{i}"))),
                (CK_LOAD, lambda i: _timed(lambda: _ck_load(mgr, i + 2, state, "digest"))),
                (CK_LOAD_SIZE, lambda i: _timed(lambda: _ck_load(mgr, i + 2, state, "size"))),
            ]
            if peers is not None:
                p = peers
                saves += [
                    (DCP_SAVE, lambda i: (p.run("save", "dcp", f"dcp{i}"), None)),
                    (TS_SAVE, lambda i: (p.run("save", "ts", f"ts{i}.pt"), None)),
                ]
                loads += [
                    (DCP_LOAD, lambda i: (p.run("load", "dcp", f"dcp{i}"), None)),
                    (TS_LOAD, lambda i: (p.run("load", "ts", f"ts{i}.pt"), None)),
                ]
            la0 = os.getloadavg()[0]
            t0 = time.perf_counter()
            for i in range(args.reps):
                for group in (saves, loads):
                    k = i % len(group)
                    for name, fn in group[k:] + group[:k]:
                        if name == CK_SAVE and step[0] != i + 1:
                            raise AssertionError("ckptdb steps out of order")
                        sec, cpu = fn(i)
                        res.add(name, sec, cpu)
                print(
                    f"  rep {i + 1}/{args.reps}: "
                    + "  ".join(f"{n.split(' (')[0][:14]} {res.sec[n][-1]:.2f}s" for n, _ in saves + loads),
                    flush=True,
                )
            info["seconds"] = time.perf_counter() - t0
            info["load"] = (la0, os.getloadavg()[0])
            mgr.close()
    finally:
        if peers is not None:
            peers.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return res, info


def _ck_load(mgr: FileCheckpointManager, step_nr: int, state: dict[str, Any], verify: str) -> None:
    out = mgr.load_checkpoint(step_nr, verify=verify)
    if not torch.equal(out["model"]["layer7"], state["model"]["layer7"]):
        raise AssertionError("ckptdb loaded other bytes")


def report(res: Results, info: dict[str, Any], peers: bool) -> tuple[str, dict[str, bool]]:
    mb = info["bytes"] / 1e6
    lines = [
        f"server={info['server']} file={info['bytes'] / 2**20:.0f} MiB part={info['part'] >> 20} MiB "
        f"concurrency={info['conc']} reps={info['reps']} (median of each method; the order rotates every rep)",
        "",
        "| method | median s | MB/s | ratio to raw | paired ratio | runs (s) | client CPU s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for base, names in (
        (RAW_PUT, [RAW_PUT, RAW_PUT_CRC, CK_SAVE, DCP_SAVE, TS_SAVE]),
        (RAW_GET, [RAW_GET, CK_LOAD, CK_LOAD_SIZE, DCP_LOAD, TS_LOAD]),
    ):
        for n in names:
            if n not in res.sec:
                continue
            runs = ", ".join(f"{s:.2f}" for s in res.sec[n])
            cpu = f"{statistics.median(res.cpu[n]):.2f}" if n in res.cpu else "(child)"
            lines.append(
                f"| {n} | {res.med(n):.2f} | {mb / res.med(n):.0f} | {res.ratio(base, n):.2f} "
                f"| {res.paired(base, n):.2f} | {runs} | {cpu} |"
            )
    verdict: dict[str, bool] = {
        "save >= 0.9x raw multipart": res.ratio(RAW_PUT, CK_SAVE) >= 0.9,
        "load >= 0.9x raw ranged GETs": res.ratio(RAW_GET, CK_LOAD) >= 0.9,
    }
    if peers:
        best = min(res.med(DCP_SAVE), res.med(TS_SAVE))
        verdict["save >= the fastest peer"] = res.med(CK_SAVE) <= best
    lines.append("")
    for k, ok in verdict.items():
        lines.append(f"- {k}: {'met' if ok else 'NOT met'}")
    return "\n".join(lines), verdict


def plot(res: Results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [
        ("saves: raw multipart time / method time", RAW_PUT, [RAW_PUT, RAW_PUT_CRC, CK_SAVE, DCP_SAVE, TS_SAVE]),
        ("loads: raw ranged GET time / method time", RAW_GET, [RAW_GET, CK_LOAD, CK_LOAD_SIZE, DCP_LOAD, TS_LOAD]),
    ]
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.5))
    for ax, (title, base, names) in zip(axes, groups, strict=True):
        names = [n for n in names if n in res.sec]
        vals = [res.ratio(base, n) for n in names]
        colors = [
            "tab:gray" if n.startswith("raw") else "tab:blue" if n.startswith("ckptdb") else "tab:orange" for n in names
        ]
        ax.barh(range(len(names)), vals, color=colors)
        for y, v in enumerate(vals):
            ax.text(v, y, f" {v:.2f}", va="center", fontsize=8)
        ax.axvline(0.9, color="red", lw=1, ls="--", label="0.9x target")
        ax.axvline(1.0, color="black", lw=1)
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def write_doc(path: Path, section: str) -> None:
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    if SECTION in text:
        start = text.index(SECTION)
        nxt = text.find("\n## ", start + len(SECTION))
        text = text[:start] + section + ("\n" + text[nxt + 1 :] if nxt != -1 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text.rstrip("\n") + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", default="seaweedfs", choices=["seaweedfs", "moto"])
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument(
        "--peers-python",
        default=os.environ.get("CKPTDB_S3FS_PYTHON", DEFAULT_PEERS_PYTHON),
        help="an interpreter with torch and s3fs (default $CKPTDB_S3FS_PYTHON or .venv-s3fs/bin/python)",
    )
    ap.add_argument("--no-peers", action="store_true", help="skip DCP / torch.save over s3fs")
    ap.add_argument("--write-docs", type=Path, default=None, help="replace the S3 section of this file")
    ap.add_argument("--plot", type=Path, default=None, help="write the ratio plot here")
    args = ap.parse_args()
    if not args.no_peers and not Path(args.peers_python).exists():
        raise SystemExit(
            f"no interpreter with s3fs at {args.peers_python}: `make bench-s3` makes one (see "
            "benchmarks/s3_peers.py), or pass --peers-python or --no-peers"
        )
    res, info = run(args)
    table, _ = report(res, info, not args.no_peers)
    print(table)
    machine = (
        f"Machine: {os.cpu_count()} CPU cores shared by the server, this process, the peers' child and other "
        f"jobs (load average {info['load'][0]:.1f} at the start, {info['load'][1]:.1f} at the end); "
        f"{info['seconds']:.0f} s for the timed reps."
    )
    print(machine)
    if args.plot:
        plot(res, args.plot)
    if args.write_docs:
        argv = [a.replace(args.peers_python, "<a venv with s3fs>/bin/python") for a in sys.argv[1:]]
        cmd = " ".join(["python benchmarks/s3_save_bench.py", *argv])
        write_doc(
            args.write_docs,
            f"{SECTION}\n\n<!-- written by benchmarks/s3_save_bench.py (make bench-s3); the next section is by hand -->"
            f"\n\n![S3 ratios](bench_s3.png)\n\n```\n{cmd}\n```\n\n{machine}\n\n{table}\n",
        )


if __name__ == "__main__":
    main()
