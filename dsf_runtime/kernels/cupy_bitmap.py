"""cupy-bitmap: the bitmap kernel in CUDA C++ (kernels/cuda/bitmap_spmm.cu), compiled at run
time by NVRTC through cupy: no build toolchain on the user's machine, and warp-level
control (popcount prefix sums by shuffles, 16-byte loads of the packed values) that
Triton hides. It reads the same prepared tensors as triton-bitmap, the stored bitmap and
values (1.25 bytes per dense weight at 50% with fp16 values), and races it in
`dsf bench gpu`.

What runs without a GPU (and CI checks): the source's instantiations, generated here by
value, activation dtype and batch tile, compile with NVRTC where its library is
installed (tests/kernels/test_cupy_bitmap.py), and the launch geometry."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources

import torch

from dsf_runtime.kernels import cupy_common, register_backend

WARPS = 4  # rows (one warp each) per block
BATCH_TILES = (1, 2, 4, 8)  # batch rows one grid row handles; larger batches take several grid rows
VALUE_TYPES = {
    torch.float16: "dsf_half",
    torch.bfloat16: "dsf_bf16",
    torch.float32: "float",
    torch.int8: "signed char",
}
X_TYPES = {torch.float16: "dsf_half", torch.bfloat16: "dsf_bf16", torch.float32: "float"}
COMPILE_OPTIONS = ("--std=c++17", f"-DDSF_WARPS={WARPS}")


def source() -> str:
    return (resources.files("dsf_runtime.kernels") / "cuda" / "bitmap_spmm.cu").read_text(encoding="utf-8")


def kernel_name(value_dtype: torch.dtype, x_dtype: torch.dtype, tile: int) -> str:
    """The template instantiation for these dtypes and batch tile, e.g. ``bitmap_spmm<dsf_half, float, 4>``."""
    if value_dtype not in VALUE_TYPES or x_dtype not in X_TYPES or tile not in BATCH_TILES:
        raise ValueError(f"no cupy-bitmap kernel for {value_dtype} values, {x_dtype} activations, batch tile {tile}")
    return f"bitmap_spmm<{VALUE_TYPES[value_dtype]}, {X_TYPES[x_dtype]}, {tile}>"


def all_kernel_names() -> list[str]:
    return [kernel_name(v, x, t) for v in VALUE_TYPES for x in X_TYPES for t in BATCH_TILES]


def batch_tile(batch: int) -> int:
    """The smallest tile that holds ``batch`` rows, at most the largest tile."""
    return next((t for t in BATCH_TILES if t >= batch), BATCH_TILES[-1])


def grid(rows: int, batch: int) -> tuple[tuple[int, int], tuple[int]]:
    """(blocks, threads per block): a warp per row, WARPS rows a block, a grid row per batch tile."""
    tile = batch_tile(batch)
    return (-(-rows // WARPS), -(-batch // tile)), (32 * WARPS,)


@functools.cache
def _module():
    import cupy

    return cupy.RawModule(code=source(), options=COMPILE_OPTIONS, name_expressions=all_kernel_names())


@dataclass
class Prepared:
    bitmap: torch.Tensor  # int32 (rows, words)
    row_offsets: torch.Tensor  # int32 (rows + 1,)
    values: torch.Tensor  # (nnz,)
    scales: torch.Tensor | None  # fp32 (rows,) for int8 values
    rows: int
    cols: int


def launch(p: Prepared, x: torch.Tensor) -> torch.Tensor:
    """y = x @ S^T for x (N, cols) -> (N, rows) in x's dtype (fp32 accumulation)."""
    import numpy as np

    N = x.shape[0]
    if N == 0 or p.rows == 0 or p.cols == 0:
        return torch.zeros(N, p.rows, dtype=x.dtype, device=x.device)
    xk = x if x.dtype in X_TYPES else x.float()
    xk = xk.contiguous()
    y = torch.empty(N, p.rows, dtype=torch.float32, device=x.device)
    blocks, threads = grid(p.rows, N)
    fn = _module().get_function(kernel_name(p.values.dtype, xk.dtype, batch_tile(N)))
    c = cupy_common.to_cupy
    scales = c(p.scales) if p.scales is not None else np.uint64(0)  # a null pointer without scales
    with cupy_common.on_torch_stream():
        args = (
            c(p.bitmap), c(p.row_offsets), c(p.values), scales, c(xk), c(y),
            np.int64(p.values.numel()), np.int32(p.rows), np.int32(p.cols), np.int32(p.bitmap.shape[1]), np.int32(N),
        )  # fmt: skip
        fn(blocks, threads, args)
    return y.to(x.dtype)


@register_backend
class CupyBitmapBackend(cupy_common.CupyBackend):
    name = "cupy-bitmap"
    formats = ("bitmap",)
    priority = 15  # below triton-bitmap until a GPU's measurement says otherwise (dsf bench gpu)

    def accepts(self, tensors: dict[str, torch.Tensor]) -> bool:
        return tensors["values"].dtype in VALUE_TYPES

    def prepare(
        self, fmt: str, tensors: dict[str, torch.Tensor], shape: tuple[int, int], dtype: torch.dtype
    ) -> Prepared:
        return Prepared(
            bitmap=tensors["bitmap"].contiguous(),
            row_offsets=tensors["row_offsets"].to(torch.int32).contiguous(),
            values=tensors["values"].contiguous(),
            scales=tensors["scales"].float().contiguous() if "scales" in tensors else None,
            rows=shape[0],
            cols=shape[1],
        )

    def matmul(self, prepared: Prepared, x: torch.Tensor) -> torch.Tensor:
        return launch(prepared, x)
