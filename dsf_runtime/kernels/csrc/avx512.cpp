// The AVX-512 paths (F + BW + VBMI2) for fp32 activations: the word path (per
// 32-column word, expand the row's packed 16-bit values into the word's lanes with
// vpexpandw, convert to fp32 and FMA with x, tiles of up to 16 batch rows: the bitmap and
// values stream once per tile with no index arithmetic) and the nonzero path for large
// batches.
#include "common.h"

#ifdef DSF_X86
namespace dsf {
namespace {

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

}  // namespace

bool has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vbmi2");
}

// Word path, tiles of 16, 12, 8, 4, 3, 2, 1 batch rows; fp16 or bf16 values.
void words_avx512(const Factor& f, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t batch) {
  const uint16_t* values = static_cast<const uint16_t*>(f.values);
  const uint16_t* end = values + f.nvalues;
  over_row_blocks(f.rows, batch, 16, true, [&](int nb, int64_t b0, int64_t r0, int64_t r1) {
    tile_avx512(nb, f.bitmap, f.offsets, values, x + b0 * ldx, ldx, y + b0 * ldy, ldy, r0, r1, f.words,
                f.kind == kBf16, end);
  });
}

// Nonzero path: x^T in chunks of up to 64 batch rows; fp16 or bf16 values.
void nz_avx512(const Factor& f, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t batch) {
  const uint16_t* values = static_cast<const uint16_t*>(f.values);
  const int is_bf16 = f.kind == kBf16;
  const int32_t *bitmap = f.bitmap, *offsets = f.offsets;
  const int64_t words = f.words;
  over_batch_chunks(x, ldx, y, ldy, f.rows, f.cols, words, batch, 16, 64, [&](const float* xt, int64_t ldb, float* yt) {
    over_row_blocks_nz(f.rows, words, [&](int64_t r0, int64_t r1, int32_t* idx, float* val) {
      switch (ldb / 16) {
        case 1: rows_nz<1>(bitmap, offsets, values, xt, ldb, yt, r0, r1, words, is_bf16, idx, val); break;
        case 2: rows_nz<2>(bitmap, offsets, values, xt, ldb, yt, r0, r1, words, is_bf16, idx, val); break;
        case 3: rows_nz<3>(bitmap, offsets, values, xt, ldb, yt, r0, r1, words, is_bf16, idx, val); break;
        default: rows_nz<4>(bitmap, offsets, values, xt, ldb, yt, r0, r1, words, is_bf16, idx, val); break;
      }
    });
  });
}

}  // namespace dsf
#endif
