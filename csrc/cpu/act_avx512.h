// Vectorised activations (16 x fp32, AVX-512F) for the output stage of the AVX-512 kernels: the scalar std::erf /
// std::exp per element of apply_act made a fused sparse layer slower than the unfused layer plus torch's GELU.
//
// Include only from translation units compiled with an AVX-512 target pragma. No torch or STL headers, and
// everything has internal linkage (static inline): an AVX-512 body must never be picked by the linker for another
// translation unit's call.
//
// Accuracy: GELU, tanh-GELU and SiLU stay within a small number of ulp of the float64 result, except in GELU's
// negative tail, where its error is absolute rather than relative, as torch's own float32 GELU's is (1 + erf
// cancels there); tests/test_activations_vec.py holds every ISA to the suite's rule (numbers: docs/measurements.md,
// "Accuracy of the vectorised activations").
// Special values follow torch.nn.functional in float64 (the formula as written): gelu(+inf) = inf,
// gelu(-inf) = nan (-inf * 0), gelu_tanh likewise, silu(+inf) = inf, silu(-inf) = nan, relu keeps NaN, NaN stays NaN.
// Far tails: gelu(x) = x exactly for x >~ 5.51 and -0 for x <~ -5.51; SiLU and tanh-GELU give -0 once their
// sigmoid's argument is below -87 (|result| < 1e-36).
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

// e^a for a <= 0, ~1 ulp (Cephes expf: Cody-Waite reduction by ln 2, degree-5 polynomial), flushed to +0 below
// a = -87 (e^-87 ~ 1.6e-38 is still a normal float). The flush keeps subnormals out of the arithmetic: the AVX-512
// units take a slow path on them, which slowed a fused tanh-GELU markedly on widely spread pre-activations, where
// some lanes land there (numbers: docs/measurements.md, "Forced inlining and the subnormal flush of the vectorised
// activations"). Lanes below -87, -inf and NaN compute garbage that the zero-masked scalef drops, so a needs no
// clamp; NaN gives 0 (the callers carry NaN through x).
SK_ACT_INLINE __m512 exp_nonpos_avx512(__m512 a) {
  const __mmask16 keep = _mm512_cmp_ps_mask(a, _mm512_set1_ps(-87.0f), _CMP_GE_OQ);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(a, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), a);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
  return _mm512_maskz_scalef_ps(keep, y, n);
}

// 1 / d for d >= 1 (the only divisors here): rcp (2^-14 relative) and one Newton step, ~1 ulp. A division
// costs several times more on the FP pipes, and the output stage is bound by these evaluations.
SK_ACT_INLINE __m512 recip_avx512(__m512 d) {
  const __m512 r = _mm512_rcp14_ps(d);
  return _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.0f)));
}

// Exact GELU x Phi(x) with Phi(x) = 1/2 + x P(x^2) / Q(x^2), a rational minimax fit (P degree 6, Q degree 4, as
// Eigen's erf) of the normal CDF on |x| <= 5.4, 2e-8 absolute in float64 (scripts/fit_gelu.py prints the
// coefficients and the check). 20 vector operations and no exp: the erfc/exp form this replaced cost ~40, took
// the slow subnormal path in the far negative tail, and made the fused layer slower than the unfused one.
// Beyond the fit the rational function crosses 1/2 (at |x| ~ 5.51 in float32) and keeps growing, so Phi clamped
// to [0, 1] is exactly 1 or 0 from there on: gelu(x) = x for x >~ 5.51, -0 for x <~ -5.51 (true |gelu - x|,
// |gelu| < 2e-7 there), gelu(+inf) = inf, gelu(-inf) = -inf * 0 = nan as in float64 torch, NaN stays NaN.
// x^2 is clamped to 6^2 so that P and Q stay finite (x P(36) / Q(36) still exceeds 1/2 in magnitude).
// Accuracy: see the top of this file.
SK_ACT_INLINE __m512 gelu_avx512(__m512 x) {
  const __m512 u = _mm512_min_ps(_mm512_mul_ps(x, x), _mm512_set1_ps(36.0f));  // NaN -> 36; x Phi stays NaN
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(1.161057708e-10f), u, _mm512_set1_ps(-2.225713658e-08f));
  p = _mm512_fmadd_ps(p, u, _mm512_set1_ps(3.133377732e-06f));
  p = _mm512_fmadd_ps(p, u, _mm512_set1_ps(1.589531021e-04f));
  p = _mm512_fmadd_ps(p, u, _mm512_set1_ps(4.435001407e-03f));
  p = _mm512_fmadd_ps(p, u, _mm512_set1_ps(3.478458151e-02f));
  p = _mm512_fmadd_ps(p, u, _mm512_set1_ps(3.989421725e-01f));
  __m512 q = _mm512_fmadd_ps(_mm512_set1_ps(5.867467553e-05f), u, _mm512_set1_ps(1.763563370e-03f));
  q = _mm512_fmadd_ps(q, u, _mm512_set1_ps(2.842970006e-02f));
  q = _mm512_fmadd_ps(q, u, _mm512_set1_ps(2.538569570e-01f));
  q = _mm512_fmadd_ps(q, u, _mm512_set1_ps(1.0f));
  __m512 phi = _mm512_fmadd_ps(_mm512_mul_ps(x, p), recip_avx512(q), _mm512_set1_ps(0.5f));
  phi = _mm512_min_ps(_mm512_max_ps(phi, _mm512_setzero_ps()), _mm512_set1_ps(1.0f));
  return _mm512_mul_ps(x, phi);
}

