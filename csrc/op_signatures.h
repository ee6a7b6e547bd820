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
using BalancedLinear = Tensor(const Tensor&, const Tensor&, const Tensor&, int64_t, const OptTensor&,
                              std::string_view);
// sparsekern::balanced_linear_grad_input(grad_out, values, indices, bank, in_features)
using BalancedLinearGradInput = Tensor(const Tensor&, const Tensor&, const Tensor&, int64_t, c10::SymInt);
// sparsekern::balanced_sddmm(grad_out, x, indices, bank)
using BalancedSddmm = Tensor(const Tensor&, const Tensor&, const Tensor&, int64_t);
// sparsekern::act_backward(grad, z, activation)
using ActBackward = Tensor(const Tensor&, const Tensor&, std::string_view);

// The dispatcher handle of sparsekern::<name> with signature Sig, looked up on first use.
template <typename Sig>
c10::TypedOperatorHandle<Sig> handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").template typed<Sig>();
}

inline const c10::TypedOperatorHandle<BsrLinear>& bsr_linear() {
  static const auto op = handle<BsrLinear>("sparsekern::bsr_linear");
  return op;
}
inline const c10::TypedOperatorHandle<BsrLinearGradInput>& bsr_linear_grad_input() {
  static const auto op = handle<BsrLinearGradInput>("sparsekern::bsr_linear_grad_input");
  return op;
}
inline const c10::TypedOperatorHandle<BsrSddmm>& bsr_sddmm() {
  static const auto op = handle<BsrSddmm>("sparsekern::bsr_sddmm");
  return op;
}
inline const c10::TypedOperatorHandle<BalancedLinear>& balanced_linear() {
  static const auto op = handle<BalancedLinear>("sparsekern::balanced_linear");
  return op;
}
inline const c10::TypedOperatorHandle<BalancedLinearGradInput>& balanced_linear_grad_input() {
  static const auto op = handle<BalancedLinearGradInput>("sparsekern::balanced_linear_grad_input");
  return op;
}
inline const c10::TypedOperatorHandle<BalancedSddmm>& balanced_sddmm() {
  static const auto op = handle<BalancedSddmm>("sparsekern::balanced_sddmm");
  return op;
}
inline const c10::TypedOperatorHandle<ActBackward>& act_backward() {
  static const auto op = handle<ActBackward>("sparsekern::act_backward");
  return op;
}

}  // namespace sparsekern::ops
