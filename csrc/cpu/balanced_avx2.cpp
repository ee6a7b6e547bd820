#include "balanced_kernels.h"
namespace sparsekern::cpu {
void balanced_fwd_avx2(const BalShape&, const void*, int64_t, int64_t, const void*, const void*, const void*, int, void*, int64_t, int64_t, float*) {}
void balanced_grad_input_avx2(const BalShape&, const void*, int64_t, int64_t, const void*, const void*, void*, int64_t, int64_t, float*) {}
void balanced_sddmm_avx2(const BalShape&, const void*, int64_t, const void*, int64_t, int64_t, const void*, void*, int64_t, int64_t, float*) {}
}
