// Sparse (bitmap format) x dense matmul for CPUs: y[b, r] = sum_c S[r, c] * x[b, c].
//
// S is stored as one 32-bit word per 32 columns per row (bit j of word w = column
// 32w + j), row offsets into a packed value array (fp16 or bf16), as written by
// dsf_runtime/formats/bitmap.py. Accumulation is fp32. Rows are split over OpenMP
// threads.
//
// Paths:
//  * AVX-512 (F + BW + VBMI2): per 32-column word, expand the row's packed 16-bit
//    values into the word's lanes (vpexpandw), convert to fp32 and FMA with x, for a
//    tile of up to 12 batch rows at once: the bitmap and values stream once per tile
//    with no index arithmetic.
//  * AVX-512 BF16 (bf16 values and bf16 activations, i.e. a model run in bf16): per
//    word, expand the 32 packed bf16 values and accumulate with one vdpbf16ps against
//    the word's 32 bf16 activations (fp32 accumulation): no conversions, which is what
//    bounds the path above (its expand + converts all compete for one shuffle port).
//  * AVX2 (no AVX-512): the same word and nonzero paths with 8-lane vectors, each
//    8-column byte expanded through a vpshufb table; and for factors of low density at
//    batch 1, a column-index path that gathers x by each nonzero's column (decoded once
//    at load by dsf_bitmap_columns).
//  * portable fallback for CPUs without AVX2 (chosen at run time): iterate the set
//    bits (ctz) and FMA each value into all batch columns of x^T ([in][batch]).
// The caller (Python) validated every index and offset when the checkpoint was loaded.

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#else
inline int omp_get_num_threads() { return 1; }
inline int omp_get_thread_num() { return 0; }
#endif

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define DSF_X86 1
#endif

namespace {

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

// Portable path, any batch: walk set bits; x^T is [cols][batch]. int8 rows are scaled
// once at the end.
void rows_scalar(const int32_t* bitmap, const int32_t* offsets, const void* values, const float* scales,
                 const float* xt, float* yt, int64_t r0, int64_t r1, int64_t words, int64_t batch, int kind) {
  for (int64_t r = r0; r < r1; ++r) {
    float* out = yt + r * batch;
    for (int64_t b = 0; b < batch; ++b) out[b] = 0.f;
    int64_t k = offsets[r];
    const uint32_t* row = reinterpret_cast<const uint32_t*>(bitmap) + r * words;
    for (int64_t w = 0; w < words; ++w) {
      uint32_t bits = row[w];
      while (bits) {
        int j = __builtin_ctz(bits);
        bits &= bits - 1;
        float v = value_at(values, k++, kind);
        const float* xc = xt + (w * 32 + j) * batch;
        for (int64_t b = 0; b < batch; ++b) out[b] += v * xc[b];
      }
    }
    if (kind == kInt8)
      for (int64_t b = 0; b < batch; ++b) out[b] *= scales[r];
  }
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

// The same, converted to two vectors of 16 fp32.
DSF_AVX512 inline void expand32(const uint16_t* src, const uint16_t* end, uint32_t bits, int is_bf16, __m512& lo,
                                __m512& hi) {
  __m512i packed = expand_packed(src, end, bits);
  __m256i a = _mm512_castsi512_si256(packed);
  __m256i b = _mm512_extracti64x4_epi64(packed, 1);
  if (is_bf16) {
    lo = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(a), 16));
    hi = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
  } else {
    lo = _mm512_cvtph_ps(a);
    hi = _mm512_cvtph_ps(b);
  }
}

// One word of the fp32 path: expand and convert its values, FMA them with the word's
// 32 columns of each of NB batch rows into (acc, acc2). Returns the values consumed.
template <int NB>
DSF_AVX512 inline int fma_word(const uint16_t* v, const uint16_t* end, uint32_t bits, int is_bf16, const float* xw,
                               int64_t ldx, __m512* acc, __m512* acc2) {
  __m512 lo, hi;
  expand32(v, end, bits, is_bf16, lo, hi);
  for (int b = 0; b < NB; ++b) {
    acc[b] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xw + b * ldx), acc[b]);
    acc2[b] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xw + b * ldx + 16), acc2[b]);
  }
  return __builtin_popcount(bits);
}

// One tile of NB batch rows; U words per step, each with its own accumulators, so
// that FMA latency is hidden even at batch 1. x: [batch][ldx] (rows padded to
// 32 * words with zeros), y: [batch][ldy].
template <int NB, int U>
DSF_AVX512 void rows_avx512(const int32_t* bitmap, const int32_t* offsets, const uint16_t* values, const float* x,
                            int64_t ldx, float* y, int64_t ldy, int64_t r0, int64_t r1, int64_t words, int is_bf16,
                            const uint16_t* end) {
  for (int64_t r = r0; r < r1; ++r) {
    __m512 acc[U][NB], acc2[U][NB];
    for (int u = 0; u < U; ++u)
      for (int b = 0; b < NB; ++b) acc[u][b] = acc2[u][b] = _mm512_setzero_ps();
    const uint16_t* v = values + offsets[r];
    const uint32_t* row = reinterpret_cast<const uint32_t*>(bitmap) + r * words;
    int64_t w = 0;
    for (; w + U <= words; w += U) {
      prefetch_ahead(v, row + w);
      for (int u = 0; u < U; ++u)
        if (row[w + u]) v += fma_word<NB>(v, end, row[w + u], is_bf16, x + (w + u) * 32, ldx, acc[u], acc2[u]);
    }
    for (; w < words; ++w)
      if (row[w]) v += fma_word<NB>(v, end, row[w], is_bf16, x + w * 32, ldx, acc[0], acc2[0]);
    for (int b = 0; b < NB; ++b) {
      __m512 sum = _mm512_add_ps(acc[0][b], acc2[0][b]);
      for (int u = 1; u < U; ++u) sum = _mm512_add_ps(sum, _mm512_add_ps(acc[u][b], acc2[u][b]));
      y[b * ldy + r] = _mm512_reduce_add_ps(sum);
    }
  }
}

#define DSF_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vbmi2,avx512bf16")))

// One word of the bf16 path: expand its bf16 values and dot them pairwise with the
// word's 32 bf16 activations of each of NB batch rows. Returns the values consumed.
template <int NB>
DSF_AVX512BF16 inline int dot_word(const uint16_t* v, const uint16_t* end, uint32_t bits, const uint16_t* xw,
                                   int64_t ldx, __m512* acc) {
  __m512bh packed = (__m512bh)expand_packed(v, end, bits);
  for (int b = 0; b < NB; ++b)
    acc[b] = _mm512_dpbf16_ps(acc[b], packed, (__m512bh)_mm512_loadu_si512(xw + b * ldx));
  return __builtin_popcount(bits);
}

// bf16 x bf16 -> fp32, tile of NB batch rows, U words in flight. x: [batch][ldx] bf16.
template <int NB, int U>
DSF_AVX512BF16 void rows_bf16dot(const int32_t* bitmap, const int32_t* offsets, const uint16_t* values,
                                 const uint16_t* x, int64_t ldx, float* y, int64_t ldy, int64_t r0, int64_t r1,
                                 int64_t words, const uint16_t* end) {
  for (int64_t r = r0; r < r1; ++r) {
    __m512 acc[U][NB];
    for (int u = 0; u < U; ++u)
      for (int b = 0; b < NB; ++b) acc[u][b] = _mm512_setzero_ps();
    const uint16_t* v = values + offsets[r];
    const uint32_t* row = reinterpret_cast<const uint32_t*>(bitmap) + r * words;
    int64_t w = 0;
    for (; w + U <= words; w += U) {
      prefetch_ahead(v, row + w);
      for (int u = 0; u < U; ++u)
        if (row[w + u]) v += dot_word<NB>(v, end, row[w + u], x + (w + u) * 32, ldx, acc[u]);
    }
    for (; w < words; ++w)
      if (row[w]) v += dot_word<NB>(v, end, row[w], x + w * 32, ldx, acc[0]);
    for (int b = 0; b < NB; ++b) {
      __m512 sum = acc[0][b];
      for (int u = 1; u < U; ++u) sum = _mm512_add_ps(sum, acc[u][b]);
      y[b * ldy + r] = _mm512_reduce_add_ps(sum);
    }
  }
}

DSF_AVX512BF16 void tile_bf16dot(int nb, const int32_t* bitmap, const int32_t* offsets, const uint16_t* values,
                                 const uint16_t* x, int64_t ldx, float* y, int64_t ldy, int64_t r0, int64_t r1,
                                 int64_t words, const uint16_t* end) {
  switch (nb) {
    case 1: rows_bf16dot<1, 4>(bitmap, offsets, values, x, ldx, y, ldy, r0, r1, words, end); break;
    case 2: rows_bf16dot<2, 4>(bitmap, offsets, values, x, ldx, y, ldy, r0, r1, words, end); break;
    case 3: rows_bf16dot<3, 2>(bitmap, offsets, values, x, ldx, y, ldy, r0, r1, words, end); break;
    case 4: rows_bf16dot<4, 2>(bitmap, offsets, values, x, ldx, y, ldy, r0, r1, words, end); break;
    case 8: rows_bf16dot<8, 1>(bitmap, offsets, values, x, ldx, y, ldy, r0, r1, words, end); break;
    default: rows_bf16dot<16, 1>(bitmap, offsets, values, x, ldx, y, ldy, r0, r1, words, end); break;
  }
}

