"""StagingArea's fast path for small CPU tensors: bit-exact, aliasing as torch.save keeps it, reuse."""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch

from ckptdb.storage.staging import StagingArea


def _roundtrip(obj: Any) -> Any:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _state(seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(64, 8, generator=g)
    p = torch.nn.Parameter(torch.randn(33, generator=g))
    big = torch.randn(4, 16, generator=g)
    return {
        "w": w,
        "w_again": w,  # the same tensor twice
        "w_row": w[3],  # a view met after its whole storage
        "p": p,
        "half": torch.randn(7, generator=g).to(torch.float16),
        "ints": torch.arange(10, dtype=torch.int64) * seed,
        "t": big.t(),  # not contiguous: the storage path
        "col": big[:, 2],  # a view of the same storage, met after it
        "scalar": torch.tensor(float(seed)),
    }


def _check(staged: dict[str, Any], src: dict[str, Any]) -> None:
    loaded = _roundtrip(staged)
    ref = _roundtrip(src)
    for k in src:
        assert loaded[k].dtype == ref[k].dtype
        assert torch.equal(loaded[k], ref[k])
        assert loaded[k].stride() == ref[k].stride()
    assert loaded["w"] is loaded["w_again"]
    assert loaded["w_row"].untyped_storage().data_ptr() == loaded["w"].untyped_storage().data_ptr()
    assert loaded["col"].untyped_storage().data_ptr() == loaded["t"].untyped_storage().data_ptr()
    assert type(staged["p"]) is torch.nn.Parameter and staged["p"].requires_grad


def test_small_tensors_stage_bit_exact_with_aliasing_and_no_shared_memory() -> None:
    area = StagingArea()
    src = _state(1)
    staged = area.stage("f", src)
    for k in src:
        assert staged[k].untyped_storage().data_ptr() != src[k].untyped_storage().data_ptr()
    assert staged["w_row"].untyped_storage().data_ptr() == staged["w"].untyped_storage().data_ptr()
    _check(staged, src)
    with torch.no_grad():
        src["w"].add_(1)  # training goes on: the staged copy keeps the values of the save
    assert not torch.equal(staged["w"], src["w"])


def test_second_stage_reuses_tensors_and_sees_new_values() -> None:
    area = StagingArea()
    first = area.stage("f", _state(1))
    ptr = first["w"].untyped_storage().data_ptr()
    held = area.nbytes
    src = _state(2)
    second = area.stage("f", src)
    assert second["w"].untyped_storage().data_ptr() == ptr  # same layout: no new memory
    assert area.nbytes == held
    _check(second, src)


def test_changed_layout_gets_new_tensors() -> None:
    area = StagingArea()
    area.stage("f", _state(1))
    src = _state(2)
    src["w"] = torch.randn(5, 3)  # another shape at the same position
    src["w_again"] = src["w"]
    src["w_row"] = src["w"][1]
    src["p"] = torch.nn.Parameter(torch.randn(33), requires_grad=False)
    src["half"] = src["half"].to(torch.float32)
    staged = area.stage("f", src)
    assert staged["w"].shape == (5, 3)
    assert staged["p"].requires_grad is False
    assert staged["half"].dtype == torch.float32
    loaded = _roundtrip(staged)
    for k in src:
        assert torch.equal(loaded[k], src[k].detach())


def test_kind_change_at_the_same_position_gets_a_new_tensor() -> None:
    area = StagingArea()
    first = area.stage("f", {"a": torch.nn.Parameter(torch.ones(4)), "b": torch.zeros(3)})
    src = {"a": torch.full((4,), 2.0), "b": torch.zeros(3, requires_grad=True)}  # Parameter -> Tensor
    second = area.stage("f", src)
    assert type(second["a"]) is torch.Tensor and torch.equal(second["a"], src["a"])
    assert second["b"].requires_grad and second["b"] is not first["b"]
    assert type(first["a"]) is torch.nn.Parameter and torch.equal(first["a"], torch.ones(4))


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_tensors_that_are_not_dense_are_copied_whole() -> None:
    area = StagingArea()
    dense = torch.randn(4, 4)
    src = {"sparse": dense.to_sparse(), "csr": dense.to_sparse_csr(), "dense": dense}
    for _ in range(2):  # the second save meets the buffers and tensors of the first
        staged = area.stage("f", src)
        assert staged["sparse"].layout is torch.sparse_coo and staged["csr"].layout is torch.sparse_csr
        assert torch.equal(staged["sparse"].to_dense(), dense) and torch.equal(staged["csr"].to_dense(), dense)
        assert staged["sparse"]._values().data_ptr() != src["sparse"]._values().data_ptr()
        assert torch.equal(staged["dense"], dense)
        dense.add_(1)
        src = {"sparse": dense.to_sparse(), "csr": dense.to_sparse_csr(), "dense": dense}
