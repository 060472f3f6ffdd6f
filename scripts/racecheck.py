"""The race checker: every (hook point, second operation) interleaving of two processes.

For each operation A (save, async save, save with retention, overwrite, delete, retention, prune,
recovery on open, gc, verify, import) the checker first runs A once with the hook points of
:mod:`ckptdb._hooks` tracing, to learn which points it passes. Then, for every point p it passed
and every second operation B (recovery on open, gc, prune, retention, verify, a writer of another
step, an overwrite of A's step, a delete of A's step), on a fresh copy of a template run:

1. process A starts and stops at p;
2. process B runs to completion; if it has not finished after ``--block-s`` seconds it is blocked
   (on the run lock A holds, or on SQLite's write lock): A is released and both finish;
3. A is released and finishes;
4. the invariants are checked (:func:`check`): every process's outcome is success or a clear
   ``CheckpointError``, consistent with the catalog; a live writer is never rolled back; two
   processes never both believe they committed the same step; retention never deletes a checkpoint
   committed after its decision; then, after a final recovery (a manager's open, then gc): no
   pending or deleting rows, no debris, every committed row's files exist and verify, every step
   directory belongs to its live row, and the resume point is the newest committed step.

The template run (built once per backend) holds committed steps 10, 15 (marked ``missing`` with
intact files: recovery heals it), 20, 30; step 25 whose overwrite died between its two renames
(``step_25.old-T`` + ``step_25.tmp-T``, pending row); a dead writer's pending step 35; an
interrupted deletion of step 5; trash debris; a foreign (fairseq2) ``step_60`` that import adopts.

Processes A and B are long-lived worker processes of this script (``--worker``), fed one JSON
command per line, so torch is imported once per worker, not per scenario.

Usage::

    python scripts/racecheck.py                         # SQLite, and PostgreSQL when --pg-url given
    python scripts/racecheck.py --pg-url postgresql+psycopg://postgres@127.0.0.1:5432/postgres
    python scripts/racecheck.py --quick                 # a few pairs (tests/checkers/test_racecheck.py)

Prints a JSON summary on the last line; exit 1 when a violation was found. Results and the table
are in docs/reliability.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import time
import traceback
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RUN = "race"
DAMAGED = 12  # the template's step whose rank file was removed behind the catalog's back
KEEP = 2  # the retention policy of every retention/prune operation: KeepLast(KEEP)

# operation -> the step it acts on (None: the whole run)
A_OPS: dict[str, int | None] = {
    "save": 40,
    "save_async": 40,
    "save_retention": 40,
    "overwrite": 30,
    "delete": 20,
    "retention": None,
    "prune": None,
    "recover": None,
    "gc": None,
    "verify": None,
    "import": None,
}
B_OPS = ["recover", "gc", "prune", "retention", "verify", "save_other", "overwrite_same", "delete_same"]
WRITERS = {"save", "save_async", "save_retention", "overwrite", "save_other", "overwrite_same"}
QUICK = [  # (A op, point, B op): the subset `make test` runs
    ("save", "commit.locked#1", "recover"),
    ("save", "publish.after_rename#1", "gc"),
    ("save", "commit.before_lock#1", "delete_same"),
    ("save_async", "commit.start#1", "overwrite_same"),
    ("overwrite", "publish.after_rename_aside#1", "verify"),
    ("overwrite", "commit.after_unlock#1", "recover"),
    ("delete", "delete.after_claim#1", "overwrite_same"),
    ("delete", "finish_delete.after_trash#1", "gc"),
    ("retention", "retention.after_claim#1", "save_other"),
    ("save_retention", "commit.before_retention#1", "retention"),
    ("recover", "reconcile.before_lock#1", "overwrite_same"),
    ("recover", "recovery.before_abort#1", "gc"),
    ("gc", "heal.before_mark#1", "delete_same"),
    ("verify", "verify.after_hash#1", "delete_same"),
    ("import", "import.before_adopt#1", "save_other"),
]


# -- the worker (processes A and B) ---------------------------------------------------------------


def _state(seed: int) -> dict[str, Any]:
    import torch

    return {"model": {"w": torch.full((256,), float(seed))}, "opt": {"lr": 0.1 * seed}, "step": seed}


def _manager(ck: str, url: str, **kw: Any) -> Any:
    from ckptdb import FileCheckpointManager

    return FileCheckpointManager(ck, catalog=url, run=RUN, **kw)


def _op(cmd: dict[str, Any], res: dict[str, Any]) -> None:
    """Run one operation; hooks are enabled once the manager is open (its own recovery is `recover`'s)."""
    from ckptdb import SaveOptions, _hooks, cleanup, importer, verify
    from ckptdb.catalog import Catalog
    from ckptdb.retention import KeepLast

    op, ck, url, step = cmd["op"], cmd["dir"], cmd["url"], cmd.get("step")
    op = {"delete_same": "delete", "save_other": "save", "overwrite_same": "overwrite"}.get(op, op)
    if cmd.get("no_recovery"):  # (building the template)
        from ckptdb import RecoveryOptions

        kw0: dict[str, Any] = {"recovery_options": RecoveryOptions(on_open=False)}
    else:
        kw0 = {}

    def hooks_on() -> None:
        if cmd.get("hook_dir"):
            _hooks.configure(cmd["hook_dir"], cmd.get("stop"))

    if op == "recover":
        hooks_on()
        _manager(ck, url).close()
    elif op in ("gc", "prune", "verify", "import"):
        cat = Catalog(url) if op != "import" else None
        hooks_on()
        if op == "gc":
            assert cat is not None
            rep = cleanup.gc(cat, [RUN])
            if rep.errors or rep.refused:
                res["soft"] = f"gc: {rep.errors or rep.refused}"
        elif op == "prune":
            assert cat is not None
            p = cleanup.prune(cat, RUN, KeepLast(KEEP))
            res["deleted"] = p.deleted
            if p.failed:
                res["soft"] = f"prune failed: {p.failed}"
        elif op == "verify":
            assert cat is not None
            v = verify.verify(cat, run=RUN)
            res["verify"] = {str(r.step_nr): r.result for r in v.results}
        else:
            res["imported"] = importer.import_directory(url, ck, run=RUN).adopted
    elif op in ("retention", "delete"):
        m = _manager(ck, url)
        try:
            hooks_on()
            if op == "retention":
                res["deleted"] = m.apply_retention(KeepLast(KEEP))
            else:
                m.delete_checkpoint(step)
        finally:
            _hooks.configure(None)
            m.close()
    elif op in WRITERS:
        kw: dict[str, Any] = dict(kw0)
        if op == "save_async":
            kw["save_options"] = SaveOptions(blocking=False)
        if op == "save_retention":
            kw["retention"] = KeepLast(KEEP)
        m = _manager(ck, url, **kw)
        try:
            hooks_on()
            m.begin_checkpoint(step, overwrite=op in ("overwrite", "overwrite_same"))
            assert m._open is not None
            res["token"] = m._open.token
            m.save_state(_state(step * 1000 + os.getpid() % 1000))
            m.save_score(float(step))
            m.commit_checkpoint()
            m.wait()
        finally:
            _hooks.configure(None)
            m.close()
    else:
        raise ValueError(op)


def worker() -> None:
    """Read one JSON command per line from stdin; answer one JSON result per line on stdout."""
    import torch  # noqa: F401  (imported once, before the first command)

    from ckptdb import _hooks
    from ckptdb.catalog.session import dispose_engines
    from ckptdb.errors import CheckpointError

    out = sys.stdout
    sys.stdout = sys.stderr  # nothing else may write on the protocol stream
    print(json.dumps({"ready": os.getpid()}), file=out, flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        res: dict[str, Any] = {"op": cmd["op"], "pid": os.getpid(), "ok": True}
        try:
            _op(cmd, res)
        except CheckpointError as e:
            res.update(ok=False, clear=True, error=f"{type(e).__name__}: {e}")
        except Exception as e:  # noqa: BLE001 (any other exception is a violation: reported, not raised)
            res.update(ok=False, clear=False, error=f"{type(e).__name__}: {e}", tb=traceback.format_exc()[-3000:])
        finally:
            _hooks.configure(None)
            dispose_engines()
        print(json.dumps(res), file=out, flush=True)


# -- the driver -----------------------------------------------------------------------------------


class Worker:
    """A long-lived worker process (A or B)."""

    def __init__(self) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env.pop("CKPTDB_HOOK_DIR", None)
        self.p = subprocess.Popen(
            [sys.executable, __file__, "--worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        ready = self.read(120)
        if ready is None or "ready" not in ready:
            raise RuntimeError(f"worker did not start: {ready}")
        self.pid = ready["ready"]

    def send(self, cmd: dict[str, Any]) -> None:
        assert self.p.stdin is not None
        self.p.stdin.write(json.dumps(cmd) + "\n")
        self.p.stdin.flush()

    def read(self, timeout: float) -> dict[str, Any] | None:
        assert self.p.stdout is not None
        r, _, _ = select.select([self.p.stdout], [], [], timeout)
        if not r:
            return None
        line = self.p.stdout.readline()
        if not line:
            return {"ok": False, "clear": False, "error": f"worker exited ({self.p.wait()})"}
        return json.loads(line)

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGKILL)
        self.p.wait()


@dataclass
class Scenario:
    backend: str
    a: str
    point: str
    b: str
    a_res: dict[str, Any] | None = None
    b_res: dict[str, Any] | None = None
    b_blocked: bool = False
    violations: list[str] = field(default_factory=list)
    skipped: str | None = None


class Backend:
    """A template run and a work copy reset before each scenario (SQLite file or PostgreSQL database)."""

    def __init__(self, kind: str, root: Path, pg_url: str | None) -> None:
        self.kind = kind
        self.root = root / kind
        self.work = self.root / "work"
        self.ck = self.work / "ck"
        self.tpl = self.root / "template"
        self.pg_url = pg_url
        suffix = uuid.uuid4().hex[:8]
        self.tpl_db = f"ckptdb_race_tpl_{suffix}"
        self.work_db = f"ckptdb_race_work_{suffix}"

    @property
    def url(self) -> str:
        if self.kind == "sqlite":
            return f"sqlite:///{self.work / 'catalog.db'}"
        return self._pg(self.work_db)

    def _pg(self, db: str) -> str:
        from sqlalchemy.engine import make_url

        assert self.pg_url is not None
        return make_url(self.pg_url).set(database=db).render_as_string(hide_password=False)

    def _admin(self, sql: str) -> None:
        from sqlalchemy import create_engine, text

        eng = create_engine(self.pg_url or "", isolation_level="AUTOCOMMIT")
        try:
            with eng.connect() as c:
                c.execute(text(sql))
        finally:
            eng.dispose()

    def build(self, a: Worker) -> None:
        """The template run (see the module docstring), built at the work path, then set aside."""
        from ckptdb import _hooks
        from ckptdb.catalog import Catalog
        from ckptdb.catalog.models import State
        from ckptdb.catalog.session import dispose_engines

        shutil.rmtree(self.root, ignore_errors=True)
        self.ck.mkdir(parents=True)
        if self.kind == "postgres":
            self._admin(f'CREATE DATABASE "{self.work_db}"')
        for step in (5, 10, 12, 15, 20, 25, 30):
            _expect(a, {"op": "save", "dir": str(self.ck), "url": self.url, "step": step})
        # a writer that dies (SIGKILL) at a hook point: a pending row and its directories stay
        # (no recovery on open: the second must not repair what the first left)
        for step, op, stop in ((25, "overwrite", "publish.after_rename_aside"), (35, "save", "save.after_write")):
            hd = self.root / f"kill-{step}"
            hd.mkdir()
            w = Worker()
            w.send(
                {
                    "op": op,
                    "dir": str(self.ck),
                    "url": self.url,
                    "step": step,
                    "hook_dir": str(hd),
                    "stop": stop,
                    "no_recovery": True,
                }
            )
            _wait_file(hd / "reached", 60)
            w.kill()
        cat = Catalog(self.url)
        run = cat.get_run(RUN)
        who = ("racecheck", os.getpid())
        c5 = cat.live(run.id, 5)
        assert c5 is not None
        cat.mark_deleting(c5.id, "manual", who, preserve_model=False)  # a deletion interrupted after its claim
        c15 = cat.live(run.id, 15)
        assert c15 is not None
        cat.mark_damaged(c15.id, State.MISSING, "racecheck: files were away (a remount)", who)
        for f in (self.ck / "step_12").glob("rank_*.pt"):  # damaged behind the catalog's back: gc marks it
            f.unlink()
        trash = self.ck / "step_7.trash-0123456789ab"
        trash.mkdir()
        (trash / "junk").write_bytes(b"x" * 100)
        foreign = self.ck / "step_60"  # fairseq2's own layout, no token: `ckptdb import` adopts it
        foreign.mkdir()
        import torch

        torch.save({"model": {"w": torch.ones(8)}, "model_key": "model"}, foreign / "model.pt")
        (foreign / "score.txt").write_text("60.0\n")
        _hooks.configure(None)
        dispose_engines()
        shutil.copytree(self.work, self.tpl, symlinks=True)
        if self.kind == "postgres":  # the work database becomes the template (no session may hold it)
            self._admin(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{self.work_db}'")
            self._admin(f'ALTER DATABASE "{self.work_db}" RENAME TO "{self.tpl_db}"')

    def reset(self) -> None:
        from ckptdb.catalog.session import dispose_engines

        dispose_engines()
        shutil.rmtree(self.work, ignore_errors=True)
        shutil.copytree(self.tpl, self.work, symlinks=True)
        if self.kind == "postgres":
            self._admin(f'DROP DATABASE IF EXISTS "{self.work_db}" WITH (FORCE)')
            self._admin(f'CREATE DATABASE "{self.work_db}" TEMPLATE "{self.tpl_db}"')

    def drop(self) -> None:
        from ckptdb.catalog.session import dispose_engines

        dispose_engines()
        if self.kind == "postgres":
            self._admin(f'DROP DATABASE IF EXISTS "{self.work_db}" WITH (FORCE)')
            self._admin(f'DROP DATABASE IF EXISTS "{self.tpl_db}" WITH (FORCE)')
        shutil.rmtree(self.root, ignore_errors=True)


def _wait_file(p: Path, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if p.exists():
            return True
        time.sleep(0.002)
    return False


def _expect(w: Worker, cmd: dict[str, Any]) -> dict[str, Any]:
    w.send(cmd)
    r = w.read(120)
    if r is None or not r.get("ok"):
        raise RuntimeError(f"template step {cmd} failed: {r}")
    return r


def _target(a: str, b: str) -> int:
    """The step B acts on: another step for a writer, A's step (or a committed one) otherwise."""
    if b == "save_other":
        return 50
    step = A_OPS[a]
    return step if step is not None else (30 if b == "overwrite_same" else 20)


def trace_points(be: Backend, w: Worker, a: str, hook_root: Path) -> list[str]:
    """The hook points operation A passes (``name#k``, in order), from one traced run."""
    be.reset()
    hd = hook_root / f"trace-{a}"
    shutil.rmtree(hd, ignore_errors=True)
    hd.mkdir(parents=True)
    w.send({"op": a, "dir": str(be.ck), "url": be.url, "step": A_OPS[a], "hook_dir": str(hd)})
    r = w.read(300)
    if r is None or not r.get("ok"):
        raise RuntimeError(f"traced run of {a} failed: {r}")
    tr = hd / "trace"
    return tr.read_text().split() if tr.exists() else []


class Pool:
    def __init__(self) -> None:
        self.a = Worker()
        self.b = Worker()

    def renew(self, which: str) -> None:
        w = getattr(self, which)
        w.kill()
        setattr(self, which, Worker())

    def close(self) -> None:
        self.a.kill()
        self.b.kill()


def run_scenario(be: Backend, pool: Pool, sc: Scenario, hook_root: Path, block_s: float) -> None:
    be.reset()
    hd = hook_root / "cur"
    shutil.rmtree(hd, ignore_errors=True)
    hd.mkdir(parents=True)
    a_cmd = {"op": sc.a, "dir": str(be.ck), "url": be.url, "step": A_OPS[sc.a], "hook_dir": str(hd), "stop": sc.point}
    pool.a.send(a_cmd)
    reached = hd / "reached"
    end = time.monotonic() + 60
    while not reached.exists():
        r = pool.a.read(0.005)
        if r is not None:
            sc.a_res, sc.skipped = r, "A finished without reaching the point"
            return
        if time.monotonic() > end:
            sc.violations.append("A hung before its point")
            pool.renew("a")
            return
    b_cmd = {"op": sc.b, "dir": str(be.ck), "url": be.url, "step": _target(sc.a, sc.b)}
    pool.b.send(b_cmd)
    sc.b_res = pool.b.read(block_s)
    if sc.b_res is None:
        sc.b_blocked = True
    (hd / "release").write_text("go\n")
    sc.a_res = pool.a.read(120)
    if sc.a_res is None:
        sc.violations.append("A hung after its release")
        pool.renew("a")
    if sc.b_res is None:
        sc.b_res = pool.b.read(120)
        if sc.b_res is None:
            sc.violations.append("B hung (after A's release)")
            pool.renew("b")
    check(be, sc)


# -- the invariants -------------------------------------------------------------------------------


def _events(url: str) -> list[dict[str, Any]]:
    from sqlalchemy import create_engine, text

    eng = create_engine(url)
    try:
        with eng.connect() as c:
            rows = c.execute(
                text(
                    "SELECT e.id, e.checkpoint_id, e.from_state, e.to_state, e.reason, e.pid, c.step_nr, c.token "
                    "FROM checkpoint_events e JOIN checkpoints c ON c.id = e.checkpoint_id ORDER BY e.id"
                )
            ).mappings()
            return [dict(r) for r in rows]
    finally:
        eng.dispose()


def check(be: Backend, sc: Scenario) -> None:
    from ckptdb import FileCheckpointManager, cleanup
    from ckptdb.catalog import Catalog
    from ckptdb.catalog.session import dispose_engines
    from ckptdb.errors import CheckpointError
    from ckptdb.storage import layout
    from ckptdb.verify import verify_one

    v = sc.violations
    procs = [("A", sc.a, sc.a_res), ("B", sc.b, sc.b_res)]
    for who, op, r in procs:
        if r is None:
            continue
        if not r.get("ok") and not r.get("clear"):
            v.append(f"{who} ({op}) failed without a CheckpointError: {r.get('error')} {r.get('tb', '')[-600:]}")
        if r.get("soft"):
            v.append(f"{who} ({op}) reported: {r['soft']}")
    ev = _events(be.url)
    by_token: dict[str, list[dict[str, Any]]] = {}
    for e in ev:
        by_token.setdefault(e["token"], []).append(e)
    committed_by: dict[int, list[str]] = {}
    for who, op, r in procs:
        if r is None or op not in WRITERS or not r.get("token"):
            continue
        mine = by_token.get(r["token"], [])
        was_committed = any(e["to_state"] == "committed" for e in mine)
        if r.get("ok") and not was_committed:
            v.append(f"{who} ({op}) believes it committed, but its row never was")
        if not r.get("ok") and was_committed:
            v.append(f"{who} ({op}) raised ({r.get('error')}) but its row was committed")
        for e in mine:  # a live writer is never rolled back by anyone else
            if e["to_state"] == "aborted" and e["pid"] != r["pid"]:
                v.append(f"{who} ({op}), a live writer, was rolled back by pid {e['pid']}: {e['reason']}")
        if r.get("ok"):
            committed_by.setdefault(mine[0]["step_nr"] if mine else -1, []).append(who)
    for step, whos in committed_by.items():
        if len(whos) > 1 and not ({sc.a, sc.b} & {"overwrite", "overwrite_same"}):
            v.append(f"A and B both committed step {step} without an overwrite")
    # retention: replay the events; what a prune claimed was never among the KEEP newest committed then
    state: dict[int, tuple[int, str]] = {}  # checkpoint id -> (step, state)
    for e in ev:
        if e["to_state"] == "deleting" and (e["reason"] or "").startswith("pruned by"):
            committed = sorted(
                (s for i, (s, st) in state.items() if st == "committed" and i != e["checkpoint_id"]), reverse=True
            )
            claimed_now = {x["checkpoint_id"] for x in ev if x["id"] >= e["id"] and x["to_state"] == "deleting"}
            newer = [s for s in committed if s > e["step_nr"]]
            still = [
                s for i, (s, st) in state.items() if st == "committed" and s > e["step_nr"] and i not in claimed_now
            ]
            if len(still) < KEEP and len(newer) < KEEP:
                v.append(f"retention deleted step {e['step_nr']} with only {newer} committed after it at its decision")
        state[e["checkpoint_id"]] = (e["step_nr"], e["to_state"])
    # the final recovery, then the state it must leave
    dispose_engines()
    try:
        m = FileCheckpointManager(be.ck, catalog=be.url, run=RUN)
        m.close()
        cat = Catalog(be.url)
        g = cleanup.gc(cat, [RUN])
        if g.errors or g.refused:
            v.append(f"final gc: {g.errors or g.refused}")
        run = cat.get_run(RUN)
        rows = cat.checkpoints(run.id, with_scores=False)
        live = {c.step_nr: c for c in rows if c.state in ("committed", "corrupt", "missing", "deleting")}
        for c in rows:
            if c.state in ("pending", "deleting"):
                v.append(f"step {c.step_nr}: row still {c.state} after the final recovery")
            if c.state in ("corrupt", "missing") and c.step_nr != DAMAGED:
                v.append(f"step {c.step_nr}: marked {c.state} although no file was damaged")
        preserved = {c.step_nr for c in rows if c.state == "deleted" and c.model_preserved}
        for entry in sorted(os.listdir(be.ck)):
            if layout.parse_work_dir(entry) is not None:
                v.append(f"debris after the final recovery: {entry}")
                continue
            step = layout.parse_step_dir(entry)
            if step is None:
                continue
            owner = _read_token(be.ck / entry)
            c = live.get(step)
            if c is None:
                if not (step == 60 and owner is None) and step not in preserved:
                    v.append(f"{entry} belongs to no live row (token {owner})")
            elif owner not in (None, c.token):
                v.append(f"{entry} holds token {owner}, its live row has {c.token}")
        for c in rows:
            if c.state == "committed" and c.step_nr == DAMAGED:
                v.append(f"step {DAMAGED}, whose file is gone, is still committed after the final gc")
            if c.state != "committed" or c.step_nr == DAMAGED:
                continue
            res = verify_one(cat, run, c, record=False)
            if res.result not in ("ok", "extra"):
                v.append(f"committed step {c.step_nr} does not verify: {res.result} {res.problems[:2]}")
        steps = sorted(c.step_nr for c in rows if c.state == "committed")
        m = FileCheckpointManager(be.ck, catalog=be.url, run=RUN)
        try:
            if steps:
                got, _ = m.load_last_checkpoint()
                if got != steps[-1]:
                    v.append(f"resume point is step {got}, the newest committed is {steps[-1]}")
        finally:
            m.close()
        # nothing committed before is lost unless an operation that succeeded took it
        for step in (10, 20, 30):
            if step in steps:
                continue
            takers = {"delete": 20, "delete_same": _target(sc.a, sc.b)}
            took = any(
                (op in takers and takers[op] == step and r and r.get("ok"))
                or op in ("retention", "prune", "save_retention")
                for _, op, r in procs
            )
            if not took:
                v.append(f"committed step {step} was lost: nothing that succeeded deleted it")
    except CheckpointError as e:
        v.append(f"the final recovery/check raised {type(e).__name__}: {e}")
    finally:
        dispose_engines()


def _read_token(d: Path) -> str | None:
    try:
        return (d / ".ckptdb_token").read_text().strip() or None
    except OSError:
        return None


# -- main -----------------------------------------------------------------------------------------


def enumerate_backend(
    kind: str,
    root: Path,
    pg_url: str | None,
    *,
    a_ops: list[str],
    b_ops: list[str],
    quick: bool,
    only: list[str],
    max_k: int,
    block_s: float,
    log: Any,
) -> dict[str, Any]:
    t0 = time.monotonic()
    be = Backend(kind, root, pg_url)
    pool = Pool()
    hook_root = root / "hooks"
    scenarios: list[Scenario] = []
    points: dict[str, list[str]] = {}
    try:
        be.build(pool.a)
        if only:
            plan = [(x.split(":")[0], x.split(":")[1], x.split(":")[2]) for x in only]
        elif quick:
            plan = [(a, p, b) for a, p, b in QUICK]
        else:
            plan = []
            for a in a_ops:
                seen = [p for p in trace_points(be, pool.a, a, hook_root) if int(p.split("#")[1]) <= max_k]
                points[a] = list(dict.fromkeys(seen))
                plan += [(a, p, b) for p in points[a] for b in b_ops]
        print(f"[{kind}] {len(plan)} pairs", file=log, flush=True)
        for i, (a, p, b) in enumerate(plan, 1):
            sc = Scenario(kind, a, p, b)
            run_scenario(be, pool, sc, hook_root, block_s)
            scenarios.append(sc)
            if sc.violations:
                print(f"[{kind}] VIOLATION {a} @ {p} x {b}: {sc.violations}", file=log, flush=True)
            if i % 25 == 0:
                print(f"[{kind}] {i}/{len(plan)} {time.monotonic() - t0:.0f}s", file=log, flush=True)
    finally:
        pool.close()
        be.drop()
    ran = [s for s in scenarios if s.skipped is None]
    return {
        "backend": kind,
        "pairs": len(ran),
        "not_reached": len(scenarios) - len(ran),
        "b_blocked": sum(s.b_blocked for s in ran),
        "violations": [asdict(s) for s in scenarios if s.violations],
        "points": points,
        "per_a": dict(Counter(s.a for s in ran)),
        "seconds": round(time.monotonic() - t0, 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--pg-url", default=None, help="also run on PostgreSQL (databases are created and dropped)")
    ap.add_argument("--backends", default=None, help="comma list: sqlite,postgres (default: sqlite + pg if given)")
    ap.add_argument("--a", default=",".join(A_OPS), help="operations A (comma list)")
    ap.add_argument("--b", default=",".join(B_OPS), help="second operations B (comma list)")
    ap.add_argument("--quick", action="store_true", help="only the pairs of QUICK")
    ap.add_argument("--only", action="append", default=[], help="one pair A:point#k:B (repeatable)")
    ap.add_argument("--max-k", type=int, default=2, help="stop at the first k passes of each point")
    ap.add_argument("--block-s", type=float, default=2.0, help="B is blocked when not done after this long")
    ap.add_argument("--root", default=None, help="work directory (default: /dev/shm or /tmp)")
    ap.add_argument("--out", default=None, help="write the JSON summary here too")
    args = ap.parse_args(argv)
    logging.getLogger("ckptdb").setLevel(logging.ERROR)  # recovery's reports are expected here
    if args.worker:
        worker()
        return 0
    for flag, given, known in (("--a", args.a, A_OPS), ("--b", args.b, B_OPS)):
        unknown = [op for op in given.split(",") if op not in known]
        if unknown:
            ap.error(f"{flag}: unknown operation(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    shm = Path("/dev/shm")
    root = Path(args.root) if args.root else (shm if shm.is_dir() else Path("/tmp")) / f"ckptdb-race-{os.getpid()}"
    kinds = args.backends.split(",") if args.backends else ["sqlite", *(["postgres"] if args.pg_url else [])]
    results = []
    try:
        for kind in kinds:
            results.append(
                enumerate_backend(
                    kind,
                    root,
                    args.pg_url,
                    a_ops=args.a.split(","),
                    b_ops=args.b.split(","),
                    quick=args.quick,
                    only=args.only,
                    max_k=args.max_k,
                    block_s=args.block_s,
                    log=sys.stderr,
                )
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    summary = {"results": results, "violations": sum(len(r["violations"]) for r in results)}
    text = json.dumps(summary, default=str)
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1, default=str))
    print(text)
    return 1 if summary["violations"] else 0


if __name__ == "__main__":
    if "--worker" in sys.argv:
        sys.path.insert(0, str(ROOT))
    sys.exit(main())