// 16 batch rows: one accumulator per row (both halves of a word FMA into it: fma_word
// with acc2 = acc) so that 16 rows fit the 32 vector registers and each word is
// expanded and converted once for all of them (a 12 + 4 split expands it twice).
DSF_AVX512 void rows_avx512_16(const int32_t* bitmap, const int32_t* offsets, const uint16_t* values, const float* x,
                               int64_t ldx, float* y, int64_t ldy, int64_t r0, int64_t r1, int64_t words, int is_bf16,
                               const uint16_t* end) {
  constexpr int NB = 16;
  for (int64_t r = r0; r < r1; ++r) {
    __m512 acc[NB];
    for (int b = 0; b < NB; ++b) acc[b] = _mm512_setzero_ps();
    const uint16_t* v = values + offsets[r];
    const uint32_t* row = reinterpret_cast<const uint32_t*>(bitmap) + r * words;
    for (int64_t w = 0; w < words; ++w) {
      if ((w & 3) == 0) prefetch_ahead(v, row + w);
      if (row[w]) v += fma_word<NB>(v, end, row[w], is_bf16, x + w * 32, ldx, acc, acc);
    }
    for (int b = 0; b < NB; ++b) y[b * ldy + r] = _mm512_reduce_add_ps(acc[b]);
  }
}

// The 256-bit variants (``mode`` & 2 of dsf_bitmap_spmm_avx512, ``ymm`` of dsf_bitmap_spmm_bf16dot). On AMD Zen 4 a 512-bit
// vpexpandw, and each 512-bit op that crosses 256-bit halves (vpmovzxwd, vcvtph2ps from a
// ymm), costs about twice a 256-bit one, and the 512-bit word above ran at 16.5 cycles per
// word against 8.2 for the AVX2 path (single thread, factor in L2). These expand each word
// as two 16-column halves into ymm registers (vpexpandw ymm: one per cycle there) and never
// widen the values: with AVX512_BF16, vdpbf16ps multiplies bf16 pairs exactly into fp32,
// and fp32 x is carried as two bf16 parts, x ~ hi + lo with hi = bf16(x), lo = bf16(x - hi)
// (16 significant bits: |x - hi - lo| <= 2^-16 |x|). 5.4 cycles per word in that test.
// bf16 values only; which variant is faster on this CPU is measured (dsf_plan_paths).
#define DSF_AVX512Y __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2,avx512bf16")))

// The next popcount(bits) packed values into the lanes of the 16 ``bits`` that are set.
// CHECKED (the rows whose last 16 values run past ``end``): the fault-safe memory form
// near the end; elsewhere no per-word test (7-10% of the time). The compiler folds the
// load into vpexpandw's memory form; forcing the register form (an empty asm on the
// loaded vector) was 1.15x faster with the factor in L2 but 1.04-1.09x slower streamed
// from memory, as real layers are (Zen 4).
template <bool CHECKED>
DSF_AVX512Y inline __m256bh expand16(const uint16_t* src, const uint16_t* end, uint32_t bits) {
  if (CHECKED && src + 16 > end) return (__m256bh)_mm256_maskz_expandloadu_epi16(__mmask16(bits), src);
  return (__m256bh)_mm256_maskz_expand_epi16(__mmask16(bits), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
}

// As a float load (vmovups): GCC emits the integer form as the EVEX vmovdqu16, and with it
// the 4096x11008 pair ran 1.04x slower (Zen 4, streamed).
DSF_AVX512Y inline __m256bh load_bh(const uint16_t* p) {
  return (__m256bh)_mm256_loadu_ps(reinterpret_cast<const float*>(p));
}

// fp32 x [batch][ldx] (ldx = 32 * words) as bf16 parts xs [batch][64 * words]: per 32-column
// word its 32 hi parts, then its 32 lo parts, so that one word's operands are adjacent.
DSF_AVX512Y void split_x(const float* x, int64_t ldx, int64_t batch, int64_t words, uint16_t* xs) {
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t w = 0; w < words; ++w)
      for (int h = 0; h < 2; ++h) {
        __m512 v = _mm512_loadu_ps(x + b * ldx + w * 32 + h * 16);
        __m256bh hi = _mm512_cvtneps_pbh(v);
        __m512 hif = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)hi), 16));
        __m256bh lo = _mm512_cvtneps_pbh(_mm512_sub_ps(v, hif));
        uint16_t* o = xs + b * 64 * words + w * 64 + h * 16;
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), (__m256i)hi);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 32), (__m256i)lo);
      }
}

// One word of the 256-bit variants against NB rows of x in bf16 PARTS (2: split fp32 x,
// each word's 32 hi parts then its 32 lo parts; 1: a bf16 model's x), xw: the word's
// 32 * PARTS values of batch row 0, rows ldx apart. acc[b][2p] and acc[b][2p + 1] gather
// part p's products with the word's two 16-column halves. Returns the values consumed.
// 64-bit popcounts, the word's total in one: the int forms' sign extensions and the extra
// add cost 1.09x on the square layer.
template <int NB, int PARTS, bool CHECKED>
DSF_AVX512Y inline int64_t word_256(const uint16_t* v, const uint16_t* end, uint32_t bits, const uint16_t* xw,
                                    int64_t ldx, __m256 (*acc)[2 * PARTS]) {
  const uint64_t n0 = __builtin_popcountll(bits & 0xFFFFu);
  __m256bh p0 = expand16<CHECKED>(v, end, bits & 0xFFFFu), p1 = expand16<CHECKED>(v + n0, end, bits >> 16);
  for (int b = 0; b < NB; ++b) {
    const uint16_t* xb = xw + b * ldx;  // one base per row: GCC otherwise spills the addresses
    for (int p = 0; p < PARTS; ++p) {
      acc[b][2 * p] = _mm256_dpbf16_ps(acc[b][2 * p], p0, load_bh(xb + 32 * p));
      acc[b][2 * p + 1] = _mm256_dpbf16_ps(acc[b][2 * p + 1], p1, load_bh(xb + 32 * p + 16));
    }
  }
  return int64_t(__builtin_popcountll(uint64_t(bits)));
}

// One row of a tile of NB <= 4 batch rows, U words per step with their own accumulators:
// the row's sums into y[b * ldy]. SKIP: empty words are passed over. Without the test
// (SKIP false) an empty word's expands give zeros; at DSF's densities, where hardly any word
// is empty, the test made the square layer 1.13x slower. Sparse rows keep it (1/16 of the
// positions or fewer set: 0.5x the time at 1% density, factor in L2), and so do the rows near
// the array's end, whose fault-safe expands from an empty word take hundreds of cycles (an
// empty factor, all of whose rows are such, ran 23-30x slower without the test). The value
// and bitmap streams are prefetched into L2, not L1: 0.92x the time of the L1 hint on the
// square layer with the rest of this form (Zen 4; the AVX2 path's lesson too), where L1
// holds the row's x.
template <int NB, int U, int PARTS, bool CHECKED, bool SKIP>
DSF_AVX512Y inline void row_256(const uint32_t* row, const uint16_t* v, const uint16_t* x, int64_t ldx, float* y,
                                int64_t ldy, int64_t words, const uint16_t* end) {
  __m256 acc[U][NB][2 * PARTS];
  for (int u = 0; u < U; ++u)
    for (int b = 0; b < NB; ++b)
      for (int k = 0; k < 2 * PARTS; ++k) acc[u][b][k] = _mm256_setzero_ps();
  int64_t w = 0;
  for (; w + U <= words; w += U) {
    prefetch_ahead<_MM_HINT_T1>(v, row + w);
    for (int u = 0; u < U; ++u)
      if (!SKIP || row[w + u])
        v += word_256<NB, PARTS, CHECKED>(v, end, row[w + u], x + (w + u) * 32 * PARTS, ldx, acc[u]);
  }
  for (; w < words; ++w)
    if (!SKIP || row[w]) v += word_256<NB, PARTS, CHECKED>(v, end, row[w], x + w * 32 * PARTS, ldx, acc[0]);
  for (int b = 0; b < NB; ++b) {
    __m256 sum = _mm256_setzero_ps();
    for (int u = 0; u < U; ++u)
      for (int k = 0; k < 2 * PARTS; ++k) sum = _mm256_add_ps(sum, acc[u][b][k]);
    y[b * ldy] = hsum256(sum);
  }
}

