// Shared by every kernel source: the operand description, value conversions, the
// OpenMP schedules and the x86 helpers that more than one instruction path inlines.
//
// A factor S (rows x cols) in the bitmap format: one 32-bit word per 32 columns per row
// (bit j of word w = column 32w + j), row offsets into a packed value array (fp16, bf16,
// or int8 with one fp32 scale per row), as dsf_runtime/formats/bitmap.py writes it.
// Every path computes y[b, r] = sum_c S[r, c] * x[b, c] with fp32 accumulation, rows
// split over OpenMP threads. The sources: portable.cpp (any CPU), avx2.cpp,
// avx512.cpp, avx512_bf16.cpp, amx.cpp (one per instruction family, compiled with target
// attributes so that one build runs everywhere), check.cpp (validation, column
// decoding), plan.cpp (timing the variants), ops.cpp (the torch ops and the dispatch
// table filled once at load). The caller validated every index and offset when the
// checkpoint was loaded.
#pragma once

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#else
inline int omp_get_num_threads() { return 1; }
inline int omp_get_thread_num() { return 0; }
inline int omp_get_max_threads() { return 1; }
#endif

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define DSF_X86 1
#endif

namespace dsf {

// One factor's operands as the kernels read them. ``columns``: the column of every
// nonzero (the column-index path's operand), or null.
struct Factor {
  const int32_t* bitmap;   // [rows][words]
  const int32_t* offsets;  // [rows + 1]
  const void* values;      // [nvalues] fp16 / bf16 bits, or int8
  const float* scales;     // [rows] for int8 values, else unused
  const uint16_t* columns; // [nvalues] or null
  int64_t nvalues, rows, cols, words;
  int kind;  // ValueKind
};

// y [batch][ldy] fp32 from x [batch][ldx] fp32. Word paths read 32 * words columns of x
// (zero padded past cols); nonzero, column-index and portable paths read cols.
using SpmmFn = void (*)(const Factor& f, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t batch);
// The same from bf16 x (a model run in bf16), 32 * words columns, zero padded.
using DotFn = void (*)(const Factor& f, const uint16_t* x, int64_t ldx, float* y, int64_t ldy, int64_t batch);

// A dense weight W [n][k] row-major (nn.Linear's layout) as stored: fp32, bf16, or int8
// with one fp32 scale per 32 columns (scales [n][k / 32]; k a multiple of 32). Kept
// narrow only where the narrow form gives back every fp32 weight exactly (see
// kernels/dense_cpu.py), so all kinds compute the same y.
enum DenseKind { kDenseF32 = 0, kDenseBf16 = 1, kDenseQ8 = 2 };
constexpr int64_t kDenseQ8Block = 32;
constexpr int64_t dense_bytes(int kind) { return kind == kDenseF32 ? 4 : kind == kDenseBf16 ? 2 : 1; }
struct DenseWeight {
  const void* data;
  const float* scales;  // kDenseQ8 only
  int kind;
};

// Dense y [batch][ldy] = x [batch][ldx] W^T, fp32 x and accumulation.
using DenseFn = void (*)(const DenseWeight& w, int64_t n, int64_t k, const float* x, int64_t ldx, float* y,
                         int64_t ldy, int64_t batch);

// One decode query's attention over a cached span, fp32 throughout: out [d] =
// sum_t softmax_t(scale * q . K[t]) V[t], keys and values [span][d] row-major (span >= 1),
// ``w`` scratch for span floats. NaN in q or the cache comes out as NaN.
using AttendFn = void (*)(const float* q, const float* keys, const float* values, int64_t span, int64_t d,
                          float scale, float* w, float* out);

// The entry points, one set per source file (x86 ones exist only in x86 builds).
void nz_portable(const Factor&, const float*, int64_t, float*, int64_t, int64_t);
void attend_portable(const float* q, const float* keys, const float* values, int64_t span, int64_t d, float scale,
                     float* w, float* out);
#ifdef DSF_X86
bool has_avx2();
bool has_avx512();       // F + BW + VBMI2
bool has_avx512_bf16();  // the above + BF16 + VL (+ BMI2)
void words_avx2(const Factor&, const float*, int64_t, float*, int64_t, int64_t);
void nz_avx2(const Factor&, const float*, int64_t, float*, int64_t, int64_t);
void cols_avx2(const Factor&, const float*, int64_t, float*, int64_t, int64_t);
void words_avx512(const Factor&, const float*, int64_t, float*, int64_t, int64_t);
void nz_avx512(const Factor&, const float*, int64_t, float*, int64_t, int64_t);
bool has_amx();           // AMX-TILE + AMX-BF16, the OS's tile state and (Linux) the process's permission
const char* amx_unavailable();  // why has_amx() is false (nullptr where it is true)
void tiles_amx(const Factor&, const float*, int64_t, float*, int64_t, int64_t);
void tiles_emulated(const Factor&, const float*, int64_t, float*, int64_t, int64_t);
void words_avx512_256(const Factor&, const float*, int64_t, float*, int64_t, int64_t);
void dot_avx512(const Factor&, const uint16_t*, int64_t, float*, int64_t, int64_t);
void dot_avx512_256(const Factor&, const uint16_t*, int64_t, float*, int64_t, int64_t);
void pairs_avx512(const Factor&, const float*, int64_t, float*, int64_t, int64_t);  // bf16 values, x rounded to bf16
// The fp32 output layer of a sparse model at decode batches (see DenseFn).
void dense_avx2(const DenseWeight& w, int64_t n, int64_t k, const float* x, int64_t ldx, float* y, int64_t ldy,
                int64_t batch);
void attend_avx2(const float* q, const float* keys, const float* values, int64_t span, int64_t d, float scale,
                 float* w, float* out);
#endif
int64_t row_popcount(const uint32_t* row, int64_t words);

// plan.cpp: each word and nonzero variant this CPU can run, by name, with its best time
// of one call in ns on a synthetic factor.
std::vector<std::pair<const char*, double>> time_paths();

// check.cpp. check_factor: 0 when a factor's structure holds, else 4 * row + code for the
// first bad row (1: offsets out of order, 2: popcount mismatch, 3: bits past the last
// column), or -1 when the offsets do not start at 0 and end at nnz. index_columns: the
// column of every set bit into ``columns`` [nnz]; false when the bits do not match the
// offsets, lie at or past ``cols``, or cols > 65536.
int64_t check_factor(const int32_t* bitmap, const int32_t* offsets, int64_t rows, int64_t words, int64_t cols,
                     int64_t nnz);
bool index_columns(const int32_t* bitmap, const int32_t* offsets, int64_t rows, int64_t words, int64_t cols,
                   int64_t nnz, uint16_t* columns);

inline float half_to_float(uint16_t h) {
  uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ffu, bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal
      exp = 127 - 15 + 1;
      while (!(mant & 0x400u)) { mant <<= 1; --exp; }
      mant &= 0x3ffu;
      bits = sign | (exp << 23) | (mant << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline float bf16_to_float(uint16_t h) {
  uint32_t bits = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline float to_float(uint16_t v, int is_bf16) { return is_bf16 ? bf16_to_float(v) : half_to_float(v); }

// Value kinds of the packed array: 16-bit floats, or int8 with one fp32 scale per row.
enum ValueKind { kFp16 = 0, kBf16 = 1, kInt8 = 2 };

inline float value_at(const void* values, int64_t k, int kind) {
  if (kind == kInt8) return float(static_cast<const int8_t*>(values)[k]);
  return to_float(static_cast<const uint16_t*>(values)[k], kind == kBf16);
}


#ifdef DSF_X86
#ifndef DSF_PREFETCH_BYTES
#define DSF_PREFETCH_BYTES 4096
#endif
#define DSF_AVX512 __attribute__((target("avx512f,avx512bw,avx512vbmi2")))

// The sum of a ymm register's 8 floats. Only AVX, so that the AVX2 paths and AVX-512's
// 256-bit variants (whose target sets both contain it) inline the one definition.
__attribute__((target("avx"))) inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// Expand the next popcount(bits) packed 16-bit values into the lanes of the set bits.
// Where 32 values are readable before
// ``end`` the register form of vpexpandw is used (on current Intel cores much faster
// than the memory form); near the end of the array the fault-safe memory form.
DSF_AVX512 inline __m512i expand_packed(const uint16_t* src, const uint16_t* end, uint32_t bits) {
  return src + 32 <= end ? _mm512_maskz_expand_epi16(bits, _mm512_loadu_si512(src))
                         : _mm512_maskz_expandloadu_epi16(bits, src);
}

// Software prefetch DSF_PREFETCH_BYTES ahead in the value stream (two lines: a step of
// U words can consume more than one at high density) and the bitmap stream: the
// hardware prefetcher alone streams these at about half the bandwidth.
// HINT and AHEAD are the AVX2 word path's (see row_avx2).
template <int HINT = _MM_HINT_T0, int AHEAD = DSF_PREFETCH_BYTES>
inline void prefetch_ahead(const void* v, const uint32_t* bitmap_word) {
  _mm_prefetch(reinterpret_cast<const char*>(v) + AHEAD, static_cast<decltype(_MM_HINT_T0)>(HINT));
  _mm_prefetch(reinterpret_cast<const char*>(v) + AHEAD + 64, static_cast<decltype(_MM_HINT_T0)>(HINT));
  _mm_prefetch(reinterpret_cast<const char*>(bitmap_word) + AHEAD / 4, static_cast<decltype(_MM_HINT_T0)>(HINT));
}
#endif

#ifdef DSF_X86
// The word paths' schedule: rows in blocks handed to OpenMP threads as they come free.
// Factors of 2048 rows and more: blocks of 64 (dynamic: on a shared machine one core can
// run slower than the other for a whole call, and a static half would leave the other
// waiting). Smaller ones (SmolLM2's): one contiguous block per thread, since nine blocks
// of 64 over two threads leave one idle for a ninth of the call and every block restarts
// the streams the prefetcher follows (scripts/kernel_ab.py on Zen 3, 576x576 to 1536x576,
// bf16: 0.86-0.94x the time at batches 1-8, the column-index path 0.86x). Within a
// block the batch runs as tiles of 16 or 8 (as ``max_nb`` allows), 12 (where the path has
// that tile), 4, or the 1-3 rows left: tile(nb, first batch row, r0, r1).
template <class Tile>
void over_row_blocks(int64_t rows, int64_t batch, int max_nb, bool tile12, Tile tile) {
  const int64_t rb = rows >= 2048 ? 64 : std::max<int64_t>(8, (rows / omp_get_max_threads() + 7) / 8 * 8);
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t blk = 0; blk < (rows + rb - 1) / rb; ++blk) {
    int64_t r0 = blk * rb, r1 = r0 + rb < rows ? r0 + rb : rows;
    for (int64_t b0 = 0; b0 < batch;) {
      int64_t left = batch - b0;
      int nb = left >= 16 && max_nb >= 16 ? 16
               : tile12 && left >= 12     ? 12
               : left >= 8 && max_nb >= 8 ? 8
               : left >= 4                ? 4
                                          : int(left);
      tile(nb, b0, r0, r1);
      b0 += nb;
    }
  }
}

// The nonzero paths' schedule: rows in blocks of 64 over OpenMP threads, each thread
// with its own index and value buffers for one decoded row: block(r0, r1, idx, val).
template <class Block>
void over_row_blocks_nz(int64_t rows, int64_t words, Block block) {
#pragma omp parallel
  {
    int64_t cap = words * 32 + 16;
    int32_t* idx = new int32_t[cap];
    float* val = new float[cap];
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < (rows + 63) / 64; ++blk) {
      int64_t r0 = blk * 64, r1 = r0 + 64 < rows ? r0 + 64 : rows;
      block(r0, r1, idx, val);
    }
    delete[] idx;
    delete[] val;
  }
}
#endif

// The nonzero paths read x as x^T ([in][batch]) and write y^T; callers hand x and y as
// [batch][ld]. Per chunk of up to ``max_ldb`` batch rows: x^T [32 * words][ldb] (ldb = the
// chunk rounded up to ``lanes``, zero padded) is built, ``inner(xt, ldb, yt)`` computes
// y^T [rows][ldb], and that is written back into y. (Transposing here, not in torch,
// saves ~50 us of strided copies per call, comparable to the kernel itself at SmolLM2's
// sizes.)
template <class Inner>
void over_batch_chunks(const float* x, int64_t ldx, float* y, int64_t ldy, int64_t rows, int64_t cols, int64_t words,
                       int64_t batch, int64_t lanes, int64_t max_ldb, Inner inner) {
  std::vector<float> xt, yt;
  for (int64_t b0 = 0; b0 < batch; b0 += max_ldb) {
    const int64_t nb = std::min(max_ldb, batch - b0), ldb = (nb + lanes - 1) / lanes * lanes;
    xt.assign(size_t(32 * words * ldb), 0.f);
    for (int64_t c = 0; c < cols; ++c)
      for (int64_t b = 0; b < nb; ++b) xt[size_t(c * ldb + b)] = x[(b0 + b) * ldx + c];
    yt.resize(size_t(rows * ldb));
    inner(xt.data(), ldb, yt.data());
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t b = 0; b < nb; ++b) y[(b0 + b) * ldy + r] = yt[size_t(r * ldb + b)];
  }
}

}  // namespace dsf
