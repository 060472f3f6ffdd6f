"""Reading a retention policy typed into the run page, for a dry-run plan.

Two spellings are accepted:

- ``ckptdb prune``'s flags: ``--keep-last 2 --keep-best 3 --metric valid_loss --lower-better
  --keep-every 1000`` (a leading ``ckptdb prune RUN`` is ignored);
- the policy as ``delete_reason`` records it: ``keep_last(2) | keep_best(3, metric='valid_loss',
  lower_better) | keep_every(1000)`` (so a run's last ``pruned by ...`` reason is its default).
"""

from __future__ import annotations

import re
import shlex

from ckptdb.retention import AnyOf, KeepBest, KeepEvery, KeepLast, KeepPinned, Policy

_PRUNED_BY = "pruned by "


def parse_policy(text: str) -> Policy:
    """``text`` as a policy; raises ``ValueError`` with a message for the page."""
    text = text.strip()
    if text.startswith(_PRUNED_BY):
        text = text[len(_PRUNED_BY) :]
    if not text:
        raise ValueError("enter a policy, e.g. --keep-last 2 --keep-best 3 --metric valid_loss --lower-better")
    parts = _from_flags(text) if text.startswith(("-", "ckptdb", "prune")) else _from_str(text)
    return parts[0] if len(parts) == 1 else AnyOf(*parts)


def to_flags(policy: Policy) -> str:
    """``ckptdb prune``'s flags for ``policy`` (pins are always kept: ``keep_pinned`` has no flag)."""
    out: list[str] = []
    for c in policy.components():
        if isinstance(c, KeepLast):
            out += ["--keep-last", str(c.n)]
        elif isinstance(c, KeepBest):
            out += ["--keep-best", str(c.n), "--metric", shlex.quote(c.metric)]
            out.append("--lower-better" if c.lower_better else "--higher-better")
        elif isinstance(c, KeepEvery):
            out += ["--keep-every", str(c.k)]
    return " ".join(out)


def policy_of_reason(reason: str | None) -> str | None:
    """The policy text of a ``pruned by ...`` delete reason (None for other reasons)."""
    if reason and reason.startswith(_PRUNED_BY):
        return reason[len(_PRUNED_BY) :]
    return None


def _int(value: str, flag: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{flag} needs an integer, not {value!r}") from None


def _from_flags(text: str) -> list[Policy]:
    try:
        words = shlex.split(text)
    except ValueError as e:
        raise ValueError(f"cannot read the flags: {e}") from None
    while words and not words[0].startswith("-"):  # "ckptdb prune RUN"
        words.pop(0)
    words = [p for w in words for p in (w.split("=", 1) if w.startswith("--") and "=" in w else [w])]
    last = best = every = None
    metric, lower = "score", None
    i = 0
    while i < len(words):
        w = words[i]
        i += 1
        if w in ("--lower-better", "--higher-better"):
            lower = w == "--lower-better"
            continue
        if w in ("--dry-run", "--preserve-model", "--json"):
            continue
        if i >= len(words) or w not in ("--keep-last", "--keep-best", "--keep-every", "--metric"):
            raise ValueError(f"unknown or incomplete flag {w!r} (use --keep-last, --keep-best, --keep-every, --metric)")
        arg = words[i]
        i += 1
        if w == "--keep-last":
            last = _int(arg, w)
        elif w == "--keep-best":
            best = _int(arg, w)
        elif w == "--keep-every":
            every = _int(arg, w)
        else:
            metric = arg
    parts: list[Policy] = []
    if last is not None:
        parts.append(KeepLast(last))
    if best is not None:
        if lower is None:
            raise ValueError("--keep-best needs --lower-better or --higher-better")
        parts.append(KeepBest(best, metric=metric, lower_better=lower))
    if every is not None:
        parts.append(KeepEvery(every))
    if not parts:
        raise ValueError("a policy needs --keep-last N, --keep-best N and/or --keep-every K")
    return parts


_TERM = re.compile(r"^(keep_last|keep_best|keep_every|keep_pinned)\s*(?:\((.*)\))?$")


def _from_str(text: str) -> list[Policy]:
    parts: list[Policy] = []
    for term in text.split("|"):
        m = _TERM.match(term.strip())
        if not m:
            raise ValueError(f"cannot read {term.strip()!r}: use keep_last(N), keep_best(N, metric='m', lower_better)")
        name, args = m.group(1), [a.strip() for a in (m.group(2) or "").split(",") if a.strip()]
        if name == "keep_pinned":
            parts.append(KeepPinned())
        elif name in ("keep_last", "keep_every"):
            if len(args) != 1:
                raise ValueError(f"{name}() takes one integer")
            n = _int(args[0], name)
            parts.append(KeepLast(n) if name == "keep_last" else KeepEvery(n))
        else:
            parts.append(_keep_best(args))
    return parts


def _keep_best(args: list[str]) -> KeepBest:
    if not args:
        raise ValueError("keep_best() needs N")
    n = _int(args[0], "keep_best")
    metric, lower = "score", None
    for a in args[1:]:
        key, _, val = a.partition("=")
        key = key.strip()
        if key == "metric" and val:
            metric = val.strip().strip("'\"")
        elif key in ("lower_better", "higher_better") and not val:
            lower = key == "lower_better"
        elif key == "lower_better":
            lower = val.strip().lower() in ("true", "1")
        else:
            raise ValueError(f"keep_best(): unknown argument {a!r}")
    if lower is None:
        raise ValueError("keep_best() needs lower_better or higher_better")
    return KeepBest(n, metric=metric, lower_better=lower)


__all__ = ["parse_policy", "policy_of_reason", "to_flags"]
