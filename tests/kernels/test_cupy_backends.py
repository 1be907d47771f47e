"""The cupy backends: what runs without a GPU (the measured plan, the DLPack hand-off
contract, the reasons `dsf info` gives), and on a GPU with cupy both backends against the
float64 product."""

from __future__ import annotations

import pytest
import torch

from dsf_runtime.formats import get_format
from dsf_runtime.kernels import BACKENDS, can_run, cupy_common
from dsf_runtime.kernels.cupy_csr import compute_dtype
from dsf_runtime.kernels.plan_cache import MeasuredPlan
from helpers import random_sparse


def test_measured_plan_times_once_per_key_and_keeps_the_fastest():
    calls = []
    speed = {"spmm": 3.0, "spmv": 1.0}

    def timer(fn):
        name = fn()
        calls.append(name)
        return speed[name]

    plan = MeasuredPlan(timer, default="spmm")
    ways = {"spmm": lambda: "spmm", "spmv": lambda: "spmv"}
    assert plan.choose((64, 64, 4), ways) == "spmv"
    assert plan.choose((64, 64, 4), ways) == "spmv" and calls == ["spmm", "spmv"]  # cached, not retimed
    speed["spmm"] = 0.5
    assert plan.choose((64, 64, 8), ways) == "spmm"  # another key is timed anew
    assert plan.timings[(64, 64, 8)] == {"spmm": 0.5, "spmv": 1.0}
    # while timing is impossible (a CUDA graph records), the default runs and nothing is cached
    assert plan.choose((1, 1, 2), ways, can_time=False) == "spmm" and (1, 1, 2) not in plan.choices
    assert plan.choose((1, 1, 2), {"spmv": ways["spmv"]}) == "spmv"  # a single way needs no timing


def test_handoff_contract():
    with pytest.raises(ValueError, match="CUDA tensors"):
        cupy_common.handoff_view(torch.zeros(3))
    # bf16 travels as its int16 bits (cupy and numpy have no bf16); the rest as they are
    assert cupy_common.DLPACK_AS[torch.bfloat16] == torch.int16
    assert all(k == v for k, v in cupy_common.DLPACK_AS.items() if k != torch.bfloat16)
    b = torch.randn(7).bfloat16()
    assert torch.equal(b.view(torch.int16).view(torch.bfloat16), b)
    assert compute_dtype(torch.float16) == torch.float16
    assert compute_dtype(torch.bfloat16) == compute_dtype(torch.float32) == torch.float32


@pytest.mark.parametrize("name", ["cupy-csr", "cupy-bitmap"])
def test_reasons_where_they_cannot_run(name, monkeypatch):
    backend = BACKENDS[name]
    ok, why = can_run(backend, "bitmap", "cpu")
    assert not ok and "runs on cuda" in why
    monkeypatch.setattr(cupy_common, "cupy_installed", lambda: False)
    ok, why = can_run(backend, "bitmap", "cuda")
    assert not ok and "pip install" in why and "cupy" in why


needs_cupy_gpu = pytest.mark.skipif(
    cupy_common.unavailable_reason() is not None, reason=f"cupy on a GPU: {cupy_common.unavailable_reason()}"
)


@needs_cupy_gpu
@pytest.mark.parametrize("name", ["cupy-csr", "cupy-bitmap"])
@pytest.mark.parametrize("value_dtype", [torch.float16, torch.bfloat16, torch.float32, torch.int8])
@pytest.mark.parametrize("x_dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("batch", [1, 3, 9, 20])
def test_on_the_gpu_against_float64(name, value_dtype, x_dtype, batch):
    backend = BACKENDS[name]
    shape = (67, 1301)
    fmt = get_format("bitmap")
    tensors = fmt.pack(random_sparse(*shape, 0.4, seed=batch, empty_rows=2), value_dtype)
    if not can_run(backend, "bitmap", "cuda", tensors)[0]:
        pytest.skip(f"{name} does not take {value_dtype} values")
    dense = fmt.unpack(tensors, shape).double()
    prepared = backend.prepare("bitmap", {k: v.cuda() for k, v in tensors.items()}, shape, x_dtype)
    x = torch.randn(batch, shape[1], generator=torch.Generator().manual_seed(1)).to(x_dtype)
    y = backend.matmul(prepared, x.cuda()).cpu()
    assert y.shape == (batch, shape[0]) and y.dtype == x_dtype
    ref = x.double() @ dense.t()
    tol = 1e-5 if x_dtype == torch.float32 and name == "cupy-bitmap" else 3e-3
    assert (y.double() - ref).norm() <= tol * ref.norm()
