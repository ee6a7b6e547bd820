// Vectorised activations (8 x fp32, AVX2 + FMA): the twin of act_avx512.h (same formulas, constants and special
// values; see there for the derivation and accuracy). AVX2 has no scalef, so exp builds 2^n from its exponent bits.
// Its rcp is coarser than rcp14 (12 bits before the Newton step), which shows in the accuracy of SiLU and tanh-GELU
// where x sigmoid(s) ~ x (large x) (numbers: docs/measurements.md, "Accuracy of the vectorised activations").
//
// Include only from translation units compiled with an AVX2 target pragma. No torch or STL headers, and everything
// has internal linkage (static inline).
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "epilogue.h"

namespace sparsekern::cpu {

// Forced inlining: GCC otherwise keeps these as calls (they are long), which loads every constant again per vector
// and keeps a tile's independent evaluations from sharing hoisted constants, which made a fused GELU much slower
// (numbers: docs/measurements.md, "Forced inlining and the subnormal flush of the vectorised activations").
#ifndef SK_ACT_INLINE
#define SK_ACT_INLINE static inline __attribute__((always_inline))
#endif

// e^a for a <= 0, ~1 ulp (Cephes expf), flushed to +0 below a = -87 as in exp_nonpos_avx512. With n >= -126 the
// scale 2^n is a normal float built directly from its exponent bits. Lanes below -87, -inf and NaN compute garbage
// (inf, NaN, any bits) that the final mask clears.
SK_ACT_INLINE __m256 exp_nonpos_avx2(__m256 a) {
  const __m256 keep = _mm256_cmp_ps(a, _mm256_set1_ps(-87.0f), _CMP_GE_OQ);
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
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(keep, _mm256_mul_ps(y, _mm256_castsi256_ps(bits)));
}

// 1 / d for d >= 1 (the only divisors here): rcp (1.5 * 2^-12 relative) and one Newton step, ~1 ulp. A division
// costs several times more on the FP pipes, and the output stage is bound by these evaluations.
SK_ACT_INLINE __m256 recip_avx2(__m256 d) {
  const __m256 r = _mm256_rcp_ps(d);
  return _mm256_mul_ps(r, _mm256_fnmadd_ps(d, r, _mm256_set1_ps(2.0f)));
}

// Exact GELU x Phi(x), Phi(x) = 1/2 + x P(x^2) / Q(x^2) clamped to [0, 1]: the rational fit of gelu_avx512 (same
// coefficients, same special values; see there).
SK_ACT_INLINE __m256 gelu_avx2(__m256 x) {
  const __m256 u = _mm256_min_ps(_mm256_mul_ps(x, x), _mm256_set1_ps(36.0f));  // NaN -> 36; x Phi stays NaN
  __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(1.161057708e-10f), u, _mm256_set1_ps(-2.225713658e-08f));
  p = _mm256_fmadd_ps(p, u, _mm256_set1_ps(3.133377732e-06f));
  p = _mm256_fmadd_ps(p, u, _mm256_set1_ps(1.589531021e-04f));
  p = _mm256_fmadd_ps(p, u, _mm256_set1_ps(4.435001407e-03f));
  p = _mm256_fmadd_ps(p, u, _mm256_set1_ps(3.478458151e-02f));
  p = _mm256_fmadd_ps(p, u, _mm256_set1_ps(3.989421725e-01f));
  __m256 q = _mm256_fmadd_ps(_mm256_set1_ps(5.867467553e-05f), u, _mm256_set1_ps(1.763563370e-03f));
  q = _mm256_fmadd_ps(q, u, _mm256_set1_ps(2.842970006e-02f));
  q = _mm256_fmadd_ps(q, u, _mm256_set1_ps(2.538569570e-01f));
  q = _mm256_fmadd_ps(q, u, _mm256_set1_ps(1.0f));
  __m256 phi = _mm256_fmadd_ps(_mm256_mul_ps(x, p), recip_avx2(q), _mm256_set1_ps(0.5f));
  phi = _mm256_min_ps(_mm256_max_ps(phi, _mm256_setzero_ps()), _mm256_set1_ps(1.0f));
  return _mm256_mul_ps(x, phi);
}

