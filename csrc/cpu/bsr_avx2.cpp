// AVX2 + FMA block-sparse kernels, float32 and bfloat16 (widened to float32 on load, float32 accumulation).
// Compiled for AVX2 by the pragma below while the rest of the extension stays baseline x86-64; bsr.cpp calls
// these only when the running CPU has AVX2 and FMA. No torch/STL headers, every helper has internal linkage
// (see bsr_avx512.cpp). Same schemes as the AVX-512 kernels with 16 ymm registers: outputs are walked in
// chunks of 16 (2 ymm) with tiles of 6 tokens (12 accumulators + 2 W vectors + 1 broadcast). Of the register
// blockings that fit 16 ymm without W memory operands this has the fewest loads per FMA (8 per 12); 4 ymm x 3
// tokens would need 17 registers, and with the 4th W vector as an FMA memory operand it takes 9 loads per 12.
#if defined(__x86_64__)
#pragma GCC target("avx2,fma")

#include <immintrin.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "act_avx2.h"
#include "bsr_kernels.h"
#include "dispatch_upto.h"
#include "epilogue.h"

namespace sparsekern::cpu {
namespace {

inline int64_t min64(int64_t a, int64_t b) {
  return a < b ? a : b;
}

inline __m256i lane_mask(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(int(n < 0   ? 0
                                                  : n > 8 ? 8
                                                          : n)),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// 8 lanes from p, lanes >= n zero (never read past lane n).
inline __m256 load8(const float* p, int64_t n) {
  return n >= 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, lane_mask(n));
}
inline __m256 load8(const uint16_t* p, int64_t n) {
  __m128i h;
  if (n >= 8) {
    h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  } else {
    alignas(16) uint16_t tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    if (n > 0) std::memcpy(tmp, p, size_t(n) * sizeof(uint16_t));
    h = _mm_load_si128(reinterpret_cast<const __m128i*>(tmp));
  }
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline float load1(const float* p) {
  return *p;
}
inline float load1(const uint16_t* p) {
  return bf16_to_float(*p);
}

inline void store8(float* p, __m256 v, int64_t n) {
  if (n >= 8) {
    _mm256_storeu_ps(p, v);
  } else if (n > 0) {
    _mm256_maskstore_ps(p, lane_mask(n), v);
  }
}
// Round to nearest even, NaN kept quiet: the vector form of float_to_bf16.
inline void store8(uint16_t* p, __m256 v, int64_t n) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd)), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40)), nan);
  const __m128i h = _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08));
  if (n >= 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
  } else if (n > 0) {
    alignas(16) uint16_t tmp[8];
    _mm_store_si128(reinterpret_cast<__m128i*>(tmp), h);
    std::memcpy(p, tmp, size_t(n) * sizeof(uint16_t));
  }
}

// Output stage of a tile: + bias, f (the activation), store of the lanes < nv of every accumulator. One instance
// per activation, the switch outside the tile, so that the TT x V independent evaluations interleave.
template <typename E, int V, int TT, typename F>
__attribute__((always_inline)) inline void store_tile(__m256 (&acc)[TT][V], const E* bias, E* y, int64_t ldy,
                                                      int64_t nv, F f) {
#pragma GCC unroll 16
  for (int t = 0; t < TT; ++t)
#pragma GCC unroll 16
    for (int v = 0; v < V; ++v) {
      const __m256 z = bias ? _mm256_add_ps(acc[t][v], load8(bias + 8 * v, nv - 8 * v)) : acc[t][v];
      store8(y + t * ldy + 8 * v, f(z), nv - 8 * v);
    }
}

