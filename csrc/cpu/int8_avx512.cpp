// AVX-512 VNNI INT8 block-sparse forward (vpdpbusd: 4 u8 x s8 products added into each int32 lane) and the
// activation quantizer. Compiled for AVX-512 by the pragma below; bsr_int8.cpp calls these only when the CPU has
// AVX512_VNNI. No torch/STL headers, internal linkage for every helper (see bsr_avx512.cpp).
//
// Forward: per tile of TT tokens, for each block row of the chunk, TT x NV zmm int32 accumulators (NV =
// ceil(bo / 16), 16 outputs each) stay in registers over every kept block of the row; per group of 4 input
// features the block's [bo][4] bytes are loaded once (NV zmm) and each token's 4 activation bytes are broadcast.
// The token tile is the outer loop: its quantized rows (TT x in bytes) stay in L1 while the thread's block rows
// stream from L2. The output stage removes the zero point, scales, adds the bias, applies the activation and
// stores float32 or bfloat16.
//
// AMX (int8_fwd_amx, same arithmetic): tdpbusd multiplies a [16 tokens x 4*bi4] u8 tile of X by a [bi4 x 16 x 4]
// s8 tile of W into a [16 tokens x 16 outputs] int32 tile: the block layout [bi4][bo][4] is exactly that B operand
// (16 outputs = 64 bytes of a row, row stride bo * 4), and X's quantized rows are the A operand in place (row
// stride ldxq). Eight tile registers: four accumulators (2 token tiles x 2 output tiles), two X tiles, two W tiles,
// configured once per call. The accumulators go through a 4 KiB buffer into the output stage of the VNNI kernel.
// Blocks with bo a multiple of 16 (<= 64) and 16 <= bi <= 64; tokens in tiles of 16, the last < 16 through the
// VNNI kernel.
#if defined(__x86_64__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,amx-tile,amx-int8")
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "act_avx512.h"
#include "int8_io_avx512.h"
#include "int8_kernels.h"

namespace sparsekern::cpu {
namespace {

// The output stage of TT tokens from t0 x the `width` outputs from o0 (NV groups of 16, the last maybe partial, all
// cut at `out`): acc(t, v) gives the int32 sums; removes the zero point, scales, adds the bias, applies the
// activation, stores float32 or bfloat16.
template <int NV, int TT, typename Acc>
__attribute__((always_inline)) inline void output_stage(const Int8FwdArgs& a, int64_t t0, int64_t o0, int64_t width,
                                                        const Acc& acc) {
  const int64_t n = a.out - o0 < width ? a.out - o0 : width;
  const Act act = static_cast<Act>(a.act);
  __mmask16 m[NV];
  __m512 ws[NV], bias[NV];
  __m512i comp[NV];
#pragma GCC unroll 16
  for (int v = 0; v < NV; ++v) {
    m[v] = mask16(n - 16 * v);
    ws[v] = _mm512_maskz_loadu_ps(m[v], a.w_scale + o0 + 16 * v);
    comp[v] = _mm512_mullo_epi32(_mm512_maskz_loadu_epi32(m[v], a.w_sum + o0 + 16 * v), _mm512_set1_epi32(a.zp));
    bias[v] = a.bias ? load_f32(a.bias, a.y_bf16, o0 + 16 * v, m[v]) : _mm512_setzero_ps();
  }
#pragma GCC unroll 16
  for (int t = 0; t < TT; ++t) {
    const __m512 st = _mm512_set1_ps(a.x_scale[t0 + t]);
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) {
      const __m512 s = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc(t, v), comp[v]));
      const __m512 z = act_avx512(_mm512_fmadd_ps(s, _mm512_mul_ps(ws[v], st), bias[v]), act);
      store_out(a.y, a.y_bf16, (t0 + t) * a.out + o0 + 16 * v, z, m[v]);
    }
  }
}

