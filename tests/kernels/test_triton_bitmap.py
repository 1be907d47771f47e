"""The triton-bitmap kernel against the dense product: on CUDA where there is a GPU,
else in Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1 without
CUDA), so its indexing, split-K and value decoding are checked on every machine."""

from __future__ import annotations

import pytest
import torch

from dsf_runtime.formats import get_format
from dsf_runtime.kernels.triton_bitmap import (
    CHUNK_WORDS,
    DOT_CONFIG,
    DOT_MIN_BATCH,
    VECTOR_CONFIG,
    TritonBitmapBackend,
    chunk_offsets,
    interpreting,
    launch,
    resolve_config,
    triton_installed,
)
from helpers import random_sparse

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    not triton_installed() or (DEVICE == "cpu" and not interpreting()),
    reason="needs Triton, and CUDA or TRITON_INTERPRET=1",
)


def _run(shape, density, batch, value_dtype=torch.float16, x_dtype=torch.float32, seed=0, **launch_kw):
    fmt = get_format("bitmap")
    tensors = fmt.pack(random_sparse(*shape, density, seed=seed, empty_rows=min(2, shape[0] // 3)), value_dtype)
    dense = fmt.unpack(tensors, shape).double()  # the stored numbers (int8: dequantized)
    tensors = {k: v.to(DEVICE) for k, v in tensors.items()}
    prepared = TritonBitmapBackend().prepare("bitmap", tensors, shape, torch.float32)
    x = torch.randn(batch, shape[1], generator=torch.Generator().manual_seed(seed + 1)).to(x_dtype)
    y = launch(prepared, x.to(DEVICE), **launch_kw).cpu()
    ref = x.double() @ dense.t()
    assert y.shape == (batch, shape[0]) and y.dtype == x_dtype
    assert torch.isfinite(y).all()
    return y.double(), ref


@pytest.mark.parametrize("shape", [(67, 301), (301, 67), (17, 3), (1, 64), (40, 800)])
@pytest.mark.parametrize("density", [0.01, 0.3, 0.9])
@pytest.mark.parametrize("batch", [1, 3, 9, 20])
def test_matches_dense_fp32(shape, density, batch):
    y, ref = _run(shape, density, batch)
    # fp32 accumulation of fp16-exact products over <= 800 terms
    assert (y - ref).abs().max() <= 2e-5 * ref.abs().max().clamp_min(1.0)


@pytest.mark.parametrize(
    "value_dtype,x_dtype,tol",
    [
        (torch.float16, torch.float16, 2e-3),  # output rounded to fp16 (2^-11 relative)
        (torch.bfloat16, torch.bfloat16, 1e-2),  # bf16: 2^-8 relative
        (torch.int8, torch.float32, 1e-6),
        (torch.int8, torch.float16, 2e-3),
        (torch.float16, torch.bfloat16, 1e-2),  # mixed kinds: computed in fp32, stored as bf16
    ],
)
@pytest.mark.parametrize("batch", [1, 4, 12])
def test_value_and_activation_dtypes(value_dtype, x_dtype, tol, batch):
    y, ref = _run((45, 333), 0.4, batch, value_dtype, x_dtype)
    assert (y - ref).norm() <= tol * ref.norm()


@pytest.mark.parametrize("splits", [1, 2, 3, 7])
@pytest.mark.parametrize("block_r", [16, 64])
@pytest.mark.parametrize("wpi", [1, 4, 8])
@pytest.mark.parametrize("batch", [2, 9])
def test_split_k_row_blocks_and_words_per_step(splits, block_r, wpi, batch):
    # 40 x 1100: 35 words in 5 chunks, so splits cut rows at chunk borders
    y, ref = _run((40, 1100), 0.5, batch, splits=splits, block_r=block_r, wpi=wpi)
    assert (y - ref).abs().max() <= 2e-5 * ref.abs().max().clamp_min(1.0)


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("batch", [1, 4])
def test_half_activations_with_and_without_split(splits, batch):
    """Unsplit programs store y in x's dtype directly; split ones add into fp32 and cast after."""
    y, ref = _run((40, 1100), 0.5, batch, torch.float16, torch.float16, splits=splits)
    assert (y - ref).norm() <= 2e-3 * ref.norm()


@pytest.mark.parametrize("use_dot", [False, True])
@pytest.mark.parametrize("batch", [1, 2, 5, 17])
def test_either_path_at_any_batch(use_dot, batch):
    """The vector and the tl.dot paths both hold at every batch size (DOT_MIN_BATCH only
    picks the faster one)."""
    y, ref = _run((67, 301), 0.3, batch, use_dot=use_dot)
    assert (y - ref).abs().max() <= 2e-5 * ref.abs().max().clamp_min(1.0)


@pytest.mark.parametrize("shape", [(0, 10), (10, 0), (0, 0)])
def test_empty_matrices(shape):
    y, ref = _run(shape, 0.5, 3)
    assert y.shape == ref.shape and (y == 0).all()


def test_chunk_offsets_index_each_chunks_first_value():
    dense = random_sparse(9, 700, 0.37, seed=3)
    t = get_format("bitmap").pack(dense, torch.float16)
    chunks = chunk_offsets(t["bitmap"], t["row_offsets"])
    span = 32 * CHUNK_WORDS
    assert chunks.shape == (9, -(-700 // span)) and chunks.dtype == torch.int32
    for r in range(9):
        for c in range(chunks.shape[1]):
            expected = int(t["row_offsets"][r]) + int((dense[r, : c * span] != 0).sum())
            assert int(chunks[r, c]) == expected


def test_words_per_step_must_divide_a_chunk():
    with pytest.raises(ValueError, match="wpi"):
        _run((8, 64), 0.5, 1, wpi=3)


@pytest.mark.parametrize("batch", [1, DOT_MIN_BATCH, 40])
def test_resolve_config_picks_the_path_and_its_defaults(batch):
    """The settings launch uses (and the GPU tuning benchmark records)."""
    dot = batch >= DOT_MIN_BATCH
    assert resolve_config(batch) == {"use_dot": dot, **(DOT_CONFIG if dot else VECTOR_CONFIG)}
    forced = resolve_config(batch, use_dot=not dot, wpi=4)
    assert forced == {**(VECTOR_CONFIG if dot else DOT_CONFIG), "use_dot": not dot, "wpi": 4}
    with pytest.raises(ValueError, match="wpi must divide"):
        resolve_config(batch, wpi=3)


def test_auto_prefers_it_on_cuda_only():
    from dsf_runtime.kernels import choose_backend

    assert choose_backend("bitmap", "cpu").name != "triton-bitmap"
    if torch.cuda.is_available():
        assert choose_backend("bitmap", "cuda").name == "triton-bitmap"


@pytest.mark.parametrize("value_dtype", [torch.float16, torch.int8])
def test_the_backend_runs_the_launch_as_a_torch_op(value_dtype):
    """matmul goes through torch.ops.dsf.triton_bitmap_spmm (what torch.compile and vLLM
    see): the launch's result, and a fake tensor of the right shape under FakeTensorMode."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    shape = (40, 100)
    tensors = {
        k: v.to(DEVICE) for k, v in get_format("bitmap").pack(random_sparse(*shape, 0.3, seed=3), value_dtype).items()
    }
    backend = TritonBitmapBackend()
    p = backend.prepare("bitmap", tensors, shape, torch.float32)
    x = torch.randn(3, shape[1]).to(DEVICE)
    assert torch.equal(backend.matmul(p, x), launch(p, x))
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fx = mode.from_tensor(x)
        y = torch.ops.dsf.triton_bitmap_spmm(fx, p.bitmap, p.chunks, p.values, p.scales, p.rows, p.cols)
    assert tuple(y.shape) == (3, 40)


@pytest.mark.parametrize("programs_per_sm", [1, 8])
def test_programs_per_sm_only_sets_how_far_columns_split(programs_per_sm):
    """From no split (row blocks alone fill the device) to many splits, the result holds."""
    y, ref = _run((40, 1100), 0.5, 3, block_r=16, programs_per_sm=programs_per_sm)
    assert (y - ref).abs().max() <= 2e-5 * ref.abs().max().clamp_min(1.0)


@pytest.mark.parametrize("use_dot", [False, True])
@pytest.mark.parametrize("wpi", [1, 8])
@pytest.mark.parametrize("density", [0.01, 0.5, 1.0])
@pytest.mark.parametrize("splits", [1, 3])
def test_segment_fetch_matches_dense(use_dot, wpi, density, splits):
    """Values fetched as one contiguous run per step and expanded in registers: the same
    product, with empty and full words, runs that end at the last value, and split-K."""
    y, ref = _run((40, 1100), density, 3, segment=True, use_dot=use_dot, wpi=wpi, splits=splits)
    assert (y - ref).abs().max() <= 2e-5 * ref.abs().max().clamp_min(1.0)


@pytest.mark.parametrize(
    "value_dtype,x_dtype,tol", [(torch.int8, torch.float32, 1e-6), (torch.float16, torch.float16, 2e-3)]
)
def test_segment_fetch_with_scales_and_half_activations(value_dtype, x_dtype, tol):
    y, ref = _run((45, 333), 0.4, 1, value_dtype, x_dtype, segment=True)
    assert (y - ref).norm() <= tol * ref.norm()