// ---------------------------------------------------------------- forward
// Output stage of a tile, activation switch outside the tile (see store_tile); the accumulators hold the bias.
template <typename E, int V, int TT>
__attribute__((always_inline)) inline void fwd_epilogue(const BsrFwdArgs& a, __m256 (&acc)[TT][V], E* y, int64_t nv) {
  // relu keeps NaN (max(0, v) returns v when v is NaN); the transcendental activations are those of act_avx2.h.
  switch (static_cast<Act>(a.act)) {
    case Act::Relu:
      return store_tile<E, V, TT>(acc, nullptr, y, a.out, nv,
                                  [](__m256 z) { return _mm256_max_ps(_mm256_setzero_ps(), z); });
    case Act::Gelu: return store_tile<E, V, TT>(acc, nullptr, y, a.out, nv, [](__m256 z) { return gelu_avx2(z); });
    case Act::GeluTanh:
      return store_tile<E, V, TT>(acc, nullptr, y, a.out, nv, [](__m256 z) { return gelu_tanh_avx2(z); });
    case Act::Silu: return store_tile<E, V, TT>(acc, nullptr, y, a.out, nv, [](__m256 z) { return silu_avx2(z); });
    case Act::None: return store_tile<E, V, TT>(acc, nullptr, y, a.out, nv, [](__m256 z) { return z; });
    default:
      return store_tile<E, V, TT>(acc, nullptr, y, a.out, nv,
                                  [act = static_cast<Act>(a.act)](__m256 z) { return act_lanes_avx2(z, act); });
  }
}

// When W is streamed from L3 or memory (the first token tile of a panel; every tile of one or two tokens) it is
// fetched kWLead bytes ahead, about one memory latency of consumption (see bsr_avx512.cpp).
constexpr int64_t kWLead = 16384;

// k loop of one kept block over the outputs [oc, oc + 8 V) of its row: acc[t][v] += W[k][oc + 8v..] * x[t][k].
// BO, BI: the block shape when known at compile time (0: run time). With both known and a full block, the loop
// is unrolled with every W and X operand a constant displacement from a few pointers: the run-time loop reloaded
// the stride and row offsets from the stack and was bound by instruction issue, not by the FMAs (numbers:
// docs/measurements.md, "Block-sparse AVX2 forward: unrolled full blocks"). W is masked by the block shape only
// (lanes >= bo of an outer vector), never by `out`: the rows of a ragged edge block past `out` are stored,
// computed in lanes that are not stored.
template <typename E, typename XE, int V, int TT, int BO, int BI, bool StreamW>
__attribute__((always_inline)) inline void block_f32(__m256 (&acc)[TT][V], const E* wk, const XE* const* xp, int64_t bo,
                                                     int64_t ib, int64_t nw) {
  auto step = [&](const E* w, int64_t k) __attribute__((always_inline)) {
    if constexpr (StreamW) {
      for (int64_t l = 0; l < 8 * V * int64_t(sizeof(E)); l += 64)
        _mm_prefetch(reinterpret_cast<const char*>(w) + kWLead + l, _MM_HINT_T0);
    }
    __m256 wv[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) wv[v] = BO != 0 && BO >= 8 * V ? load8(w + 8 * v, 8) : load8(w + 8 * v, nw - 8 * v);
#pragma GCC unroll 12
    for (int t = 0; t < TT; ++t) {
      const __m256 xv = _mm256_set1_ps(load1(xp[t] + k));
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) acc[t][v] = _mm256_fmadd_ps(wv[v], xv, acc[t][v]);
    }
  };
  if constexpr (BO != 0 && BI != 0) {
    if (ib == BI) {
#pragma GCC unroll 8
      for (int k = 0; k < BI; ++k) step(wk + k * BO, k);
      return;
    }
  }
  const int64_t s = BO != 0 ? BO : bo;
  for (int64_t k = 0; k < ib; ++k) step(wk + k * s, k);
}

// X of a token tile packed as float32 [block column][token][bi] (zeros past `in`), for bfloat16, whose
// broadcasts then need no scalar conversion. One packing per (panel, tile), a sequential copy. float32 X is read
// in place: on a real AVX2-only CPU packing it was slower, even for rows 4 KiB or more apart (in >= 1024), where
// packing might have been expected to pay (numbers: docs/measurements.md, "Block-sparse AVX2 forward on a real
// AVX2 CPU").
struct PackX {
  float* xs = nullptr;
  int64_t n = 0;  // floats
  ~PackX() { std::free(xs); }
};

