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
    monkeypatch.setattr(dense_cpu, "linear", lambda x, w, s=None: calls.append(1) or real(x, w, s))
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


def _q8_weight(rows: int, k: int, g: torch.Generator) -> torch.Tensor:
    """A weight as dequantized from Q8_0: int8 (|q| <= 127, each block's largest 127)
    times an fp16 scale per 32 columns, formed in fp32."""
    q = torch.randint(-127, 128, (rows, k // 32, 32), generator=g).float()
    q[..., 0] = 127 * torch.where(torch.rand(rows, k // 32, generator=g) < 0.5, -1.0, 1.0)
    d = (torch.rand(rows, k // 32, 1, generator=g) * 0.02 + 1e-4).half().float()
    return (q * d).view(rows, k)


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.one_of(st.sampled_from([1, 3, 4, 5, 67]), st.integers(1, 200)),
    blocks=st.integers(1, 40),
    batch=st.one_of(st.sampled_from([0, 1, 2, 3, 4, 7, 64]), st.integers(0, 70)),
    seed=st.integers(0, 2**16),
)
def test_int8_form_gives_the_fp32_output_bit_for_bit(rows, blocks, batch, seed):
    """A Q8_0-dequantized weight packs to int8 x block scale; the op reads it back to the
    same fp32 weights before the same FMAs, so y equals the fp32 weight's y exactly."""
    g = torch.Generator().manual_seed(seed)
    w = _q8_weight(rows, 32 * blocks, g)
    w[0, :32] = 0  # an all-zero block: scale 0
    packed = dense_cpu.pack_exact(w)
    assert packed.weight.dtype == torch.int8 and packed.scales.shape == (rows, blocks)
    assert packed.form == "int8 x scale/32" and packed.nbytes == rows * blocks * (32 + 4)
    assert torch.equal(dense_cpu.exact_fp32(packed), w)
    x = torch.randn(batch, 32 * blocks, generator=g)
    y = cpu_ops.ops().dense_linear(x, packed.weight, packed.scales)
    assert torch.equal(y, cpu_ops.ops().dense_linear(x, w))
    bound = (32 * blocks + 1) * 2.0**-23 * (x.double().abs() @ w.double().abs().t()) + 1e-37
    assert bool(((y.double() - _reference(x, w)).abs() <= bound).all())


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.integers(1, 130),
    k=st.one_of(st.sampled_from([1, 7, 8, 9, 33, 576]), st.integers(1, 700)),
    batch=st.one_of(st.sampled_from([1, 2, 3, 64]), st.integers(0, 70)),
    seed=st.integers(0, 2**16),
)
def test_bf16_form_gives_the_fp32_output_bit_for_bit(rows, k, batch, seed):
    """A weight of bf16 numbers (a model loaded from bf16) packs to bf16, column tails
    included, and gives the fp32 weight's y exactly."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, k, generator=g).bfloat16().float()
    w[0, 0] = 3 * 2**-133  # a subnormal that bf16 holds (it keeps fp32's exponent range)
    packed = dense_cpu.pack_exact(w)
    assert packed.weight.dtype == torch.bfloat16 and packed.scales is None
    x = torch.randn(batch, k, generator=g)
    assert torch.equal(cpu_ops.ops().dense_linear(x, packed.weight), cpu_ops.ops().dense_linear(x, w))


def test_packing_keeps_fp32_where_a_narrow_form_would_change_a_weight():
    g = torch.Generator().manual_seed(0)
    w = _q8_weight(8, 64, g)
    assert dense_cpu.pack_exact(w).weight.dtype == torch.int8
    off = w.clone()
    off[5, 40] = torch.nextafter(off[5, 40], torch.tensor(1.0))  # one weight off the grid of its block
    assert dense_cpu.pack_exact(off).weight.dtype == torch.float32
    for bad in (float("nan"), float("inf")):
        nonfinite = w.clone()
        nonfinite[2, 3] = bad
        assert dense_cpu.pack_exact(nonfinite).weight.dtype == torch.float32
    assert dense_cpu.pack_exact(w[:, :40].contiguous()).weight.dtype == torch.float32  # k not whole blocks
    assert dense_cpu.pack_exact(torch.randn(6, 64)).weight.dtype == torch.float32
    ones = torch.ones(6, 48)  # bf16 numbers, but not whole blocks of 32: bf16
    assert dense_cpu.pack_exact(ones).weight.dtype == torch.bfloat16


def test_packed_forms_are_checked():
    q, s = torch.zeros(4, 64, dtype=torch.int8), torch.ones(4, 2)
    x = torch.ones(2, 64)
    with pytest.raises(RuntimeError, match="int8 weight needs scales"):
        cpu_ops.ops().dense_linear(x, q)
    with pytest.raises(RuntimeError, match="int8 weight needs scales"):
        cpu_ops.ops().dense_linear(x, torch.ones(4, 64), s)
    with pytest.raises(RuntimeError, match=r"scales must be fp32 \(rows, k / 32\)"):
        cpu_ops.ops().dense_linear(x, q, torch.ones(4, 3))
    with pytest.raises(RuntimeError, match="multiple of 32"):
        cpu_ops.ops().dense_linear(torch.ones(2, 40), torch.zeros(4, 40, dtype=torch.int8), torch.ones(4, 1))
    with pytest.raises(RuntimeError, match="takes fp32 x"):
        cpu_ops.ops().dense_linear(x.bfloat16(), q, s)


def test_output_layer_packs_exactly_unless_turned_off(monkeypatch):
    g = torch.Generator().manual_seed(1)
    head = nn.Linear(64, 70, bias=False)
    with torch.no_grad():
        head.weight.copy_(_q8_weight(70, 64, g))
    x = torch.randn(2, 1, 64, generator=g)
    calls = []
    real = dense_cpu.linear
    monkeypatch.setattr(dense_cpu, "linear", lambda x, w, s=None: calls.append(w.dtype) or real(x, w, s))
    packed = dense_cpu.output_layer(head)
    y = packed(x)
    monkeypatch.setenv("DSF_OUTPUT_PACKING", "off")
    plain = dense_cpu.output_layer(head)
    assert torch.equal(plain(x), y)
    assert calls == [torch.int8, torch.float32] and (packed.form, plain.form) == ("int8 x scale/32", "fp32")
    torch.testing.assert_close(y, head(x), rtol=1e-5, atol=1e-5)
