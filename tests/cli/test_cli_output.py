"""The CLI's output contract: --json everywhere, plain text when piped, rich on a terminal, one-line errors.

Terminal runs are real: the command runs in a subprocess whose stdout and stderr are a pseudo-terminal
(the ``pty`` module), so rich sees a TTY exactly as on a user's screen.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path
from typing import Any

import pytest

from ckptdb import FileCheckpointManager
from ckptdb.catalog import Catalog, migrate
from ckptdb.cli import build_parser, main
from ckptdb.cli_output import EXIT_FINDINGS, EXIT_OK, EXIT_USAGE
from tests.helpers import save, sql

ROOT = Path(__file__).resolve().parents[2]
ANSI = re.compile(r"\x1b\[")
COLOUR = re.compile(r"\x1b\[[0-9;]*(3[0-7]|38;5;\d+|9[0-7])m")  # a foreground colour, not just bold
STEPS = [10, 20, 30, 40, 50, 60]


@pytest.fixture(autouse=True)
def _no_forced_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("FORCE_COLOR", "TTY_COMPATIBLE", "NO_COLOR"):
        monkeypatch.delenv(var, raising=False)


def build(tmp_path: Path, url: str) -> Path:
    """Run 'exp': six committed checkpoints (score falls with the step), step 10 deleted, step 20 pinned."""
    d = tmp_path / "ckpts"
    m = FileCheckpointManager(d, catalog=url, run="exp")
    for s in STEPS:
        save(m, s, score=1.0 / s)
    m.delete_checkpoint(10)
    cat = Catalog(url, create=False)
    cat.pin(cat.get_run("exp").id, 20, "release-1")
    return d


def env_without_color() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE", "NO_COLOR")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def piped(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ckptdb.cli", *args],
        capture_output=True,
        text=True,
        env=env_without_color(),
        timeout=120,
    )


def on_terminal(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run the CLI with stdout and stderr on a 160x40 pseudo-terminal; (exit code, everything it drew)."""
    env = dict(env if env is not None else env_without_color(), TERM="xterm-256color")
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    p = subprocess.Popen([sys.executable, "-m", "ckptdb.cli", *args], stdin=slave, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return p.wait(timeout=120), b"".join(chunks).decode(errors="replace")


def out_json(capsys: pytest.CaptureFixture[str], argv: list[str], rc: int = EXIT_OK) -> Any:
    """``ckptdb ARGV --json``: its output, parsed (and free of escape sequences)."""
    capsys.readouterr()
    argv = argv if "--json" in argv else [*argv, "--json"]
    assert main(argv) == rc, argv
    captured = capsys.readouterr()
    assert not ANSI.search(captured.out + captured.err)
    return json.loads(captured.out)


# -- --json ----------------------------------------------------------------------------------


def test_every_command_but_ui_has_json() -> None:
    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    missing = []
    for name, p in sub.choices.items():
        nested = [a for a in p._actions if a.__class__.__name__ == "_SubParsersAction"]
        parsers = {f"{name} {n}": q for n, q in nested[0].choices.items()} if nested else {name: p}
        for full, q in parsers.items():
            if full != "ui" and not any("--json" in a.option_strings for a in q._actions):
                missing.append(full)
    assert not missing, f"no --json: {missing}"


def test_json_matches_the_catalog(tmp_path: Path, catalog_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    build(tmp_path, catalog_url)
    u = ["--url", catalog_url]
    states = dict(
        sql(
            catalog_url,
            "SELECT c.step_nr, c.state FROM checkpoints c JOIN runs r ON r.id = c.run_id WHERE r.name = 'exp'",
        )
    )
    assert states == {
        10: "deleted",
        20: "committed",
        30: "committed",
        40: "committed",
        50: "committed",
        60: "committed",
    }

    runs = out_json(capsys, ["ls", *u])
    assert [(r["run"], r["committed"], r["last_step"]) for r in runs] == [("exp", 5, 60)]
    live = out_json(capsys, ["ls", *u, "exp"])
    assert {r["step"]: r["state"] for r in live} == {s: st for s, st in states.items() if st != "deleted"}
    every = out_json(capsys, ["ls", *u, "exp", "--all"])
    assert {r["step"]: r["state"] for r in every} == states
    assert {r["step"]: r["scores"]["score"] for r in every} == pytest.approx({s: 1.0 / s for s in STEPS})

    summary = out_json(capsys, ["runs", *u])
    assert [(r["run_name"], r["committed"], r["deleted"], r["pins"]) for r in summary] == [("exp", 5, 1, 1)]
    detail = out_json(capsys, ["show", *u, "exp", "20"])
    assert detail["step"] == 20 and detail["state"] == "committed" and detail["pins"] == ["release-1"]
    n_files = sql(
        catalog_url,
        "SELECT COUNT(*) FROM shards s JOIN checkpoints c ON c.id = s.checkpoint_id "
        "JOIN runs r ON r.id = c.run_id WHERE r.name = 'exp' AND c.step_nr = 20 AND c.state = 'committed'",
    )
    assert len(detail["files"]) == n_files[0][0] > 0
    assert [e["to_state"] for e in detail["history"]][-1] == "committed"
    rows = out_json(capsys, ["sql", *u, "--json", "SELECT step_nr FROM checkpoints ORDER BY step_nr"])
    assert [r["step_nr"] for r in rows] == STEPS

    cur = out_json(capsys, ["db", "current", *u])
    assert cur == {"current": migrate.head_revision(), "head": migrate.head_revision(), "up_to_date": True}
    hist = out_json(capsys, ["db", "history", "--json"])
    assert hist[0]["revision"] == "0001" and hist[-1]["head"] is True
    up = out_json(capsys, ["db", "upgrade", *u, "--json"])
    assert up["before"] == up["after"] == migrate.head_revision()

    ver = out_json(capsys, ["verify", *u, "exp", "--json"])
    assert ver["ok"] is True and sorted(c["step"] for c in ver["checkpoints"]) == [20, 30, 40, 50, 60]
    plan = out_json(capsys, ["prune", *u, "exp", "--keep-last", "2", "--dry-run", "--json"])
    assert plan["dry_run"] is True and plan["delete"] == [30, 40] and plan["deleted"] == []
    assert sorted(k["step"] for k in plan["keep"]) == [20, 50, 60]
    gc = out_json(capsys, ["gc", *u, "--dry-run", "--json"])
    assert gc["dry_run"] is True and list(gc["runs"]) == ["exp"] and gc["refused"] == {}
    assert out_json(capsys, ["pin", *u, "exp", "30", "--label", "x", "--json"]) == {
        "run": "exp", "step": 30, "label": "x", "pinned": True,
    }  # fmt: skip
    assert out_json(capsys, ["unpin", *u, "exp", "--label", "x", "--json"]) == {
        "run": "exp", "label": "x", "removed": True,
    }  # fmt: skip
    gone = out_json(capsys, ["unpin", *u, "exp", "--label", "x", "--json"], rc=EXIT_FINDINGS)
    assert gone["removed"] is False
    assert sql(catalog_url, "SELECT step_nr FROM checkpoints WHERE state = 'committed' ORDER BY step_nr") == [
        (s,) for s in STEPS[1:]
    ]  # nothing of the above changed a checkpoint


# -- piped output ----------------------------------------------------------------------------


def test_piped_output_is_plain(tmp_path: Path, catalog_url: str) -> None:
    build(tmp_path, catalog_url)
    u = ["--url", catalog_url]
    for args in (["ls", *u, "exp", "--all"], ["verify", *u], ["prune", *u, "exp", "--keep-last", "3"], ["gc", *u]):
        r = piped(*args)
        assert r.returncode == 0, (args, r.stderr)
        assert not ANSI.search(r.stdout) and not ANSI.search(r.stderr), (args, r.stdout, r.stderr)
        assert "━" not in r.stderr and "\r" not in r.stderr
    r = piped("ls", *u, "exp")
    lines = r.stdout.splitlines()
    assert lines[1].split() == ["step", "state", "scores", "size", "files", "time"]
    assert set(lines[2].replace(" ", "")) == {"-"}
    assert [ln.split()[:2] for ln in lines[3:]] == [[str(s), "committed"] for s in (20, 40, 50, 60)]  # 20: pinned


# -- terminal --------------------------------------------------------------------------------


def test_terminal_colour_and_progress_bars(tmp_path: Path, catalog_url: str) -> None:
    build(tmp_path, catalog_url)
    u = ["--url", catalog_url]
    rc, screen = on_terminal("ls", *u, "exp", "--all")
    assert rc == 0 and COLOUR.search(screen), screen
    assert re.search(r"\x1b\[[0-9;]*m(committed)", screen) and "─" in screen  # rich's table, states coloured

    rc, screen = on_terminal("verify", *u, "exp")
    assert rc == 0, screen
    bar = [ln for ln in re.split(r"[\r\n]", screen) if "verify" in ln and "━" in ln]
    assert bar, screen
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", bar[-1])
    assert re.search(r"100%", plain) and re.search(r"[\d.]+ ?[kMG]?B/s", plain), plain  # throughput
    assert re.search(r"eta \d+:\d\d:\d\d", plain), plain  # time left
    assert re.search(r"OK\s+exp\s+step 60", ANSI.sub("", screen)) and COLOUR.search(screen)

    rc, screen = on_terminal("prune", *u, "exp", "--keep-last", "1")
    assert rc == 0, screen
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen)
    last = [ln for ln in re.split(r"[\r\n]", text) if ln.startswith("prune") and "━" in ln][-1]
    assert re.search(r"3/3 .*[\d.]+ ckpt/s .*eta \d+:\d\d:\d\d", last), last  # 30, 40, 50 deleted
    assert "kept 2, deleted 3" in text

    rc, screen = on_terminal("gc", *u)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen)
    assert rc == 0 and re.search(r"gc .*━.*1/1 .*[\d.]+ run/s .*eta \d+:\d\d:\d\d", text), text

    rc, screen = on_terminal("ls", *u, "exp", env=dict(env_without_color(), NO_COLOR="1"))
    assert rc == 0 and not COLOUR.search(screen) and "committed" in screen, screen


