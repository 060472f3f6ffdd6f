"""Asynchronous saves of a state spread over two GPUs (issue 10, "async saves on several CUDA devices").

Staging copies every GPU tensor into pinned host buffers with non-blocking copies, queued on the
current stream of the tensor's own device. Before the fix only the *current* device was
synchronised, so the background writer could read the buffers of a tensor on ``cuda:1`` before its
copy had run. Here ``cuda:1`` is kept busy (``torch.cuda._sleep``) ahead of the copy, so a missing
synchronisation writes the buffers' previous contents. Self-contained; runs in well under a minute.
Skipped (saying why) without two CUDA devices.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ckptdb import FileCheckpointManager, SaveOptions
from tests.gpu.helpers import busy

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2,
    reason="needs CUDA with at least 2 devices (found "
    f"{torch.cuda.device_count() if torch.cuda.is_available() else 0})",
)

N = 16 << 20  # floats per tensor (64 MiB): a copy long enough to be caught in flight


def test_async_save_synchronises_every_device(tmp_path: Path) -> None:
    torch.cuda.set_device(0)
    a = torch.zeros(N, device="cuda:0")
    b = torch.zeros(N, device="cuda:1")
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    with FileCheckpointManager(tmp_path / "ck", catalog=url, save_options=SaveOptions(blocking=False)) as m:
        # save 1 fills the staging buffers with zeros (they are reused by save 2)
        m.begin_checkpoint(1)
        m.save_state({"a": a, "b": b})
        m.commit_checkpoint()
        m.wait()
        for step in (2, 3):
            busy(1, 1.0)  # cuda:1 is busy for a while: the fill and the staging copy queue behind it
            with torch.cuda.device(1):
                b.fill_(float(step))
            a.fill_(float(step))
            m.begin_checkpoint(step)
            m.save_state({"a": a, "b": b})  # returns once the staged copies are complete
            with torch.cuda.device(1):
                b.fill_(-1.0)  # training goes on: must not reach the checkpoint
            a.fill_(-1.0)
            m.commit_checkpoint()
            m.wait()
            state = m.load_checkpoint(step)
            assert state["a"].device.type == "cpu"
            assert torch.all(state["a"] == step)
            assert torch.all(state["b"] == step), "the copy from cuda:1 was read before it completed"
        torch.cuda.synchronize(0)
        torch.cuda.synchronize(1)
