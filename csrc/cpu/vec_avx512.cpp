// AVX-512 kernels for vector blocks: column vectors (V, 1), whose V output rows share one kept input column, and
// row vectors (1, V), V consecutive input columns of one output row, V in {4, 8, 16, 32}. bsr.cpp
// calls these for those block shapes on AVX-512 CPUs (vec_avx2.cpp has the AVX2 ones); float32 and bfloat16
// (widened to float32, float32 accumulation). The input gradient is the forward of W^T, whose blocks are the
// transposed shape: (V, 1) blocks of W are (1, V) blocks of W^T and the other way round, so the two kernels serve
// both ops, the gradient reading the values through block_perm. The weight gradient (SDDMM) has a kernel of its own
// (the "sddmm" section below). Compiled with a target pragma inside a baseline x86-64 build: no torch or STL
// headers, helpers have internal linkage, only the entry points are external.
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
#include "dispatch_upto.h"
#include "epilogue.h"
#include "thread_buf.h"
#include "tile_avx512.h"

namespace sparsekern::cpu {
namespace {

constexpr int64_t kRowGroup = 64;  // output rows whose partial sums are kept in the L1 buffer
constexpr int64_t kMaxTile = 64;   // most tokens of a tile (any kernel here)

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

// ---------------------------------------------------------------- sddmm
// dW[p] = (dY^T X) on the V outputs of each kept vector p, accumulated in fp32 over token tiles (64 tokens for
// column vectors, 256 for row vectors). A column vector's V outputs are dot products over the tokens of its V rows of
// dY with its column of X; its block row's rows of dY are shared by all its vectors, its column of X is its own. A row
// vector is a column vector of W^T with dY and X swapped: its V columns of X are shared by all the vectors of its block
// column, its row of dY is its own. The outputs of different vectors are independent, so row vectors are walked by
// block column (each thread sorts the vectors of its rows by column once per call, per chunk of 512 rows): both kinds
// then run one loop, a shared operand against the entries' own ones.
// A vector register holds P = 16 / VS tokens x VS outputs (VS = min(V, 16); a (32, 1) or (1, 32) vector is
// NH = 2 halves of 16 that share the entry's operand), lane o * P + j = token j of the step, output o. Per step:
// one load of the shared operand (packed per tile in that lane order: dY of the block rows, X of the groups of VS
// columns) per half, and per entry one broadcast of its P tokens (vbroadcastss / sd / f32x4 of X^T or dY^T,
// token-contiguous) and NH FMAs; 8 entries a register block. The P token phases are added once per tile. Per
// FMA that is 1 / NH + 1 / 8 loads, from L1 or L2 (measured no slower from L2). Walked by rows instead, row
// vectors would load a fresh X vector from L2 for every FMA, at about half the rate (docs/measurements.md).
// The tiles depend only on T and the partial sums of an entry only on V (row vectors) or on its row's entries
// (column vectors), so every thread count gives the same bits. Outputs of ragged edge vectors outside the matrix
// are computed from zero padding and then written as exact zeros.
constexpr int kSdEntries = 8;  // entries per register block
// Column vectors: tiles of 64 tokens (X^T, read at random columns, stays in L2: in x 256 bytes), dY packed for
// 64 rows (16 KiB, L1; 1024 rows measured no faster). Row vectors: tiles of 256 tokens (X is read one group at a time,
// dY^T at random rows of the chunk: 512 rows x 1 KiB, L2), so that an entry runs 4x the FMAs per update of its outputs.
constexpr int64_t kSdColTile = 64, kSdColChunk = 64, kSdRowTile = 256, kSdRowChunk = 512;

// W consecutive floats at p repeated over the vector (W = 16: a plain load).
template <int W>
__attribute__((always_inline)) inline __m512 load_bc(const float* p) {
  if constexpr (W == L) {
    return _mm512_loadu_ps(p);
  } else if constexpr (W == 4) {
    return _mm512_broadcast_f32x4(_mm_loadu_ps(p));
  } else if constexpr (W == 2) {
    double d;
    std::memcpy(&d, p, sizeof(d));
    return _mm512_castpd_ps(_mm512_set1_pd(d));
  } else {
    return _mm512_set1_ps(*p);
  }
}

// dst[(g * S + s) * 16 + o * P + j] = src[(s * P + j) * ld + g * VS + o] (VS = 16 / P) for the groups g < ng of
// VS columns and the steps s < S; zero where s * P + j >= tb or g * VS + o >= nc. Steps outer: the P rows of a step
// are read front to back.
template <int P, typename E>
void pack_interleaved(const E* src, int64_t ld, int64_t tb, int64_t nc, int64_t ng, int64_t S, float* dst) {
  constexpr int VS = L / P;
  alignas(64) int32_t perm[L];
  for (int o = 0; o < VS; ++o)
    for (int j = 0; j < P; ++j) perm[o * P + j] = j * VS + o;
  const __m512i idx = _mm512_load_si512(perm);
  for (int64_t s = 0; s < S; ++s) {
    const int64_t t = s * P;
    float* d = dst + s * L;
    for (int64_t g = 0; g < ng; ++g) {
      const int64_t c = g * VS, n = nc - c < VS ? nc - c : VS;
      auto part = [&](int64_t i) {
        return t + i < tb && n > 0 ? load_n(src + (t + i) * ld + c, n) : _mm512_setzero_ps();
      };
      __m512 r;
      if constexpr (P == 1) {
        r = part(0);
      } else if constexpr (P == 2) {
        r = _mm512_insertf32x8(part(0), _mm512_castps512_ps256(part(1)), 1);
        r = _mm512_permutexvar_ps(idx, r);
      } else {
        r = _mm512_insertf32x4(part(0), _mm512_castps512_ps128(part(1)), 1);
        r = _mm512_insertf32x4(r, _mm512_castps512_ps128(part(2)), 2);
        r = _mm512_insertf32x4(r, _mm512_castps512_ps128(part(3)), 3);
        r = _mm512_permutexvar_ps(idx, r);
      }
      _mm512_store_ps(d + g * S * L, r);
    }
  }
}

// o[e][h * VS + k] += the sum over the P token phases j of v[h][e] lane k * P + j (VS = 16 / P outputs per half).
template <int NE, int NH, int P>
__attribute__((always_inline)) inline void fold_add(const __m512 (&v)[NH][NE], float* const (&o)[NE]) {
  if constexpr (P == 1) {
#pragma GCC unroll 2
    for (int h = 0; h < NH; ++h)
#pragma GCC unroll 8
      for (int e = 0; e < NE; ++e) {
        float* d = o[e] + h * L;
        _mm512_storeu_ps(d, _mm512_add_ps(_mm512_loadu_ps(d), v[h][e]));
      }
  } else {
    static_assert(NH == 1, "vectors narrower than 16 have one half");
#pragma GCC unroll 4
    for (int f = 0; f < (NE + P - 1) / P; ++f) {
      __m512 w[P];
#pragma GCC unroll 4
      for (int i = 0; i < P; ++i) w[i] = f * P + i < NE ? v[0][f * P + i] : _mm512_setzero_ps();
      if constexpr (P == 2) {
        const __m512i ev = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
        const __m512i od = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
        const __m512 r = _mm512_add_ps(_mm512_permutex2var_ps(w[0], ev, w[1]), _mm512_permutex2var_ps(w[0], od, w[1]));
        float* d0 = o[f * 2];
        _mm256_storeu_ps(d0, _mm256_add_ps(_mm256_loadu_ps(d0), _mm512_castps512_ps256(r)));
        if (f * 2 + 1 < NE) {
          float* d1 = o[f * 2 + 1];
          _mm256_storeu_ps(d1, _mm256_add_ps(_mm256_loadu_ps(d1), _mm512_extractf32x8_ps(r, 1)));
        }
      } else {
        // within each 128-bit lane k: [sum w0, sum w1, sum w2, sum w3], then entry-major
        const __m512 s0 = _mm512_add_ps(_mm512_unpacklo_ps(w[0], w[1]), _mm512_unpackhi_ps(w[0], w[1]));
        const __m512 s1 = _mm512_add_ps(_mm512_unpacklo_ps(w[2], w[3]), _mm512_unpackhi_ps(w[2], w[3]));
        const __m512 q = _mm512_add_ps(_mm512_shuffle_ps(s0, s1, 0x44), _mm512_shuffle_ps(s0, s1, 0xEE));
        const __m512 r =
            _mm512_permutexvar_ps(_mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0), q);
        float* d0 = o[f * 4];
        _mm_storeu_ps(d0, _mm_add_ps(_mm_loadu_ps(d0), _mm512_castps512_ps128(r)));
        if (f * 4 + 1 < NE)
          _mm_storeu_ps(o[f * 4 + 1], _mm_add_ps(_mm_loadu_ps(o[f * 4 + 1]), _mm512_extractf32x4_ps(r, 1)));
        if (f * 4 + 2 < NE)
          _mm_storeu_ps(o[f * 4 + 2], _mm_add_ps(_mm_loadu_ps(o[f * 4 + 2]), _mm512_extractf32x4_ps(r, 2)));
        if (f * 4 + 3 < NE)
          _mm_storeu_ps(o[f * 4 + 3], _mm_add_ps(_mm_loadu_ps(o[f * 4 + 3]), _mm512_extractf32x4_ps(r, 3)));
      }
    }
  }
}

// v[h][e] = sum over the steps s < S of a[h * ah + s * 16 ...] * (the P floats at b[e] + s * P, broadcast), K
// partial sums per entry (steps s = k mod K), added in a fixed order.
template <int NE, int NH, int K, int P>
__attribute__((always_inline)) inline void dots(const float* a, int64_t ah, const float* const (&b)[NE], int64_t S,
                                                __m512 (&v)[NH][NE]) {
  __m512 acc[K][NH][NE];
#pragma GCC unroll 4
  for (int k = 0; k < K; ++k)
#pragma GCC unroll 2
    for (int h = 0; h < NH; ++h)
#pragma GCC unroll 8
      for (int e = 0; e < NE; ++e) acc[k][h][e] = _mm512_setzero_ps();
  for (int64_t s = 0; s < S; s += K) {
#pragma GCC unroll 4
    for (int k = 0; k < K; ++k) {
      __m512 av[NH];
#pragma GCC unroll 2
      for (int h = 0; h < NH; ++h) {
        __m512 t = _mm512_loadu_ps(a + h * ah + (s + k) * L);
        __asm__("" : "+v"(t));  // in a register: GCC would otherwise reload it as an operand of each FMA
        av[h] = t;
      }
#pragma GCC unroll 8
      for (int e = 0; e < NE; ++e) {
        const __m512 bv = load_bc<P>(b[e] + (s + k) * P);
#pragma GCC unroll 2
        for (int h = 0; h < NH; ++h) acc[k][h][e] = _mm512_fmadd_ps(av[h], bv, acc[k][h][e]);
      }
    }
  }
#pragma GCC unroll 2
  for (int h = 0; h < NH; ++h)
#pragma GCC unroll 8
    for (int e = 0; e < NE; ++e) {
      v[h][e] = acc[0][h][e];
#pragma GCC unroll 4
      for (int k = 1; k < K; ++k) v[h][e] = _mm512_add_ps(v[h][e], acc[k][h][e]);
    }
}

// Partial sums per entry: KF if nonzero (row vectors: the same for every block, whose entries depend on the work
// split), else enough for 8 FMA chains in the block (column vectors: a block row's blocks are the same whatever
// the split).
template <int NE, int NH, int KF>
constexpr int sd_chains() {
  return KF ? KF : NE * NH >= 8 ? 1 : NE * NH >= 4 ? 2 : 4;  // S is a multiple of 4
}

// The entries [q0, q1) of one line (a block row of column vectors, a block column of row vectors) against its
// shared operand a (NH halves ah floats apart): out(q) (V floats) += their dot products with own(q).
template <int NH, int P, int KF, typename B, typename O>
void line_entries(const float* a, int64_t ah, int64_t S, int64_t q0, int64_t q1, const B& own, const O& out) {
  auto block = [&](int64_t q, auto ne) {
    constexpr int NE = decltype(ne)::value;
    const float* b[NE];
    float* o[NE];
#pragma GCC unroll 8
    for (int e = 0; e < NE; ++e) b[e] = own(q + e), o[e] = out(q + e);
    __m512 v[NH][NE];
    dots<NE, NH, sd_chains<NE, NH, KF>(), P>(a, ah, b, S, v);
    fold_add<NE, NH, P>(v, o);
  };
  int64_t q = q0;
  for (; q + kSdEntries <= q1; q += kSdEntries) block(q, Int<kSdEntries>{});
  switch (q1 - q) {
    case 1: return block(q, Int<1>{});
    case 2: return block(q, Int<2>{});
    case 3: return block(q, Int<3>{});
    case 4: return block(q, Int<4>{});
    case 5: return block(q, Int<5>{});
    case 6: return block(q, Int<6>{});
    case 7: return block(q, Int<7>{});
    default: return;
  }
}
static_assert(kSdEntries == 8, "line_entries' switch covers the tails 1..kSdEntries-1");

// dw for the block rows [r0, r1) of (V, 1) blocks (Col) or the rows [r0, r1) of (1, V) blocks.
template <bool Col, int V, typename E>
bool sddmm(const BsrSddmmArgs& a, int64_t r0, int64_t r1) {
  constexpr int VS = V < L ? V : L, P = L / VS, NH = V / VS;
  constexpr int KF = Col ? 0 : NH == 1 ? 2 : 1;               // row vectors: fixed partial sums (16 accumulators)
  constexpr int64_t G = Col ? kSdColChunk / V : kSdRowChunk;  // block rows whose dY is packed together
  constexpr int64_t TM = Col ? kSdColTile : kSdRowTile;       // tokens per tile
  if (r1 <= r0) return true;
  const int32_t* ro = a.row_offsets;
  const int32_t* ci = a.col_indices;
  const int64_t j0 = ro[r0], j1 = ro[r1];
  // fp32 sums in storage order (float32: dw itself), or for row vectors in walk order (by column), so that their
  // updates run front to back, scattered into dw at the end: when there is more than one tile, or when a vector's
  // outputs are less than a cache line (each scattered update would move a whole line)
  const bool walk = !Col && (a.T > TM || V * 4 < 64);
  float* acc = sizeof(E) == 4 && !walk ? static_cast<float*>(a.dw) + j0 * V : thread_buf(2, (j1 - j0) * V + 1);
  if (!acc) return false;
  std::memset(acc, 0, size_t(j1 - j0) * V * sizeof(float));
  const E* dy = static_cast<const E*>(a.dy);
  const E* x = static_cast<const E*>(a.x);
  const int64_t nbc = (a.in + a.bi - 1) / a.bi;  // block columns
  const int64_t nch = (r1 - r0 + G - 1) / G;     // chunks of rows
  // Row vectors: per chunk of rows, its entries by block column (rows ascending): coff[ch * (nbc + 1) + c] ..
  // [.. + 1] index cq, whose pairs are (row - chunk start, entry - j0).
  int32_t* coff = nullptr;
  int32_t* cq = nullptr;
  if constexpr (!Col) {
    coff = reinterpret_cast<int32_t*>(thread_buf(3, nch * (nbc + 1) + 1));
    cq = reinterpret_cast<int32_t*>(thread_buf(4, 2 * (j1 - j0) + 1));
    if (!coff || !cq) return false;
    for (int64_t ch = 0; ch < nch; ++ch) {
      const int64_t c0 = r0 + ch * G, c1 = c0 + G < r1 ? c0 + G : r1;
      int32_t* off = coff + ch * (nbc + 1);
      std::memset(off, 0, size_t(nbc + 1) * sizeof(int32_t));
      for (int64_t p = ro[c0]; p < ro[c1]; ++p) ++off[ci[p] + 1];
      off[0] = int32_t(ro[c0] - j0);
      for (int64_t c = 0; c < nbc; ++c) off[c + 1] += off[c];
      for (int64_t r = c0; r < c1; ++r)
        for (int64_t p = ro[r]; p < ro[r + 1]; ++p) {
          const int32_t k = off[ci[p]]++;
          cq[2 * k] = int32_t(r - c0), cq[2 * k + 1] = int32_t(p - j0);
        }
      for (int64_t c = nbc; c > 0; --c) off[c] = off[c - 1];  // back to the starts
      off[0] = int32_t(ro[c0] - j0);
    }
  }
  if (a.T > 0 && j1 > j0) {
    const int64_t nx = Col ? a.in : nbc * NH * VS;  // X^T columns, or X columns in whole groups
    float* xp = thread_buf(0, nx * TM);
    float* dyp = thread_buf(1, G * V * TM);
    if (!xp || !dyp) return false;
    for (int64_t t0 = 0; t0 < a.T; t0 += TM) {
      const int64_t tb = a.T - t0 < TM ? a.T - t0 : TM;
      const int64_t TT = (tb + L - 1) / L * L, S = TT / P;  // tokens of the tile (padded), steps of P tokens
      auto pack_t = [&](const E* src, int64_t ld, int64_t nc, float* dst) {
        with_vecs<TM / L>(tb, [&](auto nv) { pack_transposed<decltype(nv)::value>(src, ld, tb, nc, dst); });
      };
      if constexpr (Col) {
        pack_t(x + t0 * a.ldx, a.ldx, a.in, xp);
      } else {
        pack_interleaved<P>(x + t0 * a.ldx, a.ldx, tb, a.in, nbc * NH, S, xp);
      }
      for (int64_t ch = 0; ch < nch; ++ch) {
        const int64_t g0 = r0 + ch * G, g1 = g0 + G < r1 ? g0 + G : r1;
        if (ro[g0] == ro[g1]) continue;
        if constexpr (Col) {
          pack_interleaved<P>(dy + t0 * a.lddy + g0 * V, a.lddy, tb, a.out - g0 * V, (g1 - g0) * NH, S, dyp);
          auto own = [&](int64_t p) { return xp + int64_t(ci[p]) * TT; };
          auto out = [&](int64_t p) { return acc + (p - j0) * V; };
          for (int64_t b = g0; b < g1; ++b)
            line_entries<NH, P, KF>(dyp + (b - g0) * NH * S * L, S * L, S, ro[b], ro[b + 1], own, out);
        } else {
          pack_t(dy + t0 * a.lddy + g0, a.lddy, g1 - g0, dyp);
          const int32_t* off = coff + ch * (nbc + 1);
          auto own = [&](int64_t q) { return dyp + int64_t(cq[2 * q]) * TT; };
          auto out = [&](int64_t q) { return acc + (walk ? q : int64_t(cq[2 * q + 1])) * V; };
          for (int64_t c = 0; c < nbc; ++c)
            if (off[c] < off[c + 1])
              line_entries<NH, P, KF>(xp + c * NH * S * L, S * L, S, off[c], off[c + 1], own, out);
        }
      }
    }
  }
  E* dw = static_cast<E*>(a.dw) + j0 * V;
  if (walk) {
    for (int64_t q = 0; q < j1 - j0; ++q) {
      E* d = dw + int64_t(cq[2 * q + 1]) * V;
#pragma GCC unroll 2
      for (int k = 0; k < V; k += L) store_n(d + k, load_n(acc + q * V + k, V - k), V - k);
    }
  } else if constexpr (sizeof(E) != 4) {
    const int64_t n = (j1 - j0) * V;
    for (int64_t k = 0; k < n; k += L) store_n(dw + k, load_n(acc + k, n - k), n - k);
  }
  // Outputs of a ragged edge vector outside the matrix: exact zeros.
  if constexpr (Col) {
    const int64_t last = (a.out - 1) / V, rem = a.out - last * V;
    if (rem < V && last >= r0 && last < r1) {
      for (int64_t p = ro[last]; p < ro[last + 1]; ++p)
        std::memset(dw + (p - j0) * V + rem, 0, size_t(V - rem) * sizeof(E));
    }
  } else {
    const int64_t last = (a.in - 1) / V, rem = a.in - last * V;
    if (rem < V) {
      for (int64_t p = j0; p < j1; ++p)
        if (ci[p] == last) std::memset(dw + (p - j0) * V + rem, 0, size_t(V - rem) * sizeof(E));
    }
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

template <typename E>
bool sddmm_entry(const BsrSddmmArgs& a, int64_t r0, int64_t r1) {
  if (a.bi == 1) {
    switch (a.bo) {
      case 4: return sddmm<true, 4, E>(a, r0, r1);
      case 8: return sddmm<true, 8, E>(a, r0, r1);
      case 16: return sddmm<true, 16, E>(a, r0, r1);
      default: return sddmm<true, 32, E>(a, r0, r1);
    }
  }
  switch (a.bi) {
    case 4: return sddmm<false, 4, E>(a, r0, r1);
    case 8: return sddmm<false, 8, E>(a, r0, r1);
    case 16: return sddmm<false, 16, E>(a, r0, r1);
    default: return sddmm<false, 32, E>(a, r0, r1);
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
bool vec_sddmm_f32_avx512(const BsrSddmmArgs& a, int64_t r0, int64_t r1) {
  return sddmm_entry<float>(a, r0, r1);
}
bool vec_sddmm_bf16_avx512(const BsrSddmmArgs& a, int64_t r0, int64_t r1) {
  return sddmm_entry<uint16_t>(a, r0, r1);
}

}  // namespace sparsekern::cpu

#endif  // __x86_64__
