// The AVX2 paths (AVX2 + FMA + F16C + BMI2), 8-lane vectors: the word path (each
// 8-column bitmap byte expanded through a vpshufb table), the nonzero path for large
// batches and the column-index path for sparse factors at small batches.
#include <cmath>

#include "common.h"

#ifdef DSF_X86
namespace dsf {
namespace {

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
// (16-bit, see bitmap_columns in check.cpp), a nonzero costs two loads and an insert instead: x
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

// 8 weights of one dense row from column c as exact fp32: fp32 as stored, bf16 shifted
// into the high half, int8 times its 32-column block's scale (the packer keeps a weight
// in int8 only where that product gives back its fp32 value bit for bit, so every kind
// runs the same FMAs as the fp32 weight). MASKED: the last k % 8 columns (fp32, bf16;
// int8 rows are whole blocks), the rest read as zero.
template <int WK, bool MASKED>
DSF_AVX2 inline __m256 dense_w8(const void* row, const float* row_scales, int64_t k, int64_t c, __m256i tail) {
  if (WK == kDenseF32) {
    const float* p = static_cast<const float*>(row) + c;
    return MASKED ? _mm256_maskload_ps(p, tail) : _mm256_loadu_ps(p);
  }
  if (WK == kDenseBf16) {
    const uint16_t* p = static_cast<const uint16_t*>(row) + c;
    uint16_t buf[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    if (MASKED) std::memcpy(buf, p, size_t(k - c) * sizeof(uint16_t));
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(MASKED ? buf : p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(static_cast<const int8_t*>(row) + c));
  return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), _mm256_broadcast_ss(row_scales + c / kDenseQ8Block));
}

// One step of 8 columns (from c; MASKED: the last k % 8, lanes in ``tail``) of R dense
// rows against NB batch rows of x: NB x vectors and one W vector at a time in
// registers, R * NB FMAs.
template <int WK, int R, int NB, bool MASKED>
DSF_AVX2 inline void dense_step(const void* const (&rows)[R], const float* const (&scales)[R], int64_t k,
                                const float* x, int64_t ldx, int64_t c, __m256i tail, __m256 (&acc)[R][NB]) {
  __m256 xv[NB];
  for (int b = 0; b < NB; ++b)
    xv[b] = MASKED ? _mm256_maskload_ps(x + b * ldx + c, tail) : _mm256_loadu_ps(x + b * ldx + c);
  for (int i = 0; i < R; ++i) {
    const __m256 wv = dense_w8<WK, MASKED>(rows[i], scales[i], k, c, tail);
    for (int b = 0; b < NB; ++b) acc[i][b] = _mm256_fmadd_ps(wv, xv[b], acc[i][b]);
  }
}

// R dense rows from ``r`` of W ([n][k] of kind WK; int8: ``scales`` [n][k / 32]) against
// NB batch rows of x into y.
template <int WK, int R, int NB>
DSF_AVX2 inline void dense_row_group(const DenseWeight& w, int64_t k, const float* x, int64_t ldx, float* y,
                                     int64_t ldy, int64_t r, __m256i tail) {
  const int64_t k8 = k & ~int64_t(7);
  __m256 acc[R][NB];
  for (int i = 0; i < R; ++i)
    for (int b = 0; b < NB; ++b) acc[i][b] = _mm256_setzero_ps();
  const void* rows[R];
  const float* scales[R];
  for (int i = 0; i < R; ++i) {
    rows[i] = static_cast<const char*>(w.data) + (r + i) * k * dense_bytes(WK);
    scales[i] = w.scales ? w.scales + (r + i) * (k / kDenseQ8Block) : nullptr;
  }
  // The next R rows follow these in memory: each step prefetches the part of them a
  // step of the whole group advances over (R * 8 weights), so that their lines are on
  // the way when this group ends (a narrow W is compute-light enough to outrun the
  // hardware prefetcher otherwise).
  const char* next = static_cast<const char*>(w.data) + (r + R) * k * dense_bytes(WK);
  for (int64_t c = 0; c < k8; c += 8) {
    if (WK != kDenseF32) _mm_prefetch(next + R * c * dense_bytes(WK), _MM_HINT_T0);
    dense_step<WK, R, NB, false>(rows, scales, k, x, ldx, c, tail, acc);
  }
  if (k8 < k) dense_step<WK, R, NB, true>(rows, scales, k, x, ldx, k8, tail, acc);
  for (int i = 0; i < R; ++i)
    for (int b = 0; b < NB; ++b) y[b * ldy + r + i] = hsum256(acc[i][b]);
}

// Dense rows [r0, r1) of W against NB <= 3 batch rows of x, four rows at a time (12
// accumulators, 3 x and 1 W register of the 16), then the last 0-3 rows one at a time.
template <int WK, int NB>
DSF_AVX2 void dense_rows_avx2(const DenseWeight& w, int64_t k, const float* x, int64_t ldx, float* y, int64_t ldy,
                              int64_t r0, int64_t r1, __m256i tail) {
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) dense_row_group<WK, 4, NB>(w, k, x, ldx, y, ldy, r, tail);
  for (; r < r1; ++r) dense_row_group<WK, 1, NB>(w, k, x, ldx, y, ldy, r, tail);
}

// The whole batch against rows [r0, r1) of W, in tiles of up to MAX_NB rows of x.
template <int WK, int MAX_NB>
DSF_AVX2 void dense_tiles(const DenseWeight& w, int64_t k, const float* x, int64_t ldx, float* y, int64_t ldy,
                          int64_t r0, int64_t r1, int64_t batch, __m256i tail) {
  for (int64_t b0 = 0; b0 < batch;) {
    const int64_t nb = std::min<int64_t>(MAX_NB, batch - b0);
    const float* xb = x + b0 * ldx;
    float* yb = y + b0 * ldy;
    if constexpr (MAX_NB >= 3) {
      if (nb == 3) dense_rows_avx2<WK, 3>(w, k, xb, ldx, yb, ldy, r0, r1, tail);
    }
    if (nb == 2) dense_rows_avx2<WK, 2>(w, k, xb, ldx, yb, ldy, r0, r1, tail);
    else if (nb == 1) dense_rows_avx2<WK, 1>(w, k, xb, ldx, yb, ldy, r0, r1, tail);
    b0 += nb;
  }
}

// Rows [r0, r1) of a narrow W widened to their exact fp32 values into ``out`` [r1 - r0][k].
template <int WK>
DSF_AVX2 void dense_widen_rows(const DenseWeight& w, int64_t k, int64_t r0, int64_t r1, float* out, __m256i tail) {
  const int64_t k8 = k & ~int64_t(7);
  for (int64_t r = r0; r < r1; ++r) {
    const void* row = static_cast<const char*>(w.data) + r * k * dense_bytes(WK);
    const float* row_scales = w.scales ? w.scales + r * (k / kDenseQ8Block) : nullptr;
    float* o = out + (r - r0) * k;
    const char* next = static_cast<const char*>(row) + 4 * k * dense_bytes(WK);  // 4 rows on (see dense_row_group)
    for (int64_t c = 0; c < k8; c += 8) {
      _mm_prefetch(next + c * dense_bytes(WK), _MM_HINT_T0);
      _mm256_storeu_ps(o + c, dense_w8<WK, false>(row, row_scales, k, c, tail));
    }
    if (k8 < k) _mm256_maskstore_ps(o + k8, tail, dense_w8<WK, true>(row, row_scales, k, k8, tail));
  }
}

// Batches up to this run a narrow W straight from its packed rows, in tiles of at most 2
// batch rows (4 x 2 accumulators leave registers for widening); larger ones widen each
// block of rows once into an fp32 scratch in L2 and run the fp32 tiles over it, so the
// widening is not repeated per batch tile. Both give the fp32 weight's y exactly.
constexpr int64_t kNarrowDirectMaxBatch = 2;

// Dense path for one weight kind: rows in blocks sized so that a block of W (as fp32)
// stays in L2 while the batch runs over it in tiles of 3, 2 or 1 rows of x (a tile of 3
// fills the 16 registers), blocks handed to OpenMP threads as they come free.
template <int WK>
DSF_AVX2 void dense_avx2_t(const DenseWeight& w, int64_t n, int64_t k, const float* x, int64_t ldx, float* y,
                           int64_t ldy, int64_t batch) {
  const bool direct = WK == kDenseF32 || batch <= kNarrowDirectMaxBatch;
  const int64_t row_bytes = std::max<int64_t>(1, (direct ? dense_bytes(WK) : 4) * k);
  const int64_t block = std::max<int64_t>(4, std::min<int64_t>(64, (int64_t(128) << 10) / row_bytes) & ~int64_t(3));
  alignas(32) int32_t lanes[8];
  for (int j = 0; j < 8; ++j) lanes[j] = j < k % 8 ? -1 : 0;
  const __m256i tail = _mm256_load_si256(reinterpret_cast<const __m256i*>(lanes));
#pragma omp parallel
  {
    std::vector<float> scratch(direct ? 0 : size_t(block * k));
#pragma omp for schedule(dynamic, 1)
    for (int64_t blk = 0; blk < (n + block - 1) / block; ++blk) {
      const int64_t r0 = blk * block, r1 = std::min(n, r0 + block);
      if (direct) {
        dense_tiles<WK, WK == kDenseF32 ? 3 : 2>(w, k, x, ldx, y, ldy, r0, r1, batch, tail);
        continue;
      }
      dense_widen_rows<WK>(w, k, r0, r1, scratch.data(), tail);
      const DenseWeight wide{scratch.data(), nullptr, kDenseF32};
      dense_tiles<kDenseF32, 3>(wide, k, x, ldx, y + r0, ldy, 0, r1 - r0, batch, tail);
    }
  }
}

// ---------------------------------------------------------------------------------
// A decode query's attention over the KV cache (see AttendFn).

// exp(x) for x <= 0 and NaN (softmax's arguments, x - max): exp(x) = 2^n exp(r) with n =
// round(x / ln 2), r = x - n ln 2 in [-ln2/2, ln2/2] (ln 2 in two parts, so that r is
// exact to fp32), exp(r) by its Taylor polynomial to r^7 (truncation < 6e-9 relative).
// x below -87 (where 2^n would leave the normal range) is taken as -87: exp(-87) ~ 1.6e-38
// next to the maximum's 1 changes no softmax weight. NaN stays NaN.
DSF_AVX2 inline __m256 exp_nonpositive(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(-87.f), x);  // NaN in the second operand is returned
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145752f), x);  // ln 2's high part (exact times n)
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860682e-6f), r);       // and the rest of it
  __m256 p = _mm256_set1_ps(1.f / 5040.f);
  for (float c : {1.f / 720.f, 1.f / 120.f, 1.f / 24.f, 1.f / 6.f, 0.5f, 1.f, 1.f})
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
  const __m256i pow2n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(pow2n));
}

