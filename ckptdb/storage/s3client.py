"""A small S3 client for checkpoint payloads, over botocore (boto3): the only module that speaks S3.

What ckptdb needs from object storage, and nothing else:

* :meth:`S3Client.put_bytes` -- one conditional PUT (``If-None-Match: *``) with a CRC32C checksum;
* :meth:`S3Client.open_writer` -- a write-only file object (``write(memoryview)``; ``torch.save`` writes
  through it) that hashes every byte with ckptdb's hasher as it arrives, copies it into a bounded
  pool of reused part buffers, uploads full parts in parallel threads while the caller goes on
  writing (no local temporary file), and completes the multipart upload with ``If-None-Match: *``
  and a full-object CRC32C, so that nothing ever silently replaces an object and the server can
  check every byte it stored (an object smaller than one part is a single conditional PUT);
* :meth:`S3Client.read_into` -- parallel ranged GETs straight into a preallocated buffer;
* :meth:`S3Client.head`, :meth:`S3Client.list_objects`, :meth:`S3Client.delete_prefix`,
  :meth:`S3Client.abort_uploads` (incomplete multipart uploads under a prefix).

Configuration comes from the standard AWS environment and files, as for the AWS CLI
(``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_SESSION_TOKEN``, ``AWS_REGION`` / ``AWS_DEFAULT_REGION``, ``AWS_PROFILE``, ``~/.aws/config``),
each overridable by a ``storage_options`` dict (:func:`config_from`).

Failures: botocore's "standard" retry mode retries 5xx, throttling (503 SlowDown) and connection
errors (resets, timeouts) with exponential backoff and jitter, ``max_attempts`` times in all. What
is left is translated into :class:`~ckptdb.errors.ObjectStoreError` (wrong credentials, missing
bucket, unreachable endpoint) or :class:`~ckptdb.errors.ObjectExistsError` (the conditional write
found an object). A completion whose response was lost and whose retry then finds "its own"
object (the same multipart ETag) counts as done.

No catalog import here; object keys are plain strings (``ckptdb.storage.location`` builds them).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import crc32c

from ckptdb.errors import CheckpointError, InvalidArgumentError, ObjectExistsError, ObjectStoreError
from ckptdb.storage.hashing import Hasher

MiB = 1 << 20
# Measured with benchmarks/s3_clients.py --sweep (docs/object-storage.md): 16 MiB parts, 8 in flight.
DEFAULT_PART_SIZE = 16 * MiB
DEFAULT_CONCURRENCY = 8
MIN_PART_SIZE = 5 * MiB  # S3's minimum for every part but the last
MAX_PARTS = 10_000
CHECKSUM_ALGORITHM = "crc32c"  # a full-object kind on multipart uploads (CRC64NVME needs awscrt)

_OPTION_KEYS = {
    "endpoint_url": "endpoint URL (else AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL / AWS's own)",
    "region": "region name (else AWS_REGION / AWS_DEFAULT_REGION / the profile's)",
    "access_key_id": "access key (else AWS_ACCESS_KEY_ID / the profile's)",
    "secret_access_key": "secret key (else AWS_SECRET_ACCESS_KEY / the profile's)",
    "session_token": "session token (else AWS_SESSION_TOKEN)",
    "profile": "profile name in ~/.aws/config (else AWS_PROFILE)",
    "addressing_style": "'path' or 'virtual' (default: path when an endpoint URL is given)",
    "part_size": "multipart part size in bytes (default 16 MiB, at least 5 MiB)",
    "concurrency": "parts / ranges in flight per file (default 8)",
    "max_attempts": "attempts per request, retries included (default 8)",
    "connect_timeout": "seconds (default 10)",
    "read_timeout": "seconds (default 60)",
}


@dataclass(frozen=True, kw_only=True, slots=True)
class S3Config:
    """Where and how to talk to S3; ``None`` fields fall back to the AWS environment and config files."""

    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    session_token: str | None = None
    profile: str | None = None
    addressing_style: str | None = None
    part_size: int = DEFAULT_PART_SIZE
    concurrency: int = DEFAULT_CONCURRENCY
    max_attempts: int = 8
    connect_timeout: float = 10.0
    read_timeout: float = 60.0


def config_from(storage_options: Mapping[str, Any] | None = None) -> S3Config:
    """An :class:`S3Config` from a ``storage_options`` dict (keys: see ``_OPTION_KEYS``).

    Raises:
        InvalidArgumentError: an unknown key (the message lists the known ones) or a bad value.
    """
    opts = dict(storage_options or {})
    unknown = sorted(set(opts) - set(_OPTION_KEYS))
    if unknown:
        known = "; ".join(f"{k}: {v}" for k, v in _OPTION_KEYS.items())
        raise InvalidArgumentError(f"unknown storage_options {', '.join(map(repr, unknown))}; known: {known}")
    cfg = S3Config(**opts)
    if not isinstance(cfg.part_size, int) or cfg.part_size < MIN_PART_SIZE:
        raise InvalidArgumentError(f"storage_options part_size must be an int >= {MIN_PART_SIZE} (5 MiB)")
    if not isinstance(cfg.concurrency, int) or cfg.concurrency < 1:
        raise InvalidArgumentError("storage_options concurrency must be a positive int")
    if not isinstance(cfg.max_attempts, int) or cfg.max_attempts < 1:
        raise InvalidArgumentError("storage_options max_attempts must be a positive int")
    if cfg.addressing_style not in (None, "path", "virtual", "auto"):
        raise InvalidArgumentError("storage_options addressing_style must be 'path', 'virtual' or 'auto'")
    return cfg


def crc32c_b64(value: int) -> str:
    """S3's text form of a CRC32C: the 4 big-endian bytes, base64."""
    return base64.b64encode(value.to_bytes(4, "big")).decode()


