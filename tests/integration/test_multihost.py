"""Multi-host rehearsal: writers on two "hosts" sharing one PostgreSQL catalog and one directory.

Each host is a network namespace (``ip netns``) on a veth pair of its own, with its own hostname
(UTS namespace) and pid namespace (``unshare --uts --pid --fork --mount-proc``). PostgreSQL
listens on 127.0.0.1 only; rather than changing its configuration, the test runs a small TCP
forwarder on the host side of each veth (the least invasive choice; nothing of the server's is
touched). Everything created (namespaces, veths, forwarder) is removed afterwards.

1. both hosts checkpoint concurrently, each into a run of its own and both into one shared run;
2. host A begins a checkpoint and is frozen (SIGSTOP) past the heartbeat timeout
   (``RecoveryOptions(stale_after=...)``); host B's recovery rolls A's pending checkpoint back and B
   commits the same step; A is resumed (SIGCONT) and commits: it must find its checkpoint rolled
   back and raise, never commit over B's decision.

Skipped where network namespaces or ``unshare`` are not permitted (not root, a container).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from ckptdb import FileCheckpointManager, RecoveryOptions
from ckptdb.catalog import Catalog
from ckptdb.testing.netns import Forwarder, namespaces, netns_permitted
from ckptdb.verify import verify

pytestmark = pytest.mark.postgres
ROOT = Path(__file__).resolve().parents[2]
CHILD = ROOT / "tests" / "integration" / "child_multihost.py"
STALE_S = 3.0


@pytest.fixture
def hosts(catalog_url: str) -> Iterator[tuple[list[tuple[str, str]], str]]:
    """Two namespaces ("hostA", "hostB") with a veth each; yields ([(netns, url)], host-side url)."""
    if catalog_url.startswith("sqlite"):
        pytest.skip("the hosts share a PostgreSQL catalog")
    why = netns_permitted()
    if why:
        pytest.skip(why)
    u = make_url(catalog_url)
    with namespaces(("hostA", "hostB")) as nets:
        fwd = Forwarder([a for _, _, a in nets], u.port or 5432)
        try:
            urls = [(ns, u.set(host=addr, port=fwd.port).render_as_string(hide_password=False)) for ns, _, addr in nets]
            yield urls, catalog_url
        finally:
            fwd.close()


def _spawn(ns: str, host: str, *args: str) -> subprocess.Popen[str]:
    inner = f"hostname {host} && exec {sys.executable} {CHILD} " + " ".join(f"'{a}'" for a in args)
    return subprocess.Popen(
        ["ip", "netns", "exec", ns, "unshare", "--uts", "--pid", "--fork", "--mount-proc", "sh", "-c", inner],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        start_new_session=True,  # the whole host (unshare, sh, python) is one process group: SIGSTOP it
    )


def _finish(p: subprocess.Popen[str], timeout: float = 240) -> tuple[int, str]:
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out + err[-3000:]


@pytest.mark.timeout(600)
def test_two_hosts_share_a_catalog(hosts: tuple[list[tuple[str, str]], str], tmp_path: Path) -> None:
    (ns_a, url_a), (ns_b, url_b) = hosts[0]
    d = tmp_path / "shared" / "ck"
    d.mkdir(parents=True)
    # 1. concurrent writers: a run of each host's own, and one run both write into
    procs = [
        _spawn(ns_a, "hostA", "write", str(d / "a"), url_a, "run-a", "1,2,3,4"),
        _spawn(ns_b, "hostB", "write", str(d / "b"), url_b, "run-b", "1,2,3,4"),
        _spawn(ns_a, "hostA", "write", str(d / "s"), url_a, "shared", "1,3,5,7"),
        _spawn(ns_b, "hostB", "write", str(d / "s"), url_b, "shared", "2,4,6,8"),
    ]
    for p in procs:
        rc, out = _finish(p)
        assert rc == 0 and "DONE" in out, out
        assert "pid=1 " in out  # pid 1 of a namespace of its own
    cat = Catalog(hosts[1])
    assert {h for r in ("run-a", "run-b", "shared") for h in _hosts(cat, r)} == {"hostA", "hostB"}
    for run, steps in (("run-a", [1, 2, 3, 4]), ("run-b", [1, 2, 3, 4]), ("shared", list(range(1, 9)))):
        assert cat.committed_steps(cat.get_run(run).id) == steps
        assert verify(cat, run=run).ok
    # 2. host A frozen past the heartbeat timeout; host B rolls its checkpoint back and commits step 9
    a = _spawn(ns_a, "hostA", "hold", str(d / "s"), url_a, "shared", "9")
    assert a.stdout is not None
    line = a.stdout.readline()
    assert "READY" in line, line + (a.stderr.read() if a.stderr else "")
    os.killpg(a.pid, signal.SIGSTOP)
    try:
        time.sleep(STALE_S + 1.5)
        rc, out = _finish(_spawn(ns_b, "hostB", "write", str(d / "s"), url_b, "shared", "9", str(STALE_S)))
        assert rc == 0 and "DONE" in out, out
    finally:
        os.killpg(a.pid, signal.SIGCONT)
    (d / "go").write_text("go")
    rc, out = _finish(a)
    assert rc == 1 and "FAILED" in out and "rolled back by another process" in out, line + out
    run = cat.get_run("shared")
    rows = [c for c in cat.checkpoints(run.id, with_scores=False) if c.step_nr == 9]
    assert sorted((c.state, c.writer_host) for c in rows) == [("aborted", "hostA"), ("committed", "hostB")]
    assert cat.committed_steps(run.id) == list(range(1, 10))
    assert verify(cat, run="shared").ok
    m = FileCheckpointManager(d / "s", catalog=hosts[1], run="shared", recovery_options=RecoveryOptions())
    try:
        assert m.load_last_checkpoint()[0] == 9
        assert not [p.name for p in (d / "s").iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    finally:
        m.close()


def _hosts(cat: Catalog, run: str) -> set[str]:
    return {c.writer_host for c in cat.checkpoints(cat.get_run(run).id, with_scores=False)}
