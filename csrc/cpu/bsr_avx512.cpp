// AVX-512 block-sparse kernels (float32 with FMA, bfloat16 with AVX512_BF16 vdpbf16ps, float32 accumulation).
// Compiled for AVX-512 by the pragma below while the rest of the extension stays baseline x86-64; bsr.cpp calls
// these only when the running CPU has the features. No torch/STL headers here, every helper has internal
// linkage: an inline function compiled for AVX-512 must never be merged with the portable copy of it.
//
// Forward (float32): per block row and tile of TT tokens, TT x V zmm accumulators (V = ceil(bo/16)) stay in
// registers over every kept block of the row; per input feature k the bo-wide column of W (contiguous in the
// kernel layout) is loaded once and X[t, k] is broadcast from X in place. Y is written once, with bias and
// activation. Tiles of <= 8 tokens: with in = 3072 the X rows are 12 KiB apart and 16 of them alias in L1.
// 16x16 float32 blocks take a kernel of their own (16-token tiles over packed X), see below.
// bfloat16: the same, over pairs of input features: two W columns are interleaved in registers (vpermt2w) into
// (w[k][o], w[k+1][o]) pairs and multiplied with the broadcast pair (x[t][k], x[t][k+1]) by vdpbf16ps.
#if defined(__x86_64__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,amx-tile,amx-bf16")
// GCC 12 flags the deliberately undefined vector inside its own masked-load intrinsics (avx512fintrin.h).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <immintrin.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "act_avx512.h"
#include "bsr_kernels.h"
#include "dispatch_upto.h"
#include "epilogue.h"

