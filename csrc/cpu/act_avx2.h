// Vectorised activations (8 x fp32, AVX2 + FMA): the twin of act_avx512.h (same formulas, constants and special
// values; see there for the derivation and accuracy). AVX2 has no scalef, so exp builds 2^n from two halves.
//
// Include only from translation units compiled with an AVX2 target pragma. No torch or STL headers, and everything
// has internal linkage (static inline).
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "epilogue.h"

namespace sparsekern::cpu {

// Forced inlining: GCC otherwise keeps these as calls (they are long), which loads every constant again per vector
// and keeps a tile's independent evaluations from sharing hoisted constants (fused GELU measured ~2x its cost).
#ifndef SK_ACT_INLINE
#define SK_ACT_INLINE static inline __attribute__((always_inline))
#endif

// e^a for a already in [-128, 89] (GELU's argument -x^2 / 2 with |x| <= 16 is): exp without the clamps.
SK_ACT_INLINE __m256 exp_core_avx2(__m256 a) {
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(a, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), a);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  const __m256 y = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
  // n in [-185, 129]: two factors 2^n1 2^n2 with n1, n2 in [-93, 65] are normal floats; their product
  // overflows to inf or underflows gradually to 0 like scalef.
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i n1 = _mm256_srai_epi32(ni, 1);
  const __m256i n2 = _mm256_sub_epi32(ni, n1);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
  const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
  return _mm256_mul_ps(_mm256_mul_ps(y, s1), s2);
}

// e^a, ~1 ulp (Cephes expf). NaN stays NaN (the clamps pass a NaN second operand through, and so do the integer
// steps: a NaN n gives some scale, and NaN times it is NaN).
SK_ACT_INLINE __m256 exp_avx2(__m256 a) {
  a = _mm256_min_ps(_mm256_set1_ps(89.0f), a);    // e^89 > FLT_MAX: the scale gives inf
  a = _mm256_max_ps(_mm256_set1_ps(-104.0f), a);  // e^-104 < 2^-150: the scale gives 0
  return exp_core_avx2(a);
}

// 1 / d for d in [1, 8] (the only divisors here): rcp (1.5 * 2^-12 relative) and one Newton step, ~1 ulp. A division
// costs several times more on the FP pipes, and the output stage is bound by these evaluations.
SK_ACT_INLINE __m256 recip_avx2(__m256 d) {
  const __m256 r = _mm256_rcp_ps(d);
  return _mm256_mul_ps(r, _mm256_fnmadd_ps(d, r, _mm256_set1_ps(2.0f)));
}

// Exact GELU x * Phi(x), Phi(x) = erfc(-x / sqrt2) / 2, written without cancellation on either side:
//   h = erfc(|x| / sqrt2) / 2 = exp(-x^2 / 2) * erfcx(|x| / sqrt2) / 2,  Phi = h for x < 0, 1 - h for x >= 0.
// erfcx(|x| / sqrt2) / 2 is a degree-10 polynomial p' in t = 1 / (1 + q |x|) (weighted least-squares fit towards minimax
// over |x| in [0, 14], relative error 1.6e-9 in float64). x^2 is split exactly (hi + lo by FMA) because exp's
// argument reaches ~100 there, where one rounding of x^2 alone would cost ~50 ulp. |x| is clamped to 16, where h
// underflows to exactly 0: gelu(-inf) = -inf * 0 = nan and gelu(+inf) = inf * 1 = inf, as in float64 torch.
SK_ACT_INLINE __m256 gelu_avx2(__m256 x) {
  // NaN -> 16; x * Phi stays NaN.
  const __m256 ax = _mm256_min_ps(_mm256_andnot_ps(_mm256_set1_ps(-0.0f), x), _mm256_set1_ps(16.0f));
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 t = recip_avx2(_mm256_fmadd_ps(_mm256_set1_ps(0.282842726f), ax, one));
  // Estrin's scheme (4 levels instead of Horner's 10 dependent FMAs): the output stage is latency-bound.
  const __m256 t2 = _mm256_mul_ps(t, t);
  const __m256 t4 = _mm256_mul_ps(t2, t2);
  const __m256 q0 = _mm256_fmadd_ps(_mm256_set1_ps(1.129589677e-01f), t, _mm256_set1_ps(-4.510938652e-06f));
  const __m256 q1 = _mm256_fmadd_ps(_mm256_set1_ps(1.136644110e-01f), t, _mm256_set1_ps(1.114054098e-01f));
  const __m256 q2 = _mm256_fmadd_ps(_mm256_set1_ps(1.912866384e-01f), t, _mm256_set1_ps(4.208113625e-02f));
  const __m256 q3 = _mm256_fmadd_ps(_mm256_set1_ps(3.711262941e-01f), t, _mm256_set1_ps(-2.322250306e-01f));
  const __m256 q4 = _mm256_fmadd_ps(_mm256_set1_ps(1.255933345e-01f), t, _mm256_set1_ps(-3.164729774e-01f));
  const __m256 r0 = _mm256_fmadd_ps(q1, t2, q0);
  const __m256 r1 = _mm256_fmadd_ps(q3, t2, q2);
  const __m256 r2 = _mm256_fmadd_ps(_mm256_set1_ps(-1.941367425e-02f), t2, q4);
  const __m256 p = _mm256_fmadd_ps(r2, _mm256_mul_ps(t4, t4), _mm256_fmadd_ps(r1, t4, r0));
  const __m256 hi = _mm256_mul_ps(ax, ax);
  const __m256 lo = _mm256_fmsub_ps(ax, ax, hi);
  // h = exp(-(hi + lo) / 2) p' = exp(-hi / 2) p' (1 - lo / 2) to first order (|lo| <= ulp(hi) / 2).
  const __m256 m1 = _mm256_mul_ps(exp_core_avx2(_mm256_mul_ps(_mm256_set1_ps(-0.5f), hi)), p);
  const __m256 h = _mm256_fnmadd_ps(_mm256_set1_ps(0.5f), _mm256_mul_ps(m1, lo), m1);
  const __m256 neg = _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ);
  return _mm256_mul_ps(x, _mm256_blendv_ps(_mm256_sub_ps(one, h), h, neg));
}

