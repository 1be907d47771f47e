// The portable paths, for CPUs without AVX2 (and any build): walk each row's set bits
// (ctz) and FMA each value into all batch columns of x^T ([in][batch]); a decode query's
// attention over the KV cache.
#include <cmath>

#include "common.h"

namespace dsf {
namespace {

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

}  // namespace

// Scores, softmax and the weighted sum of values in plain loops: the dot products keep
// eight independent partial sums (lanes a compiler vectorizes without reordering any one
// sum), since one running sum waits on the add's latency at every term.
void attend_portable(const float* q, const float* keys, const float* values, int64_t span, int64_t d, float scale,
                     float* w, float* out) {
  constexpr int64_t kLanes = 8;
  float top = -INFINITY;
  for (int64_t t = 0; t < span; ++t) {
    const float* key = keys + t * d;
    float part[kLanes] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    int64_t j = 0;
    for (; j + kLanes <= d; j += kLanes)
      for (int64_t l = 0; l < kLanes; ++l) part[l] += q[j + l] * key[j + l];
    float dot = 0.f;
    for (int64_t l = 0; l < kLanes; ++l) dot += part[l];
    for (; j < d; ++j) dot += q[j] * key[j];
    w[t] = dot * scale;
    top = std::max(top, w[t]);
  }
  float total = 0.f;
  for (int64_t t = 0; t < span; ++t) total += (w[t] = std::exp(w[t] - top));
  std::fill(out, out + d, 0.f);
  for (int64_t t = 0; t < span; ++t)
    for (int64_t j = 0; j < d; ++j) out[j] += w[t] * values[t * d + j];
  for (int64_t j = 0; j < d; ++j) out[j] /= total;
}

void nz_portable(const Factor& f, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t batch) {
  over_batch_chunks(x, ldx, y, ldy, f.rows, f.cols, f.words, batch, 1, batch, [&](const float* xt, int64_t, float* yt) {
#pragma omp parallel for schedule(static)
    for (int64_t blk = 0; blk < (f.rows + 63) / 64; ++blk) {
      int64_t r0 = blk * 64, r1 = r0 + 64 < f.rows ? r0 + 64 : f.rows;
      rows_scalar(f.bitmap, f.offsets, f.values, f.scales, xt, yt, r0, r1, f.words, batch, f.kind);
    }
  });
}

}  // namespace dsf
