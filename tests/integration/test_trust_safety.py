"""Issue 10, items 8, 10, 12 and 15: what is saved loads; nothing hostile is unpickled; bad input is refused.

* 8: ``save_state`` / ``save_metadata`` accept only what ``torch.load(weights_only=True)`` rebuilds,
  and refuse the rest at save with the key path named (table of values + a hypothesis property:
  save accepts => load returns an equal state, blocking and asynchronous).
* 10: a same-size hostile DCP ``.metadata`` is never unpickled, even with ``verify="size"``; DCP's
  non-tensor items are unpickled weights-only.
* 12: an imported fairseq2 FSDP checkpoint loads without fairseq2's ``model_key`` entry.
* 15: every bad argument of the public surface raises ``InvalidArgumentError`` naming it.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import fractions
import io
import math
import os
import pickle
import subprocess
import sys
import textwrap
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckptdb import (
    CheckpointCorruptError,
    CheckpointError,
    FileCheckpointManager,
    InvalidArgumentError,
    KeepLast,
    LoadOptions,
    SaveOptions,
    load_model,
)
from ckptdb.catalog import Catalog
from ckptdb.errors import UnsafeCheckpointFileError
from ckptdb.importer import import_directory
from tests.catalog import fairseq2_dirs as fs2

ROOT = Path(__file__).resolve().parents[2]


class Foo:
    pass


NT = collections.namedtuple("NT", "a b")


class Color(enum.Enum):
    RED = 1


@dataclasses.dataclass
class DC:
    x: int = 1


class SubTensor(torch.Tensor):
    pass


def _tensor_with(attr: object) -> torch.Tensor:
    t = torch.ones(2)
    t.meta = attr  # type: ignore[attr-defined]
    return t


def _od_with(attr: object) -> collections.OrderedDict[str, int]:
    od: collections.OrderedDict[str, int] = collections.OrderedDict(a=1)
    od.extra = attr  # type: ignore[attr-defined]
    return od


def _self_ref() -> list[Any]:
    x: list[Any] = [1]
    x.append(x)
    return x


# -- equality that sees what a weights-only round trip must keep ------------------------------------


def same(a: Any, b: Any, where: str = "state") -> None:
    assert type(a) is type(b), f"{where}: {type(a)} != {type(b)}"
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape, a.requires_grad) == (b.dtype, b.shape, b.requires_grad), where
        assert torch.equal(
            a.detach().cpu().reshape(-1).view(torch.uint8), b.detach().cpu().reshape(-1).view(torch.uint8)
        ), where
        same(dict(a.__dict__), dict(b.__dict__), f"{where}.__dict__")
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{where}: keys {list(a)} != {list(b)}"
        for k in a:
            same(a[k], b[k], f"{where}[{k!r}]")
        if isinstance(a, collections.OrderedDict):
            same(dict(a.__dict__), dict(b.__dict__), f"{where}.__dict__")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            same(x, y, f"{where}[{i}]")
    elif isinstance(a, float | complex):
        assert repr(a) == repr(b), where  # NaN, -0.0
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _manager(d: Path, url: str, **kw: Any) -> FileCheckpointManager:
    return FileCheckpointManager(d, catalog=url, save_options=SaveOptions(fsync=False, **kw))


# -- item 8: refused at save, with the key named ---------------------------------------------------

REFUSED: list[tuple[str, Callable[[], object], str]] = [
    ("tensor attribute holding an object", lambda: {"w": _tensor_with(Foo())}, r"\['w'\]\.meta"),
    ("memory format", lambda: {"fmt": torch.channels_last}, r"\['fmt'\].*memory_format"),
    ("frozenset", lambda: {"s": frozenset([1])}, r"\['s'\].*frozenset"),
    ("namedtuple", lambda: {"nt": NT(1, 2)}, r"\['nt'\]"),
    ("enum", lambda: {"e": [Color.RED]}, r"\['e'\]\[0\]"),
    ("dataclass", lambda: {"dc": DC()}, r"\['dc'\]"),
    ("numpy array", lambda: {"a": np.ones(2)}, r"\['a'\].*numpy"),
    ("numpy scalar", lambda: {"a": {"b": np.float32(1.0)}}, r"\['a'\]\['b'\].*numpy"),
    ("Fraction", lambda: {"f": fractions.Fraction(1, 3)}, r"\['f'\]"),
    ("Decimal", lambda: {"d": Decimal("1.5")}, r"\['d'\]"),
    ("defaultdict", lambda: {"d": collections.defaultdict(int)}, r"\['d'\]"),
    ("int beyond LONG1", lambda: {"i": 10**700}, r"\['i'\].*too large"),
    ("self-referencing list", lambda: {"x": _self_ref()}, r"refers back"),
    ("tensor subclass", lambda: {"t": torch.ones(1).as_subclass(SubTensor)}, r"\['t'\].*subclass"),
    ("OrderedDict attribute holding an object", lambda: {"od": _od_with(Foo())}, r"\['od'\]\.extra"),
    ("dict key of an object", lambda: {"d": {Foo(): 1}}, r"\['d'\] \(key"),
    ("type object", lambda: {"t": int}, r"\['t'\]"),
    ("reserved model_key entry", lambda: {"model_key": "model"}, r"reserved"),
]


@pytest.mark.parametrize("blocking", [True, False], ids=["blocking", "async"])
def test_refused_values_are_refused_at_save_naming_the_key(tmp_path: Path, catalog_url: str, blocking: bool) -> None:
    m = _manager(tmp_path / "ck", catalog_url, blocking=blocking)
    m.begin_checkpoint(1)
    for what, make, pattern in REFUSED:
        with pytest.raises(InvalidArgumentError, match=pattern):
            m.save_state({"ok": torch.zeros(1), **make()})  # type: ignore[dict-item]
        if what != "reserved model_key entry":
            with pytest.raises(InvalidArgumentError):
                m.save_metadata(make())  # type: ignore[arg-type]
    # the checkpoint stayed open and untouched: a good state still commits and loads
    good = {"w": _tensor_with(5), "fmt": str(torch.channels_last), "big": 2**2000, "od": _od_with({"v": 1})}
    m.save_state(good)
    m.save_metadata({"note": "fine", "dtype": torch.bfloat16})
    m.commit_checkpoint()
    m.wait()
    loaded = m.load_checkpoint(1)
    same(good, loaded)
    assert loaded["w"].meta == 5
    assert m.load_metadata(1) == {"note": "fine", "dtype": torch.bfloat16}
    assert m.get_step_numbers() == [1]
    m.close()


def test_parameter_attributes_and_state_dict_metadata_round_trip(tmp_path: Path, catalog_url: str) -> None:
    p = torch.nn.Parameter(torch.arange(3.0))
    p.tag = {"group": "decay", "lr_scale": 0.5}  # type: ignore[attr-defined]
    sd = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2)).state_dict()
    assert sd._metadata  # type: ignore[attr-defined]  # the versions load_state_dict reads
    state = {"p": p, "model": sd}
    for blocking, step in ((True, 1), (False, 2)):
        with _manager(tmp_path / "ck", catalog_url, blocking=blocking) as m:
            m.begin_checkpoint(step)
            m.save_state(state)
            m.commit_checkpoint()
            m.wait()
            loaded = m.load_checkpoint(step)
            same(state, loaded)
            assert loaded["p"].tag == p.tag  # type: ignore[attr-defined]
            assert loaded["model"]._metadata == sd._metadata  # type: ignore[attr-defined]


# -- item 8: the property ---------------------------------------------------------------------------

_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int8, torch.uint8, torch.bool]


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    dtype = draw(st.sampled_from(_DTYPES))
    shape = draw(st.lists(st.integers(0, 3), max_size=2))
    n = math.prod(shape)
    values = draw(st.lists(st.integers(0, 1 if dtype is torch.bool else 100), min_size=n, max_size=n))
    t = torch.tensor(values, dtype=torch.int64).to(dtype).reshape(shape)
    kind = draw(st.sampled_from(["plain", "param", "attr", "view"]))
    if kind == "param" and dtype.is_floating_point:
        return torch.nn.Parameter(t, requires_grad=draw(st.booleans()))
    if kind == "attr":
        t.note = draw(st.sampled_from([1, "x", (1, 2), None]))  # type: ignore[attr-defined]
    if kind == "view" and t.numel() > 1:
        return t.flatten()[1:]
    return t


ALLOWED_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**2000), max_value=2**2000),
    st.floats(allow_nan=True, allow_infinity=True),
    st.complex_numbers(allow_nan=False, max_magnitude=1e10),
    st.text(max_size=4),
    st.binary(min_size=1, max_size=4),  # b"" pickles as builtins.bytes(): refused (below)
    st.binary(max_size=4).map(bytearray),
    st.sampled_from([torch.float32, torch.int8, torch.device("cpu"), torch.device("cuda", 1), torch.strided]),
    st.lists(st.integers(0, 4), max_size=3).map(torch.Size),
    tensors(),
)
REFUSED_LEAVES = st.sampled_from(
    [
        "frozenset",
        "fraction",
        "decimal",
        "np_scalar",
        "np_array",
        "namedtuple",
        "enum",
        "dataclass",
        "object",
        "channels_last",
        "huge_int",
        "bad_attr",
        "empty_bytes",
    ]
).map(
    lambda k: {
        "frozenset": lambda: frozenset({1}),
        "fraction": lambda: fractions.Fraction(1, 2),
        "decimal": lambda: Decimal(2),
        "np_scalar": lambda: np.int64(3),
        "np_array": lambda: np.zeros(1),
        "namedtuple": lambda: NT(1, 2),
        "enum": lambda: Color.RED,
        "dataclass": lambda: DC(),
        "object": lambda: Foo(),
        "channels_last": lambda: torch.channels_last,
        "huge_int": lambda: -(10**650),
        "bad_attr": lambda: _tensor_with(Foo()),
        "empty_bytes": lambda: b"",
    }[k]()
)
HASHABLE = st.one_of(st.integers(-5, 5), st.text(max_size=3), st.binary(min_size=1, max_size=2), st.none())


def nested(leaves: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.recursive(
        leaves,
        lambda c: st.one_of(
            st.lists(c, max_size=3),
            st.lists(c, max_size=3).map(tuple),
            st.dictionaries(st.one_of(st.text(max_size=3), st.integers(-3, 3)), c, max_size=3),
            st.dictionaries(st.text(max_size=3), c, max_size=3).map(collections.OrderedDict),
            st.sets(HASHABLE, max_size=3),
        ),
        max_leaves=6,
    )


def states(leaves: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(
        st.text(min_size=1, max_size=4).filter(lambda k: k != "model_key"), nested(leaves), min_size=1, max_size=3
    )


def test_property_save_accepts_implies_load_returns_equal(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    m = _manager(tmp_path / "ck", url)
    step = iter(range(1, 10_000))
    accepted = refused = 0

    def round_trip(state: dict[str, Any], blocking: bool, must_accept: bool) -> None:
        nonlocal accepted, refused
        n = next(step)
        m.begin_checkpoint(n)
        try:
            m.save_state(state)
        except InvalidArgumentError as e:
            m.abort_checkpoint()
            assert not must_accept, f"an allowed state was refused: {e}"
            assert str(e).startswith("state["), e  # names the key path
            refused += 1
            return
        except BaseException:
            m.abort_checkpoint()
            raise
        m.commit_checkpoint(blocking=blocking)
        m.wait()
        same(state, m.load_checkpoint(n))
        accepted += 1

    settings_ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)

    @settings_
    @given(states(ALLOWED_LEAVES), st.booleans())
    def allowed(state: dict[str, Any], blocking: bool) -> None:
        round_trip(state, blocking, must_accept=True)

    @settings_
    @given(states(st.one_of(ALLOWED_LEAVES, REFUSED_LEAVES)), st.booleans())
    def mixed(state: dict[str, Any], blocking: bool) -> None:
        round_trip(state, blocking, must_accept=False)

    allowed()
    mixed()
    m.close()
    assert accepted > 0 and refused > 0


# -- item 10: pickles are trusted only once their digest matches -----------------------------------

_SAVE_SHARDED = textwrap.dedent(
    """
    import sys, torch, torch.distributed as dist
    from pathlib import Path
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    from ckptdb import FileCheckpointManager
    d, url = Path(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo", init_method=f"file://{d}.pg", rank=0, world_size=1)
    w = distribute_tensor(torch.arange(8.0), init_device_mesh("cpu", (1,)), [Shard(0)])
    with FileCheckpointManager(d, catalog=url) as m:
        m.begin_checkpoint(1)
        m.save_state({"model": {"w": w, "step": 3, "groups": [{"lr": 0.1}]}, "rest": 1})
        m.commit_checkpoint()
    dist.destroy_process_group()
    """
)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def _hostile_pickle(marker: Path, size: int) -> bytes:
    payload = pickle.dumps(_Evil(marker), protocol=2)
    assert len(payload) <= size
    return payload + b"\0" * (size - len(payload))  # the unpickler stops at STOP: same size, same effect


def _sharded_target() -> dict[str, Any]:
    return {"model": {"w": torch.zeros(8), "step": 0, "groups": [{"lr": 0.0}]}}


@pytest.mark.parametrize("verify", ["size", "digest"])
def test_same_size_hostile_dcp_metadata_is_never_unpickled(tmp_path: Path, catalog_url: str, verify: str) -> None:
    d = tmp_path / "ck"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", _SAVE_SHARDED, str(d), catalog_url], check=True, env=env, timeout=120)
    with FileCheckpointManager(d, catalog=catalog_url) as m:  # sanity: it loads as saved
        state = m.load_checkpoint(1, sharded_state=_sharded_target(), verify="size")
        assert state["model"]["step"] == 3 and state["model"]["groups"] == [{"lr": 0.1}]
        assert torch.equal(state["model"]["w"], torch.arange(8.0))

    meta = d / "step_1" / "sharded" / ".metadata"
    sanity = tmp_path / "sanity-marker"
    pickle.loads(_hostile_pickle(sanity, meta.stat().st_size)).close()
    assert sanity.exists()
    marker = tmp_path / "pwned"
    meta.write_bytes(_hostile_pickle(marker, meta.stat().st_size))

    with FileCheckpointManager(d, catalog=catalog_url) as m:
        with pytest.raises(CheckpointCorruptError, match=r"\.metadata"):
            m.load_checkpoint(1, sharded_state=_sharded_target(), verify=verify)
        assert not marker.exists()
        assert [c.state for c in m.get_checkpoints()] == ["corrupt"]
    with FileCheckpointManager(d, catalog=catalog_url, load_options=LoadOptions(verify="size")) as m:
        with pytest.raises(CheckpointCorruptError):
            m.load_sharded_state(1, _sharded_target())
    assert not marker.exists()


def test_dcp_non_tensor_items_are_unpickled_weights_only(tmp_path: Path) -> None:
    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.planner import LoadItemType, ReadItem

    from ckptdb.storage.dcp import WeightsOnlyLoadPlanner

    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save(_Evil(marker), buf)
    buf.seek(0)
    planner = WeightsOnlyLoadPlanner()
    item = ReadItem(
        LoadItemType.BYTE_IO, MetadataIndex("model.step"), torch.Size([0]), MetadataIndex("model.step"),
        torch.Size([0]), torch.Size([0]),
    )  # fmt: skip
    with pytest.raises(UnsafeCheckpointFileError, match=r"model\.step"):
        planner.load_bytes(item, buf)
    assert not marker.exists()


# -- item 12: fairseq2's model_key entry never reaches the caller ------------------------------------


def test_imported_fairseq2_fsdp_checkpoint_loads_without_model_key(tmp_path: Path, catalog_url: str) -> None:
    d = fs2.v03_fsdp(tmp_path / "ck", {10: 1.0, 20: 0.5})
    import_directory(catalog_url, d)
    with FileCheckpointManager(d, catalog=catalog_url) as m:
        for step in (10, 20):
            state = m.load_checkpoint(step)
            assert "model_key" not in state
            assert sorted(state) == ["model", "optimizer", "step_nr"]  # exactly what fairseq2 returns
            shard0 = {k: v.chunk(2)[0] for k, v in fs2.model_sd(step).items()}
            assert all(torch.equal(state["model"][k], shard0[k]) for k in shard0)
        step, state = m.load_last_checkpoint()
        assert step == 20 and "model_key" not in state
    sd, _ = load_model(catalog_url)
    assert sorted(sd) == sorted(fs2.model_sd(20))
    # fairseq2 v0.3 DDP layout (model.pt carries model_key): no model_key either
    d2 = fs2.v03(tmp_path / "ddp", {5: None})
    url2 = f"sqlite:///{tmp_path / 'ddp.db'}"
    import_directory(url2, d2)
    with FileCheckpointManager(d2, catalog=url2) as m:
        assert "model_key" not in m.load_checkpoint(5)


def test_own_saves_never_return_model_key(tmp_path: Path, catalog_url: str) -> None:
    with _manager(tmp_path / "ck", catalog_url) as m:
        m.begin_checkpoint(1)
        m.save_state({"module": {"w": torch.ones(2)}, "step_nr": 1}, model_key="module")
        m.commit_checkpoint()
        m.begin_checkpoint(2)
        m.save_consolidated_fsdp_model(torch.nn.Linear(2, 2))
        m.save_state({"step_nr": 2})
        m.commit_checkpoint()
        assert sorted(m.load_checkpoint(1)) == ["module", "step_nr"]
        assert sorted(m.load_checkpoint(2)) == ["model", "step_nr"]


# -- item 15: every bad argument is an InvalidArgumentError naming it ------------------------------

BAD_CALLS: list[tuple[str, Callable[[FileCheckpointManager], object], str]] = [
    ("score huge int", lambda m: m.save_score(10**400), "too large"),
    ("score complex tensor", lambda m: m.save_score(torch.tensor(1 + 2j)), "complex"),  # type: ignore[arg-type]
    ("score complex", lambda m: m.save_score(1 + 2j), "real number"),  # type: ignore[arg-type]
    ("score str", lambda m: m.save_score("0.5"), "real number"),  # type: ignore[arg-type]
    ("score bool", lambda m: m.save_score(True), "real number"),
    ("score numpy bool", lambda m: m.save_score(np.bool_(True)), "real number"),  # type: ignore[arg-type]
    ("score Decimal", lambda m: m.save_score(Decimal("0.5")), "real number"),  # type: ignore[arg-type]
    ("score bool tensor", lambda m: m.save_score(torch.tensor(True)), "bool"),  # type: ignore[arg-type]
    ("score 2-element tensor", lambda m: m.save_score(torch.ones(2)), "one-element"),  # type: ignore[arg-type]
    ("score numpy array", lambda m: m.save_score(np.ones(2)), "real number"),  # type: ignore[arg-type]
    ("score list", lambda m: m.save_score([1.0]), "real number"),  # type: ignore[arg-type]
    ("metric empty", lambda m: m.save_score(1.0, metric=""), "metric"),
    ("metric int", lambda m: m.save_score(1.0, metric=5), "metric"),  # type: ignore[arg-type]
    ("metric control char", lambda m: m.save_score(1.0, metric="a\x00"), "metric"),
    ("metric too long", lambda m: m.save_score(1.0, metric="x" * 256), "metric"),
    ("step bool", lambda m: m.load_checkpoint(True), "step_nr"),
    ("step float", lambda m: m.load_checkpoint(1.0), "step_nr"),  # type: ignore[arg-type]
    ("step numpy float", lambda m: m.has_checkpoint(np.float64(1)), "step_nr"),  # type: ignore[arg-type]
    ("step negative", lambda m: m.delete_checkpoint(-1), "step_nr"),
    ("step huge", lambda m: m.load_metadata(2**63), "64-bit"),
    ("step str", lambda m: m.pin("1", "best"), "step_nr"),  # type: ignore[arg-type]
    ("step None", lambda m: m.load_checkpoint(None), "step_nr"),  # type: ignore[arg-type]
    ("verify bogus", lambda m: m.load_checkpoint(1, verify="sha"), "verify"),
    ("verify int", lambda m: m.load_last_checkpoint(verify=1), "verify"),  # type: ignore[arg-type]
    ("pin label empty", lambda m: m.pin(1, ""), "pin label"),
    ("pin label newline", lambda m: m.unpin("a\nb"), "pin label"),
    ("pin label int", lambda m: m.pin(1, 3), "pin label"),  # type: ignore[arg-type]
    ("n zero", lambda m: m.keep_last_n_checkpoints(0), "n must"),
    ("n negative", lambda m: m.keep_best_n_checkpoints(-2), "n must"),
    ("n bool", lambda m: m.keep_last_n_checkpoints(True), "n must"),
    ("n float", lambda m: m.keep_last_n_checkpoints(2.0), "n must"),  # type: ignore[arg-type]
    ("n huge", lambda m: m.keep_last_n_checkpoints(2**64), "64-bit"),
    ("n str", lambda m: m.keep_best_n_checkpoints("3"), "n must"),  # type: ignore[arg-type]
    ("best metric", lambda m: m.keep_best_n_checkpoints(1, metric=""), "metric"),
    ("policy n", lambda m: m.apply_retention(KeepLast(0)), "KeepLast"),
    ("policy n huge", lambda m: m.apply_retention(KeepLast(2**70)), "KeepLast"),
    ("load options", lambda m: LoadOptions(verify="none"), "verify"),
]

BAD_SAVES: list[tuple[str, Callable[[FileCheckpointManager], object], str]] = [
    ("state not a mapping", lambda m: m.save_state([1]), "mapping"),  # type: ignore[arg-type]
    ("state key int", lambda m: m.save_state({1: 2}), "keys must be strings"),  # type: ignore[dict-item]
    ("model_key int", lambda m: m.save_state({"model": {}}, model_key=3), "model_key"),  # type: ignore[arg-type]
    ("replicated_keys str", lambda m: m.save_state({"a": 1}, replicated_keys="a"), "replicated_keys"),  # type: ignore[arg-type]
    ("replicated_keys ints", lambda m: m.save_state({"a": 1}, replicated_keys={1}), "replicated_keys"),  # type: ignore[arg-type]
    ("metadata not a mapping", lambda m: m.save_metadata(3), "mapping"),  # type: ignore[arg-type]
    ("metadata key int", lambda m: m.save_metadata({3: 1}), "metadata key"),  # type: ignore[dict-item]
    ("metadata object", lambda m: m.save_metadata({"x": Foo()}), r"metadata\['x'\]"),
]


def test_every_bad_argument_is_an_invalid_argument_error(tmp_path: Path, catalog_url: str) -> None:
    with _manager(tmp_path / "ck", catalog_url) as m:
        m.begin_checkpoint(1)
        m.save_state({"x": torch.ones(1)})
        m.commit_checkpoint()
        for bad_step in (-5, True, 2.0, 2**64, "2"):
            with pytest.raises(InvalidArgumentError, match="step_nr"):
                m.begin_checkpoint(bad_step)  # type: ignore[arg-type]
        m.begin_checkpoint(2)
        for what, call, pattern in [*BAD_CALLS, *BAD_SAVES]:
            with pytest.raises(InvalidArgumentError, match=pattern) as ei:
                call(m)
            assert isinstance(ei.value, CheckpointError), what
        # what is fine stays fine (numpy ints, Fractions, 0-d and 1-element tensors, NaN, None)
        for ok in (1, 1.5, np.float32(0.25), np.int64(2), fractions.Fraction(1, 4), torch.tensor(0.5), torch.ones(1)):
            m.save_score(ok)  # type: ignore[arg-type]
        m.save_score(float("nan"), metric="nan_metric")
        m.save_score(None)
        m.save_state({"y": torch.ones(1)}, replicated_keys=None)
        m.commit_checkpoint()
        assert m.has_checkpoint(np.int64(2))  # type: ignore[arg-type]
        assert m.get_checkpoints()[-1].scores["score"] == 1.0
        cat = Catalog(catalog_url)
        assert [c.step_nr for c in cat.checkpoints(m.run.id) if c.state == "committed"] == [1, 2]