namespace sparsekern::cpu {
namespace {

template <bool B, typename T, typename F>
struct Cond {
  using type = T;
};
template <typename T, typename F>
struct Cond<false, T, F> {
  using type = F;
};

inline int64_t min64(int64_t a, int64_t b) {
  return a < b ? a : b;
}
inline __mmask16 mask16(int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1u);
}
inline __mmask32 mask32(int64_t n) {
  return n >= 32 ? __mmask32(0xFFFFFFFFu) : n <= 0 ? __mmask32(0) : __mmask32((1u << n) - 1u);
}

// Index vectors for vpermt2w: interleave the 16-bit lanes of a (row k) and b (row k+1) into 32-bit pairs;
// kPairLo covers lanes 0..15, kPairHi lanes 16..31.
alignas(64) const uint16_t kPairLo[32] = {0, 32, 1, 33, 2,  34, 3,  35, 4,  36, 5,  37, 6,  38, 7,  39,
                                          8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
alignas(64) const uint16_t kPairHi[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
                                          24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};

// With an even number of 16-lane vectors per W column the bf16 kernel pairs rows k, k+1 with vpunpck[lh]wd,
// which works within 128-bit lanes: accumulator 2u holds outputs 32u + {0-3, 8-11, 16-19, 24-27}, accumulator
// 2u+1 outputs 32u + {4-7, 12-15, 20-23, 28-31}. kScr* put a natural pair of vectors (32 outputs) into that
// order (vpermt2ps indices; 16 and up select the second vector); the output stage takes it back (kUnsW).
alignas(64) const int32_t kScrLo[16] = {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27};
alignas(64) const int32_t kScrHi[16] = {4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31};

// Applies the vpermt2ps indices (lo, hi) to every pair of vectors (2u, 2u+1) of the N x V accumulators.
template <int V, int N>
__attribute__((always_inline)) inline void permute_pairs(__m512 (&acc)[N][V], __m512i lo, __m512i hi) {
#pragma GCC unroll 16
  for (int t = 0; t < N; ++t)
#pragma GCC unroll 2
    for (int u = 0; u + 1 < V; u += 2) {
      const __m512 a = acc[t][u], b = acc[t][u + 1];
      acc[t][u] = _mm512_permutex2var_ps(a, lo, b);
      acc[t][u + 1] = _mm512_permutex2var_ps(a, hi, b);
    }
}

inline __m512 load_f32(const float* p, __mmask16 m) {
  return _mm512_maskz_loadu_ps(m, p);
}
inline __m512 load_f32(const uint16_t* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
inline void store_f32(float* p, __m512 v, __mmask16 m) {
  _mm512_mask_storeu_ps(p, m, v);
}
inline void store_f32(uint16_t* p, __m512 v, __mmask16 m) {
  _mm256_mask_storeu_epi16(p, m, (__m256i)_mm512_cvtneps_pbh(v));
}

// ---------------------------------------------------------------- forward
// Output stage of a tile: + bias, f (the activation), masked store of every accumulator. One instance per
// activation, the switch outside the tile, so that the TT x V independent evaluations interleave.
template <typename E, int V, int TT, typename F>
__attribute__((always_inline)) inline void store_tile(__m512 (&acc)[TT][V], const E* bias, E* y, int64_t ldy,
                                                      const __mmask16* m, F f) {
#pragma GCC unroll 16
  for (int t = 0; t < TT; ++t)
#pragma GCC unroll 16
    for (int v = 0; v < V; ++v) {
      const __m512 z = bias ? _mm512_add_ps(acc[t][v], load_f32(bias + 16 * v, m[v])) : acc[t][v];
      store_f32(y + t * ldy + 16 * v, f(z), m[v]);
    }
}

// Always inlined: a call taking the accumulator array by reference would keep it in memory (stored every k).
// relu keeps NaN (max(0, v) returns v when v is NaN); the transcendental activations are those of act_avx512.h.
// AddBias = false: the accumulators already hold the bias.
template <typename E, int V, int TT, bool AddBias = true>
__attribute__((always_inline)) inline void fwd_epilogue(const BsrFwdArgs& a, __m512 (&acc)[TT][V], int64_t r,
                                                        const __mmask16* m, int64_t t0) {
  const int64_t o0 = r * a.bo;
  const E* bias = AddBias && a.bias ? static_cast<const E*>(a.bias) + o0 : nullptr;
  E* y = static_cast<E*>(a.y) + t0 * a.out + o0;
  switch (static_cast<Act>(a.act)) {
    case Act::Relu:
      return store_tile<E, V, TT>(acc, bias, y, a.out, m,
                                  [](__m512 z) { return _mm512_max_ps(_mm512_setzero_ps(), z); });
    case Act::Gelu: return store_tile<E, V, TT>(acc, bias, y, a.out, m, [](__m512 z) { return gelu_avx512(z); });
    case Act::GeluTanh:
      return store_tile<E, V, TT>(acc, bias, y, a.out, m, [](__m512 z) { return gelu_tanh_avx512(z); });
    case Act::Silu: return store_tile<E, V, TT>(acc, bias, y, a.out, m, [](__m512 z) { return silu_avx512(z); });
    case Act::None: return store_tile<E, V, TT>(acc, bias, y, a.out, m, [](__m512 z) { return z; });
    default:
      return store_tile<E, V, TT>(acc, bias, y, a.out, m,
                                  [act = static_cast<Act>(a.act)](__m512 z) { return act_lanes_avx512(z, act); });
  }
}

// Output stage for bfloat16 with an even V, the accumulators in the vpunpck order (kScrLo): the activation is
// elementwise, so it runs in that order; each pair of vectors becomes 32 bf16 in one vcvtne2ps2bf16, one vpermw
// (kUnsW) restores the order, one store. Half the conversions and stores of the generic stage, and no vpermt2ps.
alignas(64) const uint16_t kUnsW[32] = {0, 1, 2,  3,  16, 17, 18, 19, 4,  5,  6,  7,  20, 21, 22, 23,
                                        8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31};

template <int V, int TT, typename F>
__attribute__((always_inline)) inline void store_tile_bf16_pairs(__m512 (&acc)[TT][V], uint16_t* y, int64_t ldy,
                                                                 const __mmask32* m, F f) {
  const __m512i idx = _mm512_load_si512(kUnsW);
#pragma GCC unroll 16
  for (int t = 0; t < TT; ++t)
#pragma GCC unroll 2
    for (int u = 0; 2 * u < V; ++u) {
      const __m512bh h = _mm512_cvtne2ps_pbh(f(acc[t][2 * u + 1]), f(acc[t][2 * u]));
      _mm512_mask_storeu_epi16(y + t * ldy + 32 * u, m[u], _mm512_permutexvar_epi16(idx, (__m512i)h));
    }
}

template <int V, int TT>
__attribute__((always_inline)) inline void fwd_epilogue_bf16_pairs(const BsrFwdArgs& a, __m512 (&acc)[TT][V], int64_t r,
                                                                   const __mmask32* m, int64_t t0) {
  uint16_t* y = static_cast<uint16_t*>(a.y) + t0 * a.out + r * a.bo;
  switch (static_cast<Act>(a.act)) {
    case Act::Relu:
      return store_tile_bf16_pairs<V, TT>(acc, y, a.out, m,
                                          [](__m512 z) { return _mm512_max_ps(_mm512_setzero_ps(), z); });
    case Act::Gelu: return store_tile_bf16_pairs<V, TT>(acc, y, a.out, m, [](__m512 z) { return gelu_avx512(z); });
    case Act::GeluTanh:
      return store_tile_bf16_pairs<V, TT>(acc, y, a.out, m, [](__m512 z) { return gelu_tanh_avx512(z); });
    case Act::Silu: return store_tile_bf16_pairs<V, TT>(acc, y, a.out, m, [](__m512 z) { return silu_avx512(z); });
    case Act::None: return store_tile_bf16_pairs<V, TT>(acc, y, a.out, m, [](__m512 z) { return z; });
    default:
      return store_tile_bf16_pairs<V, TT>(
          acc, y, a.out, m, [act = static_cast<Act>(a.act)](__m512 z) { return act_lanes_avx512(z, act); });
  }
}

// When W is streamed from L3 or memory (the first token tile of a panel; every tile with one or two tokens, as
// in batch-1 decode with cold weights) the hardware prefetchers ramp up too slowly, so W is fetched kWLead bytes
// ahead (the row's blocks, then the next row's, are contiguous), about one memory latency of consumption.
constexpr int64_t kWLead = 16384;

template <typename E>
__attribute__((always_inline)) inline void prefetch_w(const E* wk, int64_t bytes) {
  const char* c = reinterpret_cast<const char*>(wk) + kWLead;
  for (int64_t l = 0; l < bytes; l += 64) _mm_prefetch(c + l, _MM_HINT_T0);
}

inline uint32_t load_pair(const uint16_t* p) {
  uint32_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// Register budget (32 zmm): TT x V accumulators + V W vectors + broadcast (+ 2 index vectors for bf16).
template <int V>
constexpr int fwd_tile_tokens() {
  return V <= 2 ? 8 : V == 3 ? 6 : 5;
}

// k loop of one kept block, float32: acc[t][v] += W[k][16v..] * x[t][k] for k < ib.
template <int V, int TT, bool StreamW>
__attribute__((always_inline)) inline void block_f32(__m512 (&acc)[TT][V], const float* wk, const float* xk,
                                                     int64_t ldx, int64_t bo, int64_t ib, const __mmask16* mw) {
  for (int64_t k = 0; k < ib; ++k, wk += bo, ++xk) {
    if (StreamW) prefetch_w(wk, bo * 4);
    __m512 wv[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) wv[v] = _mm512_maskz_loadu_ps(mw[v], wk + 16 * v);
#pragma GCC unroll 8
    for (int t = 0; t < TT; ++t) {
      const __m512 xv = _mm512_set1_ps(xk[t * ldx]);
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) acc[t][v] = _mm512_fmadd_ps(wv[v], xv, acc[t][v]);
    }
  }
}

// bfloat16: pairs of input features, vdpbf16ps.
template <int V, int TT, bool StreamW>
__attribute__((always_inline)) inline void block_bf16(__m512 (&acc)[TT][V], const uint16_t* wk, const uint16_t* xk,
                                                      int64_t ldx, int64_t bo, int64_t ib, const __mmask32* mr,
                                                      __m512i lo, __m512i hi) {
  constexpr int U = (V + 1) / 2;  // 32-lane row loads per W column
  int64_t k = 0;
  for (; k + 1 < ib; k += 2, wk += 2 * bo, xk += 2) {
    if (StreamW) prefetch_w(wk, 2 * bo * 2);
    __m512i wv[V];
#pragma GCC unroll 2
    for (int u = 0; u < U; ++u) {
      const __m512i ra = _mm512_maskz_loadu_epi16(mr[u], wk + 32 * u);
      const __m512i rb = _mm512_maskz_loadu_epi16(mr[u], wk + bo + 32 * u);
      // Even V: vpunpck[lh]wd pairs rows k, k+1 faster than vpermt2w (numbers: docs/measurements.md, "Block-sparse
      // forward: the token-tile kernel").
      if constexpr (V % 2 == 0) {
        wv[2 * u] = _mm512_unpacklo_epi16(ra, rb);
        wv[2 * u + 1] = _mm512_unpackhi_epi16(ra, rb);
      } else {
        wv[2 * u] = _mm512_permutex2var_epi16(ra, lo, rb);
        if (2 * u + 1 < V) wv[2 * u + 1] = _mm512_permutex2var_epi16(ra, hi, rb);
      }
    }
#pragma GCC unroll 8
    for (int t = 0; t < TT; ++t) {
      const __m512i xv = _mm512_set1_epi32(int(load_pair(xk + t * ldx)));
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) acc[t][v] = _mm512_dpbf16_ps(acc[t][v], (__m512bh)wv[v], (__m512bh)xv);
    }
  }
  if (k < ib) {  // odd tail: pair the last feature with zeros (never read past the row or the block)
    __m512i wv[V];
#pragma GCC unroll 16
    for (int u = 0; u < U; ++u) {
      const __m512i ra = _mm512_maskz_loadu_epi16(mr[u], wk + 32 * u);
      if constexpr (V % 2 == 0) {
        wv[2 * u] = _mm512_unpacklo_epi16(ra, _mm512_setzero_si512());
        wv[2 * u + 1] = _mm512_unpackhi_epi16(ra, _mm512_setzero_si512());
      } else {
        wv[2 * u] = _mm512_permutex2var_epi16(ra, lo, _mm512_setzero_si512());
        if (2 * u + 1 < V) wv[2 * u + 1] = _mm512_permutex2var_epi16(ra, hi, _mm512_setzero_si512());
      }
    }
#pragma GCC unroll 16
    for (int t = 0; t < TT; ++t) {
      const __m512i xv = _mm512_set1_epi32(int(uint32_t(xk[t * ldx])));
#pragma GCC unroll 16
      for (int v = 0; v < V; ++v) acc[t][v] = _mm512_dpbf16_ps(acc[t][v], (__m512bh)wv[v], (__m512bh)xv);
    }
  }
}

// One token tile (TT tokens from t0) over the block rows [r0, r1) of a panel, in one function so that the row loop
// keeps its state in registers and the block column of the next kept block is loaded one block ahead. With a function
// call per (row, tile) whose first X address waited on loads of row_offsets and col_indices, each row paid a fixed cost
// on top of its blocks that the out-of-order window did not hide, a large share at 1-2 blocks per row. The next block's
// X is not prefetched: its 16 prefetches per block cost more than the L1 misses they saved. This layout measured faster
// at every density, fp32 and bf16 (numbers: docs/measurements.md, "Block-sparse forward: the token-tile kernel").
template <int V, int TT, bool Bf16>
void fwd_tile_rows(const BsrFwdArgs& a, int64_t r0, int64_t r1, int64_t t0) {
  using E = typename Cond<Bf16, uint16_t, float>::type;
  constexpr int U = (V + 1) / 2;
  const E* x = static_cast<const E*>(a.x) + t0 * a.ldx;
  const E* wk = static_cast<const E*>(a.w);
  const int32_t* ro = a.row_offsets;
  const int32_t* ci = a.col_indices;
  const int64_t bo = a.bo, bi = a.bi, ldx = a.ldx, in = a.in, blk = bo * bi;
  // W loads are masked by the block shape only: the rows of a ragged edge block past `out` are stored (any
  // values), computed in lanes that the epilogue never stores.
  __mmask16 mw[V];
#pragma GCC unroll 4
  for (int v = 0; v < V; ++v) mw[v] = mask16(bo - 16 * v);
  __mmask32 mr[U];
#pragma GCC unroll 2
  for (int u = 0; u < U; ++u) mr[u] = mask32(bo - 32 * u);
  const __m512i lo = _mm512_load_si512(kPairLo), hi = _mm512_load_si512(kPairHi);
  const bool stream_w = TT <= 2 || t0 == 0;
  int64_t p = ro[r0];
  const int64_t pall = ro[r1];
  wk += p * blk;
  int64_t i_next = p < pall ? int64_t(ci[p]) * bi : 0;
  const E* bias = static_cast<const E*>(a.bias);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t pend = ro[r + 1];
    const int64_t ob = min64(bo, a.out - r * bo);
    __mmask16 m[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) m[v] = mask16(ob - 16 * v);
    // The accumulators start from the bias: adding it in the output stage (a masked load and an add per
    // accumulator) was a fixed cost per (row, tile) that showed at one 32x32 block per row, more in bf16 (numbers:
    // docs/measurements.md, "Block-sparse forward: the token-tile kernel").
    __m512 acc[TT][V];
    __m512 b0[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) b0[v] = bias ? load_f32(bias + r * bo + 16 * v, m[v]) : _mm512_setzero_ps();
    if constexpr (Bf16 && V % 2 == 0) {
      __m512(&b)[1][V] = reinterpret_cast<__m512(&)[1][V]>(b0);
      permute_pairs<V, 1>(b, _mm512_load_si512(kScrLo), _mm512_load_si512(kScrHi));
    }
#pragma GCC unroll 8
    for (int t = 0; t < TT; ++t)
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) acc[t][v] = b0[v];
    for (; p < pend; ++p, wk += blk) {
      // The block column one block ahead: the X address of the next block does not wait on a load.
      const int64_t i0 = i_next;
      i_next = p + 1 < pall ? int64_t(ci[p + 1]) * bi : 0;
      const int64_t ib = min64(bi, in - i0);
      if constexpr (Bf16) {
        if (stream_w) {
          block_bf16<V, TT, true>(acc, wk, x + i0, ldx, bo, ib, mr, lo, hi);
        } else {
          block_bf16<V, TT, false>(acc, wk, x + i0, ldx, bo, ib, mr, lo, hi);
        }
      } else {
        if (stream_w) {
          block_f32<V, TT, true>(acc, wk, x + i0, ldx, bo, ib, mw);
        } else {
          block_f32<V, TT, false>(acc, wk, x + i0, ldx, bo, ib, mw);
        }
      }
    }
    if constexpr (Bf16 && V % 2 == 0) {
      __mmask32 ms[U];
#pragma GCC unroll 2
      for (int u = 0; u < U; ++u) ms[u] = mask32(ob - 32 * u);
      fwd_epilogue_bf16_pairs<V, TT>(a, acc, r, ms, t0);
    } else {
      fwd_epilogue<E, V, TT, false>(a, acc, r, m, t0);
    }
  }
}

