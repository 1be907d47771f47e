"""triton-bitmap: the compact bitmap format run on NVIDIA GPUs without decoding it.

cuSPARSE (``torch-csr``) needs CSR in GPU memory: int32 column indices plus values,
3 bytes per dense weight at 50% DSF density in fp16, more than dense fp16's 2. This
backend keeps the stored bitmap + packed values (1.25 bytes per dense weight, 0.75
with int8 values) and expands them in registers (see ``_triton_bitmap_kernel``).
``prepare`` adds one small table: the value index of the first nonzero of every
``CHUNK_WORDS``-word chunk of each row (1/8 bit per dense weight), so that programs
can split a row's columns between them.

On CPU tensors the same kernel runs in Triton's interpreter when the process starts
with TRITON_INTERPRET=1 (slow; how the tests check it without a GPU)."""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass

import torch

from dsf_runtime.formats.bitmap import word_popcounts
from dsf_runtime.kernels import register_backend, tuning

CHUNK_WORDS = 8  # 256 columns per chunk-offset entry
# Launch settings measured per GPU model (kernels/tuning.json; the default entry for GPUs
# not measured): from DOT_MIN_BATCH on, tiles go through tl.dot (tensor cores, batch padded
# to 16 rows); (block rows, words per step, warps) per path.
_DEFAULT = tuning.gpu(None)
DOT_MIN_BATCH: int = _DEFAULT["dot_min_batch"]


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.cache
def _kernel():
    """The jitted kernel; an interpreted one when the process started with
    TRITON_INTERPRET=1 (Triton decides at import time, its own library included)."""
    import triton

    from dsf_runtime.kernels._triton_bitmap_kernel import bitmap_spmm_kernel

    return triton.jit(bitmap_spmm_kernel)


@functools.cache
def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1); fixed
    for the process (Triton reads it at import), so asked once, not on every launch."""
    if not triton_installed():
        return False
    import triton

    return bool(triton.knobs.runtime.interpret)


def chunk_offsets(bitmap: torch.Tensor, row_offsets: torch.Tensor, chunk_words: int = CHUNK_WORDS) -> torch.Tensor:
    """Value index of the first nonzero of each chunk of ``chunk_words`` words:
    (rows, words) int32 bitmap, (rows + 1,) offsets -> (rows, ceil(words / chunk)) int32."""
    rows, words = bitmap.shape
    nchunks = -(-words // chunk_words)
    counts = torch.nn.functional.pad(word_popcounts(bitmap), (0, nchunks * chunk_words - words))
    per_chunk = counts.reshape(rows, nchunks, chunk_words).sum(-1, dtype=torch.int64)  # (rows, nchunks)
    before = per_chunk.cumsum(1) - per_chunk
    return (before + row_offsets[:-1].long().unsqueeze(1)).to(torch.int32)


@dataclass
class Prepared:
    bitmap: torch.Tensor  # int32 (rows, words)
    chunks: torch.Tensor  # int32 (rows, nchunks)
    values: torch.Tensor  # (nnz,)
    scales: torch.Tensor | None  # fp32 (rows,) for int8 values
    rows: int
    cols: int


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: a few programs per row block, so split-K is exercised


VECTOR_CONFIG: dict = _DEFAULT["vector"]  # batch < DOT_MIN_BATCH
DOT_CONFIG: dict = _DEFAULT["dot"]


@functools.cache
def device_tuning() -> dict:
    """The tuning entry of the GPU in use (the default one without CUDA)."""
    return tuning.gpu(torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)


def resolve_config(
    batch: int,
    use_dot: bool | None = None,
    block_r: int | None = None,
    wpi: int | None = None,
    num_warps: int | None = None,
    programs_per_sm: int | None = None,
    segment: bool | None = None,
) -> dict:
    """The launch settings for ``batch`` activation rows: the path (tl.dot from
    DOT_MIN_BATCH on) and that path's defaults, with any given setting overriding them.
    ``programs_per_sm``: rows' columns are split between programs (split-K) until the
    launch has about this many programs per SM (1: split only what cannot fill the GPU).
    ``segment``: fetch each step's values as one contiguous run (see the kernel)."""
    tune = device_tuning()
    use_dot = batch >= tune["dot_min_batch"] if use_dot is None else use_dot
    config = tune["dot"] if use_dot else tune["vector"]
    resolved = {
        "use_dot": use_dot,
        "block_r": block_r or config["block_r"],
        "wpi": wpi or config["wpi"],
        "num_warps": num_warps or config["num_warps"],
        "programs_per_sm": programs_per_sm or config["programs_per_sm"],
        "segment": config["segment"] if segment is None else segment,
    }
    if CHUNK_WORDS % resolved["wpi"]:
        raise ValueError(f"wpi must divide {CHUNK_WORDS}, got {resolved['wpi']}")
    return resolved


