"""The yardstick: the fastest durable raw write, and the fastest cold raw read, of the same bytes.

    python benchmarks/limits.py --gib 1          # every variant once per repetition, a table

Imported by the other benchmarks (:class:`LimitFinder`). No format, no hash, no catalog: only the
tensor bytes, so every ckptdb and peer figure can be put against what the disk and the page cache
take at best on this machine, in the same run.

Write variants (each ends durable: ``fsync`` of every file, then of the directory):

- ``streams`` 1, 2, 4, 8 parallel threads;
- ``files``: stream i writes its share of the bytes into its own file, with ``write()``;
  ``ranges``: one file of the full size (``fallocate`` first), stream i ``pwrite``s its range;
- ``buffered`` (the page cache) or ``O_DIRECT`` (each stream copies its bytes through one reused
  8 MiB page-aligned buffer; the last block is padded, then the file is truncated to its size).

Read variants: 1, 2, 4, 8 threads over equal ranges of the given files, ``buffered`` (``readinto``
a reused 8 MiB buffer per thread) or ``O_DIRECT`` (same, page-aligned buffer), cold: the files'
pages are evicted with ``posix_fadvise(POSIX_FADV_DONTNEED)`` after an ``fsync`` (and the whole
page cache dropped too when ``drop_caches`` is writable and ``--drop-caches`` asks for it).

Reads into new memory (1 and 4 threads, ``O_DIRECT``): the same reads, each chunk to its own
offset of a new anonymous mapping per file. Not the read limit: the floor of any load that returns
new tensors in new memory instead of filling the caller's (``torch.load``, safetensors), which
must get every page of that memory from the kernel (zero-filled at first use) as well.
"""

from __future__ import annotations

import argparse
import gc
import mmap
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GB = 1e9
ALIGN = 4096
BUF = 8 << 20
STREAMS = (1, 2, 4, 8)


@dataclass(frozen=True)
class Variant:
    streams: int
    layout: str  # "files" | "ranges"
    direct: bool
    fresh: bool = False  # reads only: into new memory (see raw_read), not reused buffers

    @property
    def name(self) -> str:
        io = "O_DIRECT" if self.direct else "buffered"
        into = ", into new memory" if self.fresh else ""
        return f"{self.streams} stream{'s' if self.streams > 1 else ''}, {self.layout}, {io}{into}"


def write_variants(streams: Sequence[int] = STREAMS) -> list[Variant]:
    return [Variant(n, lay, d) for d in (False, True) for lay in ("files", "ranges") for n in streams]


def read_variants(streams: Sequence[int] = STREAMS) -> list[Variant]:
    return [Variant(n, "ranges", d) for d in (False, True) for n in streams]


def fresh_read_variants(streams: Sequence[int] = (1, 4)) -> list[Variant]:
    """Reads into new memory (what a load that returns new tensors must at least do)."""
    return [Variant(n, "ranges", True, fresh=True) for n in streams]


def _run(fns: Sequence[Callable[[], None]]) -> None:
    errors: list[BaseException] = []

    def run(fn: Callable[[], None]) -> None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(fn,)) for fn in fns]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def as_views(buffers: Sequence[Any]) -> list[memoryview]:
    """Byte views of tensors (contiguous, CPU) or buffers, without copying."""
    out = []
    for b in buffers:
        if hasattr(b, "untyped_storage"):  # a torch tensor
            import torch

            b = b.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        v = memoryview(b)
        out.append(v.cast("B") if v.format != "B" or v.ndim != 1 else v)
    return [v for v in out if len(v)]


def _pieces(views: Sequence[memoryview], start: int, end: int) -> list[memoryview]:
    """The slices of the concatenation of ``views`` covering bytes [start, end)."""
    out, pos = [], 0
    for v in views:
        n = len(v)
        lo, hi = max(start, pos), min(end, pos + n)
        if lo < hi:
            out.append(v[lo - pos : hi - pos])
        pos += n
        if pos >= end:
            break
    return out


