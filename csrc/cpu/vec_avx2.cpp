// AVX2 + FMA kernels for vector blocks: column vectors (V, 1) and row vectors (1, V), V in {4, 8, 16, 32}, the
// plan of vec_avx512.cpp (whose comment says why) with 8-lane vectors and 16 registers. bsr.cpp calls these for
// those block shapes on AVX2 CPUs; float32 and bfloat16 (widened to float32, float32 accumulation). Compiled
// with a target pragma inside a baseline x86-64 build: no torch or STL headers, helpers have internal linkage,
// only the entry points are external.
//  - Column vectors: 4 rows of the block x 3 vectors of tokens (24 tokens, 12 accumulators) per pass over the
//    entries: 7 loads per 12 FMAs.
//  - Row vectors: X packed per group of 4 or 8 columns (a (1, 16) or (1, 32) block is 2 or 4 groups of 8); a
//    vector holds 2 tokens x 4 columns (12 accumulators, 24 tokens) or 1 token x 8 columns (8 accumulators).
//  - The weight gradient (SDDMM): the "sddmm" section below.
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
#include "thread_buf.h"
#include "tile_avx2.h"

namespace sparsekern::cpu {
namespace {

constexpr int64_t kRowGroup = 64;  // output rows whose partial sums are kept in the L1 buffer

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

// ---------------------------------------------------------------- sddmm
// The plan of vec_avx512.cpp's sddmm (whose comment says why) with 8-lane vectors: VS = min(V, 8) outputs x P =
// 8 / VS tokens per vector (a (4, 1) or (1, 4) vector: 4 outputs x 2 tokens, the entry's tokens one vbroadcastsd;
// wider vectors are NH = 1, 2 or 4 parts of 8 outputs x 1 token sharing the entry's broadcast), 8 / NH entries a
// register block (8 accumulators of the 16 registers). Row vectors take one partial sum per entry (their blocks
// depend on the work split, so the summation must not).
constexpr int64_t kSdColTile = 64, kSdColChunk = 64, kSdRowTile = 256, kSdRowChunk = 512;

// W consecutive floats at p repeated over the vector (W = 8: a plain load).
template <int W>
__attribute__((always_inline)) inline __m256 load_bc(const float* p) {
  if constexpr (W == L) {
    return _mm256_loadu_ps(p);
  } else if constexpr (W == 2) {
    double d;
    std::memcpy(&d, p, sizeof(d));
    return _mm256_castpd_ps(_mm256_set1_pd(d));
  } else {
    return _mm256_broadcast_ss(p);
  }
}

// First n (<= 4) elements of a row as fp32, zeros after.
inline __m128 load4(const float* p, int64_t n) {
  if (n >= 4) return _mm_loadu_ps(p);
  alignas(16) float t[4] = {};
  for (int64_t i = 0; i < n; ++i) t[i] = p[i];
  return _mm_load_ps(t);
}
inline __m128 load4(const uint16_t* p, int64_t n) {
  alignas(16) uint16_t t[8] = {};
  if (n < 4) {
    for (int64_t i = 0; i < n; ++i) t[i] = p[i];
    p = t;
  }
  const __m128i h = _mm_cvtepu16_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  return _mm_castsi128_ps(_mm_slli_epi32(h, 16));
}

// dst[(g * S + s) * 8 + o * P + j] = src[(s * P + j) * ld + g * VS + o] (VS = 8 / P) for the groups g < ng of
// VS columns and the steps s < S; zero where s * P + j >= tb or g * VS + o >= nc. Steps outer: the P rows of a step
// are read front to back.
template <int P, typename E>
void pack_interleaved(const E* src, int64_t ld, int64_t tb, int64_t nc, int64_t ng, int64_t S, float* dst) {
  constexpr int VS = L / P;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t t = s * P;
    float* d = dst + s * L;
    for (int64_t g = 0; g < ng; ++g) {
      const int64_t c = g * VS, n = nc - c < VS ? nc - c : VS;
      if constexpr (P == 1) {
        _mm256_store_ps(d + g * S * L, t < tb && n > 0 ? load_n(src + t * ld + c, n) : _mm256_setzero_ps());
      } else {
        const __m128 r0 = t < tb && n > 0 ? load4(src + t * ld + c, n) : _mm_setzero_ps();
        const __m128 r1 = t + 1 < tb && n > 0 ? load4(src + (t + 1) * ld + c, n) : _mm_setzero_ps();
        _mm256_store_ps(d + g * S * L, _mm256_set_m128(_mm_unpackhi_ps(r0, r1), _mm_unpacklo_ps(r0, r1)));
      }
    }
  }
}

// o[e][h * VS + k] += the sum over the P token phases j of v[h][e] lane k * P + j (VS = 8 / P outputs per part).
template <int NE, int NH, int P>
__attribute__((always_inline)) inline void fold_add(const __m256 (&v)[NH][NE], float* const (&o)[NE]) {
  if constexpr (P == 1) {
#pragma GCC unroll 4
    for (int h = 0; h < NH; ++h)
#pragma GCC unroll 8
      for (int e = 0; e < NE; ++e) {
        float* d = o[e] + h * L;
        _mm256_storeu_ps(d, _mm256_add_ps(_mm256_loadu_ps(d), v[h][e]));
      }
  } else {
    static_assert(P == 2 && NH == 1, "P > 1 only for 4-wide vectors");
#pragma GCC unroll 4
    for (int f = 0; f < (NE + 1) / 2; ++f) {
      const __m256 w1 = 2 * f + 1 < NE ? v[0][2 * f + 1] : _mm256_setzero_ps();
      // hadd: [e0 k0 k1, e1 k0 k1, e0 k2 k3, e1 k2 k3] in 64-bit pairs; the permute puts entry e0 first
      const __m256 r = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_hadd_ps(v[0][2 * f], w1)), 0xD8));
      float* d0 = o[2 * f];
      _mm_storeu_ps(d0, _mm_add_ps(_mm_loadu_ps(d0), _mm256_castps256_ps128(r)));
      if (2 * f + 1 < NE) {
        float* d1 = o[2 * f + 1];
        _mm_storeu_ps(d1, _mm_add_ps(_mm_loadu_ps(d1), _mm256_extractf128_ps(r, 1)));
      }
    }
  }
}