// This thread's buffer of n floats, kept across calls; null if the allocation fails (X is then read in place).
inline float* pack_buffer(int64_t n) {
  static thread_local PackX s;
  if (s.n < n) {
    std::free(s.xs);
    s.xs = static_cast<float*>(std::aligned_alloc(64, size_t((n * 4 + 63) / 64 * 64)));
    s.n = s.xs ? n : 0;
  }
  return s.xs;
}

template <typename E, int TT>
void pack_tile(const BsrFwdArgs& a, int64_t t0, int64_t bi, float* xs) {
  const int64_t nc = (a.in + bi - 1) / bi;
  for (int t = 0; t < TT; ++t) {
    const E* xr = static_cast<const E*>(a.x) + (t0 + t) * a.ldx;
    for (int64_t c = 0; c < nc; ++c) {
      float* d = xs + (c * TT + t) * bi;
      const int64_t n = min64(bi, a.in - c * bi);
      int64_t k = 0;
      for (; k + 8 <= n; k += 8) _mm256_storeu_ps(d + k, load8(xr + c * bi + k, 8));
      for (; k < n; ++k) d[k] = load1(xr + c * bi + k);
      for (; k < bi; ++k) d[k] = 0.0f;
    }
  }
}

// One token tile (TT tokens from t0) over the block rows [r0, r1) of a panel, the outputs of each row in chunks
// of 8 V: all in one function, so that the row loop keeps its state in registers and the accumulators start from
// the bias (see bsr_avx512.cpp: a call per (row, tile) and a bias added in the output stage were costly at one or
// two blocks per row; numbers: docs/measurements.md, "Block-sparse forward: the token-tile kernel"). xs: the
// tile's packed X (XE = float), or null with XE = E (X in place).
template <typename E, typename XE, int V, int TT, int BO, int BI>
void fwd_tile_rows(const BsrFwdArgs& a, int64_t r0, int64_t r1, int64_t t0, const float* xs) {
  const XE* x = xs ? reinterpret_cast<const XE*>(xs) : static_cast<const XE*>(a.x) + t0 * a.ldx;
  const E* w = static_cast<const E*>(a.w);
  const int32_t* ro = a.row_offsets;
  const int32_t* ci = a.col_indices;
  const int64_t bo = BO != 0 ? BO : a.bo, bi = BI != 0 ? BI : a.bi, in = a.in, blk = bo * bi;
  // Packed: token t of block column c at x + (c TT + t) bi; in place: at x + t ldx + c bi.
  const int64_t ldt = xs ? bi : a.ldx, ldc = xs ? TT * bi : bi;
  const E* bias = static_cast<const E*>(a.bias);
  const bool stream_w = TT <= 2 || t0 == 0;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t pbeg = ro[r], pend = ro[r + 1];
    const int64_t ob = min64(bo, a.out - r * bo);
    E* y = static_cast<E*>(a.y) + t0 * a.out + r * bo;
    for (int64_t oc = 0; oc < ob; oc += 8 * V) {
      const int64_t nv = min64(8 * V, ob - oc), nw = bo - oc;
      __m256 acc[TT][V];
      __m256 b0[V];
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) b0[v] = bias ? load8(bias + r * bo + oc + 8 * v, nv - 8 * v) : _mm256_setzero_ps();
#pragma GCC unroll 12
      for (int t = 0; t < TT; ++t)
#pragma GCC unroll 4
        for (int v = 0; v < V; ++v) acc[t][v] = b0[v];
      const E* wk = w + pbeg * blk + oc;
      for (int64_t p = pbeg; p < pend; ++p, wk += blk) {
        const int64_t c = ci[p], ib = BI != 0 && in % BI == 0 ? BI : min64(bi, in - c * bi);
        const XE* xp[TT];
#pragma GCC unroll 12
        for (int t = 0; t < TT; ++t) xp[t] = x + c * ldc + t * ldt;
        // The next block's X lines, once per row (the other chunks of the row find them in L1): scattered columns
        // are invisible to the hardware prefetchers.
        if (oc == 0 && p + 1 < pend) {
          const XE* xn = x + int64_t(ci[p + 1]) * ldc;
#pragma GCC unroll 12
          for (int t = 0; t < TT; ++t)
            for (int64_t l = 0; l < bi * int64_t(sizeof(XE)); l += 64)
              _mm_prefetch(reinterpret_cast<const char*>(xn + t * ldt) + l, _MM_HINT_T0);
        }
        if (stream_w) {
          block_f32<E, XE, V, TT, BO, BI, true>(acc, wk, xp, bo, ib, nw);
        } else {
          block_f32<E, XE, V, TT, BO, BI, false>(acc, wk, xp, bo, ib, nw);
        }
      }
      fwd_epilogue<E, V, TT>(a, acc, y + oc, nv);
    }
  }
}

