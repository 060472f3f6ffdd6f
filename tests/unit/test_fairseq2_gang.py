"""A fairseq2 ``Gang`` (``as_process_group()``, fairseq2's own collectives) works as ``gang=``."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist

from ckptdb import FileCheckpointManager
from ckptdb.distributed import LocalGang, TorchGang, as_gang
from ckptdb.errors import CheckpointError


class FakeGang:
    """The shape of fairseq2's ``FakeGang``: size 1, no process group behind it."""

    rank = 0
    size = 1

    def as_process_group(self) -> Any:
        raise RuntimeError("FakeGang has no process group")

    def broadcast_objects(self, objects: list[Any], source_rank: int = 0) -> None:
        return None


class ProcessGroupGang(FakeGang):
    """The shape of fairseq2's ``ProcessGroupGang`` over an existing process group."""

    def __init__(self) -> None:
        self.size = dist.get_world_size()

    def as_process_group(self) -> Any:
        return dist.group.WORLD


def test_fake_gang_is_one_process(tmp_path: Path) -> None:
    assert isinstance(as_gang(FakeGang()), LocalGang)
    m = FileCheckpointManager(tmp_path / "ck", FakeGang())
    m.begin_checkpoint(1)
    m.save_state({"x": 1})
    m.commit_checkpoint()
    assert m.load_last_checkpoint() == (1, {"x": 1})


def test_process_group_gang_uses_its_group(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        g = ProcessGroupGang()
        g.size = 2  # not 1: must go through its process group
        gang = as_gang(g)
        assert isinstance(gang, TorchGang) and gang.size == 1
    finally:
        dist.destroy_process_group()


def test_a_non_gang_is_refused() -> None:
    with pytest.raises(CheckpointError, match=r"torch.distributed is not initialised|gang"):
        as_gang(object())