// Block rows are walked in panels whose W fits in kPanelBytes, half of a 1 MiB per-core L2: per token tile, every
// row of the panel runs while the tile's X rows stay in L1 and the panel's W in L2. A dense row of in = 3072 is
// a panel by itself (X is then streamed from L3 once per row); at high sparsity a thread's whole slice of W is
// one panel and X is read once.
constexpr int64_t kPanelBytes = 512 * 1024;

template <int V, bool Bf16>
void fwd_rows(const BsrFwdArgs& a, int64_t r0, int64_t r1) {
  constexpr int TT = fwd_tile_tokens<V>();
  const int64_t row_bytes = a.bo * a.bi * (Bf16 ? 2 : 4);
  for (int64_t p0 = r0, p1; p0 < r1; p0 = p1) {
    p1 = p0 + 1;
    while (p1 < r1 && int64_t(a.row_offsets[p1 + 1] - a.row_offsets[p0]) * row_bytes <= kPanelBytes) ++p1;
    int64_t t0 = 0;
    for (; t0 + TT <= a.T; t0 += TT) fwd_tile_rows<V, TT, Bf16>(a, p0, p1, t0);
    if (t0 < a.T)
      dispatch_upto<TT - 1>(a.T - t0, [&](auto tt) { fwd_tile_rows<V, decltype(tt)::value, Bf16>(a, p0, p1, t0); });
  }
}

// ---------------------------------------------------------------- forward, float32 16x16 blocks
// With bo = 16 a W column is one zmm, so the generic kernel has only TT = 8 accumulators: exactly the FMA
// latency x throughput product (4 cycles x 2 pipes), and every W load and per-block cost serves half the work
// of a 32-block. This path runs 16 tokens per tile (16 accumulators) over X packed into a thread-local
// scratch laid out [block column][token][16]: X rows read in place are `in` floats apart (12 KiB at
// in = 3072, so 16 of them share one 12-way L1 set, and 16 row pointers do not fit in the general registers),
// whereas a packed block's X is 1 KiB contiguous and every operand of the fully unrolled 16 x 16 block body is
// a constant displacement from one base register.
// Packing is lazy: a block column of a tile is copied when a block row first needs it, one block ahead of its
// use, with its X rows prefetched two blocks ahead; packed columns carry the epoch of their packing. When a
// thread's rows span several panels and the packed X of the whole call fits in kPackAllBytes, every tile has
// its own slot and the epoch is the call's, so the panels after the first read the packed tiles instead of
// packing them again, which measured faster. Otherwise one slot (L2-resident) is reused, with an epoch per
// (panel, tile): at T = 512 writing 6 MiB of fresh slots per call cost more than packing again.
// The scratch stays allocated per thread (up to kPackAllBytes plus one slot), so calls allocate nothing.
// The packing is a data-movement cost that the FMAs do not hide, more at in = 3072 than at 768, whether done up
// front, lazily, or per block into an L1 buffer; an in-place kernel with 16 row pointers was slower still. Without
// any packing cost the block body reaches most of the FMA peak (one broadcast load per FMA). Numbers:
// docs/measurements.md, "Block-sparse forward, fp32 16x16 blocks".
constexpr int kTile16 = 16;
constexpr int64_t kPackAllBytes = int64_t(2) << 20;  // T = 128 tokens of in = 4096