// Rows r0..r1 of the 256-bit variants; the rows whose last 16 values run past ``end``
// take the checked loads, and sparse rows (as row_256 says) the test for empty words.
template <int NB, int U, int PARTS>
DSF_AVX512Y void rows_256(const int32_t* bitmap, const int32_t* offsets, const uint16_t* values, const uint16_t* x,
                          int64_t ldx, float* y, int64_t ldy, int64_t r0, int64_t r1, int64_t words,
                          const uint16_t* end) {
  for (int64_t r = r0; r < r1; ++r) {
    const uint32_t* row = reinterpret_cast<const uint32_t*>(bitmap) + r * words;
    const uint16_t* v = values + offsets[r];
    if (values + offsets[r + 1] + 16 > end)
      row_256<NB, U, PARTS, true, true>(row, v, x, ldx, y + r, ldy, words, end);
    else if (int64_t(offsets[r + 1] - offsets[r]) * 16 <= 32 * words)
      row_256<NB, U, PARTS, false, true>(row, v, x, ldx, y + r, ldy, words, end);
    else
      row_256<NB, U, PARTS, false, false>(row, v, x, ldx, y + r, ldy, words, end);
  }
}

// Tiles of the 256-bit variants (x in PARTS bf16 parts per value): two words in flight
// where the accumulators (2 * PARTS per row and word) fit in 16 registers.
template <int PARTS>
DSF_AVX512Y void tile_256(int nb, const int32_t* bitmap, const int32_t* offsets, const uint16_t* values,
                          const uint16_t* x, int64_t ldx, float* y, int64_t ldy, int64_t r0, int64_t r1,
                          int64_t words, const uint16_t* end) {
  constexpr int kWide = PARTS == 1 ? 2 : 1;  // words in flight for 3-4 rows
  switch (nb) {
    case 1: rows_256<1, 2, PARTS>(bitmap, offsets, values, x, ldx, y, ldy, r0, r1, words, end); break;
    case 2: rows_256<2, 2, PARTS>(bitmap, offsets, values, x, ldx, y, ldy, r0, r1, words, end); break;
    case 3: rows_256<3, kWide, PARTS>(bitmap, offsets, values, x, ldx, y, ldy, r0, r1, words, end); break;
    default: rows_256<4, kWide, PARTS>(bitmap, offsets, values, x, ldx, y, ldy, r0, r1, words, end); break;
  }
}

// Larger batches: work proportional to the nonzeros, not to 32-lane words. Per row,
// decode the bitmap into column indices (vpcompressd of a column iota) and the packed
// values into fp32, into two small buffers; then one pass over the row's nonzeros
// broadcasts each value and FMAs it into NB/16 vectors of x^T[column] ([in][batch]
// layout, batch padded to a multiple of 16). Fixed trip counts: no per-bit branches.
template <int NV>  // NV = batch / 16 vectors per x^T row
DSF_AVX512 void rows_nz(const int32_t* bitmap, const int32_t* offsets, const uint16_t* values, const float* xt,
                        int64_t ldb, float* yt, int64_t r0, int64_t r1, int64_t words, int is_bf16, int32_t* idx,
                        float* val) {
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t r = r0; r < r1; ++r) {
    const uint32_t* row = reinterpret_cast<const uint32_t*>(bitmap) + r * words;
    const uint16_t* v = values + offsets[r];
    const int64_t nnz = offsets[r + 1] - offsets[r];
    int64_t n = 0;
    for (int64_t w = 0; w < words; ++w) {
      uint32_t bits = row[w];
      __m512i base = _mm512_add_epi32(iota, _mm512_set1_epi32(int32_t(w * 32)));
      _mm512_storeu_si512(idx + n, _mm512_maskz_compress_epi32(__mmask16(bits), base));
      n += __builtin_popcount(bits & 0xFFFFu);
      _mm512_storeu_si512(idx + n, _mm512_maskz_compress_epi32(__mmask16(bits >> 16),
                                                               _mm512_add_epi32(base, _mm512_set1_epi32(16))));
      n += __builtin_popcount(bits >> 16);
    }
    int64_t k = 0;
    for (; k + 16 <= nnz; k += 16) {
      __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + k));
      _mm512_storeu_ps(val + k, is_bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
                                        : _mm512_cvtph_ps(h));
    }
    for (; k < nnz; ++k) val[k] = to_float(v[k], is_bf16);
    __m512 acc[NV], acc2[NV];
    for (int j = 0; j < NV; ++j) acc[j] = acc2[j] = _mm512_setzero_ps();
    k = 0;
    for (; k + 2 <= nnz; k += 2) {  // two nonzeros per step into two accumulator sets
      const float* xa = xt + int64_t(idx[k]) * ldb;
      const float* xb = xt + int64_t(idx[k + 1]) * ldb;
      __m512 a = _mm512_set1_ps(val[k]), b = _mm512_set1_ps(val[k + 1]);
      for (int j = 0; j < NV; ++j) {
        acc[j] = _mm512_fmadd_ps(a, _mm512_loadu_ps(xa + 16 * j), acc[j]);
        acc2[j] = _mm512_fmadd_ps(b, _mm512_loadu_ps(xb + 16 * j), acc2[j]);
      }
    }
    if (k < nnz) {
      const float* xa = xt + int64_t(idx[k]) * ldb;
      __m512 a = _mm512_set1_ps(val[k]);
      for (int j = 0; j < NV; ++j) acc[j] = _mm512_fmadd_ps(a, _mm512_loadu_ps(xa + 16 * j), acc[j]);
    }
    for (int j = 0; j < NV; ++j) _mm512_storeu_ps(yt + r * ldb + 16 * j, _mm512_add_ps(acc[j], acc2[j]));
  }
}

DSF_AVX512 void tile_avx512(int nb, const int32_t* bitmap, const int32_t* offsets, const uint16_t* values,
                            const float* x, int64_t ldx, float* y, int64_t ldy, int64_t r0, int64_t r1, int64_t words,
                            int is_bf16, const uint16_t* end) {
  switch (nb) {
    case 1: rows_avx512<1, 4>(bitmap, offsets, values, x, ldx, y, ldy, r0, r1, words, is_bf16, end); break;
    case 2: rows_avx512<2, 2>(bitmap, offsets, values, x, ldx, y, ldy, r0, r1, words, is_bf16, end); break;
    case 3: rows_avx512<3, 1>(bitmap, offsets, values, x, ldx, y, ldy, r0, r1, words, is_bf16, end); break;
    case 4: rows_avx512<4, 1>(bitmap, offsets, values, x, ldx, y, ldy, r0, r1, words, is_bf16, end); break;
    case 8: rows_avx512<8, 1>(bitmap, offsets, values, x, ldx, y, ldy, r0, r1, words, is_bf16, end); break;
    case 16: rows_avx512_16(bitmap, offsets, values, x, ldx, y, ldy, r0, r1, words, is_bf16, end); break;
    default: rows_avx512<12, 1>(bitmap, offsets, values, x, ldx, y, ldy, r0, r1, words, is_bf16, end); break;
  }
}
#endif

#ifdef DSF_X86
// ---------------------------------------------------------------------------------
// AVX2 paths (AVX2 + FMA + F16C + BMI2: most x86-64 CPUs of the last decade without AVX-512).
// There is no vpexpandw, so each 8-column byte of a bitmap word is expanded with a
// shuffle table: entry m of the table is the vpshufb control that moves the first
// popcount(m) packed 16-bit values to the lanes of m's set bits and zeroes the rest.
// fp16 values land packed and are widened by vcvtph2ps; bf16 values land directly in
// the high halves of fp32 lanes (a 32-byte control over the broadcast source), int8
// values in the top bytes of int32 lanes (i * 2^24, converted exactly by vcvtdq2ps:
// one shuffle per byte instead of vpshufb + vpmovsxbd, 0.87x the batch-1 time).
#define DSF_AVX2 __attribute__((target("avx2,fma,f16c,popcnt,bmi,bmi2")))

struct ShuffleTables {
  alignas(64) uint8_t fp16[256][16];  // packed fp16 -> 8 x fp16 lanes
  alignas(64) uint8_t bf16[256][32];  // packed bf16 (in both 128-bit halves) -> 8 x fp32 lanes
  alignas(64) uint8_t i8[256][32];    // packed int8 (in both 128-bit halves) -> top bytes of 8 x int32 lanes
  alignas(64) uint16_t pos[256][8];   // column of the k-th set bit of m (nonzero path)
};

const ShuffleTables& shuffle_tables() {
  static const ShuffleTables tables = [] {
    ShuffleTables t;
    std::memset(&t, 0x80, sizeof(t));  // 0x80: vpshufb writes a zero byte
    for (int m = 0; m < 256; ++m) {
      int k = 0;
      for (int j = 0; j < 8; ++j) {
        if (!((m >> j) & 1)) continue;
        t.fp16[m][2 * j] = uint8_t(2 * k);
        t.fp16[m][2 * j + 1] = uint8_t(2 * k + 1);
        int base = 4 * (j & 3) + 16 * (j >> 2);  // lane j of the 256-bit result
        t.bf16[m][base] = t.bf16[m][base + 1] = 0x80;
        t.bf16[m][base + 2] = uint8_t(2 * k);
        t.bf16[m][base + 3] = uint8_t(2 * k + 1);
        t.i8[m][base + 3] = uint8_t(k);
        t.pos[m][k++] = uint16_t(j);
      }
    }
    return t;
  }();
  return tables;
}

// The packed value type of a kind: 16-bit floats or int8.
template <int KIND>
using packed_t = typename std::conditional<KIND == kInt8, int8_t, uint16_t>::type;

