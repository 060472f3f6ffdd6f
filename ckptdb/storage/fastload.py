"""A mapped load of a torch archive with less Python per tensor, for files ckptdb's writer produced.

``torch.load(mmap=True)`` spends ~30 us of Python on each tensor: its ``persistent_load`` asks
``detect_fake_mode`` (a walk of the dispatch-mode stack) twice per storage, wraps every storage in
a ``TypedStorage``, and ``_rebuild_tensor_v2`` asks a third time. For a file of 50 000 small
tensors that is most of a 1.5 s load of 0.2 GB.

:func:`load` maps the file once (``UntypedStorage.from_file``, private, as ``torch.load(mmap=True)``
does), finds each record through torch's own zip reader (``PyTorchFileReader.get_record_offset``),
and unpickles ``data.pkl`` with the allow-listed C unpickler of :mod:`ckptdb.storage.unpickle`,
where a storage is the slice of the mapping at its record (bounds checked) and
``torch._utils._rebuild_tensor_v2`` is replaced by the same steps without the fake-mode checks
(``torch.empty(0).set_(storage, offset, size, stride)``, ``requires_grad``, conj/neg metadata,
``_backward_hooks``). Tensors come back as ``torch.load(mmap=True, map_location="cpu")`` returns
them: views of the mapped file, storages shared as saved.

It is used only where the C unpickler is (``unpickle.load(trusted=True)``: the file's digest was
checked first, and ckptdb's save wrote it). A file it cannot take (a storage class outside
``torch.save``'s typed storages, another byte order, a record that is missing or runs past the end,
any error) raises :class:`NotFast`, and the caller loads it with ``torch.load`` as before.
"""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path
from typing import Any

import torch

from ckptdb.storage import fastsave, unpickle


class NotFast(unpickle._NotFast):
    """This file is not for the fast load: load it with ``torch.load``."""


# ``<X>Storage`` name -> (dtype, element size): the typed storages fastsave (and torch.save) name
_DTYPES = {cls.__name__: (dtype, size) for dtype, (cls, size) in fastsave.STORAGE_TYPES.items()}
_ELEMENT = {dtype: size for dtype, size in _DTYPES.values()}
_AVAILABLE = bool(_DTYPES) and hasattr(torch._C, "PyTorchFileReader") and bool(unpickle._ALLOWED)


class _Storage:
    """A loaded storage: the slice of the mapping and the dtype it was saved as (immutable slots)."""

    __slots__ = ("dtype", "untyped")

    def __init__(self, untyped: torch.UntypedStorage, dtype: torch.dtype) -> None:
        self.untyped = untyped
        self.dtype = dtype


def _rebuild_tensor_v2(
    _loader: Any,
    storage: Any,
    storage_offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    requires_grad: bool,
    backward_hooks: Any,
    metadata: Any = None,
) -> torch.Tensor:
    """``torch._utils._rebuild_tensor_v2`` for a :class:`_Storage` (no fake-mode checks); a method of
    the loader (``_loader``), so what a pickle's BUILD could set on it is refused."""
    if type(storage) is not _Storage:
        raise NotFast("a tensor over something that is not a storage")
    t = torch.empty((0,), dtype=storage.dtype).set_(storage.untyped, storage_offset, size, stride)
    t.requires_grad = requires_grad
    if metadata:
        torch._utils.set_tensor_metadata(t, metadata)
    t._backward_hooks = backward_hooks
    return t


_slice: Any = getattr(torch._C.StorageBase, "__getitem__")  # noqa: B009 - UntypedStorage's, without its wrapper's checks


class _Loader(unpickle._Unpickler):
    """The allow-listed C unpickler, with storages taken from one mapping of the file."""

    def __init__(self, data: Any, reader: Any, overall: torch.UntypedStorage, size: int) -> None:
        super().__init__(data, encoding="utf-8")  # as torch.load unpickles
        self._reader = reader
        self._overall = overall
        self._size = size
        self._storages: dict[str, _Storage] = {}

    _rebuild = _rebuild_tensor_v2

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _DTYPES:
            return _DTYPES[name][0]  # a torch.dtype: nothing a pickle's BUILD can change
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return self._rebuild  # a bound method of this load's unpickler: takes no attributes
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        if type(pid) is not tuple or len(pid) != 5 or pid[0] != "storage":
            raise NotFast("not a storage reference")
        _, dtype, key, _location, numel = pid
        hit = self._storages.get(key) if type(key) is str else None
        if hit is not None:
            return hit
        size = _ELEMENT.get(dtype) if type(dtype) is torch.dtype else None
        if size is None or type(key) is not str or type(numel) is not int or numel < 0:
            raise NotFast("a storage reference this load does not take")
        nbytes = numel * size
        start = self._reader.get_record_offset(f"data/{key}")  # raises when there is no such record
        if start + nbytes > self._size:
            raise NotFast(f"record data/{key} runs past the end of the file")
        hit = self._storages[key] = _Storage(_slice(self._overall, slice(start, start + nbytes)), dtype)
        return hit


def load(path: Path) -> Any:
    """The object in the torch archive at ``path``, its tensors mapped from the file (see the module)."""
    if not _AVAILABLE:
        raise NotFast("this torch lacks what the fast load uses")
    name = os.fspath(path)
    reader: Any = torch._C.PyTorchFileReader(name)
    if reader.has_record("byteorder") and bytes(reader.get_record("byteorder")) != sys.byteorder.encode():
        raise NotFast("another byte order")
    data = reader.get_record("data.pkl")
    size = os.path.getsize(name)
    overall: Any = torch.UntypedStorage.from_file(name, False, size)
    try:
        return _Loader(io.BytesIO(data), reader, overall, size).load()
    except unpickle._NotFast as e:  # a global off the list
        raise NotFast(str(e)) from None


__all__ = ["NotFast", "load"]
