"""ckptdb.storage.s3client against real servers on loopback (moto; SeaweedFS where it matters) and a fault proxy."""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterator

import pytest

from ckptdb.errors import InvalidArgumentError, ObjectExistsError, ObjectStoreError
from ckptdb.storage.hashing import new_hasher
from ckptdb.storage.s3client import MIN_PART_SIZE, S3Client, config_from, crc32c_b64, crc32c_combine
from tests.s3.faultproxy import FaultProxy
from tests.s3_fixtures import Bucket

PART = MIN_PART_SIZE


def client(b: Bucket, **more: object) -> S3Client:
    return S3Client(**b.storage_options(part_size=PART, concurrency=4, **more))


def xxh(data: bytes) -> str:
    h = new_hasher("xxh3_128")
    h.update(data)
    return h.hexdigest()


def write_chunks(c: S3Client, bucket: str, key: str, data: bytes, chunk: int = 3 << 20):
    w = c.open_writer(bucket, key, hasher=new_hasher("xxh3_128"))
    view = memoryview(data)
    for off in range(0, len(data), chunk):
        assert w.write(view[off : off + chunk]) == len(view[off : off + chunk])
    return w.close()


@pytest.mark.parametrize("cuts", [[], [0], [1], [7, 7], [1000, 4096, 4097], [65536, 100_000]])
def test_crc32c_combine_equals_one_pass(cuts: list[int]) -> None:
    """The writer's whole-object CRC32C, combined from its parts' CRC32Cs, is the CRC32C of all the bytes."""
    import crc32c

    data = os.urandom(150_000)
    bounds = [0, *cuts, len(data)]
    value = 0
    for lo, hi in itertools.pairwise(bounds):
        value = crc32c_combine(value, crc32c.crc32c(data[lo:hi]), hi - lo)
    assert value == crc32c.crc32c(data)


def test_multipart_writer_roundtrip(s3_bucket: Bucket) -> None:
    c = client(s3_bucket)
    data = os.urandom(2 * PART + 12345)  # three parts, the last one short
    w = write_chunks(c, s3_bucket.name, "run/step_1.aa/model.pt", data)
    assert (w.size, w.parts, w.digest) == (len(data), 3, xxh(data))
    import crc32c

    assert w.checksum == f"crc32c:{crc32c_b64(crc32c.crc32c(data))}"
    assert w.server_checksum in (None, w.checksum)
    meta = c.head(s3_bucket.name, "run/step_1.aa/model.pt")
    assert meta is not None and meta.size == len(data)
    assert meta.checksum == w.checksum  # both servers keep the full-object CRC32C
    assert bytes(c.read_bytes(s3_bucket.name, "run/step_1.aa/model.pt")) == data
    out = bytearray(1000)
    c.read_into(s3_bucket.name, "run/step_1.aa/model.pt", memoryview(out), offset=PART - 500)
    assert bytes(out) == data[PART - 500 : PART + 500]
    assert c.list_uploads(s3_bucket.name, "run/") == []


def test_small_writer_is_a_single_put(moto_bucket: Bucket) -> None:
    c = client(moto_bucket)
    w = write_chunks(moto_bucket and c, moto_bucket.name, "p/x.pt", b"abc" * 1000, chunk=100)
    assert (w.parts, w.size, w.digest) == (0, 3000, xxh(b"abc" * 1000))
    assert bytes(c.read_bytes(moto_bucket.name, "p/x.pt")) == b"abc" * 1000
    empty = c.open_writer(moto_bucket.name, "p/empty").close()
    assert empty.size == 0 and c.head(moto_bucket.name, "p/empty").size == 0  # type: ignore[union-attr]


