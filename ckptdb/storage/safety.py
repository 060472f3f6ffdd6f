"""Refuse, at save time, values that ``torch.load(weights_only=True)`` would refuse at load time.

ckptdb never unpickles arbitrary objects on load, so an object that only a full unpickler could
rebuild must be caught when it is saved, with the key that holds it named. Two layers:

1. A walk over the state that mirrors the allow-list of torch's weights-only unpickler
   (``torch/_weights_only_unpickler.py``): ``None``, ``bool``, ``int`` (up to the 255-byte
   ``LONG1`` encoding; larger ones need ``LONG4``, which that unpickler lacks), ``float``,
   ``complex``, ``str``, ``bytes`` (not empty: ``b""`` pickles as a call of ``builtins.bytes``),
   ``bytearray``, ``torch.dtype`` / ``device`` / ``layout`` /
   ``qscheme`` / ``Size``; exactly ``dict``, ``collections.OrderedDict``, ``collections.Counter``,
   ``list``, ``tuple``, ``set``; exactly ``torch.Tensor`` and ``torch.nn.Parameter`` (their
   Python attributes are walked too). Everything else is refused: ``frozenset``, namedtuples,
   dataclasses, enums, numpy arrays and scalars, ``Fraction``, ``Decimal``, ``torch.memory_format``
   (it cannot even be pickled), tensor subclasses, containers that refer back to themselves.
2. Where the walk meets something whose fate it cannot decide by type alone (a type registered
   with ``torch.serialization.add_safe_globals``, a tensor with Python attributes, a sparse,
   quantized, nested or exotic-dtype tensor), a dry run: the value is serialised exactly as
   ``torch.save`` does but without tensor data (``torch.serialization.skip_data``), and the pickle
   is read back by torch's own weights-only unpickler over empty ``meta`` storages. A failure of
   either step is a refusal naming the innermost key that fails.
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ckptdb.errors import InvalidArgumentError

_LEAF_TYPES: frozenset[type] = frozenset(
    {
        type(None),
        bool,
        float,
        complex,
        str,
        bytes,
        bytearray,
        torch.dtype,
        torch.device,
        torch.layout,
        torch.qscheme,
        torch.Size,
    }
)
_DICTS: tuple[type, ...] = (dict, collections.OrderedDict, collections.Counter)
_SEQUENCES: tuple[type, ...] = (list, tuple, set)
_PLAIN_TENSORS: tuple[type, ...] = (torch.Tensor, torch.nn.Parameter)
_MAX_DEPTH = 200
_LONG1_MAX_BYTES = 255  # the weights-only unpickler reads LONG1 (<= 255 bytes), not LONG4
# dtypes whose tensors the walk passes without a dry run (every one round-trips in torch >= 2.4)
_COMMON_DTYPES: frozenset[torch.dtype] = frozenset(
    {
        torch.float64,
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.complex128,
        torch.complex64,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
    }
)


def _extra_safe_types() -> tuple[type, ...]:
    out = []
    for g in torch.serialization.get_safe_globals():
        obj = g[0] if isinstance(g, tuple) else g
        if isinstance(obj, type):
            out.append(obj)
    return tuple(out)


def _is_sharded(value: Any) -> bool:
    from ckptdb.storage.sharded import is_sharded

    return is_sharded(value)


_INT_FAST = 1 << 2000  # every int below this in magnitude fits LONG1 (255 bytes)


def _int_fits(value: int) -> bool:
    if -_INT_FAST < value < _INT_FAST:
        return True
    return len(pickle.encode_long(value)) <= _LONG1_MAX_BYTES


def _refuse(where: str, tp: type, why: str = "") -> InvalidArgumentError:
    name = f"{tp.__module__}.{tp.__qualname__}" if tp.__module__ != "builtins" else tp.__qualname__
    return InvalidArgumentError(
        f"{where}: value of type {name} cannot be saved safely{why}: checkpoints are loaded with "
        "torch.load(weights_only=True), which refuses arbitrary objects; store tensors, numbers, "
        "strings and dict/list/tuple/set containers of them (or register the type with "
        "torch.serialization.add_safe_globals)"
    )


# Where a value sits, built only when an error names it: (parent, kind, key) with kind "item"
# (``[k]``), "key" (`` (key k)``) or "attr" (``.a``); the root is the top-level name (a str).


def _where(path: Any) -> str:
    parts: list[str] = []
    while isinstance(path, tuple):
        path, kind, key = path
        parts.append(f"[{key!r}]" if kind == "item" else f" (key {key!r})" if kind == "key" else f".{key}")
    return path + "".join(reversed(parts))


def check_weights_only_safe(state: Mapping[str, Any], *, root: str = "state", allow_sharded: bool = False) -> list[str]:
    """Raise :class:`InvalidArgumentError` naming the first value a weights-only load refuses.

    Args:
        state: the mapping passed to ``save_state`` / ``save_metadata`` (string keys).
        root: how the mapping is named in error messages.
        allow_sharded: DTensor / ShardedTensor values are accepted as they are (DCP writes them;
            the non-tensor values around them are checked like any other value, because DCP
            pickles those and ckptdb loads them back weights-only).

    Returns:
        The top-level keys whose values hold a DTensor / ShardedTensor (sorted; empty unless
        ``allow_sharded``): the one walk over the state answers both questions.
    """
    extra = _extra_safe_types()
    seen: set[int] = set()
    uncertain = False
    sharded = False
    leaf_types = _LEAF_TYPES
    plain_tensors = _PLAIN_TENSORS
    tensor_type = torch.Tensor
    common_dtypes = _COMMON_DTYPES
    strided = torch.strided
    quick_leaves = _LEAF_TYPES - {bytes}  # b"" is refused: bytes take the walk

    def walk(value: Any, path: Any, depth: int) -> None:
        nonlocal uncertain
        tp = type(value)
        if tp in leaf_types:
            if tp is bytes and not value:  # pickled as a call of builtins.bytes, which the loader refuses
                raise InvalidArgumentError(
                    f"{_where(path)}: an empty bytes value does not load with torch.load(weights_only=True); "
                    "store None or bytearray() instead"
                )
            return
        if tp is int:
            if not (-_INT_FAST < value < _INT_FAST or _int_fits(value)):
                raise InvalidArgumentError(
                    f"{_where(path)}: integer of {value.bit_length()} bits is too large for a weights-only "
                    "load (at most about 2000 bits); store it as a string"
                )
            return
        if tp in plain_tensors:
            walk_tensor(value, tp, path, depth)
            return
        if depth > _MAX_DEPTH:
            raise InvalidArgumentError(f"{_where(path)}: nesting deeper than {_MAX_DEPTH} levels")
        if tp is torch.memory_format:
            raise InvalidArgumentError(
                f"{_where(path)}: torch.memory_format {value} cannot be pickled by torch.save; store str(value)"
            )
        if isinstance(value, torch.Tensor):
            walk_tensor(value, tp, path, depth)
            return
        if tp in _DICTS or tp in _SEQUENCES:
            if id(value) in seen:
                raise InvalidArgumentError(f"{_where(path)}: a container refers back to itself")
            seen.add(id(value))
            d = depth + 1
            if tp in _DICTS:
                for k, v in value.items():
                    tk = type(k)
                    if (tk is not str and tk is not int) or (tk is int and not -_INT_FAST < k < _INT_FAST):
                        walk(k, (path, "key", k), d)
                    # the common values are settled here, with no call and no path built (what
                    # walk / walk_tensor would decide for them); every other one takes the walk
                    tv = type(v)
                    if tv is tensor_type:
                        if v.dtype in common_dtypes and v.layout is strided and not v.is_nested and not v.__dict__:
                            continue
                    elif tv in quick_leaves or (tv is int and -_INT_FAST < v < _INT_FAST):
                        continue
                    walk(v, (path, "item", k), d)
                attrs = getattr(value, "__dict__", None)
                if attrs:  # e.g. a state_dict's OrderedDict._metadata: rebuilt by the unpickler's BUILD
                    uncertain = uncertain or tp is not collections.OrderedDict
                    for a, v in attrs.items():
                        walk(v, (path, "attr", a), d)
            else:
                for i, v in enumerate(value):
                    tv = type(v)
                    if tv in quick_leaves or (tv is int and -_INT_FAST < v < _INT_FAST):
                        continue
                    walk(v, (path, "item", i), d)
            seen.discard(id(value))
            return
        if extra and tp in extra:
            uncertain = True  # registered by the user: the dry run decides (its contents too)
            return
        raise _refuse(_where(path), tp)

    def walk_tensor(t: torch.Tensor, tp: type, path: Any, depth: int) -> None:
        nonlocal uncertain, sharded
        if tp not in plain_tensors:
            if allow_sharded and _is_sharded(t):
                sharded = True
                return
            raise InvalidArgumentError(
                f"{_where(path)}: tensor subclass {tp.__module__}.{tp.__qualname__} cannot be loaded "
                "with weights_only=True; convert it to a plain tensor"
            )
        # (a quantized tensor's dtype is not a common one: no is_quantized read, ~0.2 us a tensor)
        if t.dtype not in _COMMON_DTYPES or t.layout is not torch.strided or t.is_nested:
            uncertain = True
        attrs = t.__dict__
        if attrs:
            if depth > _MAX_DEPTH:
                raise InvalidArgumentError(f"{_where(path)}: nesting deeper than {_MAX_DEPTH} levels")
            uncertain = True
            if id(t) in seen:
                raise InvalidArgumentError(f"{_where(path)}: a tensor attribute refers back to the tensor")
            seen.add(id(t))
            for a, v in attrs.items():
                walk(v, (path, "attr", a), depth + 1)
            seen.discard(id(t))

    keys: list[str] = []
    for key, value in state.items():
        if not isinstance(key, str):
            raise InvalidArgumentError(f"{root}: top-level keys must be strings, got {key!r}")
        where = f"{root}[{key!r}]"
        uncertain = sharded = False
        walk(value, where, 1)
        if sharded:
            keys.append(key)
        if uncertain:
            _dry_run_or_raise(value, where)
    return sorted(keys)


# -- the dry run --------------------------------------------------------------------------------


class _MetaStorages:
    """``persistent_load`` for the dry run: every storage is an empty ``meta`` storage of its size."""

    def __call__(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        _, storage_type, _key, _location, numel = pid
        dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
        nbytes = numel * torch._utils._element_size(dtype)
        untyped = torch.UntypedStorage(nbytes, device="meta")
        return torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)


def _dry_run(value: Any) -> str | None:
    """Serialise ``value`` as ``torch.save`` would (no tensor data), unpickle it weights-only.

    Returns why it would fail, or None. Only refusals are reported: a failure of the meta-storage
    stand-in itself (not a refusal of the real loader) is not.
    """
    from torch import _weights_only_unpickler as wou

    buf = io.BytesIO()
    try:
        try:
            with torch.serialization.skip_data():
                torch.save(value, buf)
        except RuntimeError as e:
            if "skip_data" not in str(e):
                raise
            buf = io.BytesIO()  # quantized and nested tensors: a real save (rare; their data is copied)
            torch.save(value, buf)
    except Exception as e:  # noqa: BLE001 - anything torch.save cannot write is refused
        return f"torch.save fails: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as z:
        pkl = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
    pending = torch._utils._sparse_tensors_to_validate
    before = len(pending)
    unpickler = wou.Unpickler(io.BytesIO(pkl), encoding="utf-8")
    unpickler.persistent_load = _MetaStorages()  # type: ignore[method-assign]
    try:
        unpickler.load()
    except pickle.UnpicklingError as e:
        return f"a weights-only load refuses it: {str(e).splitlines()[0]}"
    except Exception:  # noqa: BLE001 - the meta stand-in, not the real loader, failed: no verdict
        return None
    finally:
        del pending[before:]  # meta sparse tensors must not be validated by a later real load
    return None


def _children(value: Any, where: str) -> list[tuple[Any, str]]:
    tp = type(value)
    out: list[tuple[Any, str]] = []
    if tp in _DICTS:
        out = [(v, f"{where}[{k!r}]") for k, v in value.items()]
        out += [(k, f"{where} (key {k!r})") for k in value]
    elif tp in _SEQUENCES:
        out = [(v, f"{where}[{i}]") for i, v in enumerate(value)]
    attrs = getattr(value, "__dict__", None) if tp in _DICTS or isinstance(value, torch.Tensor) else None
    if attrs:
        out += [(v, f"{where}.{a}") for a, v in attrs.items()]
    return out


def _dry_run_or_raise(value: Any, where: str, run: Callable[[Any], str | None] = _dry_run) -> None:
    why = run(value)
    if why is None:
        return
    # name the innermost failing value
    while True:
        for child, child_where in _children(value, where):
            child_why = run(child)
            if child_why is not None:
                value, where, why = child, child_where, child_why
                break
        else:
            break
    raise InvalidArgumentError(
        f"{where}: value of type {type(value).__qualname__} would not load back with "
        f"torch.load(weights_only=True) ({why}); convert it to plain tensors, numbers, strings and containers"
    )
