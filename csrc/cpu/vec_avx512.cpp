// AVX-512 kernels for vector blocks: column vectors (V, 1), whose V output rows share one kept input column, and
// row vectors (1, V), V consecutive input columns of one output row, V in {4, 8, 16, 32}. bsr.cpp
// calls these for those block shapes on AVX-512 CPUs (vec_avx2.cpp has the AVX2 ones); float32 and bfloat16
// (widened to float32, float32 accumulation). The input gradient is the forward of W^T, whose blocks are the
// transposed shape: (V, 1) blocks of W are (1, V) blocks of W^T and the other way round, so the two kernels serve
// both ops, the gradient reading the values through block_perm. Compiled with a target pragma inside a baseline
// x86-64 build: no torch or STL headers, helpers have internal linkage, only the entry points are external.
//
// Tokens are vectorised in both, as in csr_avx512.cpp: a tile of tokens is packed once (fp32, token-contiguous)
// and every block row then runs its entries with its accumulators in registers; the partial sums of 64 rows go to
// an L1 buffer [rows][tile], transposed into Y with the bias and the activation (store_transposed).
//  - Column vectors: per entry, the NV vectors of X^T[column] are loaded once and feed R rows of the block, each
//    with one broadcast of its value (the entry's V values are contiguous): R * NV FMAs for NV + R loads, so the
//    loop is bound by the FMAs, not by the loads as the 1x1 kernel is. R = 8 rows x NV = 3 vectors (48 tokens)
//    are 24 accumulators; blocks of 16 or 32 rows take 8 rows per pass over the entries. V = 4 takes 4 rows x 4
//    vectors (64 tokens). The values are read as fp32 from a contiguous array: W itself (float32 forward), or a
//    per-call fp32 copy (bfloat16, whose broadcasts would otherwise each need a conversion, and the input
//    gradient, whose entries are in block_perm order).
//  - Row vectors: X is packed per group of V columns as [group][token][V], so that a vector holds 16 / V tokens x
//    the V columns of one group and the entry's V values are one broadcast of 4 or 8 lanes (vbroadcastf32x4/x8):
//    one load of X per FMA, nothing else per FMA but the entry's index and values. The V lanes of a token are
//    partial sums, added per row at the end by a fixed tree (the tokens' order in the packed tile is chosen so
//    that the tree leaves them in order). Every X value is used once per entry, so the loop reads X from L2 at
//    one vector per FMA: that, not the FMAs, bounds it.
// Each output element is computed the same way whichever tile or thread holds its token, so every work split
// gives the same bits. Parts of ragged edge blocks outside the matrix are never read into a result: rows past
// `out` are computed but not stored; the lanes past `in` of a row vector's last group are zeroed in its values.
#if defined(__x86_64__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")
// GCC 12 flags the deliberately undefined vector inside its own masked-load intrinsics (avx512fintrin.h).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <immintrin.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "act_avx512.h"
#include "bsr_kernels.h"
#include "epilogue.h"
#include "tile_avx512.h"

