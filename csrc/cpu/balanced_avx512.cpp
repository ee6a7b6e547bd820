// AVX-512 balanced-sparse kernels (plan in balanced_kernels.h). Compiled with a target pragma inside a baseline
// x86-64 build: no torch or STL headers here, helpers have internal linkage, and only the entry points (whose
// names carry the ISA) are external. AVX512_BF16 is not used: bf16 is widened to fp32 in registers (a shift),
// which keeps this path valid on every AVX-512 CPU that best_isa() accepts (F, BW, VL + FMA).
#if defined(__x86_64__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "act_avx512.h"
#include "balanced_kernels.h"
#include "epilogue.h"
#include "tile_avx512.h"

namespace sparsekern::cpu {
namespace {

// ---------------------------------------------------------------------------------------------------------------
// Forward, token tiles.

inline __m512 bcast(const float* p) {
  return _mm512_set1_ps(*p);
}
inline __m512 bcast(const uint16_t* p) {
  return _mm512_set1_ps(bf16_to_float(*p));
}

// p[0..3] as fp32 in every 128-bit lane.
inline __m512 load4(const float* p) {
  return _mm512_broadcast_f32x4(_mm_loadu_ps(p));
}
inline __m512 load4(const uint16_t* p) {
  const __m128i h = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm512_broadcast_f32x4(_mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(h), 16)));
}

// Token vectors per tile up to which fwd_rows takes weights 4 per load (the loads per FMA dominate): faster at 1 and
// 2 token vectors, slower at 4, where each weight feeds enough FMAs (numbers: docs/measurements.md, "Balanced
// AVX-512 forward: inner-loop choices").
constexpr int kQuadMaxNV = 2;

// Byte offsets into the packed chunk of n kept entries of one row: colb[j] + idx[j] * TT * 4, where colb[j] is the
// byte offset of entry j's bank in the chunk. Computed 16 at a time before the FMA loop, so the loop does half an
// 8-byte load per entry instead of a byte load, a shift and an add.
inline __m512i load_idx(const uint8_t* p, __mmask16 m) {
  return _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, p));
}
inline __m512i load_idx(const int16_t* p, __mmask16 m) {
  return _mm512_cvtepi16_epi32(_mm256_maskz_loadu_epi16(m, p));
}

template <int TT, typename I>
inline void entry_offsets(const I* idx, const int32_t* colb, int64_t n, int32_t* off) {
  constexpr int kShift = TT == 16 ? 6 : TT == 32 ? 7 : TT == 64 ? 8 : TT == 128 ? 9 : -1;
  for (int64_t j = 0; j < n; j += L) {
    const __mmask16 m = lane_mask(n - j);
    const __m512i c = load_idx(idx + j, m);
    const __m512i b = kShift >= 0 ? _mm512_slli_epi32(c, kShift) : _mm512_mullo_epi32(c, _mm512_set1_epi32(TT * 4));
    _mm512_mask_storeu_epi32(off + j, m, _mm512_add_epi32(b, _mm512_maskz_loadu_epi32(m, colb + j)));
  }
}

