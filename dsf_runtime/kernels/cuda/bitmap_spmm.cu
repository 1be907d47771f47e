// cupy-bitmap: y = x S^T for a bitmap factor S (rows x cols) in CUDA C++, compiled at run
// time by NVRTC through cupy (dsf_runtime/kernels/cupy_bitmap.py).
//
// One warp per row. Each pass covers 32 bitmap words (1024 columns): lane l reads word
// base + l (one coalesced 128-byte load per warp), a warp-wide prefix sum of the words'
// popcounts gives each lane where its values start, the warp copies the pass's run of
// packed values into shared memory with 16-byte loads, and each lane then walks the set
// bits of its word, multiplying its values with x. Partial sums meet in a shuffle
// reduction. x is read through the read-only cache (it is small and shared by all rows).
//
// Template parameters: V the stored value type (dsf_half, dsf_bf16, float, or signed
// char with per-row scales), X the activation type (dsf_half, dsf_bf16, float), NB
// the batch rows per launch (1, 2, 4 or 8; larger batches launch one grid row per tile).
// y is fp32. `values` must start 16-byte aligned (torch's allocations are); the 16-byte
// loads stop before its end and the last few values are read one by one.

// 16-bit floats as their bits, converted by hand: the source needs no CUDA headers, so
// NVRTC compiles it on any machine with the driver and the NVRTC library alone.
struct dsf_half {
  unsigned short bits;
};
struct dsf_bf16 {
  unsigned short bits;
};

#ifndef DSF_WARPS
#define DSF_WARPS 4  // warps (rows) per block; the backend passes -DDSF_WARPS=...
#endif
#define DSF_FULL 0xffffffffu

__device__ __forceinline__ float dsf_float(float v) { return v; }
__device__ __forceinline__ float dsf_float(dsf_half v) {
#ifdef DSF_HOST_EMULATION  // the CPU harness of the tests (tests/kernels/cuda_host.cpp)
  return dsf_host_half(v.bits);
#else
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));
  return f;
#endif
}
__device__ __forceinline__ float dsf_float(dsf_bf16 v) { return __uint_as_float(static_cast<unsigned int>(v.bits) << 16); }
__device__ __forceinline__ float dsf_float(signed char v) { return static_cast<float>(v); }

template <typename V, typename X, int NB>
__global__ void __launch_bounds__(32 * DSF_WARPS) bitmap_spmm(
    const unsigned int* __restrict__ bitmap,  // (rows, words)
    const int* __restrict__ row_offsets,      // (rows + 1,)
    const V* __restrict__ values,             // (nvalues,) packed row by row
    const float* __restrict__ scales,         // (rows,) for int8 values, else null
    const X* __restrict__ x,                  // (batch, cols)
    float* __restrict__ y,                    // (batch, rows)
    long long nvalues, int rows, int cols, int words, int batch) {
  constexpr int VEC = 16 / sizeof(V);  // values per 16-byte load
  constexpr int RUN = 32 * 32 + VEC;   // a pass's values at most, plus the alignment slack
  __shared__ __align__(16) V stage[DSF_WARPS][RUN];

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int row = blockIdx.x * DSF_WARPS + warp;
  const int n0 = blockIdx.y * NB;  // this grid row's batch tile
  if (row >= rows) return;         // whole warps leave together

  float acc[NB];
#pragma unroll
  for (int n = 0; n < NB; ++n) acc[n] = 0.f;

  long long off = row_offsets[row];
  const unsigned int* bits_row = bitmap + static_cast<long long>(row) * words;
  V* run = stage[warp];
  for (int base = 0; base < words; base += 32) {
    const int w = base + lane;
    unsigned int bits = w < words ? bits_row[w] : 0u;
    const int count = __popc(bits);
    int incl = count;  // inclusive prefix sum of the lanes' counts
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const int t = __shfl_up_sync(DSF_FULL, incl, d);
      if (lane >= d) incl += t;
    }
    const int total = __shfl_sync(DSF_FULL, incl, 31);
    // stage values[off, off + total) with 16-byte loads from the aligned start below off
    const long long start = off & ~static_cast<long long>(VEC - 1);
    const int slack = static_cast<int>(off - start);
    const int vectors = (slack + total + VEC - 1) / VEC;
    const uint4* src = reinterpret_cast<const uint4*>(values + start);
    uint4* dst = reinterpret_cast<uint4*>(run);
    for (int i = lane; i < vectors; i += 32) {
      const long long end = start + static_cast<long long>(i + 1) * VEC;
      if (end <= nvalues) {
        dst[i] = src[i];
      } else {  // the array's last, partial vector
        for (int e = 0; e < VEC && start + i * VEC + e < nvalues; ++e) run[i * VEC + e] = values[start + i * VEC + e];
      }
    }
    __syncwarp();
    int k = slack + incl - count;  // this lane's first value in the stage
    const int col0 = w * 32;
    while (bits) {
      const int j = __ffs(bits) - 1;
      bits &= bits - 1;
      const float v = dsf_float(run[k++]);
#pragma unroll
      for (int n = 0; n < NB; ++n) {
        if (n0 + n < batch) acc[n] += v * dsf_float(x[static_cast<long long>(n0 + n) * cols + col0 + j]);
      }
    }
    off += total;
    __syncwarp();  // the stage is rewritten by the next pass
  }
  const float scale = scales != nullptr ? scales[row] : 1.f;
#pragma unroll
  for (int n = 0; n < NB; ++n) {
    float s = acc[n];
#pragma unroll
    for (int d = 16; d > 0; d >>= 1) s += __shfl_xor_sync(DSF_FULL, s, d);
    if (lane == 0 && n0 + n < batch) y[static_cast<long long>(n0 + n) * rows + row] = s * scale;
  }
}
