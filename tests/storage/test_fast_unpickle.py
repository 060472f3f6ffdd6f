"""The fast weights-only load (issue 14, ``ckptdb.storage.unpickle``): CPython's C unpickler with an
allow-list, only for files whose digest was checked first and that ckptdb's own save wrote. It
returns what ``torch.load(weights_only=True)`` returns, never accepts what that refuses, and is not
used on adopted (imported) checkpoints; the collector is paused during loads and always restored."""

from __future__ import annotations

import collections
import gc
import io
import os
import threading
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptdb import FileCheckpointManager, UnsafeCheckpointFileError
from ckptdb.importer import import_directory
from ckptdb.storage import fastsave, reader, unpickle

pytestmark = pytest.mark.skipif(not unpickle.enabled(), reason="this torch has no weights-only allow-list to follow")


def _values() -> dict[str, Any]:
    """Every kind of value ckptdb's save accepts, tensors of several dtypes and layouts among them."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 4, generator=g)
    lin = torch.nn.Linear(3, 2).state_dict()  # an OrderedDict with _metadata
    return {
        "model": {
            "w": base,
            "w_t": base.t(),  # a view sharing w's storage
            "row": base[2],
            "p": torch.nn.Parameter(torch.randn(5, generator=g)),
            "bf16": torch.randn(7, generator=g).to(torch.bfloat16),
            "i8": torch.arange(9, dtype=torch.int8),
            "bool": torch.tensor([True, False]),
            "c64": torch.randn(3, dtype=torch.complex64, generator=g),
            "conj": torch.randn(3, dtype=torch.complex64, generator=g).conj(),
            "grad": torch.zeros(2, requires_grad=True),
            "empty": torch.empty(0),
            "lin": lin,
        },
        "optimizer": {
            "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(5, generator=g)}},
            "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99), "params": [0], "name": "g0"}],
        },
        "misc": {
            "od": collections.OrderedDict(a=1, b=2.5),
            "counter": collections.Counter(x=3),
            "set": {1, 2, 3},
            "complex": 1 + 2j,
            "bytes": b"\x00\xffraw",
            "bytearray": bytearray(b"ba"),
            "size": torch.Size([2, 3]),
            "dtype": torch.float16,
            "device": torch.device("cpu"),
            "none": None,
            "big": 2**200,
            "nested": [[1, (2, 3)], {"k": "v"}],
        },
    }


def _same(a: Any, b: Any, where: str = "") -> None:
    assert type(a) is type(b), f"{where}: {type(a)} != {type(b)}"
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape, a.stride(), a.storage_offset()) == (b.dtype, b.shape, b.stride(), b.storage_offset())
        assert (a.requires_grad, a.is_conj()) == (b.requires_grad, b.is_conj()), where
        assert torch.equal(a.resolve_conj(), b.resolve_conj()), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
        assert getattr(a, "_metadata", None) == getattr(b, "_metadata", None), where
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _save(tmp_path: Path, url: str, state: dict[str, Any]) -> FileCheckpointManager:
    mgr = FileCheckpointManager(tmp_path / "ck", catalog=url)
    mgr.begin_checkpoint(1)
    mgr.save_state(state)
    mgr.commit_checkpoint()
    return mgr


def test_fast_load_returns_what_torch_load_returns(tmp_path: Path, catalog_url: str) -> None:
    state = _values()
    mgr = _save(tmp_path, catalog_url, state)
    before = unpickle.fast_loads
    got = mgr.load_checkpoint(1)
    assert unpickle.fast_loads == before + 2  # model.pt and rank_0.pt, both through the C unpickler
    for name in ("model.pt", "rank_0.pt"):
        path = tmp_path / "ck" / "step_1" / name
        _same(unpickle.load(path, mmap=True, trusted=True), torch.load(path, weights_only=True, mmap=True), name)
    _same(got["model"], state["model"], "model")
    _same(got["misc"], state["misc"], "misc")
    assert got["model"]["w_t"].untyped_storage().data_ptr() == got["model"]["w"].untyped_storage().data_ptr()


def test_many_tensors_in_a_large_file_are_hashed_first_then_loaded_fast(
    tmp_path: Path, catalog_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if reader._populate is None:
        pytest.skip("no MADV_POPULATE_READ: every file is hashed first anyway")
    monkeypatch.setattr(reader, "_MAPPED_MIN", 1 << 20)  # a 1.6 MB file counts as large
    monkeypatch.setattr(reader, "_MANY_RECORDS", 100)
    state = {"model": {f"p{i}": torch.full((1000,), float(i)) for i in range(400)}}
    mgr = _save(tmp_path, catalog_url, state)
    assert (reader._zip_records(tmp_path / "ck" / "step_1" / "model.pt") or 0) > 400
    before = unpickle.fast_loads
    got = mgr.load_checkpoint(1)
    assert unpickle.fast_loads == before + 1
    _same(got["model"], state["model"])
    # a few tensors in a large file: the mapped path (hash after the load), torch's unpickler
    monkeypatch.setattr(reader, "_MANY_RECORDS", 10_000)
    before = unpickle.fast_loads
    _same(mgr.load_checkpoint(1)["model"], state["model"])
    assert unpickle.fast_loads == before


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_a_global_outside_the_list_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "x": _Exploit(marker)}, path)
    before = unpickle.fast_loads
    with pytest.raises(UnsafeCheckpointFileError, match="weights-only"):
        reader.load_torch(path, 1, trusted=True)  # even when told to trust it: torch's refusal is final
    assert not marker.exists() and unpickle.fast_loads == before


@pytest.mark.parametrize("value", [frozenset({1}), b""], ids=["frozenset", "empty-bytes"])
def test_the_fast_load_accepts_nothing_torch_refuses(tmp_path: Path, value: object) -> None:
    # the C unpickler alone would build these (builtins.frozenset, builtins.bytes); torch refuses them
    path = tmp_path / "f.pt"
    torch.save({"v": value}, path)
    with pytest.raises(UnsafeCheckpointFileError):
        reader.load_torch(path, 1, trusted=True)


def test_imported_checkpoints_are_not_trusted(tmp_path: Path, catalog_url: str) -> None:
    d = tmp_path / "fs2"
    (d / "step_5").mkdir(parents=True)
    torch.save({"model": {"w": torch.ones(3)}, "model_key": "model"}, d / "step_5" / "model.pt")
    torch.save({"trainer": {"step": 5}}, d / "step_5" / "rank_0.pt")
    import_directory(catalog_url, d)
    mgr = FileCheckpointManager(d, catalog=catalog_url)
    before = unpickle.fast_loads
    got = mgr.load_checkpoint(5)
    assert torch.equal(got["model"]["w"], torch.ones(3)) and got["trainer"] == {"step": 5}
    assert unpickle.fast_loads == before  # adopted files: torch's own unpickler


def test_switched_off_by_the_environment(tmp_path: Path, catalog_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    mgr = _save(tmp_path, catalog_url, {"model": {"w": torch.ones(3)}})
    monkeypatch.setenv("CKPTDB_NO_FAST_UNPICKLE", "1")
    before = unpickle.fast_loads
    assert torch.equal(mgr.load_checkpoint(1)["model"]["w"], torch.ones(3))
    assert unpickle.fast_loads == before


def test_the_collector_is_paused_and_always_restored(tmp_path: Path) -> None:
    path = tmp_path / "a.pt"
    torch.save({"w": torch.zeros(2)}, path)
    seen: list[bool] = []
    orig = torch.load

    def spy(*a: Any, **k: Any) -> Any:
        seen.append(gc.isenabled())
        return orig(*a, **k)

    assert gc.isenabled()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "load", spy)
        unpickle.load(path, mmap=True)
    assert seen == [False] and gc.isenabled()
    gc.disable()  # a program that runs without the collector keeps it off
    try:
        unpickle.load(path, mmap=True)
        assert not gc.isenabled()
    finally:
        gc.enable()
    # loads in several threads at once: the last one out turns it back on; an error too
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file")
    errors: list[BaseException] = []

    def load(p: Path) -> None:
        try:
            for _ in range(20):
                unpickle.load(p, mmap=False)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=load, args=(p,)) for p in (path, path, bad, path)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 1 and gc.isenabled()


def test_zip_record_count(tmp_path: Path) -> None:
    small = tmp_path / "s.zip"
    with zipfile.ZipFile(small, "w") as z:
        for i in range(3):
            z.writestr(f"r{i}", b"x")
    assert reader._zip_records(small) == 3
    many = tmp_path / "m.zip"  # more than 65 535 records: the count is in the zip64 end record
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for i in range(70_000):
            z.writestr(f"{i}", b"")
    many.write_bytes(buf.getvalue())
    assert reader._zip_records(many) == 70_000
    junk = tmp_path / "j.pt"
    junk.write_bytes(b"\x00" * 100)
    assert reader._zip_records(junk) is None
    assert reader._zip_records(tmp_path / "absent") is None


def test_saves_pause_the_collector_and_restore_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ckptdb import SaveOptions

    seen: list[bool] = []
    orig = fastsave.save

    def spy(*a: Any, **k: Any) -> Any:
        seen.append(gc.isenabled())
        return orig(*a, **k)

    monkeypatch.setattr(fastsave, "save", spy)  # the writer calls fastsave.save through the module
    for blocking in (True, False):
        mgr = FileCheckpointManager(tmp_path / f"ck{blocking}", save_options=SaveOptions(blocking=blocking))
        mgr.begin_checkpoint(1)
        mgr.save_state({"model": {"w": torch.ones(3)}, "trainer": {"step": 1}})
        mgr.commit_checkpoint()
        mgr.wait()
        assert gc.isenabled()
    assert seen and not any(seen)


def _torch_zip_with_pickle(path: Path, pkl: bytes) -> None:
    """A torch.save zip whose data.pkl is ``pkl`` (the other records as torch wrote them)."""
    buf = io.BytesIO()
    torch.save({}, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = pkl if info.filename.endswith("/data.pkl") else src.read(info)
            dst.writestr(info.filename, data)


def _sets_attributes_on_globals() -> bytes:
    """Pickle (protocol 2): BUILD with a slot state on two allowed globals, then returns {'ok': 1}."""

    def build_on(module: bytes, name: bytes) -> bytes:
        # GLOBAL; state (None, {'zz_pwned': 1}); BUILD -> setattr(global, 'zz_pwned', 1); POP
        return b"c" + module + b"\n" + name + b"\n" + b"N}X\x08\x00\x00\x00zz_pwnedK\x01s\x86b0"

    return (
        b"\x80\x02"
        + build_on(b"torch._utils", b"_rebuild_tensor_v2")
        + build_on(b"collections", b"Counter")
        + b"}X\x02\x00\x00\x00okK\x01s."
    )


def test_a_pickle_cannot_change_the_globals_it_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the C unpickler applies BUILD to any object on its stack; torch's refuses it on these. Handing
    # out stand-ins keeps the real function and class untouched
    path = tmp_path / "build.pt"
    _torch_zip_with_pickle(path, _sets_attributes_on_globals())
    before = unpickle.fast_loads
    assert unpickle.load(path, mmap=False, trusted=True) == {"ok": 1}
    assert unpickle.fast_loads == before + 1  # the fast path took it, and
    assert not hasattr(torch._utils._rebuild_tensor_v2, "zz_pwned")
    assert not hasattr(collections.Counter, "zz_pwned")
    with pytest.raises(UnsafeCheckpointFileError):  # torch's unpickler refuses the BUILDs; such bytes
        reader.load_torch(path, 1)  # reach the fast path only if the catalog's digest says ckptdb wrote them
    # without the stand-ins the same bytes would have changed them for the whole process
    monkeypatch.setattr(unpickle, "_MUTABLE", frozenset())
    try:
        unpickle.load(path, mmap=False, trusted=True)
        assert getattr(collections.Counter, "zz_pwned", None) == 1
    finally:
        for obj in (torch._utils._rebuild_tensor_v2, collections.Counter):
            if hasattr(obj, "zz_pwned"):
                delattr(obj, "zz_pwned")
