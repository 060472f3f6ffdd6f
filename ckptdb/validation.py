"""Argument checks shared by the manager and the CLI; each error names the bad value."""

from __future__ import annotations

import math
import numbers
import unicodedata

from ckptdb.errors import InvalidArgumentError

MAX_NAME = 255


def step_nr(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidArgumentError(f"step_nr must be a non-negative integer, not {value!r} ({type(value).__name__})")
    v = int(value)
    if v < 0:
        raise InvalidArgumentError(f"step_nr must be a non-negative integer, not {v}")
    if v > 2**63 - 1:
        raise InvalidArgumentError(f"step_nr {v} does not fit in a 64-bit integer")
    return v


def name(value: object, what: str) -> str:
    """A run name, metric name, pin label or metadata key: 1..255 printable characters."""
    if not isinstance(value, str):
        raise InvalidArgumentError(f"{what} must be a string, not {type(value).__name__}")
    if not value or len(value) > MAX_NAME:
        raise InvalidArgumentError(f"{what} must be 1 to {MAX_NAME} characters long (got {len(value)})")
    bad = [c for c in value if unicodedata.category(c).startswith("C")]
    if bad:
        raise InvalidArgumentError(f"{what} {value[:40]!r} contains control characters")
    return value


def count(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 1:
        raise InvalidArgumentError(f"{what} must be an integer >= 1, not {value!r}")
    return int(value)


def score(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        try:
            import torch

            if isinstance(value, torch.Tensor) and value.numel() == 1:
                return float(value.item())
        except ImportError:  # pragma: no cover
            pass
        raise InvalidArgumentError(f"score must be a real number, not {value!r} ({type(value).__name__})")
    v = float(value)
    if math.isnan(v) or math.isinf(v):
        return v  # stored, never ranked as best
    return v
