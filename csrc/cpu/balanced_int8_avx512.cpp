// AVX-512 VBMI + VNNI INT8 balanced-sparse forward (vpermb gathers); the kernel is balanced_int8_avx512.h.
#if defined(__x86_64__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512vbmi,fma")
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#define SK_BAL_INT8_VBMI 1
#include "balanced_int8_avx512.h"

namespace sparsekern::cpu {

void balanced_int8_fwd_avx512(const BalInt8FwdArgs& a, int64_t g0, int64_t g1) {
  fwd_ntab<1>(a, g0, g1);
}

}  // namespace sparsekern::cpu
#endif
