// Loads and stores of the AVX2 int8 kernels' output stages (int8_avx2.cpp, int8_avxvnni.cpp,
// balanced_int8_avx2.h): 8 lanes of float32 or bfloat16, masked at a ragged end. Include after the translation
// unit's `#pragma GCC target("avx2,...")`; everything has internal linkage (see bsr_avx2.cpp).
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "dispatch_upto.h"

namespace sparsekern::cpu {
namespace {

inline __m256i lane_mask(int64_t n) {
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(int(n < 0 ? 0 : n > 8 ? 8 : n)), idx);
}

// 8 floats from float32 or bfloat16 storage at base[i..i+n), zeros past n.
inline __m256 load_f32(const void* base, bool bf16, int64_t i, int64_t n) {
  if (bf16) {
    const uint16_t* p = static_cast<const uint16_t*>(base) + i;
    __m128i h;
    if (n >= 8) {
      h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    } else {
      uint16_t tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      std::memcpy(tmp, p, size_t(n > 0 ? n : 0) * 2);
      h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(tmp));
    }
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  const float* p = static_cast<const float*>(base) + i;
  return n >= 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, lane_mask(n));
}

inline void store_out(void* base, bool bf16, int64_t i, __m256 v, int64_t n) {
  if (!bf16) {
    float* p = static_cast<float*>(base) + i;
    if (n >= 8) {
      _mm256_storeu_ps(p, v);
    } else {
      _mm256_maskstore_ps(p, lane_mask(n), v);
    }
    return;
  }
  // Round to nearest even, NaN kept quiet (float_to_bf16, 8 lanes).
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40)), nan);
  const __m128i h = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  uint16_t* p = static_cast<uint16_t*>(base) + i;
  if (n >= 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
  } else if (n > 0) {
    uint16_t tmp[8];
    _mm_storeu_si128(reinterpret_cast<__m128i*>(tmp), h);
    std::memcpy(p, tmp, size_t(n) * 2);
  }
}

}  // namespace
}  // namespace sparsekern::cpu
