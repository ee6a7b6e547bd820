// AVX-512 kernels for unstructured sparsity: the block-sparse ops with 1x1 blocks, which is CSR (bsr.cpp calls
// these for bo = bi = 1 on AVX-512 CPUs; csr_avx2.cpp has the AVX2 ones). float32 and bfloat16 (widened to
// float32, float32 accumulation). Compiled with a target pragma inside a baseline x86-64 build: no torch or STL
// headers, helpers have internal linkage, and only the entry points (whose names carry the ISA) are external.
//
// Plan (forward; grad_input is the forward of W^T, its values read through block_perm):
//  - Tokens are vectorised: a tile of up to 64 tokens (4 zmm), whose X^T ([column][tile], fp32) is packed once.
//    Each row then runs its entries: one broadcast of w and, per token vector, one load of X^T and one FMA, with
//    the row's accumulators in registers. An entry shares nothing with its neighbours, so the loop is bound by
//    loads: per entry its index, its value and 4 X^T vectors for 4 FMAs.
//  - X^T is read from L2 (64 tokens x 768 features: 192 KiB). Panels of columns small enough for L1 split every
//    row into short runs (about 13 entries per 128 columns at 10% density), each ending in a mispredicted loop
//    exit and a reload of the row's partial sums; that cost more than the L2 reads save (numbers:
//    docs/measurements.md, "Unstructured (CSR) kernels"). Columns are walked in panels of 256 KiB of X^T only so
//    that wide inputs stay within L2; columns are sorted within a row (bsr.cpp checks it), so a cursor per row
//    resumes where the previous panel stopped.
//  - Rows go 64 at a time: their partial sums ([rows][tile]) stay in L1 between panels and are then transposed
//    into Y with the bias and the activation, 16 rows (one cache line of Y) per token. With fewer than 4 vectors
//    of tokens, U accumulator sets take turns over the entries, so that at least 8 independent FMA chains run.
//  - T <= kGatherMaxTokens (decode): no packing; per row, 16 entries at a time gather x[t, column].
#if defined(__x86_64__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")

#include <immintrin.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "act_avx512.h"
#include "bsr_kernels.h"
#include "epilogue.h"
#include "thread_buf.h"
#include "tile_avx512.h"

