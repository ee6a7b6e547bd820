// Direct Python entry points to the forward ops, for the eager call path of sparse.linear.
//
// Before doing any work, `torch.ops.sparsekern.bsr_linear(...)` spends most of a small call's time in Python and
// in torch's generic op call (schema-driven parsing of every argument into an IValue stack, __torch_function__
// checks, the boxed call; numbers: docs/measurements.md, "The ops' direct entry points"). These functions parse
// the fixed argument list directly and make the typed dispatcher call, so everything below the dispatcher is the
// same: autograd (csrc/autograd.cpp), functorch, dispatch modes, the profiler.
//
// What they do not do is Python-level __torch_function__ handling: when any argument is not exactly a
// torch.Tensor, or a TorchFunctionMode is active, they return None without calling anything, and the caller
// takes torch.ops instead. torch.compile never sees them (sparse.linear calls them only outside compilation).
#include <Python.h>

#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <optional>
#include <string_view>

#include "op_signatures.h"

namespace sparsekern {
namespace {

// Tensor subclasses known to keep torch.Tensor's behaviour (their __torch_function__ is torch's disabled one):
// torch.nn.Parameter, registered from Python by sparse/ops.py. Any other subclass goes through torch.ops.
PyObject* g_plain_types[4] = {nullptr, nullptr, nullptr, nullptr};

// A tensor with no __torch_function__ in play: torch.Tensor or a registered plain subclass, and no
// TorchFunctionMode active (torch's own check, torch::check_has_torch_function, is not exported).
bool plain(PyObject* o) {
  if (at::impl::torch_function_mode_enabled()) return false;
  if (THPVariable_CheckExact(o)) return true;
  for (PyObject* t : g_plain_types)
    if (t != nullptr && reinterpret_cast<PyObject*>(Py_TYPE(o)) == t) return true;
  return false;
}

PyObject* register_plain_tensor_type(PyObject*, PyObject* type) {
  if (!PyType_Check(type) || !PyObject_IsSubclass(type, reinterpret_cast<PyObject*>(THPVariableClass))) {
    PyErr_SetString(PyExc_TypeError, "expected a subclass of torch.Tensor");
    return nullptr;
  }
  for (PyObject*& t : g_plain_types) {
    if (t == type) Py_RETURN_NONE;
    if (t == nullptr) {
      Py_INCREF(type);
      t = type;
      Py_RETURN_NONE;
    }
  }
  PyErr_SetString(PyExc_RuntimeError, "too many plain tensor types registered");
  return nullptr;
}

bool plain_or_none(PyObject* o) {
  return o == Py_None || plain(o);
}

std::optional<at::Tensor> optional_tensor(PyObject* o) {
  if (o == Py_None) return std::nullopt;
  return THPVariable_Unpack(o);
}

// Work (elements of x times output features) above which the GIL is released around the call, as torch.ops
// does; below it (a few microseconds of work) releasing and taking it back would cost more than it frees.
constexpr int64_t kReleaseGilWork = int64_t(1) << 22;

// Runs call() (returning the op's result), without the GIL when `work` is large, and wraps the result.
template <typename F>
PyObject* call_and_wrap(int64_t work, const F& call) {
  at::Tensor y;
  if (work >= kReleaseGilWork) {
    pybind11::gil_scoped_release no_gil;
    y = call();
  } else {
    y = call();
  }
  return THPVariable_Wrap(std::move(y));
}

PyObject* bsr_linear_call(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *x, *values, *row_offsets, *col_indices, *col_offsets, *row_indices, *block_perm, *bias;
  long long out_features;
  const char* activation;
  if (!PyArg_ParseTuple(args, "OOOOOOOLOs", &x, &values, &row_offsets, &col_indices, &col_offsets, &row_indices,
                        &block_perm, &out_features, &bias, &activation))
    return nullptr;
  for (PyObject* o : {x, values, row_offsets, col_indices, col_offsets, row_indices, block_perm})
    if (!plain(o)) Py_RETURN_NONE;
  if (!plain_or_none(bias)) Py_RETURN_NONE;
  const auto& op = ops::bsr_linear();
  const at::Tensor& xt = THPVariable_Unpack(x);
  const std::optional<at::Tensor> b = optional_tensor(bias);
  auto call = [&] {
    return op.call(xt, THPVariable_Unpack(values), THPVariable_Unpack(row_offsets), THPVariable_Unpack(col_indices),
                   THPVariable_Unpack(col_offsets), THPVariable_Unpack(row_indices), THPVariable_Unpack(block_perm),
                   c10::SymInt(out_features), b, std::string_view(activation));
  };
  return call_and_wrap(xt.numel() * out_features, call);
  END_HANDLE_TH_ERRORS
}

PyObject* balanced_linear_call(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *x, *values, *indices, *bias;
  long long bank;
  const char* activation;
  if (!PyArg_ParseTuple(args, "OOOLOs", &x, &values, &indices, &bank, &bias, &activation)) return nullptr;
  for (PyObject* o : {x, values, indices})
    if (!plain(o)) Py_RETURN_NONE;
  if (!plain_or_none(bias)) Py_RETURN_NONE;
  const auto& op = ops::balanced_linear();
  const at::Tensor& xt = THPVariable_Unpack(x);
  const at::Tensor& vt = THPVariable_Unpack(values);
  const std::optional<at::Tensor> b = optional_tensor(bias);
  auto call = [&] { return op.call(xt, vt, THPVariable_Unpack(indices), bank, b, std::string_view(activation)); };
  return call_and_wrap(xt.numel() * (vt.dim() > 0 ? vt.size(0) : 0), call);
  END_HANDLE_TH_ERRORS
}

PyObject* bsr_linear_int8_call(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *x, *qvalues, *w_scale, *w_sum, *row_offsets, *col_indices, *bias;
  long long out_features, block_cols;
  const char* activation;
  double clip;
  if (!PyArg_ParseTuple(args, "OOOOOOLLOsd", &x, &qvalues, &w_scale, &w_sum, &row_offsets, &col_indices, &out_features,
                        &block_cols, &bias, &activation, &clip))
    return nullptr;
  for (PyObject* o : {x, qvalues, w_scale, w_sum, row_offsets, col_indices})
    if (!plain(o)) Py_RETURN_NONE;
  if (!plain_or_none(bias)) Py_RETURN_NONE;
  const auto& op = ops::bsr_linear_int8();
  const at::Tensor& xt = THPVariable_Unpack(x);
  const std::optional<at::Tensor> b = optional_tensor(bias);
  auto call = [&] {
    return op.call(xt, THPVariable_Unpack(qvalues), THPVariable_Unpack(w_scale), THPVariable_Unpack(w_sum),
                   THPVariable_Unpack(row_offsets), THPVariable_Unpack(col_indices), c10::SymInt(out_features),
                   block_cols, b, std::string_view(activation), clip);
  };
  return call_and_wrap(xt.numel() * out_features, call);
  END_HANDLE_TH_ERRORS
}

PyObject* residual_layer_norm_call(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *x, *residual, *weight, *bias;
  double eps;
  if (!PyArg_ParseTuple(args, "OOOOd", &x, &residual, &weight, &bias, &eps)) return nullptr;
  if (!plain(x)) Py_RETURN_NONE;
  for (PyObject* o : {residual, weight, bias})
    if (!plain_or_none(o)) Py_RETURN_NONE;
  const auto& op = ops::residual_layer_norm();
  const at::Tensor& xt = THPVariable_Unpack(x);
  const std::optional<at::Tensor> r = optional_tensor(residual), w = optional_tensor(weight), b = optional_tensor(bias);
  // A LayerNorm pass is a few operations per element: weigh it like a 16-wide projection for the GIL.
  return call_and_wrap(xt.numel() * 16, [&] { return op.call(xt, r, w, b, eps); });
  END_HANDLE_TH_ERRORS
}

PyObject* balanced_linear_int8_call(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *x, *qvalues, *indices, *w_scale, *w_sum, *bias;
  long long out_features, window;
  const char* activation;
  double clip;
  if (!PyArg_ParseTuple(args, "OOOOOLLOsd", &x, &qvalues, &indices, &w_scale, &w_sum, &out_features, &window, &bias,
                        &activation, &clip))
    return nullptr;
  for (PyObject* o : {x, qvalues, indices, w_scale, w_sum})
    if (!plain(o)) Py_RETURN_NONE;
  if (!plain_or_none(bias)) Py_RETURN_NONE;
  const auto& op = ops::balanced_linear_int8();
  const at::Tensor& xt = THPVariable_Unpack(x);
  const std::optional<at::Tensor> b = optional_tensor(bias);
  auto call = [&] {
    return op.call(xt, THPVariable_Unpack(qvalues), THPVariable_Unpack(indices), THPVariable_Unpack(w_scale),
                   THPVariable_Unpack(w_sum), c10::SymInt(out_features), window, b, std::string_view(activation), clip);
  };
  return call_and_wrap(xt.numel() * out_features, call);
  END_HANDLE_TH_ERRORS
}

}  // namespace

PyMethodDef python_call_methods[] = {
    {"register_plain_tensor_type", register_plain_tensor_type, METH_O,
     "Let the *_call entry points take tensors of this torch.Tensor subclass (one that keeps torch.Tensor's "
     "__torch_function__, e.g. torch.nn.Parameter) instead of returning None for them."},
    {"bsr_linear_call", bsr_linear_call, METH_VARARGS,
     "torch.ops.sparsekern.bsr_linear with the same arguments, without the generic op-call overhead; None when a "
     "__torch_function__ override is in play (then call torch.ops)."},
    {"balanced_linear_call", balanced_linear_call, METH_VARARGS, "torch.ops.sparsekern.balanced_linear likewise."},
    {"bsr_linear_int8_call", bsr_linear_int8_call, METH_VARARGS, "torch.ops.sparsekern.bsr_linear_int8 likewise."},
    {"residual_layer_norm_call", residual_layer_norm_call, METH_VARARGS,
     "torch.ops.sparsekern.residual_layer_norm likewise."},
    {"balanced_linear_int8_call", balanced_linear_int8_call, METH_VARARGS,
     "torch.ops.sparsekern.balanced_linear_int8 likewise."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace sparsekern
