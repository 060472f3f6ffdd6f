"""The ``ckptdb`` command: thin (parse, call the library, print). ``--json`` for scripts.

Every command takes ``--url`` (default: env ``CKPTDB_URL``) or ``--dir DIR`` (the SQLite catalog
inside a checkpoint directory). Rendering (rich tables and progress bars on a terminal, plain text
when piped, JSON, one-line errors) and the exit codes live in :mod:`ckptdb.cli_output`: 0 ok,
1 something is wrong (a check found damage, a deletion failed), 2 bad usage or refused.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

from ckptdb import cli_output as out
from ckptdb.catalog import Catalog, migrate
from ckptdb.catalog.session import masked, scrub, sqlite_url
from ckptdb.errors import CheckpointDirUnavailableError, CheckpointError, InvalidArgumentError
from ckptdb.storage import layout
from ckptdb.storage.location import LocalLocation, ObjectLocation, parse_location, require_shared_catalog

Handler = Callable[[argparse.Namespace], int]


def _url(args: argparse.Namespace) -> str:
    if getattr(args, "url", None):
        return str(args.url)
    if getattr(args, "dir", None):
        loc = parse_location(args.dir, what="--dir")
        if isinstance(loc, ObjectLocation):  # no catalog of its own: the shared one, or a clear error
            require_shared_catalog(loc, os.environ.get("CKPTDB_URL"))
            return os.environ["CKPTDB_URL"]
        return sqlite_url(loc.path / layout.CATALOG_FILE)
    env = os.environ.get("CKPTDB_URL")
    if env:
        return env
    raise InvalidArgumentError(
        "no catalog given: pass --url URL (e.g. postgresql+psycopg://user@host/db), --dir CHECKPOINT_DIR, "
        "or set CKPTDB_URL"
    )


_human_bytes = out.human_bytes
_time = out.local_time
_print_json = out.print_json
table = out.plain_table  # the plain format of piped output (kept for callers of ckptdb.cli.table)


# -- commands --------------------------------------------------------------------------------


def cmd_ls(args: argparse.Namespace) -> int:
    """List runs, or one run's checkpoints."""
    cat = Catalog(_url(args), create=False)
    if not args.run:
        runs = cat.list_runs()
        if args.json:
            _print_json(runs)
        else:
            out.print_table(
                [
                    (r["run"], r["committed"], r["last_step"], _human_bytes(r["bytes"]), _time(r["created_at"]))
                    for r in runs
                ],
                ["run", "committed", "last step", "size", "created"],
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
    out.print_table(rows, ["step", "state", "scores", "size", "files", "time"])
    return 0


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    """Create the catalog schema, or upgrade it to this ckptdb's revision."""
    url = _url(args)
    before = migrate.current(url)
    migrate.upgrade(url, args.revision)
    after = migrate.current(url)
    if args.json:
        _print_json({"catalog": masked(url), "before": before, "after": after})
    else:
        print(f"catalog {masked(url)}: {before or '(empty)'} -> {after}")
    return 0


def cmd_db_downgrade(args: argparse.Namespace) -> int:
    """Downgrade the catalog schema to REVISION (refused when a step cannot be reversed)."""
    url = _url(args)
    before = migrate.current(url)
    migrate.downgrade(url, args.revision)
    after = migrate.current(url)
    if args.json:
        _print_json({"catalog": masked(url), "before": before, "after": after})
    else:
        print(f"catalog {masked(url)}: {before} -> {after or '(empty)'}")
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
    titles = [(r.doc or "").strip().splitlines()[0] if (r.doc or "").strip() else "" for r in revs]
    if args.json:
        head = migrate.head_revision()
        _print_json(
            [
                {"revision": r.revision, "down_revision": r.down_revision, "title": t, "head": r.revision == head}
                for r, t in zip(revs, titles, strict=True)
            ]
        )
        return 0
    for r, t in zip(revs, titles, strict=True):
        print(f"{r.revision}  {t}")
    return 0


# -- analysis, export and import (docs/sql.md) ---------------------------------------------------


def _cell(v: Any) -> Any:
    from decimal import Decimal

    if isinstance(v, Decimal):
        return int(v) if v == v.to_integral_value() else float(v)
    if isinstance(v, bytes | memoryview):
        return bytes(v).hex()
    return v


def cmd_sql(args: argparse.Namespace) -> int:
    """Run one read-only SQL query on the catalog and print the result (the database refuses writes).

    Example: ckptdb sql --dir ckpts "SELECT step_nr, score FROM checkpoint_summary WHERE state = 'committed'"
    """
    import csv

    from ckptdb.analysis import readonly_query

    res = readonly_query(_url(args), args.query, max_rows=args.max_rows or None, timeout_s=args.timeout)
    rows = [[_cell(v) for v in r] for r in res.rows]
    if res.truncated:
        print(f"ckptdb: note: output stopped at --max-rows {args.max_rows}", file=sys.stderr)
    if args.json:
        _print_json([dict(zip(res.columns, r, strict=True)) for r in rows])
    elif args.csv:
        w = csv.writer(sys.stdout, lineterminator="\n")
        w.writerow(res.columns)
        for r in rows:
            w.writerow(["" if v is None else (v.isoformat() if isinstance(v, datetime) else v) for v in r])
    elif res.columns:
        out.print_table(rows, res.columns)
        print(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    """List every run with its checkpoint counts, steps, storage and pins (the run_summary view).

    Example: ckptdb runs --url postgresql+psycopg://me@db/ckpt --json
    """
    from ckptdb.analysis import run_summaries

    runs = [{k: _cell(v) for k, v in r.items()} for r in run_summaries(_url(args))]
    if args.json:
        _print_json(runs)
        return 0
    out.print_table(
        [
            (
                r["run_name"],
                r["committed"],
                r["deleted"],
                r["damaged"],
                r["last_step"],
                _human_bytes(r["bytes_on_disk"]),
                r["pins"],
                str(r["last_committed_at"] or "-")[:19],
            )
            for r in runs
        ],
        ["run", "committed", "deleted", "damaged", "last step", "on disk", "pins", "last commit (UTC)"],
    )
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    """Show one checkpoint: state, files with sizes and digests, scores, metadata and state history.

    Example: ckptdb show --dir ckpts my-run 1000
    """
    from ckptdb.analysis import checkpoint_detail

    d = checkpoint_detail(_url(args), args.run, args.step)
    c = d["checkpoint"]
    if args.json:
        _print_json(
            {
                "run": d["run"],
                "checkpoint_dir": d["checkpoint_dir"],
                "step": c.step_nr,
                "state": c.state,
                "directory": c.directory,
                "created_at": c.created_at,
                "committed_at": c.committed_at,
                "deleted_at": c.deleted_at,
                "delete_reason": c.delete_reason,
                "model_preserved": c.model_preserved,
                "verified_at": c.verified_at,
                "verify_result": c.verify_result,
                "writer": {"host": c.writer_host, "pid": c.writer_pid, "world_size": c.world_size},
                "versions": {"ckptdb": c.ckptdb_version, "torch": c.torch_version},
                "total_bytes": c.total_bytes,
                "scores": c.scores,
                "pins": d["pins"],
                "metadata": c.user_metadata,
                "model_metadata": d["model_metadata"],
                "files": [
                    {
                        "path": f.path,
                        "bytes": f.size_bytes,
                        "hash": f"{f.hash_algorithm}:{f.digest}",
                        "kind": f.kind,
                        "rank": f.rank,
                        "removed": f.removed,
                    }
                    for f in d["files"]
                ],
                "history": d["events"],
                "other_rows": [{"id": r.id, "state": r.state, "created_at": r.created_at} for r in d["other_rows"]],
            }
        )
        return 0
    print(f"run        {d['run']}  ({d['checkpoint_dir']})")
    print(f"step       {c.step_nr}  [{c.state}{', model kept' if c.model_preserved else ''}]  {c.directory}/")
    if c.directory != layout.step_dir_name(c.step_nr):  # shown as stored; never used as a path
        print(f"           unsafe directory in the catalog (not {layout.step_dir_name(c.step_nr)!r}): never followed")
    print(f"committed  {_time(c.committed_at)}   created {_time(c.created_at)}")
    if c.deleted_at is not None:
        print(f"deleted    {_time(c.deleted_at)}   reason: {c.delete_reason}")
    print(f"verified   {_time(c.verified_at)}   result: {c.verify_result or '-'}")
    print(f"writer     {c.writer_host} pid {c.writer_pid}, world size {c.world_size}, ckptdb {c.ckptdb_version}")
    print(f"size       {_human_bytes(c.total_bytes)} in {c.file_count} files")
    if d["pins"]:
        print(f"pins       {', '.join(sorted(d['pins']))}")
    if c.scores:
        print("scores     " + ", ".join(f"{k}={v:.6g}" if v is not None else f"{k}=None" for k, v in c.scores.items()))
    if c.user_metadata:
        print(f"metadata   {json.dumps(c.user_metadata, default=str)}")
    if d["model_metadata"]:
        print(f"model.yaml {json.dumps(d['model_metadata'], default=str)}")
    print("\nfiles")
    out.print_table(
        [
            (f.path, f.size_bytes, f"{f.hash_algorithm}:{f.digest}", f.kind, "removed" if f.removed else "")
            for f in d["files"]
        ],
        ["path", "bytes", "digest", "kind", ""],
    )
    print("\nhistory")
    out.print_table(
        [(_time(e["at"]), e["from_state"] or "-", e["to_state"], e["reason"] or "", e["host"]) for e in d["events"]],
        ["at", "from", "to", "reason", "host"],
    )
    if d["other_rows"]:
        others = ", ".join(f"#{r.id} {r.state}" for r in d["other_rows"])
        print(f"\nother rows for this step: {others}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    """Plot a metric over steps, marking kept, deleted, pinned and corrupt checkpoints (matplotlib).

    Example: ckptdb plot --dir ckpts my-run --metric valid_loss --lower-better -o curve.png
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CheckpointError("`ckptdb plot` needs matplotlib: pip install 'ckptdb[plot]'") from None
    from ckptdb.analysis import plot_metric

    lower = True if args.lower_better else (False if args.higher_better else None)
    pts = plot_metric(_url(args), args.run, args.metric, Path(args.output), lower_better=lower)
    if args.json:
        _print_json({"output": args.output, "run": args.run, "metric": args.metric, "points": len(pts)})
    else:
        print(f"wrote {args.output}: {len(pts)} checkpoints of run {args.run!r} by {args.metric!r}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Write a run's model weights (last, best by a metric, a pinned label or a step) as safetensors.

    Example: ckptdb export --dir ckpts my-run --best valid_loss --lower-better -o model.safetensors
    """
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise CheckpointError("`ckptdb export` needs safetensors: pip install 'ckptdb[export]'") from None
    import torch

    from ckptdb.loader import load_model, locate_model

    source = _url(args)
    select: str | int = "last"
    metric = "score"
    if args.best is not None:
        select, metric = "best", args.best
    elif args.step is not None:
        select = args.step
    elif args.pin is not None:
        select = args.pin
    run = args.run if args.run or not args.dir else _run_name(args)  # --dir: that directory's run
    _, sel = locate_model(source, run=run, select=select, metric=metric, lower_better=args.lower_better)
    state_dict, card = load_model(source, run=run, select=sel.checkpoint.step_nr, verify=not args.no_verify)
    tensors: dict[str, torch.Tensor] = {}
    for k, v in state_dict.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(
                f"model entry {k!r} is a {type(v).__name__}, not a tensor: safetensors cannot hold it"
            )
        tensors[k] = v.detach().to("cpu").contiguous().clone()
    meta = {
        "run": sel.run.name,
        "step": str(sel.checkpoint.step_nr),
        "ckptdb_source_digest": f"{sel.model_file.hash_algorithm}:{sel.model_file.digest}",
    }
    if card is not None:
        meta["model_metadata"] = json.dumps(card, default=str)
    if sel.checkpoint.scores:
        meta["scores"] = json.dumps(sel.checkpoint.scores)
    save_file(tensors, args.output, metadata=meta)
    if args.json:
        _print_json({"output": args.output, "tensors": len(tensors), "metadata": meta})
    else:
        print(f"wrote {args.output}: run {sel.run.name!r} step {sel.checkpoint.step_nr}, {len(tensors)} tensors")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    """Adopt an existing fairseq2 checkpoint directory: hash every step_<N>/ into the catalog (idempotent).

    Example: ckptdb import /data/run7/checkpoints --run run7 --dry-run
    """
    from ckptdb.importer import import_directory

    directory = parse_location(args.directory, what="directory")
    if args.url or args.dir or os.environ.get("CKPTDB_URL"):
        url = _url(args)
    else:
        require_shared_catalog(directory, None)
        assert isinstance(directory, LocalLocation)
        url = sqlite_url(directory.path / layout.CATALOG_FILE)
    rep = import_directory(url, directory, run=args.run, dry_run=args.dry_run, hash_algorithm=args.hash)
    if args.json:
        _print_json(rep.as_dict())
        return 0
    verb = "would adopt" if rep.dry_run else "adopted"
    print(f"run {rep.run}  ({rep.checkpoint_dir})  catalog {masked(url)}")
    if rep.steps:
        out.print_table(
            [(s.step_nr, len(s.files), _human_bytes(s.total_bytes), s.scores.get("score", "-")) for s in rep.steps],
            ["step", "files", "size", "score"],
        )
    print(f"{verb} {len(rep.adopted)} checkpoint(s); {len(rep.already)} already in the catalog")
    for name, why in sorted(rep.skipped.items()):
        print(f"skipped {name}: {why}")
    for w in rep.warnings:
        print(f"warning: {w}", file=sys.stderr)
    return 0


def _add_analysis_commands(sub: Any) -> None:
    fmt = argparse.RawDescriptionHelpFormatter

    def add(name: str, fn: Handler) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=(fn.__doc__ or "").splitlines()[0], description=fn.__doc__, formatter_class=fmt)
        p.set_defaults(func=fn)
        return p

    p = add("sql", cmd_sql)
    _catalog_args(p)
    p.add_argument("query", help="one SQL query (reads only; see docs/sql.md for the views and the security model)")
    p.add_argument("--max-rows", type=int, default=100_000, help="print at most N rows (0: all; default 100000)")
    p.add_argument("--timeout", type=float, default=60.0, help="cancel the query after SECONDS (default 60)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--csv", action="store_true", help="CSV with a header row")
    out.add_argument("--json", action="store_true", help="a JSON list of objects")

    p = add("runs", cmd_runs)
    _catalog_args(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = add("show", cmd_show)
    _catalog_args(p)
    p.add_argument("run", help="run name")
    p.add_argument("step", type=int, help="step number")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = add("plot", cmd_plot)
    _catalog_args(p)
    p.add_argument("run", help="run name")
    p.add_argument("--metric", default="score", help="metric name (default: score)")
    p.add_argument("-o", "--output", required=True, help="image file (.png, .svg, .pdf)")
    d = p.add_mutually_exclusive_group()
    d.add_argument("--lower-better", action="store_true", help="annotate the lowest value as best")
    d.add_argument("--higher-better", action="store_true", help="annotate the highest value as best")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = add("export", cmd_export)
    _catalog_args(p)
    p.add_argument("run", nargs="?", help="run name (default: the catalog's only run, or the directory's run)")
    w = p.add_mutually_exclusive_group()
    w.add_argument("--best", metavar="METRIC", help="the best committed checkpoint by METRIC")
    w.add_argument("--last", action="store_true", help="the newest committed checkpoint (default)")
    w.add_argument("--step", type=int, help="this step")
    w.add_argument("--pin", metavar="LABEL", help="the step pinned under LABEL")
    p.add_argument("--lower-better", action="store_true", help="with --best: lower values are better")
    p.add_argument("--no-verify", action="store_true", help="skip the digest check of the model file")
    p.add_argument("-o", "--output", required=True, help="output .safetensors file")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = add("import", cmd_import)
    _catalog_args(p)
    p.add_argument(
        "directory", help="a fairseq2 checkpoint directory (model.yaml, step_<N>/ ...): a path or s3://bucket/prefix"
    )
    p.add_argument("--run", help="run name (default: the directory's absolute path)")
    p.add_argument("--dry-run", action="store_true", help="show what would be adopted; change nothing")
    p.add_argument("--hash", default="xxh3_128", help="hash algorithm: xxh3_128 (default), sha256, blake3")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def cmd_verify(args: argparse.Namespace) -> int:
    """Re-hash every file of committed checkpoints and compare with the catalog (exit 1 if any is bad)."""
    from ckptdb import verify

    show_bar = out.is_terminal(sys.stderr) if args.progress is None else args.progress

    def bar(total_bytes: int) -> out.ByteProgress:  # --progress draws even when stderr is no terminal
        return out.ByteProgress("verify", total_bytes, force=True if args.progress else None)

    report = verify.verify(
        Catalog(_url(args), create=False),
        run=args.run,
        step_nr=args.step,
        include_damaged=args.all,
        digest=not args.size_only,
        progress=bar if show_bar else None,
        force=args.force,
        remote_checksum=args.remote_checksum,
    )
    if args.json:
        _print_json({"ok": report.ok, "checkpoints": [r.as_dict() for r in report.results]})
        return 0 if report.ok else 1
    for r in report.results:
        files = f"{r.files_checked} file{'' if r.files_checked == 1 else 's'}"
        out.echo(
            f"{r.result.upper():8} {r.run}  step {r.step_nr}  ({files}, {r.state_after})",
            style=out.status_style(r.result),
        )
        for p in r.problems:
            print(f"         {p.describe()}")
        if r.note:
            print(f"         {r.note}")
    bad = report.bad
    print(f"{len(report.results)} checkpoint(s) verified, {len(bad)} with problems")
    return 0 if report.ok else 1


def _run_name(args: argparse.Namespace) -> str:
    """RUN, or with ``--dir`` and no RUN the directory's default run (its absolute path)."""
    if args.run:
        return str(args.run)
    if getattr(args, "dir", None):
        from ckptdb.manager import default_run_name

        return default_run_name(parse_location(args.dir, what="--dir").url)
    raise CheckpointError("name the run: ckptdb COMMAND RUN (see `ckptdb ls` for the runs)")


def cmd_prune(args: argparse.Namespace) -> int:
    """Apply a retention policy to a run: print the plan (why each checkpoint is kept or deleted), then carry it out."""
    from ckptdb import cleanup
    from ckptdb.errors import InvalidArgumentError
    from ckptdb.retention import AnyOf, KeepBest, KeepEvery, KeepLast, Policy

    parts: list[Policy] = []
    try:
        if args.keep_last is not None:
            parts.append(KeepLast(args.keep_last))
        if args.keep_best is not None:
            if args.lower_better is None:  # a wrong guess would delete the best checkpoints
                raise ValueError("--keep-best needs --lower-better or --higher-better (and --metric, default 'score')")
            parts.append(KeepBest(args.keep_best, metric=args.metric or "score", lower_better=bool(args.lower_better)))
        if args.keep_every is not None:
            parts.append(KeepEvery(args.keep_every))
    except ValueError as e:
        raise InvalidArgumentError(str(e)) from None
    if not parts:
        raise InvalidArgumentError("prune needs a policy: --keep-last N, --keep-best N and/or --keep-every K")
    policy: Policy = parts[0] if len(parts) == 1 else AnyOf(*parts)
    cat = Catalog(_url(args), create=False)
    rep = cleanup.prune(
        cat,
        _run_name(args),
        policy,
        dry_run=args.dry_run,
        preserve_model=args.preserve_model,
        progress=None if args.json else out.step_progress("prune", "ckpt"),
    )
    reason = f"pruned by {policy}"
    if args.json:
        _print_json(
            {
                "run": rep.run,
                "policy": rep.policy,
                "dry_run": rep.dry_run,
                "keep": [{"step": s, "reasons": list(rep.plan.reasons[s])} for s in rep.plan.keep],
                "delete": rep.to_delete,
                "model_only": rep.plan.model_only,
                "deleted": rep.deleted,
                "failed": rep.failed,
            }
        )
        return 0 if rep.ok else 1
    model_only = set(rep.plan.model_only)
    to_delete = set(rep.to_delete)

    def action(step: int) -> str:
        if step in model_only:  # what is left of an earlier preserve_model deletion
            return "delete model" if step in to_delete else "keep model"
        if step not in to_delete:
            return "keep"
        return "delete, keep model" if rep.preserve_model else "delete"

    rows = [(s, action(s), rep.plan.reason(s)) for s in rep.plan.keep]
    rows += [(s, action(s), reason if s in to_delete else "model only already") for s in rep.plan.delete]
    print(f"run {rep.run}: policy {rep.policy}" + ("  (dry run: nothing is deleted)" if rep.dry_run else ""))
    out.print_table(sorted(rows), ["step", "action", "reason"])
    if rep.dry_run:
        print(f"would keep {len(rep.plan.keep)}, delete {len(to_delete)}")
        return 0
    gone = sorted(to_delete - set(rep.deleted) - set(rep.failed))
    print(
        f"kept {len(rep.plan.keep)}, deleted {len(rep.deleted)}"
        + (f", {len(gone)} already deleted by another process" if gone else "")
        + (f", {len(rep.failed)} failed (left 'deleting'; run `ckptdb gc`)" if rep.failed else "")
    )
    for step, err in sorted(rep.failed.items()):
        print(f"  step {step}: {err}", file=sys.stderr)
    return 0 if rep.ok else 1


def cmd_gc(args: argparse.Namespace) -> int:
    """Finish deletions, remove dead writers' debris, mark vanished checkpoints missing, list unknown dirs."""
    from ckptdb import cleanup

    cat = Catalog(_url(args), create=False)
    runs = [args.run] if args.run else None
    rep = cleanup.gc(
        cat,
        runs,
        dry_run=args.dry_run,
        remove_unknown=args.remove_unknown,
        progress=None if args.json else out.step_progress("gc", "run"),
        force=args.force,
    )
    fields = [
        "rolled_back",
        "deletions_finished",
        "restored",
        "removed",
        "marked_missing",
        "healed",
        "unsafe_paths",
        "foreign",
        "live_writers",
        "kept",
    ]
    # a refused run (its directory absent or emptied: unmounted?) is an error, not a finding
    rc = 2 if rep.refused else 0 if rep.ok else 1
    for err in rep.refused.values():
        out.print_error(err, out.hint_for(CheckpointDirUnavailableError(err, run="", checkpoint_dir="")))
    if args.json:
        _print_json(
            {
                "dry_run": rep.dry_run,
                "runs": {name: {f: getattr(r, f) for f in fields} for name, r in rep.runs.items()},
                "errors": rep.errors,
                "refused": rep.refused,
            }
        )
        return rc
    would = "would be " if rep.dry_run else ""
    labels = {
        "rolled_back": f"pending checkpoints of dead writers {would}rolled back",
        "deletions_finished": f"interrupted deletions {would}finished",
        "restored": f"checkpoints {would}moved back into place",
        "removed": f"directories {would}removed",
        "marked_missing": f"committed checkpoints whose files vanished, {would}marked missing",
        "healed": f"missing checkpoints whose files are back and verify, {would}committed again",
        "unsafe_paths": "rows whose catalog paths lead outside their step directory (not followed)",
        "foreign": "step directories the catalog does not know" + ("" if args.remove_unknown else " (kept)"),
        "live_writers": "pending checkpoints of live writers (left alone)",
        "kept": "set-aside copies kept (their replacement is not committed-and-verified; see the log)",
    }
    for name, r in rep.runs.items():
        lines = [f"  {labels[f]}: {', '.join(map(str, getattr(r, f)))}" for f in fields if getattr(r, f)]
        if lines:
            print(f"run {name}")
            print("\n".join(lines))
    for name, err in rep.errors.items():
        print(f"run {name}: error: {err}", file=sys.stderr)
    summary = ", ".join(f"{rep.total(f)} {f.replace('_', ' ')}" for f in fields)
    print(f"gc{' (dry run)' if rep.dry_run else ''}: {len(rep.runs)} run(s): {summary}")
    return rc


def cmd_pin(args: argparse.Namespace) -> int:
    """Pin a checkpoint under a label: retention never deletes it (an existing label moves to STEP)."""
    from ckptdb import validation

    cat = Catalog(_url(args), create=False)
    run = cat.get_run(args.run)
    cat.pin(run.id, validation.step_nr(args.step), validation.name(args.label, "pin label"))
    if args.json:
        _print_json({"run": run.name, "step": args.step, "label": args.label, "pinned": True})
    else:
        print(f"run {run.name}: step {args.step} pinned as {args.label!r}")
    return 0


def cmd_unpin(args: argparse.Namespace) -> int:
    """Remove a pin label (exit 1 when the run has no such label)."""
    from ckptdb import validation

    cat = Catalog(_url(args), create=False)
    run = cat.get_run(args.run)
    removed = cat.unpin(run.id, validation.name(args.label, "pin label"))
    if args.json:
        _print_json({"run": run.name, "label": args.label, "removed": removed})
    elif removed:
        print(f"run {run.name}: pin {args.label!r} removed")
    else:
        print(f"run {run.name}: no pin labelled {args.label!r}", file=sys.stderr)
    return out.EXIT_OK if removed else out.EXIT_FINDINGS


def cmd_ui(args: argparse.Namespace) -> int:
    """Serve a read-only web view of the catalog: runs, checkpoints, metric charts, retention plans, SQL.

    Example: ckptdb ui --dir ckpts   (then open http://127.0.0.1:8765/)
    """
    try:
        from ckptdb.ui import serve
    except ImportError as e:
        raise CheckpointError(f"`ckptdb ui` needs its extra: pip install 'ckptdb[ui]' ({e})") from None
    serve(_url(args), host=args.host, port=args.port)
    return 0


# -- parser ----------------------------------------------------------------------------------


def _catalog_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--url", help="catalog SQLAlchemy URL (default: $CKPTDB_URL)")
    g.add_argument(
        "--dir", help="a checkpoint directory: use its own SQLite catalog (s3://bucket/prefix: the run in $CKPTDB_URL)"
    )


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors as one line and a hint (exit 2), like every other error."""

    def error(self, message: str) -> NoReturn:
        out.print_error(message, f"see `{self.prog} --help`")
        sys.exit(out.EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ckptdb", description="Transactional PyTorch checkpoints over a SQL catalog.")
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
        "--remote-checksum",
        action="store_true",
        help="s3:// runs: compare the server's full-object checksums (one HEAD per object) instead of "
        "downloading; objects without one are re-hashed",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="judge a run even when its directory is absent or holds none of its committed checkpoints",
    )
    p.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bar (default: on a TTY)"
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_verify)
    p = sub.add_parser("prune", help=cmd_prune.__doc__, description=cmd_prune.__doc__)
    _catalog_args(p)
    p.add_argument("run", nargs="?", help="the run (default with --dir: that directory's run)")
    p.add_argument("--keep-last", type=int, metavar="N", help="keep the N newest committed checkpoints")
    p.add_argument("--keep-best", type=int, metavar="N", help="keep the N best by --metric")
    p.add_argument("--metric", metavar="NAME", help="the score metric for --keep-best (default: score)")
    order = p.add_mutually_exclusive_group()
    order.add_argument("--lower-better", dest="lower_better", action="store_true", default=None)
    order.add_argument("--higher-better", dest="lower_better", action="store_false")
    p.add_argument("--keep-every", type=int, metavar="K", help="keep every step that is a multiple of K")
    p.add_argument("--dry-run", action="store_true", help="print the plan, delete nothing")
    p.add_argument("--preserve-model", action="store_true", help="keep the model files of deleted checkpoints")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("gc", help=cmd_gc.__doc__, description=cmd_gc.__doc__)
    _catalog_args(p)
    p.add_argument("run", nargs="?", help="one run (default: every run of the catalog)")
    p.add_argument("--dry-run", action="store_true", help="report what would be done, change nothing")
    p.add_argument("--remove-unknown", action="store_true", help="also remove step directories the catalog lacks")
    p.add_argument(
        "--force",
        action="store_true",
        help="judge a run even when its directory is absent or holds none of its committed checkpoints",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_gc)

    p = sub.add_parser("pin", help=cmd_pin.__doc__, description=cmd_pin.__doc__)
    _catalog_args(p)
    p.add_argument("run")
    p.add_argument("step", type=int)
    p.add_argument("--label", required=True, help="e.g. release-1")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_pin)

    p = sub.add_parser("unpin", help=cmd_unpin.__doc__, description=cmd_unpin.__doc__)
    _catalog_args(p)
    p.add_argument("run")
    p.add_argument("--label", required=True)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_unpin)

    db = sub.add_parser("db", help="schema migrations: upgrade, downgrade, current, history")
    dbsub = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    p = dbsub.add_parser("upgrade", help=cmd_db_upgrade.__doc__, description=cmd_db_upgrade.__doc__)
    _catalog_args(p)
    p.add_argument("--revision", default="head", help="target revision (default: head)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_db_upgrade)
    p = dbsub.add_parser("downgrade", help=cmd_db_downgrade.__doc__, description=cmd_db_downgrade.__doc__)
    _catalog_args(p)
    p.add_argument("revision", help="target revision ('base' removes every table)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_db_downgrade)
    p = dbsub.add_parser("current", help=cmd_db_current.__doc__, description=cmd_db_current.__doc__)
    _catalog_args(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_db_current)
    p = dbsub.add_parser("history", help=cmd_db_history.__doc__, description=cmd_db_history.__doc__)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_db_history)
    _add_analysis_commands(sub)

    p = sub.add_parser("ui", help=(cmd_ui.__doc__ or "").splitlines()[0], description=cmd_ui.__doc__)
    _catalog_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1; others get a warning)")
    p.add_argument("--port", type=int, default=8765, help="port (default: 8765)")
    p.set_defaults(func=cmd_ui)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``ckptdb`` command; the exit code (see :mod:`ckptdb.cli_output` and docs/cli.md)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version (0) or a usage error, already printed (2)
        return e.code if isinstance(e.code, int) else out.EXIT_USAGE
    command = " ".join(filter(None, [getattr(args, "command", None), getattr(args, "db_command", None)]))
    try:
        rc: int = args.func(args)
        return rc
    except BrokenPipeError:  # the reader went away (`ckptdb ls | head -1`): stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return out.EXIT_BROKEN_PIPE
    except (CheckpointError, OSError) as e:
        url = getattr(args, "url", None) or os.environ.get("CKPTDB_URL")
        out.print_error(scrub(str(e), url), out.hint_for(e, command))
        return out.EXIT_USAGE
    except KeyboardInterrupt:
        return out.EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