struct Scratch16 {
  float* xs = nullptr;        // [slots][block columns][16][16]
  uint32_t* stamp = nullptr;  // [slots][block columns]: epoch at which the column was packed
  int64_t cols = 0;
  uint32_t epoch = 0;
  ~Scratch16() {
    std::free(xs);
    std::free(stamp);
  }
};

// This thread's scratch for `cols` (slots x block columns) packed columns, kept across calls (torch's pool
// threads live as long as the process). Null if the allocation fails; the caller then takes the generic kernel.
Scratch16* scratch16(int64_t cols) {
  static thread_local Scratch16 s;
  if (s.cols < cols) {
    std::free(s.xs);
    std::free(s.stamp);
    s.xs = static_cast<float*>(std::aligned_alloc(64, size_t(cols) * 256 * 4));
    s.stamp = static_cast<uint32_t*>(std::calloc(size_t(cols), 4));
    s.epoch = 0;
    s.cols = s.xs && s.stamp ? cols : 0;
    if (s.cols == 0) return nullptr;
  }
  return &s;
}

// A fresh epoch: no column counts as packed.
uint32_t next_epoch(Scratch16& s) {
  if (++s.epoch == 0) {
    std::memset(s.stamp, 0, size_t(s.cols) * 4);
    s.epoch = 1;
  }
  return s.epoch;
}

// xs[t][0:16] = x[t][16c : 16c + 16] for t < N, zeros past `in`.
template <int N>
__attribute__((always_inline)) inline void pack_col16(const float* x, int64_t ldx, int64_t c, int64_t in, float* xs) {
  const float* xc = x + 16 * c;
  const __mmask16 m = mask16(in - 16 * c);
#pragma GCC unroll 4
  for (int t = 0; t < N; ++t, xc += ldx) _mm512_store_ps(xs + 16 * t, _mm512_maskz_loadu_ps(m, xc));
}

// One block row x N tokens. With few tokens the k loop is split over KS accumulator sets, so that there are
// still >= 4 independent FMA chains (batch-1 decode with W in cache is otherwise FMA-latency bound).
// xs, stamp: the tile's slot. `cnext`: block column of the first block of the next row of this (panel, tile),
// or -1.
template <int N>
void fwd_tile16_f32(const BsrFwdArgs& a, int64_t r, __mmask16 m, int64_t t0, float* xs, uint32_t* stamp, uint32_t epoch,
                    int64_t cnext) {
  constexpr int KS = N == 1 ? 4 : N <= 3 ? 2 : 1;
  const float* x = static_cast<const float*>(a.x) + t0 * a.ldx;
  const float* w = static_cast<const float*>(a.w);
  const int64_t ldx = a.ldx, in = a.in;
  const int32_t* ci = a.col_indices;
  __m512 acc[KS][N];
#pragma GCC unroll 16
  for (int v = 0; v < KS; ++v)
#pragma GCC unroll 16
    for (int t = 0; t < N; ++t) acc[v][t] = _mm512_setzero_ps();
  const int64_t p0 = a.row_offsets[r], pend = a.row_offsets[r + 1];
  const bool stream_w = N <= 2 || t0 == 0;
  if (p0 < pend && stamp[ci[p0]] != epoch) {  // the first row of a (panel, tile)
    pack_col16<N>(x, ldx, ci[p0], in, xs + int64_t(ci[p0]) * (N * 16));
    stamp[ci[p0]] = epoch;
  }
  for (int64_t p = p0; p < pend; ++p) {
    const int64_t c = ci[p];
    const int64_t c1 = p + 1 < pend ? ci[p + 1] : cnext;
    const int64_t c2 = p + 2 < pend ? ci[p + 2] : p + 2 == pend ? cnext : -1;
    if (c1 >= 0 && stamp[c1] != epoch) {
      pack_col16<N>(x, ldx, c1, in, xs + c1 * (N * 16));
      stamp[c1] = epoch;
    }
    if (c2 >= 0) {  // the X rows to pack, or the packed column (from L3 when it was packed by an earlier panel)
      if (stamp[c2] != epoch) {
#pragma GCC unroll 16
        for (int t = 0; t < N; ++t) _mm_prefetch(reinterpret_cast<const char*>(x + t * ldx + 16 * c2), _MM_HINT_T0);
      } else {
#pragma GCC unroll 16
        for (int t = 0; t < N; ++t)
          _mm_prefetch(reinterpret_cast<const char*>(xs + c2 * (N * 16) + 16 * t), _MM_HINT_T0);
      }
    }
    const float* wb = w + p * 256;
    const float* xb = xs + c * (N * 16);
    if (16 * c + 16 <= in) {
#pragma GCC unroll 16
      for (int k = 0; k < 16; ++k) {
        // One line per column, spread over the block: a burst of 16 prefetches per block made batch-1 decode
        // with cold weights slower (miss buffers full, demand loads waiting behind them; numbers:
        // docs/measurements.md, "Block-sparse forward, fp32 16x16 blocks").
        if (stream_w) _mm_prefetch(reinterpret_cast<const char*>(wb + 16 * k) + kWLead, _MM_HINT_T0);
        const __m512 wv = _mm512_maskz_loadu_ps(m, wb + 16 * k);
#pragma GCC unroll 16
        for (int t = 0; t < N; ++t)
          acc[k % KS][t] = _mm512_fmadd_ps(wv, _mm512_set1_ps(xb[16 * t + k]), acc[k % KS][t]);
      }
    } else {  // ragged last block column: W past `in` is never read (it may hold anything)
      for (int64_t k = 0; k < in - 16 * c; ++k) {
        const __m512 wv = _mm512_maskz_loadu_ps(m, wb + 16 * k);
#pragma GCC unroll 16
        for (int t = 0; t < N; ++t) acc[0][t] = _mm512_fmadd_ps(wv, _mm512_set1_ps(xb[16 * t + k]), acc[0][t]);
      }
    }
  }
  __m512 sum[N][1];
#pragma GCC unroll 16
  for (int t = 0; t < N; ++t) {
    sum[t][0] = acc[0][t];
#pragma GCC unroll 4
    for (int v = 1; v < KS; ++v) sum[t][0] = _mm512_add_ps(sum[t][0], acc[v][t]);
  }
  fwd_epilogue<float, 1, N>(a, sum, r, &m, t0);
}

