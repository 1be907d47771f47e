// Load-time checks of a bitmap factor and its column decoder (not on the hot path).
#include "common.h"

namespace dsf {

// Set bits of one bitmap row; the popcnt instruction where the CPU has it (an ifunc).
#ifdef DSF_X86
__attribute__((target_clones("popcnt", "default")))
#endif
int64_t row_popcount(const uint32_t* row, int64_t words) {
  int64_t count = 0;
  for (int64_t w = 0; w < words; ++w) count += __builtin_popcount(row[w]);
  return count;
}

// One pass over the factor: row offsets start at 0, end at nnz and never decrease, every
// row's popcount equals its offset difference, no bit is set past the last column.
// Offsets out of order are reported first (anywhere), then the first row whose bits are
// wrong, as the torch checks of formats/bitmap.py do.
int64_t check_factor(const int32_t* bitmap, const int32_t* offsets, int64_t rows, int64_t words, int64_t cols,
                     int64_t nnz) {
  if (offsets[0] != 0 || int64_t(offsets[rows]) != nnz) return -1;
  const uint32_t tail = cols % 32 ? ~((1u << (cols % 32)) - 1u) : 0u;  // bits past the last column
  int64_t first_order = INT64_MAX, first_bits = INT64_MAX;
#pragma omp parallel for schedule(static) reduction(min : first_order, first_bits)
  for (int64_t r = 0; r < rows; ++r) {
    const uint32_t* row = reinterpret_cast<const uint32_t*>(bitmap) + r * words;
    if (offsets[r + 1] < offsets[r]) {
      if (4 * r + 1 < first_order) first_order = 4 * r + 1;
      continue;
    }
    const int64_t code = words && (row[words - 1] & tail)                                  ? 3
                         : row_popcount(row, words) != int64_t(offsets[r + 1]) - offsets[r] ? 2
                                                                                            : 0;
    if (code && 4 * r + code < first_bits) first_bits = 4 * r + code;
  }
  return first_order != INT64_MAX ? first_order : first_bits != INT64_MAX ? first_bits : 0;
}

// The column-index path's operand, built once at load. Every check that keeps the
// kernel inside x is repeated here, so that a factor that slipped past validation
// can never make it read out of bounds.
bool index_columns(const int32_t* bitmap, const int32_t* offsets, int64_t rows, int64_t words, int64_t cols,
                   int64_t nnz, uint16_t* columns) {
  if (cols < 0 || cols > 65536 || words * 32 < cols || rows < 0 || offsets[0] != 0 || int64_t(offsets[rows]) != nnz)
    return false;
  int bad = 0;
#pragma omp parallel for schedule(static) reduction(| : bad)
  for (int64_t r = 0; r < rows; ++r) {
    const uint32_t* row = reinterpret_cast<const uint32_t*>(bitmap) + r * words;
    const int64_t o0 = offsets[r], o1 = offsets[r + 1];
    if (o0 < 0 || o1 < o0 || o1 > nnz || row_popcount(row, words) != o1 - o0) {
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
  return !bad;
}

}  // namespace dsf