namespace sparsekern::cpu {
namespace {

constexpr int64_t kRowGroup = 64;  // output rows whose partial sums are kept in the L1 buffer
constexpr int64_t kMaxTile = 64;   // most tokens of a tile (any kernel here)

// This thread's buffer `slot` of at least n floats (64-byte aligned), kept across calls; null if the allocation
// fails.
float* thread_buf(int slot, int64_t n) {
  struct Buf {
    float* p = nullptr;
    int64_t n = 0;
    ~Buf() { std::free(p); }
  };
  static thread_local Buf bufs[3];
  Buf& b = bufs[slot];
  if (b.n < n) {
    std::free(b.p);
    b.p = static_cast<float*>(std::aligned_alloc(64, size_t((n * 4 + 63) / 64 * 64)));
    b.n = b.p ? n : 0;
  }
  return b.p;
}

template <int N>
struct Int {
  static constexpr int value = N;
};

// Calls f(Int<n>{}) for n = ceil(tb / 16) clamped to [1, N].
template <int N, typename F>
inline void with_vecs(int64_t tb, const F& f) {
  if constexpr (N > 1) {
    if ((tb + L - 1) / L < N) return with_vecs<N - 1>(tb, f);
  }
  f(Int<N>{});
}

// A sparse matrix walked by rows: segments ro, indices ci, the values of entry j at w + (perm ? perm[j] : j) * V.
template <typename E>
struct Rows {
  const int32_t* ro;
  const int32_t* ci;
  const E* w;
  const int32_t* perm;  // null: entries in storage order
};

// ---------------------------------------------------------------- column vectors (V, 1)
// part[((b - b0) * V + o) * TT + t] = sum over the entries p of block row b of wf[(p - j0) * V + o] *
// xt[ci[p] * TT + t] for the block rows [b0, b1) (wf: the values from entry j0 on, fp32).
template <int V, int R, int NV>
void col_rows(const int32_t* ro, const int32_t* ci, const float* wf, int64_t j0, int64_t b0, int64_t b1,
              const float* xt, float* part) {
  constexpr int64_t TT = NV * L;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t pb = ro[b], pe = ro[b + 1];
    for (int s = 0; s < V; s += R) {
      __m512 acc[R][NV];
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
      const float* wp = wf + (pb - j0) * V + s;
      for (int64_t p = pb; p < pe; ++p, wp += V) {
        const float* xr = xt + int64_t(ci[p]) * TT;
        __m512 xv[NV];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) xv[v] = _mm512_load_ps(xr + v * L);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          const __m512 wv = _mm512_set1_ps(wp[r]);
#pragma GCC unroll 4
          for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(wv, xv[v], acc[r][v]);
        }
      }
      float* pr = part + ((b - b0) * V + s) * TT;
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) _mm512_store_ps(pr + r * TT + v * L, acc[r][v]);
    }
  }
}

// The values of the entries [j0, j1) as fp32, contiguous (entry j at out + (j - j0) * V).
template <int V, typename E>
void stage_values(const Rows<E>& m, int64_t j0, int64_t j1, float* out) {
  for (int64_t j = j0; j < j1; ++j) {
    const E* src = m.w + (m.perm ? int64_t(m.perm[j]) : j) * V;
    float* dst = out + (j - j0) * V;
    for (int o = 0; o < V; o += L) store_n(dst + o, load_n(src + o, V - o), V - o);
  }
}

// y[t, b * V + o] = act(bias + sum ...) for the block rows [b0, b1) of (V, 1) blocks, `out` rows in all.
template <int V, typename E>
bool col_forward(const Rows<E>& m, int64_t b0, int64_t b1, const E* x, int64_t ldx, int64_t ncols, int64_t T,
                 const E* bias, Act act, E* y, int64_t ldy, int64_t out) {
  constexpr int R = V < 8 ? V : 8;
  constexpr int NVMAX = R == 4 ? 4 : 3;
  constexpr int64_t G = kRowGroup / V;  // block rows per group
  if (b1 <= b0 || T <= 0) return true;
  const int64_t j0 = m.ro[b0], j1 = m.ro[b1];
  const float* wf = reinterpret_cast<const float*>(m.w) + j0 * V;
  if (sizeof(E) != 4 || m.perm) {
    float* st = thread_buf(2, (j1 - j0) * V + 1);
    if (!st) return false;
    stage_values<V>(m, j0, j1, st);
    wf = st;
  }
  float* xt = thread_buf(0, ncols * NVMAX * L);
  float* part = thread_buf(1, kRowGroup * NVMAX * L);
  if (!xt || !part) return false;
  for (int64_t t0 = 0; t0 < T; t0 += NVMAX * L) {
    const int64_t tb = T - t0 < NVMAX * L ? T - t0 : NVMAX * L;
    with_vecs<NVMAX>(tb, [&](auto nv) {
      constexpr int NV = decltype(nv)::value;
      pack_transposed<NV>(x + t0 * ldx, ldx, tb, ncols, xt);
      for (int64_t g0 = b0; g0 < b1; g0 += G) {
        const int64_t g1 = g0 + G < b1 ? g0 + G : b1;
        col_rows<V, R, NV>(m.ro, m.ci, wf, j0, g0, g1, xt, part);
        const int64_t o0 = g0 * V, o1 = g1 * V < out ? g1 * V : out;  // rows past `out` are not stored
        store_transposed<NV>(part, o1 - o0, tb, y + t0 * ldy + o0, ldy, bias ? bias + o0 : nullptr, act);
      }
    });
  }
  return true;
}

