// Autograd of the two forward ops (bsr_linear, balanced_linear) on every device whose kernels share these op
// names (CPU, and CUDA when built). It lives in C++ rather than in torch.library.register_autograd because a
// Python autograd kernel runs on every call made with grad mode on (the default in a user's nn.Module), even
// when nothing requires a gradient, and that per-call overhead is comparable to the whole work of a small sparse
// layer (numbers: docs/measurements.md, "Autograd of the forward ops in C++"). This kernel costs a flag check when
// no input needs a gradient.
//
// The backward is the same as the Triton ops' (sparse/triton_backend.py): the pre-activation is recomputed rather
// than kept alive, the activation's backward is the act_backward op (its formula in sparse/activations.py), then
// dX = grad_input op, dW = SDDMM op, db = sum.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <string>

#include "op_signatures.h"

namespace sparsekern {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// d act(z) / dz applied to grad.
at::Tensor act_backward(const at::Tensor& grad, const at::Tensor& z, const std::string& act) {
  return ops::act_backward().call(grad, z, act);
}

bool needs_grad(const at::Tensor& x, const at::Tensor& values, const std::optional<at::Tensor>& bias) {
  if (!at::GradMode::is_enabled()) return false;
  return x.requires_grad() || values.requires_grad() || (bias.has_value() && bias->requires_grad());
}

// ---------------------------------------------------------------------------------------------- block-sparse
class BsrLinearFn : public torch::autograd::Function<BsrLinearFn> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& values,
                            const at::Tensor& row_offsets, const at::Tensor& col_indices, const at::Tensor& col_offsets,
                            const at::Tensor& row_indices, const at::Tensor& block_perm, c10::SymInt out_features,
                            const std::optional<at::Tensor>& bias, c10::string_view activation) {
    ctx->saved_data["out_features"] = out_features;
    ctx->saved_data["in_features"] = x.sym_size(1);
    ctx->saved_data["activation"] = std::string(activation);
    ctx->saved_data["has_bias"] = bias.has_value();
    ctx->save_for_backward(
        {x, values, row_offsets, col_indices, col_offsets, row_indices, block_perm, bias.value_or(at::Tensor())});
    at::AutoDispatchBelowADInplaceOrView guard;
    return ops::bsr_linear().call(x, values, row_offsets, col_indices, col_offsets, row_indices, block_perm,
                                  std::move(out_features), bias, activation);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &values = saved[1], &row_offsets = saved[2], &col_indices = saved[3],
                     &col_offsets = saved[4], &row_indices = saved[5], &block_perm = saved[6];
    const std::optional<at::Tensor> bias =
        ctx->saved_data["has_bias"].toBool() ? std::optional<at::Tensor>(saved[7]) : std::nullopt;
    const std::string act = ctx->saved_data["activation"].toStringRef();
    variable_list out(10);
    at::Tensor grad = grads[0];
    if (!grad.defined()) return out;
    if (act != "none") {
      const at::Tensor z = ops::bsr_linear().call(x, values, row_offsets, col_indices, col_offsets, row_indices,
                                                  block_perm, ctx->saved_data["out_features"].toSymInt(), bias, "none");
      grad = act_backward(grad, z, act);
    }
    grad = grad.contiguous();
    if (ctx->needs_input_grad(0))
      out[0] = ops::bsr_linear_grad_input().call(grad, values, col_offsets, row_indices, block_perm,
                                                 ctx->saved_data["in_features"].toSymInt());
    if (ctx->needs_input_grad(1)) out[1] = ops::bsr_sddmm().call(grad, x, values, row_offsets, col_indices);
    if (bias.has_value() && ctx->needs_input_grad(7)) out[8] = grad.sum(0);  // edges: tensors only
    return out;
  }
};

at::Tensor bsr_linear_autograd(const at::Tensor& x, const at::Tensor& values, const at::Tensor& row_offsets,
                               const at::Tensor& col_indices, const at::Tensor& col_offsets,
                               const at::Tensor& row_indices, const at::Tensor& block_perm, c10::SymInt out_features,
                               const std::optional<at::Tensor>& bias, c10::string_view activation) {
  if (!needs_grad(x, values, bias)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return ops::bsr_linear().call(x, values, row_offsets, col_indices, col_offsets, row_indices, block_perm,
                                  std::move(out_features), bias, activation);
  }
  return BsrLinearFn::apply(x, values, row_offsets, col_indices, col_offsets, row_indices, block_perm,
                            std::move(out_features), bias, activation);
}

// ---------------------------------------------------------------------------------------------- balanced
class BalancedLinearFn : public torch::autograd::Function<BalancedLinearFn> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& values,
                            const at::Tensor& indices, int64_t bank, const std::optional<at::Tensor>& bias,
                            c10::string_view activation) {
    ctx->saved_data["bank"] = bank;
    ctx->saved_data["in_features"] = x.sym_size(1);
    ctx->saved_data["activation"] = std::string(activation);
    ctx->saved_data["has_bias"] = bias.has_value();
    ctx->save_for_backward({x, values, indices, bias.value_or(at::Tensor())});
    at::AutoDispatchBelowADInplaceOrView guard;
    return ops::balanced_linear().call(x, values, indices, bank, bias, activation);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &values = saved[1], &indices = saved[2];
    const std::optional<at::Tensor> bias =
        ctx->saved_data["has_bias"].toBool() ? std::optional<at::Tensor>(saved[3]) : std::nullopt;
    const int64_t bank = ctx->saved_data["bank"].toInt();
    const std::string act = ctx->saved_data["activation"].toStringRef();
    variable_list out(6);
    at::Tensor grad = grads[0];
    if (!grad.defined()) return out;
    if (act != "none")
      grad = act_backward(grad, ops::balanced_linear().call(x, values, indices, bank, bias, "none"), act);
    grad = grad.contiguous();
    if (ctx->needs_input_grad(0))
      out[0] = ops::balanced_linear_grad_input().call(grad, values, indices, bank,
                                                      ctx->saved_data["in_features"].toSymInt());
    if (ctx->needs_input_grad(1)) out[1] = ops::balanced_sddmm().call(grad, x, indices, bank);
    if (bias.has_value() && ctx->needs_input_grad(3)) out[4] = grad.sum(0);  // edges: tensors only
    return out;
  }
};

at::Tensor balanced_linear_autograd(const at::Tensor& x, const at::Tensor& values, const at::Tensor& indices,
                                    int64_t bank, const std::optional<at::Tensor>& bias, c10::string_view activation) {
  if (!needs_grad(x, values, bias)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return ops::balanced_linear().call(x, values, indices, bank, bias, activation);
  }
  return BalancedLinearFn::apply(x, values, indices, bank, bias, activation);
}

}  // namespace
}  // namespace sparsekern

TORCH_LIBRARY_IMPL(sparsekern, Autograd, m) {
  m.impl("bsr_linear", &sparsekern::bsr_linear_autograd);
  m.impl("balanced_linear", &sparsekern::balanced_linear_autograd);
}
