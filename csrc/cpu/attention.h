// Scaled dot-product attention on the CPU, out = softmax(q k^T * scale + mask) v per (batch, head), written as
// [B, Lq, H, Dv]: the layout the model's output projection reads, so no transpose copy follows (torch's SDPA
// returns [B, H, Lq, Dv] and transformers makes it contiguous as [B, Lq, H, Dv] with a copy).
//
// One task is (batch, head, chunk of query rows). Per task:
//   1. K^T packed in panels of NK keys, [panel][d][NK] fp32 (16x16 / 8x8 in-register transposes), so that the
//      q k^T tile is a register-blocked GEMM: MR query rows (broadcast) x NK keys (vectors) over d.
//   2. Per tile of MR query rows: S [MR][keys] in a scratch row per query, the mask added, the softmax
//      numerators exp(s - max) in place (exp_nonpos of the ISA, ~1 ulp) and 1 / their sum kept per row.
//   3. O = P v, a second register-blocked GEMM over the keys: MRO rows (P broadcast) x NVO vectors of v's row
//      (v read in place for fp32, converted once per task for bf16), scaled by 1 / sum at the store.
// S of a tile (MR rows x Lk keys) stays in L1/L2, K^T and v in L2: nothing of size Lq x Lk ever reaches memory.
// Causal (top-left, as torch's is_causal: query i sees keys j <= i) stops both GEMMs at the tile's last key.
//
// Rows whose every key is masked out give 0 (as torch's SDPA on the CPU); a NaN (or +Inf) score makes its row
// NaN; NaN in v reaches the rows that weigh it (0 * NaN is NaN, as in a matmul).
//
// The raw-pointer interface between attention.cpp (checks, threading) and the translation units compiled for one
// ISA (attention_avx512.cpp, attention_avx2.cpp), which define the vector policy P and instantiate run<P>. No
// torch or STL headers and internal linkage only (see bsr_kernels.h).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

namespace sparsekern::cpu {

enum class AttnMask : int { None = 0, Bool = 1, F32 = 2, Bf16 = 3 };

struct AttnArgs {
  int64_t B, H, Hkv, Lq, Lk, D, Dv;
  const void* q;  // [B, H, Lq, D], element strides qs (b, h, l), d contiguous
  int64_t qs[3];
  const void* k;  // [B, Hkv, Lk, D]
  int64_t ks[3];
  const void* v;  // [B, Hkv, Lk, Dv]
  int64_t vs[3];
  const void* mask;  // broadcast to [B, H, Lq, Lk] by its strides ms (0 where broadcast); null: none
  AttnMask mask_kind;
  int64_t ms[4];
  void* out;  // [B, Lq, H, Dv] contiguous
  bool bf16;  // q, k, v and out bfloat16 (uint16 bits); else float32
  float scale;
  bool causal;
  int64_t q_chunk;  // query rows per task (a multiple of every policy's MR)
};

// Largest MR and NK of any policy: attention.cpp sizes the scratch with them.
constexpr int64_t kAttnMaxMR = 12;
constexpr int64_t kAttnMaxNK = 32;

// Floats of scratch one thread needs (64-byte alignment slack included).
inline int64_t attention_scratch_floats(const AttnArgs& a) {
  const int64_t lkp = (a.Lk + kAttnMaxNK - 1) / kAttnMaxNK * kAttnMaxNK;
  return lkp * a.D + (a.bf16 ? a.Lk * a.Dv : 0) + kAttnMaxMR * lkp + kAttnMaxMR * a.D + kAttnMaxMR + 4 * 16;
}

inline int64_t attention_tasks(const AttnArgs& a) {
  return a.B * a.H * ((a.Lq + a.q_chunk - 1) / a.q_chunk);
}

// Tasks [t0, t1) with `scratch` of attention_scratch_floats(a) floats.
void attention_avx512(const AttnArgs& a, int64_t t0, int64_t t1, float* scratch);
void attention_avx2(const AttnArgs& a, int64_t t0, int64_t t1, float* scratch);

namespace attn_detail {

inline float* align64(float* p) {
  return reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t(63));
}

// The kernel over a vector policy P: P::V (W fp32 lanes), MR / NVS (the S tile: MR rows x NVS vectors of keys),
// mro<NVO>() (rows of the O tile of NVO vectors), the vector operations used below (load_n / store_n for fp32 and
// bf16 rows among them), and pack_kt, which packs a K^T panel.
template <class P>
struct Attention {
  using V = typename P::V;
  static constexpr int W = P::W;
  static constexpr int MR = P::MR;
  static constexpr int NVS = P::NVS;
  static constexpr int NK = NVS * W;
  static_assert(MR <= kAttnMaxMR && NK <= kAttnMaxNK, "scratch sized for smaller tiles");