template <int NV, int TT>
__attribute__((always_inline)) inline void fwd_tile(const Int8FwdArgs& a, int64_t r, int64_t t0) {
  const int64_t bi4 = (a.bi + 3) / 4, wstride = bi4 * a.bo * 4;
  __mmask16 mw[NV];
#pragma GCC unroll 16
  for (int v = 0; v < NV; ++v) mw[v] = mask16(a.bo - 16 * v);
  __m512i acc[TT][NV];
#pragma GCC unroll 16
  for (int t = 0; t < TT; ++t)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) acc[t][v] = _mm512_setzero_si512();
  const uint8_t* xt = a.xq + t0 * a.ldxq;
  const bool full = a.bo == 16 * NV;
  for (int64_t p = a.row_offsets[r]; p < a.row_offsets[r + 1]; ++p) {
    const int8_t* wb = a.w + p * wstride;
    const uint8_t* xb = xt + int64_t(a.col_indices[p]) * a.bi;
    for (int64_t kq = 0; kq < bi4; ++kq, wb += a.bo * 4) {
      __m512i w[NV];
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v)
        w[v] = full ? _mm512_loadu_si512(wb + 64 * v) : _mm512_maskz_loadu_epi32(mw[v], wb + 64 * v);
#pragma GCC unroll 16
      for (int t = 0; t < TT; ++t) {
        int32_t x4;
        std::memcpy(&x4, xb + t * a.ldxq + 4 * kq, 4);
        const __m512i xv = _mm512_set1_epi32(x4);
#pragma GCC unroll 16
        for (int v = 0; v < NV; ++v) acc[t][v] = _mm512_dpbusd_epi32(acc[t][v], xv, w[v]);
      }
    }
  }
  output_stage<NV, TT>(a, t0, r * a.bo, a.bo, [&](int t, int v) { return acc[t][v]; });
}

template <int NV>
void fwd_nv(const Int8FwdArgs& a, int64_t r0, int64_t r1) {
  constexpr int TT = NV <= 2 ? 8 : NV == 3 ? 6 : 5;
  int64_t t0 = 0;
  for (; t0 + TT <= a.T; t0 += TT)
    for (int64_t r = r0; r < r1; ++r) fwd_tile<NV, TT>(a, r, t0);
  if (t0 < a.T) {
    dispatch_upto<TT - 1>(a.T - t0, [&](auto tt) {
      for (int64_t r = r0; r < r1; ++r) fwd_tile<NV, decltype(tt)::value>(a, r, t0);
    });
  }
}

// ---- AMX ----------------------------------------------------------------------------------------------------------
struct TileConfig {
  uint8_t palette_id = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Accumulator tiles 0-3 ([token tile][output tile]), X tiles 4-5, W tiles 6-7 (tile numbers are immediates).
// TM token tiles of 16 from t0, NH output tiles of 16 from output group h (of the block row r); acc: 32 x 32 int32.
template <int TM, int NH>
__attribute__((always_inline)) inline void amx_tile(const Int8FwdArgs& a, int64_t r, int64_t t0, int64_t h,
                                                    int32_t* acc) {
  const int64_t bi4 = (a.bi + 3) / 4, wstride = bi4 * a.bo * 4, wrow = a.bo * 4;
  _tile_zero(0);
  if constexpr (NH == 2) _tile_zero(1);
  if constexpr (TM == 2) _tile_zero(2);
  if constexpr (TM == 2 && NH == 2) _tile_zero(3);
  const uint8_t* xt = a.xq + t0 * a.ldxq;
  for (int64_t p = a.row_offsets[r]; p < a.row_offsets[r + 1]; ++p) {
    const uint8_t* xb = xt + int64_t(a.col_indices[p]) * a.bi;
    const int8_t* wb = a.w + p * wstride + h * 64;
    _tile_loadd(4, xb, a.ldxq);
    _tile_loadd(6, wb, wrow);
    _tile_dpbusd(0, 4, 6);
    if constexpr (NH == 2) {
      _tile_loadd(7, wb + 64, wrow);
      _tile_dpbusd(1, 4, 7);
    }
    if constexpr (TM == 2) {
      _tile_loadd(5, xb + 16 * a.ldxq, a.ldxq);
      _tile_dpbusd(2, 5, 6);
      if constexpr (NH == 2) _tile_dpbusd(3, 5, 7);
    }
  }
  constexpr int64_t ld = 32 * 4;  // bytes per row of acc
  _tile_stored(0, acc, ld);
  if constexpr (NH == 2) _tile_stored(1, acc + 16, ld);
  if constexpr (TM == 2) _tile_stored(2, acc + 16 * 32, ld);
  if constexpr (TM == 2 && NH == 2) _tile_stored(3, acc + 16 * 32 + 16, ld);
  output_stage<NH, 16 * TM>(a, t0, r * a.bo + h * 16, 16 * NH,
                            [&](int t, int v) { return _mm512_load_si512(acc + t * 32 + 16 * v); });
}

template <int TM>
void amx_tokens(const Int8FwdArgs& a, int64_t r0, int64_t r1, int64_t t0, int32_t* acc) {
  const int64_t nh = a.bo / 16;
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t h = 0; h < nh; h += 2) {
      if (nh - h >= 2) {
        amx_tile<TM, 2>(a, r, t0, h, acc);
      } else {
        amx_tile<TM, 1>(a, r, t0, h, acc);
      }
    }
  }
}

}  // namespace

