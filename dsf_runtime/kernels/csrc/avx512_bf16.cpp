// The AVX512_BF16 paths (bf16 values): vdpbf16ps multiplies bf16 pairs exactly into
// fp32, so the values are never widened. For bf16 activations (a model run in bf16) per
// word the 32 expanded values dot the word's 32 bf16 activations; for fp32 activations
// the 256-bit variant carries x as two bf16 parts (see below).
#include "common.h"

#ifdef DSF_X86
namespace dsf {
namespace {

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

// The 256-bit variants (words_avx512_256, dot_avx512_256). On AMD Zen 4 a 512-bit
// vpexpandw, and each 512-bit op that crosses 256-bit halves (vpmovzxwd, vcvtph2ps from a
// ymm), costs about twice a 256-bit one, and avx512.cpp's 512-bit word path ran at 16.5 cycles per
// word against 8.2 for the AVX2 path (single thread, factor in L2). These expand each word
// as two 16-column halves into ymm registers (vpexpandw ymm: one per cycle there) and never
// widen the values: with AVX512_BF16, vdpbf16ps multiplies bf16 pairs exactly into fp32,
// and fp32 x is carried as two bf16 parts, x ~ hi + lo with hi = bf16(x), lo = bf16(x - hi)
// (16 significant bits: |x - hi - lo| <= 2^-16 |x|). 5.4 cycles per word in that test.

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

}  // namespace

bool has_avx512_bf16() {
  return has_avx512() && __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vl");
}

// The 256-bit word variant for fp32 x: x split into bf16 parts, tiles of 4, 3, 2, 1.
void words_avx512_256(const Factor& f, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t batch) {
  const uint16_t* values = static_cast<const uint16_t*>(f.values);
  const uint16_t* end = values + f.nvalues;
  static thread_local std::vector<uint16_t> xs;  // the calling thread's split x, reused
  const int64_t ldxs = 64 * f.words;
  xs.resize(size_t(batch * ldxs));
  split_x(x, ldx, batch, f.words, xs.data());
  const uint16_t* xsp = xs.data();
  over_row_blocks(f.rows, batch, 4, false, [&](int nb, int64_t b0, int64_t r0, int64_t r1) {
    tile_256<2>(nb, f.bitmap, f.offsets, values, xsp + b0 * ldxs, ldxs, y + b0 * ldy, ldy, r0, r1, f.words, end);
  });
}

// bf16 x: tiles of 16, 8, 4, 3, 2, 1.
void dot_avx512(const Factor& f, const uint16_t* x, int64_t ldx, float* y, int64_t ldy, int64_t batch) {
  const uint16_t* values = static_cast<const uint16_t*>(f.values);
  const uint16_t* end = values + f.nvalues;
  over_row_blocks(f.rows, batch, 16, false, [&](int nb, int64_t b0, int64_t r0, int64_t r1) {
    tile_bf16dot(nb, f.bitmap, f.offsets, values, x + b0 * ldx, ldx, y + b0 * ldy, ldy, r0, r1, f.words, end);
  });
}

// bf16 x, the 256-bit variant: tiles of 4, 3, 2, 1.
void dot_avx512_256(const Factor& f, const uint16_t* x, int64_t ldx, float* y, int64_t ldy, int64_t batch) {
  const uint16_t* values = static_cast<const uint16_t*>(f.values);
  const uint16_t* end = values + f.nvalues;
  over_row_blocks(f.rows, batch, 4, false, [&](int nb, int64_t b0, int64_t r0, int64_t r1) {
    tile_256<1>(nb, f.bitmap, f.offsets, values, x + b0 * ldx, ldx, y + b0 * ldy, ldy, r0, r1, f.words, end);
  });
}

}  // namespace dsf
#endif
