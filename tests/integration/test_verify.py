"""Verification: `ckptdb verify`, corruption-aware loading and resume, retention that never counts
damaged checkpoints, and per-shard hash algorithms (SQLite always, PostgreSQL with --db-url)."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest

from ckptdb import (
    CheckpointCorruptError,
    FileCheckpointManager,
    KeepLast,
    LoadOptions,
    SaveOptions,
)
from ckptdb.catalog import Catalog
from ckptdb.cli import main
from ckptdb.storage.hashing import hash_file
from ckptdb.verify import Progress, verify
from tests.helpers import assert_state_equal, make_state, save, sql


def flip_byte(path: Path, offset: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture
def mgr(tmp_path: Path, catalog_url: str) -> FileCheckpointManager:
    m = FileCheckpointManager(tmp_path / "ckpt", catalog=catalog_url, run="exp")
    for step in (10, 20, 30):
        save(m, step, score=float(step))
    return m


def states(url: str) -> dict[int, tuple[str, str | None]]:
    rows = sql(url, "SELECT step_nr, state, verify_result FROM checkpoints WHERE state <> 'aborted'")
    return {s: (st, vr) for s, st, vr in rows}


def test_verify_clean_run_records_ok(mgr: FileCheckpointManager, catalog_url: str) -> None:
    report = verify(Catalog(catalog_url), run="exp")
    assert report.ok and [r.step_nr for r in report.results] == [10, 20, 30]
    assert all(r.result == "ok" and r.files_checked == 3 and r.bytes_hashed > 0 for r in report.results)
    assert states(catalog_url) == {10: ("committed", "ok"), 20: ("committed", "ok"), 30: ("committed", "ok")}
    (n,) = sql(catalog_url, "SELECT count(*) FROM checkpoints WHERE verified_at IS NOT NULL")[0]
    assert n == 3


def test_verify_finds_bitflip_truncation_deletion_and_additions(
    mgr: FileCheckpointManager, catalog_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    d = mgr.checkpoint_dir
    before = hash_file(d / "step_10" / "rank_0.pt", "xxh3_128")[1]
    flip_byte(d / "step_10" / "rank_0.pt")  # same size, different digest
    after = hash_file(d / "step_10" / "rank_0.pt", "xxh3_128")[1]
    with open(d / "step_20" / "model.pt", "r+b") as f:  # truncated
        f.truncate(100)
    (d / "step_30" / "notes.txt").write_text("added behind the catalog's back")
    save(mgr, 40)
    import shutil

    shutil.rmtree(d / "step_40")  # deleted behind the catalog's back

    rc = main(["verify", "--url", catalog_url, "exp"])
    out = capsys.readouterr().out
    assert rc == 1
    assert f"rank_0.pt: digest mismatch: expected xxh3_128:{before}, actual xxh3_128:{after}" in out
    assert "model.pt: size mismatch: expected" in out and "actual 100 bytes" in out
    assert "notes.txt: not in the catalog" in out
    assert "MISSING" in out and "4 checkpoint(s) verified, 4 with problems" in out
    assert states(catalog_url) == {
        10: ("corrupt", "corrupt"),
        20: ("corrupt", "corrupt"),
        30: ("committed", "extra"),
        40: ("missing", "missing"),
    }
    # the state history says why
    (reason,) = sql(catalog_url, "SELECT reason FROM checkpoint_events WHERE to_state = 'corrupt' ORDER BY id")[0]
    assert "rank_0.pt" in reason and before in reason
    # resume skips the damaged ones: 30 has only an extra file, so it is the newest intact checkpoint
    step, state = mgr.load_last_checkpoint()
    assert step == 30
    assert_state_equal(state, make_state(30))
    # a second run reports the same (damaged ones are re-checked only with --all)
    assert main(["verify", "--url", catalog_url, "exp", "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False and [c["step"] for c in doc["checkpoints"]] == [30]
    assert main(["verify", "--url", catalog_url, "--all", "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    by_step = {c["step"]: c for c in doc["checkpoints"]}
    assert set(by_step) == {10, 20, 30, 40}
    (p,) = by_step[10]["problems"]
    assert p == {
        "path": "rank_0.pt",
        "problem": "digest",
        "expected": f"xxh3_128:{before}",
        "actual": f"xxh3_128:{after}",
    }


def test_restored_checkpoint_becomes_committed_again(mgr: FileCheckpointManager, catalog_url: str) -> None:
    f = mgr.checkpoint_dir / "step_20" / "rank_0.pt"
    good = f.read_bytes()
    flip_byte(f)
    assert not verify(Catalog(catalog_url), run="exp", step_nr=20).ok
    assert states(catalog_url)[20][0] == "corrupt"
    f.write_bytes(good)  # restored from a backup
    assert verify(Catalog(catalog_url), run="exp", step_nr=20).results == []  # not re-checked by default
    report = verify(Catalog(catalog_url), run="exp", step_nr=20, include_damaged=True)
    assert report.ok and report.results[0].state_after == "committed"
    assert states(catalog_url)[20] == ("committed", "ok")
    assert_state_equal(mgr.load_checkpoint(20), make_state(20))


def test_verify_cli_selection_progress_and_errors(
    mgr: FileCheckpointManager, catalog_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["verify", "--url", catalog_url, "exp", "--step", "20", "--progress"]) == 0
    out = capsys.readouterr()
    assert "OK       exp  step 20" in out.out and "1 checkpoint(s) verified, 0 with problems" in out.out
    assert "verify" in out.err and "━" in out.err and "100%" in out.err  # --progress: a bar even on a pipe
    assert main(["verify", "--url", catalog_url, "nope"]) == 2
    assert "no run named 'nope'" in capsys.readouterr().err
    assert main(["verify", "--dir", str(mgr.checkpoint_dir / "nowhere")]) == 2
    assert "ckptdb: error" in capsys.readouterr().err


def test_progress_bar_draws_to_its_stream() -> None:
    out = io.StringIO()
    bar = Progress(1000, out)
    bar.set_label("run step 1")
    for _ in range(10):
        bar(100)
    bar.close()
    text_ = out.getvalue()
    assert "100%" in text_ and "run step 1" in text_ and text_.endswith("\n")


def test_load_detects_and_records_corruption(mgr: FileCheckpointManager, catalog_url: str) -> None:
    flip_byte(mgr.checkpoint_dir / "step_30" / "rank_0.pt")
    with pytest.raises(CheckpointCorruptError, match=r"rank_0\.pt") as ei:
        mgr.load_checkpoint(30)
    assert ei.value.expected.startswith("xxh3_128:") and ei.value.actual != ei.value.expected
    assert states(catalog_url)[30][0] == "corrupt"
    # later loads refuse it from the catalog's word alone
    with pytest.raises(CheckpointCorruptError, match="corrupt"):
        mgr.load_checkpoint(30)


def test_size_only_loading_still_catches_truncation(tmp_path: Path, catalog_url: str) -> None:
    m = FileCheckpointManager(tmp_path / "c", catalog=catalog_url, load_options=LoadOptions(verify="size"))
    save(m, 1)
    with open(m.checkpoint_dir / "step_1" / "rank_0.pt", "ab") as f:
        f.write(b"x")
    with pytest.raises(CheckpointCorruptError, match="bytes"):
        m.load_checkpoint(1)


def test_resume_falls_back_past_a_corrupt_newest_with_a_warning(
    mgr: FileCheckpointManager, catalog_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    flip_byte(mgr.checkpoint_dir / "step_30" / "model.pt")
    with caplog.at_level(logging.WARNING, logger="ckptdb"):
        step, state = mgr.load_last_checkpoint()
    assert step == 20
    assert_state_equal(state, make_state(20))
    assert any("step 30 is damaged" in r.getMessage() for r in caplog.records)
    assert states(catalog_url)[30] == ("corrupt", "corrupt")
    # a missing newest one is skipped the same way
    import shutil

    shutil.rmtree(mgr.checkpoint_dir / "step_20")
    assert mgr.load_last_checkpoint()[0] == 10
    assert states(catalog_url)[20] == ("missing", "missing")


def test_resume_without_fallback_raises(tmp_path: Path, catalog_url: str) -> None:
    m = FileCheckpointManager(tmp_path / "c", catalog=catalog_url, load_options=LoadOptions(fallback=False))
    save(m, 1)
    save(m, 2)
    flip_byte(m.checkpoint_dir / "step_2" / "rank_0.pt")
    with pytest.raises(CheckpointCorruptError, match="step 2"):
        m.load_last_checkpoint()
    assert states(catalog_url)[2][0] == "corrupt"  # recorded even when raising


def test_retention_never_counts_damaged_checkpoints(mgr: FileCheckpointManager, catalog_url: str) -> None:
    save(mgr, 40, score=40.0)
    flip_byte(mgr.checkpoint_dir / "step_40" / "rank_0.pt")
    assert not verify(Catalog(catalog_url), run="exp", step_nr=40).ok
    # keep_last(2) counts only committed checkpoints: 20 and 30 stay, the corrupt 40 is neither
    # counted nor deleted (it stays for inspection)
    assert mgr.keep_last_n_checkpoints(2) == [10]
    assert mgr.get_step_numbers() == [20, 30]
    assert states(catalog_url)[40][0] == "corrupt"
    # damage nobody has noticed yet: retention stats the files it is about to keep first
    with open(mgr.checkpoint_dir / "step_30" / "rank_0.pt", "r+b") as f:
        f.truncate(10)
    assert mgr.keep_last_n_checkpoints(1) == []  # 30 is found damaged: 20 is the one to keep
    assert mgr.get_step_numbers() == [20]
    assert states(catalog_url)[30][0] == "corrupt"
    assert mgr.keep_best_n_checkpoints(1) == []
    assert_state_equal(mgr.load_last_checkpoint()[1], make_state(20))


def test_retention_policy_on_manager_skips_damaged(tmp_path: Path, catalog_url: str) -> None:
    m = FileCheckpointManager(tmp_path / "c", catalog=catalog_url, retention=KeepLast(2))
    save(m, 1)
    save(m, 2)
    (m.checkpoint_dir / "step_2" / "rank_0.pt").unlink()
    save(m, 3)  # keep_last(2) would keep 2 and 3 and delete 1; 2 is damaged, so 1 is kept instead
    assert m.get_step_numbers() == [1, 3]
    assert states(catalog_url)[2][0] == "missing"


@pytest.mark.parametrize("algorithm", ["sha256", "blake3"])
def test_old_rows_keep_verifying_after_the_default_changes(
    tmp_path: Path, catalog_url: str, algorithm: str, capsys: pytest.CaptureFixture[str]
) -> None:
    d = tmp_path / "c"
    old = FileCheckpointManager(d, catalog=catalog_url, save_options=SaveOptions(hash_algorithm=algorithm))
    save(old, 1)
    new = FileCheckpointManager(d, catalog=catalog_url)  # default (xxh3_128)
    save(new, 2)
    rows = sql(
        catalog_url,
        "SELECT c.step_nr, s.hash_algorithm, length(s.digest) FROM shards s JOIN checkpoints c "
        "ON c.id = s.checkpoint_id ORDER BY c.step_nr, s.path",
    )
    assert {(s, a) for s, a, _ in rows} == {(1, algorithm), (2, "xxh3_128")}
    assert {n for s, _, n in rows if s == 1} == {64}  # 256-bit digests
    assert_state_equal(new.load_checkpoint(1), make_state(1))
    assert main(["verify", "--url", catalog_url]) == 0
    assert "2 checkpoint(s) verified, 0 with problems" in capsys.readouterr().out
    flip_byte(d / "step_1" / "rank_0.pt")
    assert main(["verify", "--url", catalog_url, "--json"]) == 1
    (bad,) = [c for c in json.loads(capsys.readouterr().out)["checkpoints"] if c["result"] != "ok"]
    assert bad["step"] == 1 and bad["problems"][0]["expected"].startswith(f"{algorithm}:")


def test_unknown_hash_algorithm_is_refused(tmp_path: Path, catalog_url: str) -> None:
    with pytest.raises(ValueError, match="unknown hash algorithm 'md5'"):
        FileCheckpointManager(tmp_path / "c", catalog=catalog_url, save_options=SaveOptions(hash_algorithm="md5"))
