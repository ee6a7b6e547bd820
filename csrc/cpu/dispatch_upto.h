// Run-time counts to compile-time ones for the vectorised kernels' tails: dispatch_upto<N>(n, f) calls f(Int<n>{})
// for n in [1, N]. Plain C++ in an unnamed namespace, so a translation unit compiled for one ISA gets its own copy.
#pragma once

#include <cstdint>

namespace sparsekern::cpu {
namespace {

template <int N>
struct Int {
  static constexpr int value = N;
};

// Calls f(Int<n>{}) for a run-time n in [1, N].
template <int N, typename F>
inline void dispatch_upto(int64_t n, const F& f) {
  if constexpr (N >= 1) {
    if (n == N) {
      f(Int<N>{});
    } else {
      dispatch_upto<N - 1>(n, f);
    }
  }
}

}  // namespace
}  // namespace sparsekern::cpu