// ---------------------------------------------------------------- row vectors (1, V)
// The kernel packs X in groups of V in {4, 8, 16} columns; a (1, 32) block is S = 2 groups of 16.
// The packed tile of NG groups of 16 tokens: per group of V columns, NG * 16 * V floats; token t = 16 j + i of
// the tile is at slot(i) * V of its group j's 16 * V floats, the order in which reduce_rows leaves the sums.
template <int V>
inline int slot(int i) {
  if constexpr (V == 4) {
    return 4 * (i % 4) + i / 4;  // vector m = i % 4, lane group q = i / 4
  } else if constexpr (V == 8) {
    return 2 * (4 * (i / 8) + i % 4) + (i / 4) % 2;  // vector 4 (i / 8) + i % 4, half (i / 4) % 2
  } else {
    return i;
  }
}

// xg[g * GS + ...] = x[t, g * V + k] for the tb tokens of the tile, zeros past ncols and for tokens >= tb.
template <int V, int NG, typename E>
void pack_groups(const E* x, int64_t ldx, int64_t tb, int64_t ncols, float* xg) {
  constexpr int64_t GS = NG * L * V;
  const int64_t ng = (ncols + V - 1) / V;
  for (int64_t t = 0; t < NG * L; ++t) {
    float* dst = xg + (t / L) * L * V + slot<V>(int(t % L)) * V;
    if (t >= tb) {
      for (int64_t g = 0; g < ng; ++g) std::memset(dst + g * GS, 0, V * sizeof(float));
      continue;
    }
    const E* xr = x + t * ldx;
    for (int64_t c = 0; c < ncols; c += L) {  // 16 columns: 16 / V groups
      const __m512 v = load_n(xr + c, ncols - c);
      float* d = dst + (c / V) * GS;
      const int64_t n = (ncols - c + V - 1) / V;  // groups of these 16 columns inside the matrix
      if constexpr (V == 4) {
        _mm_storeu_ps(d, _mm512_castps512_ps128(v));
        if (n > 1) _mm_storeu_ps(d + GS, _mm512_extractf32x4_ps(v, 1));
        if (n > 2) _mm_storeu_ps(d + 2 * GS, _mm512_extractf32x4_ps(v, 2));
        if (n > 3) _mm_storeu_ps(d + 3 * GS, _mm512_extractf32x4_ps(v, 3));
      } else if constexpr (V == 8) {
        _mm256_storeu_ps(d, _mm512_castps512_ps256(v));
        if (n > 1) _mm256_storeu_ps(d + GS, _mm512_extractf32x8_ps(v, 1));
      } else {
        _mm512_storeu_ps(d, v);
      }
    }
  }
}

// The entry's V values broadcast to every group of V lanes.
template <int V>
inline __m512 bcast_values(const float* p) {
  if constexpr (V == 4) {
    return _mm512_broadcast_f32x4(_mm_loadu_ps(p));
  } else if constexpr (V == 8) {
    return _mm512_broadcast_f32x8(_mm256_loadu_ps(p));
  } else {
    return _mm512_loadu_ps(p);
  }
}
template <int V>
inline __m512 bcast_values(const uint16_t* p) {
  if constexpr (V == 4) {
    const __m128i h = _mm_cvtepu16_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    return _mm512_broadcast_f32x4(_mm_castsi128_ps(_mm_slli_epi32(h, 16)));
  } else if constexpr (V == 8) {
    const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm512_broadcast_f32x8(_mm256_castsi256_ps(_mm256_slli_epi32(h, 16)));
  } else {
    return load_n(p, L);
  }
}