// Returns false (nothing done) when the scratch cannot be allocated.
bool fwd_rows16_f32(const BsrFwdArgs& a, int64_t r0, int64_t r1) {
  const int64_t nc = (a.in + 15) / 16, ntiles = (a.T + kTile16 - 1) / kTile16;
  const bool per_call =
      ntiles * nc * 1024 <= kPackAllBytes && int64_t(a.row_offsets[r1] - a.row_offsets[r0]) * 1024 > kPanelBytes;
  Scratch16* s = scratch16((per_call ? ntiles : 1) * nc);
  if (!s) return false;
  const uint32_t call_epoch = next_epoch(*s);
  constexpr int64_t blk_bytes = 16 * 16 * 4;
  for (int64_t p0 = r0, p1; p0 < r1; p0 = p1) {
    p1 = p0 + 1;
    while (p1 < r1 && int64_t(a.row_offsets[p1 + 1] - a.row_offsets[p0]) * blk_bytes <= kPanelBytes) ++p1;
    int64_t t0 = 0;
    auto tiles = [&](auto tt) {
      constexpr int N = decltype(tt)::value;
      const uint32_t epoch = per_call ? call_epoch : next_epoch(*s);
      const int64_t slot = per_call ? t0 / kTile16 : 0;
      for (int64_t r = p0; r < p1; ++r) {
        const int64_t cnext =
            r + 1 < p1 && a.row_offsets[r + 1] < a.row_offsets[r + 2] ? a.col_indices[a.row_offsets[r + 1]] : -1;
        fwd_tile16_f32<N>(a, r, mask16(a.out - r * 16), t0, s->xs + slot * nc * 256, s->stamp + slot * nc, epoch,
                          cnext);
      }
    };
    for (; t0 + kTile16 <= a.T; t0 += kTile16) tiles(Int<kTile16>{});
    if (t0 < a.T) dispatch_upto<kTile16 - 1>(a.T - t0, tiles);
  }
  return true;
}

template <bool Bf16>
void fwd_dispatch(const BsrFwdArgs& a, int64_t r0, int64_t r1) {
  if (!Bf16 && a.bo == 16 && a.bi == 16 && fwd_rows16_f32(a, r0, r1)) return;
  switch ((a.bo + 15) / 16) {
    case 1: return fwd_rows<1, Bf16>(a, r0, r1);
    case 2: return fwd_rows<2, Bf16>(a, r0, r1);
    case 3: return fwd_rows<3, Bf16>(a, r0, r1);
    default: return fwd_rows<4, Bf16>(a, r0, r1);
  }
}

// ---------------------------------------------------------------- forward, bfloat16 on AMX tiles
// tdpbf16ps multiplies a [16 tokens x 32 features] bf16 tile of X (its rows in place, stride ldx) by a
// [16 feature pairs x 16 outputs x 2] tile of W into a [16 x 16] fp32 tile. The kernel layout ([bi][bo] per block)
// is repacked into those pairs once per block row and call, into a heap buffer, and every token tile of the chunk
// reuses it. Eight tile registers: four accumulators (2 token tiles x 2 output tiles), two X tiles, two W tiles.
// The accumulators go through a 4 KiB buffer into fwd_epilogue. Blocks with bo a multiple of 16 (<= 64), bi 16,
// 32 or 64, and in a multiple of bi (the X tile reads whole blocks); tokens in tiles of 16, the last T % 16 padded
// to one. Same products and fp32 sums as vdpbf16ps, in another order.
struct AmxConfig {
  uint8_t palette_id = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// dst[i] = the i-th block of row r from `first` in (feature pair, output, 2) order.
inline void amx_pack_pairs(const BsrFwdArgs& a, int64_t first, int64_t count, uint16_t* dst) {
  alignas(64) static const uint16_t lo_idx[32] = {0, 32, 1, 33, 2,  34, 3,  35, 4,  36, 5,  37, 6,  38, 7,  39,
                                                  8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  alignas(64) static const uint16_t hi_idx[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
                                                  24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
  const __m512i lo = _mm512_load_si512(lo_idx), hi = _mm512_load_si512(hi_idx);
  const int64_t bo = a.bo, bi = a.bi;
  const uint16_t* w = static_cast<const uint16_t*>(a.w) + first * bo * bi;
  for (int64_t i = 0; i < count; ++i, w += bo * bi, dst += bo * bi) {
    for (int64_t k2 = 0; k2 < bi / 2; ++k2) {
      const uint16_t* r0 = w + 2 * k2 * bo;
      uint16_t* d = dst + k2 * bo * 2;
      for (int64_t o = 0; o < bo; o += 32) {
        const __mmask32 m = bo - o >= 32 ? ~__mmask32(0) : __mmask32(0xffff);
        const __m512i x0 = _mm512_maskz_loadu_epi16(m, r0 + o), x1 = _mm512_maskz_loadu_epi16(m, r0 + bo + o);
        _mm512_storeu_si512(d + 2 * o, _mm512_permutex2var_epi16(x0, lo, x1));
        if (bo - o >= 32) _mm512_storeu_si512(d + 2 * o + 32, _mm512_permutex2var_epi16(x0, hi, x1));
      }
    }
  }
}

// TM token tiles of 16 from t0 x NH output tiles of 16 from output group h of block row r, over the `count` blocks
// of the row packed in `packed`.
template <int TM, int NH>
__attribute__((always_inline)) inline void amx_bf16_tile(const BsrFwdArgs& a, int64_t r, int64_t first, int64_t count,
                                                         const uint16_t* packed, int64_t t0, int64_t h, float* acc) {
  const int64_t kc = a.bi < 32 ? a.bi : 32;  // features per tile
  const int64_t wrow = a.bo * 4;             // bytes per feature pair of a packed block
  _tile_zero(0);
  if constexpr (NH == 2) _tile_zero(1);
  if constexpr (TM == 2) _tile_zero(2);
  if constexpr (TM == 2 && NH == 2) _tile_zero(3);
  const uint16_t* xt = static_cast<const uint16_t*>(a.x) + t0 * a.ldx;
  const int64_t ldx = a.ldx * 2;
  for (int64_t i = 0; i < count; ++i) {
    const uint16_t* xb = xt + int64_t(a.col_indices[first + i]) * a.bi;
    const uint16_t* wb = packed + i * a.bo * a.bi + h * 32;
    for (int64_t k = 0; k < a.bi; k += kc) {
      const uint16_t* wk = wb + (k / 2) * a.bo * 2;
      _tile_loadd(4, xb + k, ldx);
      _tile_loadd(6, wk, wrow);
      _tile_dpbf16ps(0, 4, 6);
      if constexpr (NH == 2) {
        _tile_loadd(7, wk + 32, wrow);
        _tile_dpbf16ps(1, 4, 7);
      }
      if constexpr (TM == 2) {
        _tile_loadd(5, xb + k + 16 * a.ldx, ldx);
        _tile_dpbf16ps(2, 5, 6);
        if constexpr (NH == 2) _tile_dpbf16ps(3, 5, 7);
      }
    }
  }
}

template <int TM, int NH>
__attribute__((always_inline)) inline void amx_bf16_store(const BsrFwdArgs& a, int64_t r, int64_t t0, int64_t h,
                                                          float* acc) {
  constexpr int64_t ld = 32 * 4;
  _tile_stored(0, acc, ld);
  if constexpr (NH == 2) _tile_stored(1, acc + 16, ld);
  if constexpr (TM == 2) _tile_stored(2, acc + 16 * 32, ld);
  if constexpr (TM == 2 && NH == 2) _tile_stored(3, acc + 16 * 32 + 16, ld);
  __m512 v[16 * TM][NH];
  __mmask16 m[NH];
  const int64_t o0 = r * a.bo + h * 16;
#pragma GCC unroll 4
  for (int j = 0; j < NH; ++j) {
    const int64_t n = a.out - o0 - 16 * j;
    m[j] = n >= 16 ? __mmask16(0xffff) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1u);
  }
  for (int t = 0; t < 16 * TM; ++t)
#pragma GCC unroll 4
    for (int j = 0; j < NH; ++j) v[t][j] = _mm512_load_ps(acc + t * 32 + 16 * j);
  BsrFwdArgs b = a;  // the epilogue's outputs start at o0 = r * bo: shift y and bias to the output group
  b.y = static_cast<uint16_t*>(a.y) + h * 16;
  if (a.bias) b.bias = static_cast<const uint16_t*>(a.bias) + h * 16;
  fwd_epilogue<uint16_t, NH, 16 * TM>(b, v, r, m, t0);
}

template <int TM>
void amx_bf16_tokens(const BsrFwdArgs& a, int64_t r, int64_t first, int64_t count, const uint16_t* packed, int64_t t0,
                     float* acc) {
  const int64_t nh = a.bo / 16;
  for (int64_t h = 0; h < nh; h += 2) {
    if (nh - h >= 2) {
      amx_bf16_tile<TM, 2>(a, r, first, count, packed, t0, h, acc);
      amx_bf16_store<TM, 2>(a, r, t0, h, acc);
    } else {
      amx_bf16_tile<TM, 1>(a, r, first, count, packed, t0, h, acc);
      amx_bf16_store<TM, 1>(a, r, t0, h, acc);
    }
  }
}

// ---------------------------------------------------------------- grad_input
// dx[t, k] = sum_o dy[t, o] W[o, k]: the kernel layout has o contiguous, so each block is transposed once per
// chunk of kGiChunk tokens into an L1 buffer with k contiguous (for bf16: (W[o][k], W[o+1][k]) pairs as 32-bit
// lanes), then the forward's micro-kernel runs over o with dy broadcast. Partial sums over the blocks of a
// column live in an fp32 buffer in L2 (accumulators reloaded once per block, i.e. every bo FMAs). The chunk
// covers T <= 512 at once, so the (scalar) transpose is done once per block and call there: a small part of the
// FMA time of a 32x32 block at T = 512 (numbers: docs/measurements.md, "Block-sparse gradients on AVX-512").
// The columns are taken in groups of kGiAccLd / (16 V) (4 at bi = 32) that share the buffer's rows, and dx is written a
// group at a time: a row of dx gets 512 contiguous bytes instead of 128. dx's rows are in * 4 bytes apart, a multiple
// of 4 KiB at in = 3072, so a column of 512 rows x 128 bytes hits the same cache sets over and over: written that way,
// dx took many times longer than in groups of 4, a cost that grad_input paid even on a weight without blocks (numbers:
// docs/measurements.md, "Block-sparse gradients on AVX-512"). The buffer (256 KiB) is on the stack of the calling
// thread.
constexpr int64_t kGiChunk = 512;
constexpr int kGiTile = 8;
constexpr int64_t kGiAccLd = 128;  // floats per token row of the partial-sum buffer

template <int V, int TT, bool Bf16>
void gi_tile(const BsrGradInputArgs& a, const void* wt_, int64_t nrows, int64_t o0, int64_t t0, float* accb, bool first,
             bool odd_tail) {
  constexpr int LD = 16 * V;
  __m512 acc[TT][V];
#pragma GCC unroll 8
  for (int t = 0; t < TT; ++t)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) acc[t][v] = first ? _mm512_setzero_ps() : _mm512_load_ps(accb + t * kGiAccLd + 16 * v);
  if constexpr (Bf16) {
    const uint32_t* wt = static_cast<const uint32_t*>(wt_);
    const uint16_t* dy = static_cast<const uint16_t*>(a.dy) + t0 * a.lddy + o0;
    const int64_t full = odd_tail ? nrows - 1 : nrows;
    for (int64_t j = 0; j < nrows; ++j) {
      __m512i wv[V];
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) wv[v] = _mm512_load_si512(wt + j * LD + 16 * v);
#pragma GCC unroll 8
      for (int t = 0; t < TT; ++t) {
        const uint16_t* d = dy + t * a.lddy + 2 * j;
        const __m512i g = _mm512_set1_epi32(int(j < full ? load_pair(d) : uint32_t(d[0])));
#pragma GCC unroll 4
        for (int v = 0; v < V; ++v) acc[t][v] = _mm512_dpbf16_ps(acc[t][v], (__m512bh)wv[v], (__m512bh)g);
      }
    }
  } else {
    const float* wt = static_cast<const float*>(wt_);
    const float* dy = static_cast<const float*>(a.dy) + t0 * a.lddy + o0;
    for (int64_t o = 0; o < nrows; ++o) {
      __m512 wv[V];
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) wv[v] = _mm512_load_ps(wt + o * LD + 16 * v);
#pragma GCC unroll 8
      for (int t = 0; t < TT; ++t) {
        const __m512 g = _mm512_set1_ps(dy[t * a.lddy + o]);
#pragma GCC unroll 4
        for (int v = 0; v < V; ++v) acc[t][v] = _mm512_fmadd_ps(wv[v], g, acc[t][v]);
      }
    }
  }
