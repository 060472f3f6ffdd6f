"""``torch.save``'s file format, written with less Python per tensor.

``torch.save`` spends ~27 us of Python on each tensor of a state: its ``persistent_id`` runs for
every object pickled (~20 per tensor: ``isinstance`` checks, ``torch.is_storage``), and each
tensor's ``__reduce_ex__`` builds a ``TypedStorage`` and looks up its element size (~10 us alone).
For a state of 50 000 small tensors that is ~1.4 s of a save whose bytes take ~0.2 s to write.

:func:`save` writes the same archive through the same C++ zip writer (``PyTorchFileWriter``): the
records ``data.pkl``, ``.format_version``, ``.storage_alignment``, ``byteorder``, ``data/<key>`` in
the order ``torch.save`` writes them, and a ``data.pkl`` that is byte for byte the one ``torch.save``
pickles (``tests/storage/test_fastsave.py`` compares them). What changes is how it gets there: a C
pickler whose ``dispatch_table`` sends plain tensors and Parameters to reducers that read each
property once, and a ``persistent_id`` that is one type check.

Only *plain* tensors take this way: ``torch.Tensor`` or ``torch.nn.Parameter`` without Python
attributes or backward hooks, on the CPU, strided, not quantized, conjugated or negated, of a dtype
``torch.save`` writes as a typed storage. Anything else met while pickling (a tensor subclass that
references a storage, a storage saved on its own, a CUDA tensor, one storage viewed as two dtypes,
an object that cannot be pickled) stops the fast pickler before any byte is written, and the file
is written by ``torch.save`` itself, which then behaves exactly as it always does (and raises its
own error where it would). The files load with plain ``torch.load(weights_only=True)``.
``CKPTDB_NO_FAST_SAVE=1`` sends every file to ``torch.save``.
"""

from __future__ import annotations

import collections
import contextlib
import copyreg
import io
import os
import pickle
import sys
from typing import IO, Any

import torch

_PROTOCOL = 2  # torch.serialization.DEFAULT_PROTOCOL


class _Fallback(Exception):
    """Raised inside the fast pickler: this state is written by ``torch.save`` instead."""


class _StorageRef:
    """A storage's place in the pickle: pickled as ``torch.save``'s persistent id for it."""

    __slots__ = ("pid",)

    def __init__(self, pid: tuple[Any, ...]) -> None:
        self.pid = pid


def _storage_types() -> dict[torch.dtype, tuple[type, int]]:
    """dtype -> (the ``torch.<X>Storage`` class ``torch.save`` names for it, its element size); the
    quantized ones are left out (``torch.save`` writes those tensors). ``storage.fastload`` reads
    the same table the other way round."""
    out: dict[torch.dtype, tuple[type, int]] = {}
    for dtype, name in torch.storage._dtype_to_storage_type_map().items():
        if dtype in (torch.qint8, torch.qint32, torch.quint8, torch.quint4x2, torch.quint2x4):
            continue
        storage_type = getattr(torch, name, None)
        if storage_type is not None:
            out[dtype] = (storage_type, torch.empty((), dtype=dtype).element_size())
    return out


def _available() -> bool:
    return (
        hasattr(torch._C, "PyTorchFileWriter")
        and hasattr(torch.serialization, "_get_storage_alignment")
        and hasattr(torch.storage, "_dtype_to_storage_type_map")
        and hasattr(torch._C, "_get_tensor_metadata")
    )


_AVAILABLE = _available()
STORAGE_TYPES = _storage_types() if _AVAILABLE else {}


