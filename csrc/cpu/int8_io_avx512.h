// Loads and stores of the AVX-512 int8 kernels' output stages (int8_avx512.cpp, balanced_int8_avx512.h): 16 lanes
// of float32 or bfloat16 under a mask; bfloat16 rounded without AVX512_BF16. Include after the translation unit's
// `#pragma GCC target("avx512f,avx512bw,...")`; everything has internal linkage (see bsr_avx512.cpp).
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "dispatch_upto.h"

namespace sparsekern::cpu {
namespace {

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

}  // namespace
}  // namespace sparsekern::cpu