// Row panels whose W fits in half the L2 (see bsr_avx512.cpp): per token tile every row of the panel runs with
// the tile's X in L1 and the panel's W in L2.
constexpr int64_t kPanelBytes = 512 * 1024;

// Register budget (16 ymm): TT x V accumulators + V W vectors + 1 broadcast.
template <int V>
constexpr int fwd_tile_tokens() {
  return V == 1 ? 8 : V == 2 ? 6 : 3;
}

template <typename E, int V, int BO, int BI>
void fwd_rows(const BsrFwdArgs& a, int64_t r0, int64_t r1) {
  constexpr int TT = fwd_tile_tokens<V>();
  const int64_t row_bytes = a.bo * a.bi * int64_t(sizeof(E));
  const int64_t nc = (a.in + a.bi - 1) / a.bi;
  // Tiles of 1-2 tokens (decode) stream W and use each X element once per row: packing would only add a copy.
  const bool pack = a.T >= 3 && sizeof(E) == 2;
  float* xs = pack ? pack_buffer(nc * TT * a.bi) : nullptr;
  for (int64_t p0 = r0, p1; p0 < r1; p0 = p1) {
    p1 = p0 + 1;
    while (p1 < r1 && int64_t(a.row_offsets[p1 + 1] - a.row_offsets[p0]) * row_bytes <= kPanelBytes) ++p1;
    int64_t t0 = 0;
    auto tile = [&](auto tt) {
      constexpr int N = decltype(tt)::value;
      if (xs && N >= 3) {
        pack_tile<E, N>(a, t0, a.bi, xs);
        fwd_tile_rows<E, float, V, N, BO, BI>(a, p0, p1, t0, xs);
      } else {
        fwd_tile_rows<E, E, V, N, BO, BI>(a, p0, p1, t0, nullptr);
      }
    };
    for (; t0 + TT <= a.T; t0 += TT) tile(Int<TT>{});
    if (t0 < a.T) dispatch_upto<TT - 1>(a.T - t0, tile);
  }
}

template <typename E>
void fwd_dispatch(const BsrFwdArgs& a, int64_t r0, int64_t r1) {
  if (a.bo == 32 && a.bi == 32) return fwd_rows<E, 2, 32, 32>(a, r0, r1);
  if (a.bo == 16 && a.bi == 16) return fwd_rows<E, 2, 16, 16>(a, r0, r1);
  if (a.bo <= 8) return fwd_rows<E, 1, 0, 0>(a, r0, r1);
  fwd_rows<E, 2, 0, 0>(a, r0, r1);
}

