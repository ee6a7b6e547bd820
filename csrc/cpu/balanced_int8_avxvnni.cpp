// AVX-VNNI INT8 balanced-sparse forward (ymm vpdpbusd, 8-bit activations); the kernel is balanced_int8_avx2.h.
#if defined(__x86_64__)
#pragma GCC target("avx2,fma,avxvnni")
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#define SK_BAL_INT8_AVXVNNI 1
#include "balanced_int8_avx2.h"

namespace sparsekern::cpu {

void balanced_int8_fwd_avxvnni(const BalInt8FwdArgs& a, int64_t g0, int64_t g1) {
  switch ((a.window + 15) / 16) {
    case 1: return fwd_ntab<1>(a, g0, g1);
    case 2: return fwd_ntab<2>(a, g0, g1);
    case 3: return fwd_ntab<3>(a, g0, g1);
    default: return fwd_ntab<4>(a, g0, g1);
  }
}

}  // namespace sparsekern::cpu
#endif
