"""A faster weights-only load for files whose digest proves that ckptdb's writer produced them.

``torch.load(weights_only=True)`` unpickles with a pure-Python interpreter of the pickle opcodes.
For a file of many small tensors that interpreter is most of the load (50 000 tensors: ~2.8 s of
which ~1.2 s is the interpreter alone). This module loads such files through the same
``torch.load`` machinery (zip records, storages, ``mmap``, ``map_location``) but with CPython's C
unpickler, restricted by :meth:`_Unpickler.find_class` to a short list of globals: the ones
``torch.save`` writes for tensors, parameters and the plain values that ckptdb's save accepts
(``safety.check_weights_only_safe``). Any other global, a legacy (non-zip) file, or any error ends
the fast attempt and the file is loaded again by ``torch.load(weights_only=True)``, whose answer
(object or refusal) is final.

When it is used (:func:`load` with ``trusted=True``, called by ``reader.load_torch_checked_many``):
only on bytes whose digest was checked against the catalog *before* unpickling, in a checkpoint
that ckptdb's own save wrote (not one adopted by ``ckptdb import``). Together these mean the pickle
is one that ``torch.save`` produced from a state that passed ckptdb's save-time checks.

What the allow-list alone guarantees, for any bytes: no global outside it can be named, so no
callable outside it can be reached and no code runs (the C unpickler calls only what
``find_class`` returns, ``__setstate__`` of what those build, and ``append``/``extend``/``add``/
``__setitem__`` of containers); globals that could take attributes are handed out as stand-ins made
for one load (``_Unpickler``), so no pickle changes anything beyond the objects it builds. What it
does not guarantee, and torch's unpickler does: the C unpickler lets BUILD set attributes on the
objects it builds where torch refuses, and a crafted ``LONG_BINPUT`` index makes it allocate a memo
array of that size (torch's Python unpickler keeps a dict). The digest-first rule is for those: a
pickle ckptdb's writer produced has neither.

Mapped loads go through :mod:`ckptdb.storage.fastload` first (the same unpickler, storages sliced
from one mapping of the file, without ``torch.load``'s per-tensor fake-mode checks); a file it does
not take goes through ``torch.load`` with this unpickler as before.

``CKPTDB_NO_FAST_UNPICKLE=1`` turns this off (every file then goes through torch's unpickler).
"""

from __future__ import annotations

import os
import pickle
import types
from pathlib import Path
from typing import Any

import torch

from ckptdb.storage.gcpause import paused_gc


class _NotFast(Exception):
    """The fast load cannot decide this file: torch's weights-only load takes it."""


# what torch.save writes for tensors, parameters and the plain values ckptdb's save accepts
_WANTED = (
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_tensor_v3",
    "torch._utils._rebuild_parameter",
    "builtins.set",
    "builtins.complex",
    "builtins.bytearray",
    "collections.OrderedDict",
    "collections.Counter",
    "_codecs.encode",  # bytes under pickle protocol 2
    "torch.Size",
    "torch.device",
    "torch.serialization._get_layout",
)
# Not ``torch.storage.UntypedStorage`` (torch writes it for dtypes without a legacy storage class, e.g.
# float8): a Python class, so a pickle that names it could set attributes on it for the whole process;
# such files take torch's own load.


def _mutable(obj: Any) -> bool:
    """Whether a pickle's BUILD could set attributes on ``obj`` (Python functions and classes)."""
    try:
        obj.__ckptdb_probe__ = None
    except (AttributeError, TypeError):
        return False
    del obj.__ckptdb_probe__
    return True


def _stand_in(fn: Any) -> Any:
    """A new callable that calls ``fn``: what a crafted BUILD on it changes is thrown away with it."""

    def call(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    return call


def _allowed() -> dict[tuple[str, str], Any]:
    """``_WANTED`` and torch's dtypes, each only where torch's weights-only unpickler allows it too
    (so the fast load never accepts a global that ``torch.load(weights_only=True)`` refuses)."""
    try:
        from torch._weights_only_unpickler import _get_allowed_globals

        torch_allows: dict[str, Any] = _get_allowed_globals()
    except (ImportError, AttributeError, TypeError):  # another torch: no fast load
        return {}
    out: dict[tuple[str, str], Any] = {}
    for full, obj in torch_allows.items():
        module, _, name = full.rpartition(".")
        if full in _WANTED or (module == "torch" and isinstance(obj, torch.dtype)):
            out[(module, name)] = obj
            if module == "builtins":  # pickle protocol 2 names the module "__builtin__"
                out[("__builtin__", name)] = obj
    return out


_ALLOWED = _allowed()


_MUTABLE = frozenset(k for k, v in _ALLOWED.items() if _mutable(v))  # the rebuild functions, Counter


class _Unpickler(pickle.Unpickler):
    """CPython's C unpickler; globals only from the allow-list (torch's wrapper adds its storage types).

    Unlike torch's unpickler, the C one applies BUILD to whatever object is on its stack, the globals
    it was handed included. So an allowed global that could take attributes (a Python function,
    ``Counter``) is handed out as a stand-in made for this load alone: no pickle can change
    anything that outlives its own load."""

    def find_class(self, module: str, name: str) -> Any:
        key = (module, name)
        obj = _ALLOWED.get(key)
        if obj is None:
            raise _NotFast(f"{module}.{name} is not on the fast load's list")
        if key not in _MUTABLE:
            return obj
        made: dict[tuple[str, str], Any] = self.__dict__.setdefault("_stand_ins", {})
        if key not in made:
            made[key] = _stand_in(obj)
        return made[key]


def _legacy_load(*args: Any, **kwargs: Any) -> Any:
    raise _NotFast("not a zip file")


# the ``pickle_module`` handed to torch.load: torch subclasses its Unpickler (adding storage types)
_PICKLE = types.ModuleType("ckptdb_fast_unpickle")
_PICKLE.Unpickler = _Unpickler  # type: ignore[attr-defined]
_PICKLE.load = _legacy_load  # type: ignore[attr-defined]
_PICKLE.UnpicklingError = pickle.UnpicklingError  # type: ignore[attr-defined]

fast_loads = 0  # files loaded by the fast path in this process (tests and benchmarks read it)


def enabled() -> bool:
    return (
        bool(_ALLOWED)
        and os.environ.get("CKPTDB_NO_FAST_UNPICKLE") != "1"
        # torch refuses a pickle_module when weights-only loads are forced
        and os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "0") in ("0", "")
    )


def load(path: Path, *, mmap: bool, trusted: bool = False) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)``, with the collector paused.

    ``trusted``: the file's digest was just checked against a catalog row that ckptdb's save wrote
    (see the module's docstring); the C unpickler then loads it when it stays within the allow-list.
    Raises what ``torch.load(weights_only=True)`` raises."""
    global fast_loads
    with paused_gc():
        if trusted and enabled() and mmap:
            from ckptdb.storage import fastload  # imports this module: not at the top

            try:
                obj = fastload.load(path)
            except Exception:  # noqa: BLE001 - fastload.NotFast, or any error: the ways below decide
                pass
            else:
                fast_loads += 1
                return obj
        if trusted and enabled():
            try:
                obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_PICKLE, mmap=mmap)
            except Exception:  # noqa: BLE001 - torch's weights-only load below gives the answer
                pass
            else:
                fast_loads += 1
                return obj
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


__all__ = ["enabled", "load"]
