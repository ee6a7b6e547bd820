// AVX-512 INT8 balanced-sparse forward: vpermb (AVX512_VBMI) gathers each row's kept activations out of a
// window's 64 bytes, vpdpbusd (AVX512_VNNI) multiplies them by the weights, 4 per int32 lane. Compiled for
// AVX-512 by the pragma below; balanced_int8.cpp calls it only when the CPU has VBMI and VNNI and the activations
// use 8 bits. No torch/STL headers, internal linkage for every helper (see bsr_avx512.cpp).
//
// Per tile of RG row groups (16 rows each) x NT tokens, RG x NT zmm int32 accumulators (one lane per row) stay in
// registers over every window: each token's window is loaded once (64 bytes), and per group of 4 entries each row
// group's index and weight vectors are loaded once and used for every token of the tile. Row tiles are the outer
// loop, so a tile's weights stay in L1 while the quantized tokens stream from L2. The output stage removes the
// zero point, scales, adds the bias, applies the activation and stores float32 or bfloat16, 16 rows at a time.
#if defined(__x86_64__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512vbmi,fma")
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <immintrin.h>

#include <cstdint>

#include "act_avx512.h"
#include "balanced_int8_kernels.h"

namespace sparsekern::cpu {
namespace {

template <int N>
struct Int {
  static constexpr int value = N;
};

// Calls f(Int<n>{}) for a run-time n in [1, N].
template <int N, typename F>
inline void dispatch_upto(int64_t n, const F& f) {
  if constexpr (N >= 1) {
    if (n == N) {
      f(Int<N>{});
    } else {
      dispatch_upto<N - 1>(n, f);
    }
  }
}

inline __mmask16 mask16(int64_t n) {
  return n >= 16 ? __mmask16(0xffff) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1u);
}

inline __m512 load_f32(const void* base, bool bf16, int64_t i, __mmask16 m) {
  if (bf16) {
    const __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(base) + i);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  return _mm512_maskz_loadu_ps(m, static_cast<const float*>(base) + i);
}

// Round to nearest even, NaN kept quiet (float_to_bf16, 16 lanes), without AVX512_BF16.
inline void store_out(void* base, bool bf16, int64_t i, __m512 v, __mmask16 m) {
  if (!bf16) {
    _mm512_mask_storeu_ps(static_cast<float*>(base) + i, m, v);
    return;
  }
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
  _mm256_mask_storeu_epi16(static_cast<uint16_t*>(base) + i, m, _mm512_cvtepi32_epi16(r));
}

template <int RG, int NT>
__attribute__((always_inline)) inline void fwd_tile(const BalInt8FwdArgs& a, int64_t g, int64_t t0) {
  const int64_t gstride = a.n_win * a.G * 64;
  const int8_t* wg = a.w + g * gstride;
  const uint8_t* ig = a.idx + g * gstride;
  const uint8_t* xt = a.xq + t0 * a.ldxq;
  __m512i acc[RG][NT];
#pragma GCC unroll 16
  for (int r = 0; r < RG; ++r)
#pragma GCC unroll 16
    for (int t = 0; t < NT; ++t) acc[r][t] = _mm512_setzero_si512();
  for (int64_t w = 0; w < a.n_win; ++w) {
    __m512i xv[NT];
#pragma GCC unroll 16
    for (int t = 0; t < NT; ++t) xv[t] = _mm512_loadu_si512(xt + t * a.ldxq + w * a.window);
    for (int64_t q = 0; q < a.G; ++q) {
      const int64_t off = (w * a.G + q) * 64;
#pragma GCC unroll 16
      for (int r = 0; r < RG; ++r) {
        const __m512i iv = _mm512_loadu_si512(ig + r * gstride + off);
        const __m512i wv = _mm512_loadu_si512(wg + r * gstride + off);
#pragma GCC unroll 16
        for (int t = 0; t < NT; ++t) acc[r][t] = _mm512_dpbusd_epi32(acc[r][t], _mm512_permutexvar_epi8(iv, xv[t]), wv);
      }
    }
  }
  // Output stage.
  const Act act = static_cast<Act>(a.act);
#pragma GCC unroll 16
  for (int r = 0; r < RG; ++r) {
    const int64_t o0 = (g + r) * kBalInt8Rows;
    const __mmask16 m = mask16(a.out - o0);
    const __m512 ws = _mm512_maskz_loadu_ps(m, a.w_scale + o0);
    const __m512i comp = _mm512_mullo_epi32(_mm512_maskz_loadu_epi32(m, a.w_sum + o0), _mm512_set1_epi32(a.zp));
    const __m512 bias = a.bias ? load_f32(a.bias, a.y_bf16, o0, m) : _mm512_setzero_ps();
#pragma GCC unroll 16
    for (int t = 0; t < NT; ++t) {
      const __m512 s = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][t], comp));
      const __m512 z = act_avx512(_mm512_fmadd_ps(s, _mm512_mul_ps(ws, _mm512_set1_ps(a.x_scale[t0 + t])), bias), act);
      store_out(a.y, a.y_bf16, (t0 + t) * a.out + o0, z, m);
    }
  }
}

// Row groups [g, g + RG) for every token: tiles of 4 tokens, then the rest.
template <int RG>
void fwd_rows(const BalInt8FwdArgs& a, int64_t g) {
  constexpr int TT = 4;
  int64_t t0 = 0;
  for (; t0 + TT <= a.T; t0 += TT) fwd_tile<RG, TT>(a, g, t0);
  if (t0 < a.T) dispatch_upto<TT - 1>(a.T - t0, [&](auto nt) { fwd_tile<RG, decltype(nt)::value>(a, g, t0); });
}

}  // namespace

void balanced_int8_fwd_avx512(const BalInt8FwdArgs& a, int64_t g0, int64_t g1) {
  // 4 row groups per tile (16 accumulators with 4 tokens); a single token takes 8, so that enough independent
  // vpdpbusd chains hide its latency.
  if (a.T == 1) {
    constexpr int RG = 8;
    int64_t g = g0;
    for (; g + RG <= g1; g += RG) fwd_tile<RG, 1>(a, g, 0);
    if (g < g1) dispatch_upto<RG - 1>(g1 - g, [&](auto rg) { fwd_tile<decltype(rg)::value, 1>(a, g, 0); });
    return;
  }
  constexpr int RG = 4;
  int64_t g = g0;
  for (; g + RG <= g1; g += RG) fwd_rows<RG>(a, g);
  if (g < g1) dispatch_upto<RG - 1>(g1 - g, [&](auto rg) { fwd_rows<decltype(rg)::value>(a, g); });
}

}  // namespace sparsekern::cpu
#endif