def _bounds(total: int, n: int) -> list[tuple[int, int]]:
    """n contiguous ranges of [0, total), every boundary 4 KiB aligned."""
    cuts = [0] + [(total * i // n) // ALIGN * ALIGN for i in range(1, n)] + [total]
    return [(cuts[i], cuts[i + 1]) for i in range(n) if cuts[i] < cuts[i + 1]]


def _aligned(n: int) -> mmap.mmap:
    return mmap.mmap(-1, n)  # anonymous mappings are page-aligned


def _write_all(fd: int, view: memoryview, offset: int | None) -> None:
    while view:
        k = os.write(fd, view) if offset is None else os.pwrite(fd, view, offset)
        view = view[k:]
        if offset is not None:
            offset += k


def _direct_stream(fd: int, pieces: Sequence[memoryview], offset: int, buf: mmap.mmap) -> int:
    """Copy ``pieces`` through ``buf`` into ``fd`` at ``offset`` (aligned) with O_DIRECT; returns bytes."""
    view = memoryview(buf)
    fill = 0
    written = 0
    for p in pieces:
        while p:
            k = min(len(p), BUF - fill)
            view[fill : fill + k] = p[:k]
            fill += k
            p = p[k:]
            if fill == BUF:
                _write_all(fd, view, offset + written)
                written += fill
                fill = 0
    if fill:
        padded = -(-fill // ALIGN) * ALIGN
        view[fill:padded] = bytes(padded - fill)
        _write_all(fd, view[:padded], offset + written)
        written += fill
    view.release()
    return written


def fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Buffers:
    """Reused page-aligned buffers, one per stream."""

    def __init__(self) -> None:
        self._bufs: list[mmap.mmap] = []

    def get(self, n: int) -> list[mmap.mmap]:
        while len(self._bufs) < n:
            self._bufs.append(_aligned(BUF))
        return self._bufs[:n]


def raw_write(views: Sequence[memoryview], d: Path, v: Variant, bufs: Buffers) -> list[Path]:
    """Write the concatenated ``views`` under ``d`` as variant ``v``, durably; returns the files."""
    total = sum(len(x) for x in views)
    ranges = _bounds(total, v.streams)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if v.direct else 0)
    aligned = bufs.get(len(ranges))
    if v.layout == "files":
        paths = [d / f"raw_{i}.bin" for i in range(len(ranges))]

        def one(i: int) -> None:
            lo, hi = ranges[i]
            fd = os.open(paths[i], flags, 0o644)
            try:
                if v.direct:
                    _direct_stream(fd, _pieces(views, lo, hi), 0, aligned[i])
                    os.ftruncate(fd, hi - lo)
                else:
                    for p in _pieces(views, lo, hi):
                        _write_all(fd, p, None)
                os.fsync(fd)
            finally:
                os.close(fd)

        _run([lambda i=i: one(i) for i in range(len(ranges))])  # type: ignore[misc]
        fsync_dir(d)
        return paths
    path = d / "raw_ranges.bin"
    fd = os.open(path, flags, 0o644)
    try:
        try:
            os.posix_fallocate(fd, 0, total)
        except OSError:
            os.ftruncate(fd, total)

        def rng(i: int) -> None:
            lo, hi = ranges[i]
            if v.direct:
                _direct_stream(fd, _pieces(views, lo, hi), lo, aligned[i])
            else:
                off = lo
                for p in _pieces(views, lo, hi):
                    _write_all(fd, p, off)
                    off += len(p)

        _run([lambda i=i: rng(i) for i in range(len(ranges))])  # type: ignore[misc]
        if v.direct:
            os.ftruncate(fd, total)
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(d)
    return [path]


def evict(paths: Sequence[Path], *, drop_caches: bool = False) -> None:
    """Make the next read of ``paths`` cold: fsync, then POSIX_FADV_DONTNEED (and drop_caches if asked)."""
    gc.collect()  # pages still mapped by a dead object's mmap cannot be evicted
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    if drop_caches and can_drop_caches():
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")


def can_drop_caches() -> bool:
    return os.access("/proc/sys/vm/drop_caches", os.W_OK)


def raw_read(paths: Sequence[Path], v: Variant, bufs: Buffers) -> int:
    """Read every byte of ``paths`` with ``v.streams`` threads, into reused buffers, or with
    ``v.fresh`` into new memory: one new anonymous mapping per file, each chunk read to its own
    offset there, the mappings dropped at the end (the kernel zero-fills each page at its first
    use, as it does for a load that returns new tensors).

    The files are cut into 8 MiB chunks (offsets aligned, as O_DIRECT wants); thread i reads the
    i-th contiguous share of the chunk list.
    """
    sizes = [p.stat().st_size for p in paths]
    flags = os.O_RDONLY | (os.O_DIRECT if v.direct else 0)
    fds = [os.open(p, flags) for p in paths]
    dest = [mmap.mmap(-1, -(-max(n, 1) // ALIGN) * ALIGN) for n in sizes] if v.fresh else []
    chunks = [(k, off, min(BUF, n - off)) for k, n in enumerate(sizes) for off in range(0, n, BUF)]
    shares = [chunks[len(chunks) * i // v.streams : len(chunks) * (i + 1) // v.streams] for i in range(v.streams)]
    shares = [s for s in shares if s]
    aligned = bufs.get(len(shares)) if not v.fresh else []
    done = [0] * len(shares)
    try:

        def one(i: int) -> None:
            views = [memoryview(m) for m in dest]
            reused = memoryview(aligned[i]) if aligned else None
            for k, off, n in shares[i]:
                view = views[k][off:] if reused is None else reused
                want = -(-n // ALIGN) * ALIGN if v.direct else n
                got = 0
                while got < n:
                    r = os.preadv(fds[k], [view[got:want]], off + got)
                    if r <= 0:
                        break
                    got += r
                done[i] += min(got, n)
                if view is not reused:
                    view.release()
            for w in views:
                w.release()
            if reused is not None:
                reused.release()

        _run([lambda i=i: one(i) for i in range(len(shares))])  # type: ignore[misc]
    finally:
        for fd in fds:
            os.close(fd)
        for m in dest:
            m.close()
    got, total = sum(done), sum(sizes)
    if got != total:
        raise RuntimeError(f"raw read got {got} of {total} bytes")
    return got


def cpu_seconds() -> float:
    """This process's user + system CPU seconds (all threads)."""
    t = os.times()
    return t.user + t.system


class LimitFinder:
    """Measures the write and read limits of one run: every variant first, then the fastest few.

    ``write(views, d)`` / ``read(paths)`` each time run one repetition: on the first call every
    variant, later only the ``keep`` fastest so far (a 4 GiB state x 16 variants is minutes). The
    limit is the smallest median among the variants measured in every repetition (:meth:`best_write`,
    :meth:`best_read`).
    """

    def __init__(self, streams: Sequence[int] = STREAMS, *, keep: int = 3, drop_caches: bool = False) -> None:
        self.wvariants = write_variants(streams)
        self.rvariants = read_variants(streams)
        self.fvariants = fresh_read_variants()
        self.keep = keep
        self.drop_caches = drop_caches
        self.wtimes: dict[Variant, list[float]] = {}
        self.rtimes: dict[Variant, list[float]] = {}
        self.ftimes: dict[Variant, list[float]] = {}
        self.wcpu: dict[Variant, list[float]] = {}
        self.bufs = Buffers()

    @staticmethod
    def _leaders(times: dict[Variant, list[float]], variants: list[Variant], keep: int) -> list[Variant]:
        if not times:
            return variants
        return sorted(times, key=lambda v: statistics.median(times[v]))[:keep]

    def write(self, views: Sequence[memoryview], d: Path, before: Callable[[], None] | None = None) -> None:
        for v in self._leaders(self.wtimes, self.wvariants, self.keep):
            if before is not None:
                before()
            gc.collect()
            c0, t0 = cpu_seconds(), time.perf_counter()
            paths = raw_write(views, d, v, self.bufs)
            dt = time.perf_counter() - t0
            self.wtimes.setdefault(v, []).append(dt)
            self.wcpu.setdefault(v, []).append(cpu_seconds() - c0)
            for p in paths:
                p.unlink()

    def read(self, paths: Sequence[Path]) -> None:
        self._reads(paths, self._leaders(self.rtimes, self.rvariants, self.keep), self.rtimes)

    def read_fresh(self, paths: Sequence[Path]) -> None:
        """One repetition of the reads into new memory (every such variant)."""
        self._reads(paths, self.fvariants, self.ftimes)

    def _reads(self, paths: Sequence[Path], variants: Sequence[Variant], times: dict[Variant, list[float]]) -> None:
        """Time each of ``variants`` reading ``paths``, cold every time."""
        for v in variants:
            evict(paths, drop_caches=self.drop_caches)
            gc.collect()
            t0 = time.perf_counter()
            raw_read(paths, v, self.bufs)
            times.setdefault(v, []).append(time.perf_counter() - t0)

    @staticmethod
    def _best(times: dict[Variant, list[float]]) -> tuple[Variant, float]:
        """The smallest median among the variants measured in every repetition (a variant that ran
        once, in the first, and dropped out is not judged on one sample)."""
        most = max(len(xs) for xs in times.values())
        v = min((v for v in times if len(times[v]) == most), key=lambda v: statistics.median(times[v]))
        return v, statistics.median(times[v])

    def best_write(self) -> tuple[Variant, float]:
        return self._best(self.wtimes)

    def best_read(self) -> tuple[Variant, float]:
        return self._best(self.rtimes)

    def best_fresh(self) -> tuple[Variant, float]:
        return self._best(self.ftimes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=Path(__file__).resolve().parents[1] / ".benchtmp" / "limits")
    ap.add_argument("--drop-caches", action="store_true", help="also drop the whole page cache before reads")
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    data = _aligned(int(args.gib * (1 << 30)))
    for off in range(0, len(data), 1 << 20):  # fault in, non-zero
        data[off : off + 8] = os.urandom(8)
    views = [memoryview(data)]
    lf = LimitFinder(keep=len(write_variants()), drop_caches=args.drop_caches)  # every variant every rep
    lf.rvariants = read_variants()
    total = len(data)
    (args.dir / "src").mkdir(exist_ok=True)
    src = raw_write(views, args.dir / "src", Variant(1, "files", False), lf.bufs)
    for rep in range(args.reps):
        print(f"rep {rep}", file=sys.stderr)
        lf.write(views, args.dir)
        lf.read(src)
    print(f"| variant ({args.gib:g} GiB) | write median s | GB/s | read median s | GB/s |")
    print("|---|---:|---:|---:|---:|")
    for v in lf.wvariants:
        w = statistics.median(lf.wtimes[v])
        r = statistics.median(lf.rtimes[v]) if v in lf.rtimes else None
        rr = f"{r:.3f} | {total / GB / r:.2f}" if r else " | "
        print(f"| {v.name} | {w:.3f} | {total / GB / w:.2f} | {rr} |")
    bw, tw = lf.best_write()
    br, tr = lf.best_read()
    print(f"write limit: {bw.name} {total / GB / tw:.2f} GB/s; read limit: {br.name} {total / GB / tr:.2f} GB/s")
    for p in src:
        p.unlink()


if __name__ == "__main__":
    main()
