// The residual + LayerNorm rows (layer_norm.h) compiled for AVX2 + FMA; layer_norm.cpp calls it only when the
// running CPU has them.
#if defined(__x86_64__)
#pragma GCC target("avx2,fma")

#include "layer_norm.h"

namespace sparsekern::cpu {
SK_DEFINE_RESIDUAL_LN(avx2)
}  // namespace sparsekern::cpu

#endif
