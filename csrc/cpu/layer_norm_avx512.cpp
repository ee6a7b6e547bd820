// The residual + LayerNorm rows (layer_norm.h) compiled for AVX-512; layer_norm.cpp calls it only when the
// running CPU has AVX-512.
#if defined(__x86_64__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")

#include "layer_norm.h"

namespace sparsekern::cpu {
SK_DEFINE_RESIDUAL_LN(avx512)
}  // namespace sparsekern::cpu

#endif
