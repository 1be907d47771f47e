// Runs the CUDA C++ kernels of dsf_runtime/kernels/cuda/ on the CPU, so that their logic
// (indexing, warp prefix sums, staging, tails) is tested without a GPU. Each block's
// threads are real threads; the warp primitives the kernels use (shuffles, __syncwarp)
// meet at a per-warp barrier, so lanes exchange values the way a warp does. Blocks run
// one after another, so a kernel's `__shared__` arrays become function statics.
// Built by tests/kernels/test_cupy_bitmap.py with the system C++ compiler.

#include <barrier>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

struct dsf_dim3 {
  unsigned x = 0, y = 0, z = 0;
};
static thread_local dsf_dim3 threadIdx, blockIdx;

static float dsf_host_half(unsigned short bits) {
  _Float16 h;
  std::memcpy(&h, &bits, 2);
  return static_cast<float>(h);
}

struct uint4 {
  unsigned x, y, z, w;
};

namespace host_warp {
constexpr int kMaxWarps = 32;
struct Warp {
  std::unique_ptr<std::barrier<>> meet;
  long long slots[32];
};
static Warp warps[kMaxWarps];
inline Warp& mine() { return warps[threadIdx.x >> 5]; }
inline int lane() { return threadIdx.x & 31; }
template <typename T>
T exchange(T v, int from) {  // every lane posts v, then reads lane `from`'s
  Warp& w = mine();
  long long bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  w.slots[lane()] = bits;
  w.meet->arrive_and_wait();
  T out;
  std::memcpy(&out, &w.slots[from], sizeof(T));
  w.meet->arrive_and_wait();
  return out;
}
}  // namespace host_warp

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

inline void __syncwarp(unsigned = 0xffffffffu) { host_warp::mine().meet->arrive_and_wait(); }
template <typename T>
T __shfl_sync(unsigned, T v, int src) {
  return host_warp::exchange(v, src & 31);
}
template <typename T>
T __shfl_up_sync(unsigned, T v, int d) {
  const int l = host_warp::lane();
  T other = host_warp::exchange(v, l >= d ? l - d : l);
  return l >= d ? other : v;
}
template <typename T>
T __shfl_xor_sync(unsigned, T v, int m) {
  return host_warp::exchange(v, host_warp::lane() ^ m);
}
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __ffs(int v) { return __builtin_ffs(v); }
inline float __uint_as_float(unsigned v) {
  float f;
  std::memcpy(&f, &v, 4);
  return f;
}

#define DSF_HOST_EMULATION 1
#include "bitmap_spmm.cu"

// Launch `kernel` on a grid of blocks, one block at a time, a thread per CUDA thread.
template <typename Kernel>
static void host_launch(dsf_dim3 grid, int threads, Kernel kernel) {
  for (int w = 0; w < (threads + 31) / 32; ++w) host_warp::warps[w].meet = std::make_unique<std::barrier<>>(32);
  for (unsigned by = 0; by < grid.y; ++by) {
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      std::vector<std::thread> pool;
      for (int t = 0; t < threads; ++t) {
        pool.emplace_back([=] {
          threadIdx.x = t;
          blockIdx.x = bx;
          blockIdx.y = by;
          kernel();
        });
      }
      for (auto& th : pool) th.join();
    }
  }
}

template <typename V, typename X, int NB>
static void run(const void* bitmap, const void* offsets, const void* values, const void* scales, const void* x,
                void* y, long long nvalues, int rows, int cols, int words, int batch) {
  dsf_dim3 grid;
  grid.x = (rows + DSF_WARPS - 1) / DSF_WARPS;
  grid.y = (batch + NB - 1) / NB;
  host_launch(grid, 32 * DSF_WARPS, [=] {
    bitmap_spmm<V, X, NB>(static_cast<const unsigned*>(bitmap), static_cast<const int*>(offsets),
                          static_cast<const V*>(values), static_cast<const float*>(scales),
                          static_cast<const X*>(x), static_cast<float*>(y), nvalues, rows, cols, words, batch);
  });
}

template <typename V, typename X>
static int by_tile(int tile, const void* b, const void* o, const void* v, const void* s, const void* x, void* y,
                   long long n, int r, int c, int w, int batch) {
  switch (tile) {
    case 1: run<V, X, 1>(b, o, v, s, x, y, n, r, c, w, batch); return 0;
    case 2: run<V, X, 2>(b, o, v, s, x, y, n, r, c, w, batch); return 0;
    case 4: run<V, X, 4>(b, o, v, s, x, y, n, r, c, w, batch); return 0;
    case 8: run<V, X, 8>(b, o, v, s, x, y, n, r, c, w, batch); return 0;
  }
  return 1;
}

template <typename V>
static int by_x(int xkind, int tile, const void* b, const void* o, const void* v, const void* s, const void* x,
                void* y, long long n, int r, int c, int w, int batch) {
  switch (xkind) {  // 0 fp16, 1 bf16, 2 fp32
    case 0: return by_tile<V, dsf_half>(tile, b, o, v, s, x, y, n, r, c, w, batch);
    case 1: return by_tile<V, dsf_bf16>(tile, b, o, v, s, x, y, n, r, c, w, batch);
    case 2: return by_tile<V, float>(tile, b, o, v, s, x, y, n, r, c, w, batch);
  }
  return 1;
}

// vkind: 0 fp16, 1 bf16, 2 fp32, 3 int8; returns nonzero for a kind or tile it does not know
extern "C" int dsf_bitmap_spmm_host(int vkind, int xkind, int tile, const void* bitmap, const void* offsets,
                                    const void* values, const void* scales, const void* x, void* y,
                                    long long nvalues, int rows, int cols, int words, int batch) {
  switch (vkind) {
    case 0: return by_x<dsf_half>(xkind, tile, bitmap, offsets, values, scales, x, y, nvalues, rows, cols, words, batch);
    case 1: return by_x<dsf_bf16>(xkind, tile, bitmap, offsets, values, scales, x, y, nvalues, rows, cols, words, batch);
    case 2: return by_x<float>(xkind, tile, bitmap, offsets, values, scales, x, y, nvalues, rows, cols, words, batch);
    case 3: return by_x<signed char>(xkind, tile, bitmap, offsets, values, scales, x, y, nvalues, rows, cols, words, batch);
  }
  return 1;
}
