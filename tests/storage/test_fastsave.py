"""storage/fastsave: torch.save's archive, written with less Python per tensor.

Every state is saved twice, by ``torch.save`` and by ``fastsave.save``, into real files; the two
archives must hold the same records, in the same order, with the same bytes (the random
``.data/serialization_id`` aside), and load with plain ``torch.load(weights_only=True)``. States the
fast pickler does not take (subclasses, conjugate views, float8, quantized, storages on their own,
one storage seen as two dtypes, unpicklable objects) must come out exactly as ``torch.save`` writes
them, or fail with ``torch.save``'s own error.
"""

from __future__ import annotations

import collections
import io
import struct
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckptdb import FileCheckpointManager
from ckptdb.storage import fastsave


def records(data: bytes) -> list[tuple[str, bytes]]:
    """(name without the archive prefix, bytes) of every record, in archive order, but the random id."""
    out = []
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        for info in z.infolist():
            if info.filename.endswith("serialization_id"):
                continue
            # stored records, read past the local header (ckptdb writes no CRC32s: zipfile would refuse)
            name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
            start = info.header_offset + 30 + name_len + extra_len
            out.append((info.filename.split("/", 1)[1], data[start : start + info.file_size]))
    return out


def both(obj: Any, tmp_path: Path) -> tuple[bytes, bytes]:
    """The file torch.save writes for ``obj`` and the one fastsave.save writes."""
    a, b = tmp_path / "torch.pt", tmp_path / "fast.pt"
    with open(a, "wb") as f:  # a file object, as ckptdb's writer passes (the archive is named "archive")
        torch.save(obj, f)
    with open(b, "wb") as f:
        fastsave.save(obj, f)
    return a.read_bytes(), b.read_bytes()


def assert_same_archive(obj: Any, tmp_path: Path, *, fast: bool) -> None:
    ref, got = both(obj, tmp_path)
    assert records(got) == records(ref)
    assert len(got) == len(ref)  # same headers and alignment padding too
    assert (fastsave.pickled(obj) is not None) == fast  # which way it took
    loaded = torch.load(tmp_path / "fast.pt", weights_only=True)
    assert_equal(loaded, torch.load(tmp_path / "torch.pt", weights_only=True))


def assert_equal(a: Any, b: Any) -> None:
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
        assert a.requires_grad == b.requires_grad and a.storage_offset() == b.storage_offset()
        assert torch.equal(a.detach(), b.detach())
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_equal(x, y)
    else:
        assert a == b


def _optimizer_state() -> dict[str, Any]:
    lin = torch.nn.Linear(3, 4)
    opt = torch.optim.AdamW(lin.parameters())
    lin(torch.randn(2, 3)).sum().backward()
    opt.step()
    return {"model": lin.state_dict(), "optimizer": opt.state_dict(), "params": dict(lin.named_parameters())}


def _fast_states() -> dict[str, Any]:
    base = torch.arange(12.0)
    return {
        "nested containers": {"a": torch.randn(3, 4), "b": [torch.ones(2, dtype=torch.int64), (torch.tensor(True), 3)]},
        "views share one storage": {"x": base, "v": base[2:8].view(2, 3), "t": base.view(3, 4).t(), "again": base},
        "model, AdamW, parameters": _optimizer_state(),
        "every typed dtype": {
            str(d): torch.ones(3, dtype=d)
            for d in (
                *(torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.complex64, torch.complex128),
                *(torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool),
            )
        },
        "empty and 0-d": {"e": torch.empty(0), "s": torch.tensor(3.0), "z": torch.zeros(0, 3)[:, 1:]},
        "requires_grad": {"g": torch.randn(3, requires_grad=True), "p": torch.nn.Parameter(torch.ones(2), False)},
        "ordered dict with attributes": _with_metadata(collections.OrderedDict(a=torch.ones(2), b=1)),
        "no tensors": {"step": 3, "name": "x", "f": 1.5, "n": None, "b": b"raw", "t": (1, 2)},
        "non-contiguous": {"w": torch.randn(4, 6)[::2, 1::3], "e": torch.randn(3, 1).expand(3, 5)},
    }


def _with_metadata(od: collections.OrderedDict[str, Any]) -> collections.OrderedDict[str, Any]:
    od._metadata = {"": {"version": 1}}  # type: ignore[attr-defined]
    return od


@pytest.mark.parametrize("name", list(_fast_states()))
def test_same_archive_as_torch_save(tmp_path: Path, name: str) -> None:
    assert_same_archive(_fast_states()[name], tmp_path, fast=True)


class _Sub(torch.Tensor):
    pass


def _slow_states() -> dict[str, Any]:
    t = torch.randn(3)
    return {
        "tensor subclass": {"s": torch.randn(3).as_subclass(_Sub)},
        "conjugate view": {"c": torch.randn(2, dtype=torch.complex64).conj()},
        "negative view": {"n": torch.randn(2, dtype=torch.complex64).conj().imag},
        "float8": {"f": torch.ones(2).to(torch.float8_e4m3fn)},
        "a storage on its own": {"st": torch.ones(3).untyped_storage()},
        "tensor with attributes": {"a": _attr(t.clone())},
        "sparse": {"sp": torch.eye(3).to_sparse()},
        "meta": {"m": torch.empty(3, device="meta")},
    }


