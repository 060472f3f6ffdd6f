"""What a sharded (DCP) part of a checkpoint is called, and which values belong to it.

Kept apart from ``ckptdb.storage.dcp`` so that importing ckptdb does not import
``torch.distributed.checkpoint`` (0.4-0.8 s): that happens on the first sharded save or load.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

SHARDED_DIR = "sharded"  # the DCP checkpoint's directory inside a step directory
METADATA_NAME = ".metadata"  # DCP's global metadata file (written by DCP's coordinator)
KIND = "sharded"

_NO_DIST_WARNING = "torch.distributed is disabled, unavailable or uninitialized"


_sharded_types: tuple[type, ...] | None = None


def _sharded() -> tuple[type, ...]:
    global _sharded_types
    if _sharded_types is None:
        from torch.distributed.tensor import DTensor

        types: list[type] = [DTensor]
        try:
            from torch.distributed._shard.sharded_tensor import ShardedTensor
        except ImportError:  # pragma: no cover - present in every supported torch
            pass
        else:
            types.append(ShardedTensor)
        _sharded_types = tuple(types)
    return _sharded_types


def is_sharded(value: Any) -> bool:
    """True for a DTensor or a (legacy) ShardedTensor."""
    tp = type(value)
    if tp is torch.Tensor or tp is torch.nn.Parameter:
        return False
    return isinstance(value, _sharded())


def contains_sharded(value: Any, _depth: int = 0) -> bool:
    """Does ``value`` (a state dict entry, nested containers included) hold any sharded tensor?"""
    if _depth > 200:
        return False
    if is_sharded(value):
        return True
    if isinstance(value, Mapping):
        return any(contains_sharded(v, _depth + 1) for v in value.values())
    if isinstance(value, list | tuple):
        return any(contains_sharded(v, _depth + 1) for v in value)
    return False


def sharded_keys(state: Mapping[str, Any]) -> list[str]:
    """The top-level keys of ``state`` that go through DCP (sorted, so every rank agrees on order)."""
    return sorted(k for k, v in state.items() if contains_sharded(v))


__all__ = ["KIND", "METADATA_NAME", "SHARDED_DIR", "contains_sharded", "is_sharded", "sharded_keys"]
