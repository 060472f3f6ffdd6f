"""The ``ckptdb`` command: thin (parse, call the library, print). ``--json`` for scripts.

Every command takes ``--url`` (default: env ``CKPTDB_URL``) or ``--dir DIR`` (the SQLite catalog
inside a checkpoint directory). Exit status: 0 ok, 1 something is wrong (a check failed),
2 bad usage or an error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from ckptdb.catalog import Catalog, migrate
from ckptdb.catalog.session import masked, sqlite_url
from ckptdb.errors import CheckpointError
from ckptdb.storage import layout

Handler = Callable[[argparse.Namespace], int]


def _url(args: argparse.Namespace) -> str:
    if getattr(args, "url", None):
        return str(args.url)
    if getattr(args, "dir", None):
        return sqlite_url(Path(args.dir).expanduser().resolve() / layout.CATALOG_FILE)
    env = os.environ.get("CKPTDB_URL")
    if env:
        return env
    raise CheckpointError(
        "no catalog given: pass --url URL (e.g. postgresql+psycopg://user@host/db), --dir CHECKPOINT_DIR, "
        "or set CKPTDB_URL"
    )


def _human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _time(t: datetime | None) -> str:
    return "-" if t is None else t.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _json_default(o: object) -> Any:
    if isinstance(o, datetime):
        return o.isoformat()
    return str(o)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=_json_default))


# -- commands --------------------------------------------------------------------------------


def cmd_ls(args: argparse.Namespace) -> int:
    """List runs, or one run's checkpoints."""
    cat = Catalog(_url(args), create=False)
    if not args.run:
        runs = cat.list_runs()
        if args.json:
            _print_json(runs)
        else:
            print(
                table(
                    [
                        (r["run"], r["committed"], r["last_step"], _human_bytes(r["bytes"]), _time(r["created_at"]))
                        for r in runs
                    ],
                    ["run", "committed", "last step", "size", "created"],
                )
            )
        return 0
    run = cat.get_run(args.run)
    states = None if args.all else ["committed", "pending", "deleting", "corrupt", "missing"]
    ckpts = cat.checkpoints(run.id, states=states)
    if args.json:
        _print_json(
            [
                {
                    "step": c.step_nr,
                    "state": c.state,
                    "scores": c.scores,
                    "bytes": c.total_bytes,
                    "files": c.file_count,
                    "created_at": c.created_at,
                    "committed_at": c.committed_at,
                    "deleted_at": c.deleted_at,
                    "delete_reason": c.delete_reason,
                    "model_preserved": c.model_preserved,
                    "verify_result": c.verify_result,
                }
                for c in ckpts
            ]
        )
        return 0
    print(f"run {run.name}  ({run.checkpoint_dir})")
    rows = []
    for c in ckpts:
        scores = ", ".join(f"{k}={v:.6g}" if v is not None else f"{k}=None" for k, v in sorted(c.scores.items()))
        rows.append(
            (
                c.step_nr,
                c.state + (" (model kept)" if c.model_preserved else ""),
                scores or "-",
                _human_bytes(c.total_bytes),
                c.file_count,
                _time(c.committed_at or c.created_at),
            )
        )
    print(table(rows, ["step", "state", "scores", "size", "files", "time"]))
    return 0


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    """Create the catalog schema, or upgrade it to this ckptdb's revision."""
    url = _url(args)
    before = migrate.current(url)
    migrate.upgrade(url, args.revision)
    after = migrate.current(url)
    print(f"catalog {masked(url)}: {before or '(empty)'} -> {after}")
    return 0


def cmd_db_downgrade(args: argparse.Namespace) -> int:
    """Downgrade the catalog schema to REVISION (refused when a step cannot be reversed)."""
    url = _url(args)
    before = migrate.current(url)
    migrate.downgrade(url, args.revision)
    print(f"catalog {masked(url)}: {before} -> {migrate.current(url) or '(empty)'}")
    return 0


