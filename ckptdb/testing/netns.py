"""Network namespaces as "hosts" on loopback, for multi-host rehearsals (tests and scripts/).

Each host is an ``ip netns`` namespace on a veth pair of its own; a :class:`Forwarder` on the host
side of each veth carries the hosts' connections to servers listening on 127.0.0.1 (PostgreSQL,
an S3 server), so nothing of the servers' configuration changes. Needs root, ``ip`` and ``unshare``.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress


def sh(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30)


def netns_permitted() -> str | None:
    """None when this machine lets us make network namespaces, else why not."""
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("unshare"):
        return "needs root, ip and unshare"
    name = f"ckp{secrets.token_hex(3)}"
    r = sh("ip", "netns", "add", name)
    if r.returncode != 0:
        return f"ip netns add refused: {r.stderr.strip()}"
    try:
        r = sh("ip", "netns", "exec", name, "unshare", "--uts", "--pid", "--fork", "--mount-proc", "true")
        return None if r.returncode == 0 else f"unshare refused: {r.stderr.strip()}"
    finally:
        sh("ip", "netns", "del", name)


class Forwarder:
    """Accepts on (addr, port) for each address and pipes each connection to 127.0.0.1:target."""

    def __init__(self, addrs: list[str], target: int) -> None:
        self.target = target
        self.socks: list[socket.socket] = []
        self.conns: list[socket.socket] = []
        self.stop = threading.Event()
        port = 0
        for a in addrs:
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((a, port))
            port = s.getsockname()[1]
            s.listen(128)
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
            try:
                u = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                c.close()
                continue
            self.conns += [c, u]
            for x, y in ((c, u), (u, c)):
                threading.Thread(target=self._pipe, args=(x, y), daemon=True).start()

    @staticmethod
    def _pipe(x: socket.socket, y: socket.socket) -> None:
        with suppress(OSError):
            while data := x.recv(1 << 20):
                y.sendall(data)
        with suppress(OSError):
            y.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.stop.set()
        for s in [*self.socks, *self.conns]:
            with suppress(OSError):
                s.close()


@contextmanager
def namespaces(hosts: tuple[str, ...]) -> Iterator[list[tuple[str, str, str]]]:
    """(netns, hostname, host-side address) per host; everything removed afterwards."""
    tag = secrets.token_hex(2)
    made: list[tuple[str, str]] = []
    nets = []
    try:
        for i, host in enumerate(hosts, 1):
            ns, veth_h, veth_n = f"cks{tag}{i}", f"cks{tag}{i}h", f"cks{tag}{i}n"
            subnet = f"10.232.{int(tag, 16) % 200 + i}"
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
                r = sh(*cmd)
                if r.returncode != 0:
                    raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")
                if cmd[1:3] == ["netns", "add"]:
                    made.append(("netns", ns))
                if cmd[1:3] == ["link", "add"]:
                    made.append(("link", veth_h))
            nets.append((ns, host, f"{subnet}.1"))
        yield nets
    finally:
        for kind, name in reversed(made):
            sh("ip", kind, "del", name)


__all__ = ["Forwarder", "namespaces", "netns_permitted", "sh"]