// 8 packed values from ``v`` (16 or 8 bytes); near the array's ``end`` (CHECKED rows
// only) the missing ones read as zero instead of past the buffer.
template <bool CHECKED, class V>
DSF_AVX2 inline __m128i load8(const V* v, const V* end) {
  if (CHECKED && v + 8 > end) {
    V buf[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    std::memcpy(buf, v, size_t(end - v) * sizeof(V));
    return sizeof(V) == 2 ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(buf))
                          : _mm_loadl_epi64(reinterpret_cast<const __m128i*>(buf));
  }
  return sizeof(V) == 2 ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(v))
                        : _mm_loadl_epi64(reinterpret_cast<const __m128i*>(v));
}

// An int8 value expands to i * 2^24 (its byte on top of an int32 lane); this undoes that.
constexpr float kInt8Unit = 0x1p-24f;

// log2 of a table entry's size (fp16 entries are 16 bytes, bf16 and int8 entries 32): a
// mask byte shifted left by it is its entry's byte offset.
template <int KIND>
constexpr int kTableShift = KIND == kFp16 ? 4 : 5;

// The 8 columns of a mask byte as fp32, from the packed values at v (int8: in units of
// kInt8Unit, the row scale not applied); ``c`` = the byte shifted left by kTableShift
// (the byte offset of its table entry).
template <int KIND, bool CHECKED>
DSF_AVX2 inline __m256 expand8(const packed_t<KIND>* v, const packed_t<KIND>* end, uint64_t c,
                               const ShuffleTables& t) {
  __m128i raw = load8<CHECKED>(v, end);
  if (KIND == kBf16)
    return _mm256_castsi256_ps(_mm256_shuffle_epi8(
        _mm256_broadcastsi128_si256(raw),
        _mm256_load_si256(reinterpret_cast<const __m256i*>(reinterpret_cast<const uint8_t*>(t.bf16) + c))));
  if (KIND == kInt8)  // i * 2^24 as int32
    return _mm256_cvtepi32_ps(_mm256_shuffle_epi8(
        _mm256_broadcastq_epi64(raw),
        _mm256_load_si256(reinterpret_cast<const __m256i*>(reinterpret_cast<const uint8_t*>(t.i8) + c))));
  return _mm256_cvtph_ps(
      _mm_shuffle_epi8(raw, _mm_load_si128(reinterpret_cast<const __m128i*>(reinterpret_cast<const uint8_t*>(t.fp16) + c))));
}

inline uint64_t rotr64(uint64_t x, int r) { return (x >> r) | (x << ((64 - r) & 63)); }

// Q bytes of a row's bitmap (two 32-column words, Q = 8, or one, Q = 4; columns 0..8Q-1
// of ``xw``) into the accumulators: each byte expanded once and FMA'd into every batch
// row (byte q goes to accumulator q % A). Per byte, two integer operations give its
// table offset (a rotate, BMI2's rorx, and a mask) and one popcount of that advances the
// value index ``k``: 8 instructions per byte at batch 1 (fp16). On Zen 3 that integer
// work alone issues at ~1.5 cycles per byte and the vector work (vpshufb, vcvtph2ps at
// one per cycle, FMA) at ~1.5 (bf16: 1.0), together ~2.25 (scripts/op_rates.c); the
// loop runs at ~3 with its loads, whose addresses wait on the running popcount.
template <int Q, int NB, int KIND, bool CHECKED, int A>
DSF_AVX2 inline void bytes_avx2(uint64_t bits, const packed_t<KIND>* v, int64_t& k, const packed_t<KIND>* end,
                               const float* xw, int64_t ldx, __m256 (&acc)[A][NB], const ShuffleTables& t) {
  constexpr int s = kTableShift<KIND>;
  constexpr uint64_t mask = uint64_t(0xFF) << s;
  for (int q = 0; q < Q; ++q) {
    const uint64_t c = rotr64(bits, (8 * q - s + 64) & 63) & mask;  // mask byte q (columns 8q..8q+7) << s
    __m256 e = expand8<KIND, CHECKED>(v + k, end, c, t);
    k += __builtin_popcountll(c);
    for (int b = 0; b < NB; ++b)
      acc[q % A][b] = _mm256_fmadd_ps(e, _mm256_loadu_ps(xw + b * ldx + 8 * q), acc[q % A][b]);
  }
}

// One bitmap row against a tile of NB batch rows, four words per step (a quarter of the
// loop, prefetch and skip-test overhead; four empty words are skipped at once). A =
// accumulators per batch row, so that FMA latency is hidden at small batches.
// The streams are prefetched 1.5 KiB ahead into L2 (T1), not L1: this loop is bound by
// its loads (3 per byte: values, table entry, x; on Zen 3 taking the table load out
// alone made it 0.85x), and lines pulled into L1 early compete with x and the table.
// scripts/kernel_ab.py against the T0, 4 KiB prefetch of the other paths, each order
// (4096x4096 and 11008x4096 bf16 at batch 1, 4096x4096 fp16 at batch 4): 1-1.5% less
// time; 0.75, 1.5 and 3 KiB ahead time the same.
template <int NB, int KIND, bool CHECKED>
DSF_AVX2 void row_avx2(const uint32_t* row, const packed_t<KIND>* v, const packed_t<KIND>* end, float scale,
                       const float* x, int64_t ldx, float* y, int64_t ldy, int64_t words, const ShuffleTables& t) {
  constexpr int A = NB == 1 ? 4 : NB == 2 ? 2 : 1;
  __m256 acc[A][NB];
  for (int a = 0; a < A; ++a)
    for (int b = 0; b < NB; ++b) acc[a][b] = _mm256_setzero_ps();
  // One register for the row's value base, so that loads address it as base + 2k
  // (otherwise the compiler keeps values and offsets[r] apart and adds them per byte).
  asm("" : "+r"(v));
  int64_t w = 0, k = 0;
  for (; w + 4 <= words; w += 4) {
    prefetch_ahead<_MM_HINT_T1, 1536>(v + k, row + w);
    uint64_t p0, p1;
    std::memcpy(&p0, row + w, 8);
    std::memcpy(&p1, row + w + 2, 8);
    if (!(p0 | p1)) continue;
    bytes_avx2<8, NB, KIND, CHECKED, A>(p0, v, k, end, x + w * 32, ldx, acc, t);
    bytes_avx2<8, NB, KIND, CHECKED, A>(p1, v, k, end, x + w * 32 + 64, ldx, acc, t);
  }
  for (; w < words; ++w)  // the last 0-3 words
    if (row[w]) bytes_avx2<4, NB, KIND, CHECKED, A>(row[w], v, k, end, x + w * 32, ldx, acc, t);
  for (int b = 0; b < NB; ++b) {
    __m256 sum = acc[0][b];
    for (int a = 1; a < A; ++a) sum = _mm256_add_ps(sum, acc[a][b]);
    y[b * ldy] = KIND == kInt8 ? scale * kInt8Unit * hsum256(sum) : hsum256(sum);
  }
}

// Rows r0..r1 for one tile; rows whose 8-value reads could pass the array's end take
// the checked variant (only the last few rows of a matrix).
template <int NB, int KIND>
DSF_AVX2 void rows_avx2(const int32_t* bitmap, const int32_t* offsets, const void* values_raw, const float* scales,
                        const float* x, int64_t ldx, float* y, int64_t ldy, int64_t r0, int64_t r1, int64_t words,
                        int64_t nvalues, const ShuffleTables& t) {
  const packed_t<KIND>* values = static_cast<const packed_t<KIND>*>(values_raw);
  const packed_t<KIND>* end = values + nvalues;
  for (int64_t r = r0; r < r1; ++r) {
    const uint32_t* row = reinterpret_cast<const uint32_t*>(bitmap) + r * words;
    float scale = KIND == kInt8 ? scales[r] : 1.f;
    if (int64_t(offsets[r + 1]) + 8 <= nvalues)
      row_avx2<NB, KIND, false>(row, values + offsets[r], end, scale, x, ldx, y + r, ldy, words, t);
    else
      row_avx2<NB, KIND, true>(row, values + offsets[r], end, scale, x, ldx, y + r, ldy, words, t);
  }
}

template <int KIND>
DSF_AVX2 void tile_avx2_t(int nb, const int32_t* bitmap, const int32_t* offsets, const void* values,
                          const float* scales, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t r0,
                          int64_t r1, int64_t words, int64_t nvalues) {
  const ShuffleTables& t = shuffle_tables();
  switch (nb) {
    case 1: rows_avx2<1, KIND>(bitmap, offsets, values, scales, x, ldx, y, ldy, r0, r1, words, nvalues, t); break;
    case 2: rows_avx2<2, KIND>(bitmap, offsets, values, scales, x, ldx, y, ldy, r0, r1, words, nvalues, t); break;
    case 3: rows_avx2<3, KIND>(bitmap, offsets, values, scales, x, ldx, y, ldy, r0, r1, words, nvalues, t); break;
    case 4: rows_avx2<4, KIND>(bitmap, offsets, values, scales, x, ldx, y, ldy, r0, r1, words, nvalues, t); break;
    default: rows_avx2<8, KIND>(bitmap, offsets, values, scales, x, ldx, y, ldy, r0, r1, words, nvalues, t); break;
  }
}

