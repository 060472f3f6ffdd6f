"""A TCP proxy on loopback between an S3 client and a server that injects faults, request by request.

It speaks just enough HTTP/1.1 to see request boundaries: it reads each request's head and its
``Content-Length`` body, then either forwards it (over a fresh upstream connection) and relays the
response, or injects a fault:

* ``"503"``   -- answers ``503 SlowDown`` (S3's throttling reply) without forwarding;
* ``"reset"`` -- resets the client's connection (RST) without forwarding;
* ``"lose"``  -- forwards the request (the server acts on it) and resets the client's connection
  instead of relaying the answer: a response lost on the way back.

Faults are queued with :meth:`FaultProxy.inject` for the next ``count`` requests that match an
optional predicate (method, path), or set for every request with :meth:`FaultProxy.always`.
Every response is relayed with ``Connection: close`` so the client opens one connection per request.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

Predicate = Callable[[str, str], bool]  # (method, path-with-query) -> applies?

_SLOWDOWN = (
    b"<?xml version='1.0' encoding='UTF-8'?>\n<Error><Code>SlowDown</Code>"
    b"<Message>Please reduce your request rate.</Message></Error>"
)


@dataclass
class _Rule:
    fault: str
    count: int | None  # None: forever
    pred: Predicate | None


class FaultProxy:
    def __init__(self, upstream: str) -> None:
        hostport = upstream.split("://", 1)[-1].rstrip("/")
        host, port = hostport.rsplit(":", 1)
        self.upstream = (host, int(port))
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(128)
        self.endpoint = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._rules: list[_Rule] = []
        self._lock = threading.Lock()
        self.seen: list[tuple[str, str, str]] = []  # (method, path, what happened)
        self._stopped = False
        self._thread = threading.Thread(target=self._accept, name="faultproxy", daemon=True)
        self._thread.start()

    # control ---------------------------------------------------------------
    def inject(self, fault: str, count: int = 1, pred: Predicate | None = None) -> None:
        assert fault in ("503", "reset", "lose")
        with self._lock:
            self._rules.append(_Rule(fault, count, pred))

    def always(self, fault: str, pred: Predicate | None = None) -> None:
        with self._lock:
            self._rules.append(_Rule(fault, None, pred))

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()

    def count(self, what: str) -> int:
        with self._lock:
            return sum(1 for s in self.seen if s[2] == what)

    def close(self) -> None:
        self._stopped = True
        with contextlib.suppress(OSError):
            self._sock.close()

    # serving ---------------------------------------------------------------
    def _pick(self, method: str, path: str) -> str | None:
        with self._lock:
            for r in self._rules:
                if r.pred is None or r.pred(method, path):
                    if r.count is not None:
                        r.count -= 1
                        if r.count <= 0:
                            self._rules.remove(r)
                    return r.fault
        return None

    def _accept(self) -> None:
        while not self._stopped:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            self._serve_one(conn)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                conn.close()

    def _serve_one(self, conn: socket.socket) -> None:
        head, rest = _read_head(conn)
        if head is None:
            return
        lines = head.split(b"\r\n")
        method, path, _ = lines[0].decode("latin-1").split(" ", 2)
        length = 0
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            low = name.strip().lower()
            if low == b"content-length":
                length = int(value.strip())
            if low in (b"connection", b"keep-alive"):
                continue
            headers.append(line)
        body = rest + _read_exact(conn, length - len(rest))
        fault = self._pick(method, path)
        with self._lock:
            self.seen.append((method, path, fault or "ok"))
        if fault == "503":
            conn.sendall(
                b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nConnection: close\r\n"
                + f"Content-Length: {len(_SLOWDOWN)}\r\n\r\n".encode()
                + _SLOWDOWN
            )
            return
        if fault == "reset":
            _reset(conn)
            return
        up = socket.create_connection(self.upstream)
        try:
            req = b"\r\n".join([lines[0], *headers, b"Connection: close"]) + b"\r\n\r\n"
            up.sendall(req + body)
            if fault == "lose":
                # let the server finish acting on the request, then drop the answer
                resp_head, _ = _read_head(up)
                _reset(conn)
                return
            resp_head, resp_rest = _read_head(up)
            if resp_head is None:
                _reset(conn)
                return
            rlines = [ln for ln in resp_head.split(b"\r\n") if not ln.lower().startswith(b"connection:")]
            conn.sendall(b"\r\n".join([*rlines, b"Connection: close"]) + b"\r\n\r\n" + resp_rest)
            while True:
                chunk = up.recv(1 << 20)
                if not chunk:
                    break
                conn.sendall(chunk)
        finally:
            up.close()


def _read_head(s: socket.socket) -> tuple[bytes | None, bytes]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            return None, b""
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head, rest


def _read_exact(s: socket.socket, n: int) -> bytes:
    parts = []
    while n > 0:
        chunk = s.recv(min(n, 1 << 20))
        if not chunk:
            raise OSError("client closed mid-body")
        parts.append(chunk)
        n -= len(chunk)
    return b"".join(parts)


def _reset(s: socket.socket) -> None:
    """Close with RST (SO_LINGER 0): the client sees 'connection reset by peer'."""
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