def test_conditional_writes_never_replace(s3_bucket: Bucket) -> None:
    c = client(s3_bucket)
    b = s3_bucket.name
    c.put_bytes(b, "k/small", b"first")
    with pytest.raises(ObjectExistsError, match="already exists"):
        c.put_bytes(b, "k/small", b"second")
    big = os.urandom(PART + 10)
    write_chunks(c, b, "k/big", big)
    with pytest.raises(ObjectExistsError) as ei:
        write_chunks(c, b, "k/big", os.urandom(PART + 10))
    assert isinstance(ei.value, FileExistsError) and ei.value.key == "k/big"
    assert bytes(c.read_bytes(b, "k/small")) == b"first"
    assert bytes(c.read_bytes(b, "k/big")) == big
    assert c.list_uploads(b, "k/") == []  # the refused upload was aborted


def test_delete_prefix_and_abort_uploads_touch_exactly_the_prefix(s3_bucket: Bucket) -> None:
    c = client(s3_bucket)
    b = s3_bucket.name
    for key in ("r/step_1.ab/model.pt", "r/step_1.ab/sub/x", "r/step_1.abc/model.pt", "r/step_1/model.pt"):
        c.put_bytes(b, key, b"x")
    pending = c.open_writer(b, "r/step_1.ab/rank_0.pt")
    pending.write(os.urandom(PART + 1))  # one part uploaded, never completed (a dead writer)
    pending._join()
    other = c.open_writer(b, "r/step_1.abc/rank_0.pt")
    other.write(os.urandom(PART + 1))
    other._join()
    assert c.list_uploads(b, "r/step_1.ab/") == ["r/step_1.ab/rank_0.pt"]
    assert c.abort_uploads(b, "r/step_1.ab/") == 1
    assert c.delete_prefix(b, "r/step_1.ab/") == 2
    assert sorted(k for k, _ in c.list_objects(b, "r/")) == ["r/step_1.abc/model.pt", "r/step_1/model.pt"]
    assert c.list_uploads(b, "r/") == ["r/step_1.abc/rank_0.pt"]
    dirs = c.list_dirs(b, "r/")  # SeaweedFS may still list the emptied r/step_1.ab/ (S3 does not)
    assert {"r/step_1.abc/", "r/step_1/"} <= set(dirs) <= {"r/step_1.abc/", "r/step_1/", "r/step_1.ab/"}
    assert list(c.list_objects(b, "r/step_1.ab/")) == []
    with pytest.raises(InvalidArgumentError):
        c.delete_prefix(b, "r/step_1")
    other.abort()
    assert c.list_uploads(b, "r/") == []


def test_missing_bucket_is_a_clear_error(s3_bucket: Bucket) -> None:
    c = client(s3_bucket)
    missing = s3_bucket.name + "-nope"
    for call in (
        lambda: c.put_bytes(missing, "a", b"x"),
        lambda: c.head(missing, "a"),
        lambda: list(c.list_objects(missing, "p/")),
        lambda: c.check_bucket(missing),
        lambda: write_chunks(c, missing, "a", os.urandom(PART + 1)),
    ):
        with pytest.raises(ObjectStoreError, match="does not exist") as ei:
            call()
        assert ei.value.code == "NoSuchBucket" and ei.value.bucket == missing


def test_wrong_credentials_are_a_clear_error(seaweedfs_bucket: Bucket) -> None:
    c = S3Client(**seaweedfs_bucket.storage_options(secret_access_key="wrong", max_attempts=2))
    with pytest.raises(ObjectStoreError, match="refused the credentials"):
        c.put_bytes(seaweedfs_bucket.name, "a", b"x")
    with pytest.raises(ObjectStoreError, match="refused the credentials"):
        c.head(seaweedfs_bucket.name, "a")


def test_no_endpoint_answering_is_a_clear_error() -> None:
    from ckptdb.testing.s3servers import free_port

    c = S3Client(
        endpoint_url=f"http://127.0.0.1:{free_port()}",
        access_key_id="a",
        secret_access_key="b",
        region="us-east-1",
        max_attempts=2,
        connect_timeout=1,
    )
    with pytest.raises(ObjectStoreError, match="did not answer after 2 attempts"):
        c.put_bytes("bucket", "a", b"x")


