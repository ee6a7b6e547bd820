// INT8 balanced-sparse forward: the raw-pointer interface between balanced_int8.cpp (checks, activation
// quantization with the block op's quantizers, threading, the portable kernel) and the translation units compiled
// for one ISA each (balanced_int8_avx512.cpp: AVX-512 VBMI vpermb + VNNI vpdpbusd; balanced_int8_avx512bw.cpp:
// the same with vpshufb for CPUs without VBMI; balanced_int8_avx2.cpp: AVX2 vpshufb + vpmaddubsw;
// balanced_int8_avxvnni.cpp: the same with AVX-VNNI vpdpbusd). No torch or STL
// headers (see bsr_kernels.h). The arithmetic is int8_kernels.h's.
//
// Weights: int8, symmetric, one float scale per output channel: W[o, c] ~ w_scale[o] * q[o, c]. The columns are
// cut into windows of `window` (<= 64) consecutive columns, window w covering [w * window, (w + 1) * window). Each
// row's kept entries in a window are stored in G groups of 4 (G the same for every row and window: the padding
// entries have weight 0 and index 0), as bytes of the window-relative column. Rows are taken 16 at a time:
//   q, idx: [R = ceil(out / 16)][n_win = ceil(in / window)][G][16][4]
// entry j of group g of row o in window w at ((o / 16) * n_win * G + w * G + g) * 64 + (o % 16) * 4 + j; rows past
// `out` are padding. So one 64-byte vector holds 4 entries of 16 rows: a byte permute of the window's activations
// by the index vector gathers what vpdpbusd multiplies by the weight vector, one int32 lane per row.
// w_sum[o] = sum of row o's integers.
//
// Activations: quantized as for the block op (int8_kernels.h), [T][ldxq] with ldxq >= (n_win - 1) * window + 64
// so that every window's 64-byte load stays inside the row; the bytes past `in` hold the zero point. Then
//   y[t, o] = act(x_scale[t] * w_scale[o] * (sum_c xq[t, c] * q[o, c] - zp * w_sum[o]) + bias[o]).
#pragma once

#include <cstdint>

#include "int8_kernels.h"

namespace sparsekern::cpu {

// Rows per group of the weight layout above.
constexpr int64_t kBalInt8Rows = 16;
// Largest window: what a 64-byte register holds (vpermb's table).
constexpr int64_t kBalInt8MaxWindow = 64;

struct BalInt8FwdArgs {
  int64_t out, in, window, n_win, G, T;
  const uint8_t* xq;  // [T, ldxq]
  int64_t ldxq;
  const float* x_scale;  // [T]
  int zp;                // qmax + 1
  const int8_t* w;       // [R][n_win][G][16][4]
  const uint8_t* idx;    // same
  const float* w_scale;  // [out]
  const int32_t* w_sum;  // [out]
  const void* bias;      // [out] in the output dtype, or null
  void* y;               // [T, out]
  bool y_bf16;
  int act;  // sparsekern::Act
};

// y for the row groups [g0, g1), every token. The AVX-512 kernels need AVX512_VNNI (and AVX512_VBMI for the first)
// and 8-bit activations (qmax 127); the AVX2 kernel needs qmax <= 63 (vpmaddubsw, see int8_kernels.h).
void balanced_int8_fwd_avx512(const BalInt8FwdArgs& a, int64_t g0, int64_t g1);
void balanced_int8_fwd_avx512bw(const BalInt8FwdArgs& a, int64_t g0, int64_t g1);
void balanced_int8_fwd_avx2(const BalInt8FwdArgs& a, int64_t g0, int64_t g1);
// The AVX2 kernel with AVX-VNNI's ymm vpdpbusd in place of vpmaddubsw: any qmax (127 on an AVX-VNNI int8 path).
void balanced_int8_fwd_avxvnni(const BalInt8FwdArgs& a, int64_t g0, int64_t g1);

}  // namespace sparsekern::cpu
