// AVX2 + FMA kernels for vector blocks: column vectors (V, 1) and row vectors (1, V), V in {4, 8, 16, 32}, the
// plan of vec_avx512.cpp (whose comment says why) with 8-lane vectors and 16 registers. bsr.cpp calls these for
// those block shapes on AVX2 CPUs; float32 and bfloat16 (widened to float32, float32 accumulation). Compiled
// with a target pragma inside a baseline x86-64 build: no torch or STL headers, helpers have internal linkage,
// only the entry points are external.
//  - Column vectors: 4 rows of the block x 3 vectors of tokens (24 tokens, 12 accumulators) per pass over the
//    entries: 7 loads per 12 FMAs.
//  - Row vectors: X packed per group of 4 or 8 columns (a (1, 16) or (1, 32) block is 2 or 4 groups of 8); a
//    vector holds 2 tokens x 4 columns (12 accumulators, 24 tokens) or 1 token x 8 columns (8 accumulators).
#if defined(__x86_64__)
#pragma GCC target("avx2,fma")

#include <immintrin.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "act_avx2.h"
#include "bsr_kernels.h"
#include "epilogue.h"
#include "tile_avx2.h"

namespace sparsekern::cpu {
namespace {

constexpr int64_t kRowGroup = 64;  // output rows whose partial sums are kept in the L1 buffer

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

// Calls f(Int<n>{}) for n = ceil(tb / 8) clamped to [1, N].
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
      __m256 acc[R][NV];
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_setzero_ps();
      const float* wp = wf + (pb - j0) * V + s;
      for (int64_t p = pb; p < pe; ++p, wp += V) {
        const float* xr = xt + int64_t(ci[p]) * TT;
        __m256 xv[NV];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) xv[v] = _mm256_load_ps(xr + v * L);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          const __m256 wv = _mm256_broadcast_ss(wp + r);
#pragma GCC unroll 4
          for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_fmadd_ps(wv, xv[v], acc[r][v]);
        }
      }
      float* pr = part + ((b - b0) * V + s) * TT;
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) _mm256_store_ps(pr + r * TT + v * L, acc[r][v]);
    }
  }
}

// The values of the entries [j0, j1) as fp32, contiguous (entry j at out + (j - j0) * V).
template <int V, typename E>
void stage_values(const Rows<E>& m, int64_t j0, int64_t j1, float* out) {
  for (int64_t j = j0; j < j1; ++j) {
    const E* src = m.w + (m.perm ? int64_t(m.perm[j]) : j) * V;
    float* dst = out + (j - j0) * V;
    if constexpr (V == 4) {
      for (int o = 0; o < V; ++o) dst[o] = to_f32(src[o]);
    } else {
      for (int o = 0; o < V; o += L) _mm256_storeu_ps(dst + o, load_n(src + o, L));
    }
  }
}

// y[t, b * V + o] = act(bias + sum ...) for the block rows [b0, b1) of (V, 1) blocks, `out` rows in all.
template <int V, typename E>
bool col_forward(const Rows<E>& m, int64_t b0, int64_t b1, const E* x, int64_t ldx, int64_t ncols, int64_t T,
                 const E* bias, Act act, E* y, int64_t ldy, int64_t out) {
  constexpr int R = 4, NVMAX = 3;
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
// X packed in groups of V in {4, 8} columns; a (1, S V) block is S groups. The packed tile of NG groups of 8
// tokens: per group of V columns, NG * 8 * V floats; token t = 8 j + i of the tile is at slot(i) * V of its
// group j's 8 * V floats, the order in which reduce_rows leaves the sums.
template <int V>
inline int slot(int i) {
  return V == 4 ? 2 * (i % 4) + i / 4 : i;  // V = 4: vector i % 4, half i / 4
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
    for (int64_t c = 0; c < ncols; c += L) {  // 8 columns: 8 / V groups
      const __m256 v = load_n(xr + c, ncols - c);
      float* d = dst + (c / V) * GS;
      if constexpr (V == 4) {
        _mm_storeu_ps(d, _mm256_castps256_ps128(v));
        if (ncols - c > 4) _mm_storeu_ps(d + GS, _mm256_extractf128_ps(v, 1));
      } else {
        _mm256_storeu_ps(d, v);
      }
    }
  }
}

