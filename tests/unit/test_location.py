"""Checkpoint directories given as URLs: parsed once, never taken for a local path (issue 12)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ckptdb import FileCheckpointManager
from ckptdb.cli import main
from ckptdb.errors import InvalidArgumentError, ObjectStoreError, UnsupportedCheckpointError
from ckptdb.importer import import_directory
from ckptdb.loader import load_model
from ckptdb.storage.location import LocalLocation, ObjectLocation, local_path, parse_location
from ckptdb.storage.store import LocalStore, open_store
from tests.helpers import save


@pytest.fixture
def cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working directory: whatever a call creates in it shows up in ``os.listdir``."""
    d = tmp_path / "cwd"
    d.mkdir()
    monkeypatch.chdir(d)
    return d


def test_parse_local_forms(cwd: Path) -> None:
    assert parse_location("ckpts") == LocalLocation(cwd.resolve() / "ckpts")
    assert parse_location(Path("a/b")) == LocalLocation(cwd.resolve() / "a" / "b")
    assert parse_location("~/x").url == str(Path("~/x").expanduser().resolve())
    assert parse_location("file:///data/run7") == LocalLocation(Path("/data/run7"))
    assert parse_location("file://localhost/data/run%207") == LocalLocation(Path("/data/run 7"))
    assert parse_location("run:1") == LocalLocation(cwd.resolve() / "run:1")  # no '//': a name
    loc = parse_location("/abs/dir")
    assert loc.is_local and loc.url == "/abs/dir" and parse_location(loc) is loc


def test_parse_s3_forms() -> None:
    loc = parse_location("s3://my-bucket/runs/exp1/")
    assert loc == ObjectLocation("my-bucket", "runs/exp1")
    assert isinstance(loc, ObjectLocation)
    assert not loc.is_local and loc.url == "s3://my-bucket/runs/exp1"
    assert loc.key("step_3.ab12", "model.pt") == "runs/exp1/step_3.ab12/model.pt"
    root = parse_location("S3://bucket")
    assert root == ObjectLocation("bucket", "") and root.url == "s3://bucket"
    assert isinstance(root, ObjectLocation) and root.key("step_1.ff") == "step_1.ff"


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("gs://bucket/x", ["'gs://'", "not supported", "s3://bucket/prefix", "file:///"]),
        ("hdfs://namenode/x", ["'hdfs://'", "not supported"]),
        ("http://host/x", ["'http://'", "not supported"]),
        ("s3a://bucket/x", ["'s3a://'", "not supported"]),
        ("s3://", ["needs a bucket"]),
        ("s3:///prefix", ["needs a bucket"]),
        ("s3://b/x", ["'b' is not a valid bucket name"]),
        ("s3://bucket/a//b", ["empty, '.' or '..' segment"]),
        ("s3://bucket/a/../b", ["empty, '.' or '..' segment"]),
        ("s3://bucket/x?versionId=1", ["no query"]),
        ("file://otherhost/x", ["not host 'otherhost'"]),
        ("file://localhost", ["absolute path"]),
        ("", ["is empty"]),
    ],
)
def test_parse_refusals(value: str, words: list[str], cwd: Path) -> None:
    with pytest.raises(InvalidArgumentError) as ei:
        parse_location(value)
    for w in words:
        assert w in str(ei.value)
    assert os.listdir(cwd) == []


def test_local_path_refuses_object_storage() -> None:
    assert local_path("file:///x/y") == Path("/x/y")
    with pytest.raises(InvalidArgumentError, match="CatalogCallback works on a local or network-mounted directory"):
        local_path("s3://bucket/out", what="output_dir", by="CatalogCallback")


def test_open_store() -> None:
    assert isinstance(open_store("/tmp/x"), LocalStore)
    with pytest.raises(UnsupportedCheckpointError, match=r"object storage .* is not available"):
        open_store("s3://bucket/run")