// ---------------------------------------------------------------- grad_input
// As in bsr_avx512.cpp: each block is transposed (and widened to float32) once per chunk of tokens into an L1
// buffer with k contiguous; partial sums over the blocks of a column live in an fp32 buffer, whose rows hold a
// group of columns, so that dx is written a group at a time (512 contiguous bytes per row at bi = 32; see
// bsr_avx512.cpp for why 128-byte pieces of 4 KiB-aliased rows are slow).
constexpr int64_t kGiChunk = 128;
constexpr int kGiTile = 6;
constexpr int64_t kLd = kBsrFastMaxBlock;
constexpr int64_t kGiAccLd = 2 * kBsrFastMaxBlock;  // floats per token row of the partial-sum buffer

template <typename E, int TT>
void gi_tile(const BsrGradInputArgs& a, const float* wt, int64_t ob, int64_t o0, int64_t t0, float* accb, bool first) {
  const E* dy = static_cast<const E*>(a.dy) + t0 * a.lddy + o0;
  __m256 acc[TT][2];
#pragma GCC unroll 6
  for (int t = 0; t < TT; ++t)
#pragma GCC unroll 2
    for (int v = 0; v < 2; ++v) acc[t][v] = first ? _mm256_setzero_ps() : _mm256_load_ps(accb + t * kGiAccLd + 8 * v);
  for (int64_t o = 0; o < ob; ++o) {
    const __m256 w0 = _mm256_load_ps(wt + o * kLd), w1 = _mm256_load_ps(wt + o * kLd + 8);
#pragma GCC unroll 6
    for (int t = 0; t < TT; ++t) {
      const __m256 g = _mm256_set1_ps(load1(dy + t * a.lddy + o));
      acc[t][0] = _mm256_fmadd_ps(w0, g, acc[t][0]);
      acc[t][1] = _mm256_fmadd_ps(w1, g, acc[t][1]);
    }
  }
#pragma GCC unroll 6
  for (int t = 0; t < TT; ++t)
#pragma GCC unroll 2
    for (int v = 0; v < 2; ++v) _mm256_store_ps(accb + t * kGiAccLd + 8 * v, acc[t][v]);
}

template <typename E>
void gi_cols(const BsrGradInputArgs& a, int64_t c0, int64_t c1) {
  alignas(32) float accb[kGiChunk * kGiAccLd];
  alignas(32) float wt[kBsrFastMaxBlock * kLd];
  const E* w = static_cast<const E*>(a.w);
  const int64_t blk = a.bo * a.bi;
  const int64_t kwf = (a.bi + 15) / 16 * 16;  // buffer columns per block column
  const int64_t G = kGiAccLd / kwf;           // block columns per group (>= 2: bi <= kBsrFastMaxBlock)
  for (int64_t g0 = c0; g0 < c1; g0 += G) {
    const int64_t g1 = min64(g0 + G, c1);
    for (int64_t tc = 0; tc < a.T; tc += kGiChunk) {
      const int64_t tn = min64(kGiChunk, a.T - tc);
      bool empty[kGiAccLd / 16];
      for (int64_t c = g0; c < g1; ++c) {
        float* acc_c = accb + (c - g0) * kwf;
        const int64_t i0 = c * a.bi, ib = min64(a.bi, a.in - i0);
        const int64_t kw = (ib + 15) / 16 * 16;  // features handled, in chunks of 16
        bool first = true;
        for (int64_t q = a.col_offsets[c]; q < a.col_offsets[c + 1]; ++q) {
          const E* wb = w + int64_t(a.block_perm[q]) * blk;
          const int64_t o0 = int64_t(a.row_indices[q]) * a.bo, ob = min64(a.bo, a.out - o0);
          for (int64_t o = 0; o < ob; ++o)
            for (int64_t k = 0; k < kw; ++k) wt[o * kLd + k] = k < ib ? load1(wb + k * a.bo + o) : 0.0f;
          for (int64_t kc = 0; kc < kw; kc += 16) {
            int64_t t = 0;
            auto tile = [&](auto tt) {
              gi_tile<E, decltype(tt)::value>(a, wt + kc, ob, o0, tc + t, acc_c + t * kGiAccLd + kc, first);
            };
            for (; t + kGiTile <= tn; t += kGiTile) tile(Int<kGiTile>{});
            if (t < tn) dispatch_upto<kGiTile - 1>(tn - t, tile);
          }
          first = false;
        }
        empty[c - g0] = first;
      }
      E* dx = static_cast<E*>(a.dx) + tc * a.in;
      for (int64_t t = 0; t < tn; ++t)
        for (int64_t c = g0; c < g1; ++c) {
          const int64_t i0 = c * a.bi, ib = min64(a.bi, a.in - i0);
          const float* acc_c = accb + t * kGiAccLd + (c - g0) * kwf;
          for (int64_t k = 0; k < ib; k += 8) {
            const __m256 s = empty[c - g0] ? _mm256_setzero_ps() : _mm256_load_ps(acc_c + k);
            store8(dx + t * a.in + i0 + k, s, ib - k);
          }
        }
    }
  }
}

