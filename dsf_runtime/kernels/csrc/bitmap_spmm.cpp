// Sparse (bitmap format) x dense matmul for CPUs: y[b, r] = sum_c S[r, c] * x[b, c].
//
// S is stored as one 32-bit word per 32 columns per row (bit j of word w = column
// 32w + j), row offsets into a packed value array (fp16 or bf16), as written by
// dsf_runtime/formats/bitmap.py. Accumulation is fp32. Rows are split over OpenMP
// threads.
//
// Paths:
//  * AVX-512 (F + BW + VBMI2), batch <= 4: per 32-column word, expand-load the row's
//    packed 16-bit values into the word's lanes (vpexpandw), convert to fp32 and FMA
//    with x: the bitmap streams at memory speed with no index arithmetic.
//  * larger batches: iterate the set bits (tzcnt) and FMA each value into all batch
//    columns of x^T (x laid out [in][batch]), so work scales with nonzeros.
//  * portable scalar fallback for CPUs without AVX-512 (chosen at run time).
// The caller (Python) validated every index and offset when the checkpoint was loaded.

#include <cstdint>
#include <cstring>

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

// Portable path, any batch: walk set bits; x^T is [cols][batch].
void rows_scalar(const int32_t* bitmap, const int32_t* offsets, const uint16_t* values, const float* xt,
                 float* yt, int64_t r0, int64_t r1, int64_t words, int64_t batch, int is_bf16) {
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
        float v = to_float(values[k++], is_bf16);
        const float* xc = xt + (w * 32 + j) * batch;
        for (int64_t b = 0; b < batch; ++b) out[b] += v * xc[b];
      }
    }
  }
}

#ifdef DSF_X86
__attribute__((target("avx512f,avx512bw,avx512vbmi2")))
inline void expand32(const uint16_t* src, uint32_t bits, int is_bf16, __m512& lo, __m512& hi) {
  __m512i packed = _mm512_maskz_expandloadu_epi16(bits, src);  // 32 lanes of 16 bits
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

// AVX-512 path for batch NB <= 4: x is [batch][cols_padded] (rows of x padded to 32).
template <int NB>
__attribute__((target("avx512f,avx512bw,avx512vbmi2")))
void rows_avx512(const int32_t* bitmap, const int32_t* offsets, const uint16_t* values, const float* x,
                 int64_t ldx, float* y, int64_t ldy, int64_t r0, int64_t r1, int64_t words, int is_bf16) {
  for (int64_t r = r0; r < r1; ++r) {
    __m512 acc[NB];
    for (int b = 0; b < NB; ++b) acc[b] = _mm512_setzero_ps();
    const uint16_t* v = values + offsets[r];
    const uint32_t* row = reinterpret_cast<const uint32_t*>(bitmap) + r * words;
    for (int64_t w = 0; w < words; ++w) {
      uint32_t bits = row[w];
      if (!bits) continue;
      __m512 lo, hi;
      expand32(v, bits, is_bf16, lo, hi);
      v += __builtin_popcount(bits);
      for (int b = 0; b < NB; ++b) {
        const float* xb = x + b * ldx + w * 32;
        acc[b] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xb), acc[b]);
        acc[b] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xb + 16), acc[b]);
      }
    }
    for (int b = 0; b < NB; ++b) y[b * ldy + r] = _mm512_reduce_add_ps(acc[b]);
  }
}

__attribute__((target("avx512f,avx512bw,avx512vbmi2")))
void rows_avx512_wide(const int32_t* bitmap, const int32_t* offsets, const uint16_t* values, const float* xt,
                      float* yt, int64_t r0, int64_t r1, int64_t words, int64_t batch, int is_bf16) {
  // batch a multiple of 16 (caller pads): FMA each nonzero into 16-wide batch chunks.
  const int64_t chunks = batch / 16;
  for (int64_t r = r0; r < r1; ++r) {
    float* out = yt + r * batch;
    for (int64_t c = 0; c < chunks; ++c) _mm512_storeu_ps(out + 16 * c, _mm512_setzero_ps());
    int64_t k = offsets[r];
    const uint32_t* row = reinterpret_cast<const uint32_t*>(bitmap) + r * words;
    for (int64_t w = 0; w < words; ++w) {
      uint32_t bits = row[w];
      while (bits) {
        int j = __builtin_ctz(bits);
        bits &= bits - 1;
        __m512 v = _mm512_set1_ps(to_float(values[k++], is_bf16));
        const float* xc = xt + (w * 32 + j) * batch;
        for (int64_t c = 0; c < chunks; ++c)
          _mm512_storeu_ps(out + 16 * c, _mm512_fmadd_ps(v, _mm512_loadu_ps(xc + 16 * c), _mm512_loadu_ps(out + 16 * c)));
      }
    }
  }
}
#endif

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

// Narrow batch (1..4), x: [batch][ldx] fp32 with ldx >= 32 * words (zero padded),
// y: [batch][ldy] fp32. Returns 0, or -1 when the AVX-512 path is unavailable.
int dsf_bitmap_spmm_narrow(const int32_t* bitmap, const int32_t* offsets, const uint16_t* values,
                           const float* x, int64_t ldx, float* y, int64_t ldy, int64_t rows, int64_t words,
                           int64_t batch, int is_bf16) {
#ifdef DSF_X86
  if (!dsf_has_avx512() || batch < 1 || batch > 4) return -1;
#pragma omp parallel for schedule(static)
  for (int64_t blk = 0; blk < (rows + 63) / 64; ++blk) {
    int64_t r0 = blk * 64, r1 = r0 + 64 < rows ? r0 + 64 : rows;
    switch (batch) {
      case 1: rows_avx512<1>(bitmap, offsets, values, x, ldx, y, ldy, r0, r1, words, is_bf16); break;
      case 2: rows_avx512<2>(bitmap, offsets, values, x, ldx, y, ldy, r0, r1, words, is_bf16); break;
      case 3: rows_avx512<3>(bitmap, offsets, values, x, ldx, y, ldy, r0, r1, words, is_bf16); break;
      default: rows_avx512<4>(bitmap, offsets, values, x, ldx, y, ldy, r0, r1, words, is_bf16); break;
    }
  }
  return 0;
#else
  return -1;
#endif
}

// Any batch, x^T: [cols_padded][batch], y^T: [rows][batch]. use_avx512 needs batch % 16 == 0.
int dsf_bitmap_spmm_wide(const int32_t* bitmap, const int32_t* offsets, const uint16_t* values,
                         const float* xt, float* yt, int64_t rows, int64_t words, int64_t batch, int is_bf16,
                         int use_avx512) {
#ifdef DSF_X86
  if (use_avx512 && (!dsf_has_avx512() || batch % 16)) return -1;
#else
  if (use_avx512) return -1;
#endif
#pragma omp parallel for schedule(static)
  for (int64_t blk = 0; blk < (rows + 63) / 64; ++blk) {
    int64_t r0 = blk * 64, r1 = r0 + 64 < rows ? r0 + 64 : rows;
#ifdef DSF_X86
    if (use_avx512) {
      rows_avx512_wide(bitmap, offsets, values, xt, yt, r0, r1, words, batch, is_bf16);
      continue;
    }
#endif
    rows_scalar(bitmap, offsets, values, xt, yt, r0, r1, words, batch, is_bf16);
  }
  return 0;
}

}  // extern "C"
