"""Crash-state (power-loss) checker, in the manner of ALICE and CrashMonkey.

    python -m ckptdb.testing.crashcheck [--protocol P ...] [--model ext4|strict ...] [--workdir D]

For each protocol of :mod:`ckptdb.testing.crash_protocols`:

1. **record**: build the protocol's base state in a fresh directory ``ROOT`` (untraced), ``sync``,
   snapshot it, then run the protocol in a real child process under
   ``strace -f -y -xx -s <big>`` and parse the trace into a list of logical operations on inodes
   and paths: ``creat``, ``mkdir``, ``rename``, ``unlink``, ``rmdir`` (metadata), ``write``
   (bytes at an offset), ``trunc`` (``O_TRUNC``, ``ftruncate``), ``fsync`` (``fsync``,
   ``fdatasync``), ``sync``. The SQLite catalog (``catalog.db``, ``-wal``, ``-journal``) is
   recorded like every other file; ``-shm`` is not (SQLite rebuilds it). Descriptors are resolved
   to paths by strace (``-y``) and paths to inodes by replaying the metadata operations (so a
   renamed directory's files keep their identity). Mutations of files outside ``ROOT`` are
   reported.
2. **generate** the crash states of every prefix of the operation list under a persistence model
   (see :func:`crash_states`), deduplicated by the resulting tree's content.
3. **check** each state: materialise it in ``ROOT`` (wiped first; the same absolute path, since
   the catalog records it), open a :class:`~ckptdb.FileCheckpointManager` (recovery runs) and
   check the invariants of :func:`check_state`.

Persistence models (both bounded the same way, see :func:`crash_states`):

``ext4`` (ext4 ``data=ordered``, as ALICE's ext4 APM): metadata operations reach the disk in
program order (the journal commits transactions in order: the persisted metadata operations are a
prefix); ``fsync(X)`` persists X's data and every metadata operation up to the last one that
touched X (its creation, a rename of it, an entry in it when X is a directory). File data is
independent of metadata: the data of a file not yet fsynced may be absent, truncated or have
holes, even when a later rename of the file persisted (delayed allocation).

``strict`` (POSIX, no ordering at all): an operation is durable only when fsynced: data by
``fsync`` of its file, an entry by ``fsync`` of its parent directory (both directories for a
rename). Every other operation may be lost independently. This is also the PostgreSQL model: a
PostgreSQL catalog is durable at COMMIT on another machine, with no order relative to the
checkpoint directory's filesystem, exactly as a SQLite WAL frame fsynced here implies nothing
about other files under ``strict``; the SQLite catalog in each ``strict`` state is as of its
last durable commit, which is what PostgreSQL gives.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptdb.testing import crash_protocols

TRACED = (
    "open,openat,creat,write,pwrite64,writev,pwritev,pwritev2,lseek,fsync,fdatasync,sync_file_range,"
    "rename,renameat,renameat2,unlink,unlinkat,mkdir,mkdirat,rmdir,truncate,ftruncate,fallocate,"
    "link,linkat,symlink,symlinkat,sendfile,copy_file_range,sync,syncfs"
)
META = frozenset({"creat", "mkdir", "rename", "unlink", "rmdir"})
DATA = frozenset({"write", "trunc"})
ACK = crash_protocols.ACK
DEBRIS = re.compile(r"\.(tmp|old|trash)-")
PER_FILE_DROPS = 6  # a file with more volatile writes gets first/middle/last dropped, not each


class TraceError(Exception):
    """The trace holds something the recorder cannot model."""


@dataclass(frozen=True, slots=True)
class Op:
    """One logical file-system operation. Paths are relative to ROOT."""

    idx: int
    kind: str  # creat mkdir rename unlink rmdir | write trunc | fsync sync
    path: str = ""
    path2: str = ""  # rename's destination
    ino: int = -1  # write/trunc/fsync: the inode; creat/mkdir: the new inode; rename/unlink: the moved one
    off: int = 0
    data: bytes = b""
    size: int = 0  # trunc
    parents: tuple[int, ...] = ()  # directories whose entries a metadata op changes
    syscall: str = ""

    def describe(self) -> str:
        if self.kind == "write":
            return f"#{self.idx} write ino{self.ino} @{self.off} +{len(self.data)}"
        if self.kind == "trunc":
            return f"#{self.idx} trunc ino{self.ino} to {self.size}"
        if self.kind in ("fsync", "sync"):
            return f"#{self.idx} {self.syscall} ino{self.ino}"
        return f"#{self.idx} {self.kind} {self.path}" + (f" -> {self.path2}" if self.path2 else "")


@dataclass
class Tree:
    """A file tree: relative path -> inode; inode -> content (None: a directory)."""

    entries: dict[str, int]
    content: dict[int, bytearray | None]

    def copy(self) -> Tree:
        return Tree(dict(self.entries), {k: (None if v is None else bytearray(v)) for k, v in self.content.items()})

    def is_dir(self, path: str) -> bool:
        ino = self.entries.get(path)
        return ino is not None and self.content.get(ino, b"") is None

    def parent_ok(self, path: str) -> bool:
        parent = os.path.dirname(path)
        return parent == "" or self.is_dir(parent)

    def children(self, path: str) -> list[str]:
        pre = path + "/"
        return [p for p in self.entries if p.startswith(pre)]

    def apply(self, op: Op, *, torn: bool = False) -> None:
        """Apply ``op``; an op that cannot apply (its parent or source was lost) is skipped."""
        k = op.kind
        if k in ("creat", "mkdir"):
            if op.path not in self.entries and self.parent_ok(op.path):
                self.entries[op.path] = op.ino
                if k == "mkdir":
                    self.content[op.ino] = None
                elif op.ino not in self.content:
                    self.content[op.ino] = bytearray()
        elif k == "write":
            buf = self.content.get(op.ino)
            if buf is None:
                if op.ino in self.content:
                    return
                buf = self.content[op.ino] = bytearray()
            data = op.data[: len(op.data) // 2] if torn else op.data
            end = op.off + len(data)
            if len(buf) < op.off:
                buf.extend(b"\0" * (op.off - len(buf)))
            buf[op.off : end] = data
        elif k == "trunc":
            buf = self.content.get(op.ino)
            if buf is None:
                if op.ino in self.content:
                    return
                buf = self.content[op.ino] = bytearray()
            if op.size <= len(buf):
                del buf[op.size :]
            else:
                buf.extend(b"\0" * (op.size - len(buf)))
        elif k == "unlink":
            if op.path in self.entries and not self.is_dir(op.path):
                del self.entries[op.path]
        elif k == "rmdir":
            if self.is_dir(op.path) and not self.children(op.path):
                del self.entries[op.path]
        elif k == "rename":
            src, dst = op.path, op.path2
            if src not in self.entries or not self.parent_ok(dst) or (dst + "/").startswith(src + "/"):
                return
            if self.is_dir(src):
                if dst in self.entries and (not self.is_dir(dst) or self.children(dst)):
                    return
                moved = [src, *self.children(src)]
                items = [(p, self.entries.pop(p)) for p in moved]
                self.entries.pop(dst, None)
                for p, ino in items:
                    self.entries[dst + p[len(src) :]] = ino
            else:
                if self.is_dir(dst):
                    return
                self.entries[dst] = self.entries.pop(src)

    def digest(self) -> str:
        h = hashlib.sha1()
        for p in sorted(self.entries):
            c = self.content.get(self.entries[p])
            h.update(p.encode() + b"\0" + (b"D" if c is None else hashlib.sha1(c).digest()) + b"\0")
        return h.hexdigest()

    def materialize(self, root: Path) -> None:
        wipe(root)
        root.mkdir(parents=True)
        for p in sorted(self.entries):
            c = self.content.get(self.entries[p])
            target = root / p
            if c is None:
                target.mkdir()
            else:
                target.write_bytes(bytes(c))


def wipe(root: Path) -> None:
    if root.exists():
        shutil.rmtree(root)


def snapshot(root: Path) -> Tree:
    tree = Tree({}, {})
    ino = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames) + sorted(filenames):
            full = Path(dirpath) / name
            rel = str(full.relative_to(root))
            if rel.endswith("-shm"):
                continue
            ino += 1
            tree.entries[rel] = ino
            tree.content[ino] = None if full.is_dir() else bytearray(full.read_bytes())
    return tree


# -- the recorder -------------------------------------------------------------------------------

_HEX = re.compile(r"\\x([0-9a-f]{2})")


def _unhex(s: str) -> str:
    return bytes(int(h, 16) for h in _HEX.findall(s)).decode("utf-8", "surrogateescape")


def _split_args(s: str) -> list[str]:
    out: list[str] = []
    cur: list[str] = []
    depth, in_str = 0, False
    for ch in s:
        if ch == '"':
            in_str = not in_str
        elif not in_str:
            if ch in "[{(":
                depth += 1
            elif ch in "]})":
                depth -= 1
            elif ch == "," and depth == 0:
                out.append("".join(cur).strip())
                cur = []
                continue
        cur.append(ch)
    if cur:
        out.append("".join(cur).strip())
    return out


def _string(arg: str) -> bytes:
    m = re.fullmatch(r'"((?:\\x[0-9a-f]{2})*)"', arg)
    if m is None:
        raise TraceError(f"cannot read a string argument (truncated?): {arg[:80]}")
    return bytes(int(h, 16) for h in _HEX.findall(m.group(1)))


def _fd(arg: str) -> tuple[int | None, str]:
    """``5<\\x2f...>`` or ``AT_FDCWD<...>`` -> (fd or None, path)."""
    m = re.fullmatch(r"(-?\d+|AT_FDCWD)<(.*)>", arg)
    if m is None:
        return None, ""
    fd = None if m.group(1) == "AT_FDCWD" else int(m.group(1))
    return fd, _unhex(m.group(2))


def _join(dirarg: str, patharg: str) -> str:
    p = _string(patharg).decode("utf-8", "surrogateescape")
    if p.startswith("/"):
        return os.path.normpath(p)
    return os.path.normpath(os.path.join(_fd(dirarg)[1], p))


@dataclass
class Recording:
    protocol: str
    root: Path
    base: Tree
    ops: list[Op]
    ack: int  # ops[:ack] were issued when the protocol returned to its caller
    outside: list[str] = field(default_factory=list)  # mutations outside ROOT
    syscalls: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


class _Parser:
    def __init__(self, root: Path, base: Tree) -> None:
        self.root = str(root)
        self.model = base.copy()
        self.next_ino = max(base.content, default=0) + 1
        self.ops: list[Op] = []
        self.offsets: dict[int, int] = {}
        self.outside: list[str] = []
        self.syscalls: dict[str, int] = {}
        self.ack: int | None = None

    def rel(self, path: str) -> str | None:
        if path == self.root:
            return ""
        if path.startswith(self.root + "/"):
            return path[len(self.root) + 1 :]
        return None

    def _outside(self, what: str, path: str) -> None:
        if path.startswith(("/dev/", "/proc/", "/sys/")) or not path.startswith("/"):
            return
        self.outside.append(f"{what} {path}")

    def add(self, kind: str, **kw: Any) -> None:
        self.ops.append(Op(len(self.ops), kind, **kw))
        self.model.apply(self.ops[-1])

    def ino_of(self, rel: str) -> int:
        ino = self.model.entries.get(rel)
        if ino is None:
            raise TraceError(f"no inode known for {rel!r}")
        return ino

    def parent_ino(self, rel: str) -> int:
        parent = os.path.dirname(rel)
        return self.ino_of(parent) if parent else 0

    def fd_target(self, arg: str, what: str) -> tuple[int | None, str | None]:
        fd, path = _fd(arg)
        if path.endswith(" (deleted)"):
            return fd, None  # data of a removed file: no durable effect
        rel = self.rel(path)
        if rel is None:
            self._outside(what, path)
        elif rel.endswith("-shm"):
            return fd, None
        return fd, rel

    def data_op(self, rel: str, off: int, data: bytes, syscall: str) -> None:
        if data:
            self.add("write", ino=self.ino_of(rel), off=off, data=data, syscall=syscall)

    def line(self, name: str, args: list[str], ret: str) -> None:
        self.syscalls[name] = self.syscalls.get(name, 0) + 1
        rm = re.match(r"(-?\d+)", ret)
        if rm is None or int(rm.group(1)) < 0:
            return  # failed (or never returned): no effect
        rv = int(rm.group(1))
        if name in ("open", "openat", "creat"):
            flags = args[2] if name == "openat" else (args[1] if name == "open" else "O_CREAT|O_TRUNC")
            if "O_CREAT" not in flags and "O_TRUNC" not in flags and "O_WRONLY" not in flags and "O_RDWR" not in flags:
                return
            fd, path = _fd(ret)
            if fd is None:
                return
            self.offsets[fd] = 0
            rel = self.rel(path)
            if rel is None:
                if "O_CREAT" in flags or "O_TRUNC" in flags:
                    self._outside("create", path)
                return
            if rel.endswith("-shm") or self.model.is_dir(rel):
                return
            if rel not in self.model.entries:
                if "O_CREAT" not in flags:
                    raise TraceError(f"{rel} opened but unknown")
                self.add("creat", path=rel, ino=self.next_ino, parents=(self.parent_ino(rel),), syscall=name)
                self.next_ino += 1
            elif "O_TRUNC" in flags and len(self.model.content[self.ino_of(rel)] or b""):
                self.add("trunc", ino=self.ino_of(rel), size=0, syscall=name)
        elif name == "lseek":
            fd, _ = _fd(args[0])
            if fd is not None:
                self.offsets[fd] = rv
        elif name in ("write", "pwrite64", "writev", "pwritev", "pwritev2"):
            fd, rel = self.fd_target(args[0], "write")
            if name in ("writev", "pwritev", "pwritev2"):
                data = b"".join(_string(m) for m in re.findall(r'iov_base=("[^"]*"(?:\.\.\.)?)', args[1]))
            else:
                data = _string(args[1])
            data = data[:rv]
            if data.startswith(ACK):  # the protocol returned to its caller: ops[:ack] were issued
                self.ack = len(self.ops)
            positional = name in ("pwrite64", "pwritev", "pwritev2")
            off = int(args[3]) if positional else self.offsets.get(fd or -1, 0)
            if not positional and fd is not None:
                self.offsets[fd] = off + rv
            if rel is not None:
                self.data_op(rel, off, data, name)
        elif name in ("fsync", "fdatasync"):
            _, rel = self.fd_target(args[0], "fsync")
            if rel is not None:
                self.add("fsync", ino=self.ino_of(rel), syscall=name)
        elif name in ("sync", "syncfs"):
            self.add("sync", syscall=name)
        elif name in ("ftruncate", "truncate", "fallocate"):
            if name == "truncate":
                rel = self.rel(_join("AT_FDCWD<>", args[0]))
            else:
                _, rel = self.fd_target(args[0], name)
            if rel is None:
                return
            ino = self.ino_of(rel)
            cur = len(self.model.content[ino] or b"")
            if name == "fallocate":
                if args[1] not in ("0", "FALLOC_FL_KEEP_SIZE"):
                    raise TraceError(f"fallocate mode {args[1]} not modelled")
                end = int(args[2]) + int(args[3])
                if args[1] == "0" and end > cur:
                    self.add("trunc", ino=ino, size=end, syscall=name)
            else:
                self.add("trunc", ino=ino, size=int(args[1]), syscall=name)
        elif name in ("rename", "renameat", "renameat2"):
            if name == "rename":
                src, dst = _join("AT_FDCWD<>", args[0]), _join("AT_FDCWD<>", args[1])
            else:
                src, dst = _join(args[0], args[1]), _join(args[2], args[3])
                if name == "renameat2" and "RENAME_EXCHANGE" in args[4]:
                    raise TraceError("RENAME_EXCHANGE not modelled")
            rs, rd = self.rel(src), self.rel(dst)
            if rs is None or rd is None:
                if rs is not None or rd is not None:
                    raise TraceError(f"rename across ROOT: {src} -> {dst}")
                self._outside("rename", dst)
                return
            self.add(
                "rename",
                path=rs,
                path2=rd,
                ino=self.ino_of(rs),
                parents=tuple(sorted({self.parent_ino(rs), self.parent_ino(rd)})),
                syscall=name,
            )
        elif name in ("unlink", "unlinkat", "rmdir"):
            if name == "unlinkat":
                path, is_dir = _join(args[0], args[1]), "AT_REMOVEDIR" in args[2]
            else:
                path, is_dir = _join("AT_FDCWD<>", args[0]), name == "rmdir"
            rel = self.rel(path)
            if rel is None:
                self._outside("unlink", path)
                return
            if rel.endswith("-shm"):
                return
            self.add(
                "rmdir" if is_dir else "unlink",
                path=rel,
                ino=self.ino_of(rel),
                parents=(self.parent_ino(rel),),
                syscall=name,
            )
        elif name in ("mkdir", "mkdirat"):
            path = _join("AT_FDCWD<>", args[0]) if name == "mkdir" else _join(args[0], args[1])
            rel = self.rel(path)
            if rel is None:
                self._outside("mkdir", path)
                return
            self.add("mkdir", path=rel, ino=self.next_ino, parents=(self.parent_ino(rel),), syscall=name)
            self.next_ino += 1
        elif name in ("link", "linkat", "symlink", "symlinkat", "sendfile", "copy_file_range"):
            involved = [a for a in args if self.root in _unhex(a)]
            if involved:
                raise TraceError(f"{name} inside ROOT is not modelled")
        # sync_file_range: starts writeback, guarantees nothing


_LINE = re.compile(r"^(\d+)\s+(.*)$")


def parse_trace(text: str, root: Path, base: Tree) -> tuple[list[Op], list[str], dict[str, int], int | None]:
    """The operations, the mutations outside ``root``, syscall counts, and the number of operations
    issued when the protocol acknowledged (returned to its caller), if it did."""
    parser = _Parser(root, base)
    pending: dict[str, str] = {}
    for raw in text.splitlines():
        m = _LINE.match(raw)
        if m is None:
            continue
        pid, rest = m.groups()
        if rest.startswith(("---", "+++")):
            continue
        if rest.endswith("<unfinished ...>"):
            pending[pid] = rest[: -len("<unfinished ...>")].rstrip()
            continue
        rm = re.match(r"<\.\.\. (\w+) resumed>(.*)$", rest)
        if rm is not None:
            rest = pending.pop(pid, "") + rm.group(2)
        cm = re.match(r"(\w+)\((.*)\)\s+=\s+(.*)$", rest)
        if cm is None:
            continue
        name, argtext, ret = cm.groups()
        parser.line(name, _split_args(argtext), ret)
    return parser.ops, parser.outside, parser.syscalls, parser.ack


def record(protocol: str, root: Path, python: str = sys.executable) -> Recording:
    """Set up ``protocol``'s base state in ``root`` and record the protocol under strace."""
    wipe(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    mod = "ckptdb.testing.crash_protocols"
    subprocess.run([python, "-m", mod, "setup", protocol, str(root)], check=True, env=env, capture_output=True)
    os.sync()
    base = snapshot(root)
    trace = root.parent / f"{root.name}.strace"
    start = time.monotonic()
    cmd = ["strace", "-f", "-y", "-xx", "-s", str(1 << 28), "--seccomp-bpf", "-o", str(trace), "-e", f"trace={TRACED}"]
    r = subprocess.run([*cmd, python, "-m", mod, "run", protocol, str(root)], env=env, capture_output=True, text=True)
    seconds = time.monotonic() - start
    if r.returncode != 0:
        raise TraceError(f"{protocol}: the protocol failed under strace ({r.returncode}): {r.stderr[-2000:]}")
    ops, outside, syscalls, ack = parse_trace(trace.read_text(), root, base)
    trace.unlink()
    if ack is None:
        raise TraceError(f"{protocol}: no acknowledgement in the trace")
    return Recording(protocol, root, base, ops, ack, outside, syscalls, seconds)


# -- the crash states -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CrashState:
    prefix: int  # ops[:prefix] were issued
    persisted: frozenset[int]
    torn: int = -1  # an op persisted half-written
    why: str = ""


def _forcing(ops: Sequence[Op], model: str) -> list[int]:
    """For each op, the index of the first later op that makes it durable (len(ops): none)."""
    n = len(ops)
    forced = [n] * n
    last_sync = n
    fsyncs: dict[int, list[int]] = {}
    for o in ops:
        if o.kind == "fsync":
            fsyncs.setdefault(o.ino, []).append(o.idx)

    def next_fsync(ino: int, after: int) -> int:
        return min((j for j in fsyncs.get(ino, []) if j > after), default=n)

    syncs = [o.idx for o in ops if o.kind == "sync"]
    for o in ops:
        last_sync = min((j for j in syncs if j > o.idx), default=n)
        if o.kind in DATA:
            forced[o.idx] = min(last_sync, next_fsync(o.ino, o.idx))
        elif o.kind in META:
            if model == "strict":
                forced[o.idx] = min(last_sync, max((next_fsync(p, o.idx) for p in o.parents), default=n))
            else:
                touched = {*o.parents, o.ino}
                forced[o.idx] = min(last_sync, min((next_fsync(p, o.idx) for p in touched), default=n))
    if model == "ext4":  # the journal commits in order: an op is durable once any later one is
        running = n
        for o in reversed(ops):
            if o.kind in META:
                running = min(running, forced[o.idx])
                forced[o.idx] = running
    return forced


def _data_variants(vol_by_ino: dict[int, list[int]]) -> Iterator[tuple[set[int], int, str]]:
    """Per file with volatile writes: (ops dropped, op torn, why)."""
    for ino, idxs in vol_by_ino.items():
        yield set(idxs), -1, f"ino{ino} data lost"
        yield set(idxs[len(idxs) // 2 :]), -1, f"ino{ino} data truncated"
        yield set(idxs[1:]), idxs[0], f"ino{ino} first write torn"
        yield set(), idxs[-1], f"ino{ino} last write torn"
        picks = idxs if len(idxs) <= PER_FILE_DROPS else [idxs[0], idxs[len(idxs) // 2], idxs[-1]]
        for i in picks:
            yield {i}, -1, f"ino{ino} hole at #{i}"


def crash_states(ops: Sequence[Op], model: str, *, widest_only: bool = False) -> Iterator[CrashState]:
    """The crash states of every prefix of ``ops`` under ``model`` (``ext4`` or ``strict``).

    Bound, for each prefix (crash after op p): everything issued persisted; only what fsync forced;
    for each file with un-fsynced data, that data lost / truncated to its first half of writes / its
    first or last write torn in half / each write (first, middle and last of more than 6) dropped
    alone; and then, ``ext4``: the metadata journal cut before each un-forced metadata op (data all
    persisted, and data only forced); ``strict``: each un-forced metadata op dropped alone, and each
    un-forced metadata op persisted alone over what fsync forced.

    ``widest_only`` (the fast subset): only the prefixes that end just before an fsync or sync, and
    the whole list: the widest windows of un-fsynced operations.
    """
    forced = _forcing(ops, model)
    prefixes: Sequence[int] = range(len(ops) + 1)
    if widest_only:
        prefixes = [o.idx for o in ops if o.kind in ("fsync", "sync")] + [len(ops)]
    for p in prefixes:
        issued = range(p)
        durable = {i for i in issued if forced[i] < p}
        vol_meta = [i for i in issued if i not in durable and ops[i].kind in META]
        vol_data: dict[int, list[int]] = {}
        for i in issued:
            if i not in durable and ops[i].kind in DATA:
                vol_data.setdefault(ops[i].ino, []).append(i)
        everything = frozenset(issued)
        yield CrashState(p, everything, why="all issued")
        yield CrashState(p, frozenset(durable), why="only fsynced")
        for dropped, torn, why in _data_variants(vol_data):
            yield CrashState(p, everything - dropped, torn, why)
        all_data = frozenset(i for i in issued if ops[i].kind in DATA)
        if model == "ext4":
            for m in vol_meta:
                meta = {i for i in issued if ops[i].kind in META and i < m}
                yield CrashState(p, frozenset(meta | all_data), why=f"journal cut before #{m}")
                yield CrashState(p, frozenset(meta | (durable & all_data)), why=f"journal cut before #{m}, data lost")
        else:
            for m in vol_meta:
                yield CrashState(p, everything - {m}, why=f"#{m} lost")
                yield CrashState(p, frozenset(durable | {m}), why=f"only #{m} and fsynced")


def build(base: Tree, ops: Sequence[Op], st: CrashState) -> Tree:
    tree = base.copy()
    for i in range(st.prefix):
        if i == st.torn:
            tree.apply(ops[i], torn=True)
        elif i in st.persisted:
            tree.apply(ops[i])
    return tree


# -- the invariants -----------------------------------------------------------------------------


@dataclass
class Expect:
    """What a state is checked against (filled by the crash-free states)."""

    base_committed: dict[int, tuple[tuple[str, str], ...]] | None = None  # step -> digests, before
    final_committed: dict[int, tuple[tuple[str, str], ...]] | None = None  # after the protocol
    sentinels: dict[str, bytes] = field(default_factory=dict)


def sentinels(protocol: str, base: Tree) -> dict[str, bytes]:
    keep = ("outside/",) + (("ckpt/step_1/", "ckpt/step_2/") if protocol == "import" else ("ckpt/step_99/",))
    out = {}
    for p, ino in base.entries.items():
        c = base.content[ino]
        if c is not None and p.startswith(keep):
            out[p] = bytes(c)
    return out


def _close_connections(session: Any) -> None:
    """Close the catalog's pooled connections (the next state replaces its files); the engines and
    their compiled-statement caches stay, which halves the time a state takes."""
    for engine in list(session._engines.values()):
        engine.dispose()


def check_state(
    protocol: str, root: Path, expect: Expect, *, acknowledged: bool = False
) -> tuple[list[str], dict[int, tuple[tuple[str, str], ...]]]:
    """Open a manager on the state in ``root`` (recovery runs) and check the invariants.

    ``acknowledged``: the crash came after the protocol returned, so its outcome (the committed
    steps of the crash-free run, with their files) must be durable.

    Returns (violations, committed steps -> their files' digests).
    """
    from ckptdb import FileCheckpointManager
    from ckptdb.catalog import session
    from ckptdb.errors import CheckpointNotFoundError
    from ckptdb.options import LoadOptions
    from ckptdb.storage import layout
    from ckptdb.storage.hashing import hash_file

    bad: list[str] = []
    committed: dict[int, tuple[tuple[str, str], ...]] = {}
    d = crash_protocols.ckpt_dir(root)
    try:
        m = FileCheckpointManager(d, load_options=LoadOptions(fallback=False))
    except Exception as e:  # noqa: BLE001  (whatever the open raises is a violation to report)
        _close_connections(session)
        return [f"open failed: {type(e).__name__}: {e}"], committed
    try:
        cat, run = m.catalog, m.run
        for c in cat.checkpoints(run.id, states=["committed"], with_scores=False):
            files = []
            for s in cat.shards(c.id):
                f = d / layout.step_dir_name(c.step_nr) / s.path
                if not f.is_file():
                    bad.append(f"committed step {c.step_nr}: {s.path} is missing")
                    continue
                size, digest = hash_file(f, s.hash_algorithm)
                if (size, digest) != (s.size_bytes, s.digest):
                    bad.append(f"committed step {c.step_nr}: {s.path} does not verify")
                files.append((s.path, s.digest))
            committed[c.step_nr] = tuple(sorted(files))
        left = cat.checkpoints(run.id, states=["pending", "deleting"], with_scores=False)
        if left:
            bad.append(f"rows left after recovery: {[(c.step_nr, c.state) for c in left]}")
        debris = sorted(p.name for p in d.iterdir() if DEBRIS.search(p.name))
        if debris:
            bad.append(f"debris left after recovery: {debris}")
        try:
            step, _ = m.load_last_checkpoint()
            if step != max(committed, default=None):
                bad.append(f"resume point is step {step}, the newest committed is {max(committed, default=None)}")
        except CheckpointNotFoundError:
            if committed:
                bad.append("load_last_checkpoint found nothing although steps are committed")
        except Exception as e:  # noqa: BLE001  (any error is the violation)
            bad.append(f"resume point does not load: {type(e).__name__}: {e}")
        m.close()
    except Exception as e:  # noqa: BLE001  (any error is the violation)
        bad.append(f"check failed: {type(e).__name__}: {e}")
    finally:
        _close_connections(session)
    for p, want in expect.sentinels.items():
        f = root / p
        if not f.is_file() or f.read_bytes() != want:
            bad.append(f"{p} (outside the protocol's files) changed")
    if acknowledged and expect.final_committed is not None and committed != expect.final_committed:
        bad.append(
            f"the protocol returned, but its outcome is not durable: committed steps {sorted(committed)}, "
            f"expected {sorted(expect.final_committed)} (with the crash-free run's files)"
        )
    if expect.base_committed is not None:
        gone = crash_protocols.MAY_REMOVE.get(protocol, frozenset())
        replaced = crash_protocols.MAY_REPLACE.get(protocol, frozenset())
        for step, before in expect.base_committed.items():
            if step in gone or (step in replaced and expect.final_committed is None):
                continue  # (the crash-free final state itself is what a replaced step may become)
            ok = [before] + ([expect.final_committed.get(step)] if step in replaced and expect.final_committed else [])
            if committed.get(step) not in ok:
                bad.append(f"step {step}, committed before the protocol, is lost or changed")
    return bad, committed


# -- driver -------------------------------------------------------------------------------------


@dataclass
class Result:
    protocol: str
    model: str
    ops: int
    syscalls: int
    generated: int = 0
    states: int = 0
    violations: list[str] = field(default_factory=list)
    outside: list[str] = field(default_factory=list)
    seconds: float = 0.0


def run_protocol(
    protocol: str,
    workdir: Path,
    models: Sequence[str] = ("ext4", "strict"),
    *,
    max_states: int | None = None,
    widest_only: bool = False,
    keep_failing: int = 3,
    log: Any = print,
) -> list[Result]:
    """Record ``protocol``, then check every crash state of each model. States shared by two models
    are checked once."""
    start = time.monotonic()
    root = workdir / protocol / "root"
    rec = record(protocol, root)
    expect = Expect(sentinels=sentinels(protocol, rec.base))
    seen: dict[str, list[str]] = {}
    results = []
    # the crash-free states first: the base's committed steps and the protocol's outcome
    for st in (CrashState(0, frozenset()), CrashState(len(rec.ops), frozenset(range(len(rec.ops))))):
        tree = build(rec.base, rec.ops, st)
        tree.materialize(root)
        bad, committed = check_state(protocol, root, expect)
        if bad:
            raise TraceError(f"{protocol}: the crash-free state after {st.prefix} ops fails: {bad}")
        if st.prefix == 0:
            expect.base_committed = committed
        else:
            expect.final_committed = committed
    for model in models:
        res = Result(protocol, model, len(rec.ops), sum(rec.syscalls.values()), outside=rec.outside)
        mstart = time.monotonic()
        for st in crash_states(rec.ops, model, widest_only=widest_only):
            res.generated += 1
            tree = build(rec.base, rec.ops, st)
            key = tree.digest()
            if key not in seen:
                if max_states is not None and len(seen) >= max_states:
                    continue
                tree.materialize(root)
                seen[key], _ = check_state(protocol, root, expect, acknowledged=st.prefix >= rec.ack)
                if seen[key] and keep_failing > 0:
                    keep_failing -= 1
                    kept = workdir / protocol / f"failing-{model}-{st.prefix}"
                    wipe(kept)
                    tree.materialize(kept)
                    log(f"  kept a failing state in {kept}")
                res.states += 1
                for v in seen[key]:
                    near = ", ".join(o.describe() for o in rec.ops[max(0, st.prefix - 3) : st.prefix])
                    msg = f"{model} crash after op {st.prefix} ({st.why}; last ops: {near}): {v}"
                    res.violations.append(msg)
                    log(f"  VIOLATION {protocol} {msg}")
        res.seconds = time.monotonic() - mstart
        results.append(res)
        log(
            f"{protocol} [{model}]: {res.ops} ops ({res.syscalls} syscalls traced), {res.generated} states "
            f"generated, {res.states} distinct new states checked, {len(res.violations)} violations, "
            f"{res.seconds:.0f}s"
        )
    wipe(root)
    log(f"{protocol}: {time.monotonic() - start:.0f}s in all; outside ROOT: {rec.outside or 'nothing'}")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--protocol", action="append", choices=crash_protocols.PROTOCOLS)
    ap.add_argument("--model", action="append", choices=("ext4", "strict"))
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/ckptdb-crashcheck"))
    ap.add_argument("--max-states", type=int, default=None, help="check at most this many distinct states")
    ap.add_argument("--widest-only", action="store_true", help="only crash points just before an fsync (fast)")
    args = ap.parse_args(argv)
    logging.getLogger("ckptdb").setLevel(logging.ERROR)
    total: list[Result] = []
    for p in args.protocol or crash_protocols.PROTOCOLS:
        total += run_protocol(
            p,
            args.workdir,
            args.model or ("ext4", "strict"),
            max_states=args.max_states,
            widest_only=args.widest_only,
        )
    print(
        "\n| protocol | model | operations recorded | crash states generated | distinct states checked "
        "| violations | time |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in total:
        print(
            f"| {r.protocol} | {r.model} | {r.ops} | {r.generated} | {r.states} | "
            f"{len(r.violations)} | {r.seconds:.0f} s |"
        )
    outside = sorted({o for r in total for o in r.outside})
    if outside:
        print(f"mutations outside ROOT: {outside}")
    return 1 if any(r.violations for r in total) or outside else 0


__all__ = ["CrashState", "Op", "Recording", "Tree", "check_state", "crash_states", "main", "record", "run_protocol"]

if __name__ == "__main__":
    sys.exit(main())