// Four consecutive indices of a row, packed into one integer (one load instead of four).
inline uint64_t load_idx4(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
inline uint64_t load_idx4(const int16_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}

// R output rows (row stride row_len in w/idx) over the n kept entries of the current chunk (starting at entry e0 of
// each row) against the packed chunk xt; partial sums in acc_buf[r * TT + t] (started from zero when first).
// colb[j]: byte offset of entry j's bank in the chunk. quads (only with NV <= kQuadMaxNV): every 4 consecutive
// entries share a bank (keep % 4 == 0).
// Without quads, off holds this call's offsets (off[r * n + j], computed by the previous call) and the call computes
// those of the next nr_next rows (idx_next) into off_next: written one call ahead, the offsets are read back from L1
// instead of waiting on their own stores, which measured faster at keep 4, 8 and 16 (numbers: docs/measurements.md,
// "Balanced AVX-512 forward: inner-loop choices").
// Element q of every 128-bit lane of w4, broadcast in its lane. vpermilps takes the selector as an immediate: the
// caller's q loop is unrolled at -O3, so q * 0x55 is a constant there. The sanitizer build (-O1) does not unroll
// it, so there a switch turns the variable back into constants (a function in the -O3 build would change GCC's
// inlining of the callers).
#ifdef SPARSEKERN_SANITIZE
inline __m512 lane_bcast(__m512 w4, int q) {
  switch (q) {
    case 0: return _mm512_permute_ps(w4, 0x00);
    case 1: return _mm512_permute_ps(w4, 0x55);
    case 2: return _mm512_permute_ps(w4, 0xaa);
    default: return _mm512_permute_ps(w4, 0xff);
  }
}
#define SK_LANE_BCAST(w4, q) lane_bcast(w4, q)
#else
#define SK_LANE_BCAST(w4, q) _mm512_permute_ps(w4, (q) * 0x55)
#endif

template <int R, int NV, typename W, typename I>
void fwd_rows(const W* w, const I* idx, int64_t row_len, int64_t e0, int64_t n, const int32_t* colb, bool quads,
              const int32_t* off, int32_t* off_next, const I* idx_next, int64_t nr_next, const float* xt,
              float* acc_buf, bool first) {
  constexpr int64_t TT = NV * L;
  __m512 acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(acc_buf + r * TT + v * L);
  const char* xc0 = reinterpret_cast<const char*>(xt);
  const W* wr = w + e0;
  const I* ir = idx + e0;
  if (quads) {
    // With 1-2 FMAs per kept entry the per-entry loads cost as much as the x loads: the offsets are computed in
    // integer registers from one load of 4 indices (an offset array written and read back was slower at 16
    // tokens), and the weights come 4 per load, one in-lane shuffle each (numbers: docs/measurements.md, "Balanced
    // AVX-512 forward: inner-loop choices").
    constexpr int kBits = 8 * sizeof(I);
    constexpr uint64_t kMask = (uint64_t(1) << kBits) - 1;
    for (int64_t j = 0; j < n; j += 4) {
      const int64_t base = colb[j];
      for (int r = 0; r < R; ++r) {
        const uint64_t i4 = load_idx4(ir + r * row_len + j);
        const __m512 w4 = load4(wr + r * row_len + j);
        for (int q = 0; q < 4; ++q) {
          const __m512 wv = SK_LANE_BCAST(w4, q);
          const float* xc =
              reinterpret_cast<const float*>(xc0 + base + static_cast<int64_t>((i4 >> (q * kBits)) & kMask) * (TT * 4));
          for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xc + v * L), acc[r][v]);
        }
      }
    }
  } else {
    // More FMAs per entry: the precomputed offsets measured faster than computing them inline, and reading them 2
    // per load faster again (numbers: docs/measurements.md, "Balanced AVX-512 forward: inner-loop choices").
    for (int64_t r = 0; r < nr_next; ++r) entry_offsets<TT>(idx_next + r * row_len + e0, colb, n, off_next + r * n);
    int64_t j = 0;
    for (; j + 2 <= n; j += 2) {
      for (int r = 0; r < R; ++r) {
        uint64_t o01;
        std::memcpy(&o01, off + r * n + j, 8);
        const uint64_t o[2] = {o01 & 0xffffffffu, o01 >> 32};
        for (int q = 0; q < 2; ++q) {
          const __m512 wv = bcast(wr + r * row_len + j + q);
          const float* xc = reinterpret_cast<const float*>(xc0 + o[q]);
          for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xc + v * L), acc[r][v]);
        }
      }
    }
    for (; j < n; ++j) {
      for (int r = 0; r < R; ++r) {
        const __m512 wv = bcast(wr + r * row_len + j);
        const float* xc = reinterpret_cast<const float*>(xc0 + off[r * n + j]);
        for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xc + v * L), acc[r][v]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(acc_buf + r * TT + v * L, acc[r][v]);
}