// x * sigmoid(s) as x / (1 + e^-|s|) for s >= 0 and x e^-|s| / (1 + e^-|s|) for s < 0: e^-|s| never overflows, so
// the result stays accurate down to the subnormals (x / (1 + e^-s) gives -0 once e^-s overflows near s = -88.7).
// Special values: s = -inf gives e = 0 and x * 0 (nan for x = -inf, as in float64 torch), s = +inf gives x.
SK_ACT_INLINE __m256 x_sigmoid_avx2(__m256 x, __m256 s) {
  const __m256 e = exp_avx2(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_andnot_ps(_mm256_set1_ps(-0.0f), s)));
  const __m256 num = _mm256_blendv_ps(x, _mm256_mul_ps(x, e), _mm256_cmp_ps(s, _mm256_setzero_ps(), _CMP_LT_OQ));
  return _mm256_mul_ps(num, recip_avx2(_mm256_add_ps(_mm256_set1_ps(1.0f), e)));
}

// SiLU: x sigmoid(x).
SK_ACT_INLINE __m256 silu_avx2(__m256 x) { return x_sigmoid_avx2(x, x); }

// tanh-GELU 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3), evaluated as x sigmoid(2u): the same function
// without tanh's cancellation near 0 or the cancellation of 1 + tanh(u) for negative x.
SK_ACT_INLINE __m256 gelu_tanh_avx2(__m256 x) {
  const __m256 k = _mm256_set1_ps(1.59576912160573071f);  // 2 sqrt(2/pi)
  const __m256 c = _mm256_set1_ps(1.59576912160573071f * 0.044715f);
  const __m256 u2 = _mm256_mul_ps(x, _mm256_fmadd_ps(c, _mm256_mul_ps(x, x), k));
  return x_sigmoid_avx2(x, u2);
}

// The activation of one register (per-register form for kernels that keep tiles in registers). act is
// loop-invariant in every caller, so the branch predicts perfectly.
SK_ACT_INLINE __m256 act_avx2(__m256 v, Act act) {
  switch (act) {
    case Act::Relu:  // keeps NaN, as torch.relu does
      return _mm256_blendv_ps(v, _mm256_setzero_ps(), _mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_LT_OQ));
    case Act::Gelu:
      return gelu_avx2(v);
    case Act::GeluTanh:
      return gelu_tanh_avx2(v);
    case Act::Silu:
      return silu_avx2(v);
    default:
      return v;
  }
}

// r[i] = act(r[i]) for i in [0, n): a tile kept in registers. The switch sits outside the loop so that the n
// independent evaluations interleave (one alone is a ~30-deep dependency chain).
SK_ACT_INLINE void act_tile_avx2(__m256* r, int64_t n, Act act) {
  switch (act) {
    case Act::Relu:
      for (int64_t i = 0; i < n; ++i) r[i] = act_avx2(r[i], Act::Relu);
      break;
    case Act::Gelu:
      _Pragma("GCC unroll 4") for (int64_t i = 0; i < n; ++i) r[i] = gelu_avx2(r[i]);
      break;
    case Act::GeluTanh:
      _Pragma("GCC unroll 4") for (int64_t i = 0; i < n; ++i) r[i] = gelu_tanh_avx2(r[i]);
      break;
    case Act::Silu:
      _Pragma("GCC unroll 4") for (int64_t i = 0; i < n; ++i) r[i] = silu_avx2(r[i]);
      break;
    default:
      break;
  }
}

// y[i] = act(y[i] + bias[i]) for i in [0, n), bias may be null: a contiguous fp32 row segment, 8 lanes at a time,
// the tail through a small buffer (AVX2 has no masked float arithmetic to keep the padding lanes harmless).
static inline void act_row_avx2(float* y, const float* bias, int64_t n, Act act) {
  if (act == Act::None && bias == nullptr) return;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 v = _mm256_loadu_ps(y + i);
    if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + i));
    _mm256_storeu_ps(y + i, act_avx2(v, act));
  }
  if (i < n) {
    alignas(32) float tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t j = i; j < n; ++j) tmp[j - i] = bias ? y[j] + bias[j] : y[j];
    _mm256_store_ps(tmp, act_avx2(_mm256_load_ps(tmp), act));
    for (int64_t j = i; j < n; ++j) y[j] = tmp[j - i];
  }
}

}  // namespace sparsekern::cpu