// q . key over d floats: two 8-lane partial sums, the last d % 8 terms scalar.
DSF_AVX2 inline float dot_avx2(const float* q, const float* key, int64_t d) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= d; j += 16) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + j), _mm256_loadu_ps(key + j), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + j + 8), _mm256_loadu_ps(key + j + 8), a1);
  }
  if (j + 8 <= d) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + j), _mm256_loadu_ps(key + j), a0);
    j += 8;
  }
  float dot = hsum256(_mm256_add_ps(a0, a1));
  for (; j < d; ++j) dot += q[j] * key[j];
  return dot;
}

// out [8 NV columns from j] = sum_t w[t] values[t][j ...]: NV independent accumulators
// (8 hide the FMA latency at two FMAs per cycle).
template <int NV>
DSF_AVX2 inline void weighted_rows(const float* w, const float* values, int64_t span, int64_t d, int64_t j,
                                   float* out) {
  __m256 acc[NV];
  for (int i = 0; i < NV; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t t = 0; t < span; ++t) {
    const __m256 wt = _mm256_broadcast_ss(w + t);
    const float* row = values + t * d + j;
    for (int i = 0; i < NV; ++i) acc[i] = _mm256_fmadd_ps(wt, _mm256_loadu_ps(row + 8 * i), acc[i]);
  }
  for (int i = 0; i < NV; ++i) _mm256_storeu_ps(out + j + 8 * i, acc[i]);
}

