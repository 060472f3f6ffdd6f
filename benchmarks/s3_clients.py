"""Two S3 clients on the same bytes against the same loopback server: multipart upload and ranged GETs.

    python benchmarks/s3_clients.py [--server seaweedfs|moto] [--mib 256] [--part-mib 16] [--concurrency 8]
                                    [--repeat 3] [--sweep]

Clients: boto3 (botocore, our own thread pool: one UploadPart / ranged GetObject per part, the way
ckptdb's s3client does it), s3transfer (boto3's ``upload_fileobj`` / ``download_fileobj``) and obstore
(Rust object_store: ``put`` with ``chunk_size`` / ``max_concurrency``, parallel ``get_range``).
Each upload is of the same ``--mib`` MiB in memory (random bytes); each download fills one
preallocated buffer. Prints MB/s (10^6 bytes per second), the best of ``--repeat`` runs.
``--sweep`` also runs the boto3 pool over part sizes x concurrency (the s3client defaults come from it).
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ckptdb.testing.s3servers import S3Server, start_server


def _best(fn: Callable[[int], None], nbytes: int, repeat: int) -> float:
    best = float("inf")
    for i in range(repeat):
        t = time.perf_counter()
        fn(i)
        best = min(best, time.perf_counter() - t)
    return nbytes / best / 1e6


def boto3_put(c: Any, bucket: str, key: str, data: memoryview, part: int, conc: int, *, crc: bool = False) -> None:
    """A multipart upload of ``data`` by a plain thread pool. ``crc``: the requests ckptdb makes, with a
    CRC32C per part and the whole object's (FULL_OBJECT) at completion, each computed in the thread that
    has the bytes (the server checks them)."""
    import crc32c

    from ckptdb.storage.s3client import crc32c_b64, crc32c_combine

    kw: dict[str, Any] = {"ChecksumAlgorithm": "CRC32C", "ChecksumType": "FULL_OBJECT"} if crc else {}
    up = c.create_multipart_upload(Bucket=bucket, Key=key, **kw)
    offs = list(range(0, len(data), part))
    crcs: list[tuple[int, int]] = [(0, 0)] * len(offs)

    def one(i: int) -> dict[str, Any]:
        body = bytes(data[offs[i] : offs[i] + part])
        more: dict[str, Any] = {}
        if crc:
            value = crc32c.crc32c(body)
            crcs[i] = (value, len(body))
            more = {"ChecksumAlgorithm": "CRC32C", "ChecksumCRC32C": crc32c_b64(value)}
        r = c.upload_part(Bucket=bucket, Key=key, UploadId=up["UploadId"], PartNumber=i + 1, Body=body, **more)
        return {"PartNumber": i + 1, "ETag": r["ETag"], **({"ChecksumCRC32C": more["ChecksumCRC32C"]} if crc else {})}

    with ThreadPoolExecutor(conc) as ex:
        parts = list(ex.map(one, range(len(offs))))
    if crc:
        whole = 0
        for value, n in crcs:
            whole = crc32c_combine(whole, value, n)
        kw = {"ChecksumCRC32C": crc32c_b64(whole), "ChecksumType": "FULL_OBJECT"}
    c.complete_multipart_upload(
        Bucket=bucket, Key=key, UploadId=up["UploadId"], MultipartUpload={"Parts": parts}, IfNoneMatch="*", **kw
    )


def boto3_get(c: Any, bucket: str, key: str, out: memoryview, part: int, conc: int) -> None:
    def one(off: int) -> None:
        end = min(off + part, len(out)) - 1
        body = c.get_object(Bucket=bucket, Key=key, Range=f"bytes={off}-{end}")["Body"]
        view = out[off : end + 1]
        got = 0
        raw = body._raw_stream  # urllib3 response: readinto avoids an intermediate bytes object
        while got < len(view):
            n = raw.readinto(view[got:])
            if not n:
                raise RuntimeError("short read")
            got += n

    with ThreadPoolExecutor(conc) as ex:
        list(ex.map(one, range(0, len(out), part)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", default="seaweedfs", choices=["seaweedfs", "moto"])
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--part-mib", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--sweep", action="store_true")
    args = ap.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    nbytes = args.mib << 20
    part, conc = args.part_mib << 20, args.concurrency
    data = memoryview(os.urandom(nbytes))
    out = memoryview(bytearray(nbytes))
    with start_server(args.server) as srv:
        run(srv, data, out, part, conc, args.repeat, args.sweep)


def run(srv: S3Server, data: memoryview, out: memoryview, part: int, conc: int, repeat: int, sweep: bool) -> None:
    import obstore
    from boto3.s3.transfer import TransferConfig
    from obstore.store import S3Store

    nbytes = len(data)
    c = srv.boto3_client()
    bucket = srv.new_bucket()
    store = S3Store(
        bucket,
        config={
            "endpoint": srv.endpoint,
            "access_key_id": srv.access_key,
            "secret_access_key": srv.secret_key,
            "region": srv.region,
            "allow_http": True,
            "unsigned_payload": True,  # as boto3 here: no SHA-256 of every body (the client ships a CRC)
        },
        client_options={"allow_http": True, "pool_max_idle_per_host": "64"},
    )
    tc = TransferConfig(multipart_threshold=part, multipart_chunksize=part, max_concurrency=conc, use_threads=True)
    mib = nbytes >> 20
    print(f"server={srv.kind} size={mib} MiB part={part >> 20} MiB concurrency={conc} (best of {repeat}, MB/s)")
    boto3_put(c, bucket, "warmup", data, part, conc)  # the server allocates its volumes on the first write
    res: dict[str, float] = {}
    res["boto3 pool    upload"] = _best(lambda i: boto3_put(c, bucket, f"b{i}", data, part, conc), nbytes, repeat)
    res["s3transfer    upload"] = _best(
        lambda i: c.upload_fileobj(io.BytesIO(data), bucket, f"t{i}", Config=tc), nbytes, repeat
    )
    res["obstore       upload"] = _best(
        lambda i: obstore.put(store, f"o{i}", data, use_multipart=True, chunk_size=part, max_concurrency=conc),
        nbytes,
        repeat,
    )
    res["boto3 pool    ranged GET"] = _best(lambda i: boto3_get(c, bucket, "b0", out, part, conc), nbytes, repeat)
    assert out == data

    class _Sink(io.RawIOBase):
        def __init__(self) -> None:
            self.pos = 0

        def writable(self) -> bool:
            return True

        def write(self, b: Any) -> int:  # s3transfer writes in order (it buffers out-of-order parts)
            n = len(b)
            out[self.pos : self.pos + n] = b
            self.pos += n
            return n

        def seek(self, pos: int, whence: int = 0) -> int:
            self.pos = pos
            return pos

    res["s3transfer    download"] = _best(
        lambda i: c.download_fileobj(bucket, "b0", _Sink(), Config=tc), nbytes, repeat
    )

    def obstore_get(i: int) -> None:
        def one(off: int) -> None:
            end = min(off + part, nbytes)
            out[off:end] = memoryview(obstore.get_range(store, "b0", start=off, end=end))

        with ThreadPoolExecutor(conc) as ex:
            list(ex.map(one, range(0, nbytes, part)))

    res["obstore       ranged GET"] = _best(obstore_get, nbytes, repeat)
    assert out == data
    for k, v in res.items():
        print(f"  {k:26s} {v:8.0f}")
    if sweep:
        print("boto3 pool sweep (upload MB/s / ranged GET MB/s):")
        for pmib in (8, 16, 32, 64):
            for cc in (4, 8, 16):
                p = pmib << 20
                up = _best(lambda i, p=p, cc=cc: boto3_put(c, bucket, f"s{p}-{cc}-{i}", data, p, cc), nbytes, repeat)
                dn = _best(lambda i, p=p, cc=cc: boto3_get(c, bucket, "b0", out, p, cc), nbytes, repeat)
                print(f"  part {pmib:3d} MiB x {cc:2d}: {up:8.0f} / {dn:8.0f}")


if __name__ == "__main__":
    main()