# CRC32C of a concatenation from the CRC32Cs of its pieces (zlib's crc32_combine, with the reflected
# Castagnoli polynomial): the writer gets the whole object's CRC32C from its parts' CRC32Cs, which the
# upload threads compute anyway, instead of a second pass over every byte in the writing thread.
_CRC32C_POLY = 0x82F63B78


def _multmodp(a: int, b: int) -> int:
    """a(x) * b(x) modulo the CRC polynomial (reflected bit order)."""
    m, p = 1 << 31, 0
    while m:
        if a & m:
            p ^= b
        b = (b >> 1) ^ _CRC32C_POLY if b & 1 else b >> 1
        m >>= 1
    return p


def _x8nmodp(n: int) -> int:
    """x^(8n) modulo the CRC polynomial: the operator that moves a CRC past ``n`` zero bytes."""
    p, sq = 1 << 31, 1 << 30  # x^0, x^1
    for _ in range(3):  # x^8
        sq = _multmodp(sq, sq)
    while n:
        if n & 1:
            p = _multmodp(sq, p)
        n >>= 1
        sq = _multmodp(sq, sq)
    return p


def crc32c_combine(crc1: int, crc2: int, len2: int) -> int:
    """The CRC32C of ``A + B`` from ``crc1`` = CRC32C(A), ``crc2`` = CRC32C(B) and ``len2`` = len(B)."""
    return _multmodp(_x8nmodp(len2), crc1) ^ crc2


@dataclass(frozen=True, slots=True)
class ObjectMeta:
    """What HEAD says about an object."""

    key: str
    size: int
    etag: str
    checksum: str | None  # "crc32c:<base64>" when the server keeps a CRC32C for it


@dataclass(frozen=True, slots=True)
class WrittenObject:
    """One object written by :class:`ObjectWriter` / :meth:`S3Client.put_bytes`."""

    key: str
    size: int
    digest: str  # ckptdb's hex digest (the writer's hasher); "" when no hasher was given
    checksum: str  # "crc32c:<base64>" of the whole object, as sent and (where supported) checked by the server
    server_checksum: str | None  # the server's own full-object checksum from its response, when it returned one
    parts: int  # 0 for a single PUT


def _error_code(e: Exception) -> tuple[str, int]:
    resp = getattr(e, "response", None) or {}
    code = str(resp.get("Error", {}).get("Code", ""))
    status = int(resp.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


_CREDENTIAL_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "InvalidToken",
    "ExpiredToken",
    "InvalidClientTokenId",
    "AuthorizationHeaderMalformed",
}