// v[h][e] = sum over the steps s < S of a[h * ah + s * 8 ...] * (the P floats at b[e] + s * P, broadcast), K
// partial sums per entry (steps s = k mod K), added in a fixed order.
template <int NE, int NH, int K, int P>
__attribute__((always_inline)) inline void dots(const float* a, int64_t ah, const float* const (&b)[NE], int64_t S,
                                                __m256 (&v)[NH][NE]) {
  __m256 acc[K][NH][NE];
#pragma GCC unroll 4
  for (int k = 0; k < K; ++k)
#pragma GCC unroll 4
    for (int h = 0; h < NH; ++h)
#pragma GCC unroll 8
      for (int e = 0; e < NE; ++e) acc[k][h][e] = _mm256_setzero_ps();
  for (int64_t s = 0; s < S; s += K) {
#pragma GCC unroll 4
    for (int k = 0; k < K; ++k) {
      __m256 av[NH];
#pragma GCC unroll 4
      for (int h = 0; h < NH; ++h) {
        __m256 t = _mm256_loadu_ps(a + h * ah + (s + k) * L);
        __asm__("" : "+x"(t));  // in a register: GCC would otherwise reload it as an operand of each FMA
        av[h] = t;
      }
#pragma GCC unroll 8
      for (int e = 0; e < NE; ++e) {
        const __m256 bv = load_bc<P>(b[e] + (s + k) * P);
#pragma GCC unroll 4
        for (int h = 0; h < NH; ++h) acc[k][h][e] = _mm256_fmadd_ps(av[h], bv, acc[k][h][e]);
      }
    }
  }
#pragma GCC unroll 4
  for (int h = 0; h < NH; ++h)
#pragma GCC unroll 8
    for (int e = 0; e < NE; ++e) {
      v[h][e] = acc[0][h][e];
#pragma GCC unroll 4
      for (int k = 1; k < K; ++k) v[h][e] = _mm256_add_ps(v[h][e], acc[k][h][e]);
    }
}

// Partial sums per entry: KF if nonzero (row vectors), else enough for 8 FMA chains in the block (S is a multiple
// of 4).
template <int NE, int NH, int KF>
constexpr int sd_chains() {
  return KF ? KF : NE * NH >= 8 ? 1 : NE * NH >= 4 ? 2 : 4;
}

// Calls f(Int<n>{}) for n in [1, N) (n < N).
template <int N, typename F>
inline void with_tail(int64_t n, const F& f) {
  if constexpr (N > 1) {
    if (n == N - 1) return f(Int<N - 1>{});
    return with_tail<N - 1>(n, f);
  }
}

// The entries [q0, q1) of one line (a block row of column vectors, a block column of row vectors) against its
// shared operand a (NH parts ah floats apart): out(q) (V floats) += their dot products with own(q).
template <int NH, int P, int KF, typename B, typename O>
void line_entries(const float* a, int64_t ah, int64_t S, int64_t q0, int64_t q1, const B& own, const O& out) {
  constexpr int NB = 8 / NH;  // entries per block: 8 accumulators
  auto block = [&](int64_t q, auto ne) {
    constexpr int NE = decltype(ne)::value;
    const float* b[NE];
    float* o[NE];
#pragma GCC unroll 8
    for (int e = 0; e < NE; ++e) b[e] = own(q + e), o[e] = out(q + e);
    __m256 v[NH][NE];
    dots<NE, NH, sd_chains<NE, NH, KF>(), P>(a, ah, b, S, v);
    fold_add<NE, NH, P>(v, o);
  };
  int64_t q = q0;
  for (; q + NB <= q1; q += NB) block(q, Int<NB>{});
  with_tail<NB>(q1 - q, [&](auto ne) { block(q, ne); });
}

// dw for the block rows [r0, r1) of (V, 1) blocks (Col) or the rows [r0, r1) of (1, V) blocks.
template <bool Col, int V, typename E>
bool sddmm(const BsrSddmmArgs& a, int64_t r0, int64_t r1) {
  constexpr int VS = V < L ? V : L, P = L / VS, NH = V / VS;
  constexpr int KF = Col ? 0 : 1;                             // row vectors: one partial sum per entry
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
      const float* sq = acc + q * V;
      if constexpr (V == 4 && sizeof(E) == 4) {
        _mm_storeu_ps(reinterpret_cast<float*>(d), _mm_loadu_ps(sq));
      } else if constexpr (V == 4) {
        for (int k = 0; k < 4; ++k) d[k] = E(float_to_bf16(sq[k]));
      } else {
#pragma GCC unroll 4
        for (int k = 0; k < V; k += L) store_n(d + k, _mm256_loadu_ps(sq + k), L);
      }
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
bool vec_sddmm_f32_avx2(const BsrSddmmArgs& a, int64_t r0, int64_t r1) {
  return sddmm_entry<float>(a, r0, r1);
}
bool vec_sddmm_bf16_avx2(const BsrSddmmArgs& a, int64_t r0, int64_t r1) {
  return sddmm_entry<uint16_t>(a, r0, r1);
}

}  // namespace sparsekern::cpu

#endif  // __x86_64__
