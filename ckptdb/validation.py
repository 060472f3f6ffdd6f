"""Argument checks shared by the manager and the CLI; each error names the bad value."""

from __future__ import annotations

import numbers
import unicodedata
from collections.abc import Iterable

from ckptdb.errors import InvalidArgumentError

MAX_NAME = 255
MAX_INT64 = 2**63 - 1
VERIFY_MODES = ("digest", "size")


def step_nr(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidArgumentError(f"step_nr must be a non-negative integer, not {value!r} ({type(value).__name__})")
    v = int(value)
    if v < 0:
        raise InvalidArgumentError(f"step_nr must be a non-negative integer, not {v}")
    if v > MAX_INT64:
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
    """A count such as ``n`` of ``keep_last_n_checkpoints``: an integer from 1 to 2**63 - 1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 1:
        raise InvalidArgumentError(f"{what} must be an integer >= 1, not {value!r} ({type(value).__name__})")
    v = int(value)
    if v > MAX_INT64:
        raise InvalidArgumentError(f"{what} {v} does not fit in a 64-bit integer")
    return v


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def score(value: object) -> float:
    """A score: a real number (int, float, Fraction, numpy scalar) or a one-element real tensor.

    NaN and infinities are returned as they are (stored, never ranked as best). Anything else
    (bool, complex, str, Decimal, a multi-element or complex tensor, an int too large for a
    float) raises :class:`InvalidArgumentError` naming it.
    """
    what = f"score must be a real number, not {_short(value)} ({type(value).__name__})"
    if isinstance(value, bool) or type(value).__name__ == "bool_":  # numpy.bool_ is no number either
        raise InvalidArgumentError(what)
    if not isinstance(value, numbers.Real):
        try:
            import torch
        except ImportError:  # pragma: no cover
            raise InvalidArgumentError(what) from None
        if not isinstance(value, torch.Tensor):
            raise InvalidArgumentError(what)
        if value.numel() != 1:
            raise InvalidArgumentError(f"score must be a one-element tensor, not one of shape {tuple(value.shape)}")
        if value.dtype.is_complex or value.dtype == torch.bool:
            raise InvalidArgumentError(f"score must be a real number, not a {value.dtype} tensor")
        value = value.detach().cpu().item()
    try:
        return float(value)  # type: ignore[arg-type]
    except OverflowError:
        raise InvalidArgumentError(f"score {_short(value)} is too large for a 64-bit float") from None
    except (TypeError, ValueError) as e:
        raise InvalidArgumentError(f"{what}: {e}") from None


def verify_mode(value: object) -> str:
    """A load's ``verify``: ``"digest"`` or ``"size"``."""
    if not isinstance(value, str) or value not in VERIFY_MODES:
        raise InvalidArgumentError(f"verify must be 'digest' or 'size', not {_short(value)}")
    return value


def key_set(value: object, what: str) -> set[str]:
    """A set of state keys (``replicated_keys``): None, or a collection of strings (not one string)."""
    if value is None:
        return set()
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise InvalidArgumentError(f"{what} must be a set of strings, not {_short(value)} ({type(value).__name__})")
    out = set(value)
    bad = [k for k in out if not isinstance(k, str)]
    if bad:
        raise InvalidArgumentError(f"{what} must hold strings only, not {_short(bad[0])} ({type(bad[0]).__name__})")
    return out
