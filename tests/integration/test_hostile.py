"""Bad input and hostile conditions: each gets a clear error and loses nothing (docs/reliability.md).

Real parts only: a real tmpfs that fills up, a real read-only mount, a real TCP proxy in front of
PostgreSQL that is cut mid-commit, a real hostile pickle.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from ckptdb import (
    CatalogUnavailableError,
    CheckpointCorruptError,
    CheckpointError,
    FileCheckpointManager,
    InvalidArgumentError,
    UnsafeCheckpointFileError,
)
from ckptdb.catalog import Catalog
from ckptdb.catalog.session import masked
from ckptdb.storage.hashing import hash_file
from ckptdb.verify import verify
from tests.helpers import assert_state_equal, make_state, save, sql, work_dirs

PASSWORD = "s3cr3t-pw-XYZ"


@pytest.fixture
def mgr(tmp_path: Path, catalog_url: str) -> FileCheckpointManager:
    return FileCheckpointManager(tmp_path / "ckpt", catalog=catalog_url)


# -- unsafe values, steps, scores, names ----------------------------------------------------------


class Custom:
    pass


class TensorSub(torch.Tensor):
    pass


@pytest.mark.parametrize(
    ("state", "where"),
    [
        ({"trainer": [1, {"cb": Custom()}]}, r"state\['trainer'\]\[1\]\['cb'\]"),
        ({"sched": {"fn": print}}, r"state\['sched'\]\['fn'\]"),
        ({"mod": os}, r"state\['mod'\]"),
        ({"model": {"w": torch.zeros(2).as_subclass(TensorSub)}}, r"state\['model'\]\['w'\].*subclass"),
        ({"rng": np.random.default_rng(0)}, r"state\['rng'\]"),
        ({1: torch.zeros(1)}, "top-level keys must be strings"),
    ],
)
def test_unsafe_values_refused_at_save_with_key_named(mgr: FileCheckpointManager, state: dict, where: str) -> None:
    save(mgr, 1)
    mgr.begin_checkpoint(2)
    with pytest.raises(InvalidArgumentError, match=where):
        mgr.save_state(state)
    tmp = [p for p in mgr.checkpoint_dir.iterdir() if ".tmp-" in p.name]
    assert [sorted(q.name for q in p.iterdir()) for p in tmp] == [[".ckptdb_token"]]  # nothing written
    mgr.abort_checkpoint()
    assert work_dirs(mgr.checkpoint_dir) == [] and mgr.get_step_numbers() == [1]
    assert_state_equal(mgr.load_checkpoint(1), make_state(1))


def test_bad_step_numbers_everywhere(mgr: FileCheckpointManager) -> None:
    save(mgr, 1)
    for bad in (-1, -(2**70), 2**63, 1.0, 1.5, "1", b"1", None, True, float("nan")):
        for call in (
            lambda b: mgr.begin_checkpoint(b),
            lambda b: mgr.load_checkpoint(b),
            lambda b: mgr.delete_checkpoint(b),
            lambda b: mgr.has_checkpoint(b if b is not None else -1),  # None there means "any step"
            lambda b: mgr.pin(b, "x"),
            lambda b: mgr.load_metadata(b),
        ):
            with pytest.raises(InvalidArgumentError, match="step_nr"):
                call(bad)
    for ok in (np.int64(2), 2**63 - 1):  # integral types, up to a 64-bit integer
        mgr.begin_checkpoint(ok)
        mgr.save_state(make_state(3))
        mgr.commit_checkpoint()
    assert mgr.get_step_numbers() == [1, 2, 2**63 - 1]


def test_nan_and_inf_scores_are_stored_but_never_best(mgr: FileCheckpointManager) -> None:
    for step, score in [(1, float("-inf")), (2, float("nan")), (3, 0.5), (4, torch.tensor(float("nan"))), (5, 0.7)]:
        save(mgr, step, score=score)  # type: ignore[arg-type]
    save(mgr, 6)
    # lower is better: -inf would win a naive sort; it never ranks as best
    assert mgr.keep_best_n_checkpoints(1, lower_better=True) == [1, 2, 4, 5]
    assert mgr.get_step_numbers() == [3, 6]
    infos = {c.step_nr: c.scores.get("score") for c in mgr.get_checkpoints()}
    assert infos[1] == float("-inf")
    for bad in ("0.5", None, [1.0], torch.zeros(2)):
        mgr.begin_checkpoint(7)
        try:
            if bad is None:
                mgr.save_score(bad)  # None is ignored (fairseq2's convention)
            else:
                with pytest.raises(InvalidArgumentError, match="score"):
                    mgr.save_score(bad)  # type: ignore[arg-type]
        finally:
            mgr.abort_checkpoint()


def test_hostile_names_and_metadata_keys_are_data(tmp_path: Path, catalog_url: str) -> None:
    d = tmp_path / "ckpt"
    m = FileCheckpointManager(d, catalog=catalog_url, run="../../../../tmp/evil'; DROP TABLE checkpoints; --")
    m.begin_checkpoint(1)
    m.save_state(make_state(1))
    meta = {"../../escape": 1, "x'); DELETE FROM shards; --": 2, "名前 %s %(x)s ?": 3, "k" * 255: 4}
    m.save_metadata(meta)
    m.save_score(0.5, metric='loss"; DROP TABLE scores; --')
    m.commit_checkpoint()
    assert m.load_metadata(1) == meta
    assert m.get_checkpoints()[0].scores == {'loss"; DROP TABLE scores; --': 0.5}
    assert sorted(p.name for p in d.iterdir() if p.name.startswith("step_")) == ["step_1"]
    assert not (tmp_path / "escape").exists() and not Path("/tmp/evil").exists()
    assert sql(catalog_url, "SELECT count(*) FROM shards") == [(3,)]  # model, rank_0, metadata
    for bad_key in ("k" * 256, "", "a\x00b", "line\nbreak"):
        m.begin_checkpoint(2)
        with pytest.raises(InvalidArgumentError, match="metadata key"):
            m.save_metadata({bad_key: 1})
        m.abort_checkpoint()
    for bad_run in ("r" * 256, "", "nul\x00", "\x1b[31mred"):
        with pytest.raises(InvalidArgumentError, match="run"):
            FileCheckpointManager(tmp_path / "other", catalog=catalog_url, run=bad_run)
    assert m.get_step_numbers() == [1]


# -- a checkpoint file replaced by a malicious pickle -----------------------------------------------


class Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, ...]:
        return (exec, (f"import pathlib; pathlib.Path({str(self.marker)!r}).write_text('pwned')",))


@pytest.mark.parametrize("attack", ["file", "file-and-catalog"])
def test_malicious_pickle_is_refused_and_never_executed(tmp_path: Path, catalog_url: str, attack: str) -> None:
    marker = tmp_path / "PWNED"
    m = FileCheckpointManager(tmp_path / "c", catalog=catalog_url)
    save(m, 1)
    save(m, 2)
    target = m.checkpoint_dir / "step_2" / "model.pt"
    torch.save({"model": Evil(marker), "model_key": "model"}, target)
    # sanity: the payload does run under a full unpickler (we only ever load weights-only)
    torch.load(target, weights_only=False)
    assert marker.exists()
    marker.unlink()
    if attack == "file-and-catalog":
        # the attacker also rewrote the catalog's size and digest: the weights-only loader is the last line
        size, digest = hash_file(target, "xxh3_128")
        engine = create_engine(catalog_url)
        with engine.begin() as c:
            c.execute(
                text(
                    "UPDATE shards SET size_bytes = :s, digest = :d WHERE path = 'model.pt' AND checkpoint_id = "
                    "(SELECT id FROM checkpoints WHERE step_nr = 2 AND state = 'committed')"
                ),
                {"s": size, "d": digest},
            )
        engine.dispose()

    expected = CheckpointCorruptError if attack == "file" else UnsafeCheckpointFileError
    with pytest.raises(expected):
        m.load_checkpoint(2)
    assert not marker.exists()
    assert {c.step_nr: c.state for c in m.get_checkpoints()}[2] == "corrupt"
    step, state = m.load_last_checkpoint()  # falls back past it
    assert step == 1 and not marker.exists()
    assert_state_equal(state, make_state(1))
    report = verify(Catalog(catalog_url), include_damaged=True)  # verification reads bytes only
    # with a rewritten catalog the bytes "match": only the weights-only loader stands in the way
    expected_verify = ["ok", "corrupt"] if attack == "file" else ["ok", "ok"]
    assert [r.result for r in report.results] == expected_verify and not marker.exists()


# -- disk full, read-only directory (real mounts; tests run as root) ----------------------------------


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_mid_save_rolls_back_and_keeps_earlier(small_fs: Path, catalog_url: str) -> None:
    m = FileCheckpointManager(small_fs / "ckpt", catalog=catalog_url)
    save(m, 1)
    m.begin_checkpoint(2)
    with pytest.raises(CheckpointError, match="No space left on device") as ei:
        m.save_state({"model": {"w": torch.randn(1024, 1024)}})  # 4 MiB on a 3 MiB filesystem
    assert "rolled back" in str(ei.value) and "earlier checkpoints are intact" in str(ei.value)
    assert work_dirs(m.checkpoint_dir) == []
    states = sql(catalog_url, "SELECT step_nr, state FROM checkpoints ORDER BY id")
    assert states == [(1, "committed"), (2, "aborted")]
    assert_state_equal(m.load_checkpoint(1), make_state(1))
    save(m, 3)  # space is back: saving goes on
    assert m.get_step_numbers() == [1, 3]


def test_disk_full_with_the_catalog_on_the_same_disk(small_fs: Path) -> None:
    d = small_fs / "ckpt"
    m = FileCheckpointManager(d)  # SQLite catalog inside the full filesystem
    save(m, 1)
    m.begin_checkpoint(2)
    with pytest.raises(CheckpointError):
        m.save_state({"model": {"w": torch.randn(1024, 1024)}})
    again = FileCheckpointManager(d)
    assert again.get_step_numbers() == [1] and work_dirs(d) == []
    assert_state_equal(again.load_checkpoint(1), make_state(1))
    assert verify(again.catalog).ok


def test_read_only_checkpoint_directory(small_fs: Path, catalog_url: str, caplog: pytest.LogCaptureFixture) -> None:
    d = small_fs / "ckpt"
    m = FileCheckpointManager(d, catalog=catalog_url)
    save(m, 1)
    save(m, 2)
    m.close()
    r = subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    with caplog.at_level(logging.WARNING, logger="ckptdb"):
        ro = FileCheckpointManager(d, catalog=catalog_url)
    assert any("read-only" in rec.getMessage() for rec in caplog.records)
    step, state = ro.load_last_checkpoint()
    assert step == 2
    assert_state_equal(state, make_state(2))
    assert verify(Catalog(catalog_url)).ok
    with pytest.raises(CheckpointError, match=r"Read-only file system.*nothing was saved"):
        ro.begin_checkpoint(3)
    with pytest.raises(CheckpointError, match="read-only; nothing was deleted"):
        ro.delete_checkpoint(1)
    assert ro.keep_last_n_checkpoints(1) == []  # retention skips, deletes nothing
    subprocess.run(["mount", "-o", "remount,rw", str(small_fs)], check=True)
    rw = FileCheckpointManager(d, catalog=catalog_url)
    assert work_dirs(d) == []
    states = {c.step_nr: c.state for c in rw.get_checkpoints() if c.state != "aborted"}
    assert states == {1: "committed", 2: "committed"}
    assert_state_equal(rw.load_checkpoint(2), make_state(2))


# -- catalog unreachable; passwords never shown ---------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "not a url",
        "nosuchdriver://x/y",
        f"postgresql+psycopg://alice:{PASSWORD}@127.0.0.1:1/db",
        "sqlite:////nonexistent-dir-ckptdb/catalog.db",
    ],
)
def test_unreachable_catalog_fails_before_any_payload(
    tmp_path: Path, url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    d = tmp_path / "ckpt"
    with pytest.raises(CatalogUnavailableError) as ei:
        FileCheckpointManager(d, catalog=url)
    assert PASSWORD not in str(ei.value) and PASSWORD not in repr(ei.value)
    assert list(d.iterdir()) == [] if d.exists() else True  # no step directory, no file
    from ckptdb.cli import main

    assert main(["verify", "--url", url]) == 2
    out = capsys.readouterr()
    assert "ckptdb: error" in out.err and PASSWORD not in out.err + out.out


class Proxy:
    """A TCP proxy to PostgreSQL that can be cut: the server 'disappears' without being stopped."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.socks: list[socket.socket] = []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                c, _ = self.listener.accept()
            except OSError:
                continue
            try:
                u = socket.create_connection(self.target)
            except OSError:
                c.close()
                continue
            self.socks += [c, u]
            for a, b in ((c, u), (u, c)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while True:
                data = a.recv(65536)
                if not data:
                    break
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        self.stopped.set()
        self.thread.join()
        self.listener.close()
        for s in self.socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


def test_postgres_lost_mid_commit_is_rolled_back_on_next_open(
    tmp_path: Path, catalog_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    if not catalog_url.startswith("postgresql"):
        pytest.skip("PostgreSQL only: a SQLite catalog is a local file")
    real = make_url(catalog_url)
    proxy = Proxy(real.host or "127.0.0.1", real.port or 5432)
    via = real.set(port=proxy.port, password=PASSWORD).render_as_string(hide_password=False)
    d = tmp_path / "ckpt"
    try:
        with caplog.at_level(logging.DEBUG):
            m = FileCheckpointManager(d, catalog=via)
            save(m, 1)
            assert PASSWORD not in repr(m) and "***" in repr(m)
            m.begin_checkpoint(2)
            m.save_state(make_state(2))
            proxy.cut()  # the catalog is gone between the payload and the commit
            with pytest.raises(CheckpointError, match="catalog commit failed") as ei:
                m.commit_checkpoint()
            with pytest.raises(CatalogUnavailableError) as e2:
                m.begin_checkpoint(3)  # fails before any payload: no step_3 directory
            assert not any(p.name.startswith("step_3") for p in d.iterdir())
    finally:
        proxy.cut()
    for text_ in (str(ei.value), repr(ei.value.__cause__), str(e2.value), caplog.text):
        assert PASSWORD not in text_
    assert masked(via) in str(e2.value)
    # the server is reachable again (directly): the next open rolls the half-done commit back
    again = FileCheckpointManager(d, catalog=catalog_url)
    assert again.last_recovery is not None and 2 in again.last_recovery.rolled_back
    assert again.get_step_numbers() == [1] and work_dirs(d) == []
    assert sorted(p.name for p in d.iterdir() if p.name.startswith("step_")) == ["step_1"]
    assert_state_equal(again.load_last_checkpoint()[1], make_state(1))
    save(again, 2)
    assert again.get_step_numbers() == [1, 2]


def test_password_never_printed(tmp_path: Path, catalog_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    url = catalog_url
    if url.startswith("postgresql"):  # trust auth on the test server: the password is carried, not checked
        url = make_url(url).set(password=PASSWORD).render_as_string(hide_password=False)
    m = FileCheckpointManager(tmp_path / "c", catalog=url, run="pw")
    save(m, 1)
    assert PASSWORD not in repr(m) and PASSWORD not in repr(m.catalog)
    from ckptdb.cli import main

    assert main(["verify", "--url", url]) == 0
    assert main(["ls", "--url", url, "pw"]) == 0
    assert main(["ls", "--url", url, "nope"]) == 2
    out = capsys.readouterr()
    assert PASSWORD not in out.out + out.err
    assert masked(f"postgresql+psycopg://u:{PASSWORD}@h/db") == "postgresql+psycopg://u:***@h/db"
