"""The CLI as scripts use it: real subprocesses for exit codes, in-process calls for output."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ckptdb import FileCheckpointManager
from ckptdb.catalog import migrate
from ckptdb.cli import build_parser, main
from tests.helpers import save

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ckptdb.cli", *args], capture_output=True, text=True, env=env)


def test_ls_runs_and_checkpoints(tmp_path: Path, catalog_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    m = FileCheckpointManager(tmp_path / "c", catalog=catalog_url, run="exp1")
    save(m, 10, score=0.5)
    save(m, 20, score=0.25)
    m.delete_checkpoint(10)
    assert main(["ls", "--url", catalog_url]) == 0
    out = capsys.readouterr().out
    assert "exp1" in out and "20" in out
    assert main(["ls", "--url", catalog_url, "exp1", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["step"], r["state"]) for r in rows] == [(20, "committed")]
    assert rows[0]["scores"] == {"score": 0.25} and rows[0]["bytes"] > 0
    assert main(["ls", "--url", catalog_url, "exp1", "--all"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"10\s+deleted", out) and re.search(r"20\s+committed", out)


def test_db_commands(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    r = run_cli("db", "current", "--url", url)
    assert r.returncode == 1 and "(none)" in r.stdout
    r = run_cli("db", "upgrade", "--url", url)
    assert r.returncode == 0, r.stderr
    assert f"(empty) -> {migrate.head_revision()}" in r.stdout
    r = run_cli("db", "current", "--url", url, "--json")
    assert json.loads(r.stdout)["up_to_date"] is True
    history = run_cli("db", "history").stdout
    assert "0001" in history and "0002  Analysis views" in history


def test_errors_are_clear_and_passwords_hidden() -> None:
    r = run_cli("ls", "--url", "postgresql+psycopg://alice:s3cret@127.0.0.1:1/db")
    assert r.returncode == 2
    assert "s3cret" not in r.stderr and "***" in r.stderr and "unavailable" in r.stderr
    r = run_cli("ls", env={"PATH": "/usr/bin"})
    assert r.returncode == 2 and "--url" in r.stderr
    r = run_cli("ls", "--url", "not a url")
    assert r.returncode == 2 and "invalid catalog URL" in r.stderr


def test_ls_of_unknown_run(tmp_path: Path, catalog_url: str) -> None:
    r = run_cli("ls", "--url", catalog_url, "nope")
    assert r.returncode == 2 and "no run named 'nope'" in r.stderr


def test_every_command_is_documented() -> None:
    doc = (ROOT / "docs" / "cli.md").read_text()
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    names = []
    for name, p in sub.choices.items():  # type: ignore[union-attr]
        nested = [a for a in p._actions if a.__class__.__name__ == "_SubParsersAction"]
        names += [f"{name} {n}" for n in nested[0].choices] if nested else [name]  # type: ignore[union-attr]
    for name in names:
        assert f"ckptdb {name}" in doc, f"`ckptdb {name}` is not documented in docs/cli.md"


def test_catalog_commands_do_not_import_torch(tmp_path: Path, catalog_url: str) -> None:
    """``import ckptdb``, the catalog-only commands and verify / gc / prune start without torch
    (docs/cli.md, "Start-up")."""
    mgr = FileCheckpointManager(tmp_path / "ck", catalog=catalog_url, run="r1")
    save(mgr, 1)
    mgr.close()
    probe = (
        "import sys, ckptdb, ckptdb.cli\n"
        "for argv in sys.argv[1:]:\n"
        "    rc = ckptdb.cli.main(argv.split('|'))\n"
        "    assert rc == 0, (argv, rc)\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n"
    )
    cmds = [
        f"ls|--url|{catalog_url}",
        f"runs|--url|{catalog_url}",
        f"show|--url|{catalog_url}|r1|1",
        f"sql|--url|{catalog_url}|SELECT count(*) AS n FROM checkpoints",
        f"db|current|--url|{catalog_url}",
        # the commands that read or delete files: hashing, directory work and the catalog only
        f"verify|--url|{catalog_url}|r1|--all",
        f"gc|--url|{catalog_url}",
        f"prune|--url|{catalog_url}|r1|--keep-last|1",
    ]
    save_more = FileCheckpointManager(tmp_path / "ck", catalog=catalog_url, run="r1")
    save(save_more, 2)  # so that prune deletes step 1
    save_more.close()
    r = subprocess.run([sys.executable, "-c", probe, *cmds], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]", r.stdout[-500:]
    assert (tmp_path / "ck" / "step_2").is_dir() and not (tmp_path / "ck" / "step_1").exists()
    # the names that need torch still import it on first use
    r = subprocess.run(
        [sys.executable, "-c", "import sys, ckptdb; ckptdb.FileCheckpointManager; print('torch' in sys.modules)"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 0 and r.stdout.strip() == "True", r.stderr
