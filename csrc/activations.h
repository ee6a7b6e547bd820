// The activations a forward op applies in its output stage, after the bias: the one list the CPU kernels, the
// CUDA kernels and the op checks share. Its Python twin is sparse/activations.py (names in the same order, the
// torch reference and the backward); sparse checks at import that the two lists agree.
//
// Adding an activation: one X(...) row below (enum name, op name, scalar formula of `v` in type `T`), and its row
// in sparse/activations.py. The vectorised CPU epilogues have hand-written code for the first five; any other
// activation runs this scalar formula lane by lane there (correct, slower), until it gets vector code of its own.
//
// Plain C++ without torch or CUDA headers: it is included by the torch glue, by translation units compiled for
// AVX2/AVX-512 (hence static inline: an AVX-512 instance must never be linked into the portable path) and by nvcc.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstring>

#if defined(__CUDACC__)
#define SK_ACT_FN static __host__ __device__ __forceinline__
#else
#define SK_ACT_FN static inline
#endif

// X(enum name, op name, result for input v of floating type T)
#define SK_ACTIVATIONS(X)                                                                                         \
  X(None, "none", v)                                                                                              \
  X(Relu, "relu", v < T(0) ? T(0) : v) /* keeps NaN, as torch.relu does */                                        \
  X(Gelu, "gelu", T(0.5) * v * (T(1) + erf(v * T(0.70710678118654752440))))                                       \
  X(GeluTanh, "gelu_tanh", T(0.5) * v * (T(1) + tanh(T(0.79788456080286535588) * (v + T(0.044715) * v * v * v)))) \
  X(Silu, "silu", v / (T(1) + exp(-v)))                                                                           \
  X(QuickGelu, "quick_gelu", v / (T(1) + exp(T(-1.702) * v)))

namespace sparsekern {

enum class Act : int {
#define SK_ACT_ENUM(e, name, f) e,
  SK_ACTIVATIONS(SK_ACT_ENUM)
#undef SK_ACT_ENUM
};

#define SK_ACT_COUNT(e, name, f) +1
constexpr int kNumActivations = 0 SK_ACTIVATIONS(SK_ACT_COUNT);
#undef SK_ACT_COUNT

// The op name of each activation, in enum order.
SK_ACT_FN const char* act_name(int i) {
  constexpr const char* names[] = {
#define SK_ACT_NAME(e, name, f) name,
      SK_ACTIVATIONS(SK_ACT_NAME)
#undef SK_ACT_NAME
  };
  return i >= 0 && i < kNumActivations ? names[i] : "";
}

// The activation called name[0, len) (as the ops spell it: the whole string, a NUL inside it included); false
// when there is none.
static inline bool find_act(const char* name, std::size_t len, Act* out) {
  for (int i = 0; i < kNumActivations; ++i) {
    const char* n = act_name(i);
    if (std::strlen(n) == len && std::memcmp(name, n, len) == 0) {
      *out = static_cast<Act>(i);
      return true;
    }
  }
  return false;
}

// act(v) for float or double (the kernels' accumulation types).
template <typename T>
SK_ACT_FN T apply_act(T v, Act act) {
  using std::erf;
  using std::exp;
  using std::tanh;
  switch (act) {
#define SK_ACT_CASE(e, name, f) \
  case Act::e: return f;
    SK_ACTIVATIONS(SK_ACT_CASE)
#undef SK_ACT_CASE
  }
  return v;
}

}  // namespace sparsekern
