// The typed C++ signatures of the ops (schemas in ops.cpp), and their dispatcher handles, for the C++ code that
// calls ops through the dispatcher: the autograd kernels (autograd.cpp) and the direct Python entry points
// (python_calls.cpp). A schema change is made in ops.cpp and here; the compiler then points at every caller.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <string_view>

namespace sparsekern::ops {

using Tensor = at::Tensor;
using OptTensor = std::optional<at::Tensor>;

// sparsekern::bsr_linear(x, values, row_offsets, col_indices, col_offsets, row_indices, block_perm,
//                        out_features, bias, activation)
using BsrLinear = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                         const Tensor&, c10::SymInt, const OptTensor&, std::string_view);
// sparsekern::bsr_linear_grad_input(grad_out, values, col_offsets, row_indices, block_perm, in_features)
using BsrLinearGradInput = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                  c10::SymInt);
// sparsekern::bsr_sddmm(grad_out, x, values, row_offsets, col_indices)
using BsrSddmm = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&);
// sparsekern::balanced_linear(x, values, indices, bank, bias, activation)
using BalancedLinear = Tensor(const Tensor&, const Tensor&, const Tensor&, int64_t, const OptTensor&, std::string_view);
// sparsekern::balanced_linear_grad_input(grad_out, values, indices, bank, in_features)
using BalancedLinearGradInput = Tensor(const Tensor&, const Tensor&, const Tensor&, int64_t, c10::SymInt);
// sparsekern::balanced_sddmm(grad_out, x, indices, bank)
using BalancedSddmm = Tensor(const Tensor&, const Tensor&, const Tensor&, int64_t);
// sparsekern::bsr_linear_int8(x, qvalues, w_scale, w_sum, row_offsets, col_indices, out_features, block_cols, bias,
//                             activation, clip)
using BsrLinearInt8 = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                             c10::SymInt, int64_t, const OptTensor&, std::string_view, double);
// sparsekern::residual_layer_norm(x, residual, weight, bias, eps)
using ResidualLayerNorm = Tensor(const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, double);
// sparsekern::balanced_linear_int8(x, qvalues, indices, w_scale, w_sum, out_features, window, bias, activation,
//                                  clip)
using BalancedLinearInt8 = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                  c10::SymInt, int64_t, const OptTensor&, std::string_view, double);
// sparsekern::act_backward(grad, z, activation)
using ActBackward = Tensor(const Tensor&, const Tensor&, std::string_view);

// The dispatcher handle of sparsekern::<name> with signature Sig, looked up on first use.
template <typename Sig>
c10::TypedOperatorHandle<Sig> handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").template typed<Sig>();
}

// ops::bsr_linear() etc.: the handle of sparsekern::<name>, typed with Sig, looked up once.
#define SK_OP_HANDLE(name, Sig)                               \
  inline const c10::TypedOperatorHandle<Sig>& name() {        \
    static const auto op = handle<Sig>("sparsekern::" #name); \
    return op;                                                \
  }
SK_OP_HANDLE(bsr_linear, BsrLinear)
SK_OP_HANDLE(bsr_linear_grad_input, BsrLinearGradInput)
SK_OP_HANDLE(bsr_sddmm, BsrSddmm)
SK_OP_HANDLE(balanced_linear, BalancedLinear)
SK_OP_HANDLE(balanced_linear_grad_input, BalancedLinearGradInput)
SK_OP_HANDLE(balanced_sddmm, BalancedSddmm)
SK_OP_HANDLE(bsr_linear_int8, BsrLinearInt8)
SK_OP_HANDLE(residual_layer_norm, ResidualLayerNorm)
SK_OP_HANDLE(balanced_linear_int8, BalancedLinearInt8)
SK_OP_HANDLE(act_backward, ActBackward)
#undef SK_OP_HANDLE

}  // namespace sparsekern::ops
