"""Probe what an S3 server supports that ckptdb relies on; prints one line per feature.

    python scripts/s3_probe.py [moto] [seaweedfs]

Starts each server on loopback (ckptdb.testing.s3servers) and tries: If-None-Match on PutObject and on
CompleteMultipartUpload, full-object CRC32C / CRC64NVME checksums on multipart uploads (returned by
HEAD, and whether a wrong one is refused), ranged GET, ListMultipartUploads under a prefix.
"""

from __future__ import annotations

import base64
import sys
from typing import Any

import crc32c
from botocore.exceptions import ClientError

from ckptdb.testing.s3servers import start_server

PART = 5 << 20


def _code(e: ClientError) -> str:
    return f"{e.response['ResponseMetadata']['HTTPStatusCode']} {e.response['Error'].get('Code')}"


def _mpu(c: Any, bucket: str, key: str, data: bytes, **create: Any) -> dict[str, Any]:
    algo = create.get("ChecksumAlgorithm")
    up = c.create_multipart_upload(Bucket=bucket, Key=key, **create)
    parts = []
    for i, off in enumerate(range(0, len(data), PART), 1):
        body = data[off : off + PART]
        kw: dict[str, Any] = {}
        if algo == "CRC32C":
            kw["ChecksumCRC32C"] = base64.b64encode(crc32c.crc32c(body).to_bytes(4, "big")).decode()
        r = c.upload_part(Bucket=bucket, Key=key, UploadId=up["UploadId"], PartNumber=i, Body=body, **kw)
        p = {"PartNumber": i, "ETag": r["ETag"]}
        if "ChecksumCRC32C" in kw:
            p["ChecksumCRC32C"] = kw["ChecksumCRC32C"]
        parts.append(p)
    return {"UploadId": up["UploadId"], "MultipartUpload": {"Parts": parts}}


def probe(kind: str) -> None:
    with start_server(kind) as srv:
        c = srv.boto3_client()
        b = srv.new_bucket()
        data = bytes(range(256)) * ((12 << 20) // 256)
        out: list[tuple[str, str]] = []
        c.put_object(Bucket=b, Key="a", Body=b"1", IfNoneMatch="*")
        try:
            c.put_object(Bucket=b, Key="a", Body=b"2", IfNoneMatch="*")
            got = c.get_object(Bucket=b, Key="a")["Body"].read()
            out.append(("PutObject If-None-Match: * on an existing key", f"NOT refused (object now {got!r})"))
        except ClientError as e:
            out.append(("PutObject If-None-Match: * on an existing key", f"refused: {_code(e)}"))
        done = _mpu(c, b, "m", data)
        c.complete_multipart_upload(Bucket=b, Key="m", IfNoneMatch="*", **done)
        done = _mpu(c, b, "m", data[: 6 << 20])
        try:
            c.complete_multipart_upload(Bucket=b, Key="m", IfNoneMatch="*", **done)
            size = c.head_object(Bucket=b, Key="m")["ContentLength"]
            out.append(("CompleteMultipartUpload If-None-Match: * on an existing key", f"NOT refused (size {size})"))
        except ClientError as e:
            out.append(("CompleteMultipartUpload If-None-Match: * on an existing key", f"refused: {_code(e)}"))
        with_pending = c.list_multipart_uploads(Bucket=b, Prefix="m")
        out.append(("ListMultipartUploads Prefix=", f"{len(with_pending.get('Uploads', []))} pending upload(s) listed"))
        want = base64.b64encode(crc32c.crc32c(data).to_bytes(4, "big")).decode()
        try:
            done = _mpu(c, b, "c", data, ChecksumAlgorithm="CRC32C", ChecksumType="FULL_OBJECT")
            c.complete_multipart_upload(Bucket=b, Key="c", ChecksumCRC32C=want, ChecksumType="FULL_OBJECT", **done)
            h = c.head_object(Bucket=b, Key="c", ChecksumMode="ENABLED")
            val, typ = h.get("ChecksumCRC32C"), h.get("ChecksumType")
            out.append(
                (
                    "multipart FULL_OBJECT CRC32C, HEAD ChecksumMode=ENABLED",
                    f"{val} {typ} ({'matches' if val == want else 'expected ' + want})",
                )
            )
        except ClientError as e:
            out.append(("multipart FULL_OBJECT CRC32C", f"error: {_code(e)}"))
        try:
            bad = base64.b64encode((crc32c.crc32c(data) ^ 1).to_bytes(4, "big")).decode()
            done = _mpu(c, b, "d", data, ChecksumAlgorithm="CRC32C", ChecksumType="FULL_OBJECT")
            c.complete_multipart_upload(Bucket=b, Key="d", ChecksumCRC32C=bad, ChecksumType="FULL_OBJECT", **done)
            out.append(("multipart FULL_OBJECT CRC32C, wrong full-object value", "NOT refused"))
        except ClientError as e:
            out.append(("multipart FULL_OBJECT CRC32C, wrong full-object value", f"refused: {_code(e)}"))
        try:
            bad = base64.b64encode((crc32c.crc32c(b"xyz") ^ 1).to_bytes(4, "big")).decode()
            c.put_object(Bucket=b, Key="e", Body=b"xyz", ChecksumCRC32C=bad)
            out.append(("PutObject with a wrong CRC32C", "NOT refused"))
        except ClientError as e:
            out.append(("PutObject with a wrong CRC32C", f"refused: {_code(e)}"))
        try:
            c.put_object(
                Bucket=b,
                Key="f",
                Body=b"xyz",
                ChecksumCRC32C=base64.b64encode(crc32c.crc32c(b"xyz").to_bytes(4, "big")).decode(),
            )
            h = c.head_object(Bucket=b, Key="f", ChecksumMode="ENABLED")
            out.append(("PutObject CRC32C, HEAD returns it", f"{h.get('ChecksumCRC32C')} {h.get('ChecksumType')}"))
        except ClientError as e:
            out.append(("PutObject CRC32C", f"error: {_code(e)}"))
        try:
            up = c.create_multipart_upload(Bucket=b, Key="g", ChecksumAlgorithm="CRC64NVME", ChecksumType="FULL_OBJECT")
            c.abort_multipart_upload(Bucket=b, Key="g", UploadId=up["UploadId"])
            out.append(("CreateMultipartUpload CRC64NVME FULL_OBJECT", "accepted"))
        except ClientError as e:
            out.append(("CreateMultipartUpload CRC64NVME FULL_OBJECT", f"error: {_code(e)}"))
        r = c.get_object(Bucket=b, Key="m", Range="bytes=100-199")["Body"].read()
        out.append(("ranged GET bytes=100-199", "ok" if r == data[100:200] else f"WRONG ({len(r)} bytes)"))
        try:
            c.head_object(Bucket=srv.new_bucket() + "x", Key="a")
        except ClientError as e:
            out.append(("HEAD in a missing bucket", _code(e)))
        print(f"== {kind} ({srv.endpoint})")
        for k, v in out:
            print(f"  {k:62s} {v}")


if __name__ == "__main__":
    for kind in sys.argv[1:] or ["moto", "seaweedfs"]:
        probe(kind)
