"""Issue 10, items 9 and 11 and the network-filesystem item: `ckptdb sql` can only read ckptdb's
tables (real CLI subprocesses against a real PostgreSQL database and a real SQLite file), secrets
in URL query parameters never reach output, and a SQLite catalog on a network filesystem is refused
(real mounts: tmpfs, and a FUSE mount of type fuse.sshfs)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from ckptdb import FileCheckpointManager
from ckptdb.catalog import Catalog, migrate, netfs
from ckptdb.catalog.session import dispose_engines, masked, scrub
from ckptdb.errors import CatalogError, CatalogUnavailableError
from tests.catalog import sqldata

PG_ONLY = [pytest.param("postgres", marks=pytest.mark.postgres)]
ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ckptdb.cli", *args], capture_output=True, text=True, timeout=120, env=env
    )


# Runs each query through ``ckptdb.cli.main`` in one process (one start-up instead of one per query,
# and the queries share the process's pooled connections, as in the web UI): a JSON list of
# [exit code, stderr] per query; an exception escaping ``main`` is recorded as a traceback.
_SQL_LOOP = """
import contextlib, io, json, sys, traceback
from ckptdb.cli import main
url, queries = sys.argv[1], json.loads(sys.stdin.read())
out = []
for q in queries:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main(["sql", "--url", url, q])
        except BaseException:
            rc, _ = -1, err.write(traceback.format_exc())
    out.append([rc, err.getvalue()])