// acc += a * x^T's row at xa (NV vectors of 8 batch columns).
template <int NV>
DSF_AVX2 inline void fma_x_row(__m256 a, const float* xa, __m256 (&acc)[NV]) {
  for (int j = 0; j < NV; ++j) acc[j] = _mm256_fmadd_ps(a, _mm256_loadu_ps(xa + 8 * j), acc[j]);
}

// 8 packed values as fp32 (int8: times the row's ``scale``).
template <int KIND>
DSF_AVX2 inline __m256 widen8(__m128i h, float scale) {
  return KIND == kBf16   ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
         : KIND == kInt8 ? _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(h)), _mm256_set1_ps(scale))
                         : _mm256_cvtph_ps(h);
}

// Rows ahead of the current one whose block of bitmap and values the nonzero path
// prefetches (see rows_nz_avx2).
constexpr int64_t kNzPrefetchRows = 2;
// Bytes of x^T per column block of the AVX2 nonzero path: an L1's worth. Each nonzero
// reads a 32-128 byte row of x^T at a random column of the block, so a block in L1 saves
// an L2 transfer per nonzero; with the prefetch above, smaller blocks cost little.
// scripts/kernel_ab.py --path nz: 32 KiB blocks take 0.76-0.91x the time of 256 KiB ones
// (LLaMA-7B shapes, batches 8-32); 16 and 64 KiB blocks 1.09x and 1.11x that of 32 KiB.
constexpr int64_t kNzBlockBytes = int64_t(32) << 10;

// Larger batches on AVX2: as rows_nz, work proportional to the nonzeros. Per row and
// column block, the set bits' columns are decoded a byte at a time from the position
// table (as 16-bit offsets from the block's first column); then each nonzero's value
// (widened 8 at a time, straight from the packed array) is broadcast and FMA'd into NV
// vectors of x^T[column] ([in][batch] layout, batch padded to a multiple of 8), eight
// nonzeros per step. Columns run in blocks of words [w0, w1) so that the block of x^T
// stays in L1 (see kNzBlockBytes); ``cursor[r - r0]`` is row r's value index at w0 and
// advances past the block; the first block stores y^T, later ones add to it. A row's
// share of a block is a short run of bitmap and values at its own place in memory, so
// the runs of the row kNzPrefetchRows ahead are prefetched (the hardware prefetcher
// starts too late on runs this short). ``idx`` holds a row block's columns.
// Batches run in chunks of up to 64 rows (NV up to 8): with 32-row chunks a batch of 64
// decoded and streamed the factor twice; scripts/kernel_ab.py --path nz, both orders:
// batch 64 0.80-0.93x the time (576x576, 1536x576, 4096x4096), batch 33 0.77-0.80x
// (4096x11008). noinline: with the larger instances inlined into one dispatcher the
// NV = 3 instance ran 6% slower.
template <int NV, int KIND>
__attribute__((noinline)) DSF_AVX2 void rows_nz_avx2(const int32_t* bitmap, const void* values_raw,
                                                     const float* scales, const float* xt, int64_t ldb, float* yt,
                                                     int64_t r0, int64_t r1, int64_t words, int64_t w0, int64_t w1,
                                                     int64_t* cursor, uint16_t* idx) {
  const ShuffleTables& t = shuffle_tables();
  const packed_t<KIND>* values = static_cast<const packed_t<KIND>*>(values_raw);
  const float* xtb = xt + w0 * 32 * ldb;  // x^T's first row of the block
  int64_t last_nnz = (w1 - w0) * 8;       // the previous row's nonzeros in the block (a guess at first)
  for (int64_t r = r0; r < r1; ++r) {
    const uint32_t* row = reinterpret_cast<const uint32_t*>(bitmap) + r * words;
    const packed_t<KIND>* v = values + cursor[r - r0];
    if (r + kNzPrefetchRows < r1) {
      const char* pv = reinterpret_cast<const char*>(values + cursor[r + kNzPrefetchRows - r0]);
      for (int64_t o = 0; o < int64_t(sizeof(packed_t<KIND>)) * (last_nnz + 64); o += 64)
        _mm_prefetch(pv + o, _MM_HINT_T0);
      const char* pb = reinterpret_cast<const char*>(row + kNzPrefetchRows * words + w0);
      for (int64_t o = 0; o < (w1 - w0) * 4; o += 64) _mm_prefetch(pb + o, _MM_HINT_T0);
    }
    int64_t n = 0;
    __m128i first = _mm_setzero_si128();  // the current byte's first column, from the block's
    for (int64_t w = w0; w < w1; ++w) {
      uint32_t bits = row[w];
      for (int q = 0; q < 4; ++q) {
        unsigned m = (bits >> (8 * q)) & 0xFFu;
        __m128i col = _mm_add_epi16(_mm_load_si128(reinterpret_cast<const __m128i*>(t.pos[m])), first);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(idx + n), col);
        n += __builtin_popcount(m);
        first = _mm_add_epi16(first, _mm_set1_epi16(8));
      }
    }
    const int64_t nnz = n;
    cursor[r - r0] += nnz;
    last_nnz = nnz;
    const float scale = KIND == kInt8 ? scales[r] : 1.f;
    __m256 acc[NV], acc2[NV];
    for (int j = 0; j < NV; ++j) acc[j] = acc2[j] = _mm256_setzero_ps();
    // past 4 vectors per x^T row one set of accumulators hides the FMA latency by itself,
    // and two would not fit the 16 registers: odd nonzeros then go to acc as well
#define DSF_FMA_ODD(a, xa) \
  do {                                                  \
    if constexpr (NV > 4) fma_x_row<NV>(a, xa, acc);    \
    else fma_x_row<NV>(a, xa, acc2);                    \
  } while (0)
    int64_t k = 0;
    for (; k + 8 <= nnz; k += 8) {
      // eight values per step, each broadcast by an in-lane shuffle rather than a load
      // (loads are the busier port here)
      const __m256 vals = widen8<KIND>(load8<false>(v + k, v + nnz), scale);
      const __m256 lo = _mm256_permute2f128_ps(vals, vals, 0x00), hi = _mm256_permute2f128_ps(vals, vals, 0x11);
      const uint16_t* c = idx + k;
      fma_x_row<NV>(_mm256_shuffle_ps(lo, lo, 0x00), xtb + int64_t(c[0]) * ldb, acc);
      DSF_FMA_ODD(_mm256_shuffle_ps(lo, lo, 0x55), xtb + int64_t(c[1]) * ldb);
      fma_x_row<NV>(_mm256_shuffle_ps(lo, lo, 0xAA), xtb + int64_t(c[2]) * ldb, acc);
      DSF_FMA_ODD(_mm256_shuffle_ps(lo, lo, 0xFF), xtb + int64_t(c[3]) * ldb);
      fma_x_row<NV>(_mm256_shuffle_ps(hi, hi, 0x00), xtb + int64_t(c[4]) * ldb, acc);
      DSF_FMA_ODD(_mm256_shuffle_ps(hi, hi, 0x55), xtb + int64_t(c[5]) * ldb);
      fma_x_row<NV>(_mm256_shuffle_ps(hi, hi, 0xAA), xtb + int64_t(c[6]) * ldb, acc);
      DSF_FMA_ODD(_mm256_shuffle_ps(hi, hi, 0xFF), xtb + int64_t(c[7]) * ldb);
    }
    if (k < nnz) {  // the last 1-7: widened into val (zeros past the row), two per step, then one
      float val[8];
      _mm256_storeu_ps(val, widen8<KIND>(load8<true>(v + k, v + nnz), scale));
      int64_t i = 0;
      for (; k + 2 <= nnz; k += 2, i += 2) {
        fma_x_row<NV>(_mm256_broadcast_ss(val + i), xtb + int64_t(idx[k]) * ldb, acc);
        DSF_FMA_ODD(_mm256_broadcast_ss(val + i + 1), xtb + int64_t(idx[k + 1]) * ldb);
      }
      if (k < nnz) fma_x_row<NV>(_mm256_broadcast_ss(val + i), xtb + int64_t(idx[k]) * ldb, acc);
    }
    float* out = yt + r * ldb;
    for (int j = 0; j < NV; ++j) {
      __m256 sum = NV > 4 ? acc[j] : _mm256_add_ps(acc[j], acc2[j]);
      _mm256_storeu_ps(out + 8 * j, w0 == 0 ? sum : _mm256_add_ps(_mm256_loadu_ps(out + 8 * j), sum));
    }
  }
}

#undef DSF_FMA_ODD

