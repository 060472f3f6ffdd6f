"""Loads into tensors the caller already has (``load_checkpoint(..., into=state)``).

``into`` is a state shaped like the checkpoint's (``{"model": model.state_dict(), ...}``). Each
tensor of the checkpoint at a key path that ``into`` also has gets its bytes written into ``into``'s
tensor at that path, in place, and the loaded state returns that tensor there: no new memory for
it. Tensors only the checkpoint has are returned as new tensors; tensors only ``into`` has are left
untouched. A tensor pair whose dtype or shape differ is refused (``InvalidArgumentError`` naming
the key path) before any byte is written.

Two ways in, the same result:

- **Direct** (:func:`plan` + :func:`read_into`, a local file of ``DIRECT_MIN`` bytes or more whose
  digest is checked): the file is mapped by ``torch.load(weights_only=True, mmap=True)`` only to
  learn where each storage lies in the file (the zip directory and the pickle are read, no tensor
  data). Then the file is read once, in pieces of 8 MiB by several threads (``O_DIRECT`` into
  reused page-aligned buffers where the filesystem takes it), each piece's bytes copied to their
  destinations (a target tensor's memory, or a new storage for tensors without one), and every
  piece hashed in file order from the buffer it was read into. No page cache, no page faults in
  the targets (the caller's memory is already there), one pass over the disk: what the read limit
  does, plus a copy and the hash. Storages that several tensors share, and targets that are not
  plain contiguous CPU tensors, are read into new memory and copied into their targets once the
  digest matched.
- **Copy** (every other case: small files, files of many tensors, an object store, ``verify="size"``):
  the file is loaded as without ``into``, then each pair is copied (``target.copy_``).

On an error (a digest mismatch, an I/O error) the targets may hold part of the file: like DCP's
in-place load, not like ``load_checkpoint`` without ``into``, which changes nothing of the caller's.
A failed load raises; the caller's tensors are then to be loaded again (``load_last_checkpoint``'s
fallback to an older checkpoint does that) or thrown away. Raw writes do not bump a target's
autograd version counter: do not load into tensors saved by a graph that is still to be
back-propagated.
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import fcntl
import mmap
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ckptdb.errors import CheckpointCorruptError, InvalidArgumentError
from ckptdb.storage.hashing import new_hasher

_PIECE = 8 << 20  # bytes per read (and per hash update)
_READERS = 3  # pieces read at once
_SPARE = 2  # buffers beyond the readers': a reader seldom waits for the hasher
_ALIGN = 4096  # O_DIRECT: offsets, lengths and buffer addresses
DIRECT_MIN = 16 << 20  # smaller files are loaded, then copied into the targets
_O_DIRECT = getattr(os, "O_DIRECT", 0)


# -- pairing a loaded state with the caller's --------------------------------------------------


@dataclass(frozen=True, slots=True)
class Pair:
    loaded: torch.Tensor
    target: torch.Tensor


def _where(path: Any) -> str:
    """``(((None, 'model'), 'w'))`` -> ``"['model']['w']"`` (paths are built as nested pairs, and
    formatted only for an error message)."""
    keys = []
    while path is not None:
        path, key = path
        keys.append(f"[{key!r}]")
    return "".join(reversed(keys))


def pair_tensors(loaded: Any, into: Any) -> list[Pair]:
    """The (checkpoint tensor, target tensor) pairs at the key paths both states have.

    Raises:
        InvalidArgumentError: a pair differs in dtype or shape, a target is on the meta device, or a
            target is a tensor subclass other than ``Parameter`` (a DTensor: sharded loads do that).
    """
    pairs: list[Pair] = []
    seen: set[int] = set()
    plain = (torch.Tensor, torch.nn.Parameter)

    def check(a: torch.Tensor, b: torch.Tensor, path: Any) -> None:
        if a.dtype != b.dtype or a.shape != b.shape:
            w = _where(path)
            raise InvalidArgumentError(
                f"load into{w}: the checkpoint holds a {a.dtype} tensor of shape {tuple(a.shape)}, "
                f"into{w} is a {b.dtype} tensor of shape {tuple(b.shape)}"
            )
        if b.device.type == "meta":
            raise InvalidArgumentError(f"load into{_where(path)}: the target is on the meta device (it has no memory)")
        if type(b) not in plain:
            raise InvalidArgumentError(
                f"load into{_where(path)}: the target is a {type(b).__name__}, not a plain tensor (a "
                "sharded state, such as DTensors, loads with sharded_state= or load_sharded_state())"
            )

    def walk(a: Any, b: Any, path: Any) -> None:
        if isinstance(a, torch.Tensor):
            if isinstance(b, torch.Tensor):
                check(a, b, path)
                pairs.append(Pair(a, b))
            return
        if id(a) in seen:
            return
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            seen.add(id(a))
            for k, v in a.items():
                if k in b:
                    walk(v, b[k], (path, k))
        elif isinstance(a, list | tuple) and isinstance(b, list | tuple) and len(a) == len(b):
            seen.add(id(a))
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                walk(x, y, (path, i))

    walk(loaded, into, None)
    return pairs


def copy_pairs(pairs: list[Pair]) -> None:
    """Copy each loaded tensor into its target (one ``torch._foreach_copy_``: 50 000 small tensors are
    50 000 copies, a Python loop of them costs more than the bytes)."""
    if not pairs:
        return
    with torch.no_grad():
        torch._foreach_copy_([p.target for p in pairs], [p.loaded for p in pairs])


def substitute(obj: Any, repl: dict[int, torch.Tensor]) -> Any:
    """``obj`` with every tensor whose ``id`` is in ``repl`` replaced by its value there. Dicts and
    lists are changed in place (a state dict keeps its ``_metadata``); tuples are rebuilt."""
    seen: set[int] = set()

    def walk(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return repl.get(id(v), v)
        if isinstance(v, dict):
            if id(v) not in seen:
                seen.add(id(v))
                for k, x in v.items():
                    y = walk(x)
                    if y is not x:
                        v[k] = y
            return v
        if isinstance(v, list):
            if id(v) not in seen:
                seen.add(id(v))
                for i, x in enumerate(v):
                    y = walk(x)
                    if y is not x:
                        v[i] = y
            return v
        if isinstance(v, tuple):
            items = [walk(x) for x in v]
            if all(y is x for x, y in zip(v, items, strict=True)):
                return v
            return type(v)(*items) if hasattr(v, "_fields") else type(v)(items)
        return v

    return walk(obj)


def copy_all_into(objs: list[Any], into: Any) -> list[Any]:
    """The copy way: each of ``objs`` (loaded and checked: one checkpoint's files) copied into
    ``into``'s tensors at the same key paths, and returned with those tensors in place of its own.
    Every pair of every object is checked before the first copy."""
    pairs = [pair_tensors(o, into) for o in objs]
    out = []
    for o, ps in zip(objs, pairs, strict=True):
        copy_pairs(ps)
        out.append(substitute(o, {id(p.loaded): p.target for p in ps}))
    return out


def _tensors(obj: Any) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    seen: set[int] = set()
    stack = [obj]
    while stack:
        v = stack.pop()
        if isinstance(v, torch.Tensor):
            if id(v) not in seen:
                seen.add(id(v))
                out.append(v)
        elif isinstance(v, dict):
            if id(v) not in seen:
                seen.add(id(v))
                stack.extend(v.values())
        elif isinstance(v, list | tuple):
            if id(v) not in seen:
                seen.add(id(v))
                stack.extend(v)
    return out


# -- the direct way ----------------------------------------------------------------------------


@dataclass
class Plan:
    """Where each byte of a mapped file goes (:func:`plan`), and what to do once it is checked."""

    ranges: list[tuple[int, int, int]]  # (file offset, bytes, destination address), by offset
    repl: dict[int, torch.Tensor]  # id(mapped tensor) -> its replacement in the result
    after: list[Pair]  # copied once the digest matched (shared storages, unusual targets)
    keep: list[Any]  # new storages and targets: alive until the read is done


def _direct_target(t: torch.Tensor, target: torch.Tensor, nbytes: int) -> bool:
    """Whether ``t``'s storage (``nbytes``, only ``t`` in it) can be read straight into ``target``."""
    return (
        target.device.type == "cpu"
        and target.layout is torch.strided
        and target.is_contiguous()
        and not target.is_conj()
        and not target.is_neg()
        and not target.is_quantized
        and t.storage_offset() == 0
        and t.is_contiguous()
        and t.numel() * t.element_size() == nbytes
    )


def plan(obj: Any, into: Any, base: int, size: int) -> Plan | None:
    """The direct load of ``obj`` (mapped at ``base``, ``size`` bytes) into ``into``; None when it
    does not apply (a tensor that is not a plain CPU tensor or Parameter, a storage outside the
    mapping): the caller takes the copy way. Raises what :func:`pair_tensors` raises."""
    found = pair_tensors(obj, into)
    targets_of: dict[int, list[torch.Tensor]] = {}  # one saved tensor may sit at several paths
    for p in found:
        known = targets_of.setdefault(id(p.loaded), [])
        if all(p.target is not x for x in known):
            known.append(p.target)
    by_storage: dict[int, tuple[torch.UntypedStorage, list[torch.Tensor]]] = {}
    for t in _tensors(obj):
        if type(t) not in (torch.Tensor, torch.nn.Parameter) or t.__dict__ or t.layout is not torch.strided:
            return None
        if t.device.type != "cpu":
            return None
        st = t.untyped_storage()
        if st.nbytes() == 0:
            continue
        by_storage.setdefault(int(st.data_ptr()), (st, []))[1].append(t)
    ranges: list[tuple[int, int, int]] = []
    repl: dict[int, torch.Tensor] = {}
    after: list[Pair] = []
    keep: list[Any] = []
    for addr, (st, ts) in by_storage.items():
        off, nbytes = addr - base, st.nbytes()
        if off < 0 or off + nbytes > size:
            return None
        direct = targets_of.get(id(ts[0]), []) if len(ts) == 1 else []
        if len(direct) == 1 and _direct_target(ts[0], direct[0], nbytes):
            ranges.append((off, nbytes, int(direct[0].data_ptr())))
            repl[id(ts[0])] = direct[0]
            keep.append(direct[0])
            continue
        new = torch.empty(nbytes, dtype=torch.uint8).untyped_storage()
        ranges.append((off, nbytes, int(new.data_ptr())))
        keep.append(new)
        for t in ts:
            nt = torch.empty(0, dtype=t.dtype).set_(new, t.storage_offset(), t.size(), t.stride())
            if type(t) is torch.nn.Parameter:
                nt = torch.nn.Parameter(nt, requires_grad=t.requires_grad)
            elif t.requires_grad:
                nt.requires_grad_(True)
            targets = targets_of.get(id(t), [])
            after.extend(Pair(nt, x) for x in targets)
            repl[id(t)] = targets[0] if targets else nt
    ranges.sort()
    return Plan(ranges, repl, after, keep)


class _Buffers:
    """Page-aligned read buffers of ``_PIECE`` bytes, kept for the process's next loads."""

    def __init__(self) -> None:
        self._free: list[tuple[mmap.mmap, int]] = []
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> tuple[mmap.mmap, int]:
        """A buffer of ``nbytes`` bytes (kept buffers of another size are dropped)."""
        with self._lock:
            while self._free:
                buf = self._free.pop()
                if len(buf[0]) == nbytes:
                    return buf
        m = mmap.mmap(-1, nbytes)
        return m, ctypes.addressof(ctypes.c_char.from_buffer(m))

    def give(self, buf: tuple[mmap.mmap, int]) -> None:
        with self._lock:
            self._free.append(buf)


_buffers = _Buffers()


def _direct_enabled() -> bool:
    return _O_DIRECT != 0 and os.environ.get("CKPTDB_NO_DIRECT") != "1"


def _open(path: Path) -> tuple[int, bool]:
    """``path`` opened for reading, with O_DIRECT where the filesystem takes it."""
    if _direct_enabled():
        try:
            return os.open(path, os.O_RDONLY | _O_DIRECT), True
        except OSError as e:
            if e.errno != errno.EINVAL:  # EINVAL: this filesystem has no O_DIRECT
                raise
    return os.open(path, os.O_RDONLY), False


def read_into(path: Path, size: int, algorithm: str, ranges: list[tuple[int, int, int]], step_nr: int) -> str:
    """Read the ``size`` bytes of ``path`` once, copy each ``(offset, nbytes, address)`` range of it
    to its address, and return the digest of the whole file (taken in order, piece by piece).

    Raises:
        CheckpointCorruptError: the file ended early (it is shorter than ``size``).
        OSError: a read failed.
    """
    starts = [r[0] for r in ranges]
    fd, direct = _open(path)
    mode_lock = threading.Lock()
    piece = _PIECE
    pieces = -(-size // piece)
    claim = iter(range(pieces))
    claim_lock = threading.Lock()
    cond = threading.Condition()
    done: dict[int, tuple[tuple[mmap.mmap, int], int]] = {}
    errors: list[BaseException] = []
    slots = threading.Semaphore(_READERS + _SPARE)  # buffers read and not yet hashed, at most

    def pread(buf: mmap.mmap, off: int, want: int) -> int:
        nonlocal direct
        got = 0
        while got < want:
            ask = -(-(want - got) // _ALIGN) * _ALIGN if direct else want - got
            try:
                n = os.preadv(fd, [memoryview(buf)[got : got + ask]], off + got)
            except OSError as e:
                if e.errno != errno.EINVAL or not direct:
                    raise
                with mode_lock:  # O_DIRECT refused on read: go through the page cache
                    if direct:
                        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_O_DIRECT)
                        direct = False
                continue
            if n == 0:
                raise CheckpointCorruptError(step_nr, str(path), f"{size} bytes", f"{off + got} bytes (it ended early)")
            got += n
            if direct and got % _ALIGN and got < want:
                with mode_lock:  # a short read in the middle: the rest cannot be aligned
                    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_O_DIRECT)
                    direct = False
        return min(got, want)

    def scatter(addr: int, off: int, n: int) -> None:
        j = max(bisect.bisect_right(starts, off) - 1, 0)
        end = off + n
        while j < len(ranges):
            s, length, dst = ranges[j]
            if s >= end:
                break
            a, b = max(s, off), min(s + length, end)
            if a < b:
                ctypes.memmove(dst + (a - s), addr + (a - off), b - a)
            j += 1

    def reader() -> None:
        while True:
            while not slots.acquire(timeout=0.05):  # before claiming a piece: a claimed piece gets a buffer
                if errors:
                    return
            with claim_lock:
                i = next(claim, None)
            if i is None or errors:
                slots.release()
                return
            buf = _buffers.take(piece)
            try:
                off = i * piece
                n = pread(buf[0], off, min(piece, size - off))
                scatter(buf[1], off, n)
            except BaseException as e:  # noqa: BLE001 - raised by the caller's thread
                _buffers.give(buf)
                slots.release()
                with cond:
                    errors.append(e)
                    cond.notify_all()
                return
            with cond:
                done[i] = (buf, n)
                cond.notify_all()

    threads = [threading.Thread(target=reader, name=f"ckptdb-read-{k}", daemon=True) for k in range(_READERS)]
    h = new_hasher(algorithm)
    try:
        for t in threads:
            t.start()
        for i in range(pieces):
            with cond:
                while i not in done and not errors:
                    cond.wait()
                if errors:
                    break
                buf, n = done.pop(i)
            try:
                h.update(memoryview(buf[0])[:n])
            finally:
                _buffers.give(buf)
                slots.release()
    except BaseException as e:
        with cond:
            errors.append(e)  # the readers stop at their next piece
        raise
    finally:
        for t in threads:
            t.join()
        for buf, _ in done.values():
            _buffers.give(buf)
            slots.release()
        os.close(fd)
    if errors:
        raise errors[0]
    return h.hexdigest()


__all__ = [
    "Pair",
    "Plan",
    "copy_all_into",
    "copy_pairs",
    "pair_tensors",
    "plan",
    "read_into",
    "substitute",
]
