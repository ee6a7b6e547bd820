// Output-stage helpers shared by the portable and the vectorised CPU kernels. No torch headers: this file is
// included by translation units compiled for AVX2/AVX-512, which must not instantiate torch's inline code.
// Everything here has internal linkage (static): a weak symbol compiled for AVX-512 in one translation unit
// must never be picked by the linker for the portable path.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "../activations.h"

namespace sparsekern::cpu {

// Act and apply_act (the scalar activation formulas): csrc/activations.h.

// bfloat16 <-> float with round-to-nearest-even, NaN kept quiet (matches c10::BFloat16).
static inline float bf16_to_float(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

static inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

}  // namespace sparsekern::cpu
