"""The cookbook of docs/sql.md as the SQL page's clickable examples.

``cookbook.md`` beside this module is a copy of docs/sql.md shipped with the package (a test
checks that the two are identical: after editing docs/sql.md, ``cp docs/sql.md ckptdb/ui/cookbook.md``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

_FENCE = re.compile(r"^```sql(?: (sqlite|postgresql))?\s*$")


@dataclass(frozen=True, slots=True)
class Example:
    title: str
    sql: str
    dialect: str | None  # None: runs on both backends


def parse(markdown: str) -> list[Example]:
    """Every ```sql block after the ``## Cookbook`` heading, titled by its heading and lead-in line."""
    out: list[Example] = []
    heading, lead = "", ""
    para: list[str] = []
    count: dict[str, int] = {}
    lines = markdown.split("## Cookbook", 1)[-1].splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        m = _FENCE.match(line)
        if line.startswith("### "):
            heading, para, lead = line[4:].strip(), [], ""
        elif m:
            body: list[str] = []
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            about = " ".join(para) or lead
            count[heading] = count.get(heading, 0) + 1
            title = f"{heading} — {about.rstrip(':')}" if about else heading
            if not about and count[heading] > 1:
                title += f" ({count[heading]})"
            out.append(Example(title, "\n".join(body).strip(), m.group(1)))
            para, lead = [], "" if not m.group(1) else about  # a dialect pair shares its lead-in
        elif line.strip():
            para.append(line.strip())
        else:
            lead, para = (" ".join(para) or lead), []
        i += 1
    return out


@cache
def _all() -> tuple[Example, ...]:
    return tuple(parse((Path(__file__).resolve().parent / "cookbook.md").read_text(encoding="utf-8")))


def examples(backend: str, *, run: str | None = None) -> list[Example]:
    """The examples that run on ``backend``, with the cookbook's ``'exp1'`` replaced by ``run``."""
    quoted = "'" + run.replace("'", "''") + "'" if run else None
    return [
        Example(e.title, e.sql.replace("'exp1'", quoted) if quoted else e.sql, e.dialect)
        for e in _all()
        if e.dialect in (None, backend)
    ]


__all__ = ["Example", "examples", "parse"]
