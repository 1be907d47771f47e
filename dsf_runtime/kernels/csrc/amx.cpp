// The tile path (Intel AMX: AMX-TILE + AMX-BF16, Sapphire Rapids and later; AVX-512
// VBMI2 expands the bitmap words) for bf16 values at larger batches. Per block of 16
// factor rows, each 32-column bitmap word's packed values are expanded (vpexpandw) into
// one row of a dense 16 x 32 bf16 tile A, and x, rounded to bf16 once per call, is laid
// out as B tiles (32 columns x 16 batch rows, column pairs interleaved as TDPBF16PS reads
// them); C (16 factor rows x 16 batch rows, fp32) accumulates A B over the words whose
// block holds a nonzero, for up to four batch tiles per pass. Empty blocks cost nothing
// but their bitmap test, so the work follows the nonzeros block by block.
//
// The same loop also runs on emulated tiles (scalar code, any CPU): the tests check the
// blocking, expansion and layout everywhere, and the hardware path where the CPU has AMX.
// Numerics: x rounded to bf16 (the values are bf16 already), products exact in fp32,
// fp32 accumulation; the hardware flushes subnormals to zero.
#include <cpuid.h>

#include <cerrno>
#include <cstring>
#include <string>

#include "common.h"

#ifdef DSF_X86
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace dsf {
namespace {

#define DSF_AMX __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vbmi2")))

constexpr int64_t kTileM = 16;      // factor rows per tile (A and C)
constexpr int64_t kTileK = 32;      // factor columns per tile: one bitmap word
constexpr int64_t kTileN = 16;      // batch rows per C tile
constexpr int64_t kGroup = 4;       // C tiles per pass (tmm0-3); A in tmm4, B in tmm5-7
constexpr int64_t kTileElems = 512; // 16 rows x 64 bytes of bf16

// fp32 -> bf16, rounding to nearest even; NaN stays NaN.
inline uint16_t bf16_round(float v) {
  uint32_t b;
  std::memcpy(&b, &v, 4);
  if ((b & 0x7fffffffu) > 0x7f800000u) return uint16_t((b >> 16) | 0x40u);
  return uint16_t((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}

// One block of 16 factor rows as the expansion reads it: each row's bitmap words (zero
// for rows past the factor), its first packed value, and the words some row has bits in
// (the blocks the tile loop visits).
struct Block {
  std::vector<uint32_t> bits;  // [16][words]
  std::vector<int64_t> words;
  const uint16_t* start[kTileM];

  void load(const Factor& f, int64_t r0, int64_t nr) {
    bits.assign(size_t(kTileM * f.words), 0u);
    words.clear();
    const uint16_t* values = static_cast<const uint16_t*>(f.values);
    for (int64_t i = 0; i < kTileM; ++i) {
      start[i] = i < nr ? values + f.offsets[r0 + i] : values;
      if (i < nr) std::memcpy(bits.data() + i * f.words, f.bitmap + (r0 + i) * f.words, size_t(f.words) * 4);
    }
    for (int64_t w = 0; w < f.words; ++w) {
      uint32_t any = 0;
      for (int64_t i = 0; i < nr; ++i) any |= bits[size_t(i * f.words + w)];
      if (any) words.push_back(w);
    }
  }
};

// Hardware tiles: the configuration (all six tiles 16 rows x 64 bytes) is per thread.
struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

struct HwTiles {
  DSF_AMX void begin() {
    TileConfig cfg;
    std::memset(&cfg, 0, sizeof(cfg));
    cfg.palette_id = 1;
    for (int t = 0; t < 8; ++t) {
      cfg.colsb[t] = 64;
      cfg.rows[t] = 16;
    }
    _tile_loadconfig(&cfg);
  }
  DSF_AMX void zero() {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  }
  // C_j += A B_j for the ``ng`` B tiles at b (kTileElems apart).
  DSF_AMX void step(const uint16_t* a, const uint16_t* b, int64_t ng) {
    _tile_loadd(4, a, 64);
    _tile_loadd(5, b, 64);
    _tile_dpbf16ps(0, 4, 5);
    if (ng > 1) {
      _tile_loadd(6, b + kTileElems, 64);
      _tile_dpbf16ps(1, 4, 6);
    }
    if (ng > 2) {
      _tile_loadd(7, b + 2 * kTileElems, 64);
      _tile_dpbf16ps(2, 4, 7);
    }
    if (ng > 3) {
      _tile_loadd(5, b + 3 * kTileElems, 64);
      _tile_dpbf16ps(3, 4, 5);
    }
  }
  // C tiles into c [ng][16][16] fp32.
  DSF_AMX void store(float* c, int64_t ng) {
    _tile_stored(0, c, 64);
    if (ng > 1) _tile_stored(1, c + 256, 64);
    if (ng > 2) _tile_stored(2, c + 512, 64);
    if (ng > 3) _tile_stored(3, c + 768, 64);
  }
  DSF_AMX void end() { _tile_release(); }
  // Row i's packed values for each visited word w into a [w][i][32] (zeros where it has
  // no bits there).
  DSF_AMX static void expand(const Block& blk, int64_t words, uint16_t* a) {
    for (int64_t i = 0; i < kTileM; ++i) {
      const uint16_t* v = blk.start[i];
      for (const int64_t w : blk.words) {
        const uint32_t bits = blk.bits[size_t(i * words + w)];
        _mm512_storeu_si512(a + w * kTileElems + i * kTileK, _mm512_maskz_expandloadu_epi16(bits, v));
        v += __builtin_popcount(bits);
      }
    }
  }
};

// The same operations in scalar code on tiles held in memory.
struct EmulatedTiles {
  float c[kGroup][kTileM][kTileN];
  void begin() {}
  void zero() { std::memset(c, 0, sizeof(c)); }
  void step(const uint16_t* a, const uint16_t* b, int64_t ng) {
    for (int64_t j = 0; j < ng; ++j) {
      const uint16_t* bt = b + j * kTileElems;  // [16 column pairs][16 batch][2]
      for (int64_t m = 0; m < kTileM; ++m)
        for (int64_t n = 0; n < kTileN; ++n) {
          float s = c[j][m][n];
          for (int64_t p = 0; p < kTileK / 2; ++p) {
            s += bf16_to_float(a[m * kTileK + 2 * p]) * bf16_to_float(bt[p * 2 * kTileN + 2 * n]);
            s += bf16_to_float(a[m * kTileK + 2 * p + 1]) * bf16_to_float(bt[p * 2 * kTileN + 2 * n + 1]);
          }
          c[j][m][n] = s;
        }
    }
  }
  void store(float* out, int64_t ng) { std::memcpy(out, c, size_t(ng * kTileM * kTileN) * sizeof(float)); }
  void end() {}
  static void expand(const Block& blk, int64_t words, uint16_t* a) {
    for (int64_t i = 0; i < kTileM; ++i) {
      const uint16_t* v = blk.start[i];
      for (const int64_t w : blk.words) {
        uint16_t* out = a + w * kTileElems + i * kTileK;
        std::fill(out, out + kTileK, uint16_t(0));
        for (uint32_t bits = blk.bits[size_t(i * words + w)]; bits; bits &= bits - 1) out[__builtin_ctz(bits)] = *v++;
      }
    }
  }
};

// x [batch][ldx] (32 * words columns readable, zero padded) as bf16 B tiles:
// xp [words][batch tiles][16 column pairs][16 batch rows][2], zero past the batch.
std::vector<uint16_t> pack_x(const float* x, int64_t ldx, int64_t words, int64_t batch) {
  const int64_t nt = (batch + kTileN - 1) / kTileN;
  std::vector<uint16_t> xp(size_t(words * nt * kTileElems), 0);
#pragma omp parallel for schedule(static)
  for (int64_t w = 0; w < words; ++w)
    for (int64_t b = 0; b < batch; ++b) {
      uint16_t* tile = xp.data() + (w * nt + b / kTileN) * kTileElems + (b % kTileN) * 2;
      const float* xr = x + b * ldx + w * kTileK;
      for (int64_t k = 0; k < kTileK; ++k) tile[(k / 2) * 2 * kTileN + (k % 2)] = bf16_round(xr[k]);
    }
  return xp;
}

// y [batch][ldy] = S x on Tiles: batch in passes of up to kGroup tiles, factor rows in
// blocks of 16 over the threads; each thread expands its block once per pass.
template <class Tiles>
void tiles_spmm(const Factor& f, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t batch) {
  const int64_t words = f.words, nt = (batch + kTileN - 1) / kTileN;
  const int64_t row_blocks = (f.rows + kTileM - 1) / kTileM;
  const std::vector<uint16_t> xp = pack_x(x, ldx, words, batch);
  for (int64_t g0 = 0; g0 < nt; g0 += kGroup) {
    const int64_t ng = std::min(kGroup, nt - g0);
#pragma omp parallel
    {
      Tiles tiles;
      tiles.begin();
      std::vector<uint16_t> a(static_cast<size_t>(words * kTileElems));
      Block blk;
      alignas(64) float c[kGroup * kTileM * kTileN];
#pragma omp for schedule(dynamic, 1)
      for (int64_t rb = 0; rb < row_blocks; ++rb) {
        const int64_t r0 = rb * kTileM, nr = std::min(kTileM, f.rows - r0);
        blk.load(f, r0, nr);
        Tiles::expand(blk, words, a.data());
        tiles.zero();
        for (const int64_t w : blk.words)
          tiles.step(a.data() + w * kTileElems, xp.data() + (w * nt + g0) * kTileElems, ng);
        tiles.store(c, ng);
        for (int64_t j = 0; j < ng; ++j)
          for (int64_t n = 0; n < kTileN; ++n) {
            const int64_t b = (g0 + j) * kTileN + n;
            if (b >= batch) break;
            for (int64_t i = 0; i < nr; ++i) y[b * ldy + r0 + i] = c[(j * kTileM + i) * kTileN + n];
          }
      }
      tiles.end();
    }
  }
}

}  // namespace

// Why the tile path cannot run on this machine, or nullptr where it can: CPUID's
// AMX-TILE and AMX-BF16 (leaf 7 EDX bits 24, 22), AVX-512 for the expansion, the OS
// saving tile state (XCR0 bits 17, 18), and on Linux the process's permission to use
// tile data (arch_prctl ARCH_REQ_XCOMP_PERM), requested once, on the first call. Linux
// refuses it (ENOSPC) where a thread's alternate signal stack cannot hold the tile state.
const char* amx_unavailable() {
  static const std::string reason = []() -> std::string {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 24)) || !(d & (1u << 22)))
      return "the CPU has no AMX-TILE and AMX-BF16";  // cpu_bitmap.py knows no-hardware reasons by this start
    if (!has_avx512()) return "the CPU has AMX but not the AVX-512 VBMI2 that expands bitmap words";
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if ((lo & (3u << 17)) != (3u << 17)) return "the operating system does not enable the tile state (XCR0)";
#if defined(__linux__)
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0) {
      const int err = errno;
      return std::string("Linux refused the tile-data permission (arch_prctl ARCH_REQ_XCOMP_PERM: ") +
             std::strerror(err) + (err == ENOSPC ? "; a thread's alternate signal stack is too small)" : ")");
    }
    return "";
#else
    return "the tile path asks Linux for the tile state, and this is not Linux";
#endif
  }();
  return reason.empty() ? nullptr : reason.c_str();
}

bool has_amx() { return amx_unavailable() == nullptr; }

// The tile path on AMX (bf16 values; x fp32, rounded to bf16).
void tiles_amx(const Factor& f, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t batch) {
  tiles_spmm<HwTiles>(f, x, ldx, y, ldy, batch);
}

// The same on emulated tiles, any CPU (for tests).
void tiles_emulated(const Factor& f, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t batch) {
  tiles_spmm<EmulatedTiles>(f, x, ldx, y, ldy, batch);
}

}  // namespace dsf
#endif