class S3Client:
    """One S3 endpoint and set of credentials; thread-safe (botocore clients are)."""

    def __init__(self, config: S3Config | None = None, **storage_options: Any) -> None:
        if config is not None and storage_options:
            raise InvalidArgumentError("give either an S3Config or storage_options, not both")
        self.config = config if config is not None else config_from(storage_options)
        self._client = self._make_client(self.config)
        self.endpoint = str(self._client.meta.endpoint_url)
        # part buffers shared by every writer of this client: parts in flight + one being filled per writer
        self._buffers = _BufferPool(self.config.part_size, self.config.concurrency + 2)

    @staticmethod
    def _make_client(cfg: S3Config) -> Any:
        try:
            import boto3
            from botocore.config import Config
        except ImportError as exc:  # pragma: no cover - the s3 extra installs it
            raise ObjectStoreError("object storage needs boto3: pip install 'ckptdb[s3]'") from exc
        session = boto3.session.Session(
            profile_name=cfg.profile,
            region_name=cfg.region,
            aws_access_key_id=cfg.access_key_id,
            aws_secret_access_key=cfg.secret_access_key,
            aws_session_token=cfg.session_token,
        )
        style = cfg.addressing_style or ("path" if cfg.endpoint_url else None)
        s3: dict[str, Any] = {"payload_signing_enabled": False}  # every body carries a CRC32C instead
        if style:
            s3["addressing_style"] = style
        bconfig = Config(
            retries={"mode": "standard", "max_attempts": cfg.max_attempts},
            connect_timeout=cfg.connect_timeout,
            read_timeout=cfg.read_timeout,
            max_pool_connections=max(16, 4 * cfg.concurrency),
            s3=s3,
            # ckptdb sends its own CRC32C; no SDK default CRC32 (it breaks several S3-compatible servers)
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            tcp_keepalive=True,
        )
        try:
            return session.client("s3", endpoint_url=cfg.endpoint_url, config=bconfig)
        except Exception as e:
            raise ObjectStoreError(f"cannot configure the S3 client: {e}") from e

    # ------------------------------------------------------------------ errors

    def translate(self, e: Exception, bucket: str, key: str | None, op: str) -> CheckpointError:
        """The ckptdb error for a botocore failure of ``op`` on ``bucket``/``key``."""
        from botocore.exceptions import (
            ClientError,
            ConnectionClosedError,
            EndpointConnectionError,
            NoCredentialsError,
            PartialCredentialsError,
            ReadTimeoutError,
        )

        where = f"s3://{bucket}/{key}" if key else f"s3://{bucket}"
        if isinstance(e, NoCredentialsError | PartialCredentialsError):
            return ObjectStoreError(
                f"{op} {where}: no S3 credentials found ({e}); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                "AWS_PROFILE, or storage_options",
                bucket=bucket,
                key=key,
                code="NoCredentials",
            )
        if isinstance(e, EndpointConnectionError | ConnectionClosedError | ReadTimeoutError):
            return ObjectStoreError(
                f"{op} {where}: the S3 endpoint {self.endpoint} did not answer after "
                f"{self.config.max_attempts} attempts ({e})",
                bucket=bucket,
                key=key,
                code="Unreachable",
            )
        if isinstance(e, ClientError):
            code, status = _error_code(e)
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status == 412:
                return ObjectExistsError(
                    f"{op} {where}: an object already exists at this key (the conditional write "
                    "If-None-Match: * was refused); nothing was replaced",
                    bucket=bucket,
                    key=key,
                    code=code or "PreconditionFailed",
                )
            if code == "NoSuchBucket" or (status == 404 and key is None):
                return ObjectStoreError(
                    f"{op} {where}: the bucket {bucket!r} does not exist at {self.endpoint}",
                    bucket=bucket,
                    key=key,
                    code="NoSuchBucket",
                )
            if code in _CREDENTIAL_CODES or status == 403:
                return ObjectStoreError(
                    f"{op} {where}: the S3 server refused the credentials ({code or status}: "
                    f"{e.response.get('Error', {}).get('Message', '')}); check AWS_ACCESS_KEY_ID / "
                    "AWS_SECRET_ACCESS_KEY / AWS_PROFILE or storage_options",
                    bucket=bucket,
                    key=key,
                    code=code or str(status),
                )
            return ObjectStoreError(f"{op} {where}: {code or status}: {e}", bucket=bucket, key=key, code=code)
        return ObjectStoreError(f"{op} {where}: {type(e).__name__}: {e}", bucket=bucket, key=key, code="")

    def _call(self, op: str, bucket: str, key: str | None, fn: Callable[..., Any], /, **kw: Any) -> Any:
        try:
            return fn(Bucket=bucket, **({"Key": key} if key is not None else {}), **kw)
        except CheckpointError:
            raise
        except Exception as e:
            raise self.translate(e, bucket, key, op) from e

    # ------------------------------------------------------------------ bucket

    def check_bucket(self, bucket: str) -> None:
        """HEAD the bucket: raises :class:`ObjectStoreError` when it is missing or the credentials are wrong."""
        self._call("open", bucket, None, self._client.head_bucket)

    # ------------------------------------------------------------------ writes

    def put_bytes(
        self,
        bucket: str,
        key: str,
        data: bytes | bytearray | memoryview,
        *,
        hasher: Hasher | None = None,
        overwrite: bool = False,
    ) -> WrittenObject:
        """One conditional PUT (``If-None-Match: *``) with a CRC32C; raises ObjectExistsError if the key exists.

        ``overwrite=True`` drops the condition (only for small metadata objects such as ``model.yaml``)."""
        view = memoryview(data).cast("B")
        if hasher is not None:
            hasher.update(view)
        crc = crc32c.crc32c(view)
        body = data if isinstance(data, bytes | bytearray) else bytes(view)
        try:
            cond: dict[str, str] = {} if overwrite else {"IfNoneMatch": "*"}
            resp = self._client.put_object(
                Bucket=bucket, Key=key, Body=body, ChecksumAlgorithm="CRC32C", ChecksumCRC32C=crc32c_b64(crc), **cond
            )
        except Exception as e:
            err = self.translate(e, bucket, key, "write")
            # a retried PUT whose first try landed: the object is ours when its ETag is our MD5
            if isinstance(err, ObjectExistsError) and self._is_same_object(bucket, key, hashlib.md5(view).hexdigest()):
                resp = {}
            else:
                raise err from e
        remote = resp.get("ChecksumCRC32C")
        return WrittenObject(
            key,
            len(view),
            hasher.hexdigest() if hasher is not None else "",
            f"crc32c:{crc32c_b64(crc)}",
            f"crc32c:{remote}" if remote else None,
            0,
        )

    def _is_same_object(self, bucket: str, key: str, etag: str) -> bool:
        try:
            meta = self.head(bucket, key)
        except CheckpointError:
            return False
        return meta is not None and meta.etag == etag

    def open_writer(self, bucket: str, key: str, *, hasher: Hasher | None = None) -> ObjectWriter:
        """A write-only file object for ``key``: ``write()``* -> ``close()`` (-> WrittenObject) | ``abort()``."""
        return ObjectWriter(self, bucket, key, hasher)

    # ------------------------------------------------------------------ reads

    def head(self, bucket: str, key: str) -> ObjectMeta | None:
        """Size, ETag and CRC32C of ``key``; None when there is no such object."""
        from botocore.exceptions import ClientError

        try:
            r = self._client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
        except ClientError as e:
            code, status = _error_code(e)
            if status == 404 and code != "NoSuchBucket":
                # HEAD has no body, so a missing bucket also reads "404": ask the bucket
                self.check_bucket(bucket)
                return None
            raise self.translate(e, bucket, key, "head") from e
        except Exception as e:
            raise self.translate(e, bucket, key, "head") from e
        crc = r.get("ChecksumCRC32C")
        return ObjectMeta(
            key, int(r["ContentLength"]), str(r.get("ETag", "")).strip('"'), f"crc32c:{crc}" if crc else None
        )

    def read_into(
        self,
        bucket: str,
        key: str,
        out: memoryview,
        *,
        offset: int = 0,
        prepare: Callable[[int, int], None] | None = None,
    ) -> None:
        """Fill ``out`` with the object's bytes ``[offset, offset + len(out))``: parallel ranged GETs.

        ``prepare(lo, hi)`` runs in the thread of each range ``out[lo:hi]`` before its GET (to
        allocate that part of ``out`` while other ranges are downloading).
        Raises ObjectStoreError when the object is shorter than asked (or missing).
        """
        view = out.cast("B") if out.format != "B" or out.ndim != 1 else out
        n = len(view)
        if n == 0:
            return
        part = self.config.part_size
        ranges = [(o, min(o + part, n)) for o in range(0, n, part)]

        def one(lo: int, hi: int) -> None:
            if prepare is not None:
                prepare(lo, hi)
            r = self._call("read", bucket, key, self._client.get_object, Range=f"bytes={offset + lo}-{offset + hi - 1}")
            body = r["Body"]
            raw = getattr(body, "_raw_stream", None)
            got = lo
            try:
                while got < hi:
                    if raw is not None:
                        k = raw.readinto(view[got:hi])
                    else:  # pragma: no cover - a botocore without the urllib3 stream
                        chunk = body.read(hi - got)
                        k = len(chunk)
                        view[got : got + k] = chunk
                    if not k:
                        raise ObjectStoreError(
                            f"read s3://{bucket}/{key}: the object ended at byte {offset + got}, "
                            f"{offset + hi} expected",
                            bucket=bucket,
                            key=key,
                            code="ShortRead",
                        )
                    got += k
            finally:
                body.close()

        _run_parallel([functools.partial(one, lo, hi) for lo, hi in ranges], self.config.concurrency)

    def read_bytes(self, bucket: str, key: str, *, size: int | None = None) -> bytearray:
        """The whole object in a new buffer (one HEAD unless ``size`` is known, then parallel ranged GETs)."""
        if size is None:
            meta = self.head(bucket, key)
            if meta is None:
                raise ObjectStoreError(
                    f"read s3://{bucket}/{key}: no such object", bucket=bucket, key=key, code="NoSuchKey"
                )
            size = meta.size
        buf = bytearray(size)
        self.read_into(bucket, key, memoryview(buf))
        return buf

    def list_objects(self, bucket: str, prefix: str) -> Iterator[tuple[str, int]]:
        """(key, size) of every object whose key starts with ``prefix``, in key order."""
        token: str | None = None
        while True:
            kw: dict[str, Any] = {"Prefix": prefix}
            if token:
                kw["ContinuationToken"] = token
            r = self._call("list", bucket, None, self._client.list_objects_v2, **kw)
            for o in r.get("Contents", []):
                yield str(o["Key"]), int(o["Size"])
            if not r.get("IsTruncated"):
                return
            token = r["NextContinuationToken"]

    def list_dirs(self, bucket: str, prefix: str) -> list[str]:
        """The "directories" right under ``prefix`` (LIST with delimiter ``/``), as full prefixes ending in ``/``.

        SeaweedFS may still list a directory whose objects were all deleted (real S3 does not): callers
        treat a listed prefix as a name to look up in the catalog, never as proof that objects exist."""
        out: list[str] = []
        token: str | None = None
        while True:
            kw: dict[str, Any] = {"Prefix": prefix, "Delimiter": "/"}
            if token:
                kw["ContinuationToken"] = token
            r = self._call("list", bucket, None, self._client.list_objects_v2, **kw)
            out.extend(str(p["Prefix"]) for p in r.get("CommonPrefixes", []))
            if not r.get("IsTruncated"):
                return sorted(out)
            token = r["NextContinuationToken"]

    # ------------------------------------------------------------------ removal

    def delete_keys(self, bucket: str, keys: list[str]) -> None:
        """Delete these keys (DeleteObjects, 1000 a request); a missing key is not an error."""
        for i in range(0, len(keys), 1000):
            batch = keys[i : i + 1000]
            r = self._call(
                "delete",
                bucket,
                None,
                self._client.delete_objects,
                Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
            )
            errors = [e for e in r.get("Errors", []) if e.get("Code") != "NoSuchKey"]
            if errors:
                first = errors[0]
                raise ObjectStoreError(
                    f"delete s3://{bucket}/{first.get('Key')}: {first.get('Code')}: {first.get('Message')} "
                    f"({len(errors)} key(s) not deleted)",
                    bucket=bucket,
                    key=str(first.get("Key")),
                    code=str(first.get("Code")),
                )

    def delete_prefix(self, bucket: str, prefix: str) -> int:
        """Delete every object whose key starts with ``prefix``; returns how many there were.

        ``prefix`` must end with ``/`` (an attempt's prefix, so that ``step_1.ab/`` never matches
        ``step_1.abc/``)."""
        if not prefix.endswith("/"):
            raise InvalidArgumentError(f"delete_prefix needs a prefix ending in '/', got {prefix!r}")
        keys = [k for k, _ in self.list_objects(bucket, prefix)]
        self.delete_keys(bucket, keys)
        return len(keys)

    def abort_uploads(self, bucket: str, prefix: str) -> int:
        """Abort every incomplete multipart upload whose key starts with ``prefix``; returns how many."""
        if not prefix.endswith("/"):
            raise InvalidArgumentError(f"abort_uploads needs a prefix ending in '/', got {prefix!r}")
        uploads: list[tuple[str, str]] = []
        kw: dict[str, Any] = {"Prefix": prefix}
        while True:
            r = self._call("list uploads", bucket, None, self._client.list_multipart_uploads, **kw)
            uploads.extend((str(u["Key"]), str(u["UploadId"])) for u in r.get("Uploads", []))
            if not r.get("IsTruncated"):
                break
            kw = {"Prefix": prefix, "KeyMarker": r["NextKeyMarker"], "UploadIdMarker": r["NextUploadIdMarker"]}
        for key, upload_id in uploads:
            self._abort(bucket, key, upload_id)
        return len(uploads)

    def _abort(self, bucket: str, key: str, upload_id: str) -> None:
        from botocore.exceptions import ClientError

        try:
            self._client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        except ClientError as e:
            if _error_code(e)[0] != "NoSuchUpload":  # already aborted or completed
                raise self.translate(e, bucket, key, "abort upload") from e
        except Exception as e:
            raise self.translate(e, bucket, key, "abort upload") from e

    def list_uploads(self, bucket: str, prefix: str) -> list[str]:
        """Keys with an incomplete multipart upload under ``prefix`` (one entry per upload), in key order."""
        keys: list[str] = []
        kw: dict[str, Any] = {"Prefix": prefix}
        while True:
            r = self._call("list uploads", bucket, None, self._client.list_multipart_uploads, **kw)
            keys.extend(str(u["Key"]) for u in r.get("Uploads", []))
            if not r.get("IsTruncated"):
                return sorted(keys)
            kw = {"Prefix": prefix, "KeyMarker": r["NextKeyMarker"], "UploadIdMarker": r["NextUploadIdMarker"]}


