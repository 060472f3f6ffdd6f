"""Staging: which devices are synchronised, and what a staged copy keeps (issue 10, CPU-only part)."""

from __future__ import annotations

import collections

import torch

from ckptdb.storage.staging import StagingArea, synchronize


def test_every_device_a_copy_came_from_is_synchronised_once() -> None:
    calls: list[torch.device] = []
    devices = {torch.device("cuda", 1), torch.device("cuda", 0), torch.device("cuda", 3)}
    synchronize(devices, sync=calls.append)
    assert calls == [torch.device("cuda", 0), torch.device("cuda", 1), torch.device("cuda", 3)]
    synchronize(set(), sync=calls.append)  # CPU-only state: nothing to wait for
    assert len(calls) == 3


def test_staged_copy_keeps_python_attributes() -> None:
    t = torch.arange(4.0)
    t.note = {"k": [1, 2]}  # type: ignore[attr-defined]
    p = torch.nn.Parameter(torch.ones(2))
    p.tag = "decay"  # type: ignore[attr-defined]
    sd = torch.nn.Linear(2, 2).state_dict()
    staged = StagingArea().stage("rank_0.pt", {"t": t, "p": p, "sd": sd})
    assert staged["t"].note == {"k": [1, 2]} and staged["t"].note is not t.note
    assert type(staged["p"]) is torch.nn.Parameter and staged["p"].tag == "decay"
    assert isinstance(staged["sd"], collections.OrderedDict) and staged["sd"]._metadata == sd._metadata  # type: ignore[attr-defined]
    t.note["k"].append(3)  # type: ignore[attr-defined]
    assert staged["t"].note == {"k": [1, 2]}
