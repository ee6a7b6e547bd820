// AVX-VNNI INT8 block-sparse forward: vpdpbusd on ymm (the VEX encoding of AVX-VNNI, Alder Lake / Sierra Forest
// and later; Sapphire Rapids has it beside AVX512_VNNI), 4 u8 x s8 products added into each int32 lane in one
// instruction. Unlike int8_avx2.cpp's vpmaddubsw there is no int16 intermediate, so activations are 8-bit (qmax
// 127) and quantized by int8_quantize_avx2. Compiled for AVX2 + AVX-VNNI by the pragma below; bsr_int8.cpp calls
// this only when the CPU has AVX-VNNI and the cap allows it (isa.h). No torch/STL headers, internal linkage for
// every helper (see bsr_avx2.cpp).
//
// The loop structure is int8_avx512.cpp's with 8 outputs per ymm accumulator and 16 ymm registers: per group of
// 4 input features each token's 4 bytes are broadcast once (TT registers), then each 8-output slice of the
// block's [bo][4] bytes is loaded once and multiplied into the TT accumulators of that slice.
#if defined(__x86_64__)
#pragma GCC target("avx2,fma,avxvnni")

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "act_avx2.h"
#include "int8_kernels.h"

namespace sparsekern::cpu {
namespace {

template <int N>
struct Int {
  static constexpr int value = N;
};

template <int N, typename F>
inline void dispatch_upto(int64_t n, const F& f) {
  if constexpr (N >= 1) {
    if (n == N) {
      f(Int<N>{});
    } else {
      dispatch_upto<N - 1>(n, f);
    }
  }
}

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

template <int NV, int TT>
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
        for (int t = 0; t < TT; ++t) acc[t][v] = _mm256_dpbusd_avx_epi32(acc[t][v], xv[t], w);
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

// Tokens per tile: TT * NV accumulators + TT broadcasts + one weight slice within the 16 ymm registers, and at
// least 10 accumulators where that fits (vpdpbusd: latency 5, two per cycle).
template <int NV>
void fwd_nv(const Int8FwdArgs& a, int64_t r0, int64_t r1) {
  constexpr int TT = NV == 1 ? 7 : NV == 2 ? 5 : NV <= 4 ? 3 : NV <= 6 ? 2 : 1;
  int64_t t0 = 0;
  for (; t0 + TT <= a.T; t0 += TT)
    for (int64_t r = r0; r < r1; ++r) fwd_tile<NV, TT>(a, r, t0);
  if constexpr (TT > 1) {
    if (t0 < a.T) {
      dispatch_upto<TT - 1>(a.T - t0, [&](auto tt) {
        for (int64_t r = r0; r < r1; ++r) fwd_tile<NV, decltype(tt)::value>(a, r, t0);
      });
    }
  }
}

}  // namespace

void int8_fwd_avxvnni(const Int8FwdArgs& a, int64_t r0, int64_t r1) {
  switch ((a.bo + 7) / 8) {
    case 1: return fwd_nv<1>(a, r0, r1);
    case 2: return fwd_nv<2>(a, r0, r1);
    case 3: return fwd_nv<3>(a, r0, r1);
    case 4: return fwd_nv<4>(a, r0, r1);
    case 5: return fwd_nv<5>(a, r0, r1);
    case 6: return fwd_nv<6>(a, r0, r1);
    case 7: return fwd_nv<7>(a, r0, r1);
    default: return fwd_nv<8>(a, r0, r1);
  }
}

}  // namespace sparsekern::cpu
#endif
