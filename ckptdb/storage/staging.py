"""Staging: copy a state into host buffers that are reused from one save to the next.

An asynchronous save must not let training change what it writes. ``StagingArea.stage(obj)``
returns a copy of ``obj`` whose tensors live in staging buffers owned by the area: containers are
copied (training may mutate ``param_groups`` lists in place), immutable leaves are shared, and every
tensor is rebuilt as a view of a staged copy of its storage, so tied weights and views stay shared
exactly as ``torch.save`` would have written them.

Buffers are matched by the order in which storages are met and their byte sizes, per file: when the
next save has the same layout (the usual case) no memory is allocated and the copy runs at memcpy
speed into already faulted-in pages (CPU storages are copied after the walk, in the one
``torch._foreach_copy_`` below, viewed as 4-byte words: torch copies those faster than bytes). A
small CPU tensor that is the whole of its (not yet met) storage skips the buffer: the staged tensor
of the previous save at the same position, when it was staged from a tensor of the same type,
dtype, shape and ``requires_grad`` (recorded then, so only the new tensor is read), is kept and
refilled, all of them by one ``torch._foreach_copy_`` after the walk (otherwise a fresh ``clone``);
views met later share its storage as before. Every property read of a tensor costs 0.1-0.2 us, so
this way reads each one once: for 50 000 small tensors the walk is most of the stall. Buffers for storages on
an accelerator are pinned, and the device-to-host copies are issued non-blocking; on CUDA they run
on a side stream per device (kept between saves) that first waits for the device's current stream,
so the copies see every kernel queued before the save and overlap nothing else. One event per source
device is recorded after its last copy and waited for before ``stage`` returns: the stall is the
copies, and no device is synchronised as a whole (other accelerators: one device synchronisation
each).

Call order: ``stage(key, obj)`` * -> (write the staged objects) -> next ``stage()`` reuses the buffers.
The caller must not stage again while a previous staged copy is still being written.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from typing import Any

import torch

from ckptdb.storage.gcpause import paused_gc

_DICTS: tuple[type, ...] = (dict, collections.OrderedDict, collections.Counter)
_SEQUENCES: tuple[type, ...] = (list, tuple, set, frozenset)
_QUANTIZED: frozenset[torch.dtype] = frozenset(
    getattr(torch, n) for n in ("qint8", "quint8", "qint32", "quint4x2", "quint2x4") if hasattr(torch, n)
)
_WHOLE_MAX = 1 << 20  # storages up to this size may take the per-tensor fast path (stage_whole)


def _new_buffer(nbytes: int, device: torch.device) -> torch.UntypedStorage:
    pin = device.type not in ("cpu", "meta") and torch.cuda.is_available()
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin).untyped_storage()


class StagingArea:
    """Host buffers for staged checkpoints, kept between saves.

    Attributes:
        bytes_staged: bytes copied by the last ``stage`` calls since ``reset_stats()``.
        seconds: wall time spent in ``stage`` since ``reset_stats()``.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, list[torch.UntypedStorage]] = {}
        # small CPU tensors that cover their whole storage: the staged tensors themselves, reused
        # (one ``copy_``, no new tensor over a buffer) when the next save meets the same layout
        self._tensors: dict[str, list[torch.Tensor]] = {}
        # what each of those was staged from: (type, dtype, shape, requires_grad), compared with the
        # next save's tensor at the same position (cheaper than reading the staged tensor's again)
        self._sigs: dict[str, list[tuple[Any, ...]]] = {}
        self._streams: dict[torch.device, Any] = {}  # CUDA side stream per device, for the copies
        self.bytes_staged = 0
        self.seconds = 0.0

    @property
    def nbytes(self) -> int:
        """Bytes of staging memory held."""
        held = sum(b.nbytes() for bufs in self._buffers.values() for b in bufs)
        return held + sum(t.untyped_storage().nbytes() for ts in self._tensors.values() for t in ts)

    def reset_stats(self) -> None:
        self.bytes_staged = 0
        self.seconds = 0.0

    def release(self) -> None:
        """Free every staging buffer (the next save allocates again)."""
        self._buffers.clear()
        self._tensors.clear()
        self._sigs.clear()

    def stage(self, key: str, obj: Any) -> Any:
        """A copy of ``obj`` (for file ``key``) that shares no mutable memory with it."""
        start = time.perf_counter()
        old = self._buffers.get(key, [])
        used: list[torch.UntypedStorage] = []
        # source storage (its _cdata) -> its staged storage, or the staged tensor that owns it whole
        by_storage: dict[int, torch.UntypedStorage | torch.Tensor] = {}
        devices: set[torch.device] = set()  # every accelerator a copy was issued from
        old_tensors = self._tensors.get(key, [])
        old_sigs = self._sigs.get(key, [])
        n_old = min(len(old_tensors), len(old_sigs))
        tensors: list[torch.Tensor] = []
        sigs: list[tuple[Any, ...]] = []
        fill_dst: list[torch.Tensor] = []  # reused staged tensors and their sources: one _foreach_copy_
        fill_src: list[torch.Tensor] = []
        staged_bytes = 0
        strided = torch.strided

        def stage_storage(src: torch.UntypedStorage) -> torch.UntypedStorage:
            nonlocal staged_bytes
            staged = by_storage.get(src._cdata)
            if staged is not None:
                return staged.untyped_storage() if isinstance(staged, torch.Tensor) else staged
            i = len(used)
            nbytes = src.nbytes()
            buf = old[i] if i < len(old) and old[i].nbytes() == nbytes else _new_buffer(nbytes, src.device)
            if src.device.type == "cuda":
                side = self._side_stream(src.device, devices)
                with torch.cuda.stream(side):
                    buf.copy_(src, non_blocking=True)
                devices.add(src.device)
            elif src.device.type != "cpu":
                buf.copy_(src, non_blocking=True)  # queued on the current stream of src's device
                devices.add(src.device)
            else:  # copied with the small tensors after the walk, as words (see _words)
                fill_dst.append(_words(buf))
                fill_src.append(_words(src))
            used.append(buf)
            by_storage[src._cdata] = buf
            staged_bytes += nbytes
            return buf

        def stage_tensor(t: torch.Tensor) -> torch.Tensor:
            # Runs once per tensor of the state, inside the stall: every property read of a tensor
            # costs ~0.1-0.2 us, so the small-tensor way reads each one once, cheapest checks first.
            nonlocal staged_bytes
            tp = type(t)
            if (tp is torch.Tensor or tp is torch.nn.Parameter) and not t.__dict__ and t.is_cpu:
                if t.layout is strided and not t.is_nested:
                    dtype = t.dtype
                    if dtype not in _QUANTIZED:
                        src = t.untyped_storage()
                        nbytes = src.nbytes()
                        if (
                            nbytes <= _WHOLE_MAX
                            and t.nbytes == nbytes
                            and src._cdata not in by_storage
                            and t.storage_offset() == 0
                            and t.is_contiguous()
                        ):
                            # the whole of a small storage: last save's staged tensor at this position
                            # is refilled (after the walk, in one batch) when it is of the same kind
                            sig = (tp, dtype, t.shape, t.requires_grad)
                            i = len(tensors)
                            if i < n_old and old_sigs[i] == sig:
                                out = old_tensors[i]
                                fill_dst.append(out)
                                fill_src.append(t)
                            else:
                                out = t.detach().clone()
                                if tp is torch.nn.Parameter:
                                    out = torch.nn.Parameter(out, requires_grad=sig[3])
                                elif sig[3]:
                                    out.requires_grad_(True)
                            tensors.append(out)
                            sigs.append(sig)
                            by_storage[src._cdata] = out
                            staged_bytes += nbytes
                            return out
                        out = torch.empty(0, dtype=dtype).set_(
                            stage_storage(src), t.storage_offset(), t.size(), t.stride()
                        )
                        return _like(out, t)
                return _like(t.detach().to("cpu", copy=True), t)
            plain = t.layout is strided and not t.is_quantized and not t.is_nested
            if not plain or t.device.type == "meta":
                out = t.detach().to("cpu", copy=True)
            else:
                storage = stage_storage(t.untyped_storage())
                out = torch.empty(0, dtype=t.dtype).set_(storage, t.storage_offset(), t.size(), t.stride())
            return _like(out, t)

        copy = _copier(stage_tensor)
        try:
            with paused_gc():  # the copy's containers and tensors would set off the collector (gcpause)
                result = copy(obj)
            if fill_dst:
                with torch.no_grad():
                    torch._foreach_copy_(fill_dst, fill_src)
        finally:
            # before anyone (the background writer) reads the buffers, and before a failed stage
            # lets buffers with copies in flight be reused: one event per CUDA device
            waits = {d: self._streams[d] for d in devices if d.type == "cuda"}
            events = [(d, torch.cuda.Event()) for d in sorted(waits, key=str)]
            for d, ev in events:
                ev.record(waits[d])
            for _, ev in events:
                ev.synchronize()
            synchronize({d for d in devices if d.type != "cuda"})
        self._buffers[key] = used
        self._tensors[key] = tensors
        self._sigs[key] = sigs
        self.bytes_staged += staged_bytes
        self.seconds += time.perf_counter() - start
        return result

    def _side_stream(self, device: torch.device, started: set[torch.device]) -> Any:
        """The copy stream of ``device``; on its first copy of this ``stage``, wait for the current stream."""
        side = self._streams.get(device)
        if side is None:
            side = self._streams[device] = torch.cuda.Stream(device=device)
        if device not in started:
            side.wait_stream(torch.cuda.current_stream(device))  # kernels queued before the save
        return side


