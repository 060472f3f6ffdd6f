"""Two "hosts" checkpointing into one S3 bucket and one PostgreSQL catalog; one host dies mid-save.

Each host is a network namespace with its own hostname and pid namespace (``ip netns`` + ``unshare
--uts --pid --fork --mount-proc``), on a veth pair of its own. PostgreSQL and the S3 server
(SeaweedFS ``weed mini``, started here) listen on 127.0.0.1 of this machine; a TCP forwarder on the
host side of each veth carries the hosts' connections to them (nothing of the servers' is changed).

1. each host runs a 2-rank gloo job (``torch.distributed``, CPU) into a run of its own under
   ``s3://<bucket>/<host>``: per-rank trainer state, replicated model, a score per step;
2. a third process on this machine prunes (``KeepLast(3)``) and verifies both runs meanwhile;
3. host B is SIGKILLed (every process of it) while it is in the middle of a save;
4. afterwards: gc (``stale_after`` short: the dead host's writer is judged by its heartbeat) rolls
   back host B's pending checkpoint, aborts its multipart uploads and deletes its objects; then
   every committed checkpoint of both runs verifies and loads; nothing the jobs committed is lost
   unless the pruner deleted it; host A's objects (keys and ETags) are exactly what they were
   before gc; no incomplete upload is left in the bucket.

Usage (root, PostgreSQL reachable)::

    python scripts/multihost_s3.py --url postgresql+psycopg://postgres@127.0.0.1:5432/postgres

Exit status 0 when every check held; the last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ckptdb.testing.netns import Forwarder, namespaces, netns_permitted  # noqa: E402

STEPS = 8
HOSTS = ("hostA", "hostB")
VICTIM = "hostB"
KILL_AT = 4  # host B is killed while saving this step
HEARTBEAT_STALE_S = 4.0


# -- the job on one host (2 ranks) -----------------------------------------------------------------


def rank_main(rank: int, port: int, target: str, url: str, endpoint: str, mib: int) -> None:
    import torch
    import torch.distributed as dist

    from ckptdb import FileCheckpointManager

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    m = FileCheckpointManager(
        target, dist.group.WORLD, catalog=url, storage_options={"endpoint_url": endpoint, "part_size": 5 << 20}
    )
    host = socket.gethostname()
    for step in range(1, STEPS + 1):
        g = torch.Generator().manual_seed(step)
        model = {"w": torch.randn(mib << 18, generator=g)}  # mib MiB of float32
        m.begin_checkpoint(step)
        m.save_state({"model": model, "trainer": {"rank": rank, "step": step}}, replicated_keys={"model"})
        if rank == 0:
            print(f"{host} SAVED {step}", flush=True)
        if host == VICTIM and step == KILL_AT:
            time.sleep(60)  # the orchestrator kills this host now: mid-save (objects written, not committed)
        m.save_score(float(step))
        m.commit_checkpoint()
        if rank == 0:
            print(f"{host} COMMITTED {step}", flush=True)
    m.close()
    dist.barrier()
    dist.destroy_process_group()


def job_main(target: str, url: str, endpoint: str, mib: int) -> int:
    """Both ranks of one host, as child processes of this one (inside the host's namespaces)."""
    port = 29500 + secrets.randbelow(1000)
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--role", "rank", str(r), str(port), target, url, endpoint, str(mib)]
        )
        for r in (0, 1)
    ]
    return max(p.wait() for p in procs)


# -- the third process: prune and verify both runs meanwhile -----------------------------------------


def maintainer_main(url: str, stop: str, runs: list[str]) -> int:
    from ckptdb import KeepLast, cleanup
    from ckptdb.catalog import Catalog
    from ckptdb.errors import CheckpointNotFoundError
    from ckptdb.verify import verify

    cat = Catalog(url)
    rounds = pruned = verified = 0
    bad: list[str] = []
    while not Path(stop).exists():
        for run in runs:
            try:
                rep = cleanup.prune(cat, run, KeepLast(3))
                pruned += len(rep.deleted)
                if rep.failed:
                    bad.append(f"prune {run}: {rep.failed}")
                v = verify(cat, run=run, force=True)
                verified += len(v.results)
                bad += [f"verify {run} step {r.step_nr}: {r.result} {r.problems}" for r in v.bad]
            except CheckpointNotFoundError:
                continue  # the run is not opened yet
        rounds += 1
        time.sleep(0.2)
    print(json.dumps({"rounds": rounds, "pruned": pruned, "verified": verified, "bad": bad}), flush=True)
    return 1 if bad else 0