namespace sparsekern::cpu {
namespace {

constexpr int64_t kMaxTileVecs = 4;             // token vectors per tile: 64 tokens
constexpr int64_t kMaxTile = kMaxTileVecs * L;  // tokens per tile
constexpr int64_t kPanelFloats = 65536;         // columns per panel x tile tokens: 256 KiB of X^T (in L2)
constexpr int64_t kRowGroup = 64;               // rows whose partial sums are kept between panels
constexpr int64_t kGatherMaxTokens = 4;

// The values of a CSR matrix as float, entry j read directly or, for the transposed walk, as w[perm[j]].
template <typename E, bool kPerm>
struct Values {
  const E* w;
  const int32_t* perm;
  float operator()(int64_t j) const { return to_f32(w[kPerm ? perm[j] : j]); }
  // Entries j..j+15.
  __m512 load16(int64_t j) const {
    if constexpr (!kPerm) {
      return load_n(w + j, L);
    } else if constexpr (sizeof(E) == 4) {
      return _mm512_i32gather_ps(_mm512_loadu_si512(perm + j), reinterpret_cast<const float*>(w), 4);
    } else {
      alignas(64) float t[L];
      for (int i = 0; i < L; ++i) t[i] = to_f32(w[perm[j + i]]);
      return _mm512_load_ps(t);
    }
  }
};

// acc += the entries [j, stop) of one row: w * X^T[column] over NV token vectors, U entries per step (U sets of
// accumulators, summed into acc[0] at the end). kAll: every remaining entry of the row lies in this panel (the
// last one), so the loop needs no column test. Returns where it stopped.
template <int NV, int U, bool kAll, typename V>
inline int64_t row_entries(const int32_t* ci, const V& wv, int64_t j, int64_t end, int64_t c1, const float* base,
                           __m512 acc0[NV]) {
  constexpr int64_t TT = NV * L;
  __m512 acc[U][NV];
  for (int v = 0; v < NV; ++v) {
    acc[0][v] = acc0[v];
    for (int u = 1; u < U; ++u) acc[u][v] = _mm512_setzero_ps();
  }
  for (; j + U <= end && (kAll || ci[j + U - 1] < c1); j += U) {
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) {
      const __m512 w = _mm512_set1_ps(wv(j + u));
      const float* xr = base + int64_t(ci[j + u]) * TT;
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[u][v] = _mm512_fmadd_ps(w, _mm512_load_ps(xr + v * L), acc[u][v]);
    }
  }
  for (; j < end && (kAll || ci[j] < c1); ++j) {
    const __m512 w = _mm512_set1_ps(wv(j));
    const float* xr = base + int64_t(ci[j]) * TT;
    for (int v = 0; v < NV; ++v) acc[0][v] = _mm512_fmadd_ps(w, _mm512_load_ps(xr + v * L), acc[0][v]);
  }
  for (int v = 0; v < NV; ++v) {
    for (int u = 1; u < U; ++u) acc[0][v] = _mm512_add_ps(acc[0][v], acc[u][v]);
    acc0[v] = acc[0][v];
  }
  return j;
}

// Partial sums part[(r - r0) * TT + t] = sum over the entries of rows [r0, r1) (offsets ro, columns ci, values
// wv) of w * X^T[column][t], X^T the packed tile (xt, ncols columns of TT tokens). The columns are walked in panels
// of P; cur: r1 - r0 ints.
template <int NV, typename V>
void csr_rows(const int32_t* ro, const int32_t* ci, const V& wv_in, int64_t r0, int64_t r1, int64_t ncols,
              const float* xt, float* part, int32_t* cur) {
  constexpr int64_t TT = NV * L;
  constexpr int U = NV >= 4 ? 2 : NV >= 2 ? 4 : 8;  // accumulator sets: U * NV >= 8 chains
  const int64_t P = kPanelFloats / TT;              // columns per panel
  const V wv = wv_in;
  const int64_t rows = r1 - r0;
  for (int64_t i = 0; i < rows; ++i) cur[i] = ro[r0 + i];
  for (int64_t c0 = 0; c0 < ncols; c0 += P) {
    const int64_t c1 = c0 + P < ncols ? c0 + P : ncols;
    const bool first = c0 == 0, last = c1 == ncols;
    for (int64_t i = 0; i < rows; ++i) {
      int64_t j = cur[i];
      const int64_t end = ro[r0 + i + 1];
      float* pr = part + i * TT;
      __m512 acc[NV];
      for (int v = 0; v < NV; ++v) acc[v] = first ? _mm512_setzero_ps() : _mm512_load_ps(pr + v * L);
      if (last) {
        row_entries<NV, U, true>(ci, wv, j, end, c1, xt, acc);
      } else if (j < end && ci[j] < c1) {
        cur[i] = static_cast<int32_t>(row_entries<NV, U, false>(ci, wv, j, end, c1, xt, acc));
      } else if (!first) {
        continue;
      }
      for (int v = 0; v < NV; ++v) _mm512_store_ps(pr + v * L, acc[v]);
    }
  }
}

template <int N>
struct Vecs {
  static constexpr int value = N;
};

// Calls f(Vecs<NV>{}) for NV = ceil(tb / 16) in [1, 4].
template <typename F>
void with_vecs(int64_t tb, const F& f) {
  switch ((tb + L - 1) / L) {
    case 1: return f(Vecs<1>{});
    case 2: return f(Vecs<2>{});
    case 3: return f(Vecs<3>{});
    default: return f(Vecs<4>{});
  }
}

// y[t, r] = act(bias[r] + sum_j w_j x[t, ci_j]) for rows [r0, r1) and T tokens, tiles of up to 64 tokens.
template <typename E, typename V>
bool rows_forward(const int32_t* ro, const int32_t* ci, const V& wv, int64_t r0, int64_t r1, const E* x, int64_t ldx,
                  int64_t ncols, int64_t T, const E* bias, Act act, E* y, int64_t ldy) {
  float* xt = thread_buf(0, ncols * kMaxTile);
  float* part = thread_buf(1, kRowGroup * kMaxTile);
  int32_t* cur = reinterpret_cast<int32_t*>(thread_buf(2, kRowGroup));
  if (!xt || !part || !cur) return false;
  for (int64_t t0 = 0; t0 < T; t0 += kMaxTile) {
    const int64_t tb = T - t0 < kMaxTile ? T - t0 : kMaxTile;
    with_vecs(tb, [&](auto nv) {
      constexpr int NV = decltype(nv)::value;
      pack_transposed<NV>(x + t0 * ldx, ldx, tb, ncols, xt);
      for (int64_t g0 = r0; g0 < r1; g0 += kRowGroup) {
        const int64_t g1 = g0 + kRowGroup < r1 ? g0 + kRowGroup : r1;
        csr_rows<NV>(ro, ci, wv, g0, g1, ncols, xt, part, cur);
        store_transposed<NV>(part, g1 - g0, tb, y + t0 * ldy + g0, ldy, bias ? bias + g0 : nullptr, act);
      }
    });
  }
  return true;
}

// x[t, idx[0..15]] as fp32 (bfloat16 x: there is no 16-bit gather; the lanes are read one by one).
inline __m512 gather(const float* x, __m512i idx, const int32_t*) {
  return _mm512_i32gather_ps(idx, x, 4);
}
inline __m512 gather(const uint16_t* x, __m512i, const int32_t* ci) {
  alignas(64) float t[L];
  for (int i = 0; i < L; ++i) t[i] = bf16_to_float(x[ci[i]]);
  return _mm512_load_ps(t);
}

// The same for T <= kGatherMaxTokens, without packing: per row, 16 entries at a time gather x[t, ci_j].
template <int NT, typename E, typename V>
void rows_gather(const int32_t* ro, const int32_t* ci, const V& wv, int64_t r0, int64_t r1, const E* x, int64_t ldx,
                 const E* bias, Act act, E* y, int64_t ldy) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t end = ro[r + 1];
    int64_t j = ro[r];
    __m512 acc[NT][2];
    for (int t = 0; t < NT; ++t) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
    for (; j + 2 * L <= end; j += 2 * L) {
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        const __m512 w = wv.load16(j + h * L);
        const __m512i idx = _mm512_loadu_si512(ci + j + h * L);
        for (int t = 0; t < NT; ++t)
          acc[t][h] = _mm512_fmadd_ps(w, gather(x + t * ldx, idx, ci + j + h * L), acc[t][h]);
      }
    }
    if (j + L <= end) {
      const __m512 w = wv.load16(j);
      const __m512i idx = _mm512_loadu_si512(ci + j);
      for (int t = 0; t < NT; ++t) acc[t][0] = _mm512_fmadd_ps(w, gather(x + t * ldx, idx, ci + j), acc[t][0]);
      j += L;
    }
    float s[NT];
    for (int t = 0; t < NT; ++t) s[t] = _mm512_reduce_add_ps(_mm512_add_ps(acc[t][0], acc[t][1]));
    for (; j < end; ++j) {
      const float w = wv(j);
      for (int t = 0; t < NT; ++t) s[t] += w * to_f32(x[t * ldx + ci[j]]);
    }
    const float b = bias ? to_f32(bias[r]) : 0.0f;
    for (int t = 0; t < NT; ++t) {
      const float z = apply_act(s[t] + b, act);
      if constexpr (sizeof(E) == 4) {
        y[t * ldy + r] = z;
      } else {
        y[t * ldy + r] = float_to_bf16(z);
      }
    }
  }
}

