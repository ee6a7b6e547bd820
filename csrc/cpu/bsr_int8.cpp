// INT8 block-sparse forward on the CPU: checks, activation quantization, the work split, the choice of kernel
// and a portable kernel. Layouts and the arithmetic: int8_kernels.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <vector>

#include "../checks.h"
#include "epilogue.h"
#include "int8_kernels.h"
#include "int8_ops.h"
#include "isa.h"
#include "parallel.h"

namespace sparsekern::cpu {

enum class Int8Path { Portable, Avx2, AvxVnni, Avx512Vnni };
// AMX is a variant of the AVX-512 VNNI path (the same quantization, qmax 127), taken per call for the blocks and
// token counts it serves (int8_amx_fits, T >= 16) when the CPU has it and amx_enabled().

// zmm VNNI where AVX-512 is active, else ymm VNNI (AVX-VNNI, which an avx2 cap hides), else vpmaddubsw.
Int8Path int8_path() {
#if defined(__x86_64__)
  const Isa isa = active_isa();
  if (isa == Isa::Avx512 && features().avx512vnni) return Int8Path::Avx512Vnni;
  if (isa >= Isa::Avx2 && avxvnni_active()) return Int8Path::AvxVnni;
  if (isa >= Isa::Avx2) return Int8Path::Avx2;
#endif
  return Int8Path::Portable;
}

int int8_act_qmax() {
  return int8_path() == Int8Path::Avx2 ? 63 : 127;
}

const char* int8_kernel_name() {
  switch (int8_path()) {
    case Int8Path::Avx512Vnni: return "avx512vnni";
    case Int8Path::AvxVnni: return "avxvnni";
    case Int8Path::Avx2: return "avx2";
    default: return "portable";
  }
}

namespace {

// Bound on in_features: |sum_k xq * q| <= 255 * 127 * in must fit int32 (and so must zp * w_sum).
constexpr int64_t kInt8MaxIn = 65536;
// Largest int8 weight (bytes) the forward splits by tokens (see the work split in bsr_linear_int8_cpu).
constexpr int64_t kInt8TokenSplitBytes = 512 * 1024;

void quantize_portable(const Int8QuantArgs& a, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {
    auto at = [&](int64_t k) {
      return a.x_bf16 ? bf16_to_float(static_cast<const uint16_t*>(a.x)[t * a.ldx + k])
                      : static_cast<const float*>(a.x)[t * a.ldx + k];
    };
    uint32_t bits = 0;
    for (int64_t k = 0; k < a.in; ++k) {
      const float v = at(k);
      uint32_t b;
      std::memcpy(&b, &v, 4);
      b &= 0x7fffffffu;
      bits = b > bits ? b : bits;
    }
    float clip;
    std::memcpy(&clip, &bits, 4);
    const bool nan = bits > 0x7f800000u, inf = bits == 0x7f800000u;
    if (a.static_clip > 0) clip = a.static_clip;
    const float inv = float(a.qmax) / clip;
    uint8_t* q = a.xq + t * a.ldxq;
    if (nan || (a.static_clip <= 0 && inf) || !(inv <= 3.0e38f)) {
      a.scale[t] = nan || (a.static_clip <= 0 && inf) ? std::nanf("") : 0.0f;
      std::memset(q, a.qmax + 1, size_t(a.ldxq));
      continue;
    }
    a.scale[t] = clip / float(a.qmax);
    const float qm = float(a.qmax);
    for (int64_t k = 0; k < a.in; ++k) {
      const float v = std::fmin(std::fmax(at(k) * inv, -qm), qm);
      q[k] = uint8_t(int(std::nearbyint(v)) + a.qmax + 1);  // round to nearest even
    }
    std::memset(q + a.in, a.qmax + 1, size_t(a.ldxq - a.in));
  }
}

void fwd_portable(const Int8FwdArgs& a, int64_t r0, int64_t r1) {
  const int64_t bi4 = (a.bi + 3) / 4;
  std::vector<int32_t> acc(a.bo);
  const Act act = static_cast<Act>(a.act);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t o0 = r * a.bo, ob = std::min(a.bo, a.out - o0);
    for (int64_t t = 0; t < a.T; ++t) {
      std::fill(acc.begin(), acc.end(), 0);
      const uint8_t* xr = a.xq + t * a.ldxq;
      for (int64_t p = a.row_offsets[r]; p < a.row_offsets[r + 1]; ++p) {
        const int8_t* wb = a.w + p * bi4 * a.bo * 4;
        const uint8_t* xb = xr + int64_t(a.col_indices[p]) * a.bi;
        for (int64_t k = 0; k < 4 * bi4; ++k)
          for (int64_t o = 0; o < ob; ++o) acc[o] += int32_t(xb[k]) * int32_t(wb[(k / 4) * a.bo * 4 + o * 4 + k % 4]);
      }
      for (int64_t o = 0; o < ob; ++o) {
        const float s = float(acc[o] - a.zp * a.w_sum[o0 + o]);
        float b = 0.0f;
        if (a.bias) {
          b = a.y_bf16 ? bf16_to_float(static_cast<const uint16_t*>(a.bias)[o0 + o])
                       : static_cast<const float*>(a.bias)[o0 + o];
        }
        const float z = apply_act(std::fma(s, a.w_scale[o0 + o] * a.x_scale[t], b), act);
        if (a.y_bf16) {
          static_cast<uint16_t*>(a.y)[t * a.out + o0 + o] = float_to_bf16(z);
        } else {
          static_cast<float*>(a.y)[t * a.out + o0 + o] = z;
        }
      }
    }
  }
}

at::Tensor bsr_linear_int8_cpu(const at::Tensor& x_in, const at::Tensor& qvalues, const at::Tensor& w_scale,
                               const at::Tensor& w_sum, const at::Tensor& row_offsets, const at::Tensor& col_indices,
                               int64_t out, int64_t bi, const std::optional<at::Tensor>& bias_in,
                               c10::string_view activation, double clip) {
  int8_check_input(x_in, bias_in, out);
  SK_CHECK_CPU(qvalues);
  TORCH_CHECK_VALUE(qvalues.scalar_type() == at::kChar, "qvalues must be int8, got ", qvalues.scalar_type());
  TORCH_CHECK(qvalues.dim() == 4 && qvalues.size(3) == 4,
              "qvalues must have shape [nnz_blocks, ceil(block_cols / 4), block_rows, 4], got ", qvalues.sizes());
  TORCH_CHECK(qvalues.is_contiguous(), "qvalues must be contiguous");
  const int64_t in = x_in.size(1), bo = qvalues.size(2), nnz = qvalues.size(0);
  TORCH_CHECK(bi >= 1 && bo >= 1, "block shape must be positive, got (", bo, ", ", bi, ")");
  TORCH_CHECK(qvalues.size(1) == (bi + 3) / 4, "qvalues must hold ceil(block_cols / 4) = ", (bi + 3) / 4,
              " groups of 4 input features for block_cols = ", bi, ", got shape ", qvalues.sizes());
  TORCH_CHECK(out >= 0, "out_features must be non-negative, got ", out);
  TORCH_CHECK(bo <= std::max<int64_t>(out, 1) && bi <= std::max<int64_t>(in, 1), "block (", bo, ", ", bi,
              ") must not exceed the matrix [", out, ", ", in, "]");
  TORCH_CHECK(in <= kInt8MaxIn, "the int8 kernels take at most ", kInt8MaxIn,
              " input features (int32 accumulation), got ", in);
  TORCH_CHECK(nnz <= INT32_MAX, "at most 2^31-1 blocks are supported, got ", nnz);
  for (const auto* t : {&w_scale, &w_sum}) SK_CHECK_CPU(*t);
  TORCH_CHECK_VALUE(w_scale.scalar_type() == at::kFloat, "w_scale must be float32, got ", w_scale.scalar_type());
  TORCH_CHECK_VALUE(w_sum.scalar_type() == at::kInt, "w_sum must be int32, got ", w_sum.scalar_type());
  TORCH_CHECK(w_scale.dim() == 1 && w_scale.size(0) == out && w_scale.is_contiguous(), "w_scale must be a contiguous [",
              out, "] tensor, got shape ", w_scale.sizes());
  TORCH_CHECK(w_sum.dim() == 1 && w_sum.size(0) == out && w_sum.is_contiguous(), "w_sum must be a contiguous [", out,
              "] tensor, got shape ", w_sum.sizes());
  TORCH_CHECK(std::isfinite(clip) && clip >= 0, "clip must be finite and >= 0 (0: per-token scales), got ", clip);
  const int64_t n_brow = (out + bo - 1) / bo, n_bcol = (in + bi - 1) / bi;
  check_offsets(row_offsets, n_brow, nnz, "row_offsets");
  check_indices(col_indices, nnz, n_bcol, "col_indices");
  const Act act = parse_activation(activation);
  const at::Tensor x = x_in.stride(1) == 1 && x_in.stride(0) >= in ? x_in : x_in.contiguous();
  const int64_t T = x.size(0);
  at::Tensor y = at::empty({T, out}, x.options());
  if (T == 0 || out == 0) return y;
  const at::Tensor bias = bias_in ? bias_in->contiguous() : at::Tensor();

  const Int8Path path = int8_path();
  const int qmax = path == Int8Path::Avx2 ? 63 : 127;  // as int8_act_qmax, from the path read once
  // Quantized rows: every block column's features (the last one may run past `in`) and 3 more for the groups of 4,
  // padded to a multiple of 64 bytes that is an odd number of cache lines (rows 4 KiB apart alias in L1).
  int64_t ldxq = ((n_bcol * bi + 3 + 63) / 64) * 64;
  if ((ldxq / 64) % 2 == 0) ldxq += 64;
  at::Tensor xq, xs;
  int8_quantize_rows(x, qmax, clip, ldxq, xq, xs);

  const Int8FwdArgs a{out,
                      in,
                      bo,
                      bi,
                      T,
                      row_offsets.data_ptr<int32_t>(),
                      col_indices.data_ptr<int32_t>(),
                      xq.data_ptr<uint8_t>(),
                      ldxq,
                      xs.data_ptr<float>(),
                      qmax + 1,
                      qvalues.data_ptr<int8_t>(),
                      w_scale.data_ptr<float>(),
                      w_sum.data_ptr<int32_t>(),
                      bias.defined() ? bias.data_ptr() : nullptr,
                      y.data_ptr(),
                      y.scalar_type() == at::kBFloat16,
                      static_cast<int>(act)};
  auto* kernel = &fwd_portable;
#if defined(__x86_64__)
  if (path != Int8Path::Portable && bo <= kInt8FastMaxBlock) {
    kernel = path == Int8Path::Avx512Vnni ? &int8_fwd_avx512
             : path == Int8Path::AvxVnni  ? &int8_fwd_avxvnni
                                          : &int8_fwd_avx2;
  }
  if (path == Int8Path::Avx512Vnni && T >= 16 && int8_amx_fits(bo, bi) && amx_enabled()) kernel = &int8_fwd_amx;
#endif
  // Work split. By default block rows balanced by blocks, as the float forward's. When the int8 weight fits in a
  // quarter of a core's L2 and each thread gets at least 64 tokens, tokens instead (in multiples of 32, the AMX
  // kernel's tile pair): every thread runs every block row over its tokens with the whole weight in its L2, and the
  // split is exact where block rows balance only to within a row (768 outputs are 24 block rows of 32). The sums are
  // integers, so the outputs do not depend on the split.
  const int64_t threads = at::get_num_threads();
  if (threads >= 2 && T >= 64 * threads && qvalues.numel() <= kInt8TokenSplitBytes) {
    const int64_t es = a.y_bf16 ? 2 : 4;
    run_chunks(split_rows(nullptr, (T + 31) / 32, 1, 0, threads), [&](int64_t c0, int64_t c1) {
      Int8FwdArgs ac = a;
      const int64_t t0 = c0 * 32, t1 = std::min(T, c1 * 32);
      ac.T = t1 - t0;
      ac.xq = a.xq + t0 * ldxq;
      ac.x_scale = a.x_scale + t0;
      ac.y = static_cast<char*>(a.y) + t0 * out * es;
      kernel(ac, 0, n_brow);
    });
    return y;
  }
  const auto bounds = split_rows(a.row_offsets, n_brow, T * bo * bi, T * bo, threads);
  run_chunks(bounds, [&](int64_t r0, int64_t r1) { kernel(a, r0, r1); });
  return y;
}

}  // namespace

