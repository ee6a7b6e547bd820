// The attention kernel (attention.h) compiled for AVX-512: S tiles of 12 query rows x 32 keys (24 accumulators),
// O tiles of 6 rows x 64 features (or 12 x 32, 12 x 16 for narrower heads). attention.cpp calls it only when the
// running CPU has AVX-512.
#if defined(__x86_64__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")
// GCC 12 flags the intrinsics' deliberately undefined pass-through operand (_mm512_undefined_*): false positives.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

#include "attention.h"
#include "tile_avx512.h"

namespace sparsekern::cpu {
namespace {

struct P512 {
  using V = __m512;
  static constexpr int W = 16;
  static constexpr int MR = 12;
  static constexpr int NVS = 2;
  template <int NVO>
  static constexpr int mro() {
    return NVO >= 4 ? 6 : 12;
  }
  static V zero() { return _mm512_setzero_ps(); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V load_n(const float* p, int64_t n) {
    return n >= W ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(lane_mask(n), p);
  }
  static V load_n(const uint16_t* p, int64_t n) { return sparsekern::cpu::load_n(p, n); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static void store_n(float* p, V v, int64_t n) { sparsekern::cpu::store_n(p, v, n); }
  static void store_n(uint16_t* p, V v, int64_t n) { sparsekern::cpu::store_n(p, v, n); }
  static V bcast(float x) { return _mm512_set1_ps(x); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V max(V a, V b) { return _mm512_max_ps(a, b); }
  static float hmax(V v) { return _mm512_reduce_max_ps(v); }
  static float hsum(V v) { return _mm512_reduce_add_ps(v); }
  static bool any_nan(V v) { return _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) != 0; }
  static V exp_nonpos(V a) { return exp_nonpos_avx512(a); }
  template <int NV, class S>
  static void pack_kt(const S* src, int64_t ld, int64_t rows, int64_t cols, float* dst) {
    pack_transposed<NV>(src, ld, rows, cols, dst);
  }
};

}  // namespace

SK_DEFINE_ATTENTION(avx512, P512)

}  // namespace sparsekern::cpu

#endif