def launch(
    p: Prepared,
    x: torch.Tensor,
    splits: int | None = None,
    block_r: int | None = None,
    wpi: int | None = None,
    num_warps: int | None = None,
    use_dot: bool | None = None,
    programs_per_sm: int | None = None,
    segment: bool | None = None,
) -> torch.Tensor:
    """y = x @ S^T for x (N, cols) -> (N, rows) in x's dtype (fp32 accumulation).
    ``splits``/``block_r``/``wpi``/``num_warps``/``use_dot`` (the tl.dot path instead of
    the vector one)/``programs_per_sm``/``segment`` override the launch settings (tests and tuning)."""
    N = x.shape[0]
    if N == 0 or p.rows == 0 or p.cols == 0:
        return torch.zeros(N, p.rows, dtype=x.dtype, device=x.device)
    interpret = interpreting()
    if x.device.type != "cuda" and not interpret:
        raise RuntimeError("triton-bitmap runs CUDA tensors (CPU tensors only under TRITON_INTERPRET=1)")
    x = x.contiguous()
    kernel = _kernel()

    config = resolve_config(N, use_dot, block_r, wpi, num_warps, programs_per_sm, segment)
    use_dot, block_r, wpi, num_warps = config["use_dot"], config["block_r"], config["wpi"], config["num_warps"]
    block_n = min(64, max(16, 1 << (N - 1).bit_length())) if use_dot else 1 << (N - 1).bit_length()
    # fp16/bf16 activations with values of the same kind (or int8) use the tensor-core
    # dot in that dtype; anything else is computed in fp32 (no silent rounding to bf16)
    same_kind = x.dtype in (torch.float16, torch.bfloat16) and p.values.dtype in (x.dtype, torch.int8)
    if x.dtype == torch.bfloat16 and interpret:
        same_kind = False  # Triton 3.6's interpreter gets bf16 tl.dot wrong (checked on 16x16 tiles)
    words = p.bitmap.shape[1]
    nchunks = p.chunks.shape[1]
    row_blocks = -(-p.rows // block_r)
    n_blocks = -(-N // block_n)
    if splits is None:
        # split rows' columns between programs (atomic adds into a zeroed fp32 y) to fill
        # the GPU: even SmolLM2's 576-column layers gain (H200, 576x576 batch 1: 25 us split
        # 3 ways with the zeroing and the cast, 33 us unsplit on 9 programs)
        splits = -(-config["programs_per_sm"] * _sm_count(x.device) // (row_blocks * n_blocks))
    splits = max(1, min(splits, nchunks))
    words_per_split = -(-nchunks // splits) * CHUNK_WORDS
    splits = -(-words // words_per_split)
    atomic = splits > 1

    # without atomics the kernel stores straight into x's dtype (no separate cast)
    y = (
        torch.zeros(N, p.rows, dtype=torch.float32, device=x.device)
        if atomic
        else torch.empty(N, p.rows, dtype=x.dtype, device=x.device)
    )
    scales = p.scales if p.scales is not None else y  # unused pointer when HAS_SCALE is off
    kernel[(row_blocks, splits, n_blocks)](
        p.bitmap,
        p.chunks,
        p.values,
        scales,
        x,
        y,
        p.rows,
        p.cols,
        N,
        words,
        nchunks,
        p.values.numel(),
        WORDS_PER_SPLIT=words_per_split,
        HAS_SCALE=p.scales is not None,
        USE_DOT=use_dot,
        DOT_IEEE=not same_kind,
        ATOMIC=atomic,
        CHUNK=CHUNK_WORDS,
        BLOCK_R=block_r,
        BLOCK_N=block_n,
        WPI=wpi,
        HW_POPC=not interpret,
        SEGMENT=config["segment"],
        **({} if interpret else {"num_warps": num_warps}),
    )
    return y.to(x.dtype)


@register_backend
class TritonBitmapBackend:
    name = "triton-bitmap"
    formats = ("bitmap",)
    devices = ("cuda",)
    priority = 20  # ahead of torch-csr (cuSPARSE) on CUDA: reads about 0.4x the bytes

    def available(self) -> bool:
        return triton_installed() and torch.cuda.is_available()

    def unavailable_reason(self) -> str | None:
        if not triton_installed():
            return "triton is not installed (pip install 'dsf-runtime[gpu]')"
        if not torch.cuda.is_available():
            return "no CUDA device"
        return None

    def prepare(
        self, fmt: str, tensors: dict[str, torch.Tensor], shape: tuple[int, int], dtype: torch.dtype
    ) -> Prepared:
        bitmap = tensors["bitmap"].contiguous()
        return Prepared(
            bitmap=bitmap,
            chunks=chunk_offsets(bitmap, tensors["row_offsets"]),
            values=tensors["values"].contiguous(),
            scales=tensors["scales"].float().contiguous() if "scales" in tensors else None,
            rows=shape[0],
            cols=shape[1],
        )

    def matmul(self, prepared: Prepared, x: torch.Tensor) -> torch.Tensor:
        p = prepared
        return triton_bitmap_spmm(x, p.bitmap, p.chunks, p.values, p.scales, p.rows, p.cols)


@torch.library.custom_op("dsf::triton_bitmap_spmm", mutates_args=())
def triton_bitmap_spmm(
    x: torch.Tensor,
    bitmap: torch.Tensor,
    chunks: torch.Tensor,
    values: torch.Tensor,
    scales: torch.Tensor | None,
    rows: int,
    cols: int,
) -> torch.Tensor:
    """The launch as a torch op, so that torch.compile and vLLM see it: x (n, cols) -> (n, rows)."""
    return launch(Prepared(bitmap, chunks, values, scales, rows, cols), x)


@triton_bitmap_spmm.register_fake
def _(x, bitmap, chunks, values, scales, rows, cols):
    return x.new_empty(x.shape[0], rows)