template <int KIND>
DSF_AVX2 void tile_nz_avx2(int64_t ldb, const int32_t* bitmap, const void* values, const float* scales,
                           const float* xt, float* yt, int64_t r0, int64_t r1, int64_t words, int64_t w0, int64_t w1,
                           int64_t* cursor, uint16_t* idx) {
  switch (ldb / 8) {
    case 1: rows_nz_avx2<1, KIND>(bitmap, values, scales, xt, ldb, yt, r0, r1, words, w0, w1, cursor, idx); break;
    case 2: rows_nz_avx2<2, KIND>(bitmap, values, scales, xt, ldb, yt, r0, r1, words, w0, w1, cursor, idx); break;
    case 3: rows_nz_avx2<3, KIND>(bitmap, values, scales, xt, ldb, yt, r0, r1, words, w0, w1, cursor, idx); break;
    case 4: rows_nz_avx2<4, KIND>(bitmap, values, scales, xt, ldb, yt, r0, r1, words, w0, w1, cursor, idx); break;
    case 5: rows_nz_avx2<5, KIND>(bitmap, values, scales, xt, ldb, yt, r0, r1, words, w0, w1, cursor, idx); break;
    case 6: rows_nz_avx2<6, KIND>(bitmap, values, scales, xt, ldb, yt, r0, r1, words, w0, w1, cursor, idx); break;
    case 7: rows_nz_avx2<7, KIND>(bitmap, values, scales, xt, ldb, yt, r0, r1, words, w0, w1, cursor, idx); break;
    default: rows_nz_avx2<8, KIND>(bitmap, values, scales, xt, ldb, yt, r0, r1, words, w0, w1, cursor, idx); break;
  }
}

// Column-index path (AVX2, small batches, sparse factors). The word path's cost is per
// 8-column mask byte whatever the byte holds, ~2.3 cycles on Zen 3 (instruction-bound:
// rotate, mask, popcount, add, table load, vpshufb, vcvtph2ps, FMA), so a factor at 16%
// density pays ~1.8 cycles per nonzero. With each nonzero's column decoded once at load
// (16-bit, see dsf_bitmap_columns), a nonzero costs two loads and an insert instead: x
// is gathered 8 columns at a time by scalar loads and vinsertps (vgatherdps runs at ~12
// cycles per 8 lanes on Zen 3, 1.6x the time of this), the row's values are widened 8 at
// a time and FMA'd. ~1 cycle per nonzero: faster than the word path below ~25% density,
// at the cost of 2 more bytes per nonzero read from memory.
DSF_AVX2 inline __m256 gather8(const float* x, const uint16_t* c) {
  __m128 lo = _mm_load_ss(x + c[0]), hi = _mm_load_ss(x + c[4]);
  lo = _mm_insert_ps(lo, _mm_load_ss(x + c[1]), 0x10);
  hi = _mm_insert_ps(hi, _mm_load_ss(x + c[5]), 0x10);
  lo = _mm_insert_ps(lo, _mm_load_ss(x + c[2]), 0x20);
  hi = _mm_insert_ps(hi, _mm_load_ss(x + c[6]), 0x20);
  lo = _mm_insert_ps(lo, _mm_load_ss(x + c[3]), 0x30);
  hi = _mm_insert_ps(hi, _mm_load_ss(x + c[7]), 0x30);
  return _mm256_insertf128_ps(_mm256_castps128_ps256(lo), hi, 1);
}

// Rows r0..r1 against NB batch rows of x ([batch][ldx]): y[b * ldy + r].
template <int NB, int KIND>
DSF_AVX2 void rows_cols_avx2(const int32_t* offsets, const uint16_t* columns, const void* values_raw,
                             const float* scales, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t r0,
                             int64_t r1) {
  const packed_t<KIND>* values = static_cast<const packed_t<KIND>*>(values_raw);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t o0 = offsets[r], n = int64_t(offsets[r + 1]) - o0;
    const uint16_t* c = columns + o0;
    const packed_t<KIND>* v = values + o0;
    __m256 acc[NB][2];
    for (int b = 0; b < NB; ++b) acc[b][0] = acc[b][1] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
      __m256 v0 = widen8<KIND>(load8<false>(v + i, v), 1.f), v1 = widen8<KIND>(load8<false>(v + i + 8, v), 1.f);
      for (int b = 0; b < NB; ++b) {
        acc[b][0] = _mm256_fmadd_ps(v0, gather8(x + b * ldx, c + i), acc[b][0]);
        acc[b][1] = _mm256_fmadd_ps(v1, gather8(x + b * ldx, c + i + 8), acc[b][1]);
      }
    }
    if (i + 8 <= n) {
      __m256 v0 = widen8<KIND>(load8<false>(v + i, v), 1.f);
      for (int b = 0; b < NB; ++b) acc[b][0] = _mm256_fmadd_ps(v0, gather8(x + b * ldx, c + i), acc[b][0]);
      i += 8;
    }
    const float scale = KIND == kInt8 ? scales[r] : 1.f;
    for (int b = 0; b < NB; ++b) {
      float s = hsum256(_mm256_add_ps(acc[b][0], acc[b][1]));
      for (int64_t j = i; j < n; ++j) s += value_at(v, j, KIND) * x[b * ldx + c[j]];  // the last 0-7
      y[b * ldy + r] = scale * s;
    }
  }
}

template <int KIND>
DSF_AVX2 void tile_cols_avx2_t(int nb, const int32_t* offsets, const uint16_t* columns, const void* values,
                               const float* scales, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t r0,
                               int64_t r1) {
  switch (nb) {
    case 1: rows_cols_avx2<1, KIND>(offsets, columns, values, scales, x, ldx, y, ldy, r0, r1); break;
    case 2: rows_cols_avx2<2, KIND>(offsets, columns, values, scales, x, ldx, y, ldy, r0, r1); break;
    case 3: rows_cols_avx2<3, KIND>(offsets, columns, values, scales, x, ldx, y, ldy, r0, r1); break;
    default: rows_cols_avx2<4, KIND>(offsets, columns, values, scales, x, ldx, y, ldy, r0, r1); break;
  }
}
#endif

#ifdef DSF_X86
// The word paths' schedule: rows in blocks of 64 handed to OpenMP threads as they come
// free (dynamic: on a shared machine one core can run slower than the other for a
// whole call, and a static half would leave the other waiting); within a block the
// batch runs as tiles of 16 or 8 (as ``max_nb`` allows), 12 (where the path has that tile),
// 4, or the 1-3 rows left: tile(nb, first batch row, r0, r1).
template <class Tile>
void over_row_blocks(int64_t rows, int64_t batch, int max_nb, bool tile12, Tile tile) {
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t blk = 0; blk < (rows + 63) / 64; ++blk) {
    int64_t r0 = blk * 64, r1 = r0 + 64 < rows ? r0 + 64 : rows;
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

}  // namespace