#pragma GCC unroll 8
  for (int t = 0; t < TT; ++t)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) _mm512_store_ps(accb + t * kGiAccLd + 16 * v, acc[t][v]);
}

template <int V, bool Bf16>
void gi_cols(const BsrGradInputArgs& a, int64_t c0, int64_t c1) {
  using E = typename Cond<Bf16, uint16_t, float>::type;
  constexpr int LD = 16 * V;
  constexpr int64_t G = kGiAccLd / LD;  // columns per group
  static_assert(G >= 1, "a block column must fit a row of the partial-sum buffer");
  alignas(64) float accb[kGiChunk * kGiAccLd];
  alignas(64) uint32_t wt[kBsrFastMaxBlock * kBsrFastMaxBlock];  // float bits, or bf16 pairs
  const E* w = static_cast<const E*>(a.w);
  const int64_t blk = a.bo * a.bi;
  for (int64_t g0 = c0; g0 < c1; g0 += G) {
    const int64_t g1 = min64(g0 + G, c1);
    for (int64_t tc = 0; tc < a.T; tc += kGiChunk) {
      const int64_t tn = min64(kGiChunk, a.T - tc);
      bool empty[G];
      for (int64_t c = g0; c < g1; ++c) {
        float* acc_c = accb + (c - g0) * LD;
        const int64_t i0 = c * a.bi, ib = min64(a.bi, a.in - i0);
        bool first = true;
        for (int64_t q = a.col_offsets[c]; q < a.col_offsets[c + 1]; ++q) {
          const E* wb = w + int64_t(a.block_perm[q]) * blk;
          const int64_t o0 = int64_t(a.row_indices[q]) * a.bo, ob = min64(a.bo, a.out - o0);
          int64_t nrows;
          bool odd_tail = false;
          if constexpr (Bf16) {
            nrows = (ob + 1) / 2;
            odd_tail = (ob & 1) != 0;
            for (int64_t j = 0; j < nrows; ++j) {
              const int64_t o = 2 * j;
              for (int64_t k = 0; k < LD; ++k) {
                uint32_t v = 0;
                if (k < ib) v = uint32_t(wb[k * a.bo + o]) | (o + 1 < ob ? uint32_t(wb[k * a.bo + o + 1]) << 16 : 0u);
                wt[j * LD + k] = v;
              }
            }
          } else {
            nrows = ob;
            float* wf = reinterpret_cast<float*>(wt);
            for (int64_t o = 0; o < ob; ++o)
              for (int64_t k = 0; k < LD; ++k) wf[o * LD + k] = k < ib ? wb[k * a.bo + o] : 0.0f;
          }
          int64_t t = 0;
          auto tile = [&](auto tt) {
            constexpr int N = decltype(tt)::value;
            gi_tile<V, N, Bf16>(a, wt, nrows, o0, tc + t, acc_c + t * kGiAccLd, first, odd_tail);
          };
          for (; t + kGiTile <= tn; t += kGiTile) tile(Int<kGiTile>{});
          if (t < tn) dispatch_upto<kGiTile - 1>(tn - t, tile);
          first = false;
        }
        empty[c - g0] = first;
      }
      // The group's columns, row by row: only the matrix's last column can be ragged.
      E* dx = static_cast<E*>(a.dx) + tc * a.in;
      for (int64_t t = 0; t < tn; ++t)
        for (int64_t c = g0; c < g1; ++c) {
          const int64_t i0 = c * a.bi, ib = min64(a.bi, a.in - i0);
          const float* acc_c = accb + t * kGiAccLd + (c - g0) * LD;
#pragma GCC unroll 4
          for (int v = 0; v < V; ++v) {
            const __m512 s = empty[c - g0] ? _mm512_setzero_ps() : _mm512_load_ps(acc_c + 16 * v);
            store_f32(dx + t * a.in + i0 + 16 * v, s, mask16(ib - 16 * v));
          }
        }
    }
  }
}