// x * sigmoid(s) as x / (1 + e^-|s|) for s >= 0 and x e^-|s| / (1 + e^-|s|) for s < 0: e^-|s| never overflows, and
// the result is accurate until e^-|s| flushes to 0 below s = -87 (|result| < 1e-36 there: -0 instead of a tiny
// number, which keeps subnormals out of the arithmetic). Special values: s = -inf gives e = 0 and x * 0 (nan for
// x = -inf, as in float64 torch), s = +inf gives x, NaN s gives e = 0 and NaN through x.
SK_ACT_INLINE __m512 x_sigmoid_avx512(__m512 x, __m512 s) {
  const __m512 e = exp_nonpos_avx512(_mm512_or_ps(s, _mm512_set1_ps(-0.0f)));  // e^-|s|
  const __mmask16 neg = _mm512_cmp_ps_mask(s, _mm512_setzero_ps(), _CMP_LT_OQ);
  const __m512 num = _mm512_mask_mul_ps(x, neg, x, e);
  return _mm512_mul_ps(num, recip_avx512(_mm512_add_ps(_mm512_set1_ps(1.0f), e)));
}

// SiLU: x sigmoid(x).
SK_ACT_INLINE __m512 silu_avx512(__m512 x) {
  return x_sigmoid_avx512(x, x);
}

// tanh-GELU 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3), evaluated as x sigmoid(2u): the same function
// without tanh's cancellation near 0 or the cancellation of 1 + tanh(u) for negative x.
SK_ACT_INLINE __m512 gelu_tanh_avx512(__m512 x) {
  const __m512 k = _mm512_set1_ps(1.59576912160573071f);  // 2 sqrt(2/pi)
  const __m512 c = _mm512_set1_ps(1.59576912160573071f * 0.044715f);
  const __m512 u2 = _mm512_mul_ps(x, _mm512_fmadd_ps(c, _mm512_mul_ps(x, x), k));
  return x_sigmoid_avx512(x, u2);
}

// Any activation without vector code here: the scalar formula of csrc/activations.h, lane by lane.
SK_ACT_INLINE __m512 act_lanes_avx512(__m512 v, Act act) {
  float l[16];
  _mm512_storeu_ps(l, v);
  for (int i = 0; i < 16; ++i) l[i] = apply_act(l[i], act);
  return _mm512_loadu_ps(l);
}

// The activation of one register (per-register form for kernels that keep tiles in registers). act is
// loop-invariant in every caller, so the branch predicts perfectly.
SK_ACT_INLINE __m512 act_avx512(__m512 v, Act act) {
  switch (act) {
    case Act::Relu:  // keeps NaN, as torch.relu does
      return _mm512_mask_mov_ps(v, _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_LT_OQ), _mm512_setzero_ps());
    case Act::Gelu: return gelu_avx512(v);
    case Act::GeluTanh: return gelu_tanh_avx512(v);
    case Act::Silu: return silu_avx512(v);
    case Act::None: return v;
    default: return act_lanes_avx512(v, act);
  }
}

// r[i] = act(r[i]) for i in [0, n): a tile kept in registers. The switch sits outside the loop so that the n
// independent evaluations interleave (one alone is a ~15-deep dependency chain).
SK_ACT_INLINE void act_tile_avx512(__m512* r, int64_t n, Act act) {
  switch (act) {
    case Act::Relu:
      for (int64_t i = 0; i < n; ++i) r[i] = act_avx512(r[i], Act::Relu);
      break;
    case Act::Gelu: _Pragma("GCC unroll 4") for (int64_t i = 0; i < n; ++i) r[i] = gelu_avx512(r[i]); break;
    case Act::GeluTanh: _Pragma("GCC unroll 4") for (int64_t i = 0; i < n; ++i) r[i] = gelu_tanh_avx512(r[i]); break;
    case Act::Silu: _Pragma("GCC unroll 4") for (int64_t i = 0; i < n; ++i) r[i] = silu_avx512(r[i]); break;
    case Act::None: break;
    default:
      for (int64_t i = 0; i < n; ++i) r[i] = act_lanes_avx512(r[i], act);
      break;
  }
}

}  // namespace sparsekern::cpu