// The V partial sums of every token of NG groups of 16 tokens (acc, NG * V vectors) -> out[j] lane i = token
// 16 j + i.
template <int V, int NG>
__attribute__((always_inline)) inline void reduce_rows(const __m512 (&acc)[NG * V], __m512 (&out)[NG]) {
  if constexpr (V == 16) {
    out[0] = reduce(acc);
  } else {
#pragma GCC unroll 4
    for (int j = 0; j < NG; ++j) {
      const __m512* a = acc + j * V;
      __m512 s[V / 2];
#pragma GCC unroll 4
      for (int i = 0; i < V / 2; ++i)
        s[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
      __m512 q[V / 4];
#pragma GCC unroll 2
      for (int i = 0; i < V / 4; ++i)
        q[i] = _mm512_add_ps(_mm512_shuffle_ps(s[2 * i], s[2 * i + 1], 0x44),
                             _mm512_shuffle_ps(s[2 * i], s[2 * i + 1], 0xEE));
      if constexpr (V == 4) {
        out[j] = q[0];
      } else {
        out[j] = _mm512_add_ps(_mm512_shuffle_f32x4(q[0], q[1], 0x88), _mm512_shuffle_f32x4(q[0], q[1], 0xDD));
      }
    }
  }
}

// part[(r - r0) * TT + t] = sum over the entries of rows [r0, r1) of their S * V values . X[t, S V c ...], each
// entry S groups of V columns. ng: groups of the matrix; glast: the group whose columns end past the matrix (-1
// if none), mlast its lanes inside the matrix. Groups past the matrix (the second of a ragged (1, 32) block) are
// skipped.
template <int V, int S, int NG, typename E>
void row_rows(const Rows<E>& m, int64_t r0, int64_t r1, const float* xg, int64_t ng, int64_t glast, __mmask16 mlast,
              float* part) {
  constexpr int A = NG * V;  // accumulators: NG * 16 tokens x V lanes
  constexpr int64_t GS = NG * L * V, TT = NG * L;
  for (int64_t r = r0; r < r1; ++r) {
    __m512 acc[A];
#pragma GCC unroll 16
    for (int a = 0; a < A; ++a) acc[a] = _mm512_setzero_ps();
    for (int64_t p = m.ro[r]; p < m.ro[r + 1]; ++p) {
      const E* wp = m.w + (m.perm ? int64_t(m.perm[p]) : p) * (S * V);
#pragma GCC unroll 2
      for (int s = 0; s < S; ++s) {
        const int64_t g = int64_t(m.ci[p]) * S + s;
        if (S > 1 && g >= ng) break;
        __m512 wv = bcast_values<V>(wp + s * V);
        if (__builtin_expect(g == glast, 0)) wv = _mm512_maskz_mov_ps(mlast, wv);
        const float* xr = xg + g * GS;
#pragma GCC unroll 16
        for (int a = 0; a < A; ++a) acc[a] = _mm512_fmadd_ps(wv, _mm512_load_ps(xr + a * L), acc[a]);
      }
    }
    __m512 sum[NG];
    reduce_rows<V, NG>(acc, sum);
#pragma GCC unroll 4
    for (int j = 0; j < NG; ++j) _mm512_store_ps(part + (r - r0) * TT + j * L, sum[j]);
  }
}

// y[t, r] = act(bias + sum ...) for the rows [r0, r1) of (1, S * V) blocks over ncols input columns.
template <int V, int S, typename E>
bool row_forward(const Rows<E>& m, int64_t r0, int64_t r1, const E* x, int64_t ldx, int64_t ncols, int64_t T,
                 const E* bias, Act act, E* y, int64_t ldy) {
  constexpr int NGMAX = 16 / V;  // 16 accumulators
  if (r1 <= r0 || T <= 0) return true;
  const int64_t ng = (ncols + V - 1) / V;
  float* xg = thread_buf(0, ng * NGMAX * L * V);
  float* part = thread_buf(1, kRowGroup * NGMAX * L);
  if (!xg || !part) return false;
  const int64_t rem = ncols - (ng - 1) * V;  // columns of the last group inside the matrix
  const int64_t glast = rem < V ? ng - 1 : -1;
  uint32_t lanes = 0;
  for (int i = 0; i < L; ++i) lanes |= uint32_t(i % V < rem) << i;
  const __mmask16 mlast = __mmask16(lanes);
  for (int64_t t0 = 0; t0 < T; t0 += NGMAX * L) {
    const int64_t tb = T - t0 < NGMAX * L ? T - t0 : NGMAX * L;
    with_vecs<NGMAX>(tb, [&](auto nv) {
      constexpr int NG = decltype(nv)::value;
      pack_groups<V, NG>(x + t0 * ldx, ldx, tb, ncols, xg);
      for (int64_t g0 = r0; g0 < r1; g0 += kRowGroup) {
        const int64_t g1 = g0 + kRowGroup < r1 ? g0 + kRowGroup : r1;
        row_rows<V, S, NG>(m, g0, g1, xg, ng, glast, mlast, part);
        store_transposed<NG>(part, g1 - g0, tb, y + t0 * ldy + g0, ldy, bias ? bias + g0 : nullptr, act);
      }
    });
  }
  return true;
}

// ---------------------------------------------------------------- entry points
// Forward: (V, 1) blocks run the column kernel over block rows, (1, V) blocks the row kernel over rows.
template <typename E>
bool fwd(const BsrFwdArgs& a, int64_t r0, int64_t r1) {
  const Rows<E> m{a.row_offsets, a.col_indices, static_cast<const E*>(a.w), nullptr};
  const E* x = static_cast<const E*>(a.x);
  const E* bias = static_cast<const E*>(a.bias);
  E* y = static_cast<E*>(a.y);
  const Act act = static_cast<Act>(a.act);
  if (a.bi == 1) {
    switch (a.bo) {
      case 4: return col_forward<4>(m, r0, r1, x, a.ldx, a.in, a.T, bias, act, y, a.out, a.out);
      case 8: return col_forward<8>(m, r0, r1, x, a.ldx, a.in, a.T, bias, act, y, a.out, a.out);
      case 16: return col_forward<16>(m, r0, r1, x, a.ldx, a.in, a.T, bias, act, y, a.out, a.out);
      default: return col_forward<32>(m, r0, r1, x, a.ldx, a.in, a.T, bias, act, y, a.out, a.out);
    }
  }
  switch (a.bi) {
    case 4: return row_forward<4, 1>(m, r0, r1, x, a.ldx, a.in, a.T, bias, act, y, a.out);
    case 8: return row_forward<8, 1>(m, r0, r1, x, a.ldx, a.in, a.T, bias, act, y, a.out);
    case 16: return row_forward<16, 1>(m, r0, r1, x, a.ldx, a.in, a.T, bias, act, y, a.out);
    default: return row_forward<16, 2>(m, r0, r1, x, a.ldx, a.in, a.T, bias, act, y, a.out);
  }
}

// dx = dy W, the forward of W^T (rows = block columns of W, walked by block_perm) without bias or activation:
// (V, 1) blocks of W are row vectors of W^T, (1, V) blocks column vectors.
template <typename E>
bool grad_input(const BsrGradInputArgs& a, int64_t c0, int64_t c1) {
  const Rows<E> m{a.col_offsets, a.row_indices, static_cast<const E*>(a.w), a.block_perm};
  const E* dy = static_cast<const E*>(a.dy);
  const E* no_bias = nullptr;
  E* dx = static_cast<E*>(a.dx);
  if (a.bo == 1) {
    switch (a.bi) {
      case 4: return col_forward<4>(m, c0, c1, dy, a.lddy, a.out, a.T, no_bias, Act::None, dx, a.in, a.in);
      case 8: return col_forward<8>(m, c0, c1, dy, a.lddy, a.out, a.T, no_bias, Act::None, dx, a.in, a.in);
      case 16: return col_forward<16>(m, c0, c1, dy, a.lddy, a.out, a.T, no_bias, Act::None, dx, a.in, a.in);
      default: return col_forward<32>(m, c0, c1, dy, a.lddy, a.out, a.T, no_bias, Act::None, dx, a.in, a.in);
    }
  }
  switch (a.bo) {
    case 4: return row_forward<4, 1>(m, c0, c1, dy, a.lddy, a.out, a.T, no_bias, Act::None, dx, a.in);
    case 8: return row_forward<8, 1>(m, c0, c1, dy, a.lddy, a.out, a.T, no_bias, Act::None, dx, a.in);
    case 16: return row_forward<16, 1>(m, c0, c1, dy, a.lddy, a.out, a.T, no_bias, Act::None, dx, a.in);
    default: return row_forward<16, 2>(m, c0, c1, dy, a.lddy, a.out, a.T, no_bias, Act::None, dx, a.in);
  }
}

}  // namespace

bool vec_fwd_f32_avx512(const BsrFwdArgs& a, int64_t r0, int64_t r1) {
  return fwd<float>(a, r0, r1);
}
bool vec_fwd_bf16_avx512(const BsrFwdArgs& a, int64_t r0, int64_t r1) {
  return fwd<uint16_t>(a, r0, r1);
}
bool vec_grad_input_f32_avx512(const BsrGradInputArgs& a, int64_t c0, int64_t c1) {
  return grad_input<float>(a, c0, c1);
}
bool vec_grad_input_bf16_avx512(const BsrGradInputArgs& a, int64_t c0, int64_t c1) {
  return grad_input<uint16_t>(a, c0, c1);
}

}  // namespace sparsekern::cpu

#endif  // __x86_64__
