"""Crash torture: SIGKILL a writer process at random points, reopen, check every invariant.

A writer process (forked from this one, or a fresh interpreter with ``--exec``) loops over random
operations: save a new step, overwrite a committed step, begin-and-abort, delete a step, apply
``keep_last`` / ``keep_best`` retention. Before each operation it appends its intention to a journal
file (fsync'd), and after the operation returns it appends the outcome. This process SIGKILLs it after
a random delay, then opens the checkpoint directory again (running recovery) and checks:

1. no debris: no ``step_*.tmp-*`` / ``.old-*`` / ``.trash-*`` directory, no pending catalog row;
2. every committed checkpoint has all its files with matching sizes and digests (``ckptdb.verify``),
   and no step directory exists that the catalog does not account for;
3. ``load_last_checkpoint()`` (with ``fallback=False``) returns the newest committed step;
4. nothing committed and not deliberately deleted is gone: every step the journal says was committed
   (and whose deletion was not under way) is committed, with the content of its last committed save;
   a step whose save was interrupted is either absent (or its previous copy) or the new save, whole.

Usage::

    python scripts/torture.py --kills 200 --dir /tmp/t1                        # SQLite in DIR
    python scripts/torture.py --kills 200 --dir /tmp/t2 --fresh-db \
        --url postgresql+psycopg://postgres@127.0.0.1/postgres     # a new PostgreSQL database
    python scripts/torture.py --kills 100 --dir /tmp/t3 --s3 seaweedfs   # payload on S3, catalog in DIR

With ``--s3 seaweedfs`` (or ``moto``) the script starts that server on loopback, and the run's payload
lives in ``s3://<new bucket>/torture`` (``--dir`` then holds only the journals and the SQLite catalog).
On S3, "debris" is any ``step_<N>.<token>/`` prefix that no committed row (or preserved model) owns,
and any incomplete multipart upload left under the run's prefix.

Exit status 0 when there were no violations. The last line is machine-readable JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
import traceback
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from ckptdb import FileCheckpointManager, LoadOptions, SaveOptions
from ckptdb.catalog.models import State
from ckptdb.catalog.session import dispose_engines, masked
from ckptdb.errors import CheckpointError
from ckptdb.retention import KeepBest, KeepLast, plan
from ckptdb.verify import verify

RUN = "torture"


def make_state(seed: int, size: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model": {"w": torch.randn(size, size, generator=g), "b": torch.randn(size, generator=g)},
        "optimizer": {"state": {0: {"m": torch.randn(size, generator=g)}}, "param_groups": [{"lr": 0.1}]},
        "seed": seed,
        "size": size,
    }


def same_state(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and set(a) == set(b) and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        if not isinstance(b, list | tuple) or len(a) != len(b):
            return False
        return all(same_state(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


# -- the writer ------------------------------------------------------------------------------


class Journal:
    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def log(self, **rec: Any) -> None:
        os.write(self.fd, (json.dumps(rec) + "\n").encode())
        os.fsync(self.fd)


def writer(directory: Path | str, url: str, journal_path: Path, seed: int) -> None:
    """Loop forever over random operations, journaling each intention and outcome."""
    rng = random.Random(seed)
    j = Journal(journal_path)
    j.log(op="start", pid=os.getpid())
    m = FileCheckpointManager(directory, catalog=url, run=RUN, save_options=SaveOptions(fsync=True))
    j.log(op="opened")
    while True:
        steps = m.get_step_numbers()
        r = rng.random()
        if len(steps) > 6:
            r = 0.55 + 0.45 * r  # too many: delete or prune
        if r < 0.40 or not steps:
            step = (max(steps) if steps else 0) + rng.randint(1, 3)
            kind = "save"
        elif r < 0.50:
            step = rng.choice(steps)
            kind = "overwrite"
        elif r < 0.55:
            step = (max(steps) if steps else 0) + 1
            kind = "abort"
        elif r < 0.75:
            kind = "delete"
            step = rng.choice(steps)
        else:
            kind = "retention"
            step = -1
        if kind in ("save", "overwrite", "abort"):
            s_seed = rng.randrange(1 << 30)
            size = rng.choice([8, 64, 256, 512])
            score = rng.choice([rng.random(), rng.random(), float("nan"), float("inf")])
            j.log(op="begin", kind=kind, step=step, seed=s_seed)
            try:
                m.begin_checkpoint(step, overwrite=kind == "overwrite")
                m.save_state(make_state(s_seed, size))
                m.save_score(score)
                if kind == "abort":
                    m.abort_checkpoint()
                    j.log(op="aborted", step=step)
                else:
                    m.commit_checkpoint()
                    j.log(op="committed", step=step, seed=s_seed)
            except CheckpointError as e:
                j.log(op="failed", step=step, error=str(e))
                m.close()
        elif kind == "delete":
            j.log(op="delete", steps=[step])
            m.delete_checkpoint(step)
            j.log(op="deleted", steps=[step])
        else:
            policy = rng.choice([KeepLast(rng.randint(1, 4)), KeepBest(rng.randint(1, 3), lower_better=True)])
            would = plan(m.catalog, m.run.id, policy).delete
            j.log(op="delete", steps=would, policy=str(policy))
            deleted = m.apply_retention(policy)
            j.log(op="deleted", steps=deleted)


# -- the checker -----------------------------------------------------------------------------


@dataclass
class Model:
    """What must be true of the catalog, from the journals of every writer so far."""

    committed: dict[int, int] = field(default_factory=dict)  # step -> seed of its last committed save

    def replay(self, records: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, set[int]]:
        """Apply finished operations; return the unfinished save (if any) and unfinished deletions."""
        open_save: dict[str, Any] | None = None
        deleting: set[int] = set()
        for rec in records:
            op = rec["op"]
            if op == "begin":
                open_save = rec
            elif op == "committed":
                self.committed[rec["step"]] = rec["seed"]
                open_save = None
            elif op in ("aborted", "failed"):
                open_save = None
            elif op == "delete":
                deleting = set(rec["steps"])
            elif op == "deleted":
                for s in rec["steps"]:
                    self.committed.pop(s, None)
                deleting = set()
        return open_save, deleting


def read_journal(path: Path) -> list[dict[str, Any]]:
    out = []
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a torn last line: the write was never acknowledged
    return out


def wait_for_dead_sessions(url: str) -> bool:
    """PostgreSQL: wait until the server has dropped the killed writer's sessions.

    A SIGKILLed client's last transaction can still complete on the server after the client died
    (its COMMIT was already sent). ckptdb's state moves are conditional, so such a late transaction
    is harmless, but the checker must judge the state after it, not race it. The torture database is
    used by nobody else, so any other session in it belongs to the dead writer. Returns True if one
    was seen.
    """
    if not url.startswith("postgresql"):
        return False
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    seen = False
    try:
        with engine.connect() as c:
            for _ in range(600):
                n = c.execute(
                    text(
                        "SELECT count(*) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                    )
                ).scalar()
                if not n:
                    break
                seen = True
                c.rollback()
                time.sleep(0.05)
    finally:
        engine.dispose()
    return seen


def check(directory: Path | str, url: str, model: Model, records: list[dict[str, Any]]) -> list[str]:
    """Reopen (recovery runs) and check the invariants; update ``model`` with what was observed."""
    v: list[str] = []
    open_save, deleting = model.replay(records)
    m = FileCheckpointManager(directory, catalog=url, run=RUN, load_options=LoadOptions(fallback=False))
    rows = m.get_checkpoints()
    if isinstance(directory, Path):
        names = sorted(p.name for p in directory.iterdir())
        debris = [n for n in names if any(k in n for k in (".tmp-", ".old-", ".trash-"))]
    else:  # an object store: every listed prefix must belong to a live row; no upload may be left
        store: Any = m.store
        names = store.list_entries()
        owned = {
            c.directory
            for c in rows
            if c.state == State.COMMITTED.value or (c.state == State.DELETED.value and c.model_preserved)
        }
        debris = [n for n in names if n not in owned]
        root = store.location.prefix + "/"
        debris += [f"incomplete upload {k}" for k in store.client.list_uploads(store.bucket, root)]
        names = [f"step_{c.step_nr}" for c in rows if c.directory in names and c.directory in owned]
    if debris:
        v.append(f"debris after recovery: {debris}")
    pending = [c.step_nr for c in rows if c.state == State.PENDING.value]
    if pending:
        v.append(f"pending rows after recovery: {pending}")
    damaged = [(c.step_nr, c.state) for c in rows if c.state in (State.CORRUPT.value, State.MISSING.value)]
    if damaged:
        v.append(f"damaged checkpoints: {damaged}")
    committed = set(m.get_step_numbers())
    preserved = {c.step_nr for c in rows if c.state == State.DELETED.value and c.model_preserved}
    dirs = {int(n[5:]) for n in names if n.startswith("step_") and n[5:].isdigit()}
    if dirs - committed - preserved:
        v.append(f"step directories the catalog does not account for: {sorted(dirs - committed - preserved)}")
    if committed - dirs:
        v.append(f"committed steps without a directory: {sorted(committed - dirs)}")
    report = verify(m.catalog, run=RUN)
    for r in report.bad:
        v.append(f"verify: step {r.step_nr} {r.result}: {[p.describe() for p in r.problems]}")
    must = set(model.committed) - deleting
    if must - committed:
        v.append(f"committed steps lost: {sorted(must - committed)} (journal: {sorted(model.committed)})")
    allowed = set(model.committed) | ({open_save["step"]} if open_save and open_save["kind"] != "abort" else set())
    if committed - allowed:
        v.append(f"steps committed that were never saved: {sorted(committed - allowed)}")
    for step in sorted(committed):
        seeds = set()
        if step in model.committed:
            seeds.add(model.committed[step])
        if open_save is not None and open_save["step"] == step and open_save["kind"] != "abort":
            seeds.add(open_save["seed"])
        try:
            state = m.load_checkpoint(step)
        except CheckpointError as e:
            v.append(f"step {step}: load failed: {e}")
            continue
        if state.get("seed") not in seeds or not same_state(state, make_state(state["seed"], state["size"])):
            v.append(f"step {step}: content of seed {state.get('seed')} is not one of {sorted(seeds)}")
        else:
            model.committed[step] = state["seed"]
    for step in list(model.committed):
        if step not in committed:
            model.committed.pop(step)  # deleted by the interrupted deletion (allowed above)
    if committed:
        try:
            last, _ = m.load_last_checkpoint()
            if last != max(committed):
                v.append(f"load_last_checkpoint returned {last}, newest committed is {max(committed)}")
        except CheckpointError as e:
            v.append(f"load_last_checkpoint failed: {e}")
    m.close()
    dispose_engines()
    return v


def kill_point(records: list[dict[str, Any]]) -> str:
    """Where the writer was when it died (the last journal record's operation)."""
    if not records:
        return "starting"
    last = records[-1]
    op = last["op"]
    if op == "start":
        return "open+recovery"
    if op == "begin":
        return f"{last['kind']} (begin..commit)"
    if op == "delete":
        return "retention" if "policy" in last else "delete"
    return "between operations"


def spawn(args: argparse.Namespace, target: Path | str, journal: Path, seed: int) -> int:
    """Start the writer; returns its pid."""
    if args.exec:
        cmd = [sys.executable, __file__, "--child", "--dir", str(args.dir), "--target", str(target), "--url", args.url]
        cmd += ["--journal", str(journal), "--seed", str(seed)]
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid
    pid = os.fork()
    if pid == 0:  # the writer
        code = 0
        try:
            os.setsid()
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            writer(target, args.url, journal, seed)
        except BaseException:  # noqa: BLE001 - report and exit without running the parent's cleanup
            traceback.print_exc()
            code = 3
        os._exit(code)
    return pid


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, required=True, help="checkpoint directory (created)")
    p.add_argument("--url", help="catalog URL (default: SQLite inside --dir)")
    p.add_argument("--fresh-db", action="store_true", help="--url names a PostgreSQL server: use a new database")
    p.add_argument("--kills", type=int, default=200)
    p.add_argument("--max-delay", type=float, default=1.0, help="kill after uniform(0, this) seconds")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--exec", action="store_true", help="start each writer as a fresh interpreter (slower)")
    p.add_argument("--verbose", action="store_true", help="show recovery reports")
    p.add_argument(
        "--s3",
        choices=["seaweedfs", "moto"],
        help="put the payload in a new bucket on this S3 server, started on loopback (catalog stays in --dir)",
    )
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--target", help=argparse.SUPPRESS)  # the child's checkpoint_dir (an s3:// URL kept whole)
    p.add_argument("--journal", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.dir = args.dir.resolve()
    if args.child:
        writer(args.target or args.dir, args.url, args.journal, args.seed)
        return 0
    torch.set_num_threads(1)
    if not args.verbose:
        logging.getLogger("ckptdb").setLevel(logging.ERROR)
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    args.dir.mkdir(parents=True, exist_ok=True)
    admin, dbname = None, None
    if args.url is None:
        args.url = f"sqlite:///{args.dir / 'catalog.db'}"
    elif args.fresh_db:
        from sqlalchemy import create_engine, text
        from sqlalchemy.engine import make_url

        admin = create_engine(args.url, isolation_level="AUTOCOMMIT")
        dbname = f"ckptdb_torture_{uuid.uuid4().hex[:10]}"
        with admin.connect() as c:
            c.execute(text(f'CREATE DATABASE "{dbname}"'))
        args.url = make_url(args.url).set(database=dbname).render_as_string(hide_password=False)
    server = None
    target: Path | str = args.dir
    if args.s3:
        from ckptdb.testing.s3servers import start

        server = start(args.s3)
        os.environ.update(server.env())  # the writers (forked) and the checker find it like a user would
        target = f"s3://{server.new_bucket()}/torture"
    journals = args.dir.parent / f"{args.dir.name}.journals"
    journals.mkdir(exist_ok=True)
    model = Model()
    violations: list[str] = []
    points: Counter[str] = Counter()
    early_exits = 0
    dead_sessions = 0  # kills after which the server still had the dead writer's session
    t0 = time.monotonic()
    print(f"torture: {args.kills} kills, seed {seed}, catalog {masked(args.url)}, dir {target}", flush=True)
    try:
        for i in range(args.kills):
            journal = journals / f"{i:05d}.jsonl"
            pid = spawn(args, target, journal, rng.randrange(1 << 30))
            if args.exec:  # a fresh interpreter: start the clock once it has imported everything
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline and not (journal.exists() and journal.stat().st_size):
                    time.sleep(0.01)
            time.sleep(rng.uniform(0.0, args.max_delay))
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _, status = os.waitpid(pid, 0)
            if not (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL):
                early_exits += 1
                violations.append(f"kill {i}: the writer exited by itself (status {status}) before the kill")
            records = read_journal(journal)
            points[kill_point(records)] += 1
            if wait_for_dead_sessions(args.url):
                dead_sessions += 1
            try:
                found = check(target, args.url, model, records)
            except Exception as e:  # noqa: BLE001 - a crash of the checker is a violation too
                found = [f"checker raised {type(e).__name__}: {e}"]
                dispose_engines()
            violations += [f"kill {i}: {x}" for x in found]
            if found:
                print(f"kill {i}: VIOLATIONS {found}", flush=True)
            if (i + 1) % 25 == 0:
                print(
                    f"  {i + 1} kills, {len(violations)} violations, {len(model.committed)} committed steps, "
                    f"{time.monotonic() - t0:.0f}s",
                    flush=True,
                )
    finally:
        dispose_engines()
        if server is not None:
            server.stop()
        if admin is not None and dbname is not None:
            from sqlalchemy import text

            with admin.connect() as c:
                c.execute(text(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)'))
            admin.dispose()
    elapsed = time.monotonic() - t0
    for x in violations:
        print(x)
    summary = {
        "kills": args.kills,
        "violations": len(violations),
        "seed": seed,
        "backend": args.url.split(":", 1)[0],
        "store": args.s3 or "local",
        "seconds": round(elapsed, 1),
        "kill_points": dict(points.most_common()),
        "final_committed_steps": sorted(model.committed),
        "early_exits": early_exits,
        "dead_writer_sessions_waited_for": dead_sessions,
    }
    print(json.dumps(summary))
    return 0 if not violations else 1


if __name__ == "__main__":
    sys.exit(main())
