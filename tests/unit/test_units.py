"""Pure pieces, no database and no processes: layout, hashing, safety checks, retention rules, errors."""

from __future__ import annotations

import collections
import math
import pickle
from pathlib import Path

import pytest
import torch

from ckptdb import CheckpointCorruptError, InvalidArgumentError
from ckptdb.retention import AnyOf, Candidate, KeepBest, KeepEvery, KeepLast, decide
from ckptdb.storage import layout
from ckptdb.storage.hashing import hash_file, new_hasher
from ckptdb.storage.safety import check_weights_only_safe


def test_layout_names_follow_fairseq2() -> None:
    assert layout.model_file() == "model.pt" and layout.model_file(1, 2) == "model.1.pt"
    assert layout.rank_file(3) == "rank_3.pt" and layout.rank_file(3, 1, 2) == "rank_3.1.pt"
    assert layout.parse_step_dir("step_12") == 12 and layout.parse_step_dir("step_12.tmp") is None
    wd = layout.parse_work_dir("step_7.tmp-00ff")
    assert wd is not None and (wd.step_nr, wd.kind, wd.token) == (7, "tmp", "00ff")
    assert layout.parse_work_dir("step_7.tmp") == layout.WorkDir(7, "tmp", None)
    for bad in ("../x", "/etc/passwd", "a/../../b", ""):
        with pytest.raises(ValueError):
            layout.resolve_inside(Path("/base"), bad)


@pytest.mark.parametrize("algo", ["xxh3_128", "sha256", "blake3"])
def test_hash_file_matches_streaming(tmp_path: Path, algo: str) -> None:
    data = bytes(range(256)) * 40_000
    p = tmp_path / "f"
    p.write_bytes(data)
    h = new_hasher(algo)
    h.update(data[:1000])
    h.update(data[1000:])
    assert hash_file(p, algo) == (len(data), h.hexdigest())
    with pytest.raises(ValueError, match="unknown hash algorithm"):
        new_hasher("md4")


def test_safety_accepts_training_state() -> None:
    model = torch.nn.Linear(3, 3)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    check_weights_only_safe(
        {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "rng": torch.get_rng_state(),
            "od": collections.OrderedDict(a=1),
            "s": {1, 2},
            "dt": torch.float16,
            "dev": torch.device("cpu"),
            "b": b"x",
            "none": None,
        }
    )


@pytest.mark.parametrize("bad", [object(), lambda: 1, Path("/x"), torch.nn.Linear(1, 1)])
def test_safety_refuses_objects(bad: object) -> None:
    with pytest.raises(InvalidArgumentError, match=r"state\['k'\]\[0\]"):
        check_weights_only_safe({"k": [bad]})


def test_safety_refuses_cycles() -> None:
    d: dict[str, object] = {}
    d["self"] = d
    with pytest.raises(InvalidArgumentError, match="refers back"):
        check_weights_only_safe({"d": d})


def cands(*pairs: tuple[int, float | None]) -> list[Candidate]:
    return [Candidate(s, {} if v is None else {"score": v}) for s, v in pairs]


def test_retention_rules() -> None:
    c = cands((1, 0.5), (2, 0.9), (3, float("nan")), (4, 0.1), (5, None))
    assert decide(KeepLast(2), c).keep == [4, 5]
    assert decide(KeepBest(2), c).keep == [1, 2, 5]  # + newest
    assert decide(KeepBest(1, lower_better=True), c).keep == [4, 5]
    assert decide(KeepEvery(2), c).keep == [2, 4, 5]
    assert decide(AnyOf(KeepLast(1), KeepBest(1)), c, pinned={1}).keep == [1, 2, 5]
    assert decide(KeepLast(1), []).keep == []
    with pytest.raises(ValueError):
        KeepLast(0)
    ties = cands((1, 1.0), (2, 1.0), (3, 0.0))
    assert decide(KeepBest(1), ties).keep == [2, 3]


def test_errors_pickle_with_their_fields() -> None:
    e = CheckpointCorruptError(3, "step_3/model.pt", "a", "b")
    e2 = pickle.loads(pickle.dumps(e))
    assert type(e2) is CheckpointCorruptError and e2.step_nr == 3 and str(e2) == str(e)
    assert math.isfinite(1.0)
