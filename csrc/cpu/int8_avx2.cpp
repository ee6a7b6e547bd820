// AVX2 INT8 block-sparse forward (vpmaddubsw: pairs of u8 x s8 products in saturating int16, then vpmaddwd by
// ones: int32 sums of 4) and the activation quantizer. Activations are 7-bit here (qmax 63, zero point 64): a pair
// of products then stays within int16 (127 * 127 * 2 = 32258), where 8-bit ones (255 * 127 * 2) would saturate.
// Compiled for AVX2 by the pragma below; bsr_int8.cpp calls these only when the CPU has AVX2 and FMA. No
// torch/STL headers, internal linkage for every helper (see bsr_avx2.cpp).
//
// The loop structure is int8_avx512.cpp's, with 8 outputs per ymm accumulator.
#if defined(__x86_64__)
#pragma GCC target("avx2,fma")

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "int8_tile_avx2.h"

namespace sparsekern::cpu {
namespace {

// vpmaddubsw: pairs of u8 x s8 products in saturating int16 (7-bit activations keep them exact), then vpmaddwd by
// ones: int32 sums of 4.
struct MaddubsDot {
  static __m256i madd(__m256i acc, __m256i x, __m256i w) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(x, w), _mm256_set1_epi16(1)));
  }
  template <int NV>
  static constexpr int tokens() {
    return NV == 1 ? 6 : NV == 2 ? 4 : NV <= 4 ? 2 : 1;
  }
};

}  // namespace

void int8_fwd_avx2(const Int8FwdArgs& a, int64_t r0, int64_t r1) {
  fwd_avx2_family<MaddubsDot>(a, r0, r1);
}

void int8_quantize_avx2(const Int8QuantArgs& a, int64_t t0, int64_t t1) {
  const int64_t es = a.x_bf16 ? 2 : 4;
  const __m256 qmax = _mm256_set1_ps(float(a.qmax)), qmin = _mm256_set1_ps(-float(a.qmax));
  const __m256i zp = _mm256_set1_epi32(a.qmax + 1);
  for (int64_t t = t0; t < t1; ++t) {
    const void* row = static_cast<const char*>(a.x) + t * a.ldx * es;
    uint8_t* q = a.xq + t * a.ldxq;
    __m256i amax = _mm256_setzero_si256();
    for (int64_t k = 0; k < a.in; k += 8) {
      const __m256i b = _mm256_castps_si256(load_f32(row, a.x_bf16, k, a.in - k));
      amax = _mm256_max_epi32(amax, _mm256_and_si256(b, _mm256_set1_epi32(0x7fffffff)));
    }
    int32_t lanes[8];
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(lanes), amax);
    uint32_t bits = 0;
    for (int i = 0; i < 8; ++i) bits = uint32_t(lanes[i]) > bits ? uint32_t(lanes[i]) : bits;
    float clip;
    std::memcpy(&clip, &bits, 4);
    const bool nan = bits > 0x7f800000u, inf = bits == 0x7f800000u;
    if (a.static_clip > 0) clip = a.static_clip;
    const float inv = float(a.qmax) / clip;
    if (nan || (a.static_clip <= 0 && inf) || !(inv <= 3.0e38f)) {
      a.scale[t] = nan || (a.static_clip <= 0 && inf) ? __builtin_nanf("") : 0.0f;
      std::memset(q, a.qmax + 1, size_t(a.ldxq));
      continue;
    }
    a.scale[t] = clip / float(a.qmax);
    const __m256 vinv = _mm256_set1_ps(inv);
    for (int64_t k = 0; k < a.in; k += 8) {
      const int64_t n = a.in - k;
      const __m256 v = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(load_f32(row, a.x_bf16, k, n), vinv), qmin), qmax);
      const __m256i i = _mm256_add_epi32(_mm256_cvtps_epi32(v), zp);  // round to nearest even
      const __m128i w16 = _mm_packus_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
      const __m128i b8 = _mm_packus_epi16(w16, w16);
      if (n >= 8) {
        _mm_storel_epi64(reinterpret_cast<__m128i*>(q + k), b8);
      } else {
        uint8_t tmp[16];
        _mm_storeu_si128(reinterpret_cast<__m128i*>(tmp), b8);
        std::memcpy(q + k, tmp, size_t(n));
      }
    }
    std::memset(q + a.in, a.qmax + 1, size_t(a.ldxq - a.in));
  }
}

}  // namespace sparsekern::cpu
#endif
