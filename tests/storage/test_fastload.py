"""storage/fastload: the mapped load of files ckptdb wrote, with less Python per tensor.

Each state is saved by ckptdb's serialiser into a real file and loaded twice, by
``torch.load(mmap=True, weights_only=True)`` and by ``fastload.load``: same objects, same dtypes,
shapes, strides, offsets, ``requires_grad``, Parameters, shared storages. Files it must not take
(another storage class, a record past the end, globals off the list, a BUILD on its rebuild
function) raise ``NotFast`` or fall back to torch's load with the same answer.
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings

from ckptdb import FileCheckpointManager
from ckptdb.storage import fastload, fastsave, unpickle
from tests.storage.test_fast_unpickle import _sets_attributes_on_globals, _torch_zip_with_pickle
from tests.storage.test_fastsave import _fast_states, _states, assert_equal


def save(obj: Any, path: Path) -> Path:
    with open(path, "wb") as f:
        fastsave.save(obj, f)
    return path


def same_storages(a: Any, b: Any) -> list[tuple[int, int]]:
    """Which tensors of ``a`` (in walk order) share a storage, as index pairs; compared between loads."""
    seen: dict[int, int] = {}
    pairs: list[tuple[int, int]] = []

    def walk(v: Any) -> None:
        if isinstance(v, torch.Tensor):
            key = v.untyped_storage().data_ptr()
            i = len(seen) + len(pairs)
            if key in seen and v.untyped_storage().nbytes():
                pairs.append((seen[key], i))
            else:
                seen.setdefault(key, i)
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x)

    walk(a)
    return pairs


def check(obj: Any, tmp_path: Path) -> None:
    path = save(obj, tmp_path / "f.pt")
    got = fastload.load(path)
    want = torch.load(path, mmap=True, weights_only=True)
    assert_equal(got, want)
    assert same_storages(got, got) == same_storages(want, want)


@pytest.mark.parametrize("name", list(_fast_states()))
def test_same_objects_as_torch_load(tmp_path: Path, name: str) -> None:
    check(_fast_states()[name], tmp_path)


def test_conjugate_and_negative_views(tmp_path: Path) -> None:
    z = torch.randn(3, dtype=torch.complex64)
    check({"c": z.conj(), "n": torch.randn(3, dtype=torch.complex64).conj().imag}, tmp_path)  # metadata kept


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(state=_states())
def test_property_same_objects_as_torch_load(tmp_path: Path, state: Any) -> None:
    check(state, tmp_path)


def test_tensors_are_views_of_the_mapped_file(tmp_path: Path) -> None:
    path = save({"a": torch.arange(1000.0), "b": torch.ones(10)}, tmp_path / "f.pt")
    got = fastload.load(path)
    maps = Path("/proc/self/maps").read_text()
    addr = got["a"].data_ptr()
    line = next(
        ln for ln in maps.splitlines() if int(ln.split("-")[0], 16) <= addr < int(ln.split()[0].split("-")[1], 16)
    )
    assert line.endswith(str(path)), line


def test_files_it_does_not_take(tmp_path: Path) -> None:
    f8 = save({"f": torch.ones(2).to(torch.float8_e4m3fn)}, tmp_path / "f8.pt")  # UntypedStorage in the pickle
    with pytest.raises(fastload.NotFast):
        fastload.load(f8)
    short = save({"w": torch.ones(1000)}, tmp_path / "short.pt")
    data = short.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(Exception):  # noqa: B017 - torch's zip reader or NotFast: never a tensor
        fastload.load(tmp_path / "trunc.pt")
    build = tmp_path / "build.pt"  # a BUILD on the rebuild function: refused, nothing changed
    _torch_zip_with_pickle(build, _sets_attributes_on_globals())
    with pytest.raises(AttributeError):
        fastload.load(build)
    assert not hasattr(torch._utils._rebuild_tensor_v2, "zz_pwned")
    assert not hasattr(collections.Counter, "zz_pwned")
    assert unpickle.load(build, mmap=True, trusted=True) == {"ok": 1}  # the next way takes it, harmlessly
    assert not hasattr(collections.Counter, "zz_pwned")


def test_checkpoint_loads_take_it(tmp_path: Path) -> None:
    state = {"model": {f"w{i}": torch.randn(4) for i in range(300)}, "trainer": {"step": 1}}
    mgr = FileCheckpointManager(tmp_path / "ck")
    mgr.begin_checkpoint(1)
    mgr.save_state(state)
    mgr.commit_checkpoint()
    before = unpickle.fast_loads
    got = mgr.load_checkpoint(1)
    assert unpickle.fast_loads > before
    assert_equal(got["model"], state["model"])
