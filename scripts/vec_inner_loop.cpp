// Bare inner loops of the vector-block kernels (csrc/cpu/vec_avx512.cpp) against the FMA peak, for the bounds in
// docs/measurements.md ("Vector blocks"). Per-thread CPU time, so that preemption on a shared machine does not count.
//   g++ -O3 -march=native -o /tmp/vec_inner_loop scripts/vec_inner_loop.cpp && /tmp/vec_inner_loop
// GCC 12 flags the deliberately undefined vector inside its own broadcast intrinsics.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <immintrin.h>
#include <time.h>
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>
static float sink;
// row vectors 1x4: per entry one vbroadcastf32x4 of w and 16 FMAs over 16 X vectors of the entry's group (1 KiB)
__attribute__((noinline)) void row4(const int* ci, const float* w, int64_t n, const float* xg, float* out) {
  __m512 acc[16];
  for (int a = 0; a < 16; ++a) acc[a] = _mm512_setzero_ps();
  for (int64_t p = 0; p < n; ++p) {
    const __m512 wv = _mm512_broadcast_f32x4(_mm_loadu_ps(w + 4 * p));
    const float* xr = xg + int64_t(ci[p]) * 256;
#pragma GCC unroll 16
    for (int a = 0; a < 16; ++a) acc[a] = _mm512_fmadd_ps(wv, _mm512_load_ps(xr + 16 * a), acc[a]);
  }
  for (int a = 1; a < 16; ++a) acc[0] = _mm512_add_ps(acc[0], acc[a]);
  _mm512_storeu_ps(out, acc[0]);
}
// column vectors 8x1: per entry 3 X^T loads, 8 broadcasts, 24 FMAs
__attribute__((noinline)) void col8(const int* ci, const float* w, int64_t n, const float* xt, float* out) {
  __m512 acc[8][3];
  for (int r = 0; r < 8; ++r)
    for (int v = 0; v < 3; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t p = 0; p < n; ++p) {
    const float* xr = xt + int64_t(ci[p]) * 48;
    __m512 xv[3];
    for (int v = 0; v < 3; ++v) xv[v] = _mm512_load_ps(xr + 16 * v);
#pragma GCC unroll 8
    for (int r = 0; r < 8; ++r) {
      const __m512 wv = _mm512_set1_ps(w[8 * p + r]);
      for (int v = 0; v < 3; ++v) acc[r][v] = _mm512_fmadd_ps(wv, xv[v], acc[r][v]);
    }
  }
  for (int r = 1; r < 8; ++r)
    for (int v = 0; v < 3; ++v) acc[0][v] = _mm512_add_ps(acc[0][v], acc[r][v]);
  _mm512_storeu_ps(out, _mm512_add_ps(acc[0][0], _mm512_add_ps(acc[0][1], acc[0][2])));
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
double best_ns(F f, int reps = 15) {
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
int main() {
  const int64_t n = 1 << 14;  // entries: w (512 KiB) and ci in L2, as in the kernels' row groups
  const int K = 64;           // passes per timed call
  std::mt19937 rng(1);
  float out[16];
  std::vector<float> w(8 * n, 0.5f);
  double pk = best_ns([&] { peak(n * 8, out); }) / (n * 8 * 24.0);
  printf("FMA peak: %.4f ns per FMA (24 chains)\n", pk);
  for (int ng : {1, 32, 192, 768}) {
    std::vector<int> ci(n);
    for (auto& c : ci) c = rng() % ng;
    float* xg = (float*)std::aligned_alloc(64, size_t(ng) * 256 * 4);
    for (int64_t i = 0; i < int64_t(ng) * 256; ++i) xg[i] = 1e-3f * (i % 7);
    double t = best_ns([&] {
                 for (int k = 0; k < K; ++k) row4(ci.data(), w.data(), n, xg, out);
               }) /
               (n * K);
    printf("row 1x4, %4d groups (%5d KiB of X): %.3f ns per entry, %.4f ns per FMA = %.2f x peak\n", ng, ng, t, t / 16,
           pk / (t / 16));
    std::free(xg);
  }
  for (int nc : {32, 768, 3072}) {
    std::vector<int> ci(n);
    for (auto& c : ci) c = rng() % nc;
    float* xt = (float*)std::aligned_alloc(64, size_t(nc) * 48 * 4);
    for (int64_t i = 0; i < int64_t(nc) * 48; ++i) xt[i] = 1e-3f * (i % 7);
    double t = best_ns([&] {
                 for (int k = 0; k < K; ++k) col8(ci.data(), w.data(), n, xt, out);
               }) /
               (n * K);
    printf("col 8x1, %4d columns (%5d KiB of X^T): %.3f ns per entry, %.4f ns per FMA = %.2f x peak\n", nc,
           nc * 48 * 4 / 1024, t, t / 24, pk / (t / 24));
    std::free(xt);
  }
  pk = best_ns([&] { peak(n * 8, out); }) / (n * 8 * 24.0);
  printf("FMA peak again: %.4f ns per FMA\n", pk);
  sink = out[0];
}