def _attr(t: torch.Tensor) -> torch.Tensor:
    t.note = "kept"  # type: ignore[attr-defined]
    return t


@pytest.mark.parametrize("name", list(_slow_states()))
def test_other_states_are_written_by_torch_save(tmp_path: Path, name: str) -> None:
    state = _slow_states()[name]
    ref, got = both(state, tmp_path)
    assert records(got) == records(ref) and fastsave.pickled(state) is None


def test_errors_are_torch_saves_own(tmp_path: Path) -> None:
    t = torch.zeros(4)
    two_dtypes = {"a": t, "b": t.view(torch.int32)}
    for bad in (two_dtypes, {"f": lambda: 1}):
        with pytest.raises(Exception) as ref:
            torch.save(bad, io.BytesIO())
        buf = io.BytesIO()
        with pytest.raises(type(ref.value)) as got:
            fastsave.save(bad, buf)
        assert str(got.value) == str(ref.value)


def test_off_switch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = {"w": torch.ones(3)}
    assert fastsave.pickled(state) is not None
    with torch.serialization.skip_data():  # torch.save's no-data mode is torch.save's to honour
        assert fastsave.pickled(state) is None
    monkeypatch.setenv("CKPTDB_NO_FAST_SAVE", "1")
    assert fastsave.pickled(state) is None
    assert_same_archive(state, tmp_path, fast=False)


def test_checkpoint_files_are_the_archive_torch_save_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the manager (the digests are of these bytes): each file is the archive torch.save
    writes for what it holds, and the fast way wrote it."""
    took: list[bool] = []
    orig = fastsave.pickled

    def spy(obj: Any) -> Any:
        out = orig(obj)
        took.append(out is not None)
        return out

    monkeypatch.setattr(fastsave, "pickled", spy)
    state = _optimizer_state()
    mgr = FileCheckpointManager(tmp_path / "ckpt")
    mgr.begin_checkpoint(1)
    mgr.save_state({"model": state["model"], "optimizer": state["optimizer"], "trainer": {"step": 1}})
    mgr.commit_checkpoint()
    assert took and all(took)
    files = sorted((tmp_path / "ckpt" / "step_1").rglob("*.pt"))
    assert files
    for path in files:
        loaded = torch.load(path, weights_only=True)
        with open(tmp_path / "ref.pt", "wb") as f:
            torch.save(loaded, f)
        assert records(path.read_bytes()) == records((tmp_path / "ref.pt").read_bytes()), path
    assert_equal(mgr.load_checkpoint(1)["model"], state["model"])


_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int8, torch.bool, torch.complex64]


@st.composite
def _states(draw: st.DrawFn) -> Any:
    """Nested containers of tensors that share storages (views, repeats), Parameters, scalars."""
    pool: list[torch.Tensor] = []

    def tensor() -> torch.Tensor:
        if pool and draw(st.booleans()):
            src = draw(st.sampled_from(pool))
            flat = src.reshape(-1) if src.is_contiguous() else src
            if flat.dim() == 1 and flat.numel() > 1 and draw(st.booleans()):
                start = draw(st.integers(0, flat.numel() - 1))
                return flat[start:]  # a view at an offset into the same storage
            return src
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        t = torch.zeros(shape, dtype=draw(st.sampled_from(_DTYPES)))
        if t.dim() == 2 and draw(st.booleans()):
            t = t.t()
        if t.is_floating_point() and draw(st.booleans()):
            t = torch.nn.Parameter(t, requires_grad=draw(st.booleans()))
        pool.append(t)
        return t

    leaves = st.one_of(st.integers(-5, 5), st.text(max_size=3), st.none(), st.floats(allow_nan=False), st.just(0))

    def value(depth: int) -> Any:
        kind = draw(st.integers(0, 4 if depth < 3 else 1))
        if kind == 0:
            return tensor()
        if kind == 1:
            return draw(leaves)
        items = [value(depth + 1) for _ in range(draw(st.integers(0, 4)))]
        if kind == 2:
            return items
        if kind == 3:
            return tuple(items)
        return {f"k{i}": v for i, v in enumerate(items)}

    return {"root": value(0)}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(state=_states())
def test_property_same_archive_as_torch_save(tmp_path: Path, state: Any) -> None:
    ref, got = both(state, tmp_path)
    assert records(got) == records(ref)
    loaded = torch.load(tmp_path / "fast.pt", weights_only=True)
    assert_equal(loaded, torch.load(tmp_path / "torch.pt", weights_only=True))


class _FailingFile:
    """A file object whose writes fail once ``limit`` bytes are written; counts calls after that."""

    def __init__(self, limit: int) -> None:
        self.limit, self.size, self.after = limit, 0, 0

    def write(self, data: Any) -> int:
        if self.size >= self.limit:
            self.after += 1
            raise OSError(5, "Input/output error")
        n = memoryview(data).nbytes
        self.size += n
        return n

    def flush(self) -> None:
        return None


def test_a_failed_write_ends_the_archive_at_once(tmp_path: Path) -> None:
    import gc

    state = {f"w{i}": torch.ones(1000) for i in range(20)}
    f = _FailingFile(20_000)
    with pytest.raises(Exception, match="Input/output error"):
        fastsave.save(state, f)
    calls = f.after
    gc.collect()  # nothing left to write through f later (an unfinished writer would, when collected)
    assert f.after == calls
