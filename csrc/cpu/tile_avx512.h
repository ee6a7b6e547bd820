// Tile helpers of the AVX-512 kernels (balanced_avx512.cpp, csr_avx512.cpp): loads and stores of up to 16 fp32
// or bf16 lanes, the 16x16 in-register transpose and reduction, a transposed pack of a row-major panel (X^T,
// token-contiguous) and the transposed store of a [rows][tile] buffer through bias and the activation.
//
// Include only after `#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")`. Everything is in an anonymous
// namespace: each including translation unit gets its own copy compiled for its target, and no weak symbol can
// leak into baseline code.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "act_avx512.h"
#include "epilogue.h"

namespace sparsekern::cpu {
namespace {

constexpr int L = 16;  // fp32 lanes per vector

inline __mmask16 lane_mask(int64_t n) {
  return n >= L ? __mmask16(0xFFFF) : (n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1u));
}

// First n (<= 16) elements of a row as fp32, zeros after.
inline __m512 load_n(const float* p, int64_t n) {
  return n >= L ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(lane_mask(n), p);
}
inline __m512 load_n(const uint16_t* p, int64_t n) {
  const __m256i h =
      n >= L ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)) : _mm256_maskz_loadu_epi16(lane_mask(n), p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// Round to nearest even, NaN kept quiet: the same rule as float_to_bf16 in epilogue.h.
inline __m256i to_bf16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x0040));
  return _mm512_cvtepi32_epi16(r);
}

inline void store_n(float* p, __m512 v, int64_t n) {
  if (n >= L) _mm512_storeu_ps(p, v);
  else _mm512_mask_storeu_ps(p, lane_mask(n), v);
}
inline void store_n(uint16_t* p, __m512 v, int64_t n) {
  const __m256i h = to_bf16(v);
  if (n >= L) _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
  else _mm256_mask_storeu_epi16(p, lane_mask(n), h);
}

inline float to_f32(float v) {
  return v;
}
inline float to_f32(uint16_t v) {
  return bf16_to_float(v);
}

// In-register transpose of an L x L fp32 tile: r[i][j] -> r[j][i].
inline void transpose(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i + 0] = _mm512_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0x44);
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0xEE);
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[4 + i], 0x88);
    t[4 + i] = _mm512_shuffle_f32x4(r[i], r[4 + i], 0xDD);
    t[8 + i] = _mm512_shuffle_f32x4(r[8 + i], r[12 + i], 0x88);
    t[12 + i] = _mm512_shuffle_f32x4(r[8 + i], r[12 + i], 0xDD);
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0x88);
    r[8 + i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0xDD);
  }
}

// out lane i = sum of the lanes of v[i].
inline __m512 reduce(const __m512 v[16]) {
  __m512 s[8], q[4];
  for (int i = 0; i < 8; ++i)
    s[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int m = 0; m < 4; ++m)
    q[m] =
        _mm512_add_ps(_mm512_shuffle_ps(s[2 * m], s[2 * m + 1], 0x44), _mm512_shuffle_ps(s[2 * m], s[2 * m + 1], 0xEE));
  const __m512 r01 = _mm512_add_ps(_mm512_shuffle_f32x4(q[0], q[1], 0x88), _mm512_shuffle_f32x4(q[0], q[1], 0xDD));
  const __m512 r23 = _mm512_add_ps(_mm512_shuffle_f32x4(q[2], q[3], 0x88), _mm512_shuffle_f32x4(q[2], q[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(r01, r23, 0x88), _mm512_shuffle_f32x4(r01, r23, 0xDD));
}

inline float* align64(float* p) {
  return reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t(63));
}

// Packs rows [0, tb) x columns [0, nc) of src (row stride ld) transposed into dst[c * TT + t], TT = NV * 16,
// fp32, tokens tb..TT-1 zero-filled.
template <int NV, typename S>
void pack_transposed(const S* src, int64_t ld, int64_t tb, int64_t nc, float* dst) {
  constexpr int64_t TT = NV * L;
  __m512 r[L];
  for (int v = 0; v < NV; ++v) {
    const int64_t rows = tb - v * L;
    for (int64_t c = 0; c < nc; c += L) {
      const int64_t n = nc - c < L ? nc - c : L;
      for (int i = 0; i < L; ++i) r[i] = i < rows ? load_n(src + (v * L + i) * ld + c, n) : _mm512_setzero_ps();
      transpose(r);
      for (int64_t j = 0; j < n; ++j) _mm512_storeu_ps(dst + (c + j) * TT + v * L, r[j]);
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
  __m512 r[L];
  for (int v = 0; v < NV; ++v) {
    const int64_t toks = tb - v * L;
    if (toks <= 0) break;
    const int64_t nt = toks < L ? toks : L;
    for (int64_t o = 0; o < rows; o += L) {
      const int64_t n = rows - o < L ? rows - o : L;
      const __m512 bv = bias ? load_n(bias + o, n) : _mm512_setzero_ps();
      for (int i = 0; i < L; ++i) r[i] = i < n ? _mm512_loadu_ps(buf + (o + i) * TT + v * L) : _mm512_setzero_ps();
      transpose(r);
      for (int64_t j = 0; j < nt; ++j) r[j] = _mm512_add_ps(r[j], bv);
      act_tile_avx512(r, nt, act);
      for (int64_t j = 0; j < nt; ++j) store_n(dst + (v * L + j) * ld + o, r[j], n);
    }
  }
}

}  // namespace
}  // namespace sparsekern::cpu
