"""The fast write path and asynchronous saves: what is written is exactly what was saved, files stay
plain torch.save archives, background failures surface and roll back, costs are recorded."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptdb import FileCheckpointManager, SaveOptions
from ckptdb.asyncsave import BackgroundCommitError
from ckptdb.storage import writer
from ckptdb.storage.hashing import hash_file
from tests.helpers import assert_state_equal, make_state, work_dirs

ASYNC = SaveOptions(blocking=False)


def big_state(seed: int, n: int = 1 << 20) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, generator=g)
    model = {
        "w": w,
        "tied": w,
        "view": w[10:20],
        "b": torch.randn(7, generator=g),
        "nc": torch.randn(64, 32).t(),
        "p": torch.nn.Parameter(torch.randn(5, generator=g)),
    }
    optim = {
        "state": {0: {"exp_avg": torch.randn(n, generator=g), "step": torch.tensor(3.0)}},
        "param_groups": [{"lr": 0.001, "betas": (0.9, 0.999), "params": [0]}],
    }
    return {"model": model, "optimizer": optim, "step_nr": seed, "notes": ["a", "b"]}


def snapshot(state: dict[str, Any]) -> dict[str, Any]:
    return copy.deepcopy(state)


def mutate(state: dict[str, Any]) -> None:
    """What an optimizer step and a scheduler do: in place, right after the save returns."""
    state["model"]["w"].add_(1.0)
    state["model"]["b"].zero_()
    state["model"]["nc"].mul_(-1)
    with torch.no_grad():
        state["model"]["p"].add_(3.0)
    state["optimizer"]["state"][0]["exp_avg"].fill_(7.0)
    state["optimizer"]["state"][0]["step"] += 1
    state["optimizer"]["param_groups"][0]["lr"] = 0.5
    state["notes"].append("changed")


def test_async_round_trip_and_timings(tmp_path: Path, catalog_url: str) -> None:
    m = FileCheckpointManager(tmp_path / "c", catalog=catalog_url, save_options=ASYNC)
    for step in (1, 2, 3):
        m.begin_checkpoint(step)
        m.save_state(make_state(step, size=64))
        m.save_score(float(step))
        m.commit_checkpoint()
    assert m.wait() is True
    assert m.get_step_numbers() == [1, 2, 3]
    for step in (1, 2, 3):
        assert_state_equal(m.load_checkpoint(step, verify="digest"), make_state(step, size=64))
    for info in m.get_checkpoints():
        assert info.stage_seconds is not None and info.stage_seconds >= 0
        assert info.write_seconds is not None and info.write_seconds > 0
        assert info.sync_seconds is not None and info.sync_seconds >= 0
        assert info.commit_seconds is not None and info.commit_seconds > 0
    assert work_dirs(tmp_path / "c") == []
    m.close()


def test_sync_save_records_timings(tmp_path: Path, catalog_url: str) -> None:
    m = FileCheckpointManager(tmp_path / "c", catalog=catalog_url)
    m.begin_checkpoint(5)
    m.save_state(make_state(5))
    m.commit_checkpoint()
    (info,) = m.get_checkpoints()
    assert info.stage_seconds == 0.0
    assert info.write_seconds is not None and info.write_seconds > 0
    assert info.sync_seconds is not None and info.sync_seconds > 0
    assert info.commit_seconds is not None and info.commit_seconds > 0


@pytest.mark.parametrize("mode", ["async", "sync_then_background_commit"])
def test_values_changed_after_the_call_never_reach_the_checkpoint(tmp_path: Path, catalog_url: str, mode: str) -> None:
    m = FileCheckpointManager(tmp_path / "c", catalog=catalog_url, save_options=ASYNC if mode == "async" else None)
    for step in (1, 2):  # the second save reuses the first one's staging buffers
        state = big_state(step)
        expected = snapshot(state)
        m.begin_checkpoint(step)
        m.save_state(state)
        mutate(state)  # between save_state and the commit
        m.commit_checkpoint(blocking=False)
        mutate(state)  # while the background commit runs
        m.wait()
        loaded = m.load_checkpoint(step)
        assert_state_equal(loaded, expected)
        # storage sharing survives staging: tied weights and views still share one storage
        lw = loaded["model"]["w"]
        assert loaded["model"]["tied"].untyped_storage().data_ptr() == lw.untyped_storage().data_ptr()
        assert loaded["model"]["view"].untyped_storage().data_ptr() == lw.untyped_storage().data_ptr()
        assert loaded["model"]["nc"].stride() == expected["model"]["nc"].stride()
        assert isinstance(loaded["model"]["p"], torch.nn.Parameter) and loaded["model"]["p"].requires_grad


def test_staging_buffers_are_reused(tmp_path: Path, catalog_url: str) -> None:
    m = FileCheckpointManager(tmp_path / "c", catalog=catalog_url, save_options=ASYNC)
    held = []
    for step in (1, 2):
        m.begin_checkpoint(step)
        m.save_state(big_state(step, n=1 << 16))
        m.commit_checkpoint()
        m.wait()
        held.append(m._staging.nbytes)
        ptrs = sorted(b.data_ptr() for bufs in m._staging._buffers.values() for b in bufs)
        if step == 1:
            first = ptrs
    assert held[0] == held[1] > 0
    assert ptrs == first


def test_background_error_surfaces_in_wait_and_rolls_back(
    tmp_path: Path, catalog_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = FileCheckpointManager(tmp_path / "c", catalog=catalog_url, save_options=ASYNC)
    m.begin_checkpoint(1)
    m.save_state(make_state(1))
    m.commit_checkpoint()
    m.wait()

    def fail(self: writer.StepWriter, f: writer.TorchFile) -> Any:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer.StepWriter, "_save_one", fail)
    m.begin_checkpoint(2)
    m.save_state(make_state(2))
    m.commit_checkpoint()  # returns: the failure happens in the background
    with pytest.raises(BackgroundCommitError, match="No space left") as ei:
        m.wait()
    assert ei.value.step_nr == 2
    m.wait()  # raised once only
    assert m.get_step_numbers() == [1]
    assert [c.state for c in m.get_checkpoints()] == ["committed", "aborted"]
    assert work_dirs(tmp_path / "c") == []
    monkeypatch.undo()
    m.begin_checkpoint(2)
    m.save_state(make_state(2))
    m.commit_checkpoint()
    m.wait()
    assert m.get_step_numbers() == [1, 2]


def test_background_error_surfaces_on_the_next_call(
    tmp_path: Path, catalog_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = FileCheckpointManager(tmp_path / "c", catalog=catalog_url, save_options=ASYNC)

    def fail(self: writer.StepWriter, f: writer.TorchFile) -> Any:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(writer.StepWriter, "_save_one", fail)
    m.begin_checkpoint(1)
    m.save_state(make_state(1))
    m.commit_checkpoint()
    with pytest.raises(BackgroundCommitError, match="Input/output error"):
        m.begin_checkpoint(2)
    monkeypatch.undo()
    m.begin_checkpoint(2)  # the error was raised once; the manager goes on
    m.save_state(make_state(2))
    m.commit_checkpoint()
    assert m.get_step_numbers() == [2]  # waits for the background commit
    assert work_dirs(tmp_path / "c") == []


def test_fast_path_files_are_plain_torch_files_with_true_digests(tmp_path: Path, catalog_url: str) -> None:
    crc_before = torch.serialization.get_crc32_options()
    m = FileCheckpointManager(tmp_path / "c", catalog=catalog_url)
    state = big_state(9, n=1 << 18)
    m.begin_checkpoint(9)
    m.save_state(state)
    m.save_metadata({"config": "x"})
    m.commit_checkpoint()
    assert torch.serialization.get_crc32_options() is crc_before  # the switch was restored
    info = m.get_checkpoints()[0]
    shards = m.catalog.shards(info.id)
    assert {s.path for s in shards} >= {"model.pt", "rank_0.pt", "metadata.pt"}
    step_dir = tmp_path / "c" / "step_9"
    for s in shards:
        assert hash_file(step_dir / s.path, s.hash_algorithm) == (s.size_bytes, s.digest)
    model = torch.load(step_dir / "model.pt", weights_only=True)
    assert model["model_key"] == "model"
    assert_state_equal(model["model"], state["model"])
    rest = torch.load(step_dir / "rank_0.pt", weights_only=True, mmap=True)
    assert_state_equal(rest["optimizer"], state["optimizer"])
    assert rest["step_nr"] == 9


def test_sequential_files_option(tmp_path: Path, catalog_url: str) -> None:
    m = FileCheckpointManager(tmp_path / "c", catalog=catalog_url, save_options=SaveOptions(parallel_files=False))
    m.begin_checkpoint(1)
    m.save_state(make_state(1))
    m.commit_checkpoint()
    assert_state_equal(m.load_checkpoint(1), make_state(1))
