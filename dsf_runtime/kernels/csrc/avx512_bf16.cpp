// The AVX512_BF16 paths (bf16 values): vdpbf16ps multiplies bf16 pairs exactly into
// fp32, so the values are never widened. For bf16 activations (a model run in bf16) per
// word the 32 expanded values dot the word's 32 bf16 activations; for fp32 activations
// the 256-bit variant carries x as two bf16 parts (see below).
#include <cstdlib>
#include <memory>
#include <new>

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

// The pair path (bf16 values, batches from the plan's start, prefill). vdpbf16ps
// multiplies pairs: per 32-bit lane, one factor row's values at columns 2k and 2k + 1
// against the same two columns of x. So per factor row each column pair holding a
// nonzero costs one vdpbf16ps per 16 batch rows: its two values broadcast (zero for a
// column without one) against x's two columns for 16 batch rows, x laid out as
// xp [pair][batch][2] bf16, rounded to bf16 once per call. At DSF's densities (16-50%)
// 30-75% of the pairs hold a nonzero, so the work follows the nonzeros rather than the
// positions: a 4096 x 4096 DSF pair (both factors 25% dense) issues 0.875x the
// vdpbf16ps of dense bf16 W, where expanding both factors to dense tiles issues 2x.
//
// Each x operand is loaded for one vdpbf16ps, so where x comes from bounds the path: the
// factor runs in column blocks whose x (the slab) stays in L1 while a block of factor
// rows passes over it, with each row's partial sums kept between blocks. Per row and
// column block the bitmap words are first decoded (each word's 16 value pairs expanded
// into a scratch row, the indices of its nonempty pairs compressed into a list), once per
// pass over up to eight batch tiles, so the multiply loop runs without data-dependent
// branches.

#define DSF_PAIRS __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2,avx512bf16,bmi2,popcnt")))

constexpr int64_t kPairLanes = 16;         // batch rows per zmm of x pairs
constexpr int64_t kPairMaxTiles = 8;       // batch tiles per pass (128 rows)
constexpr int64_t kPairSlab = 16 << 10;    // bytes of x per column block (L1)
constexpr int64_t kPairRowBlock = 32;      // factor rows per column-block sweep

// x [nb][ldx] fp32 (32 * words columns readable) as bf16 pairs: xp [(16 w + k) * ldb + b]
// holds (x[b][32 w + 2k], x[b][32 w + 2k + 1]), rounded to nearest even; zero for
// nb <= b < ldb.
DSF_PAIRS void pack_pairs(const float* x, int64_t ldx, int64_t nb, int64_t words, int64_t ldb, uint32_t* xp) {
#pragma omp parallel for schedule(static)
  for (int64_t w = 0; w < words; ++w) {
    alignas(64) uint32_t tmp[16];
    uint32_t* out = xp + 16 * w * ldb;
    for (int64_t b = 0; b < ldb; ++b) {
      if (b < nb) {
        const float* xr = x + b * ldx + 32 * w;
        _mm512_store_si512(tmp, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(xr + 16), _mm512_loadu_ps(xr)));
      } else {
        std::memset(tmp, 0, sizeof(tmp));
      }
      for (int64_t k = 0; k < 16; ++k) out[k * ldb + b] = tmp[k];
    }
  }
}

// The next popcount(bits) packed values into the lanes of the set bits, with the
// register form of vpexpandw where 32 values are readable (the compiler would fold the
// load into the memory form, which on AMD Zen 4 took 1.8x the time of this decode loop).
DSF_PAIRS inline __m512i expand32(const uint16_t* src, const uint16_t* end, uint32_t bits) {
  if (src + 32 > end) return _mm512_maskz_expandloadu_epi16(bits, src);
  __m512i raw = _mm512_loadu_si512(src);
  __asm__("" : "+v"(raw));
  return _mm512_maskz_expand_epi16(bits, raw);
}