// Attention of one decode query: scores, their maximum, the exponentials and their sum
// 8 at a time, then the weighted sum of value rows in column blocks of 64, 8 or fewer.
DSF_AVX2 void attend_avx2_impl(const float* q, const float* keys, const float* values, int64_t span, int64_t d,
                               float scale, float* w, float* out) {
  for (int64_t t = 0; t < span; ++t) w[t] = dot_avx2(q, keys + t * d, d) * scale;
  __m256 top8 = _mm256_set1_ps(-INFINITY);
  int64_t t = 0;
  for (; t + 8 <= span; t += 8) top8 = _mm256_max_ps(_mm256_loadu_ps(w + t), top8);
  float top = -INFINITY, lanes[8];
  _mm256_storeu_ps(lanes, top8);
  for (float v : lanes) top = std::max(top, v);
  for (; t < span; ++t) top = std::max(top, w[t]);
  const __m256 top_v = _mm256_set1_ps(top);
  __m256 sum8 = _mm256_setzero_ps();
  for (t = 0; t + 8 <= span; t += 8) {
    const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(w + t), top_v));
    _mm256_storeu_ps(w + t, e);
    sum8 = _mm256_add_ps(sum8, e);
  }
  if (t < span) {  // the last 1-7 through a zero-padded buffer (pad lanes masked out of the sum)
    float buf[8];
    std::fill(buf, buf + 8, -INFINITY);
    std::memcpy(buf, w + t, size_t(span - t) * sizeof(float));
    _mm256_storeu_ps(buf, exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(buf), top_v)));
    std::memcpy(w + t, buf, size_t(span - t) * sizeof(float));
    for (int64_t i = span - t; i < 8; ++i) buf[i] = 0.f;
    sum8 = _mm256_add_ps(sum8, _mm256_loadu_ps(buf));
  }
  const float total = hsum256(sum8);
  int64_t j = 0;
  for (; j + 64 <= d; j += 64) weighted_rows<8>(w, values, span, d, j, out);
  for (; j + 8 <= d; j += 8) weighted_rows<1>(w, values, span, d, j, out);
  for (; j < d; ++j) {
    float acc = 0.f;
    for (t = 0; t < span; ++t) acc += w[t] * values[t * d + j];
    out[j] = acc;
  }
  const __m256 inv = _mm256_set1_ps(total);
  for (j = 0; j + 8 <= d; j += 8) _mm256_storeu_ps(out + j, _mm256_div_ps(_mm256_loadu_ps(out + j), inv));
  for (; j < d; ++j) out[j] /= total;
}

}  // namespace

