// Per-thread scratch kept across calls: the kernels' packed operands and partial sums, so that a call allocates
// nothing once its thread's buffers are large enough. Internal linkage: each translation unit has its own buffers.
#pragma once

#include <cstdint>
#include <cstdlib>

namespace sparsekern::cpu {
namespace {

constexpr int kThreadBufSlots = 8;

// This thread's buffer `slot` (< kThreadBufSlots) of at least n floats (64-byte aligned), kept across calls; null
// if the allocation fails.
inline float* thread_buf(int slot, int64_t n) {
  struct Buf {
    float* p = nullptr;
    int64_t n = 0;
    ~Buf() { std::free(p); }
  };
  static thread_local Buf bufs[kThreadBufSlots];
  Buf& b = bufs[slot];
  if (b.n < n) {
    std::free(b.p);
    b.p = static_cast<float*>(std::aligned_alloc(64, size_t((n * 4 + 63) / 64 * 64)));
    b.n = b.p ? n : 0;
  }
  return b.p;
}

}  // namespace
}  // namespace sparsekern::cpu
