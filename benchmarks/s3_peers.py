"""The peers of benchmarks/s3_save_bench.py, run in their own interpreter (a venv with s3fs).

Not run by hand: s3_save_bench.py starts it as a child with ``--peers-python`` and drives it
over stdin/stdout, one JSON object a line each way, so that its runs alternate with ckptdb's.
s3fs pulls aiobotocore, which pins botocore to an older release than ckptdb's dev environment
has, so it lives in a separate venv (docs/benchmarks.md, "S3: ckptdb against raw requests and
the peers"):

    python3 -m venv .venv-s3fs && .venv-s3fs/bin/pip install torch==2.13.0 s3fs numpy

(``make bench-s3`` does it; pin torch to the main venv's version: the state is made by both
interpreters from the same seed and must be the same bytes.)

This file imports only torch, s3fs and the standard library (not ckptdb). The state is made the
same way as in s3_save_bench.py (``make_state``: the same seed and shapes, hence the same bytes);
the first line it prints carries a SHA-1 of the tensors so that the parent can check it.

Methods (``--part`` and ``--concurrency`` as ckptdb's):

* ``dcp``: ``torch.distributed.checkpoint.save`` / ``load`` with ``FsspecWriter`` / ``FsspecReader``
  over s3fs, ``thread_count=concurrency`` (DCP's own parallelism: one file per thread),
  s3fs ``default_block_size=part``;
* ``ts``: ``torch.save`` streamed into ``fs.open(path, "wb", block_size=part)`` and
  ``torch.load`` from ``fs.open(path, "rb")`` (s3fs uploads the parts of one file one at a time).

Commands: ``{"op": "save"|"load", "method": "dcp"|"ts", "name": str}`` -> ``{"sec": float}``
(a load also checks every tensor against the state); ``{"op": "quit"}``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from typing import Any

import torch


def make_state(mib: int) -> dict[str, Any]:
    """8 float32 tensors, ``mib`` MiB in all, from a fixed seed (also used by s3_save_bench.py)."""
    g = torch.Generator().manual_seed(1234)
    n = (mib << 20) // 4 // 8
    return {"model": {f"layer{i}": torch.randn(n, generator=g) for i in range(8)}}


def state_sha1(state: dict[str, Any]) -> str:
    h = hashlib.sha1()
    for _, t in sorted(state["model"].items()):
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--secret", required=True)
    ap.add_argument("--region", required=True)
    ap.add_argument("--bucket", required=True)
    ap.add_argument("--mib", type=int, required=True)
    ap.add_argument("--part", type=int, required=True)
    ap.add_argument("--concurrency", type=int, required=True)
    args = ap.parse_args()

    import warnings

    import s3fs

    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

    s3kw: dict[str, Any] = {
        "key": args.key,
        "secret": args.secret,
        "endpoint_url": args.endpoint,
        "client_kwargs": {"region_name": args.region},
        "default_block_size": args.part,
        "max_concurrency": args.concurrency,
        # as ckptdb's client: no SDK default request checksum (it breaks several S3-compatible servers)
        "config_kwargs": {
            "request_checksum_calculation": "when_required",
            "response_checksum_validation": "when_required",
            "max_pool_connections": max(16, 4 * args.concurrency),
        },
    }
    fs = s3fs.S3FileSystem(**s3kw)
    state = make_state(args.mib)
    print(json.dumps({"ready": True, "sha1": state_sha1(state), "torch": torch.__version__}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            break
        path = f"s3://{args.bucket}/{cmd['name']}"
        method, op = cmd["method"], cmd["op"]
        t = time.perf_counter()
        if (op, method) == ("save", "dcp"):
            dcp.save(
                state,
                storage_writer=FsspecWriter(path, sync_files=False, thread_count=args.concurrency, **s3kw),
            )
            sec = time.perf_counter() - t
        elif (op, method) == ("save", "ts"):
            with fs.open(path, "wb", block_size=args.part) as f:
                torch.save(state, f)
            sec = time.perf_counter() - t
        elif (op, method) == ("load", "dcp"):
            out = {"model": {k: torch.empty_like(v) for k, v in state["model"].items()}}
            dcp.load(out, storage_reader=FsspecReader(path, **s3kw))
            sec = time.perf_counter() - t
            _check(out, state)
        elif (op, method) == ("load", "ts"):
            with fs.open(path, "rb", block_size=args.part) as f:
                out = torch.load(f, map_location="cpu", weights_only=True)
            sec = time.perf_counter() - t
            _check(out, state)
        else:
            raise SystemExit(f"unknown command {cmd!r}")
        fs.invalidate_cache()
        print(json.dumps({"sec": sec}), flush=True)


def _check(out: dict[str, Any], state: dict[str, Any]) -> None:
    for k, v in state["model"].items():
        if not torch.equal(out["model"][k], v):
            raise SystemExit(f"loaded {k} differs from what was saved")


if __name__ == "__main__":
    main()
