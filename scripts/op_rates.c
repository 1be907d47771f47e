// Issue rates of the instructions in cpu-bitmap's AVX2 batch-1 loop, on this core (and
// with "avx512", of the AVX-512 word paths' instructions, 512- against 256-bit, and the
// compresses a gather-x-to-the-values row would use instead of the expands).
//
// Without performance counters (as on most cloud VMs) the way to see what bounds the
// kernel is to time its instruction mix in isolation. Each test is a loop of independent
// instructions (no chain between them, so throughput, not latency, is timed); the core's
// clock is measured right before by a dependent-add chain (one add per cycle on every
// x86-64 core since 2011), so results are in cycles per loop iteration.
//
//   gcc -O2 -mavx2 -mfma -mf16c -mbmi2 -mpopcnt scripts/op_rates.c -o /tmp/op_rates
//   taskset -c 0 /tmp/op_rates [ITERATIONS] [avx512]   (default 10^8 per test, ~1 s each)
//
// "per byte" rows do the work the kernel does per 8-column bitmap byte, four bytes per
// iteration: divide by 4 for cycles per byte.
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static long N = 100000000L;

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static double clock_hz(void) {
  uint64_t z = 0;
  double t0 = now();
  for (long i = 0; i < N; i++) __asm__ volatile("add $1,%0\n add $1,%0\n add $1,%0\n add $1,%0" : "+r"(z));
  return 4.0 * (double)N / (now() - t0);
}

#define CLOBBERS "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm10", "xmm11", "xmm12", "xmm13", "rbx", "rcx", "rdx", "rsi", "rdi", "r8"
#define TEST(name, body)                                                                    \
  do {                                                                                      \
    double hz = clock_hz(), t0 = now();                                                     \
    for (long i = 0; i < N; i++) __asm__ volatile(body ::: CLOBBERS);                       \
    double t = now() - t0;                                                                  \
    printf("%-44s %5.2f cycles per iteration (clock %.2f GHz)\n", name, t * hz / N, hz / 1e9); \
  } while (0)

// one bitmap byte's vector work for fp16 values: expand (vpshufb), widen, multiply-add
#define FP16_BYTE(i) "vpshufb %%xmm8,%%xmm9,%%xmm" #i "\n vcvtph2ps %%xmm" #i ",%%ymm" #i "\n vfmadd231ps %%ymm" #i ",%%ymm9,%%ymm1" #i "\n"
// bf16 values: the 32-byte shuffle places them in fp32 lanes; no widening
#define BF16_BYTE(i) "vpshufb %%ymm8,%%ymm9,%%ymm" #i "\n vfmadd231ps %%ymm" #i ",%%ymm9,%%ymm1" #i "\n"
// its integer work: table offset (rotate, mask), popcount, value index
#define INT_BYTE(sh, acc) "rorx $" #sh ",%%rax,%%rbx\n and $0xff0,%%ebx\n popcnt %%rbx,%%rcx\n add %%rcx,%%" #acc "\n"

// The AVX-512 word paths' instructions (AVX-512 BW, VBMI2, VL and BF16), 512- against
// 256-bit: on AMD Zen 4, which runs 512-bit ops as two 256-bit halves, the 512-bit
// expand issued every 1.6 cycles and the 256-bit one every cycle. Twelve independent
// accumulators cover the multiply-adds' latency (4-6 cycles). k1 (mask 0x5a5a5a5a)
// is set once: code built without -mavx512f never touches the mask registers.
#define EXPAND(w, d) "vpexpandw %%" #w "mm8,%%" #w "mm" #d "%{%%k1%}%{z%}\n"
#define COMPRESS(op, w, d) #op " %%" #w "mm8,%%" #w "mm" #d "%{%%k1%}%{z%}\n"
#define OP4(op, w) op " %%" #w "mm8,%%" #w "mm9,%%" #w "mm0\n " op " %%" #w "mm8,%%" #w "mm9,%%" #w "mm1\n " \
  op " %%" #w "mm8,%%" #w "mm9,%%" #w "mm2\n " op " %%" #w "mm8,%%" #w "mm9,%%" #w "mm3\n "
