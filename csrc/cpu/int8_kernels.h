// INT8 block-sparse forward: the raw-pointer interface between bsr_int8.cpp (checks, quantization buffers,
// threading, the portable kernel) and the translation units compiled for one ISA each (int8_avx512.cpp: AVX-512
// VNNI vpdpbusd on zmm; int8_avxvnni.cpp: AVX-VNNI vpdpbusd on ymm; int8_avx2.cpp: AVX2 vpmaddubsw + vpmaddwd).
// No torch or STL headers (see bsr_kernels.h).
//
// Weights: int8, symmetric, one float scale per output channel: W[o, k] ~ w_scale[o] * q[o, k]. Each block is
// stored in groups of 4 input features: block p holds [bi4 = ceil(bi / 4)][bo][4] bytes, element (o, k) of the
// logical [bo, bi] block at w[p * bi4 * bo * 4 + (k / 4) * bo * 4 + o * 4 + k % 4]; the padding (k >= bi, and the
// parts of ragged edge blocks outside the matrix) is zero. w_sum[o] = sum_k q[o, k] over the kept entries.
//
// Activations: quantized per token (or with one static scale) to signed integers in [-qmax, qmax] (qmax = 127,
// or 63 where the instruction needs room, see int8_act_qmax) and stored offset by the zero point zp = qmax + 1 as
// unsigned bytes, [T][ldxq]; the features past `in` hold zp. Then
//   y[t, o] = act(x_scale[t] * w_scale[o] * (sum_k xq[t, k] * q[o, k] - zp * w_sum[o]) + bias[o]).
#pragma once

#include <cstdint>

namespace sparsekern::cpu {

struct Int8QuantArgs {
  int64_t in;
  const void* x;  // [T, in] float32 or bfloat16 (uint16 bits), row stride ldx, features contiguous
  int64_t ldx;
  bool x_bf16;
  int qmax;           // 127 or 63
  float static_clip;  // > 0: one clip value for every token (static quantization); 0: per token, max |x[t, :]|
  uint8_t* xq;        // [T, ldxq]
  int64_t ldxq;
  float* scale;  // [T]: clip / qmax; NaN for a token with NaN (or, per token, Inf) inputs
};

struct Int8FwdArgs {
  int64_t out, in, bo, bi, T;
  const int32_t* row_offsets;  // [n_block_rows + 1]
  const int32_t* col_indices;  // [nnz]
  const uint8_t* xq;           // [T, ldxq], see above
  int64_t ldxq;
  const float* x_scale;  // [T]
  int zp;                // qmax + 1
  const int8_t* w;       // [nnz][bi4][bo][4]
  const float* w_scale;  // [out]
  const int32_t* w_sum;  // [out]
  const void* bias;      // [out] in the output dtype, or null
  void* y;               // [T, out]
  bool y_bf16;
  int act;  // sparsekern::Act
};

// Largest block height (bo) of the vectorised kernels; taller blocks take the portable kernel.
constexpr int64_t kInt8FastMaxBlock = 64;

// The qmax the int8 op quantizes activations to on this CPU's active code path (bsr_int8.cpp): 127, or 63 on AVX2
// without VNNI (neither AVX512_VNNI nor AVX-VNNI).
int int8_act_qmax();
// The int8 kernel that code path takes: "avx512vnni", "avxvnni", "avx2" or "portable".
const char* int8_kernel_name();

// Quantizes the tokens [t0, t1).
void int8_quantize_avx512(const Int8QuantArgs& a, int64_t t0, int64_t t1);
void int8_quantize_avx2(const Int8QuantArgs& a, int64_t t0, int64_t t1);
// y for the block rows [r0, r1), every token. The AVX-512 kernel needs AVX512_VNNI and the AVX-VNNI kernel
// AVX-VNNI (quantized with int8_quantize_avx2), both with 8-bit activations (qmax 127); the AVX2 kernel needs
// qmax <= 63: vpmaddubsw adds two u8 x s8 products in a saturating int16, which 127 * 127 * 2 fits and
// 255 * 127 * 2 does not.
void int8_fwd_avx512(const Int8FwdArgs& a, int64_t r0, int64_t r1);
// The same with AMX tiles (tdpbusd) for the blocks int8_amx_fits, qmax 127; needs features().amx_int8.
bool int8_amx_fits(int64_t bo, int64_t bi);
void int8_fwd_amx(const Int8FwdArgs& a, int64_t r0, int64_t r1);
void int8_fwd_avxvnni(const Int8FwdArgs& a, int64_t r0, int64_t r1);
void int8_fwd_avx2(const Int8FwdArgs& a, int64_t r0, int64_t r1);

}  // namespace sparsekern::cpu