def cmd_db_current(args: argparse.Namespace) -> int:
    """Print the catalog's schema revision and whether it is the newest this ckptdb knows."""
    url = _url(args)
    cur = migrate.current(url)
    head = migrate.head_revision()
    status = "up to date" if cur == head else ("empty" if cur is None else f"needs `ckptdb db upgrade` (head {head})")
    if args.json:
        _print_json({"current": cur, "head": head, "up_to_date": cur == head})
    else:
        print(f"{cur or '(none)'}  {status}")
    return 0 if cur == head else 1


def cmd_db_history(args: argparse.Namespace) -> int:
    """List the schema revisions this ckptdb ships, oldest first."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(migrate.alembic_config())
    revs = list(script.walk_revisions())[::-1]
    for r in revs:
        print(f"{r.revision}  {(r.doc or '').strip().splitlines()[0] if r.doc else ''}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Re-hash every file of committed checkpoints and compare with the catalog (exit 1 if any is bad)."""
    from ckptdb import verify

    show_bar = sys.stderr.isatty() if args.progress is None else args.progress
    report = verify.verify(
        Catalog(_url(args), create=False),
        run=args.run,
        step_nr=args.step,
        include_damaged=args.all,
        digest=not args.size_only,
        progress_stream=sys.stderr if show_bar else None,
    )
    if args.json:
        _print_json({"ok": report.ok, "checkpoints": [r.as_dict() for r in report.results]})
        return 0 if report.ok else 1
    for r in report.results:
        files = f"{r.files_checked} file{'' if r.files_checked == 1 else 's'}"
        print(f"{r.result.upper():8} {r.run}  step {r.step_nr}  ({files}, {r.state_after})")
        for p in r.problems:
            print(f"         {p.describe()}")
        if r.note:
            print(f"         {r.note}")
    bad = report.bad
    print(f"{len(report.results)} checkpoint(s) verified, {len(bad)} with problems")
    return 0 if report.ok else 1


# -- parser ----------------------------------------------------------------------------------


def _catalog_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--url", help="catalog SQLAlchemy URL (default: $CKPTDB_URL)")
    g.add_argument("--dir", help="a checkpoint directory: use its own SQLite catalog")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ckptdb", description="Transactional PyTorch checkpoints over a SQL catalog.")
    from ckptdb import __version__

    parser.add_argument("--version", action="version", version=f"ckptdb {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("ls", help=cmd_ls.__doc__, description=cmd_ls.__doc__)
    _catalog_args(p)
    p.add_argument("run", nargs="?", help="a run name (omit to list runs)")
    p.add_argument("--all", action="store_true", help="include aborted, superseded and deleted checkpoints")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("verify", help=cmd_verify.__doc__, description=cmd_verify.__doc__)
    _catalog_args(p)
    p.add_argument("run", nargs="?", help="a run name (omit: every run)")
    p.add_argument("--step", type=int, help="only this step")
    p.add_argument("--all", action="store_true", help="also re-check checkpoints already marked corrupt or missing")
    p.add_argument("--size-only", action="store_true", help="compare sizes only (no re-hashing)")
    p.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bar (default: on a TTY)"
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_verify)

    db = sub.add_parser("db", help="schema migrations: upgrade, downgrade, current, history")
    dbsub = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    p = dbsub.add_parser("upgrade", help=cmd_db_upgrade.__doc__, description=cmd_db_upgrade.__doc__)
    _catalog_args(p)
    p.add_argument("--revision", default="head", help="target revision (default: head)")
    p.set_defaults(func=cmd_db_upgrade)
    p = dbsub.add_parser("downgrade", help=cmd_db_downgrade.__doc__, description=cmd_db_downgrade.__doc__)
    _catalog_args(p)
    p.add_argument("revision", help="target revision ('base' removes every table)")
    p.set_defaults(func=cmd_db_downgrade)
    p = dbsub.add_parser("current", help=cmd_db_current.__doc__, description=cmd_db_current.__doc__)
    _catalog_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_db_current)
    p = dbsub.add_parser("history", help=cmd_db_history.__doc__, description=cmd_db_history.__doc__)
    p.set_defaults(func=cmd_db_history)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc: int = args.func(args)
        return rc
    except CheckpointError as e:
        print(f"ckptdb: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
