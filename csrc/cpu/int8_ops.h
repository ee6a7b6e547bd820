// What the int8 ops share on the torch side (bsr_int8.cpp, balanced_int8.cpp): the checks of x and the bias, and
// the activation quantization pass.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace sparsekern::cpu {

// x [T, in] float32 or bfloat16 on the CPU, a bias [out] of its dtype: raises naming the bad value otherwise.
void int8_check_input(const at::Tensor& x, const std::optional<at::Tensor>& bias, int64_t out);

// Quantizes x [T, in] (features contiguous) to [T, ldxq] bytes and [T] scales (int8_kernels.h, Int8QuantArgs) with
// qmax and clip (0: per token), on the fastest quantizer the CPU runs: all of them give the same bytes.
void int8_quantize_rows(const at::Tensor& x, int qmax, double clip, int64_t ldxq, at::Tensor& xq, at::Tensor& xs);

}  // namespace sparsekern::cpu
