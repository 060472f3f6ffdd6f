"""Refuse, at save time, values that ``torch.load(weights_only=True)`` would refuse at load time.

ckptdb never unpickles arbitrary objects on load, so an object that only a full unpickler could
rebuild must be caught when it is saved, with the key that holds it named.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
from typing import Any

import torch

from ckptdb.errors import InvalidArgumentError

_LEAF_TYPES: tuple[type, ...] = (
    type(None),
    bool,
    int,
    float,
    complex,
    str,
    bytes,
    bytearray,
    torch.dtype,
    torch.device,
    torch.Size,
    torch.memory_format,
    torch.layout,
)
_CONTAINERS: tuple[type, ...] = (dict, collections.OrderedDict, collections.Counter)
_SEQUENCES: tuple[type, ...] = (list, tuple, set, frozenset)
_MAX_DEPTH = 200


def _extra_safe_types() -> tuple[type, ...]:
    out = []
    for g in torch.serialization.get_safe_globals():
        obj = g[0] if isinstance(g, tuple) else g
        if isinstance(obj, type):
            out.append(obj)
    return tuple(out)


def check_weights_only_safe(state: Mapping[str, Any], *, root: str = "state") -> None:
    """Raise :class:`InvalidArgumentError` naming the first value a weights-only load refuses."""
    extra = _extra_safe_types()
    seen: set[int] = set()

    def walk(value: Any, where: str, depth: int) -> None:
        if depth > _MAX_DEPTH:
            raise InvalidArgumentError(f"{where}: nesting deeper than {_MAX_DEPTH} levels")
        tp = type(value)
        if tp in _LEAF_TYPES or isinstance(value, extra):
            return
        if isinstance(value, torch.Tensor):
            # Parameters and plain tensors are safe; arbitrary tensor subclasses are not
            # (DTensor and friends are handled by the distributed writer, not here).
            if tp in (torch.Tensor, torch.nn.Parameter):
                return
            raise InvalidArgumentError(
                f"{where}: tensor subclass {tp.__module__}.{tp.__qualname__} cannot be loaded "
                "with weights_only=True; convert it to a plain tensor"
            )
        if tp in _CONTAINERS:
            if id(value) in seen:
                raise InvalidArgumentError(f"{where}: a container refers back to itself")
            seen.add(id(value))
            for k, v in value.items():
                if type(k) not in _LEAF_TYPES:
                    raise InvalidArgumentError(
                        f"{where}: dictionary key of type {type(k).__qualname__} is not saveable"
                    )
                walk(v, f"{where}[{k!r}]", depth + 1)
            seen.discard(id(value))
            return
        if tp in _SEQUENCES:
            if id(value) in seen:
                raise InvalidArgumentError(f"{where}: a container refers back to itself")
            seen.add(id(value))
            for i, v in enumerate(value):
                walk(v, f"{where}[{i}]", depth + 1)
            seen.discard(id(value))
            return
        raise InvalidArgumentError(
            f"{where}: value of type {tp.__module__}.{tp.__qualname__} cannot be saved safely: "
            "checkpoints are loaded with torch.load(weights_only=True), which refuses arbitrary "
            "objects; store tensors, numbers, strings and containers of them (or register the "
            "type with torch.serialization.add_safe_globals)"
        )

    for key, value in state.items():
        if not isinstance(key, str):
            raise InvalidArgumentError(f"{root}: top-level keys must be strings, got {key!r}")
        walk(value, f"{root}[{key!r}]", 1)
