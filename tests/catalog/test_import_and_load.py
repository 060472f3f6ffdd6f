"""`ckptdb import` of both fairseq2 layouts, then resume / retention / load_model / export on the result."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ckptdb import (
    CheckpointCorruptError,
    CheckpointNotFoundError,
    FileCheckpointManager,
    KeepLast,
    SaveOptions,
    UnsupportedCheckpointError,
    load_model,
)
from ckptdb.catalog import Catalog
from ckptdb.cli import main
from ckptdb.importer import import_directory
from ckptdb.storage.hashing import hash_file
from tests.catalog import fairseq2_dirs as fs2
from tests.helpers import assert_state_equal, make_state


def test_import_v03_then_resume_retention_and_load(tmp_path: Path, catalog_url: str) -> None:
    d = fs2.v03(tmp_path / "ckpts", {100: 0.9, 200: 0.5, 250: None}, tmp_step=300)
    before = fs2.snapshot(d)

    dry = import_directory(catalog_url, d, dry_run=True)
    assert dry.adopted == [100, 200, 250] and dry.skipped == {"step_300.tmp": "unfinished or ckptdb work directory"}
    assert Catalog(catalog_url).list_runs() == []  # a dry run records nothing

    rep = import_directory(catalog_url, d)
    assert rep.adopted == [100, 200, 250] and rep.already == []
    assert fs2.snapshot(d) == before  # the user's files are untouched (no token files either)
    cat = Catalog(catalog_url)
    run = cat.get_run(str(d))
    assert run.model_metadata == fs2.CARD
    rows = cat.checkpoints(run.id)
    assert [(c.step_nr, c.state, c.scores) for c in rows] == [
        (100, "committed", {"score": 0.9}),
        (200, "committed", {"score": 0.5}),
        (250, "committed", {}),
    ]
    shards = cat.shards(rows[0].id)
    assert [(s.path, s.kind) for s in shards] == [
        ("metadata.pt", "metadata"),
        ("model.pt", "model"),
        ("rank_0.pt", "rank"),
        ("score.txt", "score"),
    ]
    assert rows[0].user_metadata == {"data_epoch": 1, "config": {"lr": 0.01}}
    for s in shards:
        assert (s.size_bytes, s.digest) == hash_file(d / "step_100" / s.path, s.hash_algorithm)
    assert cat.events(rows[0].id)[0]["reason"].startswith("imported from")

    again = import_directory(catalog_url, d)
    assert again.adopted == [] and again.already == [100, 200, 250]

    # the catalog picks; the loader verifies and returns only the model entry and model.yaml
    sd, card = load_model(catalog_url, run=str(d), select="best", metric="score")
    assert_state_equal(sd, fs2.model_sd(100)) and card == fs2.CARD
    sd, _ = load_model(catalog_url, run=str(d), select="best", lower_better=True)
    assert_state_equal(sd, fs2.model_sd(200))

    # the manager resumes from the imported checkpoints and prunes them like its own
    m = FileCheckpointManager(d, catalog=catalog_url, save_options=SaveOptions(fsync=False))
    step, state = m.load_last_checkpoint()
    assert step == 250 and state["step_nr"] == 250
    assert_state_equal(state["model"], fs2.model_sd(250))
    m.begin_checkpoint(300)  # fairseq2's step_300.tmp leftover does not get in the way
    m.save_state(make_state(300))
    m.commit_checkpoint()
    assert m.apply_retention(KeepLast(2)) == [100, 200]
    assert not (d / "step_100").exists() and not (d / "step_200").exists() and (d / "step_250").exists()
    assert [c.state for c in m.get_checkpoints() if c.step_nr in (100, 200)] == ["deleted", "deleted"]
    assert import_directory(catalog_url, d).adopted == []


def test_load_model_selection_verification_and_errors(tmp_path: Path, catalog_url: str) -> None:
    d = tmp_path / "run"
    m = FileCheckpointManager(d, catalog=catalog_url, run="r1", save_options=SaveOptions(fsync=False))
    m.save_model_metadata(family="toy", config={"dim": 8})
    for step, loss in [(10, 3.0), (20, 1.0), (30, 2.0)]:
        m.begin_checkpoint(step)
        m.save_state(make_state(step))
        m.save_score(loss, metric="valid_loss")
        m.commit_checkpoint()
    m.pin(10, "first")
    want = {s: make_state(s)["model"] for s in (10, 20, 30)}
    for select, kw, step in [
        ("last", {}, 30),
        ("best", {"metric": "valid_loss", "lower_better": True}, 20),
        ("best", {"metric": "valid_loss"}, 10),
        ("first", {}, 10),
        (20, {}, 20),
    ]:
        sd, card = load_model(catalog_url, run="r1", select=select, **kw)
        assert_state_equal(sd, want[step])
        assert card is not None and card["model_family"] == "toy"
    with pytest.raises(CheckpointNotFoundError, match="no pin labelled 'nope'"):
        load_model(catalog_url, run="r1", select="nope")
    with pytest.raises(CheckpointNotFoundError, match="finite 'bleu'"):
        load_model(catalog_url, run="r1", select="best", metric="bleu")
    with pytest.raises(CheckpointNotFoundError, match="no run named"):
        load_model(catalog_url, run="r2")

    # safetensors export of the best, through the CLI
    out = tmp_path / "best.safetensors"
    rc = main(["export", "--url", catalog_url, "r1", "--best", "valid_loss", "--lower-better", "-o", str(out)])
    assert rc == 0
    assert_state_equal(load_file(out), want[20])

    # a damaged model file is refused and recorded
    p = d / "step_30" / "model.pt"
    data = bytearray(p.read_bytes())
    data[-30] ^= 0x55
    p.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorruptError, match=r"model\.pt"):
        load_model(catalog_url, run="r1")
    assert [c.state for c in m.get_checkpoints() if c.step_nr == 30] == ["corrupt"]
    assert main(["export", "--url", catalog_url, "r1", "--step", "30", "-o", str(out)]) == 2
    sd, _ = load_model(catalog_url, run="r1", select="last")  # the newest intact one by the catalog
    assert_state_equal(sd, want[20])


def test_import_head_layout_cli_and_sharded_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = fs2.head(tmp_path / "head", {1000: 0.25, 2000: 0.75}, tmp_step=3000)
    before = fs2.snapshot(d)
    assert main(["import", str(d), "--dry-run", "--json"]) == 0
    dry = json.loads(capsys.readouterr().out)
    assert dry["adopted"] == [1000, 2000] and "step_3000.tmp" in dry["skipped"]
    assert not (d / "catalog.db").exists()  # a dry run creates nothing
    cli = [sys.executable, "-m", "ckptdb.cli"]
    r = subprocess.run([*cli, "import", str(d), "--run", "head-run"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "adopted 2 checkpoint(s)" in r.stdout
    assert main(["import", str(d), "--run", "head-run"]) == 0
    assert "adopted 0 checkpoint(s); 2 already in the catalog" in capsys.readouterr().out
    assert fs2.snapshot(d) == before

    url = f"sqlite:///{d / 'catalog.db'}"
    cat = Catalog(url)
    run = cat.get_run("head-run")
    rows = cat.checkpoints(run.id)
    assert [(c.step_nr, c.scores, c.file_count) for c in rows] == [
        (1000, {"score": 0.25}, 4),
        (2000, {"score": 0.75}, 4),
    ]
    kinds = {s.path: s.kind for s in cat.shards(rows[0].id)}
    assert kinds == {
        "data_reader/dp_00.pt": "rank",
        "model/pp_00/tp_00/sdp_00.pt": "model",
        "optimizer/pp_00/tp_00/sdp_00.pt": "optimizer",
        "trainer/rank_00.pt": "rank",
    }
    sd, card = load_model(d, run="head-run", select="best")  # a single shard is the whole model
    assert_state_equal(sd, fs2.model_sd(2000)) and card == fs2.CARD

    sharded = fs2.head(tmp_path / "sharded", {5: 1.0}, sdp=2)
    import_directory(f"sqlite:///{sharded / 'catalog.db'}", sharded)
    with pytest.raises(UnsupportedCheckpointError, match="2 shards"):
        load_model(sharded)
    assert torch.load(sharded / "step_5" / "model" / "pp_00" / "tp_00" / "sdp_01.pt", weights_only=True)