// ---------------------------------------------------------------- sddmm, in place (fallback)
// dW[k][o] = sum_t x[t, k] dy[t, o]: vectorised over 16 outputs, KG features at a time, over all tokens.
constexpr int kSdGroup = 6;  // the in-place fallback (no buffer)

template <typename E, int KG>
void sddmm_group(const BsrSddmmArgs& a, int64_t o0, int64_t nv, int64_t xk0, float* acck) {
  const E* dy = static_cast<const E*>(a.dy) + o0;
  const E* x = static_cast<const E*>(a.x) + xk0;
  __m256 acc[KG][2];
#pragma GCC unroll 6
  for (int j = 0; j < KG; ++j) acc[j][0] = acc[j][1] = _mm256_setzero_ps();
  for (int64_t t = 0; t < a.T; ++t, dy += a.lddy, x += a.ldx) {
    const __m256 g0 = load8(dy, nv), g1 = load8(dy + 8, nv - 8);
#pragma GCC unroll 6
    for (int j = 0; j < KG; ++j) {
      const __m256 xv = _mm256_set1_ps(load1(x + j));
      acc[j][0] = _mm256_fmadd_ps(g0, xv, acc[j][0]);
      acc[j][1] = _mm256_fmadd_ps(g1, xv, acc[j][1]);
    }
  }
#pragma GCC unroll 16
  for (int j = 0; j < KG; ++j) {
    _mm256_store_ps(acck + j * kLd, acc[j][0]);
    _mm256_store_ps(acck + j * kLd + 8, acc[j][1]);
  }
}

template <typename E>
void sddmm_rows_inplace(const BsrSddmmArgs& a, int64_t r0, int64_t r1) {
  alignas(32) float acc[kBsrFastMaxBlock * kLd];  // [k][o] of one block
  E* dw = static_cast<E*>(a.dw);
  const int64_t blk = a.bo * a.bi;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t o0 = r * a.bo, ob = min64(a.bo, a.out - o0);
    for (int64_t p = a.row_offsets[r]; p < a.row_offsets[r + 1]; ++p) {
      const int64_t i0 = int64_t(a.col_indices[p]) * a.bi, ib = min64(a.bi, a.in - i0);
      for (int64_t oc = 0; oc < ob; oc += 16) {
        for (int64_t kg = 0; kg < ib; kg += kSdGroup) {
          dispatch_upto<kSdGroup>(min64(kSdGroup, ib - kg), [&](auto kk) {
            sddmm_group<E, decltype(kk)::value>(a, o0 + oc, ob - oc, i0 + kg, acc + kg * kLd + oc);
          });
        }
      }
      // Entries of a ragged edge block outside the matrix get an exact zero gradient.
      E* dwb = dw + p * blk;
      for (int64_t k = 0; k < a.bi; ++k)
        for (int64_t o = 0; o < a.bo; o += 8) {
          const __m256 s =
              k < ib ? _mm256_and_ps(_mm256_load_ps(acc + k * kLd + o), _mm256_castsi256_ps(lane_mask(ob - o)))
                     : _mm256_setzero_ps();
          store8(dwb + k * a.bo + o, s, a.bo - o);
        }
    }
  }
}