extern "C" {

// 1 when the AVX-512 path can run on this CPU.
int dsf_has_avx512(void) {
#ifdef DSF_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vbmi2");
#else
  return 0;
#endif
}

int dsf_has_avx512_bf16(void);

// AVX-512 path, any batch. x: [batch][ldx] fp32 with ldx >= 32 * words (zero padded),
// y: [batch][ldy] fp32, ``nvalues`` values. ``mode``: bit 0 set for bf16 values (else
// fp16); bit 1 for the 256-bit variant (bf16 values and AVX512_BF16 only), which splits x
// into bf16 parts and runs tiles of 4, 3, 2, 1; else tiles of 16, 12, 8, 4, 3, 2, 1.
// Returns 0, or -1 without AVX-512 (or AVX512_BF16 for the variant) or for a bad mode.
int dsf_bitmap_spmm_avx512(const int32_t* bitmap, const int32_t* offsets, const uint16_t* values, int64_t nvalues,
                           const float* x, int64_t ldx, float* y, int64_t ldy, int64_t rows, int64_t words,
                           int64_t batch, int mode) {
#ifdef DSF_X86
  if (!dsf_has_avx512() || batch < 1 || mode < 0 || mode > 3 || ldx < 32 * words) return -1;
  const uint16_t* end = values + nvalues;
  if (mode & 2) {
    if (!(mode & 1) || !dsf_has_avx512_bf16()) return -1;
    static thread_local std::vector<uint16_t> xs;  // the calling thread's split x, reused
    const int64_t ldxs = 64 * words;
    xs.resize(size_t(batch * ldxs));
    split_x(x, ldx, batch, words, xs.data());
    const uint16_t* xsp = xs.data();
    over_row_blocks(rows, batch, 4, false, [&](int nb, int64_t b0, int64_t r0, int64_t r1) {
      tile_256<2>(nb, bitmap, offsets, values, xsp + b0 * ldxs, ldxs, y + b0 * ldy, ldy, r0, r1, words, end);
    });
    return 0;
  }
  over_row_blocks(rows, batch, 16, true, [&](int nb, int64_t b0, int64_t r0, int64_t r1) {
    tile_avx512(nb, bitmap, offsets, values, x + b0 * ldx, ldx, y + b0 * ldy, ldy, r0, r1, words, mode & 1, end);
  });
  return 0;
#else
  return -1;
#endif
}

// 1 when the bf16 dot-product paths can run (AVX-512 path plus AVX512_BF16, and VL for
// the 256-bit variants: every CPU with AVX512_BF16 has it).
int dsf_has_avx512_bf16(void) {
#ifdef DSF_X86
  return dsf_has_avx512() && __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vl");
#else
  return 0;
#endif
}

// bf16 values x bf16 activations, fp32 accumulation and output. x: [batch][ldx] bf16
// with ldx >= 32 * words (zero padded), y: [batch][ldy] fp32. Tiles of 16, 8, 4, 3, 2, 1,
// or with ``ymm`` the 256-bit variant's of 4, 3, 2, 1. Returns 0, or -1 where the CPU
// lacks AVX512_BF16.
int dsf_bitmap_spmm_bf16dot(const int32_t* bitmap, const int32_t* offsets, const uint16_t* values, int64_t nvalues,
                            const uint16_t* x, int64_t ldx, float* y, int64_t ldy, int64_t rows, int64_t words,
                            int64_t batch, int ymm) {
#ifdef DSF_X86
  if (!dsf_has_avx512_bf16() || batch < 1 || ldx < 32 * words) return -1;
  const uint16_t* end = values + nvalues;
  over_row_blocks(rows, batch, ymm ? 4 : 16, false, [&](int nb, int64_t b0, int64_t r0, int64_t r1) {
    if (ymm)
      tile_256<1>(nb, bitmap, offsets, values, x + b0 * ldx, ldx, y + b0 * ldy, ldy, r0, r1, words, end);
    else
      tile_bf16dot(nb, bitmap, offsets, values, x + b0 * ldx, ldx, y + b0 * ldy, ldy, r0, r1, words, end);
  });
  return 0;
#else
  return -1;
#endif
}

// AVX-512 nonzero path (batches from NZ_MIN_BATCH on), any batch: x [batch][ldx] fp32
// (columns 0..cols-1 read), y [batch][ldy]; chunks of up to 64 batch rows. Returns 0, or
// -1 without AVX-512 or for bad sizes.
int dsf_bitmap_spmm_nz(const int32_t* bitmap, const int32_t* offsets, const uint16_t* values, const float* x,
                       int64_t ldx, float* y, int64_t ldy, int64_t rows, int64_t cols, int64_t words, int64_t batch,
                       int is_bf16) {
#ifdef DSF_X86
  if (!dsf_has_avx512() || batch < 1 || cols < 0 || cols > 32 * words || ldx < cols || ldy < rows) return -1;
  over_batch_chunks(x, ldx, y, ldy, rows, cols, words, batch, 16, 64, [&](const float* xt, int64_t ldb, float* yt) {
    over_row_blocks_nz(rows, words, [&](int64_t r0, int64_t r1, int32_t* idx, float* val) {
      switch (ldb / 16) {
        case 1: rows_nz<1>(bitmap, offsets, values, xt, ldb, yt, r0, r1, words, is_bf16, idx, val); break;
        case 2: rows_nz<2>(bitmap, offsets, values, xt, ldb, yt, r0, r1, words, is_bf16, idx, val); break;
        case 3: rows_nz<3>(bitmap, offsets, values, xt, ldb, yt, r0, r1, words, is_bf16, idx, val); break;
        default: rows_nz<4>(bitmap, offsets, values, xt, ldb, yt, r0, r1, words, is_bf16, idx, val); break;
      }
    });
  });
  return 0;
#else
  return -1;
#endif
}

int dsf_bitmap_spmm_avx2(const int32_t* bitmap, const int32_t* offsets, const void* values, const float* scales,
                         int64_t nvalues, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t rows,
                         int64_t words, int64_t batch, int kind);

int dsf_bitmap_spmm_nz_avx2(const int32_t* bitmap, const int32_t* offsets, const void* values, const float* scales,
                            const float* x, int64_t ldx, float* y, int64_t ldy, int64_t rows, int64_t cols,
                            int64_t words, int64_t batch, int kind);

// Times the paths' variants on this CPU, so that the backend runs the faster ones: which
// is faster differs between microarchitectures (Intel cores run 512-bit vpexpandw at full
// width, AMD Zen 4 double-pumps it) and no flag tells. A synthetic 2048 x 4096 factor 30%
// dense (3.5 MiB, past L2, as real layers are; on a 1024 x 2048 one Zen 4's 256-bit
// variant and AVX2 path came within noise of each other, at 0.73x here and streamed from
// memory); each variant is called in turn, 9 rounds, and its best time kept (~0.1 s).
// ns[i] gets that time of one call in ns, or -1 where the CPU lacks the variant's
// instructions. Word paths at batch 1 with fp32 x (bf16 x for 5 and 6):
// 0 AVX-512 bf16 values, 1 its 256-bit variant, 2 AVX2 bf16 values, 3 AVX-512 fp16 values,
// 4 AVX2 fp16 values, 5 the bf16-model path, 6 its 256-bit variant; nonzero paths at batch
// 16, bf16 values: 7 AVX-512, 8 AVX2. Returns 0, or -1 when n < 9.
int dsf_plan_paths(double* ns, int n) {
  constexpr int kCandidates = 9;
  if (n < kCandidates) return -1;
  const int64_t rows = 2048, words = 128;
  std::vector<int32_t> bitmap(size_t(rows * words)), offsets(size_t(rows + 1), 0);
  uint64_t state = 0x9E3779B97F4A7C15ull;
  for (int64_t r = 0; r < rows; ++r) {
    int64_t count = 0;
    for (int64_t w = 0; w < words; ++w) {
      uint32_t bits = 0;
      for (int i = 0; i < 32; ++i) {
        state = state * 6364136223846793005ull + 1442695040888963407ull;
        if ((state >> 33) % 10 < 3) bits |= 1u << i;
      }
      bitmap[size_t(r * words + w)] = int32_t(bits);
      count += __builtin_popcount(bits);
    }
    offsets[size_t(r + 1)] = int32_t(offsets[size_t(r)] + count);
  }
  const int64_t nnz = offsets[size_t(rows)];
  std::vector<uint16_t> bf16(size_t(nnz), 0x3F00), fp16(size_t(nnz), 0x3800);  // 0.5 in each
  std::vector<float> x(size_t(32 * words), 0.25f), y(static_cast<size_t>(rows), 0.f);
  std::vector<uint16_t> xb(size_t(32 * words), 0x3E80);  // 0.25 in bf16
  std::vector<float> x16(size_t(16 * 32 * words), 0.25f), y16(static_cast<size_t>(16 * rows), 0.f);
  const int32_t *bm = bitmap.data(), *of = offsets.data();
  auto run = [&](int i) -> int {
    switch (i) {
      case 0: return dsf_bitmap_spmm_avx512(bm, of, bf16.data(), nnz, x.data(), 32 * words, y.data(), rows, rows, words, 1, 1);
      case 1: return dsf_bitmap_spmm_avx512(bm, of, bf16.data(), nnz, x.data(), 32 * words, y.data(), rows, rows, words, 1, 3);
      case 2: return dsf_bitmap_spmm_avx2(bm, of, bf16.data(), nullptr, nnz, x.data(), 32 * words, y.data(), rows, rows, words, 1, kBf16);
      case 3: return dsf_bitmap_spmm_avx512(bm, of, fp16.data(), nnz, x.data(), 32 * words, y.data(), rows, rows, words, 1, 0);
      case 4: return dsf_bitmap_spmm_avx2(bm, of, fp16.data(), nullptr, nnz, x.data(), 32 * words, y.data(), rows, rows, words, 1, kFp16);
      case 5: return dsf_bitmap_spmm_bf16dot(bm, of, bf16.data(), nnz, xb.data(), 32 * words, y.data(), rows, rows, words, 1, 0);
      case 6: return dsf_bitmap_spmm_bf16dot(bm, of, bf16.data(), nnz, xb.data(), 32 * words, y.data(), rows, rows, words, 1, 1);
      case 7: return dsf_bitmap_spmm_nz(bm, of, bf16.data(), x16.data(), 32 * words, y16.data(), rows, rows, 32 * words, words, 16, 1);
      default: return dsf_bitmap_spmm_nz_avx2(bm, of, bf16.data(), nullptr, x16.data(), 32 * words, y16.data(), rows, rows, 32 * words, words, 16, kBf16);
    }
  };
  for (int i = 0; i < kCandidates; ++i) ns[i] = run(i) == 0 ? 1e300 : -1.0;  // also the warm-up call
  for (int round = 0; round < 9; ++round)
    for (int i = 0; i < kCandidates; ++i) {
      if (ns[i] < 0) continue;
      auto t0 = std::chrono::steady_clock::now();
      run(i);
      double t = std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - t0).count();
      ns[i] = std::min(ns[i], t);
    }
  return 0;
}

// 1 when the AVX2 paths can run on this CPU (AVX2, FMA, F16C and BMI2: every x86-64 CPU
// with AVX2 since Haswell and Zen).
int dsf_has_avx2(void) {
#ifdef DSF_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
         __builtin_cpu_supports("bmi2");
#else
  return 0;
#endif
}

// AVX2 word path, any batch; arguments as dsf_bitmap_spmm_avx512 (tiles of 8, 4, 3, 2, 1),
// plus the value ``kind`` (0 fp16, 1 bf16, 2 int8 with per-row ``scales``).
int dsf_bitmap_spmm_avx2(const int32_t* bitmap, const int32_t* offsets, const void* values, const float* scales,
                         int64_t nvalues, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t rows,
                         int64_t words, int64_t batch, int kind) {
#ifdef DSF_X86
  if (!dsf_has_avx2() || batch < 1 || kind < kFp16 || kind > kInt8) return -1;
  auto tile = kind == kInt8 ? tile_avx2_t<kInt8> : kind == kBf16 ? tile_avx2_t<kBf16> : tile_avx2_t<kFp16>;
  over_row_blocks(rows, batch, 8, false, [&](int nb, int64_t b0, int64_t r0, int64_t r1) {
    tile(nb, bitmap, offsets, values, scales, x + b0 * ldx, ldx, y + b0 * ldy, ldy, r0, r1, words, nvalues);
  });
  return 0;
#else
  return -1;
#endif
}

