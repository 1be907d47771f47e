"""The Triton kernel behind the ``triton-bitmap`` backend (imported only where Triton is).

One program computes a (BLOCK_R rows) x (BLOCK_N batch rows) tile of y = x @ S^T over a
span of bitmap words (split-K: spans are summed with atomic adds). Per 32-column word
it expands the row's packed values in registers: bit j of the word says whether column
32 k + j is stored, and its value sits at the row's running value offset plus the
popcount of the bits below j. No per-nonzero index is read, so a 50% DSF layer streams
1.25 bytes per dense weight (fp16 values) instead of cuSPARSE CSR's 3.

The kernel is a plain function that the backend wraps with ``triton.jit`` on first
use; under TRITON_INTERPRET=1 that gives Triton's CPU interpreter (how the tests check
its logic without a GPU). Popcounts are written out (SWAR, integer ops only).
"""

from __future__ import annotations

import triton.language as tl


def bitmap_spmm_kernel(
    bitmap_ptr,  # int32 (R, WORDS)
    chunk_ptr,  # int32 (R, NCHUNKS): value index of the first nonzero of each CHUNK-word chunk
    values_ptr,  # (nnz,) fp16 / bf16 / fp32 / int8
    scales_ptr,  # fp32 (R,) for int8 values, else unused
    x_ptr,  # (N, C), contiguous
    y_ptr,  # fp32 (N, R), contiguous; zeroed first when ATOMIC
    R, C, N, WORDS, NCHUNKS,
    WORDS_PER_SPLIT: tl.constexpr,  # loop bound; a constexpr also keeps the interpreter happy
    HAS_SCALE: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_IEEE: tl.constexpr,
    ATOMIC: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
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

    if USE_DOT:
        acc = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_R, 32, BLOCK_N], dtype=tl.float32)

    for i in range(0, WORDS_PER_SPLIT):
        k = k0 + i  # words past the end read as empty (the last split may be short)
        word = tl.load(bitmap_ptr + rows * WORDS + k, mask=rmask & (k < WORDS), other=0).to(tl.uint32, bitcast=True)
        # popcount of the bits below each position (SWAR), (BLOCK_R, 32)
        v = word[:, None] & below[None, :]
        v = v - ((v >> 1) & 0x55555555)
        v = (v & 0x33333333) + ((v >> 2) & 0x33333333)
        v = (v + (v >> 4)) & 0x0F0F0F0F
        before = ((v * 0x01010101) >> 24).to(tl.int32)
        present = ((word[:, None] >> bitpos[None, :]) & 1) != 0
        w = tl.load(values_ptr + off[:, None] + before, mask=present & rmask[:, None], other=0)

        cols = k * 32 + tl.arange(0, 32)
        xk = tl.load(x_ptr + ns[None, :] * C + cols[:, None],
                     mask=(cols < C)[:, None] & nmask[None, :], other=0)  # (32, BLOCK_N)
        if USE_DOT:
            if DOT_IEEE:
                acc = tl.dot(w.to(tl.float32), xk.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(w.to(xk.dtype), xk, acc)
        else:
            acc += w.to(tl.float32)[:, :, None] * xk.to(tl.float32)[None, :, :]

        # the word's own popcount moves the offset to the next word's first value
        c = word
        c = c - ((c >> 1) & 0x55555555)
        c = (c & 0x33333333) + ((c >> 2) & 0x33333333)
        c = (c + (c >> 4)) & 0x0F0F0F0F
        off += ((c * 0x01010101) >> 24).to(tl.int32)

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
        tl.atomic_add(ptrs, out, mask=omask)
    else:
        tl.store(ptrs, out, mask=omask)