class _BufferPool:
    """At most ``count`` reusable part buffers of ``size`` bytes; ``get`` blocks while all are in use."""

    def __init__(self, size: int, count: int) -> None:
        self.size = size
        self._free: list[bytearray] = []
        self._made = 0
        self._count = count
        self._cond = threading.Condition()

    def get(self) -> bytearray:
        with self._cond:
            while not self._free and self._made >= self._count:
                self._cond.wait()
            if self._free:
                return self._free.pop()
            self._made += 1
        return bytearray(self.size)

    def put(self, buf: bytearray) -> None:
        with self._cond:
            self._free.append(buf)
            self._cond.notify()


def _run_parallel(fns: list[Callable[[], None]], limit: int) -> None:
    """Run ``fns`` in at most ``limit`` plain threads at a time; raise the first error after all ended.

    Plain threads, not an executor: a background save may still be uploading while the interpreter
    shuts down, when executors refuse new work.
    """
    if len(fns) == 1:
        fns[0]()
        return
    errors: list[BaseException] = []
    it = iter(fns)
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                if errors:
                    return
                fn = next(it, None)
            if fn is None:
                return
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - re-raised by the caller's thread
                with lock:
                    errors.append(e)

    threads = [threading.Thread(target=worker, name=f"ckptdb-s3-{i}") for i in range(min(limit, len(fns)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


@dataclass
class _Part:
    number: int
    etag: str = ""
    crc: str = ""
    crc_value: int = 0
    size: int = 0
    md5: bytes = b""


@dataclass
class _UploadState:
    upload_id: str | None = None
    parts: list[_Part] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)
    error: BaseException | None = None


class ObjectWriter:
    """The file object ``torch.save`` writes through when the destination is an object.

    Call order: ``write()``* -> ``close()`` (returns :class:`WrittenObject`) | ``abort()``.
    ``write`` hashes the bytes with ckptdb's hasher and copies them into the current part buffer; a
    full buffer is uploaded by its own thread (at most ``concurrency`` in flight; that thread
    computes the part's CRC32C) while writing goes on, and goes back to the client's buffer pool when
    its upload ends. The multipart upload is created at the first full part; a file smaller than
    one part is a single conditional PUT at ``close``. ``close`` completes the upload with
    ``If-None-Match: *`` and the whole object's CRC32C (type FULL_OBJECT), combined from the parts'
    CRC32Cs (:func:`crc32c_combine`: no second pass over the bytes in the writing thread). On any
    failure the upload is aborted, so no part is left billed and invisible.
    """

    def __init__(self, client: S3Client, bucket: str, key: str, hasher: Hasher | None) -> None:
        self._c = client
        self.bucket = bucket
        self.key = key
        self._hasher = hasher
        self._buf: bytearray | None = None
        self._fill = 0
        self._state = _UploadState()
        self._sem = threading.Semaphore(client.config.concurrency)
        self._lock = threading.Lock()
        self._closed = False
        self.size = 0
        self.error: BaseException | None = None  # torch's C++ writer may replace it with its own message

    # file protocol -------------------------------------------------------
    def writable(self) -> bool:
        return True

    def flush(self) -> None:
        return None

    def write(self, data: bytes | bytearray | memoryview) -> int:
        try:
            return self._write(data)
        except BaseException as e:
            self.error = self.error or e
            raise

    def _write(self, data: bytes | bytearray | memoryview) -> int:
        if self._closed:
            raise ValueError("write to a closed ObjectWriter")
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        n = len(view)
        if self._state.error is not None:
            raise self._state.error
        if self._hasher is not None:
            self._hasher.update(view)
        part = self._c.config.part_size
        off = 0
        while off < n:
            if self._buf is None:
                self._buf = self._c._buffers.get()
                self._fill = 0
            k = min(part - self._fill, n - off)
            self._buf[self._fill : self._fill + k] = view[off : off + k]
            self._fill += k
            off += k
            if self._fill == part:
                self._send(self._buf, part)
                self._buf = None
        self.size += n
        return n

    def _send(self, buf: bytearray, n: int) -> None:
        """Hand one full (or the last) part to an upload thread; waits while ``concurrency`` are in flight."""
        st = self._state
        if st.upload_id is None:
            r = self._c._call(
                "write",
                self.bucket,
                self.key,
                self._c._client.create_multipart_upload,
                ChecksumAlgorithm="CRC32C",
                ChecksumType="FULL_OBJECT",
            )
            st.upload_id = str(r["UploadId"])
        if len(st.parts) >= MAX_PARTS:
            raise ObjectStoreError(
                f"write s3://{self.bucket}/{self.key}: more than {MAX_PARTS} parts; raise storage_options part_size",
                bucket=self.bucket,
                key=self.key,
                code="TooManyParts",
            )
        p = _Part(len(st.parts) + 1)
        st.parts.append(p)
        self._sem.acquire()
        if st.error is not None:
            self._sem.release()
            self._c._buffers.put(buf)
            raise st.error
        t = threading.Thread(target=self._upload, args=(p, buf, n), name=f"ckptdb-s3-part-{p.number}")
        st.threads.append(t)
        t.start()

    def _upload(self, p: _Part, buf: bytearray, n: int) -> None:
        try:
            body: bytes | bytearray = buf if n == len(buf) else bytes(memoryview(buf)[:n])
            value = crc32c.crc32c(body)
            crc = crc32c_b64(value)
            r = self._c._call(
                "write",
                self.bucket,
                self.key,
                self._c._client.upload_part,
                UploadId=self._state.upload_id,
                PartNumber=p.number,
                Body=body,
                ChecksumAlgorithm="CRC32C",
                ChecksumCRC32C=crc,
            )
            p.etag, p.crc, p.crc_value, p.size = str(r["ETag"]), crc, value, n
            p.md5 = bytes.fromhex(p.etag.strip('"')) if len(p.etag.strip('"')) == 32 else b""
        except BaseException as e:  # noqa: BLE001 - surfaced by the writer's next write() / close()
            with self._lock:
                self._state.error = self._state.error or e
        finally:
            self._c._buffers.put(buf)
            self._sem.release()

    def _join(self) -> None:
        for t in self._state.threads:
            t.join()
        self._state.threads.clear()

    def close(self) -> WrittenObject:  # type: ignore[override]
        """Upload what is left and complete the object; returns what was written."""
        if self._closed:
            raise ValueError("ObjectWriter closed twice")
        self._closed = True
        st = self._state
        try:
            if st.upload_id is None:  # smaller than one part: a single PUT
                buf, n = self._buf, self._fill
                self._buf = None
                try:
                    data = bytes(memoryview(buf)[:n]) if buf is not None else b""
                finally:
                    if buf is not None:
                        self._c._buffers.put(buf)
                w = self._c.put_bytes(self.bucket, self.key, data)
                return replace(w, digest=self._hasher.hexdigest() if self._hasher is not None else "")
            if self._buf is not None and self._fill:
                buf, self._buf = self._buf, None
                self._send(buf, self._fill)
            elif self._buf is not None:
                self._c._buffers.put(self._buf)
                self._buf = None
            self._join()
            if st.error is not None:
                raise st.error
            return self._complete()
        except BaseException:
            self.abort()
            raise

    def _complete(self) -> WrittenObject:
        st = self._state
        value = 0
        for p in st.parts:
            value = crc32c_combine(value, p.crc_value, p.size)
        whole = crc32c_b64(value)
        parts = [{"PartNumber": p.number, "ETag": p.etag, "ChecksumCRC32C": p.crc} for p in st.parts]
        try:
            r = self._c._client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=self.key,
                UploadId=st.upload_id,
                MultipartUpload={"Parts": parts},
                IfNoneMatch="*",
                ChecksumCRC32C=whole,
                ChecksumType="FULL_OBJECT",
            )
        except Exception as e:
            err = self._c.translate(e, self.bucket, self.key, "write")
            # a retried completion whose first try landed: 412 (the key exists) or NoSuchUpload (the upload
            # is done); the object is ours when its multipart ETag is the one these parts make
            if (
                isinstance(err, ObjectExistsError) or _error_code(e)[0] == "NoSuchUpload"
            ) and self._is_own_completion():
                r = {}
            else:
                raise err from e
        st.upload_id = None  # completed: nothing to abort any more
        remote = r.get("ChecksumCRC32C")
        return WrittenObject(
            self.key,
            self.size,
            self._hasher.hexdigest() if self._hasher is not None else "",
            f"crc32c:{whole}",
            f"crc32c:{remote}" if remote else None,
            len(st.parts),
        )

    def _is_own_completion(self) -> bool:
        """After a 412 on a retried completion: is the object there the one this upload made?

        A multipart ETag is ``md5(part md5s) + "-<parts>"``; only this upload has these parts.
        """
        st = self._state
        if not st.parts or any(not p.md5 for p in st.parts):
            return False
        expected = f"{hashlib.md5(b''.join(p.md5 for p in st.parts)).hexdigest()}-{len(st.parts)}"
        return self._c._is_same_object(self.bucket, self.key, expected)

    def abort(self) -> None:
        """Stop: wait for parts in flight, abort the multipart upload; never raises for a missing upload."""
        self._closed = True
        self._join()
        if self._buf is not None:
            self._c._buffers.put(self._buf)
            self._buf = None
        if self._state.upload_id is not None:
            upload_id, self._state.upload_id = self._state.upload_id, None
            try:
                self._c._abort(self.bucket, self.key, upload_id)  # botocore already retried it
            except CheckpointError:
                pass  # the store is unreachable: recovery / gc abort it by the attempt's prefix later
