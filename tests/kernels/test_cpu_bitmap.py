"""The C++ bitmap kernel: both instruction paths, fp16 and bf16, odd shapes and batches."""

from __future__ import annotations

import pytest
import torch

from dsf_runtime.formats import get_format
from dsf_runtime.kernels import BACKENDS, choose_backend
from dsf_runtime.linear import DSFLinear
from helpers import random_sparse

backend = BACKENDS["cpu-bitmap"]
pytestmark = pytest.mark.skipif(not backend.available(), reason="CPU kernel could not be built here")


@pytest.mark.parametrize("isa", ["native", "avx2", "portable"])
@pytest.mark.parametrize("value_dtype", [torch.float16, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("shape", [(830, 545), (1, 33), (64, 1), (37, 95), (300, 4096)])
@pytest.mark.parametrize("density", [0.01, 0.5, 0.9])
@pytest.mark.parametrize("batch", [1, 3, 4, 5, 9, 17, 40])
def test_matches_dense(monkeypatch, isa, value_dtype, shape, density, batch):
    if isa != "native":
        monkeypatch.setenv("DSF_CPU_ISA", isa)
        if isa == "avx2" and backend.isa != "avx2":
            pytest.skip("this CPU has no AVX2")
    tensors = get_format("bitmap").pack(random_sparse(*shape, density, seed=batch, empty_rows=2), value_dtype)
    dense = get_format("bitmap").unpack(tensors, shape)  # the stored numbers (int8: dequantized)
    p = backend.prepare("bitmap", tensors, shape, torch.float32)
    x = torch.randn(batch, shape[1], generator=torch.Generator().manual_seed(3))
    y = backend.matmul(p, x)
    ref = x.double() @ dense.double().t()
    scale = ref.abs().max().clamp_min(1.0)
    assert y.shape == (batch, shape[0])
    assert float((y.double() - ref).abs().max() / scale) < 1e-5


@pytest.mark.parametrize("batch", [2, 12, 33])
def test_word_and_nonzero_paths_agree_either_side_of_the_switch(monkeypatch, batch):
    """DSF_NZ_MIN_BATCH moves the word/nonzero switch; both paths give the dense product
    (x strided in memory too: the nonzero path lays x out itself)."""
    shape = (200, 1100)
    tensors = get_format("bitmap").pack(random_sparse(*shape, 0.3, seed=batch), torch.float16)
    dense = get_format("bitmap").unpack(tensors, shape).double()
    p = backend.prepare("bitmap", tensors, shape, torch.float32)
    x = torch.randn(shape[1], batch, generator=torch.Generator().manual_seed(1)).t()  # non-contiguous
    ys = []
    for switch in ("1", "1000"):
        monkeypatch.setenv("DSF_NZ_MIN_BATCH", switch)
        ys.append(backend.matmul(p, x).double())
    ref = x.double() @ dense.t()
    for y in ys:
        assert float((y - ref).abs().max() / ref.abs().max()) < 1e-5


@pytest.mark.parametrize("bad", ["0", "-3", "many", "1.5"])
def test_a_bad_nz_min_batch_is_a_clear_error(monkeypatch, bad):
    monkeypatch.setenv("DSF_NZ_MIN_BATCH", bad)
    p = backend.prepare("bitmap", get_format("bitmap").pack(torch.eye(8), torch.float16), (8, 8), torch.float32)
    with pytest.raises(ValueError, match="DSF_NZ_MIN_BATCH must be a positive integer"):
        backend.matmul(p, torch.randn(2, 8))


def test_auto_prefers_the_kernel_for_fp16_bitmap_and_declines_fp32():
    fp16 = get_format("bitmap").pack(torch.eye(8), torch.float16)
    fp32 = get_format("bitmap").pack(torch.eye(8), torch.float32)
    assert choose_backend("bitmap", "cpu", tensors=fp16).name == "cpu-bitmap"
    assert choose_backend("bitmap", "cpu", tensors=fp32).name == "torch-csr"


def test_dsf_linear_uses_kernel():
    L = random_sparse(50, 40, 0.34).half().float()
    R = random_sparse(40, 70, 0.16, seed=1).half().float()
    layer = DSFLinear.from_factors(L, R, torch.randn(50), fmt="bitmap", value_dtype=torch.float16)
    x = torch.randn(2, 7, 70)
    y = layer(x)
    assert layer.backend_name == "cpu-bitmap"
    torch.testing.assert_close(y, torch.nn.functional.linear(x, L @ R, layer.bias), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copied_operands_use_their_own_memory(how):
    """Prepared operands keep their tensors' addresses; a copy must carry the copy's, so
    that it stays correct once the original is gone (a deep-copied or pickled model)."""
    import copy
    import gc
    import pickle

    L = random_sparse(50, 40, 0.34).half().float()
    R = random_sparse(40, 70, 0.16, seed=1).half().float()
    layer = DSFLinear.from_factors(L, R, torch.randn(50), fmt="bitmap", value_dtype=torch.float16)
    x = torch.randn(3, 70)
    ref = layer(x)  # prepares (and caches) the operands
    twin = copy.deepcopy(layer) if how == "deepcopy" else pickle.loads(pickle.dumps(layer))
    right, left = twin._prepared
    assert left.ptrs[2] == twin.L.stored()["values"].data_ptr() != layer._prepared[1].ptrs[2]
    del layer
    gc.collect()
    torch.zeros(1 << 20).fill_(float("nan"))  # reuse the freed memory for something else
    torch.testing.assert_close(twin(x), ref)


@pytest.mark.parametrize("shape", [(830, 545), (1, 33), (300, 4096)])
@pytest.mark.parametrize("density", [0.01, 0.5, 0.9])
@pytest.mark.parametrize("batch", [1, 3, 4, 9, 16, 21])
def test_bf16_model_path_matches_dense_bf16(shape, density, batch):
    """bf16 values and bf16 activations (a model run in bf16): exact bf16 products,
    fp32 accumulation, so it matches the float64 product of the same bf16 numbers."""
    dense = random_sparse(*shape, density, seed=batch).to(torch.bfloat16)
    p = backend.prepare("bitmap", get_format("bitmap").pack(dense, torch.bfloat16), shape, torch.bfloat16)
    x = torch.randn(batch, shape[1], generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    y = backend.matmul(p, x)
    assert y.dtype == torch.bfloat16 and y.shape == (batch, shape[0])
    ref = x.double() @ dense.double().t()
    scale = ref.abs().max().clamp_min(1.0)
    assert float((y.double() - ref).abs().max() / scale) < 2 ** -8  # the bf16 rounding of the output
