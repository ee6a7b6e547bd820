#include "isa.h"

#include <atomic>
#include <cstdlib>

#if defined(__x86_64__) && defined(__linux__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace sparsekern::cpu {

namespace {

// The caps of SPARSEKERN_ISA and set_isa_limit, each allowing the features of those before it (isa.h).
enum class Level : int { Portable = 0, Avx2 = 1, AvxVnni = 2, Avx512 = 3 };

constexpr const char* kLevels = "'avx512', 'avxvnni', 'avx2', 'portable' or 'auto'";

bool parse(const std::string& name, Level* out, bool* is_auto) {
  *is_auto = false;
  if (name == "avx512") *out = Level::Avx512;
  else if (name == "avxvnni") *out = Level::AvxVnni;
  else if (name == "avx2") *out = Level::Avx2;
  else if (name == "portable") *out = Level::Portable;
  else if (name == "auto") *is_auto = true;
  else return false;
  return true;
}

Isa level_isa(Level level) {
  switch (level) {
    case Level::Avx512: return Isa::Avx512;
    case Level::AvxVnni:
    case Level::Avx2: return Isa::Avx2;
    default: return Isa::Portable;
  }
}

const char* env_value() {
  const char* env = std::getenv("SPARSEKERN_ISA");
  return env == nullptr ? "" : env;
}

// The level SPARSEKERN_ISA allows; Avx512 (no cap) when unset, "auto" or not a level (env_cap_error says so).
Level env_limit() {
  const std::string env = env_value();
  Level level;
  bool is_auto;
  if (env.empty() || !parse(env, &level, &is_auto) || is_auto) return Level::Avx512;
  return level;
}

// AMX-TILE and AMX-INT8 (CPUID leaf 7: EDX bits 24, 25) and the tile data state enabled by the OS and granted
// to this process: Linux gives it only on request (arch_prctl ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA, 18),
// process-wide; without it the first tile instruction faults.
// `bit`: 25 for AMX-INT8, 22 for AMX-BF16.
bool detect_amx(int bit) {
#if defined(__x86_64__) && defined(__linux__)
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  if (!((edx >> 24) & 1u) || !((edx >> bit) & 1u)) return false;
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  static const bool granted = syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  return granted;
#else
  (void)bit;
  return false;
#endif
}

Features detect() {
  Features f;
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
  __builtin_cpu_init();
  f.avx2 = __builtin_cpu_supports("avx2");
  f.fma = __builtin_cpu_supports("fma");
  f.avx512f = __builtin_cpu_supports("avx512f");
  f.avx512bw = __builtin_cpu_supports("avx512bw");
  f.avx512vl = __builtin_cpu_supports("avx512vl");
  f.avx512bf16 = __builtin_cpu_supports("avx512bf16");
  f.avx512vnni = __builtin_cpu_supports("avx512vnni");
  f.avxvnni = __builtin_cpu_supports("avxvnni");
#endif
  const Level cap = env_limit();
  f.amx_int8 = cap == Level::Avx512 && f.avx512vnni && detect_amx(25);
  f.amx_bf16 = cap == Level::Avx512 && f.avx512bf16 && detect_amx(22);
  if (cap < Level::Avx512) f.avx512f = f.avx512bw = f.avx512vl = f.avx512bf16 = f.avx512vnni = false;
  if (cap < Level::AvxVnni) f.avxvnni = false;
  if (cap < Level::Avx2) f.avx2 = f.fma = false;
  if (!(f.avx2 && f.fma)) f.avxvnni = false;  // the AVX-VNNI kernel is AVX2 code
  return f;
}

Isa detect_best() {
  const Features& f = features();
  if (f.avx512f && f.avx512bw && f.avx512vl && f.fma) return Isa::Avx512;
  if (f.avx2 && f.fma) return Isa::Avx2;
  return Isa::Portable;
}

// The runtime cap of set_isa_limit (a Level); the kernels read it once per call.
std::atomic<int> g_limit{static_cast<int>(Level::Avx512)};
std::atomic<bool> g_amx{true};

}  // namespace

const Features& features() {
  static const Features f = detect();
  return f;
}

Isa best_isa() {
  static const Isa best = detect_best();
  return best;
}

Isa active_isa() {
  int limit = static_cast<int>(level_isa(static_cast<Level>(g_limit.load(std::memory_order_relaxed))));
  int best = static_cast<int>(best_isa());
  return static_cast<Isa>(limit < best ? limit : best);
}

bool avxvnni_active() {
  return features().avxvnni && g_limit.load(std::memory_order_relaxed) >= static_cast<int>(Level::AvxVnni);
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    default: return "portable";
  }
}

std::string env_cap() {
  const std::string env = env_value();
  return env == "auto" ? "" : env;
}

std::string env_cap_error() {
  const std::string env = env_value();
  Level level;
  bool is_auto;
  if (env.empty() || parse(env, &level, &is_auto)) return "";
  return "SPARSEKERN_ISA='" + env + "' is not a code path: expected " + kLevels;
}

std::string set_isa_limit(const std::string& name) {
  Level level;
  bool is_auto;
  if (!parse(name, &level, &is_auto)) return "isa must be one of " + std::string(kLevels) + ", got '" + name + "'";
  if (is_auto) {
    g_limit.store(static_cast<int>(Level::Avx512));
    return "";
  }
  std::string why;
  if (static_cast<int>(level_isa(level)) > static_cast<int>(best_isa())) {
    why = std::string("best: ") + isa_name(best_isa());
  } else if (level == Level::AvxVnni && !features().avxvnni) {
    why = std::string("no AVX-VNNI; best: ") + isa_name(best_isa());
  }
  if (!why.empty()) {
    std::string msg = "isa '" + name + "' is not supported by this CPU (" + why;
    if (env_limit() < Level::Avx512) msg += std::string(", capped by SPARSEKERN_ISA=") + env_value();
    return msg + ")";
  }
  g_limit.store(static_cast<int>(level));
  return "";
}

bool amx_enabled() {
  return g_amx.load(std::memory_order_relaxed) && features().amx_int8;
}

bool amx_bf16_enabled() {
  return g_amx.load(std::memory_order_relaxed) && features().amx_bf16;
}

std::string set_amx_enabled(bool on) {
  if (on && !features().amx_int8 && !features().amx_bf16)
    return "AMX (AMX-INT8, AMX-BF16) is not available on this CPU (or SPARSEKERN_ISA caps it)";
  g_amx.store(on);
  return "";
}

}  // namespace sparsekern::cpu
