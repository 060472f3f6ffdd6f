"""Is a path on a network filesystem? (A SQLite catalog in WAL mode must not be.)

SQLite's WAL mode keeps its index in a shared-memory file (``-shm``) mapped by every process that
opens the database; over NFS, SMB/CIFS, Lustre, GPFS, CephFS, 9p, sshfs, ... that mapping is not
coherent between machines and POSIX locks are unreliable, so two writers on two nodes can corrupt
the catalog (https://www.sqlite.org/wal.html, "WAL does not work over a network filesystem").
ckptdb refuses such a catalog and points to PostgreSQL; ``CKPTDB_ALLOW_NETWORK_SQLITE=1``
overrides (for a filesystem that only one machine ever mounts, at the user's own risk).

The filesystem type comes from ``/proc/self/mountinfo`` (the mount holding the path, with FUSE
subtypes such as ``fuse.sshfs``) and from ``statfs(2)``'s ``f_type`` magic number.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from pathlib import Path

ALLOW_ENV = "CKPTDB_ALLOW_NETWORK_SQLITE"

# mountinfo filesystem type names (FUSE ones as "fuse.<subtype>").
NETWORK_FSTYPES = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "ncpfs",
        "afs",
        "lustre",
        "gpfs",
        "ceph",
        "9p",
        "glusterfs",
        "beegfs",
        "ocfs2",
        "gfs2",
        "orangefs",
        "pvfs2",
        "fuse.sshfs",
        "fuse.s3fs",
        "fuse.gcsfuse",
        "fuse.rclone",
        "fuse.glusterfs",
        "fuse.ceph-fuse",
        "fuse.ceph",
        "fuse.juicefs",
        "fuse.goofys",
        "fuse.blobfuse",
        "fuse.blobfuse2",
        "fuse.davfs",
        "fuse.cephfs",
    }
)

# statfs(2) f_type magic numbers (linux/magic.h and the filesystems' own headers).
NETWORK_MAGIC = {
    0x6969: "nfs",
    0x517B: "smbfs",
    0xFF534D42: "cifs",
    0xFE534D42: "smb2",
    0x0BD00BD0: "lustre",
    0x47504653: "gpfs",
    0x00C36400: "ceph",
    0x01021997: "9p",
    0x5346414F: "afs",
    0x6B414653: "afs",
    0x01161970: "gfs2",
    0x7461636F: "ocfs2",
    0x20030528: "orangefs",
}


def verdict(fstype: str | None, magic: int | None) -> str | None:
    """The network filesystem's name if ``fstype`` (mountinfo) or ``magic`` (statfs) names one."""
    if fstype is not None:
        name = fstype.lower()
        if name in NETWORK_FSTYPES or name.split(".", 1)[0] in NETWORK_FSTYPES:
            return name
    if magic is not None and magic in NETWORK_MAGIC:
        return NETWORK_MAGIC[magic]
    return None


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as ``\\ooo``."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_fstype(path: Path, mountinfo: str | None = None) -> str | None:
    """The filesystem type of the mount that holds ``path`` (an absolute, resolved path)."""
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except OSError:
            return None
    best: tuple[int, str] | None = None
    target = str(path)
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or not tail:
            continue
        point = _unescape(fields[4])
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= best[0]):  # a later mount on one point hides earlier ones
            best = (len(point), tail[0])
    return best[1] if best else None


class _StatFs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 112)]


def statfs_magic(path: Path) -> tuple[int | None, int]:
    """``statfs(2)``'s ``f_type`` for ``path`` and the errno (Linux; ``(None, 0)`` where unavailable)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        buf = _StatFs()
        if libc.statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
            return None, ctypes.get_errno()
        return int(buf.f_type) & 0xFFFFFFFF, 0
    except (OSError, AttributeError):
        return None, 0


def network_filesystem(path: Path) -> str | None:
    """The name of the network filesystem ``path`` is (or would be created) on, or None.

    Makes no assumption that the filesystem answers: a hung or disconnected mount is still named
    by mountinfo, which is read without touching it.
    """
    p = Path(os.path.realpath(path))
    magic, q = None, p
    while True:  # the nearest existing ancestor (the file itself may not exist yet)
        magic, err = statfs_magic(q)
        if magic is not None or err not in (errno.ENOENT, errno.ENOTDIR) or q == q.parent:
            break
        q = q.parent
    return verdict(mount_fstype(p), magic)


def allowed_by_env() -> bool:
    return os.environ.get(ALLOW_ENV, "").strip().lower() in ("1", "true", "yes", "on")
