// sparsekern::residual_layer_norm on the CPU: LayerNorm(x + residual) over the last dimension in one pass over the
// rows, the output stage of BERT's *Output blocks (sparse/nn.py, ResidualLayerNorm). Eager PyTorch runs it as two
// ops, each a full pass through memory with a fresh [T, n] result: the add, then layer_norm. Here each thread takes
// a contiguous range of rows, so a row is read once (y and residual), normalised in L1 and written once.
// float32 and bfloat16 take the vectorised rows of layer_norm.h; float64 and float16 compute the same in aten.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "../checks.h"
#include "isa.h"
#include "layer_norm.h"
#include "parallel.h"

namespace sparsekern::cpu {

SK_DEFINE_RESIDUAL_LN(baseline)

namespace {

// Rows per chunk below which one thread does all: a row of a few hundred features is well under a microsecond.
constexpr int64_t kMinRowsPerThread = 16;

void check_param(const std::optional<at::Tensor>& p, const at::Tensor& x, int64_t n, const char* name) {
  if (!p) return;
  SK_CHECK_CPU(*p);
  TORCH_CHECK(p->scalar_type() == x.scalar_type(), name, " must have the dtype of x (", x.scalar_type(), "), got ",
              p->scalar_type());
  TORCH_CHECK(p->dim() == 1 && p->size(0) == n, name, " must have shape [", n, "] (the last dimension of x), got ",
              p->sizes());
}

at::Tensor residual_layer_norm_cpu(const at::Tensor& x, const std::optional<at::Tensor>& residual_in,
                                   const std::optional<at::Tensor>& weight_in, const std::optional<at::Tensor>& bias_in,
                                   double eps) {
  SK_CHECK_CPU(x);
  SK_CHECK_FLOATING(x);
  TORCH_CHECK(x.dim() >= 1, "x must have at least one dimension (the normalised features), got a scalar");
  TORCH_CHECK(eps >= 0 && std::isfinite(eps), "eps must be finite and >= 0, got ", eps);
  const int64_t n = x.size(-1);
  if (residual_in) {
    SK_CHECK_CPU(*residual_in);
    TORCH_CHECK(residual_in->scalar_type() == x.scalar_type(), "residual must have the dtype of x (", x.scalar_type(),
                "), got ", residual_in->scalar_type());
    TORCH_CHECK(residual_in->sizes() == x.sizes(), "residual must have the shape of x ", x.sizes(), ", got ",
                residual_in->sizes());
  }
  check_param(weight_in, x, n, "weight");
  check_param(bias_in, x, n, "bias");
  const auto st = x.scalar_type();
  if (st != at::kFloat && st != at::kBFloat16) {  // float64, float16: the same formula in aten
    const at::Tensor s = residual_in ? x + *residual_in : x;
    return at::layer_norm(s, {n}, weight_in, bias_in, eps);
  }
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  // Rows of x and the residual may be strided; the features must be contiguous.
  auto rows2d = [n](const at::Tensor& t) {
    at::Tensor r = t.dim() == 2 ? t : t.reshape({-1, n});
    return r.stride(-1) == 1 ? r : r.contiguous();
  };
  const at::Tensor x2 = rows2d(x);
  const at::Tensor res = residual_in ? rows2d(*residual_in) : at::Tensor();
  const at::Tensor w = weight_in ? weight_in->contiguous() : at::Tensor();
  const at::Tensor b = bias_in ? bias_in->contiguous() : at::Tensor();
  const int64_t T = x2.size(0);
  const ResidualLnArgs a{n,
                         x2.data_ptr(),
                         x2.stride(0),
                         res.defined() ? res.data_ptr() : nullptr,
                         res.defined() ? res.stride(0) : 0,
                         w.defined() ? w.data_ptr() : nullptr,
                         b.defined() ? b.data_ptr() : nullptr,
                         out.data_ptr(),
                         st == at::kBFloat16,
                         static_cast<float>(eps)};
  auto* rows = &residual_ln_baseline;
#if defined(__x86_64__)
  const Isa isa = active_isa();
  if (isa == Isa::Avx512) rows = &residual_ln_avx512;
  if (isa == Isa::Avx2) rows = &residual_ln_avx2;
#endif
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), T / kMinRowsPerThread));
  run_chunks(split_rows(nullptr, T, 1, 0, threads), [&](int64_t t0, int64_t t1) {
    std::vector<float> scratch(a.bf16 ? n : 0);
    rows(a, t0, t1, scratch.data());
  });
  return out;
}

}  // namespace
}  // namespace sparsekern::cpu

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) {
  m.impl("residual_layer_norm", &sparsekern::cpu::residual_layer_norm_cpu);
}