template <bool Bf16>
void gi_dispatch(const BsrGradInputArgs& a, int64_t c0, int64_t c1) {
  switch ((a.bi + 15) / 16) {
    case 1: return gi_cols<1, Bf16>(a, c0, c1);
    case 2: return gi_cols<2, Bf16>(a, c0, c1);
    case 3: return gi_cols<3, Bf16>(a, c0, c1);
    default: return gi_cols<4, Bf16>(a, c0, c1);
  }
}

// ---------------------------------------------------------------- sddmm
// dW[k][o] = sum_t x[t, k] dy[t, o] over one block: vectorised over o (contiguous in the kernel layout), a group
// of KG input features at a time, KG x V accumulators in registers over all tokens.
template <int V>
constexpr int sddmm_group() {
  return V == 1 ? 16 : V == 2 ? 12 : V == 3 ? 8 : 6;
}

template <int V, int KG>
void sddmm_group_f32(const BsrSddmmArgs& a, const __mmask16* m, const __mmask16* mb, int64_t o0, int64_t xk0,
                     float* dwk) {
  const float* dy = static_cast<const float*>(a.dy) + o0;
  const float* x = static_cast<const float*>(a.x) + xk0;
  __m512 acc[KG][V];
#pragma GCC unroll 16
  for (int j = 0; j < KG; ++j)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) acc[j][v] = _mm512_setzero_ps();
  for (int64_t t = 0; t < a.T; ++t, dy += a.lddy, x += a.ldx) {
    __m512 g[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) g[v] = _mm512_maskz_loadu_ps(m[v], dy + 16 * v);
#pragma GCC unroll 16
    for (int j = 0; j < KG; ++j) {
      const __m512 xv = _mm512_set1_ps(x[j]);
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) acc[j][v] = _mm512_fmadd_ps(g[v], xv, acc[j][v]);
    }
  }
#pragma GCC unroll 16
  for (int j = 0; j < KG; ++j)
#pragma GCC unroll 16
    for (int v = 0; v < V; ++v)  // outputs past a ragged edge (lanes >= ob) get 0, not 0 * x (NaN for Inf x)
      _mm512_mask_storeu_ps(dwk + j * a.bo + 16 * v, mb[v], _mm512_maskz_mov_ps(m[v], acc[j][v]));
}

// bfloat16: pairs of tokens. Per chunk of 2 * kSdPairs tokens, dy and x rows t, t+1 are interleaved once into
// 32-bit pairs (L1 buffers), then vdpbf16ps runs over the pairs; partial sums per block live in an fp32 buffer.
// 64 pairs: the fp32 partial sums are reloaded every 64 vdpbf16ps per accumulator, a small overhead (numbers:
// docs/measurements.md, "Block-sparse gradients on AVX-512").
constexpr int64_t kSdPairs = 64;

// out[i] = (ra[i], rb[i]) as 32-bit pairs for i < 32 * U (lanes >= n zero); rb may be null (zeros).
template <int U>
inline void interleave_rows(const uint16_t* ra, const uint16_t* rb, int64_t n, uint32_t* out) {
  const __m512i lo = _mm512_load_si512(kPairLo), hi = _mm512_load_si512(kPairHi);
#pragma GCC unroll 16
  for (int u = 0; u < U; ++u) {
    const __mmask32 mk = mask32(n - 32 * u);
    const __m512i va = _mm512_maskz_loadu_epi16(mk, ra + 32 * u);
    const __m512i vb = rb ? _mm512_maskz_loadu_epi16(mk, rb + 32 * u) : _mm512_setzero_si512();
    _mm512_store_si512(out + 32 * u, _mm512_permutex2var_epi16(va, lo, vb));
    _mm512_store_si512(out + 32 * u + 16, _mm512_permutex2var_epi16(va, hi, vb));
  }
}

template <int V, int KG>
void sddmm_group_bf16(const uint32_t* dyp, const uint32_t* xp, int64_t np, float* acck, bool first) {
  __m512 acc[KG][V];
#pragma GCC unroll 16
  for (int j = 0; j < KG; ++j)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v)
      acc[j][v] = first ? _mm512_setzero_ps() : _mm512_load_ps(acck + j * kBsrFastMaxBlock + 16 * v);
  for (int64_t i = 0; i < np; ++i) {
    __m512i g[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) g[v] = _mm512_load_si512(dyp + i * kBsrFastMaxBlock + 16 * v);
#pragma GCC unroll 16
    for (int j = 0; j < KG; ++j) {
      const __m512i xv = _mm512_set1_epi32(int(xp[i * kBsrFastMaxBlock + j]));
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) acc[j][v] = _mm512_dpbf16_ps(acc[j][v], (__m512bh)g[v], (__m512bh)xv);
    }
  }
#pragma GCC unroll 16
  for (int j = 0; j < KG; ++j)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) _mm512_store_ps(acck + j * kBsrFastMaxBlock + 16 * v, acc[j][v]);
}

