// Tile helpers of the AVX2 kernels (balanced_avx2.cpp, csr_avx2.cpp): loads and stores of up to 8 fp32 or
// bf16 lanes, the 8x8 in-register transpose, a transposed pack of a row-major panel (X^T, token-contiguous) and
// the transposed store of a [rows][tile] buffer through bias and the activation.
//
// Include only after `#pragma GCC target("avx2,fma")`. Everything is in an anonymous namespace: each including
// translation unit gets its own copy compiled for its target, and no weak symbol can leak into baseline code.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "act_avx2.h"
#include "epilogue.h"

namespace sparsekern::cpu {
namespace {

constexpr int L = 8;  // fp32 lanes per vector

// First n (<= 8) elements of a row as fp32, zeros after (AVX2 has no 16-bit masked loads: short rows go
// through a stack copy; they only occur at matrix edges).
inline __m256 load_n(const float* p, int64_t n) {
  if (n >= L) return _mm256_loadu_ps(p);
  alignas(32) float t[L] = {};
  for (int64_t i = 0; i < n; ++i) t[i] = p[i];
  return _mm256_load_ps(t);
}
inline __m256 widen_bf16(__m128i h) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline __m256 load_n(const uint16_t* p, int64_t n) {
  if (n >= L) return widen_bf16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  alignas(16) uint16_t t[L] = {};
  for (int64_t i = 0; i < n; ++i) t[i] = p[i];
  return widen_bf16(_mm_load_si128(reinterpret_cast<const __m128i*>(t)));
}

// Round to nearest even, NaN kept quiet: the same rule as float_to_bf16 in epilogue.h.
inline __m128i to_bf16(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x0040)), nan);
  // packus packs within 128-bit lanes; the permute brings both halves into the low lane.
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08));
}

inline void store_n(float* p, __m256 v, int64_t n) {
  if (n >= L) return _mm256_storeu_ps(p, v);
  alignas(32) float t[L];
  _mm256_store_ps(t, v);
  for (int64_t i = 0; i < n; ++i) p[i] = t[i];
}
inline void store_n(uint16_t* p, __m256 v, int64_t n) {
  const __m128i h = to_bf16(v);
  if (n >= L) return _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
  alignas(16) uint16_t t[L];
  _mm_store_si128(reinterpret_cast<__m128i*>(t), h);
  for (int64_t i = 0; i < n; ++i) p[i] = t[i];
}

inline float to_f32(float v) {
  return v;
}
inline float to_f32(uint16_t v) {
  return bf16_to_float(v);
}

// In-register transpose of an L x L fp32 tile: r[i][j] -> r[j][i].
inline void transpose(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    u[4 * i + 0] = _mm256_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0x44);
    u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0xEE);
    u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[4 + i], 0x20);
    r[4 + i] = _mm256_permute2f128_ps(u[i], u[4 + i], 0x31);
  }
}

// out lane i = sum of the lanes of v[i].
inline __m256 reduce(const __m256 v[8]) {
  __m256 s[4];
  for (int i = 0; i < 4; ++i)
    s[i] = _mm256_add_ps(_mm256_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm256_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  const __m256 q0 = _mm256_add_ps(_mm256_shuffle_ps(s[0], s[1], 0x44), _mm256_shuffle_ps(s[0], s[1], 0xEE));
  const __m256 q1 = _mm256_add_ps(_mm256_shuffle_ps(s[2], s[3], 0x44), _mm256_shuffle_ps(s[2], s[3], 0xEE));
  return _mm256_add_ps(_mm256_permute2f128_ps(q0, q1, 0x20), _mm256_permute2f128_ps(q0, q1, 0x31));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
}

inline float* align64(float* p) {
  return reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t(63));
}

// Packs rows [0, tb) x columns [0, nc) of src (row stride ld) transposed into dst[c * TT + t], TT = NV * L,
// fp32, tokens tb..TT-1 zero-filled.
template <int NV, typename S>
void pack_transposed(const S* src, int64_t ld, int64_t tb, int64_t nc, float* dst) {
  constexpr int64_t TT = NV * L;
  __m256 r[L];
  for (int v = 0; v < NV; ++v) {
    const int64_t rows = tb - v * L;
    for (int64_t c = 0; c < nc; c += L) {
      const int64_t n = nc - c < L ? nc - c : L;
      for (int i = 0; i < L; ++i) r[i] = i < rows ? load_n(src + (v * L + i) * ld + c, n) : _mm256_setzero_ps();
      transpose(r);
      for (int64_t j = 0; j < n; ++j) _mm256_storeu_ps(dst + (c + j) * TT + v * L, r[j]);
    }
  }
}

// buf[r * TT + t] (rows x tb, fp32) -> dst[t * ld + r], adding bias[r] (may be null) and the activation. Token
// vectors outer, rows inner: each of the L destination rows of a token vector is then written front to back, L
// sequential streams that the hardware prefetchers follow (rows outer, every token row of the tile would be touched
// per step, too many streams to track when the rows are far apart).
template <int NV, typename D>
void store_transposed(const float* buf, int64_t rows, int64_t tb, D* dst, int64_t ld, const D* bias, Act act) {
  constexpr int64_t TT = NV * L;
  __m256 r[L];
  for (int v = 0; v < NV; ++v) {
    const int64_t toks = tb - v * L;
    if (toks <= 0) break;
    const int64_t nt = toks < L ? toks : L;
    for (int64_t o = 0; o < rows; o += L) {
      const int64_t n = rows - o < L ? rows - o : L;
      const __m256 bv = bias ? load_n(bias + o, n) : _mm256_setzero_ps();
      for (int i = 0; i < L; ++i) r[i] = i < n ? _mm256_loadu_ps(buf + (o + i) * TT + v * L) : _mm256_setzero_ps();
      transpose(r);
      for (int64_t j = 0; j < nt; ++j) r[j] = _mm256_add_ps(r[j], bv);
      act_tile_avx2(r, nt, act);
      for (int64_t j = 0; j < nt; ++j) store_n(dst + (v * L + j) * ld + o, r[j], n);
    }
  }
}

}  // namespace
}  // namespace sparsekern::cpu
