"""A real `ckptdb ui` server (uvicorn, in a thread) over a catalog made by real training runs."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

import uvicorn

from ckptdb import FileCheckpointManager
from ckptdb.ui.app import create_app
from tests.catalog import sqldata


@dataclass
class UiServer:
    base: str
    url: str  # the catalog
    managers: dict[str, FileCheckpointManager]
    tmp: Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def ui_server(tmp_path: Path, catalog_url: str) -> Iterator[UiServer]:
    managers = sqldata.build(tmp_path, catalog_url)
    port = free_port()
    app = create_app(catalog_url, allowed_hosts=["127.0.0.1", "localhost"])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", ws="none"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield UiServer(f"http://127.0.0.1:{port}", catalog_url, managers, tmp_path)
    finally:
        server.should_exit = True
        thread.join(10)
        for m in managers.values():
            m.close()
