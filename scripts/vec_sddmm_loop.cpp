// Bare inner loop of the vector-block SDDMM (csrc/cpu/vec_avx512.cpp, `dots`) against the FMA peak, for the bounds
// in docs/measurements.md ("Vector blocks: the weight gradient"): blocks of NE entries, per step one load of the
// shared operand and per entry one broadcast of W floats of its own operand (X^T, random columns) and one FMA.
// Per-thread CPU time, so that preemption on a shared machine does not count.
//   g++ -O3 -march=native -std=c++17 -o /tmp/vec_sddmm_loop scripts/vec_sddmm_loop.cpp && /tmp/vec_sddmm_loop
// GCC 12 flags the deliberately undefined vector inside its own broadcast intrinsics.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <immintrin.h>
#include <time.h>
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>
static float sink;
template <int W>
inline __m512 bc(const float* p) {
  if constexpr (W == 16) {
    return _mm512_loadu_ps(p);
  } else if constexpr (W == 4) {
    return _mm512_broadcast_f32x4(_mm_loadu_ps(p));
  } else if constexpr (W == 2) {
    double d;
    std::memcpy(&d, p, 8);
    return _mm512_castpd_ps(_mm512_set1_pd(d));
  } else {
    return _mm512_set1_ps(*p);
  }
}
// blocks of NE entries, S steps each: a (16 floats per step, shared), the entry's W floats per step broadcast
template <int NE, int W>
__attribute__((noinline)) void loop(const int* ci, int64_t n, const float* a, const float* xt, int64_t TT, int64_t S,
                                    float* out) {
  __m512 tot = _mm512_setzero_ps();
  for (int64_t p = 0; p + NE <= n; p += NE) {
    const float* b[NE];
    for (int e = 0; e < NE; ++e) b[e] = xt + int64_t(ci[p + e]) * TT;
    __m512 acc[NE];
    for (int e = 0; e < NE; ++e) acc[e] = _mm512_setzero_ps();
    for (int64_t s = 0; s < S; ++s) {
      const __m512 av = _mm512_loadu_ps(a + s * 16);
#pragma GCC unroll 16
      for (int e = 0; e < NE; ++e) acc[e] = _mm512_fmadd_ps(av, bc<W>(b[e] + s * W), acc[e]);
    }
    for (int e = 0; e < NE; ++e) tot = _mm512_add_ps(tot, acc[e]);
  }
  _mm512_storeu_ps(out, tot);
}
// FMA peak: 24 independent chains, register operands only
__attribute__((noinline)) void peak(int64_t n, float* out) {
  __m512 acc[24];
  __m512 a = _mm512_set1_ps(1.0000001f), b = _mm512_set1_ps(0.999f);
  for (int i = 0; i < 24; ++i) acc[i] = _mm512_set1_ps(float(i));
  for (int64_t p = 0; p < n; ++p) {
#pragma GCC unroll 24
    for (int i = 0; i < 24; ++i) acc[i] = _mm512_fmadd_ps(a, acc[i], b);
    __asm__ volatile("" : "+v"(a));
  }
  for (int i = 1; i < 24; ++i) acc[0] = _mm512_add_ps(acc[0], acc[i]);
  _mm512_storeu_ps(out, acc[0]);
}
template <typename F>
double med_ns(F f, int reps = 15) {
  std::vector<double> t;
  for (int r = 0; r < reps; ++r) {
    timespec a, b;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &a);
    f();
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &b);
    t.push_back((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec));
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}
template <int NE, int W>
void run(const char* name, int nc, int64_t TT, double pk) {
  const int64_t n = 1 << 13;
  std::mt19937 rng(1);
  std::vector<int> ci(n);
  for (auto& c : ci) c = rng() % nc;
  float* xt = (float*)std::aligned_alloc(64, size_t(nc) * TT * 4);
  for (int64_t i = 0; i < nc * TT; ++i) xt[i] = 1e-3f * (i % 7);
  const int64_t S = TT / W;  // steps: TT tokens, W per step
  std::vector<float> a(S * 16, 0.5f);
  float out[16];
  double t = med_ns([&] {
               for (int k = 0; k < 8; ++k) loop<NE, W>(ci.data(), n, a.data(), xt, TT, S, out);
             }) /
             (8.0 * n * S);
  printf("%s, NE = %d, %4d columns of X^T (%4d KiB), %3ld tokens: %.4f ns per FMA = %.2f x peak\n", name, NE, nc,
         int(nc * TT * 4 / 1024), (long)TT, t, pk / t);
  sink += out[0];
  std::free(xt);
}
int main() {
  float out[16];
  double pk = med_ns([&] { peak(1 << 16, out); }) / ((1 << 16) * 24.0);
  printf("FMA peak: %.4f ns per FMA (24 chains)\n", pk);
  run<8, 2>("8x1 (vbroadcastsd)", 32, 64, pk);
  run<8, 2>("8x1 (vbroadcastsd)", 768, 64, pk);
  run<8, 2>("8x1 (vbroadcastsd)", 3072, 64, pk);
  run<8, 4>("4x1 (vbroadcastf32x4)", 768, 64, pk);
  run<8, 1>("16x1 (embedded {1to16})", 768, 64, pk);
  run<12, 2>("8x1 (vbroadcastsd)", 768, 64, pk);
  run<8, 2>("8x1 (vbroadcastsd)", 768, 256, pk);
  sink += out[0];
  printf("(checksum %g)\n", double(sink));
}
