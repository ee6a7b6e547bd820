// Vectorised activations (16 x fp32, AVX-512F) for the output stage of the AVX-512 kernels: the scalar std::erf /
// std::exp per element of apply_act made a fused sparse layer slower than the unfused layer plus torch's GELU.
//
// Include only from translation units compiled with an AVX-512 target pragma. No torch or STL headers, and
// everything has internal linkage (static inline): an AVX-512 body must never be picked by the linker for another
// translation unit's call.
//
// Accuracy (fp32 against float64 erfc / expit, |x| <= 13, every float on a 1e-4 grid, 2026-11-29): GELU <= 5.8 ulp,
// SiLU <= 2.8 ulp, tanh-GELU <= 190 ulp (near x = -10, where exp's argument 2u ~ -87 carries the rounding of
// x + 0.044715 x^3: the condition of the formula, not of the evaluation; <= 3 ulp for x >= -3). torch's own fp32
// GELU and tanh-GELU are off by 3e6 ulp at |x| <= 5 and flush to 0 below x ~ -7 (1 + erf cancels).
// Special values follow torch.nn.functional in float64 (the formula as written): gelu(+inf) = inf,
// gelu(-inf) = nan (-inf * 0), gelu_tanh likewise, silu(+inf) = inf, silu(-inf) = nan, relu keeps NaN, NaN stays NaN.
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
SK_ACT_INLINE __m512 exp_core_avx512(__m512 a) {
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
  return _mm512_scalef_ps(y, n);
}

// e^a, ~1 ulp (Cephes expf: Cody-Waite reduction by ln 2, degree-5 polynomial). scalef applies 2^n with correct
// overflow to inf and gradual underflow to 0, so a only needs clamping to keep the reduction finite. NaN stays NaN
// (the clamps pass a NaN second operand through).
SK_ACT_INLINE __m512 exp_avx512(__m512 a) {
  a = _mm512_min_ps(_mm512_set1_ps(89.0f), a);    // e^89 > FLT_MAX: the scale gives inf
  a = _mm512_max_ps(_mm512_set1_ps(-104.0f), a);  // e^-104 < 2^-150: the scale gives 0
  return exp_core_avx512(a);
}

// 1 / d for d in [1, 8] (the only divisors here): rcp (2^-14 relative) and one Newton step, ~1 ulp. A division
// costs several times more on the FP pipes, and the output stage is bound by these evaluations.
SK_ACT_INLINE __m512 recip_avx512(__m512 d) {
  const __m512 r = _mm512_rcp14_ps(d);
  return _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.0f)));
}

// Exact GELU x * Phi(x), Phi(x) = erfc(-x / sqrt2) / 2, written without cancellation on either side:
//   h = erfc(|x| / sqrt2) / 2 = exp(-x^2 / 2) * erfcx(|x| / sqrt2) / 2,  Phi = h for x < 0, 1 - h for x >= 0.
// erfcx(|x| / sqrt2) / 2 is a degree-10 polynomial p' in t = 1 / (1 + q |x|) (weighted least-squares fit towards minimax
// over |x| in [0, 14], relative error 1.6e-9 in float64). x^2 is split exactly (hi + lo by FMA) because exp's
// argument reaches ~100 there, where one rounding of x^2 alone would cost ~50 ulp. |x| is clamped to 16, where h
// underflows to exactly 0: gelu(-inf) = -inf * 0 = nan and gelu(+inf) = inf * 1 = inf, as in float64 torch.
SK_ACT_INLINE __m512 gelu_avx512(__m512 x) {
  const __m512 ax = _mm512_min_ps(_mm512_abs_ps(x), _mm512_set1_ps(16.0f));  // NaN -> 16; x * Phi stays NaN
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 t = recip_avx512(_mm512_fmadd_ps(_mm512_set1_ps(0.282842726f), ax, one));
  // Estrin's scheme (4 levels instead of Horner's 10 dependent FMAs): the output stage is latency-bound.
  const __m512 t2 = _mm512_mul_ps(t, t);
  const __m512 t4 = _mm512_mul_ps(t2, t2);
  const __m512 q0 = _mm512_fmadd_ps(_mm512_set1_ps(1.129589677e-01f), t, _mm512_set1_ps(-4.510938652e-06f));
  const __m512 q1 = _mm512_fmadd_ps(_mm512_set1_ps(1.136644110e-01f), t, _mm512_set1_ps(1.114054098e-01f));
  const __m512 q2 = _mm512_fmadd_ps(_mm512_set1_ps(1.912866384e-01f), t, _mm512_set1_ps(4.208113625e-02f));
  const __m512 q3 = _mm512_fmadd_ps(_mm512_set1_ps(3.711262941e-01f), t, _mm512_set1_ps(-2.322250306e-01f));
  const __m512 q4 = _mm512_fmadd_ps(_mm512_set1_ps(1.255933345e-01f), t, _mm512_set1_ps(-3.164729774e-01f));
  const __m512 r0 = _mm512_fmadd_ps(q1, t2, q0);
  const __m512 r1 = _mm512_fmadd_ps(q3, t2, q2);
  const __m512 r2 = _mm512_fmadd_ps(_mm512_set1_ps(-1.941367425e-02f), t2, q4);
  const __m512 p = _mm512_fmadd_ps(r2, _mm512_mul_ps(t4, t4), _mm512_fmadd_ps(r1, t4, r0));
  const __m512 hi = _mm512_mul_ps(ax, ax);
  const __m512 lo = _mm512_fmsub_ps(ax, ax, hi);
  // h = exp(-(hi + lo) / 2) p' = exp(-hi / 2) p' (1 - lo / 2) to first order (|lo| <= ulp(hi) / 2).
  const __m512 m1 = _mm512_mul_ps(exp_core_avx512(_mm512_mul_ps(_mm512_set1_ps(-0.5f), hi)), p);
  const __m512 h = _mm512_fnmadd_ps(_mm512_set1_ps(0.5f), _mm512_mul_ps(m1, lo), m1);
  const __mmask16 pos = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_NLT_UQ);
  return _mm512_mul_ps(x, _mm512_mask_sub_ps(h, pos, one, h));
}

