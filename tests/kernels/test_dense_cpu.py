"""The dense fp32 op for a sparse model's dense layers (the output layer): exact to fp32
accumulation over every shape and batch tile, ATen's linear where it does not apply."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from dsf_runtime.kernels import cpu_bitmap, cpu_ops, dense_cpu

pytestmark = pytest.mark.skipif(not cpu_bitmap.build(), reason="CPU kernel could not be built here")


def _reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x.double() @ w.double().t()


@settings(max_examples=120, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.one_of(st.sampled_from([0, 1, 3, 4, 5, 67, 130]), st.integers(0, 300)),
    k=st.one_of(st.sampled_from([0, 1, 7, 8, 9, 576, 1031]), st.integers(0, 1100)),
    batch=st.one_of(st.sampled_from([0, 1, 2, 3, 4, 7, 64]), st.integers(0, 70)),
    scale=st.sampled_from([1.0, 1e-30, 1e30]),
    seed=st.integers(0, 2**16),
)
def test_matches_float64(rows, k, batch, scale, seed):
    """Row tails (rows % 4), column tails (k % 8, through the lane mask), batch tiles of
    3, 2 and 1, tiny and huge magnitudes: within fp32 accumulation error of float64."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, k, generator=g) * scale
    x = torch.randn(batch, k, generator=g)
    y = cpu_ops.ops().dense_linear(x, w)
    assert y.shape == (batch, rows) and y.dtype == torch.float32
    ref = _reference(x, w)
    # fp32 sums of k products: error bounded by ~k * 2^-24 * sum |w x|
    bound = (k + 1) * 2.0**-23 * (x.double().abs() @ w.double().abs().t()) + 1e-37
    assert bool(((y.double() - ref).abs() <= bound).all())


def test_non_finite_values_propagate():
    w = torch.ones(9, 17)
    x = torch.ones(2, 17)
    x[0, 16] = float("nan")  # in the masked tail
    x[1, 3] = float("inf")
    y = cpu_ops.ops().dense_linear(x, w)
    assert torch.isnan(y[0]).all() and torch.isinf(y[1]).all() and (y[1] > 0).all()


def test_strided_inputs_and_other_dtypes_match_linear():
    w = torch.randn(40, 24)
    x = torch.randn(24, 5).t()  # not contiguous
    torch.testing.assert_close(cpu_ops.ops().dense_linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
    xb, wb = x.bfloat16(), w.bfloat16()  # not fp32: ATen's linear, bit for bit
    assert torch.equal(cpu_ops.ops().dense_linear(xb, wb), F.linear(xb, wb))


def test_bad_shapes_are_clear_errors():
    with pytest.raises(RuntimeError, match=r"x \(n, k\) and weight \(rows, k\)"):
        cpu_ops.ops().dense_linear(torch.ones(2, 3), torch.ones(4, 5))
    with pytest.raises(RuntimeError, match=r"x \(n, k\) and weight \(rows, k\)"):
        cpu_ops.ops().dense_linear(torch.ones(3), torch.ones(4, 3))


def test_output_layer_uses_the_op_for_fp32_linear_only(monkeypatch):
    calls = []
    real = dense_cpu.linear
    monkeypatch.setattr(dense_cpu, "linear", lambda x, w: calls.append(1) or real(x, w))
    head = nn.Linear(16, 50, bias=False)
    x = torch.randn(3, 1, 16)
    f = dense_cpu.output_layer(head)
    assert f is not head
    torch.testing.assert_close(f(x), head(x), rtol=1e-5, atol=1e-5)
    assert calls
    assert dense_cpu.output_layer(nn.Linear(16, 50, bias=True)).__class__ is nn.Linear
    assert dense_cpu.output_layer(nn.Linear(16, 50, bias=False).bfloat16()).__class__ is nn.Linear


def test_compiles_as_an_op():
    """The fake impl lets torch.compile trace through it."""
    w = torch.randn(12, 20)
    fn = torch.compile(lambda x: cpu_ops.ops().dense_linear(x, w) * 2, fullgraph=True, backend="eager")
    x = torch.randn(3, 20)
    torch.testing.assert_close(fn(x), F.linear(x, w) * 2, rtol=1e-5, atol=1e-5)