// The entry's V values broadcast to every group of V lanes.
template <int V>
inline __m256 bcast_values(const float* p) {
  if constexpr (V == 4) {
    return _mm256_broadcast_ps(reinterpret_cast<const __m128*>(p));
  } else {
    return _mm256_loadu_ps(p);
  }
}
template <int V>
inline __m256 bcast_values(const uint16_t* p) {
  if constexpr (V == 4) {
    const __m128i h = _mm_cvtepu16_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    const __m128 f = _mm_castsi128_ps(_mm_slli_epi32(h, 16));
    return _mm256_insertf128_ps(_mm256_castps128_ps256(f), f, 1);
  } else {
    return widen_bf16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
}

// The V partial sums of every token of NG groups of 8 tokens (acc, NG * V / 2 vectors for V = 4, NG * V for
// V = 8) -> out[j] lane i = token 8 j + i.
template <int V, int NG, int A>
__attribute__((always_inline)) inline void reduce_rows(const __m256 (&acc)[A], __m256 (&out)[NG]) {
#pragma GCC unroll 4
  for (int j = 0; j < NG; ++j) {
    if constexpr (V == 4) {
      const __m256* a = acc + 4 * j;
      out[j] = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    } else {
      out[j] = reduce(acc + 8 * j);
    }
  }
}

// part[(r - r0) * TT + t] = sum over the entries of rows [r0, r1) of their S * V values . X[t, S V c ...], each
// entry S groups of V columns. ng: groups of the matrix; glast: the group whose columns end past the matrix (-1
// if none), mlast its lanes inside the matrix. Groups past the matrix are skipped.
template <int V, int S, int NG, typename E>
void row_rows(const Rows<E>& m, int64_t r0, int64_t r1, const float* xg, int64_t ng, int64_t glast, __m256 mlast,
              float* part) {
  constexpr int A = NG * V;  // accumulators: NG * 8 tokens x V lanes
  constexpr int64_t GS = NG * L * V, TT = NG * L;
  for (int64_t r = r0; r < r1; ++r) {
    __m256 acc[A];
#pragma GCC unroll 16
    for (int a = 0; a < A; ++a) acc[a] = _mm256_setzero_ps();
    for (int64_t p = m.ro[r]; p < m.ro[r + 1]; ++p) {
      const E* wp = m.w + (m.perm ? int64_t(m.perm[p]) : p) * (S * V);
#pragma GCC unroll 4
      for (int s = 0; s < S; ++s) {
        const int64_t g = int64_t(m.ci[p]) * S + s;
        if (S > 1 && g >= ng) break;
        __m256 wv = bcast_values<V>(wp + s * V);
        if (__builtin_expect(g == glast, 0)) wv = _mm256_and_ps(mlast, wv);
        const float* xr = xg + g * GS;
#pragma GCC unroll 16
        for (int a = 0; a < A; ++a) acc[a] = _mm256_fmadd_ps(wv, _mm256_load_ps(xr + a * L), acc[a]);
      }
    }
    __m256 sum[NG];
    reduce_rows<V, NG>(acc, sum);
#pragma GCC unroll 4
    for (int j = 0; j < NG; ++j) _mm256_store_ps(part + (r - r0) * TT + j * L, sum[j]);
  }
}

// y[t, r] = act(bias + sum ...) for the rows [r0, r1) of (1, S * V) blocks over ncols input columns.
template <int V, int S, typename E>
bool row_forward(const Rows<E>& m, int64_t r0, int64_t r1, const E* x, int64_t ldx, int64_t ncols, int64_t T,
                 const E* bias, Act act, E* y, int64_t ldy) {
  constexpr int NGMAX = V == 4 ? 3 : 1;  // 12 or 8 accumulators
  if (r1 <= r0 || T <= 0) return true;
  const int64_t ng = (ncols + V - 1) / V;
  float* xg = thread_buf(0, ng * NGMAX * L * V);
  float* part = thread_buf(1, kRowGroup * NGMAX * L);
  if (!xg || !part) return false;
  const int64_t rem = ncols - (ng - 1) * V;  // columns of the last group inside the matrix
  const int64_t glast = rem < V ? ng - 1 : -1;
  alignas(32) int32_t lanes[L];
  for (int i = 0; i < L; ++i) lanes[i] = i % V < rem ? -1 : 0;
  const __m256 mlast = _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(lanes)));
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
    case 16: return row_forward<8, 2>(m, r0, r1, x, a.ldx, a.in, a.T, bias, act, y, a.out);
    default: return row_forward<8, 4>(m, r0, r1, x, a.ldx, a.in, a.T, bias, act, y, a.out);
  }
}

// dx = dy W, the forward of W^T: (V, 1) blocks of W are row vectors of W^T, (1, V) blocks column vectors.
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
    case 16: return row_forward<8, 2>(m, c0, c1, dy, a.lddy, a.out, a.T, no_bias, Act::None, dx, a.in);
    default: return row_forward<8, 4>(m, c0, c1, dy, a.lddy, a.out, a.T, no_bias, Act::None, dx, a.in);
  }
}

}  // namespace

bool vec_fwd_f32_avx2(const BsrFwdArgs& a, int64_t r0, int64_t r1) {
  return fwd<float>(a, r0, r1);
}
bool vec_fwd_bf16_avx2(const BsrFwdArgs& a, int64_t r0, int64_t r1) {
  return fwd<uint16_t>(a, r0, r1);
}
bool vec_grad_input_f32_avx2(const BsrGradInputArgs& a, int64_t c0, int64_t c1) {
  return grad_input<float>(a, c0, c1);
}
bool vec_grad_input_bf16_avx2(const BsrGradInputArgs& a, int64_t c0, int64_t c1) {
  return grad_input<uint16_t>(a, c0, c1);
}

}  // namespace sparsekern::cpu

#endif  // __x86_64__