#define OP12(op, w) OP4(op, w) op " %%" #w "mm8,%%" #w "mm9,%%" #w "mm4\n " op " %%" #w "mm8,%%" #w "mm9,%%" #w "mm5\n " \
  op " %%" #w "mm8,%%" #w "mm9,%%" #w "mm6\n " op " %%" #w "mm8,%%" #w "mm9,%%" #w "mm7\n "                             \
  op " %%" #w "mm8,%%" #w "mm9,%%" #w "mm10\n " op " %%" #w "mm8,%%" #w "mm9,%%" #w "mm11\n "                          \
  op " %%" #w "mm8,%%" #w "mm9,%%" #w "mm12\n " op " %%" #w "mm8,%%" #w "mm9,%%" #w "mm13\n "

static int avx512_rates(void) {
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("avx512bw") || !__builtin_cpu_supports("avx512vbmi2") ||
      !__builtin_cpu_supports("avx512vl") || !__builtin_cpu_supports("avx512bf16")) {
    fprintf(stderr, "this CPU lacks AVX-512 BW, VBMI2, VL or BF16\n");
    return 3;
  }
  __asm__ volatile("mov $0x5a5a5a5a,%%eax\n kmovd %%eax,%%k1" ::: "rax");
  TEST("4 x vpexpandw zmm", EXPAND(z, 0) EXPAND(z, 1) EXPAND(z, 2) EXPAND(z, 3));
  TEST("4 x vpexpandw ymm", EXPAND(y, 0) EXPAND(y, 1) EXPAND(y, 2) EXPAND(y, 3));
  TEST("4 x vpcompressw zmm", COMPRESS(vpcompressw, z, 0) COMPRESS(vpcompressw, z, 1)
       COMPRESS(vpcompressw, z, 2) COMPRESS(vpcompressw, z, 3));
  TEST("4 x vpcompressw ymm", COMPRESS(vpcompressw, y, 0) COMPRESS(vpcompressw, y, 1)
       COMPRESS(vpcompressw, y, 2) COMPRESS(vpcompressw, y, 3));
  TEST("4 x vcompressps zmm", COMPRESS(vcompressps, z, 0) COMPRESS(vcompressps, z, 1)
       COMPRESS(vcompressps, z, 2) COMPRESS(vcompressps, z, 3));
  TEST("4 x (vcompressps zmm + vfmadd231ps zmm)", COMPRESS(vcompressps, z, 0) COMPRESS(vcompressps, z, 1)
       COMPRESS(vcompressps, z, 2) COMPRESS(vcompressps, z, 3)
       "vfmadd231ps %%zmm8,%%zmm9,%%zmm10\n vfmadd231ps %%zmm8,%%zmm9,%%zmm11\n"
       "vfmadd231ps %%zmm8,%%zmm9,%%zmm12\n vfmadd231ps %%zmm8,%%zmm9,%%zmm13\n");
  TEST("4 x (vpexpandw zmm + vfmadd231ps zmm)", EXPAND(z, 0) EXPAND(z, 1) EXPAND(z, 2) EXPAND(z, 3)
       "vfmadd231ps %%zmm8,%%zmm9,%%zmm10\n vfmadd231ps %%zmm8,%%zmm9,%%zmm11\n"
       "vfmadd231ps %%zmm8,%%zmm9,%%zmm12\n vfmadd231ps %%zmm8,%%zmm9,%%zmm13\n");
  TEST("4 x vpmovzxwd ymm -> zmm", "vpmovzxwd %%ymm8,%%zmm0\n vpmovzxwd %%ymm8,%%zmm1\n"
                                   "vpmovzxwd %%ymm8,%%zmm2\n vpmovzxwd %%ymm8,%%zmm3\n");
  TEST("12 x vfmadd231ps zmm", OP12("vfmadd231ps", z));
  TEST("12 x vfmadd231ps ymm", OP12("vfmadd231ps", y));
  TEST("12 x vdpbf16ps zmm", OP12("vdpbf16ps", z));
  TEST("12 x vdpbf16ps ymm", OP12("vdpbf16ps", y));
  return 0;
}