// AVX2 nonzero path: as dsf_bitmap_spmm_nz (chunks of up to 32 batch rows), with the
// value ``kind`` and ``scales`` of dsf_bitmap_spmm_avx2.
int dsf_bitmap_spmm_nz_avx2(const int32_t* bitmap, const int32_t* offsets, const void* values, const float* scales,
                            const float* x, int64_t ldx, float* y, int64_t ldy, int64_t rows, int64_t cols,
                            int64_t words, int64_t batch, int kind) {
#ifdef DSF_X86
  if (!dsf_has_avx2() || batch < 1 || cols < 0 || cols > 32 * words || ldx < cols || ldy < rows || kind < kFp16 ||
      kind > kInt8)
    return -1;
  auto tile = kind == kInt8 ? tile_nz_avx2<kInt8> : kind == kBf16 ? tile_nz_avx2<kBf16> : tile_nz_avx2<kFp16>;
  over_batch_chunks(x, ldx, y, ldy, rows, cols, words, batch, 8, 64, [&](const float* xt, int64_t ldb, float* yt) {
    // words per column block: x^T's block at most kNzBlockBytes (4 words at 64 batch
    // rows), all words if less (at most 32 words, 1024 columns: the decoded 16-bit columns
    // cannot overflow). With 8 words at 64 rows (a 64 KiB block) 1536x576 ran 1.2x slower.
    const int64_t block_words = std::max<int64_t>(1, kNzBlockBytes / (32 * ldb * int64_t(sizeof(float))));
#pragma omp parallel
    {
      // each thread takes a contiguous run of 64-row blocks and walks the column blocks over all of it
      const int64_t nthreads = omp_get_num_threads(), tid = omp_get_thread_num();
      const int64_t row_blocks = (rows + 63) / 64, per = (row_blocks + nthreads - 1) / nthreads;
      const int64_t r0 = std::min(rows, tid * per * 64), r1 = std::min(rows, (tid + 1) * per * 64);
      if (r0 < r1) {
        std::vector<uint16_t> idx(size_t(std::min(words, block_words) * 32 + 16));
        std::vector<int64_t> cursor(offsets + r0, offsets + r1);
        for (int64_t w0 = 0; w0 < words; w0 += block_words)
          tile(ldb, bitmap, values, scales, xt, yt, r0, r1, words, w0, std::min(words, w0 + block_words),
               cursor.data(), idx.data());
        if (words == 0)  // no columns: y^T is zero
          for (int64_t r = r0; r < r1; ++r) std::memset(yt + r * ldb, 0, size_t(ldb) * sizeof(float));
      }
    }
  });
  return 0;
#else
  return -1;
#endif
}

// Column-index path (AVX2): y = S x for a batch of 1..n rows of x ([batch][ldx], ldx >=
// cols), ``columns`` the 16-bit column of every nonzero (from dsf_bitmap_columns, so each
// is below cols), values and scales as dsf_bitmap_spmm_avx2. Tiles of up to 4 batch rows.
int dsf_bitmap_spmm_cols_avx2(const int32_t* offsets, const uint16_t* columns, const void* values,
                              const float* scales, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t rows,
                              int64_t cols, int64_t batch, int kind) {
#ifdef DSF_X86
  if (!dsf_has_avx2() || batch < 1 || cols < 0 || ldx < cols || ldy < rows || kind < kFp16 || kind > kInt8) return -1;
  auto tile = kind == kInt8 ? tile_cols_avx2_t<kInt8> : kind == kBf16 ? tile_cols_avx2_t<kBf16> : tile_cols_avx2_t<kFp16>;
  over_row_blocks(rows, batch, 4, false, [&](int nb, int64_t b0, int64_t r0, int64_t r1) {
    tile(nb, offsets, columns, values, scales, x + b0 * ldx, ldx, y + b0 * ldy, ldy, r0, r1);
  });
  return 0;
#else
  return -1;
#endif
}

// Set bits of one bitmap row; the popcnt instruction where the CPU has it (an ifunc).
#ifdef DSF_X86
__attribute__((target_clones("popcnt", "default")))
#endif
int64_t dsf_row_popcount(const uint32_t* row, int64_t words) {
  int64_t count = 0;
  for (int64_t w = 0; w < words; ++w) count += __builtin_popcount(row[w]);
  return count;
}

// The column of every set bit of a bitmap factor, row by row, as 16-bit indices (the
// column-index path's operand, built once at load). Returns 0, or -1 when a row's set
// bits do not match its offsets, a bit lies at or past ``cols``, or cols > 65536 (so a
// factor that slipped past validation can never make the kernel read outside x).
int dsf_bitmap_columns(const int32_t* bitmap, const int32_t* offsets, int64_t rows, int64_t words, int64_t cols,
                       int64_t nnz, uint16_t* columns) {
  if (cols < 0 || cols > 65536 || words * 32 < cols || rows < 0 || offsets[0] != 0 || int64_t(offsets[rows]) != nnz)
    return -1;
  int bad = 0;
#pragma omp parallel for schedule(static) reduction(| : bad)
  for (int64_t r = 0; r < rows; ++r) {
    const uint32_t* row = reinterpret_cast<const uint32_t*>(bitmap) + r * words;
    const int64_t o0 = offsets[r], o1 = offsets[r + 1];
    if (o0 < 0 || o1 < o0 || o1 > nnz || dsf_row_popcount(row, words) != o1 - o0) {
      bad = 1;
      continue;
    }
    int64_t k = o0;
    for (int64_t w = 0; w < words; ++w)
      for (uint32_t bits = row[w]; bits; bits &= bits - 1) {
        const int64_t c = 32 * w + __builtin_ctz(bits);
        if (c >= cols) bad = 1;
        columns[k++] = uint16_t(c < cols ? c : 0);
      }
  }
  return bad ? -1 : 0;
}

// Structural check of a bitmap factor in one pass (load-time validation): row offsets
// start at 0, end at nnz and never decrease, every row's popcount equals its offset
// difference, and no bit is set past the last column. Returns 0 when all hold, else
// 4 * row + code for the first bad row (code 1: offsets out of order, 2: popcount
// mismatch, 3: bits past the last column) or -1 for the first/last offset.
int64_t dsf_bitmap_check(const int32_t* bitmap, const int32_t* offsets, int64_t rows, int64_t words, int64_t cols,
                         int64_t nnz) {
  if (offsets[0] != 0 || int64_t(offsets[rows]) != nnz) return -1;
  const uint32_t tail = cols % 32 ? ~((1u << (cols % 32)) - 1u) : 0u;  // bits past the last column
  // Offsets out of order are reported first (anywhere), then the first row whose bits
  // are wrong, as the torch checks do.
  int64_t first_order = INT64_MAX, first_bits = INT64_MAX;
#pragma omp parallel for schedule(static) reduction(min : first_order, first_bits)
  for (int64_t r = 0; r < rows; ++r) {
    const uint32_t* row = reinterpret_cast<const uint32_t*>(bitmap) + r * words;
    if (offsets[r + 1] < offsets[r]) {
      if (4 * r + 1 < first_order) first_order = 4 * r + 1;
      continue;
    }
    int64_t code = words && (row[words - 1] & tail)                                       ? 3
                   : dsf_row_popcount(row, words) != int64_t(offsets[r + 1]) - offsets[r] ? 2
                                                                                          : 0;
    if (code && 4 * r + code < first_bits) first_bits = 4 * r + code;
  }
  return first_order != INT64_MAX ? first_order : first_bits != INT64_MAX ? first_bits : 0;
}

// Portable path, any batch, x and y as dsf_bitmap_spmm_nz (the whole batch in one
// x^T, unpadded). ``kind``: 0 fp16, 1 bf16, 2 int8 values with per-row ``scales``
// (unused otherwise).
int dsf_bitmap_spmm_portable(const int32_t* bitmap, const int32_t* offsets, const void* values, const float* scales,
                             const float* x, int64_t ldx, float* y, int64_t ldy, int64_t rows, int64_t cols,
                             int64_t words, int64_t batch, int kind) {
  if (batch < 1 || cols < 0 || cols > 32 * words || ldx < cols || ldy < rows || kind < kFp16 || kind > kInt8)
    return -1;
  over_batch_chunks(x, ldx, y, ldy, rows, cols, words, batch, 1, batch, [&](const float* xt, int64_t, float* yt) {
#pragma omp parallel for schedule(static)
    for (int64_t blk = 0; blk < (rows + 63) / 64; ++blk) {
      int64_t r0 = blk * 64, r1 = r0 + 64 < rows ? r0 + 64 : rows;
      rows_scalar(bitmap, offsets, values, scales, xt, yt, r0, r1, words, batch, kind);
    }
  });
  return 0;
}

}  // extern "C"