template <typename E, typename V>
bool csr_forward(const int32_t* ro, const int32_t* ci, const V& wv, int64_t r0, int64_t r1, const E* x, int64_t ldx,
                 int64_t ncols, int64_t T, const E* bias, Act act, E* y, int64_t ldy) {
  if (r1 <= r0 || T <= 0) return true;
  switch (T) {
    case 1: return rows_gather<1>(ro, ci, wv, r0, r1, x, ldx, bias, act, y, ldy), true;
    case 2: return rows_gather<2>(ro, ci, wv, r0, r1, x, ldx, bias, act, y, ldy), true;
    case 3: return rows_gather<3>(ro, ci, wv, r0, r1, x, ldx, bias, act, y, ldy), true;
    case 4: return rows_gather<4>(ro, ci, wv, r0, r1, x, ldx, bias, act, y, ldy), true;
    default: return rows_forward(ro, ci, wv, r0, r1, x, ldx, ncols, T, bias, act, y, ldy);
  }
}
static_assert(kGatherMaxTokens == 4, "csr_forward's switch covers T = 1..kGatherMaxTokens");

// dw[j] = sum_t dy[t, r] x[t, ci_j] for the entries of rows [r0, r1): dy^T of the rows packed once per token
// tile, X^T in panels as in the forward; 16 entries' dot products are reduced into one vector at a time.
template <typename E>
bool csr_sddmm(const BsrSddmmArgs& a, int64_t r0, int64_t r1) {
  const int32_t* ro = a.row_offsets;
  const int32_t* ci = a.col_indices;
  const int64_t rows = r1 - r0;
  if (rows <= 0) return true;
  const int64_t j0 = ro[r0], n = ro[r1] - j0;
  E* dw = static_cast<E*>(a.dw) + j0;
  float* acc = sizeof(E) == 4 ? reinterpret_cast<float*>(dw) : thread_buf(3, n);
  float* xt = thread_buf(0, kPanelFloats + 64);
  float* dyt = thread_buf(1, rows * kMaxTile);
  int32_t* cur = reinterpret_cast<int32_t*>(thread_buf(2, rows));
  if (!acc || !xt || !dyt || !cur) return false;
  std::memset(acc, 0, size_t(n) * sizeof(float));
  const E* dy = static_cast<const E*>(a.dy);
  const E* x = static_cast<const E*>(a.x);
  for (int64_t t0 = 0; t0 < a.T; t0 += kMaxTile) {
    const int64_t tb = a.T - t0 < kMaxTile ? a.T - t0 : kMaxTile;
    with_vecs(tb, [&](auto nv) {
      constexpr int NV = decltype(nv)::value;
      constexpr int64_t TT = NV * L;
      const int64_t P = kPanelFloats / TT;
      pack_transposed<NV>(dy + t0 * a.lddy + r0, a.lddy, tb, rows, dyt);
      for (int64_t i = 0; i < rows; ++i) cur[i] = ro[r0 + i];
      for (int64_t c0 = 0; c0 < a.in; c0 += P) {
        const int64_t c1 = c0 + P < a.in ? c0 + P : a.in;
        pack_transposed<NV>(x + t0 * a.ldx + c0, a.ldx, tb, c1 - c0, xt);
        const float* base = xt - c0 * TT;
        for (int64_t i = 0; i < rows; ++i) {
          int64_t j = cur[i];
          const int64_t end = ro[r0 + i + 1];
          if (j >= end || ci[j] >= c1) continue;
          __m512 g[NV];
          for (int v = 0; v < NV; ++v) g[v] = _mm512_load_ps(dyt + i * TT + v * L);
          for (; j + L <= end && ci[j + L - 1] < c1; j += L) {
            __m512 d[L];
#pragma GCC unroll 16
            for (int e = 0; e < L; ++e) {
              const float* xr = base + int64_t(ci[j + e]) * TT;
              __m512 s = _mm512_mul_ps(g[0], _mm512_load_ps(xr));
              for (int v = 1; v < NV; ++v) s = _mm512_fmadd_ps(g[v], _mm512_load_ps(xr + v * L), s);
              d[e] = s;
            }
            float* o = acc + (j - j0);
            _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), reduce(d)));
          }
          for (; j < end && ci[j] < c1; ++j) {
            const float* xr = base + int64_t(ci[j]) * TT;
            __m512 s = _mm512_mul_ps(g[0], _mm512_load_ps(xr));
            for (int v = 1; v < NV; ++v) s = _mm512_fmadd_ps(g[v], _mm512_load_ps(xr + v * L), s);
            acc[j - j0] += _mm512_reduce_add_ps(s);
          }
          cur[i] = static_cast<int32_t>(j);
        }
      }
    });
  }
  if constexpr (sizeof(E) != 4) {
    for (int64_t k = 0; k < n; k += L) store_n(dw + k, _mm512_loadu_ps(acc + k), n - k);
  }
  return true;
}

