"""DSFLinear computes y = L (R x) + b like the dense product, for any leading shape."""

from __future__ import annotations

import pytest
import torch

from dsf_runtime.linear import DSFLinear
from helpers import random_sparse


@pytest.mark.parametrize("out_f,in_f", [(48, 80), (80, 48), (33, 33)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("lead", [(1,), (3, 7), (2, 1, 5)])
def test_forward_matches_dense_product(out_f, in_f, bias, lead):
    r = min(out_f, in_f)
    L = random_sparse(out_f, r, 0.4, seed=1)
    R = random_sparse(r, in_f, 0.3, seed=2)
    b = torch.randn(out_f) if bias else None
    layer = DSFLinear.from_factors(L, R, b, value_dtype=torch.float32)
    x = torch.randn(*lead, in_f, generator=torch.Generator().manual_seed(7))
    ref = torch.nn.functional.linear(x.double(), L.double() @ R.double(), None if b is None else b.double())
    y = layer(x)
    assert y.shape == (*lead, out_f)
    # two fp32 products of <= 80 terms each: relative to the output's scale, well under 1e-5
    assert float((y.double() - ref).abs().max()) <= 1e-5 * max(1.0, float(ref.abs().max()))
    assert layer.backend_name == "torch-csr"
    assert "backend=torch-csr" in repr(layer)


def test_fp16_storage_is_exact_for_fp16_values():
    L = random_sparse(20, 16, 0.5).half().float()
    R = random_sparse(16, 24, 0.5, seed=3).half().float()
    layer = DSFLinear.from_factors(L, R, None, value_dtype=torch.float16)
    assert torch.equal(layer.L.to_dense().float(), L) and torch.equal(layer.R.to_dense().float(), R)
    assert layer.nbytes() == layer.L.nbytes() + layer.R.nbytes()


def test_factor_shapes_must_chain():
    with pytest.raises(ValueError, match="do not chain"):
        DSFLinear.from_factors(torch.ones(4, 3), torch.ones(2, 5), None)


def test_moving_module_rebuilds_kernel_operands():
    layer = DSFLinear.from_factors(
        random_sparse(8, 8, 0.5), random_sparse(8, 8, 0.5, seed=1), None, value_dtype=torch.float32
    )
    x = torch.randn(2, 8)
    y1 = layer(x)
    layer.to(torch.float64)  # _apply drops the prepared operands
    assert layer._prepared is None
    torch.testing.assert_close(layer(x.double()).float(), y1, rtol=1e-5, atol=1e-6)
