// AVX-512 INT8 balanced-sparse forward, included by two translation units: balanced_int8_avx512.cpp
// (SK_BAL_INT8_VBMI 1: vpermb, AVX512_VBMI, gathers each row's kept activations out of a window's 64 bytes) and
// balanced_int8_avx512bw.cpp (SK_BAL_INT8_VBMI 0, for AVX-512 VNNI CPUs without VBMI such as Cascade Lake: up to 4
// vpshufb tables of 16 bytes, merged under the index bits 4 and 5). Then vpdpbusd (AVX512_VNNI) multiplies the
// gathered bytes by the weights, 4 per int32 lane. balanced_int8.cpp calls them only when the CPU has VNNI (and
// VBMI for the first) and the activations use 8 bits. No torch/STL headers, internal linkage for every helper
// (see bsr_avx512.cpp).
//
// Per tile of RG row groups (16 rows each) x NT tokens, RG x NT zmm int32 accumulators (one lane per row) stay in
// registers over every window: each token's window is loaded once, and per group of 4 entries each row group's
// index and weight vectors are loaded once and used for every token of the tile. Row tiles are the outer loop, so
// a tile's weights stay in L1 while the quantized tokens stream from L2. The output stage removes the zero point,
// scales, adds the bias, applies the activation and stores float32 or bfloat16, 16 rows at a time.
#pragma once
#if defined(__x86_64__)

#include <immintrin.h>

#include <cstdint>

#include "act_avx512.h"
#include "balanced_int8_kernels.h"
#include "int8_io_avx512.h"

namespace sparsekern::cpu {
namespace {

// A token's window as shuffle tables: its 64 bytes (vpermb), or NTAB broadcast 16-byte quarters (vpshufb).
template <int NTAB>
__attribute__((always_inline)) inline void load_tables(__m512i* tab, const uint8_t* xw) {
#if SK_BAL_INT8_VBMI
  tab[0] = _mm512_loadu_si512(xw);
#else
#pragma GCC unroll 4
  for (int k = 0; k < NTAB; ++k)
    tab[k] = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xw + 16 * k)));
#endif
}

// Byte i of the result: the window's byte iv[i] (bits 4 and 5 of iv in k4 and k5).
template <int NTAB>
__attribute__((always_inline)) inline __m512i gather(const __m512i* tab, __m512i iv, __mmask64 k4, __mmask64 k5) {
#if SK_BAL_INT8_VBMI
  (void)k4;
  (void)k5;
  return _mm512_permutexvar_epi8(iv, tab[0]);
#else
  if constexpr (NTAB == 1) return _mm512_shuffle_epi8(tab[0], iv);
  const __m512i lo = _mm512_mask_shuffle_epi8(_mm512_shuffle_epi8(tab[0], iv), k4, tab[1], iv);
  if constexpr (NTAB == 2) return lo;
  const __m512i hi = _mm512_mask_shuffle_epi8(_mm512_shuffle_epi8(tab[2], iv), k4, tab[3], iv);
  return _mm512_mask_blend_epi8(k5, lo, hi);
#endif
}

template <int NTAB, int RG, int NT>
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
    __m512i tab[NT][NTAB];
#pragma GCC unroll 16
    for (int t = 0; t < NT; ++t) load_tables<NTAB>(tab[t], xt + t * a.ldxq + w * a.window);
    for (int64_t q = 0; q < a.G; ++q) {
      const int64_t off = (w * a.G + q) * 64;
#pragma GCC unroll 16
      for (int r = 0; r < RG; ++r) {
        const __m512i iv = _mm512_loadu_si512(ig + r * gstride + off);
        const __m512i wv = _mm512_loadu_si512(wg + r * gstride + off);
        __mmask64 k4 = 0, k5 = 0;
        if constexpr (!SK_BAL_INT8_VBMI && NTAB > 1) k4 = _mm512_test_epi8_mask(iv, _mm512_set1_epi8(0x10));
        if constexpr (!SK_BAL_INT8_VBMI && NTAB > 2) k5 = _mm512_test_epi8_mask(iv, _mm512_set1_epi8(0x20));
#pragma GCC unroll 16
        for (int t = 0; t < NT; ++t) acc[r][t] = _mm512_dpbusd_epi32(acc[r][t], gather<NTAB>(tab[t], iv, k4, k5), wv);
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
template <int NTAB, int RG>
void fwd_rows(const BalInt8FwdArgs& a, int64_t g) {
  constexpr int TT = 4;
  int64_t t0 = 0;
  for (; t0 + TT <= a.T; t0 += TT) fwd_tile<NTAB, RG, TT>(a, g, t0);
  if (t0 < a.T) dispatch_upto<TT - 1>(a.T - t0, [&](auto nt) { fwd_tile<NTAB, RG, decltype(nt)::value>(a, g, t0); });
}

// 4 row groups per tile (16 accumulators with 4 tokens; 2 with 4 tables a token, for the registers); a single
// token takes 8, so that enough independent vpdpbusd chains hide its latency.
template <int NTAB>
void fwd_ntab(const BalInt8FwdArgs& a, int64_t g0, int64_t g1) {
  if (a.T == 1) {
    constexpr int RG = 8;
    int64_t g = g0;
    for (; g + RG <= g1; g += RG) fwd_tile<NTAB, RG, 1>(a, g, 0);
    if (g < g1) dispatch_upto<RG - 1>(g1 - g, [&](auto rg) { fwd_tile<NTAB, decltype(rg)::value, 1>(a, g, 0); });
    return;
  }
  constexpr int RG = NTAB > 2 ? 2 : 4;
  int64_t g = g0;
  for (; g + RG <= g1; g += RG) fwd_rows<NTAB, RG>(a, g);
  if (g < g1) dispatch_upto<RG - 1>(g1 - g, [&](auto rg) { fwd_rows<NTAB, decltype(rg)::value>(a, g); });
}

}  // namespace
}  // namespace sparsekern::cpu
#endif
