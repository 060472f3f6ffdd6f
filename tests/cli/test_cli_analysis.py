"""`ckptdb sql`, `runs`, `show`, `plot`: output for people and for scripts, exit codes."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ckptdb.cli import main
from tests.catalog import sqldata


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ckptdb.cli", *args], capture_output=True, text=True)


def test_sql_formats_and_refusal(tmp_path: Path, catalog_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    sqldata.build(tmp_path, catalog_url)
    q = "SELECT step_nr, state, pinned, committed_at FROM checkpoint_summary WHERE run_name = 'exp1' ORDER BY step_nr"
    assert main(["sql", "--url", catalog_url, q]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["step_nr", "state", "pinned", "committed_at"]
    assert "(6 rows)" in out
    assert main(["sql", "--url", catalog_url, "--json", q]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["step_nr"], r["state"], r["pinned"]) for r in rows][2] == (300, "committed", 1)
    assert main(["sql", "--url", catalog_url, "--csv", q]) == 0
    table = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert table[0] == ["step_nr", "state", "pinned", "committed_at"] and len(table) == 7
    assert table[1][3].startswith("20")
    r = run_cli("sql", "--url", catalog_url, "DELETE FROM checkpoints")
    assert r.returncode == 2 and "read-only" in r.stderr, r.stderr
    assert main(["sql", "--url", catalog_url, "SELECT COUNT(*) AS n FROM checkpoints", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"n": 10}]


def test_runs_show_plot(tmp_path: Path, catalog_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    sqldata.build(tmp_path, catalog_url)
    assert main(["runs", "--url", catalog_url]) == 0
    out = capsys.readouterr().out
    assert [line.split()[0] for line in out.splitlines()[2:]] == ["empty-run", "exp1", "exp2"]
    assert main(["runs", "--url", catalog_url, "--json"]) == 0
    runs = {r["run_name"]: r for r in json.loads(capsys.readouterr().out)}
    assert runs["exp1"]["committed"] == 3 and runs["exp1"]["damaged"] == 1 and runs["exp1"]["bytes_on_disk"] > 0

    assert main(["show", "--url", catalog_url, "exp1", "300"]) == 0
    out = capsys.readouterr().out
    assert "[committed]" in out and "keep-me" in out and "rank_0.pt" in out and "xxh3_128:" in out
    assert main(["show", "--url", catalog_url, "exp1", "500", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["state"] == "corrupt" and shown["metadata"] == {"lr": 0.001, "tokens_seen": 500 * 4096}
    assert shown["model_metadata"]["model_family"] == "toy"
    assert [e["to_state"] for e in shown["history"]] == ["pending", "committed", "corrupt"]
    assert "rank_0.pt" in shown["history"][-1]["reason"]
    assert {f["path"] for f in shown["files"]} == {"model.pt", "rank_0.pt", "metadata.pt", "score.txt"}
    assert main(["show", "--url", catalog_url, "exp1", "100", "--json"]) == 0
    gone = json.loads(capsys.readouterr().out)
    assert gone["state"] == "deleted" and gone["delete_reason"].startswith("pruned by keep_last(3)")
    assert all(f["removed"] for f in gone["files"])
    assert main(["show", "--url", catalog_url, "exp1", "999"]) == 2
    assert "no checkpoint at step 999" in capsys.readouterr().err
    assert main(["show", "--url", catalog_url, "nope", "1"]) == 2

    png = tmp_path / "curve.png"
    args = ["plot", "--url", catalog_url, "exp1", "--metric", "valid_loss", "--lower-better", "-o", str(png)]
    assert main(args) == 0
    assert "6 checkpoints" in capsys.readouterr().out
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    assert main(["plot", "--url", catalog_url, "exp1", "--metric", "bleu", "-o", str(png)]) == 2