print(json.dumps(out))
"""


def cli_sql_many(url: str, queries: list[str]) -> list[tuple[int, str]]:
    """``ckptdb sql --url URL Q`` for each of ``queries``, in one process: (exit code, stderr) each."""
    r = subprocess.run(
        [sys.executable, "-c", _SQL_LOOP, url], input=json.dumps(queries), capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    return [(rc, err) for rc, err in json.loads(r.stdout)]


def libpq(url: str) -> str:
    u = make_url(url)
    return f"host={u.host} port={u.port or 5432} user={u.username} dbname={u.database}"


def counts(url: str) -> dict[str, int]:
    engine = create_engine(url)
    try:
        with engine.connect() as c:
            return {t: c.execute(text(f"SELECT count(*) FROM {t}")).scalar_one() for t in sqldata_tables}
    finally:
        engine.dispose()


sqldata_tables = ["runs", "checkpoints", "shards", "scores", "pins", "checkpoint_events"]


# -- item 9: PostgreSQL --------------------------------------------------------------------------


@pytest.fixture
def pg_victim(catalog_url: str) -> Iterator[psycopg.Connection]:
    """Another session on the server (as the superuser): must survive every query."""
    conn = psycopg.connect(libpq(catalog_url), autocommit=True)
    yield conn
    conn.close()


def _attacks(tmp_path: Path, victim_pid: int, url: str) -> list[str]:
    out = tmp_path / "pwned.txt"
    return [
        f"COPY (SELECT 1) TO PROGRAM 'id > {out}'",
        f"COPY runs TO '{out}'",
        f"SELECT pg_terminate_backend({victim_pid})",
        f"SELECT pg_cancel_backend({victim_pid})",
        "SELECT pg_reload_conf()",
        "SELECT pg_read_file('/etc/hostname')",
        "SELECT pg_ls_dir('.')",
        f"SELECT lo_export(lo_import('/etc/hostname'), '{out}')",
        "SET ROLE postgres",
        "RESET ROLE",
        "SELECT 1; DROP TABLE runs",
        "DROP TABLE runs",
        "SELECT set_config('role', 'postgres', true)",
        "SELECT set_config('session_authorization', 'postgres', true)",
        # a weaker role set by `SET ROLE` alone is undone inside the query, then dynamic SQL runs as postgres
        "SELECT (SELECT set_config('role', 'postgres', true)) AS r, "
        "query_to_xml('SELECT pg_read_file(''/etc/hostname'')', true, false, '')",
        "WITH d AS (DELETE FROM runs RETURNING 1) SELECT count(*) FROM d",
        "SELECT * FROM runs FOR UPDATE",
        "SELECT rolname, rolpassword FROM pg_authid",
        "SELECT * FROM pg_shadow",
        "SELECT * FROM not_ckptdb_secret",
        "EXPLAIN ANALYZE DELETE FROM runs",
        "CALL pg_catalog.pg_sleep(0)",
        "SELECT pg_advisory_lock(1) FROM runs WHERE false; SELECT 1",
        "SELECT nextval('runs_id_seq')",
        "SELECT set_config('transaction_read_only', 'off', true)",
    ]


@pytest.mark.parametrize("catalog_url", PG_ONLY, indirect=True)
def test_pg_sql_attacks_are_refused_with_no_side_effect(
    tmp_path: Path, catalog_url: str, pg_victim: psycopg.Connection
) -> None:
    sqldata.build(tmp_path, catalog_url)
    dispose_engines()
    engine = create_engine(catalog_url)
    with engine.begin() as c:
        c.execute(text("CREATE TABLE not_ckptdb_secret (s text)"))
        c.execute(text("INSERT INTO not_ckptdb_secret VALUES ('hush')"))
        have_dblink = c.execute(text("SELECT count(*) FROM pg_available_extensions WHERE name = 'dblink'")).scalar()
        if have_dblink:
            c.execute(text("CREATE EXTENSION IF NOT EXISTS dblink"))
    engine.dispose()
    before = counts(catalog_url)
    victim_pid = pg_victim.info.backend_pid
    attacks = _attacks(tmp_path, victim_pid, catalog_url)
    if have_dblink:
        attacks += [
            f"SELECT * FROM dblink('{libpq(catalog_url)}', 'SELECT 1') AS t(x int)",
            f"SELECT dblink_exec('{libpq(catalog_url)}', 'DROP TABLE runs')",
        ]
    for q, (rc, err) in zip(attacks, cli_sql_many(catalog_url, attacks), strict=True):
        assert rc == 2, (q, err)
        assert "ckptdb: error:" in err and "read-only" in err, (q, err)
        assert "Traceback" not in err, (q, err)
    assert not (tmp_path / "pwned.txt").exists()
    assert pg_victim.execute("SELECT 1").fetchone() == (1,)  # neither terminated nor cancelled
    assert counts(catalog_url) == before
    # a statement timeout bounds a query; the server is still up and answers afterwards
    r = cli("sql", "--url", catalog_url, "--timeout", "1", "SELECT pg_sleep(30) IS NULL AS slept")
    assert r.returncode == 2 and "timeout" in r.stderr, r.stderr
    unset = "SELECT set_config('statement_timeout', '0', true), pg_sleep(30) IS NULL AS slept"
    r = cli("sql", "--url", catalog_url, "--timeout", "1", unset)
    assert r.returncode == 2 and "timeout" in r.stderr, r.stderr
    # ordinary queries still work, and run as the reader role
    r = cli("sql", "--url", catalog_url, "--json", "SELECT current_user AS who, count(*) AS n FROM checkpoint_summary")
    assert r.returncode == 0, r.stderr
    assert '"who": "ckptdb_reader"' in r.stdout and f'"n": {before["checkpoints"]}' in r.stdout
    r = cli("sql", "--url", catalog_url, "--max-rows", "2", "SELECT step_nr FROM checkpoints ORDER BY 1")
    assert r.returncode == 0 and "(2 rows)" in r.stdout and "--max-rows 2" in r.stderr


def _role_url(server_url: str, user: str, db: str) -> str:
    return make_url(server_url).set(username=user, database=db, password=None).render_as_string(hide_password=False)


def _docs_setup_sql() -> str:
    doc = (ROOT / "docs" / "sql.md").read_text()
    start = doc.index("```pgsql\n") + len("```pgsql\n")
    return doc[start : doc.index("```", start)]


@pytest.mark.postgres
def test_pg_catalog_user_without_createrole_then_dba_setup_and_separate_login(
    tmp_path: Path, pg_server: object
) -> None:
    if pg_server is None:
        pytest.skip("no PostgreSQL given (--db-url or CKPTDB_TEST_PG_URL)")
    admin_url = pg_server.admin_url  # type: ignore[attr-defined]
    tag = uuid.uuid4().hex[:8]
    owner, alice, db = f"ckptdb_t_owner_{tag}", f"ckptdb_t_alice_{tag}", f"ckptdb_t_nocr_{tag}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE ROLE "{owner}" LOGIN NOCREATEROLE'))
        c.execute(text(f'CREATE ROLE "{alice}" LOGIN NOCREATEROLE'))
        c.execute(text(f'CREATE DATABASE "{db}" OWNER "{owner}"'))
    owner_url, alice_url = _role_url(admin_url, owner, db), _role_url(admin_url, alice, db)
    try:
        # the catalog's user may not create roles: the catalog works, `ckptdb sql` refuses and says why
        m = FileCheckpointManager(tmp_path / "c", catalog=owner_url)
        m.begin_checkpoint(1)
        m.save_state({"x": 1})
        m.commit_checkpoint()
        assert migrate.current(owner_url) == migrate.head_revision()
        dispose_engines()
        r = cli("sql", "--url", owner_url, "SELECT count(*) FROM checkpoints")
        assert r.returncode == 2 and "docs/sql.md" in r.stderr and "DBA" in r.stderr and "--url" in r.stderr, r.stderr
        assert cli("runs", "--url", owner_url).returncode == 0  # ckptdb's own fixed queries still work
        # a DBA runs the documented setup in this database and grants a separate login
        setup = _docs_setup_sql().replace("alice", f'"{alice}"')
        dba = create_engine(make_url(admin_url).set(database=db), isolation_level="AUTOCOMMIT")
        with dba.connect() as c:
            c.exec_driver_sql(setup)
        dba.dispose()
        r = cli("sql", "--url", alice_url, "--json", "SELECT count(*) AS n, current_user AS who FROM checkpoints")
        assert r.returncode == 0 and '"n": 1' in r.stdout and "ckptdb_reader" in r.stdout, r.stderr
        for q in ["SELECT set_config('role', 'ckptdb_reader', true)", "DELETE FROM checkpoints"]:
            r = cli("sql", "--url", alice_url, q)
            assert r.returncode == 2 and "read-only" in r.stderr, r.stderr
        r = cli("sql", "--url", owner_url, "SELECT 1 AS one")  # not granted: a clear refusal
        assert r.returncode == 2 and "may not execute" in r.stderr, r.stderr
    finally:
        dispose_engines()
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
            c.execute(text(f'DROP ROLE IF EXISTS "{alice}"'))
            c.execute(text(f'DROP ROLE IF EXISTS "{owner}"'))
        admin.dispose()


@pytest.mark.postgres
def test_pg_createrole_user_sets_up_the_sandbox_and_keeps_no_membership(tmp_path: Path, pg_server: object) -> None:
    if pg_server is None:
        pytest.skip("no PostgreSQL given (--db-url or CKPTDB_TEST_PG_URL)")
    admin_url = pg_server.admin_url  # type: ignore[attr-defined]
    tag = uuid.uuid4().hex[:8]
    owner, db = f"ckptdb_t_cr_{tag}", f"ckptdb_t_cr_{tag}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE ROLE "{owner}" LOGIN CREATEROLE'))
        c.execute(text(f'CREATE DATABASE "{db}" OWNER "{owner}"'))
    url = _role_url(admin_url, owner, db)
    try:
        migrate.upgrade(url)
        dispose_engines()
        r = cli("sql", "--url", url, "--json", "SELECT current_user AS who, count(*) AS n FROM runs")
        assert r.returncode == 0 and "ckptdb_reader" in r.stdout, r.stderr
        r = cli("sql", "--url", url, f"SELECT set_config('role', '{owner}', true)")
        assert r.returncode == 2 and "read-only" in r.stderr, r.stderr
        with admin.connect() as c:
            members = c.execute(
                text("SELECT count(*) FROM pg_auth_members WHERE roleid = 'ckptdb_reader'::regrole")
            ).scalar()
        assert members == 0
        migrate.downgrade(url, "0004")
        migrate.upgrade(url)
    finally:
        dispose_engines()
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
            c.execute(text(f'DROP ROLE IF EXISTS "{owner}"'))
        admin.dispose()


@pytest.mark.postgres
def test_0005_sql_is_race_safe_when_the_role_is_new(pg_server: object) -> None:
    """Four databases run revision 0005's SQL at once while the role does not exist yet (a unique
    role name stands in for ckptdb_reader, which this shared cluster already has)."""
    if pg_server is None:
        pytest.skip("no PostgreSQL given (--db-url or CKPTDB_TEST_PG_URL)")
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "m0005", ROOT / "ckptdb" / "migrations" / "versions" / "0005_sql_reader_role.py"
    )
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    role = f"ckptdb_t_reader_{uuid.uuid4().hex[:8]}"
    sql = mod.UPGRADE.replace("ckptdb_reader", role).replace(
        "GRANT SELECT ON runs, checkpoints, shards, scores, pins, checkpoint_events, alembic_version, "
        "checkpoint_summary, checkpoint_scores, run_summary",
        "GRANT SELECT ON t",
    )
    admin_url = pg_server.admin_url  # type: ignore[attr-defined]
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    dbs = [f"ckptdb_t_race_{uuid.uuid4().hex[:8]}" for _ in range(4)]
    with admin.connect() as c:
        for d in dbs:
            c.execute(text(f'CREATE DATABASE "{d}"'))
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(dbs))

    def run(d: str) -> None:
        try:
            with psycopg.connect(libpq(make_url(admin_url).set(database=d).render_as_string(False))) as conn:
                conn.execute("CREATE TABLE t (x int)")
                barrier.wait()
                conn.execute(sql)
        except BaseException as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(d,)) for d in dbs]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == []
        for d in dbs:
            eng = create_engine(make_url(admin_url).set(database=d))
            with eng.connect() as c:
                assert c.execute(text("SELECT has_table_privilege(:r, 't', 'SELECT')"), {"r": role}).scalar()
                assert c.execute(text("SELECT to_regprocedure('ckptdb_sql.run_query(text)') IS NOT NULL")).scalar()
            eng.dispose()
    finally:
        with admin.connect() as c:
            for d in dbs:
                c.execute(text(f'DROP DATABASE IF EXISTS "{d}" WITH (FORCE)'))
            c.execute(text(f'DROP ROLE IF EXISTS "{role}"'))
        admin.dispose()


# -- item 9: SQLite ------------------------------------------------------------------------------


def test_sqlite_sql_attacks_are_refused_with_no_side_effect(tmp_path: Path, sqlite_template: Path) -> None:
    db = tmp_path / "catalog.db"
    shutil.copy(sqlite_template, db)
    url = f"sqlite:///{db}"
    sqldata.build(tmp_path, url)
    dispose_engines()
    before = counts(url)
    attacks = [
        f"ATTACH DATABASE '{tmp_path / 'new.db'}' AS x",
        f"VACUUM INTO '{tmp_path / 'copy.db'}'",
        "VACUUM",
        "WITH x AS (SELECT 1) DELETE FROM runs",
        "WITH x AS (SELECT 1) INSERT INTO pins(run_id, step_nr, label) SELECT 1, 1, 'x' FROM x",
        "PRAGMA journal_mode = DELETE",
        "PRAGMA query_only = OFF",
        "PRAGMA wal_checkpoint(TRUNCATE)",
        "SELECT load_extension('/nonexistent/ext')",
        "SELECT 1; DELETE FROM runs",
        "DROP TABLE runs",
        "CREATE TEMP TABLE t AS SELECT 1",
    ]
    for q, (rc, err) in zip(attacks, cli_sql_many(url, attacks), strict=True):
        assert rc == 2 and "ckptdb: error:" in err and "Traceback" not in err, (q, err)
    assert not (tmp_path / "new.db").exists() and not (tmp_path / "copy.db").exists()
    assert counts(url) == before
    engine = create_engine(url)
    with engine.connect() as c:
        assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    engine.dispose()
    endless = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) SELECT count(*) FROM n"
    r = cli("sql", "--url", url, "--timeout", "1", endless)
    assert r.returncode == 2 and "timeout" in r.stderr, r.stderr


# -- item 11: secrets in URL query parameters ----------------------------------------------------

SECRETS = ("s3cretPw", "s3cretSsl", "s3cretUser")


def test_masked_hides_query_secrets() -> None:
    u = "postgresql+psycopg://me:s3cretUser@h:1/db?password=s3cretPw&sslpassword=s3cretSsl&passfile=/p/pgpass"
    m = masked(u)
    assert not any(s in m for s in SECRETS)
    assert "passfile=%2Fp%2Fpgpass" in m and "password=***" in m and "sslpassword=***" in m and "me:***@" in m
    assert scrub("conninfo host=h password=s3cretPw sslpassword='a b' user=me") == (
        "conninfo host=h password=*** sslpassword=*** user=me"
    )
    assert "s3cretPw" not in scrub("failed for postgresql://me:s3cretPw@h/db")
    assert scrub("anything s3cretSsl here", u) == "anything *** here"


def test_refused_connection_never_shows_a_query_secret(tmp_path: Path) -> None:
    bad = "postgresql+psycopg://me:s3cretUser@127.0.0.1:1/db?password=s3cretPw&sslpassword=s3cretSsl&connect_timeout=3"
    with pytest.raises(CatalogError) as err:
        Catalog(bad)
    for shown in (str(err.value), repr(err.value)):
        assert not any(s in shown for s in SECRETS), shown
    for args in (["sql", "SELECT 1"], ["runs"], ["db", "current"], ["db", "upgrade"], ["show", "r", "1"]):
        r = cli(*args, "--url", bad)
        assert r.returncode != 0
        assert not any(s in r.stdout + r.stderr for s in SECRETS), (args, r.stdout, r.stderr)
        assert "password=***" in r.stderr, (args, r.stderr)
    env = {**os.environ, "CKPTDB_URL": bad}
    r = cli("runs", env=env)
    assert r.returncode == 2 and not any(s in r.stdout + r.stderr for s in SECRETS), r.stderr


@pytest.mark.parametrize("catalog_url", PG_ONLY, indirect=True)
def test_manager_repr_hides_query_password(tmp_path: Path, catalog_url: str) -> None:
    url = catalog_url + "?password=s3cretPw&sslpassword=s3cretSsl"  # trust auth: ignored by the server
    m = FileCheckpointManager(tmp_path / "c", catalog=url)
    assert not any(s in repr(m) + repr(m.catalog) for s in SECRETS), repr(m)
    r = cli("db", "current", "--url", url)
    assert r.returncode == 0 and not any(s in r.stdout + r.stderr for s in SECRETS), r.stdout


# -- network filesystems -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fstype", "magic", "network"),
    [
        ("ext4", 0xEF53, None),
        ("xfs", 0x58465342, None),
        ("tmpfs", 0x01021994, None),
        ("btrfs", 0x9123683E, None),
        ("overlay", 0x794C7630, None),
        ("fuse.fuse-overlayfs", 0x65735546, None),
        ("nfs", 0x6969, "nfs"),
        ("nfs4", 0x6969, "nfs4"),
        ("cifs", 0xFF534D42, "cifs"),
        ("smb3", 0xFE534D42, "smb3"),
        ("lustre", 0x0BD00BD0, "lustre"),
        ("gpfs", 0x47504653, "gpfs"),
        ("ceph", 0x00C36400, "ceph"),
        ("9p", 0x01021997, "9p"),
        ("fuse.sshfs", 0x65735546, "fuse.sshfs"),
        ("fuse.gcsfuse", 0x65735546, "fuse.gcsfuse"),
        (None, 0x6969, "nfs"),
        (None, 0xFF534D42, "cifs"),
        (None, 0xEF53, None),
        ("beegfs", None, "beegfs"),
    ],
)
def test_network_filesystem_verdicts(fstype: str | None, magic: int | None, network: str | None) -> None:
    assert netfs.verdict(fstype, magic) == network


def test_mountinfo_parsing() -> None:
    info = "\n".join(
        [
            "22 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw",
            "40 22 0:50 / /mnt/shared rw - nfs4 srv:/export rw,vers=4.2",
            r"41 40 0:51 / /mnt/shared/my\040scratch rw - tmpfs tmpfs rw",
            "42 22 0:52 / /home/u/remote rw - fuse.sshfs u@h:/ rw",
        ]
    )
    assert netfs.mount_fstype(Path("/mnt/shared/ckpt/catalog.db"), info) == "nfs4"
    assert netfs.mount_fstype(Path("/mnt/shared/my scratch/c.db"), info) == "tmpfs"
    assert netfs.mount_fstype(Path("/mnt/sharedx/c.db"), info) == "ext4"
    assert netfs.mount_fstype(Path("/home/u/remote/x"), info) == "fuse.sshfs"


def _mount(*args: str) -> None:
    r = subprocess.run(["mount", *args], capture_output=True, text=True, pass_fds=_mount.fds)
    if r.returncode != 0:
        pytest.skip(f"this machine cannot mount ({' '.join(args[:3])}): {r.stderr.strip()}")


_mount.fds = ()  # type: ignore[attr-defined]


def test_local_tmpfs_catalog_is_allowed(tmp_path: Path) -> None:
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    _mount("-t", "tmpfs", "-o", "size=64m", "ckptdb-test", str(mnt))
    try:
        assert netfs.network_filesystem(mnt / "catalog.db") is None
        assert netfs.mount_fstype(mnt) == "tmpfs"
        m = FileCheckpointManager(mnt / "c")
        m.begin_checkpoint(1)
        m.save_state({"x": 1})
        m.commit_checkpoint()
        dispose_engines()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_sqlite_catalog_on_a_fuse_sshfs_mount_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real FUSE mount of type fuse.sshfs (its connection aborted at once: no daemon needed)."""
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse on this machine")
    mnt = tmp_path / "remote"
    mnt.mkdir()
    fd = os.open("/dev/fuse", os.O_RDWR)
    os.set_inheritable(fd, True)
    _mount.fds = (fd,)  # type: ignore[attr-defined]
    try:
        _mount("-i", "-t", "fuse.sshfs", "-o", f"fd={fd},rootmode=40000,user_id=0,group_id=0", "u@h:/x", str(mnt))
    finally:
        _mount.fds = ()  # type: ignore[attr-defined]
        os.close(fd)  # aborts the connection: every access fails fast instead of hanging
    try:
        assert netfs.network_filesystem(mnt / "catalog.db") == "fuse.sshfs"
        url = f"sqlite:///{mnt / 'catalog.db'}"
        with pytest.raises(CatalogUnavailableError, match=r"network filesystem \(fuse.sshfs\).*PostgreSQL") as err:
            Catalog(url)
        assert netfs.ALLOW_ENV in str(err.value)
        r = cli("runs", "--dir", str(mnt))
        assert r.returncode == 2 and "network filesystem" in r.stderr and "PostgreSQL" in r.stderr, r.stderr
        monkeypatch.setenv(netfs.ALLOW_ENV, "1")  # the override lets it through (to fail on the dead mount)
        with pytest.raises(CatalogError) as err2:
            Catalog(url)
        assert "network filesystem" not in str(err2.value)
    finally:
        dispose_engines()
        subprocess.run(["umount", "-l", str(mnt)], check=False)
