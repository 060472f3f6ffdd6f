"""`ckptdb verify`, `gc` and `prune` on s3:// runs (moto and SeaweedFS on loopback, a real catalog).

The CLI finds the server through the standard AWS environment, as a user's shell would.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import crc32c
import pytest
import torch

from ckptdb import FileCheckpointManager, cleanup
from ckptdb.catalog import Catalog
from ckptdb.cli import main
from ckptdb.errors import CheckpointDirUnavailableError
from ckptdb.verify import verify
from tests.helpers import make_state, save
from tests.s3_fixtures import Bucket

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "runs/exp1"


@pytest.fixture(params=["moto", "seaweedfs"])
def bucket(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Bucket:
    srv = request.getfixturevalue(f"{request.param}_server")
    for k, v in srv.env().items():
        monkeypatch.setenv(k, v)
    return Bucket(srv, srv.new_bucket())


def url_of(b: Bucket) -> str:
    return f"s3://{b.name}/{PREFIX}"


def keys(b: Bucket, under: str = "") -> list[str]:
    c = b.server.boto3_client()
    out: list[str] = []
    for page in c.get_paginator("list_objects_v2").paginate(Bucket=b.name, Prefix=f"{PREFIX}/{under}"):
        out += [o["Key"] for o in page.get("Contents", [])]
    return sorted(out)


def uploads(b: Bucket, under: str = "") -> list[str]:
    r = b.server.boto3_client().list_multipart_uploads(Bucket=b.name, Prefix=f"{PREFIX}/{under}")
    return [u["Key"] for u in r.get("Uploads", [])]


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(list(argv))
    return rc, capsys.readouterr().out


def committed(cat: Catalog, run_id: int) -> dict[int, object]:
    return {c.step_nr: c for c in cat.checkpoints(run_id, states=["committed"])}


def test_verify_gc_prune_on_s3(bucket: Bucket, catalog_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    b = bucket
    m = FileCheckpointManager(url_of(b), catalog=catalog_url)
    for step in (1, 2, 3, 4):
        save(m, step)
    run = m.run
    m.close()
    cat = Catalog(catalog_url)
    rows = {c.step_nr: c for c in cat.checkpoints(run.id)}

    rc, out = cli(capsys, "ls", "--url", catalog_url, run.name, "--json")
    assert rc == 0 and [c["step"] for c in json.loads(out)] == [1, 2, 3, 4]
    rc, out = cli(capsys, "pin", "--url", catalog_url, run.name, "4", "--label", "keep")
    assert rc == 0
    rc, out = cli(capsys, "show", "--url", catalog_url, run.name, "2")
    assert rc == 0 and "step_2." in out and b.name in out
    rc, out = cli(capsys, "unpin", "--url", catalog_url, run.name, "--label", "keep")
    assert rc == 0

    rc, out = cli(capsys, "verify", "--url", catalog_url, run.name, "--json")
    rep = json.loads(out)
    assert rc == 0 and [r["result"] for r in rep["checkpoints"]] == ["ok"] * 4
    assert all(r["directory"].startswith(f"s3://{b.name}/{PREFIX}/step_") for r in rep["checkpoints"])

    rc, out = cli(capsys, "verify", "--url", catalog_url, run.name, "--remote-checksum", "--json")
    rep = json.loads(out)
    assert rc == 0 and all(r["result"] == "ok" for r in rep["checkpoints"])
    assert all(r["bytes_hashed"] == 0 and "server's checksum" in r["note"] for r in rep["checkpoints"])

    # step 3: one object rewritten behind the catalog's back, same size, other bytes
    s3 = b.server.boto3_client()
    victim = f"{PREFIX}/{rows[3].directory}/{cat.shards(rows[3].id)[0].path}"
    body = bytearray(s3.get_object(Bucket=b.name, Key=victim)["Body"].read())
    body[-100] ^= 0xFF
    crc = base64.b64encode(crc32c.crc32c(bytes(body)).to_bytes(4, "big")).decode()
    s3.put_object(Bucket=b.name, Key=victim, Body=bytes(body), ChecksumCRC32C=crc)
    rc, out = cli(capsys, "verify", "--url", catalog_url, run.name, "--step", "3", "--remote-checksum", "--json")
    (r3,) = json.loads(out)["checkpoints"]
    assert rc == 1 and r3["result"] == "corrupt" and r3["state"] == "corrupt"
    # where the server keeps the new object's CRC32C, one HEAD finds it and nothing is downloaded; where
    # it keeps none for a plain PUT (moto), the object is re-hashed
    kinds = [p["problem"] for p in r3["problems"]]
    by_head = kinds == ["checksum"] and r3["bytes_hashed"] == 0
    assert by_head or (kinds == ["digest"] and r3["bytes_hashed"] > 0)

    # step 2: one object deleted: gc marks it missing; put back, gc heals it
    gone = f"{PREFIX}/{rows[2].directory}/{cat.shards(rows[2].id)[0].path}"
    saved = s3.get_object(Bucket=b.name, Key=gone)["Body"].read()
    s3.delete_object(Bucket=b.name, Key=gone)
    rc, out = cli(capsys, "gc", "--url", catalog_url, run.name, "--json")
    assert json.loads(out)["runs"][run.name]["marked_missing"] == [2]
    assert sorted(committed(cat, run.id)) == [1, 4]
    s3.put_object(Bucket=b.name, Key=gone, Body=saved)
    rc, out = cli(capsys, "gc", "--url", catalog_url, run.name, "--json")
    assert json.loads(out)["runs"][run.name]["healed"] == [2]
    assert sorted(committed(cat, run.id)) == [1, 2, 4]

    # an unknown prefix: reported, removed only with --remove-unknown
    s3.put_object(Bucket=b.name, Key=f"{PREFIX}/step_99/model.pt", Body=b"x")
    rc, out = cli(capsys, "gc", "--url", catalog_url, run.name, "--json")
    assert json.loads(out)["runs"][run.name]["foreign"] == ["step_99"] and keys(b, "step_99/")
    rc, out = cli(capsys, "gc", "--url", catalog_url, run.name, "--remove-unknown", "--json")
    assert json.loads(out)["runs"][run.name]["removed"] == ["step_99"] and not keys(b, "step_99/")

    # prune: the plan is carried out on the bucket
    rc, out = cli(capsys, "prune", "--url", catalog_url, run.name, "--keep-last", "1", "--json")
    rep = json.loads(out)
    assert rc == 0 and rep["deleted"] == [1, 2]
    assert sorted(committed(cat, run.id)) == [4]
    left = {k.split("/")[2] for k in keys(b)}
    assert left == {rows[3].directory, rows[4].directory} | ({"model.yaml"} & left)
    again = FileCheckpointManager(url_of(b), catalog=catalog_url)
    assert again.load_checkpoint(4)["model"].keys() == make_state(4)["model"].keys()
    again.close()


def test_gc_removes_a_dead_writers_objects_and_uploads(bucket: Bucket, catalog_url: str, tmp_path: Path) -> None:
    b = bucket
    m = FileCheckpointManager(url_of(b), catalog=catalog_url)
    save(m, 1)
    run = m.run
    m.close()
    script = tmp_path / "writer.py"
    script.write_text(
        "import sys, os, time\n"
        "import torch\n"
        "from ckptdb import FileCheckpointManager\n"
        "from ckptdb.catalog import Catalog\n"
        "m = FileCheckpointManager(sys.argv[1], catalog=sys.argv[2],"
        " storage_options={'part_size': 5 << 20, 'concurrency': 2})\n"
        "m.begin_checkpoint(2)\n"
        "m.save_state({'model': {'w': torch.randn(1000)}})\n"
        "(row,) = [c for c in Catalog(sys.argv[2]).checkpoints(m.run.id) if c.state == 'pending']\n"
        "st = m.store\n"
        "w = st.client.open_writer(st.bucket, st.key(row.directory, 'rank_0.pt'))\n"
        "w.write(os.urandom(6 << 20))\n"
        "deadline = time.time() + 30\n"
        "while not st.client.list_uploads(st.bucket, st.key(row.directory) + '/') and time.time() < deadline:\n"
        "    time.sleep(0.1)\n"
        "print('uploading', flush=True)\n"
        "time.sleep(60)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, str(script), url_of(b), catalog_url], env=env, stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == b"uploading"
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
        if child.stdout is not None:
            child.stdout.close()
    cat = Catalog(catalog_url)
    (pending,) = [c for c in cat.checkpoints(run.id) if c.state == "pending"]
    assert keys(b, pending.directory + "/") and uploads(b, pending.directory + "/")
    dry = cleanup.gc(cat, [run.name], dry_run=True)
    assert dry.runs[run.name].rolled_back == [2] and keys(b, pending.directory + "/")
    rep = cleanup.gc(cat, [run.name])
    assert rep.ok and rep.runs[run.name].rolled_back == [2]
    assert not keys(b, pending.directory + "/") and not uploads(b, pending.directory + "/")
    assert [c.state for c in cat.checkpoints(run.id) if c.step_nr == 2] == ["aborted"]
    assert verify(cat, run=run.name).ok


def test_wrong_prefix_or_credentials_refused(
    bucket: Bucket, catalog_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    b = bucket
    m = FileCheckpointManager(url_of(b), catalog=catalog_url)
    save(m, 1)
    run = m.run
    m.close()
    s3 = b.server.boto3_client()
    for k in keys(b):  # every object gone (another endpoint? a lifecycle rule?): refuse to judge
        s3.delete_object(Bucket=b.name, Key=k)
    cat = Catalog(catalog_url)
    with pytest.raises(CheckpointDirUnavailableError, match="holds none of them"):
        verify(cat, run=run.name)
    rep = cleanup.gc(cat, [run.name])
    assert run.name in rep.refused and sorted(committed(cat, run.id)) == [1]
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    rc = main(["verify", "--url", catalog_url, run.name])
    err = capsys.readouterr().err
    assert rc != 0 and b.name in err and sorted(committed(cat, run.id)) == [1]


def test_load_model_and_export_from_s3(
    bucket: Bucket,
    catalog_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from safetensors.torch import load_file

    from ckptdb import load_model
    from ckptdb.errors import CheckpointCorruptError

    b = bucket
    m = FileCheckpointManager(url_of(b), catalog=catalog_url)
    for step, score in ((1, 0.5), (2, 0.2), (3, 0.9)):
        save(m, step, score=score)
    run = m.run
    m.close()
    monkeypatch.setenv("CKPTDB_URL", catalog_url)
    sd, _ = load_model(url_of(b))
    assert torch.equal(sd["w"], make_state(3)["model"]["w"])
    sd, _ = load_model(url_of(b), select="best", lower_better=True)
    assert torch.equal(sd["w"], make_state(2)["model"]["w"])
    out = tmp_path / "m.safetensors"
    rc, _ = cli(capsys, "export", "--dir", url_of(b), "--step", "1", "-o", str(out))
    assert rc == 0 and torch.equal(load_file(str(out))["b"], make_state(1)["model"]["b"])

    cat = Catalog(catalog_url)
    row = committed(cat, run.id)[1]
    model = f"{PREFIX}/{row.directory}/model.pt"  # type: ignore[attr-defined]
    s3 = b.server.boto3_client()
    body = bytearray(s3.get_object(Bucket=b.name, Key=model)["Body"].read())
    body[len(body) // 2] ^= 0x01
    s3.put_object(Bucket=b.name, Key=model, Body=bytes(body))
    with pytest.raises(CheckpointCorruptError, match=r"model\.pt"):
        load_model(url_of(b), select=1)
    assert [c.state for c in cat.checkpoints(run.id) if c.step_nr == 1] == ["corrupt"]


def _upload_tree(b: Bucket, local: Path, prefix: str) -> None:
    s3 = b.server.boto3_client()
    for p in sorted(local.rglob("*")):
        if p.is_file():
            s3.put_object(Bucket=b.name, Key=f"{prefix}/{p.relative_to(local).as_posix()}", Body=p.read_bytes())


def test_import_fairseq2_directory_on_s3(
    bucket: Bucket,
    catalog_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """fairseq2 writes step_<N>/ objects in place: adopt the complete steps, skip the incomplete one and
    the .tmp leftover; then resume, load_model, retention and verify work on the imported run."""
    from ckptdb import load_model
    from ckptdb.importer import import_directory
    from ckptdb.retention import KeepLast
    from tests.catalog import fairseq2_dirs as fs2

    b = bucket
    local = fs2.v03(tmp_path / "fs2", {100: 0.9, 200: 0.5, 250: None, 260: 0.1}, tmp_step=300)
    _upload_tree(b, local, PREFIX)
    s3 = b.server.boto3_client()
    s3.delete_object(Bucket=b.name, Key=f"{PREFIX}/step_260/rank_0.pt")  # its writer died mid-save
    # step 270: fairseq2's copy of step_270.tmp/ to step_270/ was interrupted (both hold objects)
    body = (local / "step_100" / "model.pt").read_bytes()
    for name in ("step_270", "step_270.tmp"):
        s3.put_object(Bucket=b.name, Key=f"{PREFIX}/{name}/model.pt", Body=body)
    before = keys(b)
    src = url_of(b)

    dry = import_directory(catalog_url, src, dry_run=True)
    assert dry.adopted == [100, 200, 250] and dry.skipped["step_300.tmp"] == "unfinished or ckptdb work directory"
    assert dry.skipped["step_260"].startswith("incomplete: lacks rank_0.pt")
    assert "is not finished" in dry.skipped["step_270"]
    rc, out = cli(capsys, "import", src, "--url", catalog_url, "--json")
    rep = json.loads(out)
    assert rc == 0 and rep["adopted"] == [100, 200, 250] and rep["checkpoint_dir"] == src
    assert keys(b) == before  # the user's objects are untouched
    cat = Catalog(catalog_url)
    run = cat.get_run(src)
    assert run.model_metadata == fs2.CARD
    rows = {c.step_nr: c for c in cat.checkpoints(run.id)}
    assert rows[100].scores == {"score": 0.9} and rows[100].directory == "step_100"
    assert rows[100].user_metadata == {"data_epoch": 1, "config": {"lr": 0.01}}
    assert import_directory(catalog_url, src).already == [100, 200, 250]

    monkeypatch.setenv("CKPTDB_URL", catalog_url)
    sd, card = load_model(src, select="best", lower_better=True)
    assert torch.equal(sd["proj.weight"], fs2.model_sd(200)["proj.weight"]) and card == fs2.CARD
    assert verify(cat, run=src).ok
    m = FileCheckpointManager(src, catalog=catalog_url)
    step, state = m.load_last_checkpoint()
    assert step == 250 and torch.equal(state["model"]["proj.bias"], fs2.model_sd(250)["proj.bias"])
    save(m, 300)  # fairseq2's step_300.tmp leftover does not get in the way
    assert m.apply_retention(KeepLast(2)) == [100, 200]
    assert not keys(b, "step_100/") and not keys(b, "step_200/") and keys(b, "step_250/")
    m.close()
    assert verify(cat, run=src).ok
