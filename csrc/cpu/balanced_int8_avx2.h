// AVX2 INT8 balanced-sparse forward, included by two translation units: balanced_int8_avx2.cpp
// (SK_BAL_INT8_AVXVNNI 0: vpmaddubsw + vpmaddwd + vpaddd, activations of 7 bits, qmax 63: vpmaddubsw's saturating
// int16 sum of two products, see int8_kernels.h) and balanced_int8_avxvnni.cpp (SK_BAL_INT8_AVXVNNI 1: AVX-VNNI's
// ymm vpdpbusd, for the 8-bit activations of an AVX-VNNI int8 path). vpshufb gathers each row's kept activations
// out of a window (16 bytes per shuffle table, up to 4 tables). No torch/STL headers, internal linkage for every
// helper (see bsr_avx2.cpp).
//
// A window of up to 64 bytes is looked up with tables D_0 = T_0, D_k = T_k ^ T_(k-1) (T_k its k-th 16 bytes,
// broadcast to both lanes): vpshufb(D_k, i - 16k) is D_k[i % 16] when i >= 16k and 0 otherwise (the sign bit), so
// the XOR over k telescopes to T_(i / 16)[i % 16]. Per tile of 8 rows (half a row group of the layout) x NT
// tokens, the NT accumulators stay in registers over every window; the tables are built once per token and window,
// the shifted indices once per group of 4 entries for every token.
#pragma once
#if defined(__x86_64__)

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "act_avx2.h"
#include "balanced_int8_kernels.h"
#include "int8_io_avx2.h"

namespace sparsekern::cpu {
namespace {

// Rows [o0, o0 + 8) of row group g (half h) for the tokens [t0, t0 + NT), windows of up to 16 * NTAB bytes.
template <int NTAB, int NT>
__attribute__((always_inline)) inline void fwd_tile(const BalInt8FwdArgs& a, int64_t g, int64_t h, int64_t t0) {
  const int64_t gstride = a.n_win * a.G * 64;
  const int8_t* wg = a.w + g * gstride + 32 * h;
  const uint8_t* ig = a.idx + g * gstride + 32 * h;
  const uint8_t* xt = a.xq + t0 * a.ldxq;
  __m256i acc[NT];
#pragma GCC unroll 16
  for (int t = 0; t < NT; ++t) acc[t] = _mm256_setzero_si256();
  for (int64_t w = 0; w < a.n_win; ++w) {
    __m256i d[NT][NTAB];
#pragma GCC unroll 16
    for (int t = 0; t < NT; ++t) {
      const uint8_t* xw = xt + t * a.ldxq + w * a.window;
      __m256i prev = _mm256_setzero_si256();
#pragma GCC unroll 4
      for (int k = 0; k < NTAB; ++k) {
        const __m256i tk = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xw + 16 * k)));
        d[t][k] = _mm256_xor_si256(tk, prev);
        prev = tk;
      }
    }
    for (int64_t q = 0; q < a.G; ++q) {
      const int64_t off = (w * a.G + q) * 64;
      const __m256i iv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ig + off));
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + off));
      __m256i ik[NTAB];
#pragma GCC unroll 4
      for (int k = 0; k < NTAB; ++k) ik[k] = _mm256_sub_epi8(iv, _mm256_set1_epi8(char(16 * k)));
#pragma GCC unroll 16
      for (int t = 0; t < NT; ++t) {
        __m256i gx = _mm256_shuffle_epi8(d[t][0], ik[0]);
#pragma GCC unroll 4
        for (int k = 1; k < NTAB; ++k) gx = _mm256_xor_si256(gx, _mm256_shuffle_epi8(d[t][k], ik[k]));
#if SK_BAL_INT8_AVXVNNI
        acc[t] = _mm256_dpbusd_avx_epi32(acc[t], gx, wv);
#else
        acc[t] = _mm256_add_epi32(acc[t], _mm256_madd_epi16(_mm256_maddubs_epi16(gx, wv), _mm256_set1_epi16(1)));
#endif
      }
    }
  }
  // Output stage.
  const Act act = static_cast<Act>(a.act);
  const int64_t o0 = g * kBalInt8Rows + 8 * h, n = a.out - o0;
  const __m256i m = lane_mask(n);
  const __m256 ws = _mm256_maskload_ps(a.w_scale + o0, m);
  const __m256i comp = _mm256_mullo_epi32(_mm256_maskload_epi32(a.w_sum + o0, m), _mm256_set1_epi32(a.zp));
  const __m256 bias = a.bias ? load_f32(a.bias, a.y_bf16, o0, n) : _mm256_setzero_ps();
#pragma GCC unroll 16
  for (int t = 0; t < NT; ++t) {
    const __m256 s = _mm256_cvtepi32_ps(_mm256_sub_epi32(acc[t], comp));
    const __m256 z = act_avx2(_mm256_fmadd_ps(s, _mm256_mul_ps(ws, _mm256_set1_ps(a.x_scale[t0 + t])), bias), act);
    store_out(a.y, a.y_bf16, (t0 + t) * a.out + o0, z, n);
  }
}

template <int NTAB>
void fwd_ntab(const BalInt8FwdArgs& a, int64_t g0, int64_t g1) {
  constexpr int TT = NTAB <= 2 ? 4 : 2;  // 16 ymm registers: NT x NTAB tables, NT accumulators
  for (int64_t g = g0; g < g1; ++g) {
    for (int64_t h = 0; h < 2 && g * kBalInt8Rows + 8 * h < a.out; ++h) {
      int64_t t0 = 0;
      for (; t0 + TT <= a.T; t0 += TT) fwd_tile<NTAB, TT>(a, g, h, t0);
      if (t0 < a.T) dispatch_upto<TT - 1>(a.T - t0, [&](auto nt) { fwd_tile<NTAB, decltype(nt)::value>(a, g, h, t0); });
    }
  }
}

}  // namespace
}  // namespace sparsekern::cpu
#endif
