"""The gang seam: what the manager needs from a process group, and the single-process default.

Only the coordinator (rank 0) talks to the catalog; other ranks learn its decisions through
``broadcast_object``. Failures on any rank are gathered and re-raised on every rank
(``run_on_all``) so no rank waits forever at a barrier.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar, runtime_checkable

from ckptdb.errors import CheckpointError

T = TypeVar("T")


@runtime_checkable
class Gang(Protocol):
    @property
    def rank(self) -> int: ...
    @property
    def size(self) -> int: ...
    def barrier(self) -> None: ...
    def broadcast_object(self, obj: Any, src: int = 0) -> Any: ...
    def all_gather_object(self, obj: Any) -> list[Any]: ...


class LocalGang:
    """One process: rank 0 of 1; every collective is the identity."""

    rank = 0
    size = 1

    def barrier(self) -> None:
        return None

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        return obj

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]


class TorchGang:
    """A ``torch.distributed`` process group (gloo or nccl) seen as a gang."""

    def __init__(self, group: Any = None) -> None:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise CheckpointError("gang=: torch.distributed is not initialised (call init_process_group first)")
        self._dist = dist
        self.group = group if group is not None else dist.group.WORLD
        self._rank = dist.get_rank(self.group)
        self._size = dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def size(self) -> int:
        return self._size

    def barrier(self) -> None:
        self._dist.barrier(group=self.group)

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        box = [obj if self._rank == src else None]
        self._dist.broadcast_object_list(box, src=self._dist.get_global_rank(self.group, src), group=self.group)  # type: ignore[arg-type]
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self._size
        self._dist.all_gather_object(out, obj, group=self.group)
        return out


def as_gang(gang: Any) -> Gang:
    """``None`` -> one process; a ``ProcessGroup`` -> :class:`TorchGang`; a gang -> itself."""
    if gang is None:
        return LocalGang()
    if isinstance(gang, Gang):
        return gang
    return TorchGang(gang)


class RemoteRankError(CheckpointError):
    """Another rank failed during a collective checkpoint step; carries that rank's message."""


def run_on_all(gang: Gang, fn: Callable[[], T], what: str) -> T:
    """Run ``fn`` on every rank; if any rank fails, every rank raises (the failing rank its own error)."""
    result: T | None = None
    err: BaseException | None = None
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 - gathered and re-raised below
        err = e
    if gang.size == 1:
        if err is not None:
            raise err
        return result  # type: ignore[return-value]
    outcomes = gang.all_gather_object(None if err is None else f"{type(err).__name__}: {err}")
    if err is not None:
        raise err
    failed = [(r, m) for r, m in enumerate(outcomes) if m is not None]
    if failed:
        r, m = failed[0]
        raise RemoteRankError(f"{what} failed on rank {r}: {m}")
    return result  # type: ignore[return-value]