template <int NV, typename W, typename I>
void fwd_tile(const BalShape& s, const W* x, int64_t ldx, int64_t tb, const W* w, const I* idx, const W* bias, Act act,
              W* y, int64_t o0, int64_t o1, float* xt, float* ybuf, int32_t* colb, int32_t* off) {
  constexpr int64_t TT = NV * L;
  const int64_t row_len = s.n_banks * s.keep;
  const int64_t cb = bal_chunk_banks(s, TT);
  for (int64_t j = 0; j < cb * s.keep; ++j) colb[j] = static_cast<int32_t>((j / s.keep) * s.bank * TT * 4);
  const bool quads = s.keep % 4 == 0;  // every 4 consecutive entries of a row share a bank
  for (int64_t b0 = 0; b0 < s.n_banks; b0 += cb) {
    const int64_t b1 = b0 + cb < s.n_banks ? b0 + cb : s.n_banks;
    const int64_t c0 = b0 * s.bank;
    const int64_t c1 = b1 * s.bank < s.in ? b1 * s.bank : s.in;
    pack_transposed<NV>(x + c0, ldx, tb, c1 - c0, xt);
    const int64_t e0 = b0 * s.keep, n = (b1 - b0) * s.keep;
    // Up to 16 accumulators (R * NV) hide the FMA latency without spilling; 6 rows at one token vector and 4 at two
    // were the fastest measured (numbers: docs/measurements.md, "Balanced AVX-512 forward: inner-loop choices").
    constexpr int R = NV > 4 ? 2 : NV == 1 ? 6 : 4;
    const bool rows_quads = quads && NV <= kQuadMaxNV;
    // Groups of R rows, then single rows; off[0] holds the offsets of the current group, off[1] the next one's.
    int32_t* offs[2] = {off, off + R * (n + L)};
    auto group = [&](int64_t o) { return o1 - o >= R ? int64_t(R) : int64_t(1); };
    if (!rows_quads)
      for (int64_t r = 0; r < group(o0); ++r)
        entry_offsets<TT>(idx + (o0 + r) * row_len + e0, colb, n, offs[0] + r * n);
    for (int64_t o = o0, g = 0; o < o1; ++g) {
      const int64_t nr = group(o), on = o + nr;
      const int64_t nr_next = rows_quads || on >= o1 ? 0 : group(on);
      const int32_t* oc = offs[g & 1];
      int32_t* onx = offs[(g + 1) & 1];
      if (nr == R)
        fwd_rows<R, NV>(w + o * row_len, idx + o * row_len, row_len, e0, n, colb, rows_quads, oc, onx,
                        idx + on * row_len, nr_next, xt, ybuf + (o - o0) * TT, b0 == 0);
      else
        fwd_rows<1, NV>(w + o * row_len, idx + o * row_len, row_len, e0, n, colb, rows_quads, oc, onx,
                        idx + on * row_len, nr_next, xt, ybuf + (o - o0) * TT, b0 == 0);
      o = on;
    }
  }
  store_transposed<NV>(ybuf, o1 - o0, tb, y + o0, s.out, bias ? bias + o0 : nullptr, act);
}

// ---------------------------------------------------------------------------------------------------------------
// Forward, few tokens (decode): per output row, a vector of kept weights at a time gathers its x values.

