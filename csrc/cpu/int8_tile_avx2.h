// The int8 block-sparse forward on 16 ymm registers, shared by the AVX2 (vpmaddubsw + vpmaddwd, int8_avx2.cpp) and
// the AVX-VNNI (vpdpbusd ymm, int8_avxvnni.cpp) kernels, which differ only in Dot: Dot::madd(acc, x, w) adds the
// products of 4 u8 x s8 pairs into each int32 lane, Dot::tokens<NV>() is the token tile for NV 8-output slices.
// The loop structure is int8_avx512.cpp's: per group of 4 input features each token's 4 bytes are broadcast once
// (TT registers), then each 8-output slice of the block's [bo][4] bytes is loaded once and multiplied into the TT
// accumulators of that slice. Include after the translation unit's target pragma (internal linkage throughout).
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "act_avx2.h"
#include "int8_io_avx2.h"
#include "int8_kernels.h"

namespace sparsekern::cpu {
namespace {

template <typename Dot, int NV, int TT>
__attribute__((always_inline)) inline void fwd_tile(const Int8FwdArgs& a, int64_t r, int64_t t0) {
  const int64_t bi4 = (a.bi + 3) / 4, wstride = bi4 * a.bo * 4;
  const bool full = a.bo == 8 * NV;
  __m256i mw[NV];
#pragma GCC unroll 16
  for (int v = 0; v < NV; ++v) mw[v] = lane_mask(a.bo - 8 * v);
  __m256i acc[TT][NV];
#pragma GCC unroll 16
  for (int t = 0; t < TT; ++t)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) acc[t][v] = _mm256_setzero_si256();
  const uint8_t* xt = a.xq + t0 * a.ldxq;
  for (int64_t p = a.row_offsets[r]; p < a.row_offsets[r + 1]; ++p) {
    const int8_t* wb = a.w + p * wstride;
    const uint8_t* xb = xt + int64_t(a.col_indices[p]) * a.bi;
    for (int64_t kq = 0; kq < bi4; ++kq, wb += a.bo * 4) {
      __m256i xv[TT];
#pragma GCC unroll 16
      for (int t = 0; t < TT; ++t) {
        int32_t x4;
        std::memcpy(&x4, xb + t * a.ldxq + 4 * kq, 4);
        xv[t] = _mm256_set1_epi32(x4);
      }
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) {
        const int* wp = reinterpret_cast<const int*>(wb + 32 * v);
        const __m256i w =
            full ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp)) : _mm256_maskload_epi32(wp, mw[v]);
#pragma GCC unroll 16
        for (int t = 0; t < TT; ++t) acc[t][v] = Dot::madd(acc[t][v], xv[t], w);
      }
    }
  }
  const int64_t o0 = r * a.bo;
  const Act act = static_cast<Act>(a.act);
#pragma GCC unroll 16
  for (int v = 0; v < NV; ++v) {
    const int64_t lanes = a.out - o0 - 8 * v < a.bo - 8 * v ? a.out - o0 - 8 * v : a.bo - 8 * v;
    const __m256i m = lane_mask(lanes);
    const __m256 ws = _mm256_maskload_ps(a.w_scale + o0 + 8 * v, m);
    const __m256i comp = _mm256_mullo_epi32(_mm256_maskload_epi32(a.w_sum + o0 + 8 * v, m), _mm256_set1_epi32(a.zp));
    const __m256 bias = a.bias ? load_f32(a.bias, a.y_bf16, o0 + 8 * v, lanes) : _mm256_setzero_ps();
#pragma GCC unroll 16
    for (int t = 0; t < TT; ++t) {
      const __m256 s = _mm256_cvtepi32_ps(_mm256_sub_epi32(acc[t][v], comp));
      const __m256 z = act_avx2(_mm256_fmadd_ps(s, _mm256_mul_ps(ws, _mm256_set1_ps(a.x_scale[t0 + t])), bias), act);
      store_out(a.y, a.y_bf16, (t0 + t) * a.out + o0 + 8 * v, z, lanes);
    }
  }
}

template <typename Dot, int NV>
void fwd_nv(const Int8FwdArgs& a, int64_t r0, int64_t r1) {
  constexpr int TT = Dot::template tokens<NV>();
  int64_t t0 = 0;
  for (; t0 + TT <= a.T; t0 += TT)
    for (int64_t r = r0; r < r1; ++r) fwd_tile<Dot, NV, TT>(a, r, t0);
  if constexpr (TT > 1) {
    if (t0 < a.T) {
      dispatch_upto<TT - 1>(a.T - t0, [&](auto tt) {
        for (int64_t r = r0; r < r1; ++r) fwd_tile<Dot, NV, decltype(tt)::value>(a, r, t0);
      });
    }
  }
}

template <typename Dot>
void fwd_avx2_family(const Int8FwdArgs& a, int64_t r0, int64_t r1) {
  switch ((a.bo + 7) / 8) {
    case 1: return fwd_nv<Dot, 1>(a, r0, r1);
    case 2: return fwd_nv<Dot, 2>(a, r0, r1);
    case 3: return fwd_nv<Dot, 3>(a, r0, r1);
    case 4: return fwd_nv<Dot, 4>(a, r0, r1);
    case 5: return fwd_nv<Dot, 5>(a, r0, r1);
    case 6: return fwd_nv<Dot, 6>(a, r0, r1);
    case 7: return fwd_nv<Dot, 7>(a, r0, r1);
    default: return fwd_nv<Dot, 8>(a, r0, r1);
  }
}

}  // namespace
}  // namespace sparsekern::cpu