// ``nw`` bitmap words of one factor row from its packed values at v: each word's 16
// value pairs into val [16 w + k] (zero where a column has no value), the indices
// (16 w + k) of its nonempty pairs into idx. Returns their count; idx holds 16 * nw + 16.
DSF_PAIRS int64_t decode_pairs(const uint32_t* row, int64_t nw, const uint16_t*& next, const uint16_t* end,
                               uint32_t* val, int32_t* idx) {
  const uint16_t* v = next;  // a local: through the reference each word's stores would reload it
  __m512i pos = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i step = _mm512_set1_epi32(16);
  int64_t n = 0;
  for (int64_t w = 0; w < nw; ++w, pos = _mm512_add_epi32(pos, step)) {
    const uint32_t bits = row[w];
    const __mmask16 pm = __mmask16(_pext_u32(bits | (bits >> 1), 0x55555555u));
    _mm512_store_si512(val + 16 * w, expand32(v, end, bits));
    _mm512_storeu_si512(idx + n, _mm512_maskz_compress_epi32(pm, pos));
    n += __builtin_popcount(pm);
    v += __builtin_popcount(bits);
  }
  // The row's next block, decoded after the other rows of the sweep: its bitmap words
  // and about as many values as this block held. Read block by block, the rows are
  // dozens of interleaved streams, more than the hardware prefetcher follows.
  const char* vn = reinterpret_cast<const char*>(v);
  const int64_t ahead = std::min<int64_t>(vn - reinterpret_cast<const char*>(next), 512);
  for (int64_t b = 64; b <= ahead + 63; b += 64) _mm_prefetch(vn + b, _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(row + nw), _MM_HINT_T0);
  next = v;
  return n;
}

// Pair k's two values against its x for T batch tiles, into one accumulator set.
template <int T>
DSF_PAIRS inline void pair_step(int64_t k, const uint32_t* val, const char* xs, __m512* sums) {
  const __m512bh a = (__m512bh)_mm512_set1_epi32(int32_t(val[k]));
  const float* p = reinterpret_cast<const float*>(xs + k * (T * 64));
  for (int t = 0; t < T; ++t) sums[t] = _mm512_dpbf16_ps(sums[t], a, (__m512bh)_mm512_loadu_ps(p + 16 * t));
}

// One row's sums over n listed pairs for T batch tiles, added to part [T][16]; U pairs in
// flight with their own accumulators (vdpbf16ps's latency). xs: the block's x slab, pair
// k at xs + k * T * 64 bytes.
template <int T, int U>
DSF_PAIRS void pair_row(const int32_t* idx, int64_t n, const uint32_t* val, const char* xs, float* part) {
  __m512 acc[U][T];
  for (int t = 0; t < T; ++t) acc[0][t] = _mm512_load_ps(part + 16 * t);
  for (int u = 1; u < U; ++u)
    for (int t = 0; t < T; ++t) acc[u][t] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + U <= n; i += U)
    for (int u = 0; u < U; ++u) pair_step<T>(idx[i + u], val, xs, acc[u]);
  for (; i < n; ++i) pair_step<T>(idx[i], val, xs, acc[0]);
  for (int t = 0; t < T; ++t) {
    __m512 s = acc[0][t];
    for (int u = 1; u < U; ++u) s = _mm512_add_ps(s, acc[u][t]);
    _mm512_store_ps(part + 16 * t, s);
  }
}

// Rows r0..r1 (at most kPairRowBlock) of one pass with T batch tiles: column block by
// column block, each row's partial sums in part [row][T][16], then written into
// y [b][ldy] for the pass's nb batch rows.
template <int T, int U>
DSF_PAIRS void pair_rows(const Factor& f, const char* xp, int64_t r0, int64_t r1, int64_t nb, float* y,
                         int64_t ldy, uint32_t* val, int32_t* idx, float* part) {
  const uint16_t* values = static_cast<const uint16_t*>(f.values);
  const uint16_t* end = values + f.nvalues;
  const int64_t nr = r1 - r0, cb = std::max<int64_t>(1, kPairSlab / (16 * T * 64));
  const uint16_t* v[kPairRowBlock];
  for (int64_t i = 0; i < nr; ++i) v[i] = values + f.offsets[r0 + i];
  std::memset(part, 0, size_t(nr * T * 16) * sizeof(float));
  const uint32_t* bitmap = reinterpret_cast<const uint32_t*>(f.bitmap);
  // Row i + 1 is decoded before row i is multiplied (two scratch sets): the multiply
  // loop's loads then find the decoded lists in L1 rather than waiting on the stores
  // that wrote them.
  const int64_t scratch = cb * 16 + 16;
  for (int64_t w0 = 0; w0 < f.words; w0 += cb) {
    const int64_t nw = std::min(cb, f.words - w0);
    const char* xs = xp + w0 * 16 * (T * 64);
    int64_t n = decode_pairs(bitmap + r0 * f.words + w0, nw, v[0], end, val, idx);
    for (int64_t i = 0; i < nr; ++i) {
      const int64_t cur = (i & 1) * scratch, nxt = scratch - cur;
      int64_t n_next = 0;
      if (i + 1 < nr)
        n_next = decode_pairs(bitmap + (r0 + i + 1) * f.words + w0, nw, v[i + 1], end, val + nxt, idx + nxt);
      pair_row<T, U>(idx + cur, n, val + cur, xs, part + i * T * 16);
      n = n_next;
    }
  }
  for (int64_t b = 0; b < nb; ++b)
    for (int64_t i = 0; i < nr; ++i) y[b * ldy + r0 + i] = part[i * T * 16 + b];
}

