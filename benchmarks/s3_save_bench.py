"""ckptdb's object-store save and load against raw multipart upload / ranged GETs of the same bytes.

    python benchmarks/s3_save_bench.py [--server seaweedfs|moto] [--mib 256] [--repeat 3]

Same server, same client settings (the s3client defaults: 16 MiB parts, 8 in flight) for both:

* raw upload: the bytes of ``torch.save(state)`` (serialised beforehand, not timed) uploaded by the
  benchmark's own boto3 thread pool (benchmarks/s3_clients.py::boto3_put);
* ckptdb save: ``ObjectStore`` attempt writer ``write_torch`` of the same state (serialisation,
  xxh3 + CRC32C hashing and the streaming multipart upload, all timed);
* raw ranged GET: parallel ranged GETs into a fresh buffer; ckptdb load: ``ObjectStore.load_torch``
  (the same GETs, then ``torch.load(weights_only=True)`` from the buffer).

Prints MB/s (10^6 bytes/s, best of ``--repeat``) and the ratios ckptdb/raw.
"""

from __future__ import annotations

import argparse
import io
import os
import time

import torch

from benchmarks.s3_clients import boto3_get, boto3_put
from ckptdb.storage.objectstore import ObjectStore
from ckptdb.storage.s3client import DEFAULT_CONCURRENCY, DEFAULT_PART_SIZE
from ckptdb.storage.store import open_store
from ckptdb.testing.s3servers import start_server


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", default="seaweedfs", choices=["seaweedfs", "moto"])
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    n = (args.mib << 20) // 4
    state = {"model": {f"layer{i}": torch.randn(n // 8) for i in range(8)}}
    buf = io.BytesIO()
    torch.save(state, buf)
    data = memoryview(buf.getvalue())
    nbytes = len(data)
    part, conc = DEFAULT_PART_SIZE, DEFAULT_CONCURRENCY
    with start_server(args.server) as srv:
        c = srv.boto3_client()
        bucket = srv.new_bucket()
        store = open_store(f"s3://{bucket}/bench", storage_options=srv.storage_options(), object_store=True)
        assert isinstance(store, ObjectStore)
        boto3_put(c, bucket, "warmup", data, part, conc)
        raw_up, ck_up, raw_dn, ck_dn = (float("inf"),) * 4
        for i in range(args.repeat):  # interleaved, so that server drift hits both alike
            t = time.perf_counter()
            boto3_put(c, bucket, f"raw{i}", data, part, conc)
            raw_up = min(raw_up, time.perf_counter() - t)
            w = store.open_writer(i, os.urandom(8).hex(), hash_algorithm="xxh3_128")
            w.open()
            t = time.perf_counter()
            rec = w.write_torch("model.pt", state)
            ck_up = min(ck_up, time.perf_counter() - t)
            t = time.perf_counter()
            out = memoryview(bytearray(nbytes))  # a fresh buffer, as a load needs
            boto3_get(c, bucket, f"raw{i}", out, part, conc)
            raw_dn = min(raw_dn, time.perf_counter() - t)
            t = time.perf_counter()
            loaded = store.load_torch(w.directory, "model.pt", i)
            ck_dn = min(ck_dn, time.perf_counter() - t)
            assert torch.equal(loaded["model"]["layer0"], state["model"]["layer0"])
            assert abs(rec.size_bytes - nbytes) < 4096
    mb = nbytes / 1e6
    print(
        f"server={args.server} file={nbytes >> 20} MiB part={part >> 20} MiB concurrency={conc} best of {args.repeat}"
    )
    print(f"  raw multipart upload   {mb / raw_up:8.0f} MB/s")
    print(f"  ckptdb save            {mb / ck_up:8.0f} MB/s   ratio {raw_up / ck_up:.2f}")
    print(f"  raw ranged GET         {mb / raw_dn:8.0f} MB/s")
    print(f"  ckptdb load            {mb / ck_dn:8.0f} MB/s   ratio {raw_dn / ck_dn:.2f}")


if __name__ == "__main__":
    main()
