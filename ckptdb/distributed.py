"""The gang seam: what the manager needs from a process group, and the single-process default.

Only the coordinator (rank 0) talks to the catalog; other ranks learn its decisions through
``broadcast_object`` (:func:`run_on_coordinator`). Work every rank does is wrapped in
:func:`run_on_all`: outcomes are all-gathered and any rank's failure is re-raised, as the same
exception, on every rank, so no rank waits forever at a barrier. A collective that fails because a
peer died (or timed out) becomes :class:`RankLostError` on the survivors. The protocol is written
down in docs/distributed.md.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import Any, Protocol, TypeVar, runtime_checkable

from ckptdb.errors import CheckpointError, RankLostError, RemoteRankError

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
    """``None`` -> one process; a ``ProcessGroup`` -> :class:`TorchGang`; a gang -> itself.

    A fairseq2 ``Gang`` (it has ``as_process_group()``, not ckptdb's collectives) is accepted too:
    one of size 1 (fairseq2's ``FakeGang``) is one process, any other is its process group.
    """
    if gang is None:
        return LocalGang()
    if isinstance(gang, Gang):
        return gang
    if callable(getattr(gang, "as_process_group", None)):
        if getattr(gang, "size", None) == 1:
            return LocalGang()
        return TorchGang(gang.as_process_group())
    return TorchGang(gang)


def _portable(err: BaseException, rank: int, what: str) -> BaseException:
    """``err`` if it survives a pickle round trip (to be re-raised as is elsewhere), else a stand-in."""
    try:
        copy = pickle.loads(pickle.dumps(err))
        if type(copy) is type(err) and str(copy) == str(err):
            return err
    except Exception:  # noqa: BLE001 - any pickling failure means: send a stand-in
        pass
    return RemoteRankError(f"{what} failed on rank {rank}: {type(err).__name__}: {err}")


def collective(gang: Gang, op: Callable[[], T], what: str) -> T:
    """Run a gang collective, turning a transport failure (peer died, timeout) into :class:`RankLostError`."""
    try:
        return op()
    except CheckpointError:
        raise
    except Exception as e:
        raise RankLostError(f"{what}: a collective with the other ranks failed (a rank died or timed out): {e}") from e


def run_on_all(gang: Gang, fn: Callable[[], T], what: str) -> T:
    """Run ``fn`` on every rank; if any rank fails, every rank raises the same error.

    The error of the lowest failing rank is sent to all ranks and raised there, with its type and
    message (a stand-in :class:`RemoteRankError` when it does not pickle); the failing rank raises
    its own exception object. A rank that dies makes the others raise :class:`RankLostError`.
    """
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
    mine = None if err is None else _portable(err, gang.rank, what)
    try:
        outcomes = collective(gang, lambda: gang.all_gather_object(mine), what)
    except RankLostError as lost:
        if err is not None:
            raise err from lost
        raise
    failed = [(r, e) for r, e in enumerate(outcomes) if e is not None]
    if not failed:
        return result  # type: ignore[return-value]
    r, first = failed[0]
    if r == gang.rank and err is not None:
        if mine is err:
            raise err  # this rank's own exception object, with its traceback
        raise first from err  # the stand-in the other ranks raise, so that all raise the same
    raise first


def agree(gang: Gang, value: Any, what: str) -> None:
    """Every rank must pass an equal ``value``; otherwise every rank raises InvalidArgumentError.

    Used before collectives whose shape depends on local data (e.g. which keys go through DCP),
    which would otherwise hang on the ranks that disagree.
    """
    if gang.size == 1:
        return
    values = collective(gang, lambda: gang.all_gather_object(value), what)
    if any(v != values[0] for v in values):
        from ckptdb.errors import InvalidArgumentError

        detail = ", ".join(f"rank {r}: {v!r}" for r, v in enumerate(values))
        raise InvalidArgumentError(f"{what}: ranks disagree ({detail})")


def run_on_coordinator(gang: Gang, fn: Callable[[], T], what: str) -> T:
    """Run ``fn`` on rank 0 only and give every rank its result, or its error (same type everywhere)."""
    if gang.size == 1:
        return fn()
    outcome: tuple[bool, Any] = (True, None)
    if gang.rank == 0:
        try:
            outcome = (True, fn())
        except Exception as e:
            outcome = (False, _portable(e, 0, what))
            try:
                collective(gang, lambda: gang.broadcast_object(outcome), what)
            except RankLostError as lost:
                raise e from lost
            raise e
    ok, value = collective(gang, lambda: gang.broadcast_object(outcome), what)
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]


def process_group_of(gang: Gang) -> Any:
    """The ``torch.distributed`` ProcessGroup behind ``gang``; None for a one-process gang.

    Raises:
        InvalidArgumentError: a multi-process gang that is not backed by torch.distributed (DCP,
            used for sharded state, needs a real process group).
    """
    if isinstance(gang, TorchGang):
        return gang.group
    if gang.size == 1:
        return None
    from ckptdb.errors import InvalidArgumentError

    raise InvalidArgumentError(
        f"sharded state needs a torch.distributed process group as gang=, not {type(gang).__name__}"
    )