# -- errors and exit codes ---------------------------------------------------------------------


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("ckptdb: error: ") and re.search(r" \(hint: .+\)$", lines[0]), lines[0]
    return lines[0]


def test_each_error_is_one_line_with_a_hint(
    tmp_path: Path, catalog_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    d = build(tmp_path, catalog_url)
    u = ["--url", catalog_url]
    old = tmp_path / "old.db"
    migrate.upgrade(f"sqlite:///{old}", "0001")
    cases: list[tuple[list[str], str]] = [
        (["ls", "--bogus"], "unrecognized arguments"),  # argparse usage
        (["prune", *u, "exp"], "prune needs a policy"),  # InvalidArgumentError
        (["ls"], "no catalog given"),
        (["ls", "--url", "not a url"], "invalid catalog URL"),  # CatalogUnavailableError
        (["ls", "--url", f"sqlite:///{tmp_path}/nowhere/x.db"], "does not exist"),
        (["ls", *u, "nope"], "no run named 'nope'"),  # CheckpointNotFoundError
        (["show", *u, "exp", "999"], "999"),
        (["pin", *u, "exp", "10", "--label", "a"], "10"),  # a deleted step cannot be pinned
        (["sql", *u, "DELETE FROM checkpoints"], "read-only"),  # refused write
        (["ls", "--url", f"sqlite:///{old}"], "db upgrade"),  # SchemaOutOfDateError
    ]
    for argv, what in cases:
        assert main(argv) == EXIT_USAGE, argv
        captured = capsys.readouterr()
        line = one_error_line(captured.err)
        assert what in line, (argv, line)
        assert captured.out == "", (argv, captured.out)

    os.rename(d, tmp_path / "unmounted")  # an unavailable directory is refused, not judged
    for argv in (["verify", *u], ["gc", *u]):
        assert main(argv) == EXIT_USAGE, argv
        line = one_error_line(capsys.readouterr().err)
        assert "refusing to judge" in line and "mount" in line
    os.rename(tmp_path / "unmounted", d)

    r = piped("ls", "--url", "postgresql+psycopg://alice:s3cret@127.0.0.1:1/db")  # a real process, a real exit
    assert r.returncode == EXIT_USAGE and "s3cret" not in r.stderr and "***" in r.stderr
    one_error_line(r.stderr)


def test_findings_exit_1(tmp_path: Path, catalog_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    d = build(tmp_path, catalog_url)
    u = ["--url", catalog_url]
    victim = next(p for p in (d / "step_30").rglob("*") if p.is_file() and p.stat().st_size > 0)
    victim.write_bytes(b"x" * victim.stat().st_size)
    assert main(["verify", *u, "exp"]) == EXIT_FINDINGS
    out = capsys.readouterr().out
    assert re.search(r"CORRUPT\s+exp\s+step 30", out) and "1 with problems" in out
    assert main(["unpin", *u, "exp", "--label", "nope"]) == EXIT_FINDINGS
    assert main(["db", "current", "--url", f"sqlite:///{tmp_path / 'empty.db'}"]) == EXIT_FINDINGS


def test_exit_codes_are_documented() -> None:
    doc = (ROOT / "docs" / "cli.md").read_text()
    table = doc[doc.index("## Exit codes") :]
    for code in ("| 0 ", "| 1 ", "| 2 ", "| 130 ", "| 141 "):
        assert code in table, code