def test_config_from_environment_and_options(moto_bucket: Bucket, monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in moto_bucket.server.env().items():
        monkeypatch.setenv(k, v)
    c = S3Client()  # everything from AWS_* variables
    assert c.endpoint == moto_bucket.server.endpoint
    c.put_bytes(moto_bucket.name, "env", b"x")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    assert S3Client(endpoint_url=moto_bucket.server.endpoint).head(moto_bucket.name, "env") is not None
    with pytest.raises(InvalidArgumentError, match=r"unknown storage_options 'endpoint'.*endpoint_url"):
        config_from({"endpoint": "x"})
    with pytest.raises(InvalidArgumentError, match="part_size"):
        config_from({"part_size": 1024})


# ---------------------------------------------------------------------------- through the fault proxy


@pytest.fixture
def proxy(moto_bucket: Bucket) -> Iterator[FaultProxy]:
    p = FaultProxy(moto_bucket.server.endpoint)
    yield p
    p.close()


def via(proxy: FaultProxy, b: Bucket, **more: object) -> S3Client:
    return S3Client(**b.storage_options(endpoint_url=proxy.endpoint, part_size=PART, concurrency=4, **more))


def is_part(method: str, path: str) -> bool:
    return method == "PUT" and "partNumber=" in path


def is_complete(method: str, path: str) -> bool:
    return method == "POST" and "uploadId=" in path


def test_slowdown_and_resets_are_retried(proxy: FaultProxy, moto_bucket: Bucket) -> None:
    c = via(proxy, moto_bucket)
    data = os.urandom(3 * PART)
    proxy.inject("503", 3, is_part)
    proxy.inject("reset", 2, is_part)
    proxy.inject("503", 1, is_complete)
    proxy.inject("reset", 1, lambda m, p: m == "PUT" and "partNumber" not in p)
    w = write_chunks(c, moto_bucket.name, "f/big", data)
    c.put_bytes(moto_bucket.name, "f/small", b"x")
    proxy.inject("503", 2, lambda m, p: m == "GET")
    proxy.inject("reset", 2, lambda m, p: m == "GET")
    assert bytes(c.read_bytes(moto_bucket.name, "f/big")) == data and w.digest == xxh(data)
    assert proxy.count("503") == 6 and proxy.count("reset") == 5
    assert c.list_uploads(moto_bucket.name, "f/") == []


def test_lost_completion_response_is_recognised(proxy: FaultProxy, moto_bucket: Bucket) -> None:
    """The server completed the upload but the answer was lost: the retry finds the object is ours."""
    c = via(proxy, moto_bucket)
    data = os.urandom(2 * PART)
    proxy.inject("lose", 1, is_complete)
    w = write_chunks(c, moto_bucket.name, "l/obj", data)
    assert proxy.count("lose") == 1 and w.size == len(data)
    assert bytes(c.read_bytes(moto_bucket.name, "l/obj")) == data
    proxy.inject("lose", 1, lambda m, p: m == "PUT")
    c.put_bytes(moto_bucket.name, "l/small", b"abc")  # the same for a single PUT (ETag = MD5)
    assert proxy.count("lose") == 2
    # ... but an object written by someone else is still refused
    c.put_bytes(moto_bucket.name, "l/other", b"theirs")
    with pytest.raises(ObjectExistsError):
        c.put_bytes(moto_bucket.name, "l/other", b"mine")


def test_persistent_failure_gives_a_clear_error(proxy: FaultProxy, moto_bucket: Bucket) -> None:
    c = via(proxy, moto_bucket, max_attempts=3)
    proxy.always("503", is_part)
    t = time.monotonic()
    with pytest.raises(ObjectStoreError, match="SlowDown") as ei:
        write_chunks(c, moto_bucket.name, "p/big", os.urandom(2 * PART))
    assert time.monotonic() - t < 60
    assert ei.value.key == "p/big"
    proxy.clear()
    assert c.list_uploads(moto_bucket.name, "p/") == []  # the failed upload was aborted
    assert c.head(moto_bucket.name, "p/big") is None
    proxy.always("reset")
    with pytest.raises(ObjectStoreError, match="did not answer after 3 attempts"):
        c.put_bytes(moto_bucket.name, "p/small", b"x")