inline __m512 load_w(const float* p, __mmask16 m) {
  return _mm512_maskz_loadu_ps(m, p);
}
inline __m512 load_w(const uint16_t* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

// Kept entries are sorted by column along a row (sorted within a bank, banks in order), so 16 consecutive entries
// usually span fewer than 128 columns: one to four two-source permutes over 32-column windows of x pick their x
// values, several times cheaper than a gather. Wider spans (wide banks with few entries) gather.
template <int NW>
inline __m512 pick(const float* xw, __m512i rel) {
  __m512 g = _mm512_permutex2var_ps(_mm512_loadu_ps(xw), rel, _mm512_loadu_ps(xw + 16));
  for (int k = 1; k < NW; ++k) {
    const __mmask16 in_k = _mm512_cmpeq_epi32_mask(_mm512_srli_epi32(rel, 5), _mm512_set1_epi32(k));
    g = _mm512_mask_mov_ps(
        g, in_k, _mm512_permutex2var_ps(_mm512_loadu_ps(xw + 32 * k), rel, _mm512_loadu_ps(xw + 32 * k + 16)));
  }
  return g;
}

template <int NW, int T>
inline void fwd_small_group(const float* xf, int64_t ldf, int64_t first, __m512i rel, __m512 wv, __mmask16 m,
                            __m512 acc[T]) {
  for (int t = 0; t < T; ++t) acc[t] = _mm512_mask3_fmadd_ps(wv, pick<NW>(xf + t * ldf + first, rel), acc[t], m);
}

// T is a template parameter so that the accumulators stay in registers.
template <int T, typename W, typename I>
void fwd_gather(const BalShape& s, const W* x, int64_t ldx, const W* w, const I* idx, const W* bias, Act act, W* y,
                int64_t o0, int64_t o1, float* scratch) {
  const int64_t row_len = s.n_banks * s.keep;
  // colbase[j]: first column of the bank of kept entry j; xf: the T token rows as fp32, each followed by 128
  // zeros so that every permute window starting inside the row can be loaded.
  int32_t* colbase = reinterpret_cast<int32_t*>(scratch);
  float* xf = align64(scratch + row_len + 16);
  const int64_t ldf = s.in + 128;
  for (int64_t j = 0; j < row_len; ++j) colbase[j] = static_cast<int32_t>((j / s.keep) * s.bank);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t c = 0; c < s.in; c += L) {
      const int64_t n = s.in - c < L ? s.in - c : L;
      store_n(xf + t * ldf + c, load_n(x + t * ldx + c, n), n);
    }
    std::memset(xf + t * ldf + s.in, 0, 128 * sizeof(float));
  }
  for (int64_t o = o0; o < o1; ++o) {
    __m512 acc[T];
    for (int t = 0; t < T; ++t) acc[t] = _mm512_setzero_ps();
    const W* wr = w + o * row_len;
    const I* ir = idx + o * row_len;
    for (int64_t j = 0; j < row_len; j += L) {
      // The weights stream once per call (cold in decode): run ahead of the demand loads.
      _mm_prefetch(reinterpret_cast<const char*>(wr + j) + 2048, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(ir + j) + 1024, _MM_HINT_T0);
      const int64_t nv = row_len - j < L ? row_len - j : L;
      const __mmask16 m = lane_mask(nv);
      const __m512i col = _mm512_add_epi32(load_idx(ir + j, m), _mm512_maskz_loadu_epi32(m, colbase + j));
      const __m512 wv = load_w(wr + j, m);
      const int64_t first = colbase[j] + static_cast<int64_t>(ir[j]);
      const int64_t span = colbase[j + nv - 1] + static_cast<int64_t>(ir[j + nv - 1]) - first;
      const __m512i rel = _mm512_sub_epi32(col, _mm512_set1_epi32(static_cast<int32_t>(first)));
      if (span < 32) fwd_small_group<1, T>(xf, ldf, first, rel, wv, m, acc);
      else if (span < 64) fwd_small_group<2, T>(xf, ldf, first, rel, wv, m, acc);
      else if (span < 128) fwd_small_group<4, T>(xf, ldf, first, rel, wv, m, acc);
      else
        for (int t = 0; t < T; ++t)
          acc[t] = _mm512_fmadd_ps(wv, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, col, xf + t * ldf, 4), acc[t]);
    }
    const float bv = bias ? to_f32(bias[o]) : 0.0f;
    for (int t = 0; t < T; ++t) {
      // The vector activation on a broadcast, not apply_act: the same numbers as the token-tile path.
      const __m512 v = act_avx512(_mm512_set1_ps(_mm512_reduce_add_ps(acc[t]) + bv), act);
      store_n(y + t * s.out + o, v, 1);
    }
  }
}

// Forward, few tokens, bank 32 with keep 16 / 8 / 4: every vector of 16 consecutive kept entries of a row covers
// exactly 16 / K whole banks (K = keep), so its in-bank indices ARE the permute indices into each bank's 32 columns
// of x: 16 / K two-source permutes over windows at fixed bank offsets, no column arithmetic. Each permute after the
// first overwrites only its bank's lanes of the index vector (vpermi2ps with a fixed mask keeps the other lanes),
// so no blends are needed. Rows go 16 at a time: each row's accumulator vectors are kept, and one transpose-add
// tree turns the 16 of them into a vector of 16 outputs (one bias add, activation and store per 16 rows).
template <int K>
inline __m512 pick_banks(const float* xw, __m512i idx) {
  if (K == 16) return _mm512_permutex2var_ps(_mm512_loadu_ps(xw), idx, _mm512_loadu_ps(xw + 16));
  __m512i g = idx;
  for (int k = 0; k < 16 / K; ++k)
    g = _mm512_castps_si512(_mm512_mask2_permutex2var_ps(
        _mm512_loadu_ps(xw + 32 * k), g, __mmask16(((1u << K) - 1u) << (k * K)), _mm512_loadu_ps(xw + 32 * k + 16)));
  return _mm512_castsi512_ps(g);
}

// Whether any in-bank index of the vector is outside [0, 32): OR-ing the indices keeps them below 32 unless one is
// not (negative int16 values sign-extend to all ones).
inline __m512i or_idx(__m512i acc, __m512i idx) {
  return _mm512_or_si512(acc, idx);
}

