// AVX-VNNI INT8 block-sparse forward: vpdpbusd on ymm (the VEX encoding of AVX-VNNI, Alder Lake / Sierra Forest
// and later; Sapphire Rapids has it beside AVX512_VNNI), 4 u8 x s8 products added into each int32 lane in one
// instruction. Unlike int8_avx2.cpp's vpmaddubsw there is no int16 intermediate, so activations are 8-bit (qmax
// 127) and quantized by int8_quantize_avx2. Compiled for AVX2 + AVX-VNNI by the pragma below; bsr_int8.cpp calls
// this only when the CPU has AVX-VNNI and the cap allows it (isa.h). No torch/STL headers, internal linkage for
// every helper (see bsr_avx2.cpp).
//
// The loop structure is int8_avx512.cpp's with 8 outputs per ymm accumulator and 16 ymm registers: per group of
// 4 input features each token's 4 bytes are broadcast once (TT registers), then each 8-output slice of the
// block's [bo][4] bytes is loaded once and multiplied into the TT accumulators of that slice.
#if defined(__x86_64__)
#pragma GCC target("avx2,fma,avxvnni")

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "int8_tile_avx2.h"

namespace sparsekern::cpu {
namespace {

// Tokens per tile: TT * NV accumulators + TT broadcasts + one weight slice within the 16 ymm registers, and at
// least 10 accumulators where that fits (vpdpbusd: latency 5, two per cycle).
struct VnniDot {
  static __m256i madd(__m256i acc, __m256i x, __m256i w) { return _mm256_dpbusd_avx_epi32(acc, x, w); }
  template <int NV>
  static constexpr int tokens() {
    return NV == 1 ? 7 : NV == 2 ? 5 : NV <= 4 ? 3 : NV <= 6 ? 2 : 1;
  }
};

}  // namespace

void int8_fwd_avxvnni(const Int8FwdArgs& a, int64_t r0, int64_t r1) {
  fwd_avx2_family<VnniDot>(a, r0, r1);
}

}  // namespace sparsekern::cpu
#endif