def test_manager_s3_needs_a_shared_catalog(cwd: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="needs a shared catalog: pass catalog=") as ei:
        FileCheckpointManager("s3://bucket/x")
    assert "CKPTDB_URL" in str(ei.value) and "s3://bucket/x" in str(ei.value)
    assert os.listdir(cwd) == []  # no `s3:` directory, no catalog.db


def test_manager_s3_with_catalog_opens_the_object_store(
    cwd: Path, catalog_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a catalog, an s3:// run goes to the object store (tests/s3 run it end to end); without
    credentials that is a clear error, raised before any request leaves, and nothing is written locally."""
    for k in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(cwd / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(cwd / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    with pytest.raises(ObjectStoreError, match="no S3 credentials found"):
        FileCheckpointManager("s3://bucket/x", catalog=catalog_url)
    monkeypatch.setenv("CKPTDB_URL", catalog_url)
    with pytest.raises(ObjectStoreError, match="no S3 credentials found"):
        FileCheckpointManager("s3://bucket/x")
    assert os.listdir(cwd) == []


@pytest.mark.parametrize("url", ["gs://bucket/x", "hdfs://nn/x", "http://host/x"])
def test_manager_refuses_other_schemes(url: str, cwd: Path, catalog_url: str) -> None:
    scheme = url.split("://")[0]
    with pytest.raises(InvalidArgumentError, match=f"'{scheme}://' is not supported"):
        FileCheckpointManager(url, catalog=catalog_url)
    with pytest.raises(InvalidArgumentError, match=f"'{scheme}://' is not supported"):
        FileCheckpointManager(url)
    assert os.listdir(cwd) == []


def test_manager_file_url_is_the_local_directory(tmp_path: Path, catalog_url: str) -> None:
    d = tmp_path / "ckpts"
    m = FileCheckpointManager(f"file://{d}", catalog=catalog_url)
    save(m, 5)
    assert m.checkpoint_dir == d.resolve() and (d / "step_5" / "model.pt").is_file()
    m.close()
    again = FileCheckpointManager(d, catalog=catalog_url)  # the same run: named by the same absolute path
    assert again.run.id == m.run.id and again.get_step_numbers() == [5]
    again.close()


def _no_aws(monkeypatch: pytest.MonkeyPatch) -> None:
    """No credentials anywhere and an endpoint that refuses connections: nothing leaves this machine."""
    for k in list(os.environ):
        if k.startswith("AWS_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")


def test_cli_refuses_urls(
    cwd: Path, catalog_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_aws(monkeypatch)
    assert main(["ls", "--dir", "s3://bucket/x"]) == 2
    assert "needs a shared catalog" in capsys.readouterr().err
    assert main(["import", "s3://bucket/x", "--dry-run"]) == 2
    assert "needs a shared catalog" in capsys.readouterr().err
    assert main(["import", "s3://bucket/x", "--url", catalog_url]) == 2  # supported: the server is asked
    assert "no S3 credentials found" in capsys.readouterr().err
    assert main(["import", "gs://bucket/x"]) == 2
    assert "'gs://' is not supported" in capsys.readouterr().err
    assert main(["verify", "--dir", "hdfs://nn/x"]) == 2
    assert "'hdfs://' is not supported" in capsys.readouterr().err
    assert os.listdir(cwd) == []


def test_library_entry_points_refuse_urls(cwd: Path, catalog_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _no_aws(monkeypatch)
    with pytest.raises(InvalidArgumentError, match="needs a shared catalog"):
        load_model("s3://bucket/x")
    with pytest.raises(InvalidArgumentError, match="'gs://' is not supported"):
        load_model("gs://bucket/x")
    with pytest.raises(ObjectStoreError, match="no S3 credentials found"):
        import_directory(catalog_url, "s3://bucket/x")
    with pytest.raises(InvalidArgumentError, match="'http://' is not supported"):
        import_directory(catalog_url, "http://host/x")
    assert os.listdir(cwd) == []