constexpr int64_t kDecodePrefetch = 2048;  // kept entries ahead of the demand loads (see fwd_bank32)

template <int K, int T, typename W, typename I>
bool fwd_bank32(const BalShape& s, const W* x, int64_t ldx, const W* w, const I* idx, const W* bias, Act act, W* y,
                int64_t o0, int64_t o1, float* scratch) {
  constexpr int kBank = 32;
  const int64_t row_len = s.n_banks * K;
  // xf: the T token rows as fp32, each followed by zeros, so that every bank's 32-column window can be loaded.
  float* xf = align64(scratch);
  const int64_t ldf = s.in + 128;
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t c = 0; c < s.in; c += L) {
      const int64_t n = s.in - c < L ? s.in - c : L;
      store_n(xf + t * ldf + c, load_n(x + t * ldx + c, n), n);
    }
    std::memset(xf + t * ldf + s.in, 0, 128 * sizeof(float));
  }
  // Full vectors lie in banks of full width; the rest of a row (< 16 entries, or 16 reaching a ragged last bank)
  // is one masked tail vector whose lanes are checked against their bank's width.
  const int64_t full_banks = s.in / kBank;
  const int64_t n_full = full_banks * K / L * L;
  const int64_t n_tail = row_len - n_full;
  const __mmask16 m_tail = lane_mask(n_tail);
  alignas(64) int32_t lim[L];
  for (int l = 0; l < L; ++l) {
    const int64_t b = (n_full + l) / K;
    lim[l] = static_cast<int32_t>(b < s.n_banks ? (s.in - b * kBank < kBank ? s.in - b * kBank : kBank) : 0);
  }
  const __m512i lim_tail = _mm512_load_si512(lim);
  const int64_t tail_banks = (n_tail + K - 1) / K;
  __m512i bad_or = _mm512_setzero_si512();
  __mmask16 bad_tail = 0;
  for (int64_t ob = o0; ob < o1; ob += L) {
    const int64_t nr = o1 - ob < L ? o1 - ob : L;
    __m512 sums[T][L];
    for (int64_t r = 0; r < L; ++r) {
      if (r >= nr) {
        for (int t = 0; t < T; ++t) sums[t][r] = _mm512_setzero_ps();
        continue;
      }
      const W* wr = w + (ob + r) * row_len;
      const I* ir = idx + (ob + r) * row_len;
      // Two accumulators per token halve the FMA dependency chain.
      __m512 a0[T], a1[T];
      for (int t = 0; t < T; ++t) a0[t] = a1[t] = _mm512_setzero_ps();
      int64_t j = 0;
      for (; j + 2 * L <= n_full; j += 2 * L) {
        // 2048 entries (8 KiB of fp32 weights) ahead: with cold weights this beats the hardware prefetchers alone
        // at keep 4 and makes no measurable difference at keep 8 / 16, whereas a short distance was slower than
        // none (numbers: docs/measurements.md, "Balanced decode, bank 32").
        _mm_prefetch(reinterpret_cast<const char*>(wr + j + kDecodePrefetch), _MM_HINT_T0);
        if (sizeof(W) == 4) _mm_prefetch(reinterpret_cast<const char*>(wr + j + kDecodePrefetch + L), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(ir + j + kDecodePrefetch), _MM_HINT_T0);
        const __m512i i0 = load_idx(ir + j, 0xFFFF), i1 = load_idx(ir + j + L, 0xFFFF);
        bad_or = or_idx(or_idx(bad_or, i0), i1);
        const __m512 w0 = load_w(wr + j, 0xFFFF), w1 = load_w(wr + j + L, 0xFFFF);
        const int64_t c0 = j / K * kBank;
        for (int t = 0; t < T; ++t) {
          a0[t] = _mm512_fmadd_ps(w0, pick_banks<K>(xf + t * ldf + c0, i0), a0[t]);
          a1[t] = _mm512_fmadd_ps(w1, pick_banks<K>(xf + t * ldf + c0 + 16 / K * kBank, i1), a1[t]);
        }
      }
      if (j < n_full) {
        const __m512i i0 = load_idx(ir + j, 0xFFFF);
        bad_or = or_idx(bad_or, i0);
        const __m512 w0 = load_w(wr + j, 0xFFFF);
        for (int t = 0; t < T; ++t) a0[t] = _mm512_fmadd_ps(w0, pick_banks<K>(xf + t * ldf + j / K * kBank, i0), a0[t]);
      }
      if (n_tail > 0) {
        const __m512i it = load_idx(ir + n_full, m_tail);
        bad_tail |= _mm512_mask_cmpge_epu32_mask(m_tail, it, lim_tail);
        const __m512 wt = load_w(wr + n_full, m_tail);
        const int64_t c0 = n_full / K * kBank;
        for (int t = 0; t < T; ++t) {
          const float* xw = xf + t * ldf + c0;
          __m512 g = _mm512_permutex2var_ps(_mm512_loadu_ps(xw), it, _mm512_loadu_ps(xw + 16));
          for (int64_t k = 1; k < tail_banks; ++k)
            g = _mm512_mask_blend_ps(
                __mmask16(((1u << K) - 1u) << (k * K)), g,
                _mm512_permutex2var_ps(_mm512_loadu_ps(xw + 32 * k), it, _mm512_loadu_ps(xw + 32 * k + 16)));
          // Masked: a zero weight times an infinite x of another column would still be NaN.
          a1[t] = _mm512_mask3_fmadd_ps(wt, g, a1[t], m_tail);
        }
      }
      for (int t = 0; t < T; ++t) sums[t][r] = _mm512_add_ps(a0[t], a1[t]);
    }
    const __m512 bv = bias ? load_n(bias + ob, nr) : _mm512_setzero_ps();
    for (int t = 0; t < T; ++t) store_n(y + t * s.out + ob, act_avx512(_mm512_add_ps(reduce(sums[t]), bv), act), nr);
  }
  return bad_tail == 0 && _mm512_cmpge_epu32_mask(bad_or, _mm512_set1_epi32(kBank)) == 0;
}