class _Pickler(pickle.Pickler):
    """Pickles plain tensors as ``torch.save`` does; raises :class:`_Fallback` on anything else."""

    def __init__(self, file: IO[bytes]) -> None:
        super().__init__(file, protocol=_PROTOCOL)
        self.storages: dict[str, torch.UntypedStorage] = {}  # key -> storage, in first-met order
        self._keys: dict[int, str] = {}  # storage _cdata -> key
        self._dtypes: dict[int, torch.dtype] = {}  # data_ptr -> the dtype it was saved as
        table = copyreg.dispatch_table.copy()
        table[torch.Tensor] = self._reduce_tensor
        table[torch.nn.Parameter] = self._reduce_parameter
        table[collections.OrderedDict] = _reduce_ordered_dict
        for t in (torch.UntypedStorage, torch.storage.TypedStorage, *(s for s, _ in STORAGE_TYPES.values())):
            table[t] = _refuse
        self.dispatch_table = table

    def persistent_id(self, obj: Any) -> Any:  # called for every object pickled: one type check
        return obj.pid if type(obj) is _StorageRef else None

    def _reduce_tensor(self, t: torch.Tensor) -> tuple[Any, ...]:
        if t.__dict__ or t._backward_hooks or not t.is_cpu or t.layout is not torch.strided:
            raise _Fallback
        dtype = t.dtype
        kind = STORAGE_TYPES.get(dtype)
        if kind is None or t.is_nested or torch._C._get_tensor_metadata(t):  # type: ignore[attr-defined]  # conj, neg
            raise _Fallback
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr != 0 and self._dtypes.setdefault(ptr, dtype) != dtype:
            raise _Fallback  # one storage saved as two dtypes: torch.save refuses it in its own words
        cdata = storage._cdata
        key = self._keys.get(cdata)
        if key is None:
            key = self._keys[cdata] = str(len(self._keys))
            self.storages[key] = storage
        storage_type, size = kind
        ref = _StorageRef(("storage", storage_type, key, "cpu", storage.nbytes() // size))
        args: tuple[Any, ...] = (
            ref,
            t.storage_offset(),
            tuple(t.size()),
            t.stride(),
            t.requires_grad,
            collections.OrderedDict(),
        )
        return (torch._utils._rebuild_tensor_v2, args)

    def _reduce_parameter(self, p: torch.nn.Parameter) -> tuple[Any, ...]:
        if p.__dict__ or p._backward_hooks:
            raise _Fallback
        return (torch._utils._rebuild_parameter, (p.data, p.requires_grad, collections.OrderedDict()))


_NO_ITEMS: tuple[()] = ()


def _reduce_ordered_dict(od: collections.OrderedDict[Any, Any]) -> Any:
    """``od.__reduce__()``, without its ``copyreg._slotnames`` call (1-2 us) for an empty dict without
    attributes (every tensor's backward-hooks argument)."""
    if od or od.__dict__:
        return od.__reduce__()
    return (collections.OrderedDict, (), None, None, iter(_NO_ITEMS))


def _refuse(obj: Any) -> Any:
    raise _Fallback


def pickled(obj: Any) -> tuple[bytes, dict[str, torch.UntypedStorage]] | None:
    """``data.pkl`` as ``torch.save`` would pickle ``obj`` and the storages to write after it, or
    ``None`` when ``obj`` must be written by ``torch.save`` itself (see the module's docstring)."""
    if not _AVAILABLE or os.environ.get("CKPTDB_NO_FAST_SAVE") == "1":
        return None
    if getattr(torch.serialization._serialization_tls, "skip_data", False):  # torch.save's own mode
        return None
    buf = io.BytesIO()
    pickler = _Pickler(buf)
    try:
        pickler.dump(obj)
    except Exception:  # noqa: BLE001 - _Fallback, or an error torch.save will raise in its own words
        return None
    finally:
        pickler.dispatch_table = {}  # the bound reducers refer back to the pickler
    return buf.getvalue(), pickler.storages


def save(obj: Any, f: IO[bytes]) -> None:
    """Write ``obj`` to the file object ``f`` as ``torch.save(obj, f)`` would."""
    fast = pickled(obj)
    if fast is None:
        torch.save(obj, f)
        return
    data, storages = fast
    writer = torch._C.PyTorchFileWriter(
        f, torch.serialization.get_crc32_options(), torch.serialization._get_storage_alignment()
    )
    try:
        writer.write_record("data.pkl", data, len(data))
        writer.write_record(".format_version", b"1", 1)
        alignment = str(torch.serialization._get_storage_alignment()).encode()
        writer.write_record(".storage_alignment", alignment, len(alignment))
        writer.write_record("byteorder", sys.byteorder.encode(), len(sys.byteorder))
        for key, storage in storages.items():
            writer.write_record(f"data/{key}", storage, storage.nbytes())  # type: ignore[arg-type]
    except BaseException:
        # ended here, as torch.save's context manager does: an unfinished writer would end the
        # archive from its destructor, whenever it is collected, through ``f``
        with contextlib.suppress(Exception):
            writer.write_end_of_file()
        raise
    writer.write_end_of_file()
    f.flush()


__all__ = ["pickled", "save"]