  // dst[0:n] = src[0:n] * scale in fp32 (a query row, pre-scaled); widen_row: a bf16 row to fp32.
  template <class S>
  static inline void scale_row(const S* src, int64_t n, float scale, float* dst) {
    const V f = P::bcast(scale);
    for (int64_t d = 0; d < n; d += W) P::store_n(dst + d, P::mul(P::load_n(src + d, n - d), f), n - d);
  }
  static inline void widen_row(const uint16_t* src, int64_t n, float* dst) {
    for (int64_t d = 0; d < n; d += W) P::store_n(dst + d, P::load_n(src + d, n - d), n - d);
  }

  // S[r][p*NK ..] for the MR rows of qb (pre-scaled queries, fp32 [MR][D]) and K^T panel kt ([D][NK]).
  static inline void s_tile(const float* qb, int64_t D, const float* kt, float* s, int64_t lds) {
    V acc[MR][NVS];
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < NVS; ++v) acc[r][v] = P::zero();
    for (int64_t d = 0; d < D; ++d) {
      V kv[NVS];
      for (int v = 0; v < NVS; ++v) kv[v] = P::load(kt + d * NK + v * W);
      for (int r = 0; r < MR; ++r) {
        const V b = P::bcast(qb[r * D + d]);
        for (int v = 0; v < NVS; ++v) acc[r][v] = P::fma(b, kv[v], acc[r][v]);
      }
    }
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < NVS; ++v) P::store(s + r * lds + v * W, acc[r][v]);
  }

  // out rows [r0, r0 + rows) (rows <= MRO) of columns [c, c + nc) (nc <= NVO * W) = P[r0..][0:nk] v[0:nk][c..],
  // scaled by rs[r]. v rows are ldv apart, fp32.
  template <int NVO, bool kFull, class Out>
  static inline void o_tile(const float* s, int64_t lds, int64_t nk, const float* v, int64_t ldv, int64_t c, int64_t nc,
                            const float* rs, int rows, Out* out, int64_t ldo) {
    constexpr int MRO = P::template mro<NVO>();
    V acc[MRO][NVO];
    for (int r = 0; r < MRO; ++r)
      for (int u = 0; u < NVO; ++u) acc[r][u] = P::zero();
    for (int64_t j = 0; j < nk; ++j) {
      const float* vr = v + j * ldv + c;
      V vv[NVO];
      for (int u = 0; u < NVO; ++u) vv[u] = kFull ? P::load(vr + u * W) : P::load_n(vr + u * W, nc - u * W);
      for (int r = 0; r < MRO; ++r) {
        const V b = P::bcast(s[r * lds + j]);
        for (int u = 0; u < NVO; ++u) acc[r][u] = P::fma(b, vv[u], acc[r][u]);
      }
    }
    for (int r = 0; r < MRO; ++r) {
      const V f = P::bcast(rs[r]);
      for (int u = 0; u < NVO; ++u) acc[r][u] = P::mul(acc[r][u], f);
    }
    for (int r = 0; r < MRO; ++r) {
      if (r < rows) {
        for (int u = 0; u < NVO; ++u) {
          if (kFull) {
            P::store_n(out + r * ldo + c + u * W, acc[r][u], W);
          } else if (u * W < nc) {
            P::store_n(out + r * ldo + c + u * W, acc[r][u], nc - u * W);
          }
        }
      }
    }
  }

  // Columns [c, c + nc) of the tile's mr output rows, MRO rows at a time.
  template <int NVO, class Out>
  static inline void o_rows(const float* s, int64_t lds, int64_t nk, const float* v, int64_t ldv, int64_t c, int64_t nc,
                            const float* rs, int mr, Out* out, int64_t ldo) {
    constexpr int M = P::template mro<NVO>();
    for (int r0 = 0; r0 < mr; r0 += M) {
      const int rows = mr - r0 < M ? mr - r0 : M;
      if (nc == NVO * W) {
        o_tile<NVO, true>(s + r0 * lds, lds, nk, v, ldv, c, nc, rs + r0, rows, out + r0 * ldo, ldo);
      } else {
        o_tile<NVO, false>(s + r0 * lds, lds, nk, v, ldv, c, nc, rs + r0, rows, out + r0 * ldo, ldo);
      }
    }
  }

  // Adds row `i`'s mask to s[0:n] (bool: false -> -inf).
  static inline void add_mask(const AttnArgs& a, int64_t b, int64_t h, int64_t i, float* s, int64_t n) {
    const int64_t off = b * a.ms[0] + h * a.ms[1] + i * a.ms[2];
    const int64_t st = a.ms[3];
    constexpr float ninf = -std::numeric_limits<float>::infinity();
    switch (a.mask_kind) {
      case AttnMask::Bool: {
        const bool* m = static_cast<const bool*>(a.mask) + off;
        if (st == 1) {
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) s[j] = m[j] ? s[j] : ninf;
        } else {
          for (int64_t j = 0; j < n; ++j) s[j] = m[j * st] ? s[j] : ninf;
        }
        break;
      }
      case AttnMask::F32: {
        const float* m = static_cast<const float*>(a.mask) + off;
        if (st == 1) {
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) s[j] += m[j];
        } else {
          for (int64_t j = 0; j < n; ++j) s[j] += m[j * st];
        }
        break;
      }
      case AttnMask::Bf16: {
        const uint16_t* m = static_cast<const uint16_t*>(a.mask) + off;
        for (int64_t j = 0; j < n; ++j) {
          const uint32_t u = uint32_t(m[j * st]) << 16;
          float f;
          __builtin_memcpy(&f, &u, 4);
          s[j] += f;
        }
        break;
      }
      case AttnMask::None: break;
    }
  }

  // s[0:n] -> exp(s - max), s[n:nk] -> 0; returns 1 / sum (0 for a row with every key masked, NaN for a row with
  // a NaN or +Inf score).
  static inline float softmax_row(float* s, int64_t n, int64_t nk) {
    constexpr float ninf = -std::numeric_limits<float>::infinity();
    int64_t j = 0;
    V mv = P::bcast(ninf);
    bool nan = false;
    for (; j + W <= n; j += W) {
      const V x = P::load(s + j);
      mv = P::max(mv, x);
      nan |= P::any_nan(x);
    }
    float m = P::hmax(mv);
    for (; j < n; ++j) {
      m = s[j] > m ? s[j] : m;
      nan |= s[j] != s[j];
    }
    for (int64_t t = n; t < nk; ++t) s[t] = 0.f;
    if (nan || m == std::numeric_limits<float>::infinity()) {
      for (int64_t t = 0; t < n; ++t) s[t] = 0.f;
      return std::numeric_limits<float>::quiet_NaN();
    }
    if (m == ninf) {  // every key masked out
      for (int64_t t = 0; t < n; ++t) s[t] = 0.f;
      return 0.f;
    }
    const V mb = P::bcast(m);
    V sv = P::zero();
    j = 0;
    for (; j + W <= n; j += W) {
      const V e = P::exp_nonpos(P::sub(P::load(s + j), mb));
      P::store(s + j, e);
      sv = P::add(sv, e);
    }
    float sum = P::hsum(sv);
    for (; j < n; ++j) {
      const float e = std::exp(s[j] - m);
      s[j] = e;
      sum += e;
    }
    return 1.f / sum;
  }

  template <class T>
  static void run(const AttnArgs& a, int64_t t0, int64_t t1, float* scratch) {
    const int64_t D = a.D, Dv = a.Dv, Lk = a.Lk;
    const int64_t npan = (Lk + NK - 1) / NK;
    const int64_t lds = npan * NK;
    float* kt = align64(scratch);
    float* vf = align64(kt + lds * D);
    float* s = align64(vf + (a.bf16 ? Lk * Dv : 0));
    float* qb = align64(s + MR * lds);
    float* rs = qb + MR * D;
    const int64_t nqc = (a.Lq + a.q_chunk - 1) / a.q_chunk;
    const int64_t group = a.H / a.Hkv;
    const T* q0 = static_cast<const T*>(a.q);
    const T* k0 = static_cast<const T*>(a.k);
    const T* v0 = static_cast<const T*>(a.v);
    T* out = static_cast<T*>(a.out);
    int64_t packed_bh = -1;  // the (b, kv head) whose K^T / v the scratch holds
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t qc = task % nqc, bh = task / nqc, h = bh % a.H, b = bh / a.H;
      const int64_t hk = h / group;
      const int64_t i0 = qc * a.q_chunk, i1 = i0 + a.q_chunk < a.Lq ? i0 + a.q_chunk : a.Lq;
      const T* kb = k0 + b * a.ks[0] + hk * a.ks[1];
      const T* vb = v0 + b * a.vs[0] + hk * a.vs[1];
      if (packed_bh != b * a.Hkv + hk) {
        packed_bh = b * a.Hkv + hk;
        for (int64_t p = 0; p < npan; ++p) {
          const int64_t n = Lk - p * NK < NK ? Lk - p * NK : NK;
          P::template pack_kt<NVS>(kb + p * NK * a.ks[2], a.ks[2], n, D, kt + p * D * NK);
        }
        if constexpr (sizeof(T) == 2) {
          for (int64_t j = 0; j < Lk; ++j) widen_row(vb + j * a.vs[2], Dv, vf + j * Dv);
        }
      }
      const float* vrows = a.bf16 ? vf : reinterpret_cast<const float*>(vb);
      const int64_t ldv = a.bf16 ? Dv : a.vs[2];
      const T* qh = q0 + b * a.qs[0] + h * a.qs[1];
      for (int64_t i = i0; i < i1; i += MR) {
        const int mr = i1 - i < MR ? int(i1 - i) : MR;
        for (int r = 0; r < MR; ++r) {
          if (r < mr) {
            scale_row(qh + (i + r) * a.qs[2], D, a.scale, qb + r * D);
          } else {
            for (int64_t d = 0; d < D; ++d) qb[r * D + d] = 0.f;
          }
        }
        // Keys any row of the tile sees.
        const int64_t nk = a.causal ? (i + mr < Lk ? i + mr : Lk) : Lk;
        const int64_t np = (nk + NK - 1) / NK;
        for (int64_t p = 0; p < np; ++p) s_tile(qb, D, kt + p * D * NK, s + p * NK, lds);
        for (int r = 0; r < MR; ++r) {
          float* sr = s + r * lds;
          if (r >= mr) {
            for (int64_t j = 0; j < nk; ++j) sr[j] = 0.f;
            rs[r] = 0.f;
            continue;
          }
          const int64_t n = a.causal ? (i + r + 1 < Lk ? i + r + 1 : Lk) : Lk;
          if (a.mask) add_mask(a, b, h, i + r, sr, n);
          rs[r] = softmax_row(sr, n, nk);
        }
        T* orow = out + ((b * a.Lq + i) * a.H + h) * Dv;
        const int64_t ldo = a.H * Dv;
        for (int64_t c = 0; c < Dv;) {
          const int64_t rem = Dv - c;
          if (rem > 2 * W) {
            const int64_t nc = rem < 4 * W ? rem : 4 * W;
            o_rows<4>(s, lds, nk, vrows, ldv, c, nc, rs, mr, orow, ldo);
            c += nc;
          } else if (rem > W) {
            o_rows<2>(s, lds, nk, vrows, ldv, c, rem, rs, mr, orow, ldo);
            c += rem;
          } else {
            o_rows<1>(s, lds, nk, vrows, ldv, c, rem, rs, mr, orow, ldo);
            c += rem;
          }
        }
      }
    }
  }
};

}  // namespace attn_detail

// Defines attention_<suffix> in a translation unit compiled for one ISA, over its policy.
#define SK_DEFINE_ATTENTION(suffix, Policy)                                            \
  void attention_##suffix(const AttnArgs& a, int64_t t0, int64_t t1, float* scratch) { \
    if (a.bf16) {                                                                      \
      attn_detail::Attention<Policy>::template run<uint16_t>(a, t0, t1, scratch);      \
    } else {                                                                           \
      attn_detail::Attention<Policy>::template run<float>(a, t0, t1, scratch);         \
    }                                                                                  \
  }

}  // namespace sparsekern::cpu