template <int K, typename W, typename I>
bool fwd_bank32(const BalShape& s, const W* x, int64_t ldx, int64_t T, const W* w, const I* idx, const W* bias, Act act,
                W* y, int64_t o0, int64_t o1, float* scratch) {
  if (T == 1) return fwd_bank32<K, 1>(s, x, ldx, w, idx, bias, act, y, o0, o1, scratch);
  if (T == 2) return fwd_bank32<K, 2>(s, x, ldx, w, idx, bias, act, y, o0, o1, scratch);
  return fwd_bank32<K, 3>(s, x, ldx, w, idx, bias, act, y, o0, o1, scratch);
}

// Returns false if the bank-32 decode path found an index out of range (the other paths run on checked indices).
template <typename W, typename I>
bool fwd(const BalShape& s, const W* x, int64_t ldx, int64_t T, const W* w, const I* idx, const W* bias, Act act, W* y,
         int64_t o0, int64_t o1, float* scratch) {
  static_assert(kGatherMaxTokens == 4, "fwd_gather is instantiated for T = 1, 2, 3");
  if (bal_fwd_checks_indices_avx512(s, T)) {
    if (s.keep == 16) return fwd_bank32<16>(s, x, ldx, T, w, idx, bias, act, y, o0, o1, scratch);
    if (s.keep == 8) return fwd_bank32<8>(s, x, ldx, T, w, idx, bias, act, y, o0, o1, scratch);
    return fwd_bank32<4>(s, x, ldx, T, w, idx, bias, act, y, o0, o1, scratch);
  }
  if (T == 1) return fwd_gather<1>(s, x, ldx, w, idx, bias, act, y, o0, o1, scratch), true;
  if (T == 2) return fwd_gather<2>(s, x, ldx, w, idx, bias, act, y, o0, o1, scratch), true;
  if (T == 3) return fwd_gather<3>(s, x, ldx, w, idx, bias, act, y, o0, o1, scratch), true;
  float* xt = align64(scratch);
  float* ybuf = align64(xt + bal_chunk_floats(s));
  int32_t* colb = reinterpret_cast<int32_t*>(align64(ybuf + (o1 - o0 + 16) * kMaxTokTile));
  int32_t* off = colb + bal_chunk_entries(s) + 16;
  // 4 kept entries per bank: 2-vector tiles, whose chunks span 4x the banks and take the 4-index loads, beat
  // 8-vector tiles; at keep 8 and 16 they lose (numbers: docs/measurements.md, "Balanced AVX-512 forward:
  // inner-loop choices").
  const int64_t tile = s.keep == 4 ? 2 * L : 8 * L;
  for (int64_t t0 = 0; t0 < T; t0 += tile) {
    const int64_t tb = T - t0 < tile ? T - t0 : tile;
    const W* xp = x + t0 * ldx;
    W* yp = y + t0 * s.out;
    switch ((tb + L - 1) / L) {
      case 1: fwd_tile<1>(s, xp, ldx, tb, w, idx, bias, act, yp, o0, o1, xt, ybuf, colb, off); break;
      case 2: fwd_tile<2>(s, xp, ldx, tb, w, idx, bias, act, yp, o0, o1, xt, ybuf, colb, off); break;
      case 3: fwd_tile<3>(s, xp, ldx, tb, w, idx, bias, act, yp, o0, o1, xt, ybuf, colb, off); break;
      case 4: fwd_tile<4>(s, xp, ldx, tb, w, idx, bias, act, yp, o0, o1, xt, ybuf, colb, off); break;
      case 5: fwd_tile<5>(s, xp, ldx, tb, w, idx, bias, act, yp, o0, o1, xt, ybuf, colb, off); break;
      case 6: fwd_tile<6>(s, xp, ldx, tb, w, idx, bias, act, yp, o0, o1, xt, ybuf, colb, off); break;
      case 7: fwd_tile<7>(s, xp, ldx, tb, w, idx, bias, act, yp, o0, o1, xt, ybuf, colb, off); break;
      default: fwd_tile<8>(s, xp, ldx, tb, w, idx, bias, act, yp, o0, o1, xt, ybuf, colb, off); break;
    }
  }
  return true;
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
      __m512 d[NV];
      for (int v = 0; v < NV; ++v) d[v] = _mm512_loadu_ps(dyt + o * TT + v * L);
      for (int64_t b = b0; b < b1; ++b) {
        const W* wb = w + o * row_len + b * s.keep;
        const I* ib = idx + o * row_len + b * s.keep;
        float* xb = dxt + (b - b0) * s.bank * TT;
        for (int64_t k = 0; k < s.keep; ++k) {
          const __m512 wv = bcast(wb + k);
          float* p = xb + static_cast<int64_t>(ib[k]) * TT;
          for (int v = 0; v < NV; ++v)
            _mm512_storeu_ps(p + v * L, _mm512_fmadd_ps(wv, d[v], _mm512_loadu_ps(p + v * L)));
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
inline void add_n(float* acc, __m512 v, int64_t n) {
  const __mmask16 m = lane_mask(n);
  _mm512_mask_storeu_ps(acc, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, acc), v));
}

template <int NV>
inline void sddmm_group(const float* xt, const int64_t* off, const __m512 d[NV], float* acc, int64_t n) {
  __m512 p[L];
  for (int e = 0; e < L; ++e) {
    const float* xc = xt + off[e];
    __m512 a = _mm512_mul_ps(d[0], _mm512_loadu_ps(xc));
    for (int v = 1; v < NV; ++v) a = _mm512_fmadd_ps(d[v], _mm512_loadu_ps(xc + v * L), a);
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
      __m512 d[NV];
      for (int v = 0; v < NV; ++v) d[v] = _mm512_loadu_ps(dyt + (o - o0) * TT + v * L);
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
  for (int64_t j = 0; j < n; j += L) store_n(out + j, _mm512_loadu_ps(acc + j), n - j);
}

}  // namespace

bool balanced_fwd_avx512(const BalShape& s, const void* x, int64_t ldx, int64_t T, const void* values,
                         const void* indices, const void* bias, int act, void* y, int64_t o0, int64_t o1,
                         float* scratch) {
  const Act a = static_cast<Act>(act);
  auto run = [&](auto w_tag, auto i_tag) {
    using W = decltype(w_tag);
    using I = decltype(i_tag);
    return fwd(s, static_cast<const W*>(x), ldx, T, static_cast<const W*>(values), static_cast<const I*>(indices),
               static_cast<const W*>(bias), a, static_cast<W*>(y), o0, o1, scratch);
  };
  if (s.bf16) return s.idx16 ? run(uint16_t{}, int16_t{}) : run(uint16_t{}, uint8_t{});
  return s.idx16 ? run(float{}, int16_t{}) : run(float{}, uint8_t{});
}

void balanced_grad_input_avx512(const BalShape& s, const void* dy, int64_t lddy, int64_t T, const void* values,
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

void balanced_sddmm_avx512(const BalShape& s, const void* dy, int64_t lddy, const void* x, int64_t ldx, int64_t T,
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
