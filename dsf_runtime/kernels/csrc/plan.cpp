// Times the paths' variants on this CPU, so that the backend runs the faster ones: which
// is faster differs between microarchitectures (Intel cores run 512-bit vpexpandw at full
// width, AMD Zen 4 double-pumps it) and no CPU flag tells. A synthetic 2048 x 4096 factor
// 30% dense (3.5 MiB, past L2, as real layers are; on a 1024 x 2048 one Zen 4's 256-bit
// variant and AVX2 path came within noise of each other); each variant is called in
// turn, 9 rounds, and its best time kept (~0.1 s). Word paths run at batch 1 with fp32 x
// (bf16 x for the "model" variants), nonzero paths at batch 16 with bf16 values, the AMX
// tile path at batches 16 and 64 (and the AVX-512 nonzero path at 64 beside it).
#include <chrono>
#include <functional>

#include "common.h"

namespace dsf {

std::vector<std::pair<const char*, double>> time_paths() {
  const int64_t rows = 2048, words = 128, cols = 32 * words;
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
  std::vector<float> x(size_t(cols), 0.25f), y(static_cast<size_t>(rows)), x16(size_t(16 * cols), 0.25f), y16(static_cast<size_t>(16 * rows));
  std::vector<uint16_t> xb(size_t(cols), 0x3E80);  // 0.25 in bf16
  const Factor fb{bitmap.data(), offsets.data(), bf16.data(), nullptr, nullptr, nnz, rows, cols, words, kBf16};
  const Factor fh{bitmap.data(), offsets.data(), fp16.data(), nullptr, nullptr, nnz, rows, cols, words, kFp16};

  std::vector<std::pair<const char*, std::function<void()>>> runs;
  auto word = [&](const char* name, SpmmFn fn, const Factor& f) {
    runs.emplace_back(name, [&, fn] { fn(f, x.data(), cols, y.data(), rows, 1); });
  };
#ifdef DSF_X86
  if (has_avx512()) {
    word("avx512 bf16", words_avx512, fb);
    word("avx512 fp16", words_avx512, fh);
    runs.emplace_back("avx512 nonzeros", [&] { nz_avx512(fb, x16.data(), cols, y16.data(), rows, 16); });
  }
  if (has_avx512_bf16()) {
    word("avx512-256 bf16", words_avx512_256, fb);
    runs.emplace_back("avx512 bf16 model", [&] { dot_avx512(fb, xb.data(), cols, y.data(), rows, 1); });
    runs.emplace_back("avx512-256 bf16 model", [&] { dot_avx512_256(fb, xb.data(), cols, y.data(), rows, 1); });
  }
  // The tile and pair paths against the nonzero paths, at a decode batch and a prefill chunk.
  std::vector<float> x64, y64;
  if (has_amx() || has_avx512_bf16()) {
    x64.assign(size_t(64 * cols), 0.25f);
    y64.resize(size_t(64 * rows));
    runs.emplace_back("avx512 nonzeros 64", [&] { nz_avx512(fb, x64.data(), cols, y64.data(), rows, 64); });
  }
  if (has_amx()) {
    runs.emplace_back("amx tiles", [&] { tiles_amx(fb, x16.data(), cols, y16.data(), rows, 16); });
    runs.emplace_back("amx tiles 64", [&] { tiles_amx(fb, x64.data(), cols, y64.data(), rows, 64); });
  }
  if (has_avx512_bf16()) {
    runs.emplace_back("avx512 pairs", [&] { pairs_avx512(fb, x16.data(), cols, y16.data(), rows, 16); });
    runs.emplace_back("avx512 pairs 64", [&] { pairs_avx512(fb, x64.data(), cols, y64.data(), rows, 64); });
  }
  if (has_avx2()) {
    word("avx2 bf16", words_avx2, fb);
    word("avx2 fp16", words_avx2, fh);
    runs.emplace_back("avx2 nonzeros", [&] { nz_avx2(fb, x16.data(), cols, y16.data(), rows, 16); });
  }
#endif
  std::vector<std::pair<const char*, double>> best;
  for (auto& run : runs) {
    run.second();  // warm-up
    best.emplace_back(run.first, 1e300);
  }
  for (int round = 0; round < 9; ++round)
    for (size_t i = 0; i < runs.size(); ++i) {
      const auto t0 = std::chrono::steady_clock::now();
      runs[i].second();
      const double t = std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - t0).count();
      best[i].second = std::min(best[i].second, t);
    }
  return best;
}

}  // namespace dsf
