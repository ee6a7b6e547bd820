// AVX2 + FMA balanced-sparse kernels: the plan and the code of balanced_avx512.cpp with 8-lane vectors (the
// algorithm part below mirrors that file; keep the two in step). Compiled with a target pragma inside a baseline
// x86-64 build: no torch or STL headers here, helpers have internal linkage, and only the entry points (whose
// names carry the ISA) are external.
#if defined(__x86_64__)
#pragma GCC target("avx2,fma")

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "act_avx2.h"
#include "balanced_kernels.h"
#include "epilogue.h"
#include "tile_avx2.h"

namespace sparsekern::cpu {
namespace {

// ---------------------------------------------------------------------------------------------------------------
// Forward, token tiles.

inline __m256 bcast(const float* p) {
  return _mm256_set1_ps(*p);
}
inline __m256 bcast(const uint16_t* p) {
  return _mm256_set1_ps(bf16_to_float(*p));
}

// Rows ahead whose weight slice for this chunk is prefetched: a chunk visits every row for a few banks only, a
// strided walk the hardware prefetchers miss (the weights stream from L3 when they exceed L2).
constexpr int64_t kPrefetchRows = 8;

inline void prefetch_range(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t i = 0; i < bytes; i += 64) _mm_prefetch(c + i, _MM_HINT_T1);
  _mm_prefetch(c + bytes - 1, _MM_HINT_T1);
}

// Byte offsets into the packed chunk of n kept entries of one row: (colpat[j] + idx[j]) * TT * 4, where colpat[j]
// is the first column of entry j's bank relative to the chunk. Computed 16 at a time before the FMA loop, so the
// loop does one 32-bit load per entry instead of a byte load, an add and a shift on its critical path.
inline __m256i load_idx8(const uint8_t* p) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}
inline __m256i load_idx8(const int16_t* p) {
  return _mm256_cvtepi16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

template <int TT, typename I>
inline void entry_offsets(const I* idx, const int32_t* colpat, int64_t n, int32_t* off) {
  for (int64_t j = 0; j < n; ++j) off[j] = (colpat[j] + static_cast<int32_t>(idx[j])) * int32_t(TT * 4);
}

// R output rows (row stride row_len in w/idx) over the n kept entries of the current chunk (starting at entry e0 of
// each row) against the packed chunk xt; partial sums in acc_buf[r * TT + t] (started from zero when first).
template <int R, int NV, typename W, typename I>
void fwd_rows(const W* w, const I* idx, int64_t row_len, int64_t e0, int64_t n, const int32_t* colpat, int32_t* off,
              const float* xt, float* acc_buf, bool first) {
  constexpr int64_t TT = NV * L;
  for (int r = 0; r < R; ++r) {  // past the last row this touches other memory or none: prefetches never fault
    prefetch_range(w + (r + kPrefetchRows) * row_len + e0, n * int64_t(sizeof(W)));
    prefetch_range(idx + (r + kPrefetchRows) * row_len + e0, n * int64_t(sizeof(I)));
  }
  for (int r = 0; r < R; ++r) entry_offsets<TT>(idx + r * row_len + e0, colpat, n, off + r * n);
  __m256 acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(acc_buf + r * TT + v * L);
  const char* xc0 = reinterpret_cast<const char*>(xt);
  const W* wr = w + e0;
  for (int64_t j = 0; j < n; ++j) {
    for (int r = 0; r < R; ++r) {
      const __m256 wv = bcast(wr + r * row_len + j);
      const float* xc = reinterpret_cast<const float*>(xc0 + off[r * n + j]);
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xc + v * L), acc[r][v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(acc_buf + r * TT + v * L, acc[r][v]);
}

template <int NV, typename W, typename I>
void fwd_tile(const BalShape& s, const W* x, int64_t ldx, int64_t tb, const W* w, const I* idx, const W* bias, Act act,
              W* y, int64_t o0, int64_t o1, float* xt, float* ybuf, int32_t* colpat, int32_t* off) {
  constexpr int64_t TT = NV * L;
  const int64_t row_len = s.n_banks * s.keep;
  const int64_t cb = bal_chunk_banks(s, TT);
  for (int64_t j = 0; j < cb * s.keep; ++j) colpat[j] = static_cast<int32_t>((j / s.keep) * s.bank);
  for (int64_t b0 = 0; b0 < s.n_banks; b0 += cb) {
    const int64_t b1 = b0 + cb < s.n_banks ? b0 + cb : s.n_banks;
    const int64_t c0 = b0 * s.bank;
    const int64_t c1 = b1 * s.bank < s.in ? b1 * s.bank : s.in;
    pack_transposed<NV>(x + c0, ldx, tb, c1 - c0, xt);
    const int64_t e0 = b0 * s.keep, n = (b1 - b0) * s.keep;
    // 8-12 accumulators hide the FMA latency and leave registers for the broadcasts (16 ymm registers).
    constexpr int R = NV > 6 ? 1 : NV > 3 ? 2 : NV > 1 ? 4 : 8;
    int64_t o = o0;
    for (; o + R <= o1; o += R)
      fwd_rows<R, NV>(w + o * row_len, idx + o * row_len, row_len, e0, n, colpat, off, xt, ybuf + (o - o0) * TT,
                      b0 == 0);
    for (; o < o1; ++o)
      fwd_rows<1, NV>(w + o * row_len, idx + o * row_len, row_len, e0, n, colpat, off, xt, ybuf + (o - o0) * TT,
                      b0 == 0);
  }
  store_transposed<NV>(ybuf, o1 - o0, tb, y + o0, s.out, bias ? bias + o0 : nullptr, act);
}

// ---------------------------------------------------------------------------------------------------------------
// Forward, few tokens (decode): per output row, a vector of kept weights at a time gathers its x values.

// T is a template parameter so that the accumulators stay in registers.
template <int T, typename W, typename I>
void fwd_gather(const BalShape& s, const W* x, int64_t ldx, const W* w, const I* idx, const W* bias, Act act, W* y,
                int64_t o0, int64_t o1, float* scratch) {
  const int64_t row_len = s.n_banks * s.keep;
  // colbase[j]: first column of the bank of kept entry j; xf: the T token rows as fp32.
  int32_t* colbase = reinterpret_cast<int32_t*>(scratch);
  float* xf = align64(scratch + row_len + 16);
  for (int64_t j = 0; j < row_len; ++j) colbase[j] = static_cast<int32_t>((j / s.keep) * s.bank);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t c = 0; c < s.in; c += L) {
      const int64_t n = s.in - c < L ? s.in - c : L;
      store_n(xf + t * s.in + c, load_n(x + t * ldx + c, n), n);
    }
  const int64_t full = row_len / L * L;
  for (int64_t o = o0; o < o1; ++o) {
    __m256 acc[T];
    for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_ps();
    const W* wr = w + o * row_len;
    const I* ir = idx + o * row_len;
    for (int64_t j = 0; j < full; j += L) {
      const __m256i col =
          _mm256_add_epi32(load_idx8(ir + j), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(colbase + j)));
      const __m256 wv = load_n(wr + j, L);
      for (int t = 0; t < T; ++t) acc[t] = _mm256_fmadd_ps(wv, _mm256_i32gather_ps(xf + t * s.in, col, 4), acc[t]);
    }
    const float bv = bias ? to_f32(bias[o]) : 0.0f;
    for (int t = 0; t < T; ++t) {
      float sum = hsum(acc[t]);
      for (int64_t j = full; j < row_len; ++j) sum += to_f32(wr[j]) * xf[t * s.in + colbase[j] + ir[j]];
      // The vector activation on a broadcast, not apply_act: the same numbers as the token-tile path.
      store_n(y + t * s.out + o, act_avx2(_mm256_set1_ps(sum + bv), act), 1);
    }
  }
}

template <typename W, typename I>
void fwd(const BalShape& s, const W* x, int64_t ldx, int64_t T, const W* w, const I* idx, const W* bias, Act act, W* y,
         int64_t o0, int64_t o1, float* scratch) {
  static_assert(kGatherMaxTokens == 4, "fwd_gather is instantiated for T = 1, 2, 3");
  if (T == 1) return fwd_gather<1>(s, x, ldx, w, idx, bias, act, y, o0, o1, scratch);
  if (T == 2) return fwd_gather<2>(s, x, ldx, w, idx, bias, act, y, o0, o1, scratch);
  if (T == 3) return fwd_gather<3>(s, x, ldx, w, idx, bias, act, y, o0, o1, scratch);
  float* xt = align64(scratch);
  float* ybuf = align64(xt + bal_chunk_floats(s));
  int32_t* colpat = reinterpret_cast<int32_t*>(align64(ybuf + (o1 - o0 + 16) * kMaxTokTile));
  int32_t* off = colpat + bal_chunk_entries(s) + 16;
  constexpr int64_t kTile = 8 * L;
  for (int64_t t0 = 0; t0 < T; t0 += kTile) {
    const int64_t tb = T - t0 < kTile ? T - t0 : kTile;
    const W* xp = x + t0 * ldx;
    W* yp = y + t0 * s.out;
    switch ((tb + L - 1) / L) {
      case 1: fwd_tile<1>(s, xp, ldx, tb, w, idx, bias, act, yp, o0, o1, xt, ybuf, colpat, off); break;
      case 2: fwd_tile<2>(s, xp, ldx, tb, w, idx, bias, act, yp, o0, o1, xt, ybuf, colpat, off); break;
      case 3: fwd_tile<3>(s, xp, ldx, tb, w, idx, bias, act, yp, o0, o1, xt, ybuf, colpat, off); break;
      case 4: fwd_tile<4>(s, xp, ldx, tb, w, idx, bias, act, yp, o0, o1, xt, ybuf, colpat, off); break;
      case 5: fwd_tile<5>(s, xp, ldx, tb, w, idx, bias, act, yp, o0, o1, xt, ybuf, colpat, off); break;
      case 6: fwd_tile<6>(s, xp, ldx, tb, w, idx, bias, act, yp, o0, o1, xt, ybuf, colpat, off); break;
      case 7: fwd_tile<7>(s, xp, ldx, tb, w, idx, bias, act, yp, o0, o1, xt, ybuf, colpat, off); break;
      default: fwd_tile<8>(s, xp, ldx, tb, w, idx, bias, act, yp, o0, o1, xt, ybuf, colpat, off); break;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Input gradient: per bank chunk, dX^T[col][t] accumulates dY^T[o][t] * w over every row o (read-modify-write in
// L1; the rows' dY^T vectors stay in registers across their kept entries).

template <int NV, typename W, typename I>
void grad_input_tile(const BalShape& s, const W* dy, int64_t lddy, int64_t tb, const W* w, const I* idx, W* dx,
                     int64_t bb0, int64_t bb1, float* dxt, float* dyt) {
  constexpr int64_t TT = NV * L;
  const int64_t row_len = s.n_banks * s.keep;
  const int64_t cb = bal_chunk_banks(s, TT);
  pack_transposed<NV>(dy, lddy, tb, s.out, dyt);
  for (int64_t b0 = bb0; b0 < bb1; b0 += cb) {
    const int64_t b1 = b0 + cb < bb1 ? b0 + cb : bb1;
    const int64_t c0 = b0 * s.bank;
    const int64_t nc = (b1 * s.bank < s.in ? b1 * s.bank : s.in) - c0;
    std::memset(dxt, 0, sizeof(float) * nc * TT);
    for (int64_t o = 0; o < s.out; ++o) {
      __m256 d[NV];
      for (int v = 0; v < NV; ++v) d[v] = _mm256_loadu_ps(dyt + o * TT + v * L);
      for (int64_t b = b0; b < b1; ++b) {
        const W* wb = w + o * row_len + b * s.keep;
        const I* ib = idx + o * row_len + b * s.keep;
        float* xb = dxt + (b - b0) * s.bank * TT;
        for (int64_t k = 0; k < s.keep; ++k) {
          const __m256 wv = bcast(wb + k);
          float* p = xb + static_cast<int64_t>(ib[k]) * TT;
          for (int v = 0; v < NV; ++v)
            _mm256_storeu_ps(p + v * L, _mm256_fmadd_ps(wv, d[v], _mm256_loadu_ps(p + v * L)));
        }
      }
    }
    store_transposed<NV>(dxt, nc, tb, dx + c0, s.in, static_cast<const W*>(nullptr), Act::None);
  }
}

template <typename W, typename I>
void grad_input(const BalShape& s, const W* dy, int64_t lddy, int64_t T, const W* w, const I* idx, W* dx, int64_t b0,
                int64_t b1, float* scratch) {
  constexpr int64_t kTile = 4 * L;
  float* dxt = align64(scratch);
  float* dyt = align64(dxt + bal_chunk_floats(s));
  for (int64_t t0 = 0; t0 < T; t0 += kTile) {
    const int64_t tb = T - t0 < kTile ? T - t0 : kTile;
    const W* dyp = dy + t0 * lddy;
    W* dxp = dx + t0 * s.in;
    switch ((tb + L - 1) / L) {
      case 1: grad_input_tile<1>(s, dyp, lddy, tb, w, idx, dxp, b0, b1, dxt, dyt); break;
      case 2: grad_input_tile<2>(s, dyp, lddy, tb, w, idx, dxp, b0, b1, dxt, dyt); break;
      case 3: grad_input_tile<3>(s, dyp, lddy, tb, w, idx, dxp, b0, b1, dxt, dyt); break;
      default: grad_input_tile<4>(s, dyp, lddy, tb, w, idx, dxp, b0, b1, dxt, dyt); break;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Weight gradient (SDDMM): per token tile and bank chunk, L kept entries of a row at a time form L token-vector
// products that one transpose-add tree reduces to L sums.

// acc[0, n) += the first n lanes of v.
inline void add_n(float* acc, __m256 v, int64_t n) {
  if (n >= L) return _mm256_storeu_ps(acc, _mm256_add_ps(_mm256_loadu_ps(acc), v));
  alignas(32) float t[L];
  _mm256_store_ps(t, v);
  for (int64_t i = 0; i < n; ++i) acc[i] += t[i];
}

template <int NV>
inline void sddmm_group(const float* xt, const int64_t* off, const __m256 d[NV], float* acc, int64_t n) {
  __m256 p[L];
  for (int e = 0; e < L; ++e) {
    const float* xc = xt + off[e];
    __m256 a = _mm256_mul_ps(d[0], _mm256_loadu_ps(xc));
    for (int v = 1; v < NV; ++v) a = _mm256_fmadd_ps(d[v], _mm256_loadu_ps(xc + v * L), a);
    p[e] = a;
  }
  add_n(acc, reduce(p), n);
}

template <int NV, typename S, typename I>
void sddmm_tile(const BalShape& s, const S* dy, int64_t lddy, const S* x, int64_t ldx, int64_t tb, const I* idx,
                float* acc, int64_t o0, int64_t o1, float* xt, float* dyt, int64_t* off) {
  constexpr int64_t TT = NV * L;
  const int64_t row_len = s.n_banks * s.keep;
  const int64_t cb = bal_chunk_banks(s, TT);
  pack_transposed<NV>(dy + o0, lddy, tb, o1 - o0, dyt);
  for (int64_t b0 = 0; b0 < s.n_banks; b0 += cb) {
    const int64_t b1 = b0 + cb < s.n_banks ? b0 + cb : s.n_banks;
    const int64_t c0 = b0 * s.bank;
    const int64_t c1 = b1 * s.bank < s.in ? b1 * s.bank : s.in;
    pack_transposed<NV>(x + c0, ldx, tb, c1 - c0, xt);
    const int64_t n_el = (b1 - b0) * s.keep;
    for (int64_t o = o0; o < o1; ++o) {
      __m256 d[NV];
      for (int v = 0; v < NV; ++v) d[v] = _mm256_loadu_ps(dyt + (o - o0) * TT + v * L);
      const I* ir = idx + o * row_len + b0 * s.keep;
      int64_t e = 0;
      for (int64_t b = 0; b < b1 - b0; ++b)
        for (int64_t k = 0; k < s.keep; ++k, ++e) off[e] = (b * s.bank + static_cast<int64_t>(ir[e])) * TT;
      for (int64_t j = n_el; j < (n_el + L - 1) / L * L; ++j) off[j] = 0;  // pad: a valid column, masked off
      float* ar = acc + (o - o0) * row_len + b0 * s.keep;
      for (int64_t j = 0; j < n_el; j += L) sddmm_group<NV>(xt, off + j, d, ar + j, n_el - j);
    }
  }
}

template <typename S, typename I>
void sddmm(const BalShape& s, const S* dy, int64_t lddy, const S* x, int64_t ldx, int64_t T, const I* idx, S* dw,
           int64_t o0, int64_t o1, float* scratch) {
  const int64_t row_len = s.n_banks * s.keep;
  const int64_t chunk = bal_chunk_floats(s);
  float* xt = align64(scratch);
  float* dyt = align64(xt + chunk);
  int64_t* off = reinterpret_cast<int64_t*>(align64(dyt + (o1 - o0 + 16) * kMaxTokTile));
  float* acc = align64(reinterpret_cast<float*>(off + chunk / 4 + 32));
  constexpr int64_t kTile = 4 * L;
  std::memset(acc, 0, sizeof(float) * (o1 - o0) * row_len);
  for (int64_t t0 = 0; t0 < T; t0 += kTile) {
    const int64_t tb = T - t0 < kTile ? T - t0 : kTile;
    const S* dyp = dy + t0 * lddy;
    const S* xp = x + t0 * ldx;
    switch ((tb + L - 1) / L) {
      case 1: sddmm_tile<1>(s, dyp, lddy, xp, ldx, tb, idx, acc, o0, o1, xt, dyt, off); break;
      case 2: sddmm_tile<2>(s, dyp, lddy, xp, ldx, tb, idx, acc, o0, o1, xt, dyt, off); break;
      case 3: sddmm_tile<3>(s, dyp, lddy, xp, ldx, tb, idx, acc, o0, o1, xt, dyt, off); break;
      default: sddmm_tile<4>(s, dyp, lddy, xp, ldx, tb, idx, acc, o0, o1, xt, dyt, off); break;
    }
  }
  const int64_t n = (o1 - o0) * row_len;
  S* out = dw + o0 * row_len;
  for (int64_t j = 0; j < n; j += L) store_n(out + j, _mm256_loadu_ps(acc + j), n - j);
}

}  // namespace

void balanced_fwd_avx2(const BalShape& s, const void* x, int64_t ldx, int64_t T, const void* values,
                       const void* indices, const void* bias, int act, void* y, int64_t o0, int64_t o1,
                       float* scratch) {
  const Act a = static_cast<Act>(act);
  if (s.bf16) {
    using W = uint16_t;
    if (s.idx16)
      fwd(s, static_cast<const W*>(x), ldx, T, static_cast<const W*>(values), static_cast<const int16_t*>(indices),
          static_cast<const W*>(bias), a, static_cast<W*>(y), o0, o1, scratch);
    else
      fwd(s, static_cast<const W*>(x), ldx, T, static_cast<const W*>(values), static_cast<const uint8_t*>(indices),
          static_cast<const W*>(bias), a, static_cast<W*>(y), o0, o1, scratch);
  } else {
    using W = float;
    if (s.idx16)
      fwd(s, static_cast<const W*>(x), ldx, T, static_cast<const W*>(values), static_cast<const int16_t*>(indices),
          static_cast<const W*>(bias), a, static_cast<W*>(y), o0, o1, scratch);
    else
      fwd(s, static_cast<const W*>(x), ldx, T, static_cast<const W*>(values), static_cast<const uint8_t*>(indices),
          static_cast<const W*>(bias), a, static_cast<W*>(y), o0, o1, scratch);
  }
}

void balanced_grad_input_avx2(const BalShape& s, const void* dy, int64_t lddy, int64_t T, const void* values,
                              const void* indices, void* dx, int64_t b0, int64_t b1, float* scratch) {
  if (s.bf16) {
    using W = uint16_t;
    if (s.idx16)
      grad_input(s, static_cast<const W*>(dy), lddy, T, static_cast<const W*>(values),
                 static_cast<const int16_t*>(indices), static_cast<W*>(dx), b0, b1, scratch);
    else
      grad_input(s, static_cast<const W*>(dy), lddy, T, static_cast<const W*>(values),
                 static_cast<const uint8_t*>(indices), static_cast<W*>(dx), b0, b1, scratch);
  } else {
    using W = float;
    if (s.idx16)
      grad_input(s, static_cast<const W*>(dy), lddy, T, static_cast<const W*>(values),
                 static_cast<const int16_t*>(indices), static_cast<W*>(dx), b0, b1, scratch);
    else
      grad_input(s, static_cast<const W*>(dy), lddy, T, static_cast<const W*>(values),
                 static_cast<const uint8_t*>(indices), static_cast<W*>(dx), b0, b1, scratch);
  }
}

void balanced_sddmm_avx2(const BalShape& s, const void* dy, int64_t lddy, const void* x, int64_t ldx, int64_t T,
                         const void* indices, void* dw, int64_t o0, int64_t o1, float* scratch) {
  if (s.bf16) {
    using W = uint16_t;
    if (s.idx16)
      sddmm(s, static_cast<const W*>(dy), lddy, static_cast<const W*>(x), ldx, T, static_cast<const int16_t*>(indices),
            static_cast<W*>(dw), o0, o1, scratch);
    else
      sddmm(s, static_cast<const W*>(dy), lddy, static_cast<const W*>(x), ldx, T, static_cast<const uint8_t*>(indices),
            static_cast<W*>(dw), o0, o1, scratch);
  } else {
    using W = float;
    if (s.idx16)
      sddmm(s, static_cast<const W*>(dy), lddy, static_cast<const W*>(x), ldx, T, static_cast<const int16_t*>(indices),
            static_cast<W*>(dw), o0, o1, scratch);
    else
      sddmm(s, static_cast<const W*>(dy), lddy, static_cast<const W*>(x), ldx, T, static_cast<const uint8_t*>(indices),
            static_cast<W*>(dw), o0, o1, scratch);
  }
}

}  // namespace sparsekern::cpu

#endif  // defined(__x86_64__)