bool has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
         __builtin_cpu_supports("bmi2");
}

// Word path, tiles of 8, 4, 3, 2, 1 batch rows; fp16, bf16 or int8 (row-scaled) values.
void words_avx2(const Factor& f, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t batch) {
  auto tile = f.kind == kInt8 ? tile_avx2_t<kInt8> : f.kind == kBf16 ? tile_avx2_t<kBf16> : tile_avx2_t<kFp16>;
  over_row_blocks(f.rows, batch, 8, false, [&](int nb, int64_t b0, int64_t r0, int64_t r1) {
    tile(nb, f.bitmap, f.offsets, f.values, f.scales, x + b0 * ldx, ldx, y + b0 * ldy, ldy, r0, r1, f.words,
         f.nvalues);
  });
}

// Nonzero path: x^T in chunks of up to 64 batch rows.
void nz_avx2(const Factor& f, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t batch) {
  const int64_t rows = f.rows, words = f.words;
  const int32_t* offsets = f.offsets;
  auto tile = f.kind == kInt8 ? tile_nz_avx2<kInt8> : f.kind == kBf16 ? tile_nz_avx2<kBf16> : tile_nz_avx2<kFp16>;
  over_batch_chunks(x, ldx, y, ldy, rows, f.cols, words, batch, 8, 64, [&](const float* xt, int64_t ldb, float* yt) {
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
          tile(ldb, f.bitmap, f.values, f.scales, xt, yt, r0, r1, words, w0, std::min(words, w0 + block_words),
               cursor.data(), idx.data());
        if (words == 0)  // no columns: y^T is zero
          for (int64_t r = r0; r < r1; ++r) std::memset(yt + r * ldb, 0, size_t(ldb) * sizeof(float));
      }
    }
  });
}

// Column-index path: gathers x by each nonzero's column (f.columns); tiles of up to 4 batch rows.
void cols_avx2(const Factor& f, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t batch) {
  auto tile = f.kind == kInt8   ? tile_cols_avx2_t<kInt8>
              : f.kind == kBf16 ? tile_cols_avx2_t<kBf16>
                                : tile_cols_avx2_t<kFp16>;
  over_row_blocks(f.rows, batch, 4, false, [&](int nb, int64_t b0, int64_t r0, int64_t r1) {
    tile(nb, f.offsets, f.columns, f.values, f.scales, x + b0 * ldx, ldx, y + b0 * ldy, ldy, r0, r1);
  });
}

// A decode query's attention (see AttendFn).
void attend_avx2(const float* q, const float* keys, const float* values, int64_t span, int64_t d, float scale,
                 float* w, float* out) {
  attend_avx2_impl(q, keys, values, span, d, scale, w, out);
}

// Dense path, any weight kind (see DenseWeight).
void dense_avx2(const DenseWeight& w, int64_t n, int64_t k, const float* x, int64_t ldx, float* y, int64_t ldy,
                int64_t batch) {
  if (w.kind == kDenseQ8) dense_avx2_t<kDenseQ8>(w, n, k, x, ldx, y, ldy, batch);
  else if (w.kind == kDenseBf16) dense_avx2_t<kDenseBf16>(w, n, k, x, ldx, y, ldy, batch);
  else dense_avx2_t<kDenseF32>(w, n, k, x, ldx, y, ldy, batch);
}

}  // namespace dsf
#endif
