"""What the ``ckptdb`` command prints: tables, progress bars, JSON, one-line errors, exit codes.

On a terminal, tables and progress bars are drawn by `rich <https://rich.readthedocs.io>`_, in
colour (``NO_COLOR`` turns colour off; ``FORCE_COLOR`` or ``TTY_COMPATIBLE=1`` makes any output
count as a terminal). Anything else (a pipe, a file, a test's capture) gets plain, stable text
that scripts may parse: space-aligned columns under a dashed rule, no escape sequences, no bars.
``--json`` output is the same everywhere.

Errors are one line on stderr, ``ckptdb: error: <what> (hint: <what to do>)``, and every command
returns one of the exit codes below (documented in docs/cli.md).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import IO, Any

from rich import box
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from ckptdb import errors

#: The command did what was asked and found nothing wrong.
EXIT_OK = 0
#: The command ran and found something wrong: damage (verify, gc), a failed deletion (prune), a
#: schema not at the newest revision (db current), no such pin (unpin).
EXIT_FINDINGS = 1
#: Bad usage or refused: bad arguments, no/invalid/unreachable catalog, unknown run/step/pin, a
#: refused write or query, an unavailable (unmounted?) checkpoint directory, a corrupt file.
EXIT_USAGE = 2
#: Interrupted (Ctrl-C).
EXIT_INTERRUPTED = 130
#: The reader of the output went away (``ckptdb ls | head -1``).
EXIT_BROKEN_PIPE = 141

#: Colours of the words in status columns (state, action, result), on a terminal only.
STATUS_STYLES = {
    "ok": "green",
    "committed": "green",
    "keep": "green",
    "pending": "yellow",
    "deleting": "yellow",
    "busy": "yellow",
    "extra": "yellow",
    "corrupt": "bold red",
    "missing": "bold red",
    "delete": "red",
    "deleted": "dim",
    "aborted": "dim",
    "superseded": "dim",
}
STATUS_COLUMNS = frozenset({"state", "action", "result", "from", "to"})


def console(
    stream: IO[str] | None = None, *, force_terminal: bool | None = None, no_color: bool | None = None
) -> Console:
    """A rich console on ``stream`` (default: the current ``sys.stdout``), highlighting off."""
    return Console(
        file=stream if stream is not None else sys.stdout,
        highlight=False,
        soft_wrap=True,
        force_terminal=force_terminal,
        no_color=no_color,
    )


def is_terminal(stream: IO[str] | None = None) -> bool:
    """Whether ``stream`` gets rich output (a terminal, or forced by FORCE_COLOR / TTY_COMPATIBLE)."""
    return console(stream).is_terminal


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def status_style(text: str) -> str | None:
    """The colour of a status cell, by its first word (``"delete, keep model"`` -> delete's)."""
    word = text.split(" ", 1)[0].rstrip(",").lower()
    return STATUS_STYLES.get(word)


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def local_time(t: datetime | None) -> str:
    return "-" if t is None else t.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _text(c: Any) -> str:
    return "-" if c is None else str(c)


def plain_table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    """Space-aligned columns under a dashed rule: the stable format of piped output."""
    cells = [[str(h) for h in headers]] + [[_text(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def print_table(
    rows: Sequence[Sequence[Any]], headers: Sequence[str], *, status_columns: frozenset[str] = STATUS_COLUMNS
) -> None:
    """A table on stdout: rich and coloured on a terminal, :func:`plain_table` otherwise."""
    con = console()
    if not con.is_terminal:
        print(plain_table(rows, headers))
        return
    t = Table(box=box.SIMPLE_HEAD, header_style="bold", show_edge=False, pad_edge=False)
    for h in headers:
        t.add_column(h, overflow="fold")
    status = [h in status_columns for h in headers]
    for r in rows:
        t.add_row(
            *(Text(_text(c), style=(status_style(_text(c)) or "") if s else "") for c, s in zip(r, status, strict=True))
        )
    con.print(t)


def echo(text: str = "", *, style: str | None = None, err: bool = False) -> None:
    """One line of text (never parsed as markup); ``style`` applies on a terminal only."""
    stream = sys.stderr if err else sys.stdout
    con = console(stream)
    if style and con.is_terminal:
        con.print(Text(text, style=style))
    else:
        print(text, file=stream)


def _json_default(o: object) -> Any:
    if isinstance(o, datetime):
        return o.isoformat()
    return str(o)


def print_json(obj: Any) -> None:
    """``obj`` as indented JSON on stdout (datetimes as ISO 8601), the same on a terminal or a pipe."""
    print(json.dumps(obj, indent=2, default=_json_default))


# -- errors ----------------------------------------------------------------------------------


def one_line(message: str) -> str:
    return "; ".join(part.strip() for part in str(message).splitlines() if part.strip())


def hint_for(exc: BaseException, command: str = "") -> str:
    """What to do about ``exc``: the second half of the error line."""
    help_ = f"`ckptdb {command} --help`" if command else "`ckptdb --help`"
    if isinstance(exc, errors.CheckpointDirUnavailableError):
        return "is its filesystem mounted? (`findmnt DIR`); nothing was changed"
    if isinstance(exc, errors.SchemaOutOfDateError):
        return "back up a shared catalog, then run `ckptdb db upgrade`"
    if isinstance(exc, errors.CatalogUnavailableError):
        return "check --url / --dir / $CKPTDB_URL and that the database server is running"
    if isinstance(exc, errors.CatalogError) and "read-only" in str(exc):
        return "`ckptdb sql` runs one read-only query (SELECT / WITH); see docs/sql.md"
    if isinstance(exc, errors.CatalogError):
        return "`ckptdb db current` checks the catalog; see docs/cli.md"
    if isinstance(exc, errors.CheckpointNotFoundError):
        return "`ckptdb ls` lists the runs, `ckptdb ls RUN --all` a run's checkpoints"
    if isinstance(exc, errors.CheckpointCorruptError):
        return "`ckptdb verify RUN` reports every damaged file"
    if isinstance(exc, errors.UnsupportedCheckpointError):
        return "see docs/cli.md for what this command supports"
    if isinstance(exc, OSError):
        return "check the path and its permissions"
    return f"see {help_}"


def print_error(what: str, hint: str) -> None:
    """``ckptdb: error: <what> (hint: <hint>)``: one line on stderr."""
    line = f"ckptdb: error: {one_line(what)} (hint: {one_line(hint)})"
    con = console(sys.stderr)
    if con.is_terminal:
        con.print(Text.assemble(("ckptdb: error:", "bold red"), line.removeprefix("ckptdb: error:")))
    else:
        print(line, file=sys.stderr)


# -- progress --------------------------------------------------------------------------------


class RateColumn(ProgressColumn):
    """Items per second (checkpoints, runs): the throughput of prune and gc."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        if speed is None and task.finished_time:  # one item: no rate samples, but a duration
            speed = task.completed / task.finished_time
        if speed is None:
            return Text(f"? {self.unit}/s", style="progress.data.speed")
        return Text(f"{speed:.1f} {self.unit}/s", style="progress.data.speed")


def _progress(stream: IO[str], force: bool | None, *columns: str | ProgressColumn) -> Progress:
    # a bar asked for on a pipe or a file (verify --progress) is drawn, but without colour
    con = console(stream, force_terminal=force, no_color=True if force and not _isatty(stream) else None)
    return Progress(*columns, console=con, transient=False, refresh_per_second=8)


class ByteProgress:
    """The verify bar: bytes read, percentage, throughput (MB/s) and time left; a label per checkpoint.

    Call order: ``ByteProgress(label, total_bytes)`` -> (``set_label()`` | ``__call__(n)``)* -> ``close()``.
    """

    def __init__(self, label: str, total_bytes: int, *, stream: IO[str] | None = None, force: bool | None = None):
        self._p = _progress(
            stream if stream is not None else sys.stderr,
            force,
            TextColumn(f"{label}"),
            BarColumn(),
            TaskProgressColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.description}"),
        )
        self._task = self._p.add_task("", total=max(total_bytes, 1))
        self._p.start()

    def set_label(self, label: str) -> None:
        self._p.update(self._task, description=label[-40:])

    def __call__(self, n: int) -> None:
        self._p.advance(self._task, n)

    def close(self) -> None:
        self._p.stop()


def step_progress(
    label: str, unit: str, *, stream: IO[str] | None = None, force: bool | None = None
) -> Callable[[int, int, str], None] | None:
    """A ``(done, total, what)`` callback for prune (checkpoints) and gc (runs), or None.

    On a terminal: a rich bar with count, throughput and time left, closed at ``done == total``.
    Elsewhere (a pipe, a log file): None, no progress at all; the command's summary says what was done.
    """
    out = stream if stream is not None else sys.stderr
    if not (force or console(out).is_terminal):
        return None
    state: dict[str, Any] = {}

    def show(done: int, total: int, what: str) -> None:
        p: Progress | None = state.get("p")
        if p is None:
            p = _progress(
                out,
                force,
                TextColumn(label),
                BarColumn(),
                MofNCompleteColumn(),
                RateColumn(unit),
                TextColumn("eta"),
                TimeRemainingColumn(),
                TextColumn("{task.description}"),
            )
            state["p"], state["task"], state["done"] = p, p.add_task(what, total=total), 0
            p.start()
        p.update(state["task"], total=total, description=what[-40:])
        p.advance(state["task"], done - state["done"])
        state["done"] = done
        if done >= total:
            p.stop()
            state.clear()

    return show