template <typename E>
bool fwd(const BsrFwdArgs& a, int64_t r0, int64_t r1) {
  const Values<E, false> wv{static_cast<const E*>(a.w), nullptr};
  return csr_forward(a.row_offsets, a.col_indices, wv, r0, r1, static_cast<const E*>(a.x), a.ldx, a.in, a.T,
                     static_cast<const E*>(a.bias), static_cast<Act>(a.act), static_cast<E*>(a.y), a.out);
}

// dx = dy W: the forward of W^T (rows = input features, walked by block_perm), without bias or activation.
template <typename E>
bool grad_input(const BsrGradInputArgs& a, int64_t c0, int64_t c1) {
  const Values<E, true> wv{static_cast<const E*>(a.w), a.block_perm};
  return csr_forward(a.col_offsets, a.row_indices, wv, c0, c1, static_cast<const E*>(a.dy), a.lddy, a.out, a.T,
                     static_cast<const E*>(nullptr), Act::None, static_cast<E*>(a.dx), a.in);
}

}  // namespace

bool csr_fwd_f32_avx512(const BsrFwdArgs& a, int64_t r0, int64_t r1) {
  return fwd<float>(a, r0, r1);
}
bool csr_fwd_bf16_avx512(const BsrFwdArgs& a, int64_t r0, int64_t r1) {
  return fwd<uint16_t>(a, r0, r1);
}
bool csr_grad_input_f32_avx512(const BsrGradInputArgs& a, int64_t c0, int64_t c1) {
  return grad_input<float>(a, c0, c1);
}
bool csr_grad_input_bf16_avx512(const BsrGradInputArgs& a, int64_t c0, int64_t c1) {
  return grad_input<uint16_t>(a, c0, c1);
}
bool csr_sddmm_f32_avx512(const BsrSddmmArgs& a, int64_t r0, int64_t r1) {
  return csr_sddmm<float>(a, r0, r1);
}
bool csr_sddmm_bf16_avx512(const BsrSddmmArgs& a, int64_t r0, int64_t r1) {
  return csr_sddmm<uint16_t>(a, r0, r1);
}

}  // namespace sparsekern::cpu

#endif  // __x86_64__
