// INT8 balanced-sparse forward on the CPU: checks, activation quantization (the block op's quantizers), the work
// split, the choice of kernel and a portable kernel. Layouts and the arithmetic: balanced_int8_kernels.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <optional>
#include <string>

#include "../checks.h"
#include "balanced_int8_kernels.h"
#include "epilogue.h"
#include "int8_kernels.h"
#include "int8_ops.h"
#include "isa.h"
#include "parallel.h"

namespace sparsekern::cpu {
namespace {

// Bound on in_features: |sum_c xq * q| <= 255 * 127 * in must fit int32 (and so must zp * w_sum).
constexpr int64_t kInt8MaxIn = 65536;

enum class Kernel { Portable, Avx2, AvxVnni, Avx512, Avx512Bw };

// Whether the CPU has AVX512_VBMI; SPARSEKERN_NO_VBMI=1 (read once) makes it answer no, which is how the tests run
// the kernel of an AVX-512 VNNI CPU without VBMI (Cascade Lake) on one that has it.
bool has_vbmi() {
#if defined(__x86_64__)
  static const bool vbmi = [] {
    const char* off = std::getenv("SPARSEKERN_NO_VBMI");
    return __builtin_cpu_supports("avx512vbmi") && !(off && std::string(off) == "1");
  }();
  return vbmi;
#else
  return false;
#endif
}

// The kernel for the activations int8_act_qmax() gives on this CPU's active path (int8_path() in bsr_int8.cpp):
// qmax 63 is AVX2's vpmaddubsw path; qmax 127 with AVX-512 and VNNI (as int8_path) the AVX-512 kernel, with vpermb
// where the CPU has VBMI; qmax 127 below AVX-512 is an AVX-VNNI path (ymm vpdpbusd) where the CPU has AVX-VNNI;
// anything else the portable kernel.
Kernel pick_kernel(int qmax) {
#if defined(__x86_64__)
  const Isa isa = active_isa();
  if (qmax <= 63 && isa >= Isa::Avx2) return Kernel::Avx2;
  if (qmax == 127 && isa == Isa::Avx512 && features().avx512vnni) return has_vbmi() ? Kernel::Avx512 : Kernel::Avx512Bw;
  if (qmax == 127 && isa == Isa::Avx2 && avxvnni_active()) return Kernel::AvxVnni;
#endif
  return Kernel::Portable;
}

void fwd_portable(const BalInt8FwdArgs& a, int64_t g0, int64_t g1) {
  const Act act = static_cast<Act>(a.act);
  const int64_t gstride = a.n_win * a.G * 64;
  for (int64_t g = g0; g < g1; ++g) {
    for (int64_t r = 0; r < kBalInt8Rows; ++r) {
      const int64_t o = g * kBalInt8Rows + r;
      if (o >= a.out) break;
      float b = 0.0f;
      if (a.bias) {
        b = a.y_bf16 ? bf16_to_float(static_cast<const uint16_t*>(a.bias)[o]) : static_cast<const float*>(a.bias)[o];
      }
      for (int64_t t = 0; t < a.T; ++t) {
        const uint8_t* xr = a.xq + t * a.ldxq;
        int32_t acc = 0;
        for (int64_t w = 0; w < a.n_win; ++w) {
          const uint8_t* xw = xr + w * a.window;
          for (int64_t q = 0; q < a.G; ++q) {
            const int64_t e = g * gstride + (w * a.G + q) * 64 + r * 4;
            for (int j = 0; j < 4; ++j) acc += int32_t(xw[a.idx[e + j]]) * int32_t(a.w[e + j]);
          }
        }
        const float s = float(acc - a.zp * a.w_sum[o]);
        const float z = apply_act(std::fma(s, a.w_scale[o] * a.x_scale[t], b), act);
        if (a.y_bf16) {
          static_cast<uint16_t*>(a.y)[t * a.out + o] = float_to_bf16(z);
        } else {
          static_cast<float*>(a.y)[t * a.out + o] = z;
        }
      }
    }
  }
}

at::Tensor balanced_linear_int8_cpu(const at::Tensor& x_in, const at::Tensor& qvalues, const at::Tensor& indices,
                                    const at::Tensor& w_scale, const at::Tensor& w_sum, int64_t out, int64_t window,
                                    const std::optional<at::Tensor>& bias_in, c10::string_view activation,
                                    double clip) {
  int8_check_input(x_in, bias_in, out);
  for (const auto* t : {&qvalues, &indices, &w_scale, &w_sum}) SK_CHECK_CPU(*t);
  TORCH_CHECK_VALUE(qvalues.scalar_type() == at::kChar, "qvalues must be int8, got ", qvalues.scalar_type());
  TORCH_CHECK_VALUE(indices.scalar_type() == at::kByte, "indices must be uint8, got ", indices.scalar_type());
  TORCH_CHECK_VALUE(w_scale.scalar_type() == at::kFloat, "w_scale must be float32, got ", w_scale.scalar_type());
  TORCH_CHECK_VALUE(w_sum.scalar_type() == at::kInt, "w_sum must be int32, got ", w_sum.scalar_type());
  TORCH_CHECK(out >= 0, "out_features must be non-negative, got ", out);
  const int64_t in = x_in.size(1);
  TORCH_CHECK(window >= 1 && window <= kBalInt8MaxWindow, "window must be in [1, ", kBalInt8MaxWindow, "], got ",
              window);
  TORCH_CHECK(in <= kInt8MaxIn, "the int8 kernels take at most ", kInt8MaxIn,
              " input features (int32 accumulation), got ", in);
  const int64_t R = (out + kBalInt8Rows - 1) / kBalInt8Rows, n_win = (in + window - 1) / window;
  TORCH_CHECK(qvalues.dim() == 5 && qvalues.size(0) == R && qvalues.size(1) == n_win && qvalues.size(3) == 16 &&
                  qvalues.size(4) == 4,
              "qvalues must have shape [ceil(out / 16) = ", R, ", ceil(in / window) = ", n_win, ", groups, 16, 4] for ",
              out, " outputs, ", in, " input features and window ", window, ", got ", qvalues.sizes());
  TORCH_CHECK(indices.sizes() == qvalues.sizes(), "indices must have the shape of qvalues ", qvalues.sizes(), ", got ",
              indices.sizes());
  TORCH_CHECK(qvalues.is_contiguous() && indices.is_contiguous(), "qvalues and indices must be contiguous");
  TORCH_CHECK(w_scale.dim() == 1 && w_scale.size(0) == out && w_scale.is_contiguous(), "w_scale must be a contiguous [",
              out, "] tensor, got shape ", w_scale.sizes());
  TORCH_CHECK(w_sum.dim() == 1 && w_sum.size(0) == out && w_sum.is_contiguous(), "w_sum must be a contiguous [", out,
              "] tensor, got shape ", w_sum.sizes());
  TORCH_CHECK(std::isfinite(clip) && clip >= 0, "clip must be finite and >= 0 (0: per-token scales), got ", clip);
  {
    // Every index inside its window: one branch-free pass, the search for the first bad one only when there is one.
    const uint8_t* p = indices.data_ptr<uint8_t>();
    const int64_t n = indices.numel();
    uint8_t mx = 0;
    for (int64_t i = 0; i < n; ++i) mx = std::max(mx, p[i]);
    if (mx >= window) {
      for (int64_t i = 0; i < n; ++i) {
        TORCH_CHECK(p[i] < window, "indices.flatten()[", i, "] = ", int(p[i]), " is out of range [0, window=", window,
                    ")");
      }
    }
  }
  const Act act = parse_activation(activation);
  const at::Tensor x = x_in.stride(1) == 1 && x_in.stride(0) >= in ? x_in : x_in.contiguous();
  const int64_t T = x.size(0);
  at::Tensor y = at::empty({T, out}, x.options());
  if (T == 0 || out == 0) return y;
  const at::Tensor bias = bias_in ? bias_in->contiguous() : at::Tensor();

  const int qmax = int8_act_qmax();
  const Kernel kernel_kind = pick_kernel(qmax);
  // Quantized rows: every window's 64-byte load inside the row, padded to a multiple of 64 bytes that is an odd
  // number of cache lines (rows 4 KiB apart alias in L1).
  int64_t ldxq = ((std::max(in, (n_win - 1) * window + kBalInt8MaxWindow) + 63) / 64) * 64;
  if ((ldxq / 64) % 2 == 0) ldxq += 64;
  at::Tensor xq, xs;
  int8_quantize_rows(x, qmax, clip, ldxq, xq, xs);

  const BalInt8FwdArgs a{out,
                         in,
                         window,
                         n_win,
                         qvalues.size(2),
                         T,
                         xq.data_ptr<uint8_t>(),
                         ldxq,
                         xs.data_ptr<float>(),
                         qmax + 1,
                         qvalues.data_ptr<int8_t>(),
                         indices.data_ptr<uint8_t>(),
                         w_scale.data_ptr<float>(),
                         w_sum.data_ptr<int32_t>(),
                         bias.defined() ? bias.data_ptr() : nullptr,
                         y.data_ptr(),
                         y.scalar_type() == at::kBFloat16,
                         static_cast<int>(act)};
  auto* kernel = &fwd_portable;
#if defined(__x86_64__)
  if (kernel_kind == Kernel::Avx512) kernel = &balanced_int8_fwd_avx512;
  if (kernel_kind == Kernel::Avx512Bw) kernel = &balanced_int8_fwd_avx512bw;
  if (kernel_kind == Kernel::Avx2) kernel = &balanced_int8_fwd_avx2;
  if (kernel_kind == Kernel::AvxVnni) kernel = &balanced_int8_fwd_avxvnni;
#endif
  // Every row group costs the same: an even split, one chunk per thread.
  const auto bounds = split_rows(nullptr, R, 0, 1, at::get_num_threads());
  run_chunks(bounds, [&](int64_t g0, int64_t g1) { kernel(a, g0, g1); });
  return y;
}

}  // namespace
}  // namespace sparsekern::cpu

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) {
  m.impl("balanced_linear_int8", &sparsekern::cpu::balanced_linear_int8_cpu);
}
