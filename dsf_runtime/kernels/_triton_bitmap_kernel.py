"""The Triton kernel behind the ``triton-bitmap`` backend (imported only where Triton is).

One program computes a (BLOCK_R rows) x (BLOCK_N batch rows) tile of y = x @ S^T over a
span of bitmap words (split-K: spans are summed with atomic adds), WPI words per step.
It expands the rows' packed values in registers: bit j of word k says whether column
32 k + j is stored, and its value sits at the word's first value index (the row's
running offset plus the popcounts of the words before it) plus the popcount of the
bits below j. No per-nonzero index is read, so a 50% DSF layer streams
1.25 bytes per dense weight (fp16 values) instead of cuSPARSE CSR's 3.

Two ways to fetch a step's values: one masked load per column at its value index (each
waits for the bitmap words), or SEGMENT: the step's values are one contiguous run that
starts at the row's running offset, so the run is loaded together with the bitmap words
(one memory latency per step instead of two) and expanded in registers (tl.gather).

The kernel is a plain function that the backend wraps with ``triton.jit`` on first
use; under TRITON_INTERPRET=1 that gives Triton's CPU interpreter (how the tests check
its logic without a GPU). Popcounts use the popc instruction on CUDA and SWAR integer
arithmetic in the interpreter (which cannot run inline assembly).
"""

from __future__ import annotations

import triton.language as tl


def bitmap_spmm_kernel(
    bitmap_ptr,  # int32 (R, WORDS)
    chunk_ptr,  # int32 (R, NCHUNKS): value index of the first nonzero of each CHUNK-word chunk
    values_ptr,  # (nnz,) fp16 / bf16 / fp32 / int8
    scales_ptr,  # fp32 (R,) for int8 values, else unused
    x_ptr,  # (N, C), contiguous
    y_ptr,  # (N, R), contiguous: fp32 and zeroed first when ATOMIC, else x's dtype
    R,
    C,
    N,
    WORDS,
    NCHUNKS,
    NVALUES,
    WORDS_PER_SPLIT: tl.constexpr,  # a multiple of CHUNK; a constexpr loop bound (also for the interpreter)
    HAS_SCALE: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_IEEE: tl.constexpr,
    ATOMIC: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WPI: tl.constexpr,  # bitmap words per loop step (divides CHUNK): a (BLOCK_R, 32 WPI) tile
    HW_POPC: tl.constexpr,  # the popc instruction (CUDA) instead of SWAR arithmetic (interpreter)
    SEGMENT: tl.constexpr,  # load each step's values as one contiguous run and expand them in registers
):
    pid_r = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_n = tl.program_id(2)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = ns < N
    k0 = pid_s * WORDS_PER_SPLIT

    off = tl.load(chunk_ptr + rows * NCHUNKS + k0 // CHUNK, mask=rmask, other=0)  # (BLOCK_R,)
    bitpos = tl.arange(0, 32).to(tl.uint32)
    below = (tl.full([32], 1, tl.uint32) << bitpos) - 1  # bits under position j
    step = tl.arange(0, WPI)

    if USE_DOT:
        acc = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_R, WPI * 32, BLOCK_N], dtype=tl.float32)

    for i in range(0, WORDS_PER_SPLIT, WPI):
        k = k0 + i + step  # (WPI,) word indices; words past the end read as empty
        words = tl.load(
            bitmap_ptr + rows[:, None] * WORDS + k[None, :], mask=rmask[:, None] & (k < WORDS)[None, :], other=0
        ).to(tl.uint32, bitcast=True)
        masked = words[:, :, None] & below[None, None, :]  # (BLOCK_R, WPI, 32)
        if HW_POPC:
            count = tl.inline_asm_elementwise("popc.b32 $0, $1;", "=r,r", [words], dtype=tl.int32, is_pure=True, pack=1)
            before = tl.inline_asm_elementwise(
                "popc.b32 $0, $1;", "=r,r", [masked], dtype=tl.int32, is_pure=True, pack=1
            )
        else:
            c = words - ((words >> 1) & 0x55555555)
            c = (c & 0x33333333) + ((c >> 2) & 0x33333333)
            c = (c + (c >> 4)) & 0x0F0F0F0F
            count = ((c * 0x01010101) >> 24).to(tl.int32)
            v = masked - ((masked >> 1) & 0x55555555)
            v = (v & 0x33333333) + ((v >> 2) & 0x33333333)
            v = (v + (v >> 4)) & 0x0F0F0F0F
            before = ((v * 0x01010101) >> 24).to(tl.int32)
        first = off[:, None] + tl.cumsum(count, axis=1) - count  # (BLOCK_R, WPI): each word's first value
        present = ((words[:, :, None] >> bitpos[None, None, :]) & 1) != 0
        if SEGMENT:
            # the step's values are the run values[off : off + its popcount]: load 32 WPI from
            # off at once (no wait for the bitmap; reads past the run hit the next step's
            # values, mostly cached), then place each at its column by its rank
            at = off[:, None] + tl.arange(0, WPI * 32)[None, :]
            run = tl.load(values_ptr + at, mask=rmask[:, None] & (at < NVALUES), other=0)
            rank = tl.where(present, (first - off[:, None])[:, :, None] + before, 0)
            w = tl.gather(run, tl.reshape(rank, [BLOCK_R, WPI * 32]), axis=1)
            w = tl.where(tl.reshape(present, [BLOCK_R, WPI * 32]), w, 0)
        else:
            w = tl.load(values_ptr + first[:, :, None] + before, mask=present & rmask[:, None, None], other=0)
            w = tl.reshape(w, [BLOCK_R, WPI * 32])

        cols = (k0 + i) * 32 + tl.arange(0, WPI * 32)
        xk = tl.load(
            x_ptr + ns[None, :] * C + cols[:, None], mask=(cols < C)[:, None] & nmask[None, :], other=0
        )  # (32 WPI, BLOCK_N)
        if USE_DOT:
            if DOT_IEEE:
                acc = tl.dot(w.to(tl.float32), xk.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(w.to(xk.dtype), xk, acc)
        else:
            acc += w.to(tl.float32)[:, :, None] * xk.to(tl.float32)[None, :, :]
        off += tl.sum(count, axis=1)

    if USE_DOT:
        out = acc
    else:
        out = tl.sum(acc, axis=1)  # (BLOCK_R, BLOCK_N)
    if HAS_SCALE:
        scale = tl.load(scales_ptr + rows, mask=rmask, other=0.0)
        out = out * scale[:, None]
    ptrs = y_ptr + ns[None, :] * R + rows[:, None]
    omask = rmask[:, None] & nmask[None, :]
    if ATOMIC:
        tl.atomic_add(ptrs, out, mask=omask)  # y is fp32
    else:
        tl.store(ptrs, out.to(y_ptr.dtype.element_ty), mask=omask)  # y in x's dtype
