// Issue rates of the instructions in cpu-bitmap's AVX2 batch-1 loop, on this core.
//
// Without performance counters (as on most cloud VMs) the way to see what bounds the
// kernel is to time its instruction mix in isolation. Each test is a loop of independent
// instructions (no chain between them, so throughput, not latency, is timed); the core's
// clock is measured right before by a dependent-add chain (one add per cycle on every
// x86-64 core since 2011), so results are in cycles per loop iteration.
//
//   gcc -O2 -mavx2 -mfma -mf16c -mbmi2 -mpopcnt scripts/op_rates.c -o /tmp/op_rates
//   taskset -c 0 /tmp/op_rates [ITERATIONS]   (default 10^8 per test, ~1 s each)
//
// "per byte" rows do the work the kernel does per 8-column bitmap byte, four bytes per
// iteration: divide by 4 for cycles per byte.
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
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

int main(int argc, char** argv) {
  if (argc > 1 && (N = atol(argv[1])) <= 0) {
    fprintf(stderr, "usage: %s [ITERATIONS > 0]\n", argv[0]);
    return 2;
  }
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