bool int8_amx_fits(int64_t bo, int64_t bi) {
  return bo % 16 == 0 && bo <= kInt8FastMaxBlock && bi >= 16 && bi <= 64;
}

void int8_fwd_amx(const Int8FwdArgs& a, int64_t r0, int64_t r1) {
  const int64_t bi4 = (a.bi + 3) / 4;
  TileConfig cfg;
  for (int i = 0; i < 4; ++i) cfg.rows[i] = 16, cfg.colsb[i] = 64;
  for (int i = 4; i < 6; ++i) cfg.rows[i] = 16, cfg.colsb[i] = uint16_t(bi4 * 4);
  for (int i = 6; i < 8; ++i) cfg.rows[i] = uint8_t(bi4), cfg.colsb[i] = 64;
  alignas(64) int32_t acc[32 * 32];
  int64_t t0 = 0;
  if (a.T >= 16) {
    _tile_loadconfig(&cfg);
    for (; t0 + 32 <= a.T; t0 += 32) amx_tokens<2>(a, r0, r1, t0, acc);
    if (a.T - t0 >= 16) {
      amx_tokens<1>(a, r0, r1, t0, acc);
      t0 += 16;
    }
    _tile_release();
  }
  if (t0 < a.T) {  // the last < 16 tokens
    Int8FwdArgs tail = a;
    tail.T = a.T - t0;
    tail.xq = a.xq + t0 * a.ldxq;
    tail.x_scale = a.x_scale + t0;
    tail.y = static_cast<char*>(a.y) + t0 * a.out * (a.y_bf16 ? 2 : 4);
    int8_fwd_avx512(tail, r0, r1);
  }
}

void int8_fwd_avx512(const Int8FwdArgs& a, int64_t r0, int64_t r1) {
  switch ((a.bo + 15) / 16) {
    case 1: return fwd_nv<1>(a, r0, r1);
    case 2: return fwd_nv<2>(a, r0, r1);
    case 3: return fwd_nv<3>(a, r0, r1);
    default: return fwd_nv<4>(a, r0, r1);
  }
}

void int8_quantize_avx512(const Int8QuantArgs& a, int64_t t0, int64_t t1) {
  const int64_t es = a.x_bf16 ? 2 : 4;
  const __m512 qmax = _mm512_set1_ps(float(a.qmax)), qmin = _mm512_set1_ps(-float(a.qmax));
  const __m512i zp = _mm512_set1_epi32(a.qmax + 1);
  for (int64_t t = t0; t < t1; ++t) {
    const void* row = static_cast<const char*>(a.x) + t * a.ldx * es;
    uint8_t* q = a.xq + t * a.ldxq;
    // max |x| as integer bits (NaN above Inf above every finite value), and whether any lane is NaN.
    __m512i amax = _mm512_setzero_si512();
    for (int64_t k = 0; k < a.in; k += 16) {
      const __m512i b = _mm512_castps_si512(load_f32(row, a.x_bf16, k, mask16(a.in - k)));
      amax = _mm512_max_epi32(amax, _mm512_and_si512(b, _mm512_set1_epi32(0x7fffffff)));
    }
    const uint32_t bits = uint32_t(_mm512_reduce_max_epi32(amax));
    float clip;
    std::memcpy(&clip, &bits, 4);
    const bool nan = bits > 0x7f800000u, inf = bits == 0x7f800000u;
    if (a.static_clip > 0) clip = a.static_clip;
    const float inv = float(a.qmax) / clip;
    if (nan || (a.static_clip <= 0 && inf) || !(inv <= 3.0e38f)) {
      // Non-finite: the token's outputs are NaN. A zero (or subnormal-tiny) token: exactly the bias.
      a.scale[t] = nan || (a.static_clip <= 0 && inf) ? __builtin_nanf("") : 0.0f;
      std::memset(q, a.qmax + 1, size_t(a.ldxq));
      continue;
    }
    a.scale[t] = clip / float(a.qmax);
    const __m512 vinv = _mm512_set1_ps(inv);
    for (int64_t k = 0; k < a.in; k += 16) {
      const __mmask16 m = mask16(a.in - k);
      const __m512 v = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(load_f32(row, a.x_bf16, k, m), vinv), qmin), qmax);
      const __m512i i = _mm512_add_epi32(_mm512_cvtps_epi32(v), zp);  // round to nearest even
      _mm512_mask_cvtepi32_storeu_epi8(q + k, m, i);
    }
    std::memset(q + a.in, a.qmax + 1, size_t(a.ldxq - a.in));
  }
}

}  // namespace sparsekern::cpu
#endif