using PairRowsFn = void (*)(const Factor&, const char*, int64_t, int64_t, int64_t, float*, int64_t, uint32_t*,
                            int32_t*, float*);
constexpr PairRowsFn kPairRows[kPairMaxTiles + 1] = {
    nullptr,          pair_rows<1, 4>, pair_rows<2, 4>, pair_rows<3, 3>, pair_rows<4, 2>,
    pair_rows<5, 2>,  pair_rows<6, 2>, pair_rows<7, 2>, pair_rows<8, 2>};

}  // namespace

// The pair path: y [batch][ldy] = S x for fp32 x [batch][ldx] (32 * words columns, zero
// padded), bf16 values; x rounded to bf16, fp32 accumulation. The batch runs in passes of
// up to eight tiles of 16 rows, factor rows in blocks over the threads.
void pairs_avx512(const Factor& f, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t batch) {
  const int64_t pairs = 16 * f.words;
  struct Free {
    void operator()(void* p) const { std::free(p); }
  };
  // The calling thread's packed x, reused, 64-byte aligned: an x operand split over two
  // cache lines costs a second load (1.6x the time per vdpbf16ps with x in L1, Zen 4).
  static thread_local std::unique_ptr<uint32_t, Free> xp;
  static thread_local size_t xp_size = 0;
  for (int64_t b0 = 0; b0 < batch; b0 += kPairMaxTiles * kPairLanes) {
    const int64_t nb = std::min(kPairMaxTiles * kPairLanes, batch - b0), nt = (nb + kPairLanes - 1) / kPairLanes;
    const int64_t ldb = nt * kPairLanes;
    if (xp_size < size_t(pairs * ldb)) {
      xp.reset(static_cast<uint32_t*>(std::aligned_alloc(64, size_t(pairs * ldb) * 4)));
      if (!xp) throw std::bad_alloc();
      xp_size = size_t(pairs * ldb);
    }
    pack_pairs(x + b0 * ldx, ldx, nb, f.words, ldb, xp.get());
    const char* xb = reinterpret_cast<const char*>(xp.get());
    const int64_t cb = std::max<int64_t>(1, kPairSlab / (16 * nt * 64));
#pragma omp parallel
    {
      const size_t scratch = size_t(cb * 16 + 16);  // per decoded row; two rows
      std::unique_ptr<uint32_t, Free> val(static_cast<uint32_t*>(std::aligned_alloc(64, 2 * scratch * 4)));
      std::vector<int32_t> idx(2 * scratch);
      std::unique_ptr<float, Free> part(
          static_cast<float*>(std::aligned_alloc(64, size_t(kPairRowBlock * nt * 64))));
#pragma omp for schedule(dynamic, 1)
      for (int64_t blk = 0; blk < (f.rows + kPairRowBlock - 1) / kPairRowBlock; ++blk) {
        const int64_t r0 = blk * kPairRowBlock, r1 = std::min(f.rows, r0 + kPairRowBlock);
        kPairRows[nt](f, xb, r0, r1, nb, y + b0 * ldy, ldy, val.get(), idx.data(), part.get());
      }
    }
  }
}

bool has_avx512_bf16() {
  return has_avx512() && __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("bmi2");
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