# -- namespaces and forwarders ---------------------------------------------------------------------


def spawn_host(ns: str, host: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    inner = f"hostname {host} && exec {sys.executable} {__file__} " + " ".join(f"'{a}'" for a in args)
    return subprocess.Popen(
        ["ip", "netns", "exec", ns, "unshare", "--uts", "--pid", "--fork", "--mount-proc", "sh", "-c", inner],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,  # the whole host is one process group: SIGKILL it at once
    )


# -- the orchestrator -------------------------------------------------------------------------------


def snapshot(store: Any) -> dict[str, str]:
    """key -> ETag of every object under the store's prefix."""
    out: dict[str, str] = {}
    c = store.client._client
    for page in c.get_paginator("list_objects_v2").paginate(Bucket=store.bucket, Prefix=store.location.prefix + "/"):
        for o in page.get("Contents", []):
            out[o["Key"]] = o["ETag"]
    return out


def orchestrate(pg_url: str, mib: int) -> dict[str, Any]:
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    from ckptdb import cleanup
    from ckptdb.catalog import Catalog
    from ckptdb.catalog.session import dispose_engines
    from ckptdb.runstore import run_store
    from ckptdb.testing.s3servers import start
    from ckptdb.verify import verify

    admin = create_engine(pg_url, isolation_level="AUTOCOMMIT")
    dbname = f"ckptdb_mh_{uuid.uuid4().hex[:10]}"
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{dbname}"'))
    url = make_url(pg_url).set(database=dbname)
    local_url = url.render_as_string(hide_password=False)
    server = start("seaweedfs")
    bucket = server.new_bucket()
    os.environ.update(server.env())
    checks: dict[str, Any] = {}
    problems: list[str] = []
    work = Path(f"/tmp/ckptdb-multihost-{uuid.uuid4().hex[:8]}")
    work.mkdir()
    try:
        Catalog(local_url)  # the schema, before anyone connects
        with namespaces(HOSTS) as nets:
            pg_fwd = Forwarder([a for _, _, a in nets], url.port or 5432)
            s3_fwd = Forwarder([a for _, _, a in nets], int(server.endpoint.rsplit(":", 1)[1]))
            try:
                env = dict(os.environ, PYTHONPATH=str(ROOT))
                env.pop("AWS_ENDPOINT_URL", None)  # each host reaches the server through its forwarder
                jobs = {}
                for ns, host, addr in nets:
                    host_url = url.set(host=addr, port=pg_fwd.port).render_as_string(hide_password=False)
                    endpoint = f"http://{addr}:{s3_fwd.port}"
                    target = f"s3://{bucket}/{host}"
                    jobs[host] = spawn_host(ns, host, ["--role", "job", target, host_url, endpoint, str(mib)], env)
                runs = [f"s3://{bucket}/{h}" for h in HOSTS]
                stop = work / "stop"
                maint = subprocess.Popen(
                    [sys.executable, __file__, "--role", "maintainer", local_url, str(stop), *runs],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    env=dict(os.environ, PYTHONPATH=str(ROOT)),
                )
                committed: dict[str, list[int]] = {h: [] for h in HOSTS}
                victim = jobs[VICTIM]
                assert victim.stdout is not None
                for line in victim.stdout:
                    if " COMMITTED " in line:
                        committed[VICTIM].append(int(line.split()[-1]))
                    if line.strip() == f"{VICTIM} SAVED {KILL_AT}":
                        os.killpg(victim.pid, signal.SIGKILL)  # mid-save: rank 0 has written, not committed
                        break
                victim.wait(timeout=60)
                checks["victim_killed"] = victim.returncode == -signal.SIGKILL
                if not checks["victim_killed"]:
                    problems.append(f"host B was not killed mid-save (exit {victim.returncode})")
                out, err = jobs["hostA"].communicate(timeout=600)
                committed["hostA"] = [int(x.split()[-1]) for x in out.splitlines() if " COMMITTED " in x]
                if jobs["hostA"].returncode != 0:
                    problems.append(f"host A's job failed: {err[-2000:]}")
                stop.touch()
                mout, merr = maint.communicate(timeout=300)
                maint_rep = json.loads(mout.strip().splitlines()[-1]) if mout.strip() else {"bad": [merr[-2000:]]}
                checks["maintainer"] = maint_rep
                problems += [f"maintainer: {b}" for b in maint_rep.get("bad", [])]
            finally:
                s3_fwd.close()
                pg_fwd.close()

        cat = Catalog(local_url)
        run_a, run_b = (cat.get_run(f"s3://{bucket}/{h}") for h in HOSTS)
        store_a, store_b = run_store(run_a.checkpoint_dir), run_store(run_b.checkpoint_dir)
        pending_b = [c for c in cat.checkpoints(run_b.id) if c.state == "pending"]
        checks["victim_pending"] = [c.step_nr for c in pending_b]
        if [c.step_nr for c in pending_b] != [KILL_AT]:
            problems.append(f"host B's pending rows after the kill: {checks['victim_pending']} (want [{KILL_AT}])")
        before_a = snapshot(store_a)
        time.sleep(HEARTBEAT_STALE_S + 1)
        rep = cleanup.gc(cat, stale_after=timedelta(seconds=HEARTBEAT_STALE_S))
        checks["gc"] = {name: {"rolled_back": r.rolled_back, "removed": r.removed} for name, r in rep.runs.items()}
        if rep.runs[run_b.name].rolled_back != [KILL_AT] or not rep.ok:
            problems.append(f"gc: {rep}")
        for c in pending_b:
            left = [k for k in snapshot(store_b) if f"/{c.directory}/" in k]
            ups = store_b.client.list_uploads(store_b.bucket, store_b.key(c.directory) + "/")  # type: ignore[attr-defined]
            if left or ups:
                problems.append(f"the dead host's debris survived gc: objects {left[:3]}, uploads {ups[:3]}")
        if snapshot(store_a) != before_a:
            problems.append("host A's objects changed during gc")
        leftover = store_a.client.list_uploads(bucket, "")  # type: ignore[attr-defined]
        if leftover:
            problems.append(f"incomplete uploads left in the bucket: {leftover[:5]}")
        for run, host in ((run_a, "hostA"), (run_b, VICTIM)):
            now = cat.committed_steps(run.id)
            deleted = {c.step_nr for c in cat.checkpoints(run.id) if c.state == "deleted"}
            lost = sorted(set(committed[host]) - set(now) - deleted)
            if lost:
                problems.append(f"{host}: committed steps lost: {lost}")
            v = verify(cat, run=run.name)
            if not v.ok:
                problems.append(f"{host}: verify after the run: {[(r.step_nr, r.result) for r in v.bad]}")
            checks[f"{host}_committed"] = now
        if committed["hostA"] != list(range(1, STEPS + 1)):
            problems.append(f"host A committed {committed['hostA']}, want every step")
        from ckptdb import FileCheckpointManager

        for run in (run_a, run_b):
            m = FileCheckpointManager(run.checkpoint_dir, catalog=local_url)
            try:
                for step in m.get_step_numbers():
                    state = m.load_checkpoint(step)
                    if state["trainer"]["step"] != step:
                        problems.append(f"{run.name} step {step}: loaded the state of step {state['trainer']}")
            finally:
                m.close()
        dispose_engines()
    finally:
        server.stop()
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)'))
        admin.dispose()
        shutil.rmtree(work, ignore_errors=True)
    return {"ok": not problems, "problems": problems, "checks": checks}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres", help="PostgreSQL")
    p.add_argument("--mib", type=int, default=12, help="model size per checkpoint (MiB; >= 5 for multipart)")
    p.add_argument("--role", help=argparse.SUPPRESS)
    args, rest = p.parse_known_args()
    if args.role == "rank":
        rank, port, target, url, endpoint, mib = rest
        rank_main(int(rank), int(port), target, url, endpoint, int(mib))
        return 0
    if args.role == "job":
        target, url, endpoint, mib = rest
        return job_main(target, url, endpoint, int(mib))
    if args.role == "maintainer":
        return maintainer_main(rest[0], rest[1], rest[2:])
    why = netns_permitted()
    if why:
        print(json.dumps({"ok": False, "skipped": why}))
        return 77
    t0 = time.monotonic()
    rep = orchestrate(args.url, args.mib)
    rep["seconds"] = round(time.monotonic() - t0, 1)
    for x in rep["problems"]:
        print(x)
    print(json.dumps(rep, default=str))
    return 0 if rep["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
