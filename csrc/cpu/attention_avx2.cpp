// The attention kernel (attention.h) compiled for AVX2 + FMA (16 vector registers): S tiles of 6 query rows x 16
// keys (12 accumulators), O tiles of 3 rows x 32 features (or 6 x 16, 6 x 8 for narrower heads). attention.cpp
// calls it only when the running CPU has AVX2 and FMA.
#if defined(__x86_64__)
#pragma GCC target("avx2,fma")

#include "attention.h"
#include "tile_avx2.h"

namespace sparsekern::cpu {
namespace {

struct P256 {
  using V = __m256;
  static constexpr int W = 8;
  static constexpr int MR = 6;
  static constexpr int NVS = 2;
  template <int NVO>
  static constexpr int mro() {
    return NVO >= 4 ? 3 : 6;
  }
  static V zero() { return _mm256_setzero_ps(); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V load_n(const float* p, int64_t n) { return sparsekern::cpu::load_n(p, n); }
  static V load_n(const uint16_t* p, int64_t n) { return sparsekern::cpu::load_n(p, n); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static void store_n(float* p, V v, int64_t n) { sparsekern::cpu::store_n(p, v, n); }
  static void store_n(uint16_t* p, V v, int64_t n) { sparsekern::cpu::store_n(p, v, n); }
  static V bcast(float x) { return _mm256_set1_ps(x); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V max(V a, V b) { return _mm256_max_ps(a, b); }
  static float hmax(V v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
  }
  static float hsum(V v) { return sparsekern::cpu::hsum(v); }
  static bool any_nan(V v) { return _mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)) != 0; }
  static V exp_nonpos(V a) { return exp_nonpos_avx2(a); }
  template <int NV, class S>
  static void pack_kt(const S* src, int64_t ld, int64_t rows, int64_t cols, float* dst) {
    pack_transposed<NV>(src, ld, rows, cols, dst);
  }
};

}  // namespace

SK_DEFINE_ATTENTION(avx2, P256)

}  // namespace sparsekern::cpu

#endif
