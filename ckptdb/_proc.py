"""Process identity: host, kernel boot, pid namespace, pid and start time.

A pid means something only inside the pid namespace it was read in, on the boot it was read on:
two containers on one node with host networking share a hostname but not pids, and a host sees a
container's processes under other pids. A writer's liveness is therefore checked by pid only when
its host, boot id and pid namespace are all ours (:func:`same_pid_space`); otherwise it is unknowable
from here and callers fall back to the writer's heartbeat.
"""

from __future__ import annotations

import functools
import os
import socket


def hostname() -> str:
    return socket.gethostname()


@functools.cache
def boot_id() -> str | None:
    """This kernel boot's id (``/proc/sys/kernel/random/boot_id``), or None when unreadable."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()[:64] or None
    except OSError:
        return None


def pid_namespace() -> int | None:
    """The inode of this process's pid namespace, or None when pids cannot be checked from here.

    None also when the ``/proc`` mounted here belongs to another pid namespace (``/proc/self`` is not
    our pid, as after ``unshare --pid --fork`` without ``--mount-proc``): ``/proc/<pid>`` would then
    describe other processes than ``kill(pid, 0)``, so no pid read here may be trusted.
    """
    try:
        if os.readlink("/proc/self") != str(os.getpid()):
            return None
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def same_pid_space(host: str, boot: str | None, pid_ns: int | None) -> bool:
    """Do pids recorded with this identity name processes we can see (same host, boot, namespace)?

    An unknown part (NULL on a row written before revision 0004, or unreadable here) is never equal.
    """
    if host != hostname() or boot is None or pid_ns is None:
        return False
    return boot == boot_id() and pid_ns == pid_namespace()


def process_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (Linux), or None when unknown/gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode("ascii", "replace")
    except OSError:
        return None
    # the command name (field 2) may contain spaces and parentheses: split after the last ')'
    rest = data.rsplit(")", 1)[-1].split()
    try:
        return int(rest[19])  # field 22 overall
    except (IndexError, ValueError):
        return None


def is_alive(pid: int, start_time: int | None) -> bool:
    """Is ``pid`` still the process that started at ``start_time``? Only for pids of our pid space
    (:func:`same_pid_space`)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if start_time is not None:
        now = process_start_time(pid)
        if now is not None and now != start_time:
            return False  # the pid was recycled
    # a zombie still answers kill(0): treat it as dead
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().decode("ascii", "replace").rsplit(")", 1)[-1].split()[0]
        if state in ("Z", "X"):
            return False
    except OSError:
        return False
    return True
