"""cupy-bitmap's CUDA C++ kernel without a GPU: its source compiles with NVRTC for every
instantiation the backend asks for (where the NVRTC library is installed: the dev
extras), and its logic runs on the CPU through tests/kernels/cuda_host.cpp (lanes as
threads meeting at a barrier for each warp primitive) against the float64 product. On a
GPU the backend itself is checked against the same reference."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsf_runtime.formats import get_format
from dsf_runtime.kernels import cupy_bitmap
from dsf_runtime.kernels.cupy_bitmap import BATCH_TILES, VALUE_TYPES, X_TYPES, all_kernel_names, batch_tile, grid
from helpers import random_sparse

HERE = Path(__file__).resolve().parent
SOURCE_DIR = Path(cupy_bitmap.__file__).resolve().parent / "cuda"
KINDS = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.int8: 3}


@pytest.fixture(scope="module")
def host_kernel(tmp_path_factory):
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler (g++) to build the CPU harness")
    lib = tmp_path_factory.mktemp("cuda_host") / "cuda_host.so"
    cmd = [compiler, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", f"-DDSF_WARPS={cupy_bitmap.WARPS}"]
    subprocess.run([*cmd, "-I", str(SOURCE_DIR), str(HERE / "cuda_host.cpp"), "-o", str(lib)], check=True)
    fn = ctypes.CDLL(str(lib)).dsf_bitmap_spmm_host
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_int] * 3 + [ctypes.c_void_p] * 6 + [ctypes.c_longlong] + [ctypes.c_int] * 4
    return fn


def _host_run(fn, shape, density, batch, value_dtype, x_dtype, seed=0, tile=None):
    fmt = get_format("bitmap")
    t = fmt.pack(random_sparse(*shape, density, seed=seed, empty_rows=min(2, shape[0] // 3)), value_dtype)
    dense = fmt.unpack(t, shape).double()  # the stored numbers (int8: dequantized)
    p = cupy_bitmap.CupyBitmapBackend().prepare("bitmap", t, shape, torch.float32)
    x = torch.randn(batch, shape[1], generator=torch.Generator().manual_seed(seed + 1)).to(x_dtype).contiguous()
    y = torch.full((batch, shape[0]), float("nan"))
    rc = fn(
        KINDS[value_dtype], KINDS[x_dtype], tile or batch_tile(batch),
        p.bitmap.data_ptr(), p.row_offsets.data_ptr(), p.values.data_ptr(),
        p.scales.data_ptr() if p.scales is not None else None, x.data_ptr(), y.data_ptr(),
        p.values.numel(), shape[0], shape[1], p.bitmap.shape[1], batch,
    )  # fmt: skip
    assert rc == 0
    return y.double(), x.double() @ dense.t()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.integers(1, 13),
    cols=st.integers(1, 2200),  # up to three 1024-column passes, partial words and passes
    density=st.sampled_from([0.0, 0.02, 0.5, 0.97, 1.0]),
    batch=st.integers(1, 11),  # every tile, and batches over the largest (several grid rows)
    value_dtype=st.sampled_from(list(VALUE_TYPES)),
    x_dtype=st.sampled_from(list(X_TYPES)),
    seed=st.integers(0, 2**16),
)
def test_host_run_matches_float64(host_kernel, rows, cols, density, batch, value_dtype, x_dtype, seed):
    y, ref = _host_run(host_kernel, (rows, cols), density, batch, value_dtype, x_dtype, seed)
    assert torch.isfinite(y).all()  # every output written
    # fp32 accumulation of values and activations as stored: rounding only
    scale = (x_dtype != torch.float32) * 1e-2 + 1e-5
    assert (y - ref).abs().max() <= scale * ref.abs().max().clamp_min(1.0)


@pytest.mark.parametrize("tile", BATCH_TILES)
def test_every_tile_on_a_batch_it_does_not_divide(host_kernel, tile):
    y, ref = _host_run(host_kernel, (9, 1100), 0.5, 5, torch.float16, torch.float32, tile=tile)
    assert (y - ref).abs().max() <= 1e-5 * ref.abs().max().clamp_min(1.0)


def test_instantiations_geometry_and_refusals():
    names = all_kernel_names()
    assert len(names) == len(set(names)) == len(VALUE_TYPES) * len(X_TYPES) * len(BATCH_TILES)
    assert cupy_bitmap.kernel_name(torch.float16, torch.float32, 4) == "bitmap_spmm<dsf_half, float, 4>"
    with pytest.raises(ValueError, match="no cupy-bitmap kernel"):
        cupy_bitmap.kernel_name(torch.float64, torch.float32, 4)
    with pytest.raises(ValueError, match="batch tile 3"):
        cupy_bitmap.kernel_name(torch.float16, torch.float32, 3)
    assert [batch_tile(n) for n in (1, 2, 3, 5, 8, 9, 64)] == [1, 2, 4, 8, 8, 8, 8]
    assert grid(4097, 20) == ((-(-4097 // cupy_bitmap.WARPS), 3), (32 * cupy_bitmap.WARPS,))


def test_source_compiles_with_nvrtc_for_every_instantiation():
    nvrtc = pytest.importorskip("cuda.bindings.nvrtc", reason="NVRTC (cuda-bindings) is not installed")
    source = (SOURCE_DIR / "bitmap_spmm.cu").read_bytes()
    err, prog = nvrtc.nvrtcCreateProgram(source, b"bitmap_spmm.cu", 0, [], [])
    assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS
    names = [n.encode() for n in all_kernel_names()]
    for name in names:
        assert nvrtc.nvrtcAddNameExpression(prog, name)[0] == nvrtc.nvrtcResult.NVRTC_SUCCESS
    options = [o.encode() for o in cupy_bitmap.COMPILE_OPTIONS] + [b"--gpu-architecture=compute_80"]
    (result,) = nvrtc.nvrtcCompileProgram(prog, len(options), options)
    _, size = nvrtc.nvrtcGetProgramLogSize(prog)
    log = bytearray(size)  # written in place: never an (interned, immutable) bytes object
    nvrtc.nvrtcGetProgramLog(prog, log)
    assert result == nvrtc.nvrtcResult.NVRTC_SUCCESS, log.decode(errors="replace")
    assert all(nvrtc.nvrtcGetLoweredName(prog, n)[1] for n in names)
    nvrtc.nvrtcDestroyProgram(prog)