// ---------------------------------------------------------------- sddmm
// dW[k][o] = sum_t x[t, k] dy[t, o] over one block. Per block row and chunk of kSdTokens tokens, the row's dy slice
// [t][bo] is packed contiguous (fp32) once, and per block its x slice [t][bi]: in place, rows out * 4 or in * 4
// bytes apart (BERT-base: 3 or 12 KiB) fall into a few L1 sets, and the 12 passes of a block over the same tokens
// each refetched them from L2. A pass: 16 outputs (2 ymm) x KG features over the chunk's tokens, 2KG
// accumulators; the features of a block are split into ceil(bi / 6) groups of nearly equal size (32 = 6 + 6 + 5 +
// 5 + 5 + 5), since a last group of 2 would run its 4 accumulator chains at the FMA latency. Sums of a block row go
// to an fp32 buffer [block][k][kSdLd] that stays in L2, written to dW (masked, converted) after the row's last
// chunk.
constexpr int64_t kSdTokens = 64;
constexpr int64_t kSdLd = kBsrFastMaxBlock;  // floats per feature row of a block's partial sums
constexpr int kSdMaxGroup = 6;

template <int KG>
void sddmm_pass(const float* dyp, const float* xp, int64_t tn, float* acck, bool first) {
  __m256 acc[KG][2];
#pragma GCC unroll 6
  for (int j = 0; j < KG; ++j) {
    acc[j][0] = first ? _mm256_setzero_ps() : _mm256_load_ps(acck + j * kSdLd);
    acc[j][1] = first ? _mm256_setzero_ps() : _mm256_load_ps(acck + j * kSdLd + 8);
  }
  for (int64_t t = 0; t < tn; ++t, dyp += kBsrFastMaxBlock, xp += kBsrFastMaxBlock) {
    const __m256 g0 = _mm256_load_ps(dyp), g1 = _mm256_load_ps(dyp + 8);
#pragma GCC unroll 6
    for (int j = 0; j < KG; ++j) {
      const __m256 xv = _mm256_broadcast_ss(xp + j);
      acc[j][0] = _mm256_fmadd_ps(g0, xv, acc[j][0]);
      acc[j][1] = _mm256_fmadd_ps(g1, xv, acc[j][1]);
    }
  }
#pragma GCC unroll 6
  for (int j = 0; j < KG; ++j) {
    _mm256_store_ps(acck + j * kSdLd, acc[j][0]);
    _mm256_store_ps(acck + j * kSdLd + 8, acc[j][1]);
  }
}

// rows [0, tn) x columns [0, n) of src (row stride ld) -> dst[t * kBsrFastMaxBlock + c] as fp32, columns n..np-1
// zero (np: n rounded up to 16).
template <typename E>
void sddmm_pack(const E* src, int64_t ld, int64_t tn, int64_t n, float* dst) {
  const int64_t np = (n + 15) / 16 * 16;
  for (int64_t t = 0; t < tn; ++t, src += ld, dst += kBsrFastMaxBlock)
    for (int64_t c = 0; c < np; c += 8) _mm256_store_ps(dst + c, load8(src + c, n - c));
}

// This thread's buffer of n floats (64-byte aligned), kept across calls; null if the allocation fails.
inline float* sddmm_buffer(int64_t n) {
  static thread_local PackX s;
  if (s.n < n) {
    std::free(s.xs);
    s.xs = static_cast<float*>(std::aligned_alloc(64, size_t((n * 4 + 63) / 64 * 64)));
    s.n = s.xs ? n : 0;
  }
  return s.xs;
}

