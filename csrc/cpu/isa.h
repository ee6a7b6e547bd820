// Run-time choice of the CPU code path. The extension is built for baseline x86-64 (or any other target);
// AVX2 and AVX-512 kernels live in their own translation units compiled with target pragmas and are only
// called when the running CPU reports the features.
#pragma once

#include <string>

namespace sparsekern::cpu {

enum class Isa : int { Portable = 0, Avx2 = 1, Avx512 = 2 };

struct Features {
  bool avx2 = false, fma = false, avx512f = false, avx512bw = false, avx512vl = false, avx512bf16 = false;
};

const Features& features();
Isa best_isa();
// The path the kernels use: the best one, capped by set_isa_limit or the SPARSEKERN_ISA environment variable.
Isa active_isa();
const char* isa_name(Isa isa);
// Returns an error message, empty on success. Accepts "avx512", "avx2", "portable" or "auto".
std::string set_isa_limit(const std::string& name);

}  // namespace sparsekern::cpu
