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
        ys.append(backend.matmul(backend.refresh(p), x).double())
    ref = x.double() @ dense.t()
    for y in ys:
        assert float((y - ref).abs().max() / ref.abs().max()) < 1e-5


@pytest.mark.parametrize("value_dtype", [torch.float16, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("shape", [(70, 1100), (130, 576)])
@pytest.mark.parametrize("batch", [33, 48, 64, 65, 100, 129])
def test_prefill_batches_in_chunks_of_up_to_64_match_dense(value_dtype, shape, batch):
    """Batches past 32 (prefill) run in chunks of up to 64 rows of x on the nonzero path,
    with one set of accumulators from 5 vectors per x^T row on; chunk edges and the
    column blocks (4 words at 64 rows) give the dense product."""
    tensors = get_format("bitmap").pack(random_sparse(*shape, 0.4, seed=batch, empty_rows=1), value_dtype)
    dense = get_format("bitmap").unpack(tensors, shape).double()
    p = backend.prepare("bitmap", tensors, shape, torch.float32)
    x = torch.randn(batch, shape[1], generator=torch.Generator().manual_seed(4))
    ref = x.double() @ dense.t()
    assert float((backend.matmul(p, x).double() - ref).abs().max() / ref.abs().max()) < 1e-5


@pytest.mark.parametrize("value_dtype", [torch.bfloat16, torch.int8])
@pytest.mark.parametrize("density", [0.1, 0.5])
def test_a_decode_steps_call_is_bound_once_and_matches_the_general_route(monkeypatch, value_dtype, density):
    """One contiguous fp32 row of x (a decode step's call) goes through the call bound at
    prepare(): bitwise the general route's result (reached with a strided x), also on a
    deep copy whose original is gone; x to be padded, or the nonzero path at batch 1,
    take the general route."""
    import copy
    import gc

    if backend.isa == "portable":
        pytest.skip("the portable path has no bound call")
    shape = (96, 256)
    tensors = get_format("bitmap").pack(random_sparse(*shape, density, seed=5), value_dtype)
    dense = get_format("bitmap").unpack(tensors, shape).double()
    p = backend.prepare("bitmap", tensors, shape, torch.float32)
    assert p.call1 is not None
    # factors on the AVX2 paths (int8 values, and on some AVX-512 CPUs fp16 values) index sparse factors
    assert (p.paths.columns_max_batch >= 1) == (density < 0.2 and p.paths.isa == "avx2")
    x = torch.randn(1, shape[1], generator=torch.Generator().manual_seed(2))
    strided = torch.stack([x[0], x[0]], dim=1)[:, 0].unsqueeze(0)  # the same numbers, not contiguous
    assert not strided.is_contiguous()
    fast, general = backend.matmul(p, x), backend.matmul(p, strided)
    assert torch.equal(fast, general)
    ref = x.double() @ dense.t()
    assert float((fast.double() - ref).abs().max() / ref.abs().max()) < 1e-5
    twin = copy.deepcopy(p)
    del p, tensors
    gc.collect()
    assert twin.call1 is not None and torch.equal(backend.matmul(twin, x), fast)
    padded = backend.prepare("bitmap", get_format("bitmap").pack(random_sparse(96, 250, 0.5, seed=5), value_dtype),
                             (96, 250), torch.float32)
    assert padded.call1 is None  # x is padded to whole 32-column words on the word path
    monkeypatch.setenv("DSF_NZ_MIN_BATCH", "1")
    assert backend.refresh(twin).call1 is None or twin.paths.columns_max_batch >= 1


@pytest.mark.parametrize("bad", ["0", "-3", "many", "1.5"])
def test_a_bad_nz_min_batch_is_a_clear_error(monkeypatch, bad):
    """A bad setting is refused when a layer is prepared (loaded), and by refresh()."""
    tensors = get_format("bitmap").pack(torch.eye(8), torch.float16)
    p = backend.prepare("bitmap", tensors, (8, 8), torch.float32)
    monkeypatch.setenv("DSF_NZ_MIN_BATCH", bad)
    with pytest.raises(ValueError, match="DSF_NZ_MIN_BATCH must be a positive integer"):
        backend.prepare("bitmap", tensors, (8, 8), torch.float32)
    with pytest.raises(ValueError, match="DSF_NZ_MIN_BATCH must be a positive integer"):
        backend.refresh(p)


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
    if backend.isa == "avx2":  # R (16% dense) carries column indices, and the copy its own
        assert right.columns is not None and right.columns.data_ptr() != layer._prepared[0].columns.data_ptr()
        torch.testing.assert_close(right.columns, layer._prepared[0].columns)
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


needs_avx2 = pytest.mark.skipif(backend.isa != "avx2", reason="the column-index path is the AVX2 path's")


@needs_avx2
@pytest.mark.parametrize("value_dtype", [torch.float16, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("shape", [(830, 545), (1, 33), (64, 1), (37, 95), (300, 4096)])
@pytest.mark.parametrize("density", [0.01, 0.15, 0.6])
@pytest.mark.parametrize("batch", [1, 2, 5, 11])
def test_column_path_matches_dense(monkeypatch, value_dtype, shape, density, batch):
    """The column-index path, forced on for any density and batch: rows of 0-7, 8-15 and
    16+ nonzeros (the scalar tail, one and two vectors), empty rows, x strided."""
    monkeypatch.setenv("DSF_COLUMNS_MAX_DENSITY", "1")
    monkeypatch.setenv("DSF_COLUMNS_MAX_BATCH", "16")
    tensors = get_format("bitmap").pack(random_sparse(*shape, density, seed=batch, empty_rows=2), value_dtype)
    dense = get_format("bitmap").unpack(tensors, shape)
    p = backend.prepare("bitmap", tensors, shape, torch.float32)
    assert p.columns is not None and p.columns.numel() == tensors["values"].numel()
    x = torch.randn(shape[1], batch, generator=torch.Generator().manual_seed(3)).t()  # non-contiguous
    y = backend.matmul(p, x)
    ref = x.double() @ dense.double().t()
    scale = ref.abs().max().clamp_min(1.0)
    assert y.shape == (batch, shape[0])
    assert float((y.double() - ref).abs().max() / scale) < 1e-5


@needs_avx2
def test_columns_are_built_for_sparse_factors_only(monkeypatch):
    pack = get_format("bitmap").pack

    def columns(density: float, shape: tuple[int, int] = (64, 300)) -> torch.Tensor | None:
        return backend.prepare("bitmap", pack(random_sparse(*shape, density), torch.float16), shape,
                               torch.float32).columns

    sparse = columns(0.1)
    assert sparse is not None
    # each row's nonzeros' columns, in order
    dense = random_sparse(64, 300, 0.1)
    expected = torch.cat([row.nonzero().flatten() for row in dense])
    assert torch.equal(sparse.to(torch.int64) & 0xFFFF, expected)
    assert columns(0.5) is None  # above COLUMNS_MAX_DENSITY: the word path is faster
    assert columns(0.001, (2, 70000)) is None  # columns past 16 bits
    monkeypatch.setenv("DSF_COLUMNS_MAX_DENSITY", "0")
    assert columns(0.1) is None


@needs_avx2
def test_streamed_bytes_follow_the_path():
    shape = (64, 300)
    tensors = get_format("bitmap").pack(random_sparse(*shape, 0.1), torch.float16)
    p = backend.prepare("bitmap", tensors, shape, torch.float32)
    values = tensors["values"].numel() * 2
    assert backend.streamed_bytes(p, 1) == values + 4 * (shape[0] + 1) + 2 * tensors["values"].numel()
    assert backend.streamed_bytes(p, 2) == values + tensors["bitmap"].numel() * 4


@needs_avx2
@pytest.mark.parametrize("name,bad,message", [
    ("DSF_COLUMNS_MAX_DENSITY", "1.5", "DSF_COLUMNS_MAX_DENSITY must be a number in"),
    ("DSF_COLUMNS_MAX_DENSITY", "dense", "DSF_COLUMNS_MAX_DENSITY must be a number in"),
    ("DSF_COLUMNS_MAX_BATCH", "-1", "DSF_COLUMNS_MAX_BATCH must be a non-negative integer"),
    ("DSF_COLUMNS_MAX_BATCH", "one", "DSF_COLUMNS_MAX_BATCH must be a non-negative integer"),
])
def test_bad_column_settings_are_clear_errors(monkeypatch, name, bad, message):
    tensors = get_format("bitmap").pack(random_sparse(16, 64, 0.1), torch.float16)
    monkeypatch.setenv(name, bad)
    with pytest.raises(ValueError, match=message):
        backend.matmul(backend.prepare("bitmap", tensors, (16, 64), torch.float32), torch.randn(1, 64))


@needs_avx2
@pytest.mark.parametrize("corruption", ["popcount", "past_last_column", "offsets", "bitmap_shape"])
def test_columns_of_an_inconsistent_factor_are_refused(corruption):
    """prepare() decodes the columns itself and never trusts a factor that slipped past
    load-time validation: a clear ValueError, not a read outside x."""
    shape = (16, 40)
    tensors = {k: v.clone() for k, v in get_format("bitmap").pack(random_sparse(*shape, 0.1), torch.float16).items()}
    if corruption == "popcount":
        tensors["bitmap"][3, 0] ^= 1 << 5
    elif corruption == "past_last_column":
        row = int((tensors["row_offsets"][1:] - tensors["row_offsets"][:-1]).argmax())
        word = tensors["bitmap"][row, 1]
        set_bit = int(word & -word)  # move the row's lowest bit in word 1 to column 63
        tensors["bitmap"][row, 1] = (word ^ set_bit) | torch.tensor(1 << 31, dtype=torch.int64).to(torch.int32)
    elif corruption == "offsets":
        tensors["row_offsets"][5] = -7
    else:
        tensors["bitmap"] = tensors["bitmap"][:, :1].contiguous()
    with pytest.raises(ValueError, match="bitmap factor"):
        backend.prepare("bitmap", tensors, shape, torch.float32)
