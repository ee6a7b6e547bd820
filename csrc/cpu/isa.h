// Run-time choice of the CPU code path. The extension is built for baseline x86-64 (or any other target);
// AVX2 and AVX-512 kernels live in their own translation units compiled with target pragmas and are only
// called when the running CPU reports the features.
//
// SPARSEKERN_ISA=avx2|avxvnni|portable (read once, at load) makes the extension see a CPU without the features
// above that level: features() reports them absent, best_isa() is capped, and set_isa_limit refuses a higher level
// with the same error an older CPU gives. That is how an AVX-512 machine runs what an AVX2-only one would.
//
// The levels, each allowing the features of those before it: portable; avx2 (AVX2 + FMA, no AVX-VNNI: a Zen 3);
// avxvnni (AVX2 + FMA + AVX-VNNI, no AVX-512: an Alder Lake or Sierra Forest); avx512. AVX-VNNI (ymm vpdpbusd)
// only changes the int8 kernel, so it is a flag beside the Isa, which avxvnni caps at Avx2.
#pragma once

#include <string>

namespace sparsekern::cpu {

enum class Isa : int { Portable = 0, Avx2 = 1, Avx512 = 2 };

struct Features {
  bool avx2 = false, fma = false, avx512f = false, avx512bw = false, avx512vl = false, avx512bf16 = false,
       avx512vnni = false, avxvnni = false;
  // AMX-TILE + AMX-INT8, and the kernel's permission to use the tile state granted to this process (Linux
  // arch_prctl ARCH_REQ_XCOMP_PERM); an AVX-512 feature for the cap (SPARSEKERN_ISA below avx512 removes it).
  bool amx_int8 = false;
  bool amx_bf16 = false;  // AMX-TILE + AMX-BF16, the same permission; needs AVX512_BF16 for the output stage
};

// The CPU's features, less those that SPARSEKERN_ISA removes.
const Features& features();
// The fastest path those features allow.
Isa best_isa();
// The path the kernels use: best_isa(), capped further by set_isa_limit.
Isa active_isa();
// Whether the kernels may use AVX-VNNI now: the CPU has it and neither SPARSEKERN_ISA nor set_isa_limit is below
// the avxvnni level.
bool avxvnni_active();
const char* isa_name(Isa isa);
// The SPARSEKERN_ISA value in force ("" when unset or "auto"), and an error for a value that is not a level.
std::string env_cap();
std::string env_cap_error();
// Returns an error message, empty on success. Accepts "avx512", "avxvnni", "avx2", "portable" or "auto";
// "avxvnni" needs a CPU with AVX-VNNI.
std::string set_isa_limit(const std::string& name);
// Whether the int8 kernels may use AMX where features().amx_int8 (default: yes); for tests and benchmarks, which
// compare the AMX and the AVX-512 VNNI kernels on one machine. Returns an error message, empty on success.
bool amx_enabled();
// The same for the bfloat16 block-sparse forward (features().amx_bf16); set_amx_enabled switches both.
bool amx_bf16_enabled();
std::string set_amx_enabled(bool on);

}  // namespace sparsekern::cpu