def _like(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``out`` (a staged copy of ``t``) as a Parameter when ``t`` is one, with ``t``'s requires_grad."""
    if type(t) is torch.nn.Parameter:
        return torch.nn.Parameter(out, requires_grad=t.requires_grad)
    if t.requires_grad:
        out.requires_grad_(True)
    return out


def _words(storage: torch.UntypedStorage) -> torch.Tensor:
    """``storage`` as a flat tensor of 4-byte integers (bytes when its size is not a multiple of 4):
    torch copies int32 tensors ~12 % faster than uint8 ones (measured at 0.25 GiB), bit for bit."""
    n = storage.nbytes()
    if n % 4 == 0:
        return torch.empty(0, dtype=torch.int32).set_(storage, 0, (n // 4,), (1,))
    return torch.empty(0, dtype=torch.uint8).set_(storage, 0, (n,), (1,))


def _synchronize_one(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    else:  # another accelerator (xpu, mps, ...)
        torch.accelerator.synchronize(device)


def synchronize(devices: set[torch.device], sync: Callable[[torch.device], None] = _synchronize_one) -> None:
    """Wait for every copy issued from each of ``devices``, one synchronisation per device.

    ``torch.cuda.synchronize()`` without an argument waits for the *current* device only: copies
    from the other GPUs of a multi-GPU state could still be in flight when the buffers are read.
    """
    for device in sorted(devices, key=str):
        sync(device)


def _copier(stage_tensor: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Any], Any]:
    memo: dict[int, Any] = {}
    tensor_types = (torch.Tensor, torch.nn.Parameter)

    def copy(value: Any) -> Any:
        tp = type(value)
        if tp is dict:  # the common container first: no attributes, a comprehension
            return {k: copy(v) for k, v in value.items()}
        if tp in tensor_types or isinstance(value, torch.Tensor):
            hit = memo.get(id(value))
            if hit is None:
                hit = memo[id(value)] = stage_tensor(value)
                attrs = value.__dict__
                if attrs:  # Python attributes are saved (and loaded) too
                    for attr, v in attrs.items():
                        setattr(hit, attr, copy(v))
            return hit
        if tp in _DICTS:
            out = tp() if tp is not collections.Counter else collections.Counter()
            for k, v in value.items():
                out[k] = copy(v)
            for attr, v in getattr(value, "__dict__", {}).items():  # e.g. a state_dict's _metadata
                setattr(out, attr, copy(v))
            return out
        if tp is list:
            return [copy(v) for v in value]
        if tp in _SEQUENCES:
            return tp(copy(v) for v in value)
        if tp is bytearray:
            return bytearray(value)
        return value  # immutable leaves (numbers, strings, dtypes, ...): checked by check_weights_only_safe

    return copy


__all__ = ["StagingArea", "synchronize"]