template <typename E>
void sddmm_rows(const BsrSddmmArgs& a, int64_t r0, int64_t r1) {
  alignas(64) float dyp[kSdTokens * kBsrFastMaxBlock], xp[kSdTokens * kBsrFastMaxBlock];
  E* dw = static_cast<E*>(a.dw);
  const int64_t blk = a.bo * a.bi, acc_blk = a.bi * kSdLd;
  int64_t most = 0;
  for (int64_t r = r0; r < r1; ++r)
    most = most > a.row_offsets[r + 1] - a.row_offsets[r] ? most : a.row_offsets[r + 1] - a.row_offsets[r];
  float* acc = sddmm_buffer(most * acc_blk);
  if (most > 0 && !acc) return sddmm_rows_inplace<E>(a, r0, r1);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t o0 = r * a.bo, ob = min64(a.bo, a.out - o0);
    const int64_t pbeg = a.row_offsets[r], pend = a.row_offsets[r + 1];
    if (pbeg == pend) continue;
    for (int64_t t0 = 0; t0 < a.T; t0 += kSdTokens) {
      const int64_t tn = min64(kSdTokens, a.T - t0);
      sddmm_pack(static_cast<const E*>(a.dy) + t0 * a.lddy + o0, a.lddy, tn, ob, dyp);
      for (int64_t p = pbeg; p < pend; ++p) {
        const int64_t i0 = int64_t(a.col_indices[p]) * a.bi, ib = min64(a.bi, a.in - i0);
        sddmm_pack(static_cast<const E*>(a.x) + t0 * a.ldx + i0, a.ldx, tn, ib, xp);
        float* accp = acc + (p - pbeg) * acc_blk;
        const int64_t ng = (ib + kSdMaxGroup - 1) / kSdMaxGroup;
        for (int64_t oc = 0; oc < ob; oc += 16)
          for (int64_t g = 0, k0 = 0; g < ng; ++g) {
            const int64_t kn = (ib - k0) / (ng - g);  // the remaining features spread evenly over the groups left
            dispatch_upto<kSdMaxGroup>(kn, [&](auto kk) {
              sddmm_pass<decltype(kk)::value>(dyp + oc, xp + k0, tn, accp + k0 * kSdLd + oc, t0 == 0);
            });
            k0 += kn;
          }
      }
    }
    // Entries of a ragged edge block outside the matrix get an exact zero gradient.
    for (int64_t p = pbeg; p < pend; ++p) {
      const int64_t ib = min64(a.bi, a.in - int64_t(a.col_indices[p]) * a.bi);
      const float* accp = acc + (p - pbeg) * acc_blk;
      E* dwb = dw + p * blk;
      for (int64_t k = 0; k < a.bi; ++k)
        for (int64_t o = 0; o < a.bo; o += 8) {
          const __m256 s = k < ib && a.T > 0 ? _mm256_and_ps(_mm256_load_ps(accp + k * kSdLd + o),
                                                             _mm256_castsi256_ps(lane_mask(ob - o)))
                                             : _mm256_setzero_ps();
          store8(dwb + k * a.bo + o, s, a.bo - o);
        }
    }
  }
}
}  // namespace

void bsr_fwd_f32_avx2(const BsrFwdArgs& a, int64_t r0, int64_t r1) {
  fwd_dispatch<float>(a, r0, r1);
}
void bsr_fwd_bf16_avx2(const BsrFwdArgs& a, int64_t r0, int64_t r1) {
  fwd_dispatch<uint16_t>(a, r0, r1);
}
void bsr_grad_input_f32_avx2(const BsrGradInputArgs& a, int64_t c0, int64_t c1) {
  gi_cols<float>(a, c0, c1);
}
void bsr_grad_input_bf16_avx2(const BsrGradInputArgs& a, int64_t c0, int64_t c1) {
  gi_cols<uint16_t>(a, c0, c1);
}
void bsr_sddmm_f32_avx2(const BsrSddmmArgs& a, int64_t r0, int64_t r1) {
  sddmm_rows<float>(a, r0, r1);
}
void bsr_sddmm_bf16_avx2(const BsrSddmmArgs& a, int64_t r0, int64_t r1) {
  sddmm_rows<uint16_t>(a, r0, r1);
}

}  // namespace sparsekern::cpu

#endif  // __x86_64__
