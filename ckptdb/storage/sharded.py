"""What a sharded (DCP) part of a checkpoint is called, and which values belong to it.

Kept apart from ``ckptdb.storage.dcp`` so that importing ckptdb does not import
``torch.distributed.checkpoint`` (0.4-0.8 s): that happens on the first sharded save or load.
"""

from __future__ import annotations

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


__all__ = ["KIND", "METADATA_NAME", "SHARDED_DIR", "is_sharded"]
