// Residual add + LayerNorm over rows, the output stage BERT-style blocks put after a projection:
//   out[t, :] = LayerNorm(y[t, :] + residual[t, :]) * gamma + beta   (statistics over the row, in float32).
// The raw-pointer interface between layer_norm.cpp (checks, threading) and the translation units compiled for
// one ISA each (layer_norm_avx512.cpp, layer_norm_avx2.cpp). The row routine is one template, vectorised by the
// compiler for each target (`omp simd` reductions): the rows are short (hundreds to thousands of features) and
// live in L1, so the three passes over a row cost little next to reading y and the residual once. No torch or STL
// headers and internal linkage only (see bsr_kernels.h): an AVX-512 instance must never reach the portable path.
#pragma once

#include <cmath>
#include <cstdint>

#include "epilogue.h"

namespace sparsekern::cpu {

struct ResidualLnArgs {
  int64_t n;  // features per row
  const void* y;
  int64_t ldy;
  const void* res;  // [T, n] with row stride ldr, or null (LayerNorm of y alone)
  int64_t ldr;
  const void* gamma;  // [n] or null (1)
  const void* beta;   // [n] or null (0)
  void* out;          // [T, n], row stride n
  bool bf16;          // every tensor bfloat16 (uint16 bits); else every tensor float32
  float eps;
};

// Rows [t0, t1). `scratch` holds n floats (the sums of bfloat16 rows, kept in float32 between the passes).
void residual_ln_avx512(const ResidualLnArgs& a, int64_t t0, int64_t t1, float* scratch);
void residual_ln_avx2(const ResidualLnArgs& a, int64_t t0, int64_t t1, float* scratch);
void residual_ln_baseline(const ResidualLnArgs& a, int64_t t0, int64_t t1, float* scratch);

namespace ln_detail {

template <bool kBf16>
static inline float load(const void* p, int64_t i) {
  if constexpr (kBf16) {
    return bf16_to_float(static_cast<const uint16_t*>(p)[i]);
  } else {
    return static_cast<const float*>(p)[i];
  }
}

// The body every ISA's translation unit instantiates. Two-pass statistics (mean, then the mean of squared
// deviations) as torch's reference formula, not E[x^2] - E[x]^2, which cancels for rows far from zero mean.
template <bool kBf16>
static inline void rows(const ResidualLnArgs& a, int64_t t0, int64_t t1, float* scratch) {
  const int64_t n = a.n;
  for (int64_t t = t0; t < t1; ++t) {
    const char* yr = static_cast<const char*>(a.y) + t * a.ldy * (kBf16 ? 2 : 4);
    const char* rr = a.res ? static_cast<const char*>(a.res) + t * a.ldr * (kBf16 ? 2 : 4) : nullptr;
    // float32 rows are summed into the output row itself; bfloat16 ones into scratch.
    float* v = kBf16 ? scratch : static_cast<float*>(a.out) + t * n;
    float sum = 0.f;
    if (rr) {
#pragma omp simd reduction(+ : sum)
      for (int64_t k = 0; k < n; ++k) {
        const float s = load<kBf16>(yr, k) + load<kBf16>(rr, k);
        v[k] = s;
        sum += s;
      }
    } else {
#pragma omp simd reduction(+ : sum)
      for (int64_t k = 0; k < n; ++k) {
        const float s = load<kBf16>(yr, k);
        v[k] = s;
        sum += s;
      }
    }
    const float mean = sum / float(n);
    float sq = 0.f;
#pragma omp simd reduction(+ : sq)
    for (int64_t k = 0; k < n; ++k) {
      const float d = v[k] - mean;
      sq += d * d;
    }
    const float rstd = 1.f / std::sqrt(sq / float(n) + a.eps);
    auto store = [&](int64_t k, float r) {
      if constexpr (kBf16) {
        static_cast<uint16_t*>(a.out)[t * n + k] = float_to_bf16(r);
      } else {
        static_cast<float*>(a.out)[t * n + k] = r;
      }
    };
    if (a.gamma && a.beta) {
#pragma omp simd
      for (int64_t k = 0; k < n; ++k)
        store(k, ((v[k] - mean) * rstd) * load<kBf16>(a.gamma, k) + load<kBf16>(a.beta, k));
    } else if (a.gamma) {
#pragma omp simd
      for (int64_t k = 0; k < n; ++k) store(k, ((v[k] - mean) * rstd) * load<kBf16>(a.gamma, k));
    } else {
#pragma omp simd
      for (int64_t k = 0; k < n; ++k) store(k, (v[k] - mean) * rstd + (a.beta ? load<kBf16>(a.beta, k) : 0.f));
    }
  }
}

}  // namespace ln_detail

// Defines residual_ln_<suffix> in a translation unit compiled for one ISA.
#define SK_DEFINE_RESIDUAL_LN(suffix)                                                          \
  void residual_ln_##suffix(const ResidualLnArgs& a, int64_t t0, int64_t t1, float* scratch) { \
    if (a.bf16) {                                                                              \
      ln_detail::rows<true>(a, t0, t1, scratch);                                               \
    } else {                                                                                   \
      ln_detail::rows<false>(a, t0, t1, scratch);                                              \
    }                                                                                          \
  }

}  // namespace sparsekern::cpu