// x * sigmoid(s) as x / (1 + e^-|s|) for s >= 0 and x e^-|s| / (1 + e^-|s|) for s < 0 (see x_sigmoid_avx512).
SK_ACT_INLINE __m256 x_sigmoid_avx2(__m256 x, __m256 s) {
  const __m256 e = exp_nonpos_avx2(_mm256_or_ps(s, _mm256_set1_ps(-0.0f)));  // e^-|s|
  const __m256 num = _mm256_blendv_ps(x, _mm256_mul_ps(x, e), _mm256_cmp_ps(s, _mm256_setzero_ps(), _CMP_LT_OQ));
  return _mm256_mul_ps(num, recip_avx2(_mm256_add_ps(_mm256_set1_ps(1.0f), e)));
}

// SiLU: x sigmoid(x).
SK_ACT_INLINE __m256 silu_avx2(__m256 x) {
  return x_sigmoid_avx2(x, x);
}

// tanh-GELU 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3), evaluated as x sigmoid(2u): the same function
// without tanh's cancellation near 0 or the cancellation of 1 + tanh(u) for negative x.
SK_ACT_INLINE __m256 gelu_tanh_avx2(__m256 x) {
  const __m256 k = _mm256_set1_ps(1.59576912160573071f);  // 2 sqrt(2/pi)
  const __m256 c = _mm256_set1_ps(1.59576912160573071f * 0.044715f);
  const __m256 u2 = _mm256_mul_ps(x, _mm256_fmadd_ps(c, _mm256_mul_ps(x, x), k));
  return x_sigmoid_avx2(x, u2);
}

// Any activation without vector code here: the scalar formula of csrc/activations.h, lane by lane.
SK_ACT_INLINE __m256 act_lanes_avx2(__m256 v, Act act) {
  float l[8];
  _mm256_storeu_ps(l, v);
  for (int i = 0; i < 8; ++i) l[i] = apply_act(l[i], act);
  return _mm256_loadu_ps(l);
}

// The activation of one register (per-register form for kernels that keep tiles in registers). act is
// loop-invariant in every caller, so the branch predicts perfectly.
SK_ACT_INLINE __m256 act_avx2(__m256 v, Act act) {
  switch (act) {
    case Act::Relu:  // keeps NaN, as torch.relu does
      return _mm256_blendv_ps(v, _mm256_setzero_ps(), _mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_LT_OQ));
    case Act::Gelu: return gelu_avx2(v);
    case Act::GeluTanh: return gelu_tanh_avx2(v);
    case Act::Silu: return silu_avx2(v);
    case Act::None: return v;
    default: return act_lanes_avx2(v, act);
  }
}

// r[i] = act(r[i]) for i in [0, n): a tile kept in registers. The switch sits outside the loop so that the n
// independent evaluations interleave (one alone is a ~15-deep dependency chain).
SK_ACT_INLINE void act_tile_avx2(__m256* r, int64_t n, Act act) {
  switch (act) {
    case Act::Relu:
      for (int64_t i = 0; i < n; ++i) r[i] = act_avx2(r[i], Act::Relu);
      break;
    case Act::Gelu: _Pragma("GCC unroll 4") for (int64_t i = 0; i < n; ++i) r[i] = gelu_avx2(r[i]); break;
    case Act::GeluTanh: _Pragma("GCC unroll 4") for (int64_t i = 0; i < n; ++i) r[i] = gelu_tanh_avx2(r[i]); break;
    case Act::Silu: _Pragma("GCC unroll 4") for (int64_t i = 0; i < n; ++i) r[i] = silu_avx2(r[i]); break;
    case Act::None: break;
    default:
      for (int64_t i = 0; i < n; ++i) r[i] = act_lanes_avx2(r[i], act);
      break;
  }
}

}  // namespace sparsekern::cpu