void int8_check_input(const at::Tensor& x, const std::optional<at::Tensor>& bias, int64_t out) {
  SK_CHECK_CPU(x);
  TORCH_CHECK(x.dim() == 2, "x must be 2-D [tokens, in_features], got shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "x must be float32 or bfloat16 for the int8 kernels, got ", x.scalar_type());
  if (!bias) return;
  SK_CHECK_CPU(*bias);
  TORCH_CHECK(bias->scalar_type() == x.scalar_type(), "bias must have x's dtype ", x.scalar_type(), ", got ",
              bias->scalar_type());
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out, "bias must have shape [", out, "], got ", bias->sizes());
}

void int8_quantize_rows(const at::Tensor& x, int qmax, double clip, int64_t ldxq, at::Tensor& xq, at::Tensor& xs) {
  const int64_t T = x.size(0), in = x.size(1);
  xq = at::empty({T, ldxq}, x.options().dtype(at::kByte));
  xs = at::empty({T}, x.options().dtype(at::kFloat));
  const Int8QuantArgs qa{in,
                         x.data_ptr(),
                         x.stride(0),
                         x.scalar_type() == at::kBFloat16,
                         qmax,
                         float(clip),
                         xq.data_ptr<uint8_t>(),
                         ldxq,
                         xs.data_ptr<float>()};
  auto* quantize = &quantize_portable;
#if defined(__x86_64__)
  if (active_isa() == Isa::Avx512 && features().avx512vnni) {  // compiled for AVX512_VNNI
    quantize = &int8_quantize_avx512;
  } else if (active_isa() >= Isa::Avx2) {
    quantize = &int8_quantize_avx2;
  }
#endif
  at::parallel_for(0, T, std::max<int64_t>(1, 32768 / std::max<int64_t>(in, 1)),
                   [&](int64_t t0, int64_t t1) { quantize(qa, t0, t1); });
}

}  // namespace sparsekern::cpu

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) {
  m.impl("bsr_linear_int8", &sparsekern::cpu::bsr_linear_int8_cpu);
}