int main(int argc, char** argv) {
  if ((argc > 1 && (N = atol(argv[1])) <= 0) || (argc > 2 && strcmp(argv[2], "avx512") != 0)) {
    fprintf(stderr, "usage: %s [ITERATIONS > 0] [avx512]\n", argv[0]);
    return 2;
  }
  if (argc > 2) return avx512_rates();
  TEST("8 x vcvtph2ps ymm", "vcvtph2ps %%xmm8,%%ymm0\n vcvtph2ps %%xmm8,%%ymm1\n vcvtph2ps %%xmm8,%%ymm2\n"
                            "vcvtph2ps %%xmm8,%%ymm3\n vcvtph2ps %%xmm9,%%ymm4\n vcvtph2ps %%xmm9,%%ymm5\n"
                            "vcvtph2ps %%xmm9,%%ymm6\n vcvtph2ps %%xmm9,%%ymm7");
  TEST("8 x vpshufb xmm", "vpshufb %%xmm8,%%xmm9,%%xmm0\n vpshufb %%xmm8,%%xmm9,%%xmm1\n vpshufb %%xmm8,%%xmm9,%%xmm2\n"
                          "vpshufb %%xmm8,%%xmm9,%%xmm3\n vpshufb %%xmm8,%%xmm9,%%xmm4\n vpshufb %%xmm8,%%xmm9,%%xmm5\n"
                          "vpshufb %%xmm8,%%xmm9,%%xmm6\n vpshufb %%xmm8,%%xmm9,%%xmm7");
  TEST("8 x vfmadd231ps ymm", "vfmadd231ps %%ymm8,%%ymm9,%%ymm0\n vfmadd231ps %%ymm8,%%ymm9,%%ymm1\n"
                              "vfmadd231ps %%ymm8,%%ymm9,%%ymm2\n vfmadd231ps %%ymm8,%%ymm9,%%ymm3\n"
                              "vfmadd231ps %%ymm8,%%ymm9,%%ymm4\n vfmadd231ps %%ymm8,%%ymm9,%%ymm5\n"
                              "vfmadd231ps %%ymm8,%%ymm9,%%ymm6\n vfmadd231ps %%ymm8,%%ymm9,%%ymm7");
  TEST("8 x vcvtdq2ps ymm", "vcvtdq2ps %%ymm8,%%ymm0\n vcvtdq2ps %%ymm8,%%ymm1\n vcvtdq2ps %%ymm8,%%ymm2\n"
                            "vcvtdq2ps %%ymm8,%%ymm3\n vcvtdq2ps %%ymm9,%%ymm4\n vcvtdq2ps %%ymm9,%%ymm5\n"
                            "vcvtdq2ps %%ymm9,%%ymm6\n vcvtdq2ps %%ymm9,%%ymm7");
  TEST("4 bytes, integer work", INT_BYTE(4, rdx) INT_BYTE(12, rsi) INT_BYTE(20, rdi) INT_BYTE(28, r8));
  TEST("4 bytes, fp16 vector work", FP16_BYTE(0) FP16_BYTE(1) FP16_BYTE(2) FP16_BYTE(3));
  TEST("4 bytes, bf16 vector work", BF16_BYTE(0) BF16_BYTE(1) BF16_BYTE(2) BF16_BYTE(3));
  TEST("4 bytes, fp16 vector + integer work", INT_BYTE(4, rdx) FP16_BYTE(0) INT_BYTE(12, rsi) FP16_BYTE(1)
                                              INT_BYTE(20, rdi) FP16_BYTE(2) INT_BYTE(28, r8) FP16_BYTE(3));
  TEST("4 bytes, bf16 vector + integer work", INT_BYTE(4, rdx) BF16_BYTE(0) INT_BYTE(12, rsi) BF16_BYTE(1)
                                              INT_BYTE(20, rdi) BF16_BYTE(2) INT_BYTE(28, r8) BF16_BYTE(3));
  return 0;
}