template <int V, bool Bf16>
void sddmm_rows(const BsrSddmmArgs& a, int64_t r0, int64_t r1) {
  constexpr int KG = sddmm_group<V>();
  constexpr int U = (kBsrFastMaxBlock + 31) / 32;
  using E = typename Cond<Bf16, uint16_t, float>::type;
  E* dw = static_cast<E*>(a.dw);
  const int64_t blk = a.bo * a.bi;
  __mmask16 mb[V];
#pragma GCC unroll 16
  for (int v = 0; v < V; ++v) mb[v] = mask16(a.bo - 16 * v);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t o0 = r * a.bo, ob = min64(a.bo, a.out - o0);
    __mmask16 m[V];
#pragma GCC unroll 16
    for (int v = 0; v < V; ++v) m[v] = mask16(ob - 16 * v);
    for (int64_t p = a.row_offsets[r]; p < a.row_offsets[r + 1]; ++p) {
      const int64_t i0 = int64_t(a.col_indices[p]) * a.bi, ib = min64(a.bi, a.in - i0);
      E* dwb = dw + p * blk;
      if constexpr (Bf16) {
        alignas(64) float acc[kBsrFastMaxBlock * kBsrFastMaxBlock];  // [k][o]
        alignas(64) uint32_t dyp[kSdPairs * kBsrFastMaxBlock], xp[kSdPairs * kBsrFastMaxBlock];
        const uint16_t* dy = static_cast<const uint16_t*>(a.dy) + o0;
        const uint16_t* x = static_cast<const uint16_t*>(a.x) + i0;
        bool first = true;
        for (int64_t t0 = 0; t0 < a.T; t0 += 2 * kSdPairs) {
          const int64_t np = min64(kSdPairs, (a.T - t0 + 1) / 2);
          for (int64_t i = 0; i < np; ++i) {
            const int64_t t = t0 + 2 * i;
            const bool two = t + 1 < a.T;
            interleave_rows<(V + 1) / 2>(dy + t * a.lddy, two ? dy + (t + 1) * a.lddy : nullptr, ob,
                                         dyp + i * kBsrFastMaxBlock);
            interleave_rows<U>(x + t * a.ldx, two ? x + (t + 1) * a.ldx : nullptr, ib, xp + i * kBsrFastMaxBlock);
          }
          for (int64_t kg = 0; kg < ib; kg += KG) {
            dispatch_upto<KG>(min64(KG, ib - kg), [&](auto kk) {
              sddmm_group_bf16<V, decltype(kk)::value>(dyp, xp + kg, np, acc + kg * kBsrFastMaxBlock, first);
            });
          }
          first = false;
        }
        for (int64_t k = 0; k < a.bi; ++k)
#pragma GCC unroll 16
          for (int v = 0; v < V; ++v) {
            const __m512 s = k < ib && !first ? _mm512_maskz_load_ps(m[v], acc + k * kBsrFastMaxBlock + 16 * v)
                                              : _mm512_setzero_ps();
            store_f32(dwb + k * a.bo + 16 * v, s, mb[v]);
          }
      } else {
        for (int64_t kg = 0; kg < ib; kg += KG) {
          dispatch_upto<KG>(min64(KG, ib - kg), [&](auto kk) {
            sddmm_group_f32<V, decltype(kk)::value>(a, m, mb, o0, i0 + kg, dwb + kg * a.bo);
          });
        }
        // Features of a ragged edge block outside the matrix get an exact zero gradient.
        for (int64_t k = ib; k < a.bi; ++k)
#pragma GCC unroll 16
          for (int v = 0; v < V; ++v) _mm512_mask_storeu_ps(dwb + k * a.bo + 16 * v, mb[v], _mm512_setzero_ps());
      }
    }
  }
}

template <bool Bf16>
void sddmm_dispatch(const BsrSddmmArgs& a, int64_t r0, int64_t r1) {
  switch ((a.bo + 15) / 16) {
    case 1: return sddmm_rows<1, Bf16>(a, r0, r1);
    case 2: return sddmm_rows<2, Bf16>(a, r0, r1);
    case 3: return sddmm_rows<3, Bf16>(a, r0, r1);
    default: return sddmm_rows<4, Bf16>(a, r0, r1);
  }
}

}  // namespace

void bsr_fwd_f32_avx512(const BsrFwdArgs& a, int64_t r0, int64_t r1) {
  fwd_dispatch<false>(a, r0, r1);
}
void bsr_fwd_bf16_avx512(const BsrFwdArgs& a, int64_t r0, int64_t r1) {
  fwd_dispatch<true>(a, r0, r1);
}
bool bsr_amx_bf16_fits(int64_t bo, int64_t bi, int64_t in) {
  return bo % 16 == 0 && bo <= 64 && (bi == 16 || bi == 32 || bi == 64) && in % bi == 0;
}

void bsr_fwd_bf16_amx(const BsrFwdArgs& a, int64_t r0, int64_t r1) {
  if (a.T <= 0 || r0 >= r1) return;
  AmxConfig cfg;
  const int64_t kc = a.bi < 32 ? a.bi : 32;
  for (int i = 0; i < 4; ++i) cfg.rows[i] = 16, cfg.colsb[i] = 64;
  for (int i = 4; i < 6; ++i) cfg.rows[i] = 16, cfg.colsb[i] = uint16_t(kc * 2);
  for (int i = 6; i < 8; ++i) cfg.rows[i] = uint8_t(kc / 2), cfg.colsb[i] = 64;
  alignas(64) float acc[32 * 32];
  int64_t most = 0;  // blocks in the fullest row of the chunk: the repack buffer holds one row
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t n = a.row_offsets[r + 1] - a.row_offsets[r];
    most = n > most ? n : most;
  }
  // The last T % 16 tokens run as a tile of 16 too, from a zero-padded copy of their X rows into a scratch Y: every
  // token gets the same sums whatever the token count or the thread split. (malloc, not std::vector: no STL code in
  // a translation unit compiled for AVX-512, see the top.)
  const int64_t T16 = a.T / 16 * 16, rem = a.T - T16;
  const size_t pack_elems = size_t(most > 0 ? most : 1) * a.bo * a.bi;
  const size_t tail_elems = rem ? size_t(16) * (a.in + a.out) : 0;
  auto* buf = static_cast<uint16_t*>(std::malloc((pack_elems + tail_elems) * 2));
  if (buf == nullptr) {  // no memory for the scratch: the AVX-512 kernel needs none
    fwd_dispatch<true>(a, r0, r1);
    return;
  }
  uint16_t* packed = buf;
  BsrFwdArgs tail = a;
  if (rem) {
    uint16_t* xpad = buf + pack_elems;
    std::memset(xpad, 0, size_t(16) * a.in * 2);
    for (int64_t t = 0; t < rem; ++t)
      std::memcpy(xpad + t * a.in, static_cast<const uint16_t*>(a.x) + (T16 + t) * a.ldx, size_t(a.in) * 2);
    tail.x = xpad;
    tail.ldx = a.in;
    tail.y = xpad + 16 * a.in;  // [16][out], written for the chunk's columns only
  }
  _tile_loadconfig(&cfg);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t first = a.row_offsets[r], count = a.row_offsets[r + 1] - first;
    amx_pack_pairs(a, first, count, packed);
    int64_t t0 = 0;
    for (; t0 + 32 <= T16; t0 += 32) amx_bf16_tokens<2>(a, r, first, count, packed, t0, acc);
    if (t0 < T16) amx_bf16_tokens<1>(a, r, first, count, packed, t0, acc);
    if (rem) amx_bf16_tokens<1>(tail, r, first, count, packed, 0, acc);
  }
  _tile_release();
  if (rem) {
    const int64_t c0 = r0 * a.bo, c1 = r1 * a.bo < a.out ? r1 * a.bo : a.out;
    for (int64_t t = 0; t < rem; ++t)
      std::memcpy(static_cast<uint16_t*>(a.y) + (T16 + t) * a.out + c0,
                  static_cast<const uint16_t*>(tail.y) + t * a.out + c0, size_t(c1 - c0) * 2);
  }
  std::free(buf);
}

void bsr_grad_input_f32_avx512(const BsrGradInputArgs& a, int64_t c0, int64_t c1) {
  gi_dispatch<false>(a, c0, c1);
}
void bsr_grad_input_bf16_avx512(const BsrGradInputArgs& a, int64_t c0, int64_t c1) {
  gi_dispatch<true>(a, c0, c1);
}
void bsr_sddmm_f32_avx512(const BsrSddmmArgs& a, int64_t r0, int64_t r1) {
  sddmm_dispatch<false>(a, r0, r1);
}
void bsr_sddmm_bf16_avx512(const BsrSddmmArgs& a, int64_t r0, int64_t r1) {
  sddmm_dispatch<true>(a, r0, r1);
}

}  // namespace sparsekern::cpu

#endif  // __x86_64__
