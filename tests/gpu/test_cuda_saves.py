"""Saves of CUDA tensors on one GPU (issue 14, GPU part): what the async stall may and may not skip.

- The staging copies run on a side stream that first waits for the current stream: a kernel queued
  just before ``save_state`` (kept slow with ``torch.cuda._sleep``) must reach the checkpoint, and
  training's next kernel, queued right after ``save_state`` returns, must not.
- A state with the shapes training produces (Parameters, tied weights, views, a transposed tensor,
  bf16 / int64 / bool, CPU tensors beside CUDA ones) saves the same bytes synchronously and
  asynchronously, keeps its ties, and the files load with plain ``torch.load(weights_only=True)``.
- The pinned staging buffers are allocated once and reused by the next save of the same layout.

Skipped (saying why) without CUDA. Runs in seconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from ckptdb import FileCheckpointManager, SaveOptions
from ckptdb.storage.staging import StagingArea
from tests.gpu.helpers import busy

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (torch.cuda.is_available() is False)")

N = 16 << 20  # floats (64 MiB): a copy long enough to be caught in flight


def _state(dev: torch.device) -> dict[str, Any]:
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32).to(dev)
    emb = torch.nn.Parameter(torch.randn(100, 64, device=dev))
    big = torch.randn(1 << 20, device=dev)
    return {
        "model": {"lin.weight": lin.weight, "lin.bias": lin.bias, "emb": emb, "head": emb},  # tied
        "view": big[1000:5000],
        "big": big,
        "t": torch.randn(48, 16, device=dev).t(),  # not contiguous
        "bf16": torch.randn(333, device=dev).to(torch.bfloat16),
        "ids": torch.arange(77, device=dev, dtype=torch.int64),
        "mask": torch.rand(50, device=dev) > 0.5,
        "cpu": torch.arange(10.0),
        "step": 7,
    }


def _assert_same(loaded: dict[str, Any], state: dict[str, Any]) -> None:
    for k in ("view", "big", "t", "bf16", "ids", "mask", "cpu"):
        got, want = loaded[k], state[k].cpu()
        assert got.device.type == "cpu" and got.dtype == want.dtype and got.shape == want.shape, k
        assert torch.equal(got, want), k
    for k, v in state["model"].items():
        assert torch.equal(loaded["model"][k], v.detach().cpu()), k
    assert type(loaded["model"]["emb"]) is torch.nn.Parameter
    assert loaded["model"]["head"] is loaded["model"]["emb"]  # the tie survives
    assert loaded["view"].untyped_storage().data_ptr() == loaded["big"].untyped_storage().data_ptr()
    assert loaded["step"] == 7


@pytest.mark.parametrize("blocking", [True, False])
def test_cuda_state_round_trips(tmp_path: Path, blocking: bool) -> None:
    dev = torch.device("cuda", 0)
    state = _state(dev)
    with FileCheckpointManager(tmp_path / "ck", save_options=SaveOptions(blocking=blocking)) as m:
        m.begin_checkpoint(1)
        m.save_state(state)
        m.commit_checkpoint()
        m.wait()
        _assert_same(m.load_checkpoint(1), state)
    files = sorted((tmp_path / "ck" / "step_1").rglob("*.pt"))
    assert files
    for f in files:
        torch.load(f, weights_only=True)  # plain torch can read every file


def test_async_save_sees_queued_kernels_and_not_later_ones(tmp_path: Path) -> None:
    torch.cuda.set_device(0)
    a = torch.zeros(N, device="cuda:0")
    with FileCheckpointManager(tmp_path / "ck", save_options=SaveOptions(blocking=False)) as m:
        m.begin_checkpoint(1)
        m.save_state({"a": a})  # fills the staging buffers with zeros (reused below)
        m.commit_checkpoint()
        m.wait()
        for step in (2, 3):
            busy(0, 0.5)  # the fill below queues behind half a second of work
            a.fill_(float(step))
            m.begin_checkpoint(step)
            m.save_state({"a": a})  # returns once the staged copy is complete
            a.fill_(-1.0)  # training goes on: must not reach the checkpoint
            m.commit_checkpoint()
            m.wait()
            got = m.load_checkpoint(step)["a"]
            assert torch.all(got == step), "the staging copy ran before the kernels queued ahead of it"
    torch.cuda.synchronize()


def test_pinned_staging_buffers_are_reused() -> None:
    dev = torch.device("cuda", 0)
    area = StagingArea()
    state = {"w": torch.randn(1 << 22, device=dev), "b": torch.randn(1 << 21, device=dev)}
    first = area.stage("rank_0.pt", state)
    assert first["w"].is_pinned() and first["w"].device.type == "cpu"
    ptr = first["w"].untyped_storage().data_ptr()
    held = area.nbytes
    state["w"].mul_(2)
    second = area.stage("rank_0.pt", state)
    assert second["w"].untyped_storage().data_ptr() == ptr  # the same pinned buffer, refilled
    assert area.nbytes == held
    assert torch.equal(second["w"], state["w"].cpu())
