"""Multi-host rehearsal: writers on two "hosts" sharing one PostgreSQL catalog and one directory.

Each host is a network namespace (``ip netns``) on a veth pair of its own, with its own hostname
(UTS namespace) and pid namespace (``unshare --uts --pid --fork --mount-proc``). PostgreSQL
listens on 127.0.0.1 only; rather than changing its configuration, the test runs a small TCP
forwarder on the host side of each veth (the least invasive choice; nothing of the server's is
touched). Everything created (namespaces, veths, forwarder) is removed afterwards.

1. both hosts checkpoint concurrently, each into a run of its own and both into one shared run;
2. host A begins a checkpoint and is frozen (SIGSTOP) past the heartbeat timeout
   (``RecoveryOptions(stale_after=...)``); host B's recovery rolls A's pending checkpoint back and B
   commits the same step; A is resumed (SIGCONT) and commits: it must find its checkpoint rolled
   back and raise, never commit over B's decision.

Skipped where network namespaces or ``unshare`` are not permitted (not root, a container).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from ckptdb import FileCheckpointManager, RecoveryOptions
from ckptdb.catalog import Catalog
from ckptdb.verify import verify

pytestmark = pytest.mark.postgres
ROOT = Path(__file__).resolve().parents[2]
CHILD = ROOT / "tests" / "integration" / "child_multihost.py"
STALE_S = 3.0


def _sh(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30)


def _netns_permitted() -> str | None:
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("unshare"):
        return "needs root, ip and unshare"
    name = f"ckp{secrets.token_hex(3)}"
    r = _sh("ip", "netns", "add", name)
    if r.returncode != 0:
        return f"ip netns add refused: {r.stderr.strip()}"
    try:
        r = _sh("ip", "netns", "exec", name, "unshare", "--uts", "--pid", "--fork", "--mount-proc", "true")
        return None if r.returncode == 0 else f"unshare refused: {r.stderr.strip()}"
    finally:
        _sh("ip", "netns", "del", name)


class Forwarder:
    """Accepts on (addr, port) and pipes each connection to 127.0.0.1:target."""

    def __init__(self, addrs: list[str], target: int) -> None:
        self.target = target
        self.socks: list[socket.socket] = []
        self.conns: list[socket.socket] = []  # closed by close()
        self.stop = threading.Event()
        port = 0
        for a in addrs:
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((a, port))
            port = s.getsockname()[1]  # the same port on every address
            s.listen(64)
            s.settimeout(0.2)
            self.socks.append(s)
            threading.Thread(target=self._accept, args=(s,), daemon=True).start()
        self.port = port

    def _accept(self, s: socket.socket) -> None:
        while not self.stop.is_set():
            try:
                c, _ = s.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            u = socket.create_connection(("127.0.0.1", self.target))
            self.conns += [c, u]
            for x, y in ((c, u), (u, c)):
                threading.Thread(target=self._pipe, args=(x, y), daemon=True).start()

    @staticmethod
    def _pipe(x: socket.socket, y: socket.socket) -> None:
        with suppress(OSError):
            while data := x.recv(65536):
                y.sendall(data)
        with suppress(OSError):
            y.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.stop.set()
        for s in [*self.socks, *self.conns]:
            s.close()


@pytest.fixture
def hosts(catalog_url: str) -> Iterator[tuple[list[tuple[str, str]], str]]:
    """Two namespaces ("hostA", "hostB") with a veth each; yields ([(netns, url)], host-side url)."""
    if catalog_url.startswith("sqlite"):
        pytest.skip("the hosts share a PostgreSQL catalog")
    why = _netns_permitted()
    if why:
        pytest.skip(why)
    tag = secrets.token_hex(2)
    made: list[str] = []
    nets = []
    u = make_url(catalog_url)
    pg_port = u.port or 5432
    try:
        for i, host in enumerate(("hostA", "hostB"), 1):
            ns, veth_h, veth_n = f"ckr{tag}{host[-1]}", f"ckr{tag}{i}h", f"ckr{tag}{i}n"
            subnet = f"10.231.{int(tag, 16) % 200 + i}"
            for cmd in (
                ["ip", "netns", "add", ns],
                ["ip", "link", "add", veth_h, "type", "veth", "peer", "name", veth_n],
                ["ip", "link", "set", veth_n, "netns", ns],
                ["ip", "addr", "add", f"{subnet}.1/30", "dev", veth_h],
                ["ip", "link", "set", veth_h, "up"],
                ["ip", "netns", "exec", ns, "ip", "addr", "add", f"{subnet}.2/30", "dev", veth_n],
                ["ip", "netns", "exec", ns, "ip", "link", "set", veth_n, "up"],
                ["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"],
            ):
                r = _sh(*cmd)
                assert r.returncode == 0, (cmd, r.stderr)
                if cmd[1:3] == ["netns", "add"]:
                    made.append(f"ns:{ns}")
                if cmd[1:3] == ["link", "add"]:
                    made.append(f"link:{veth_h}")
            nets.append((ns, host, f"{subnet}.1"))
        fwd = Forwarder([a for _, _, a in nets], pg_port)
        try:
            urls = [(ns, u.set(host=addr, port=fwd.port).render_as_string(hide_password=False)) for ns, _, addr in nets]
            yield urls, catalog_url
        finally:
            fwd.close()
    finally:
        for m in reversed(made):
            kind, name = m.split(":", 1)
            if kind == "ns":
                _sh("ip", "netns", "del", name)
            else:
                _sh("ip", "link", "del", name)


def _spawn(ns: str, host: str, *args: str) -> subprocess.Popen[str]:
    inner = f"hostname {host} && exec {sys.executable} {CHILD} " + " ".join(f"'{a}'" for a in args)
    return subprocess.Popen(
        ["ip", "netns", "exec", ns, "unshare", "--uts", "--pid", "--fork", "--mount-proc", "sh", "-c", inner],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        start_new_session=True,  # the whole host (unshare, sh, python) is one process group: SIGSTOP it
    )


def _finish(p: subprocess.Popen[str], timeout: float = 240) -> tuple[int, str]:
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out + err[-3000:]


@pytest.mark.timeout(600)
def test_two_hosts_share_a_catalog(hosts: tuple[list[tuple[str, str]], str], tmp_path: Path) -> None:
    (ns_a, url_a), (ns_b, url_b) = hosts[0]
    d = tmp_path / "shared" / "ck"
    d.mkdir(parents=True)
    # 1. concurrent writers: a run of each host's own, and one run both write into
    procs = [
        _spawn(ns_a, "hostA", "write", str(d / "a"), url_a, "run-a", "1,2,3,4"),
        _spawn(ns_b, "hostB", "write", str(d / "b"), url_b, "run-b", "1,2,3,4"),
        _spawn(ns_a, "hostA", "write", str(d / "s"), url_a, "shared", "1,3,5,7"),
        _spawn(ns_b, "hostB", "write", str(d / "s"), url_b, "shared", "2,4,6,8"),
    ]
    for p in procs:
        rc, out = _finish(p)
        assert rc == 0 and "DONE" in out, out
        assert "pid=1 " in out  # pid 1 of a namespace of its own
    cat = Catalog(hosts[1])
    assert {h for r in ("run-a", "run-b", "shared") for h in _hosts(cat, r)} == {"hostA", "hostB"}
    for run, steps in (("run-a", [1, 2, 3, 4]), ("run-b", [1, 2, 3, 4]), ("shared", list(range(1, 9)))):
        assert cat.committed_steps(cat.get_run(run).id) == steps
        assert verify(cat, run=run).ok
    # 2. host A frozen past the heartbeat timeout; host B rolls its checkpoint back and commits step 9
    a = _spawn(ns_a, "hostA", "hold", str(d / "s"), url_a, "shared", "9")
    assert a.stdout is not None
    line = a.stdout.readline()
    assert "READY" in line, line + (a.stderr.read() if a.stderr else "")
    os.killpg(a.pid, signal.SIGSTOP)
    try:
        time.sleep(STALE_S + 1.5)
        rc, out = _finish(_spawn(ns_b, "hostB", "write", str(d / "s"), url_b, "shared", "9", str(STALE_S)))
        assert rc == 0 and "DONE" in out, out
    finally:
        os.killpg(a.pid, signal.SIGCONT)
    (d / "go").write_text("go")
    rc, out = _finish(a)
    assert rc == 1 and "FAILED" in out and "rolled back by another process" in out, line + out
    run = cat.get_run("shared")
    rows = [c for c in cat.checkpoints(run.id, with_scores=False) if c.step_nr == 9]
    assert sorted((c.state, c.writer_host) for c in rows) == [("aborted", "hostA"), ("committed", "hostB")]
    assert cat.committed_steps(run.id) == list(range(1, 10))
    assert verify(cat, run="shared").ok
    m = FileCheckpointManager(d / "s", catalog=hosts[1], run="shared", recovery_options=RecoveryOptions())
    try:
        assert m.load_last_checkpoint()[0] == 9
        assert not [p.name for p in (d / "s").iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    finally:
        m.close()


def _hosts(cat: Catalog, run: str) -> set[str]:
    return {c.writer_host for c in cat.checkpoints(cat.get_run(run).id, with_scores=False)}