// x * sigmoid(s) as x / (1 + e^-|s|) for s >= 0 and x e^-|s| / (1 + e^-|s|) for s < 0: e^-|s| never overflows, so
// the result stays accurate down to the subnormals (x / (1 + e^-s) gives -0 once e^-s overflows near s = -88.7).
// Special values: s = -inf gives e = 0 and x * 0 (nan for x = -inf, as in float64 torch), s = +inf gives x.
SK_ACT_INLINE __m512 x_sigmoid_avx512(__m512 x, __m512 s) {
  const __m512 e = exp_avx512(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(s)));
  const __mmask16 neg = _mm512_cmp_ps_mask(s, _mm512_setzero_ps(), _CMP_LT_OQ);
  const __m512 num = _mm512_mask_mov_ps(x, neg, _mm512_mul_ps(x, e));
  return _mm512_mul_ps(num, recip_avx512(_mm512_add_ps(_mm512_set1_ps(1.0f), e)));
}

// SiLU: x sigmoid(x).
SK_ACT_INLINE __m512 silu_avx512(__m512 x) { return x_sigmoid_avx512(x, x); }

// tanh-GELU 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3), evaluated as x sigmoid(2u): the same function
// without tanh's cancellation near 0 or the cancellation of 1 + tanh(u) for negative x.
SK_ACT_INLINE __m512 gelu_tanh_avx512(__m512 x) {
  const __m512 k = _mm512_set1_ps(1.59576912160573071f);  // 2 sqrt(2/pi)
  const __m512 c = _mm512_set1_ps(1.59576912160573071f * 0.044715f);
  const __m512 u2 = _mm512_mul_ps(x, _mm512_fmadd_ps(c, _mm512_mul_ps(x, x), k));
  return x_sigmoid_avx512(x, u2);
}

// The activation of one register (per-register form for kernels that keep tiles in registers). act is
// loop-invariant in every caller, so the branch predicts perfectly.
SK_ACT_INLINE __m512 act_avx512(__m512 v, Act act) {
  switch (act) {
    case Act::Relu:  // keeps NaN, as torch.relu does
      return _mm512_mask_mov_ps(v, _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_LT_OQ), _mm512_setzero_ps());
    case Act::Gelu:
      return gelu_avx512(v);
    case Act::GeluTanh:
      return gelu_tanh_avx512(v);
    case Act::Silu:
      return silu_avx512(v);
    default:
      return v;
  }
}

// r[i] = act(r[i]) for i in [0, n): a tile kept in registers. The switch sits outside the loop so that the n
// independent evaluations interleave (one alone is a ~30-deep dependency chain).
SK_ACT_INLINE void act_tile_avx512(__m512* r, int64_t n, Act act) {
  switch (act) {
    case Act::Relu:
      for (int64_t i = 0; i < n; ++i) r[i] = act_avx512(r[i], Act::Relu);
      break;
    case Act::Gelu:
      _Pragma("GCC unroll 4") for (int64_t i = 0; i < n; ++i) r[i] = gelu_avx512(r[i]);
      break;
    case Act::GeluTanh:
      _Pragma("GCC unroll 4") for (int64_t i = 0; i < n; ++i) r[i] = gelu_tanh_avx512(r[i]);
      break;
    case Act::Silu:
      _Pragma("GCC unroll 4") for (int64_t i = 0; i < n; ++i) r[i] = silu_avx512(r[i]);
      break;
    default:
      break;
  }
}

// y[i] = act(y[i] + bias[i]) for i in [0, n), bias may be null: a contiguous fp32 row segment, 16 lanes at a time
// with a masked tail.
static inline void act_row_avx512(float* y, const float* bias, int64_t n, Act act) {
  if (act == Act::None && bias == nullptr) return;
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1u);
    __m512 v = _mm512_maskz_loadu_ps(m, y + i);
    if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, bias + i));
    _mm512_mask_storeu_ps(y + i, m, act_avx512(v, act));
  }
}

}  // namespace sparsekern::cpu
