// Every op schema of the package, one comment per op. Implementations live in cpu/ (and cuda/); fake
// kernels are registered from Python (sparse/ops.py), autograd in autograd.cpp. The typed C++ signatures of the
// ops that C++ calls through the dispatcher are in op_signatures.h.
//
// Shapes: x [T, in]; Y [T, out]. Block-sparse weights hold `values` [nnz, bo, bi] (logical shape; the CPU
// kernels want the physical layout [nnz, bi, bo], i.e. strides (bo*bi, 1, bo), which the weight format builds
// once), block-row CSR metadata (row_offsets [n_brow+1], col_indices [nnz]) and the transposed, block-column
// metadata (col_offsets [n_bcol+1], row_indices [nnz], block_perm [nnz]: the k-th block of the column order is
// values[block_perm[k]]). Balanced weights hold values [out, n_banks, keep] and in-bank indices of the same
// shape (uint8 when bank <= 256, else int16).
#include <Python.h>
#include <torch/library.h>

#include "activations.h"
#include "cpu/int8_kernels.h"
#include "cpu/isa.h"

TORCH_LIBRARY(sparsekern, m) {
  // Y = act(X W^T + b) for a block-sparse W. The transposed metadata is not read by the forward kernel; it is
  // part of the schema so that the registered autograd can call bsr_linear_grad_input without rebuilding it.
  m.def(
      "bsr_linear(Tensor x, Tensor values, Tensor row_offsets, Tensor col_indices, Tensor col_offsets, "
      "Tensor row_indices, Tensor block_perm, SymInt out_features, Tensor? bias=None, str activation=\"none\") "
      "-> Tensor");
  // dX = dY W for a block-sparse W, walking W by block columns so that each thread owns its columns of dX.
  m.def(
      "bsr_linear_grad_input(Tensor grad_out, Tensor values, Tensor col_offsets, Tensor row_indices, "
      "Tensor block_perm, SymInt in_features) -> Tensor");
  // dW[kept blocks] = (dY^T X)[kept blocks] (SDDMM). The result has the shape and strides of `values`.
  m.def("bsr_sddmm(Tensor grad_out, Tensor x, Tensor values, Tensor row_offsets, Tensor col_indices) -> Tensor");
  // Y = act(X W^T + b) for a balanced-sparse W (each bank of `bank` columns keeps `keep` values).
  m.def(
      "balanced_linear(Tensor x, Tensor values, Tensor indices, int bank, Tensor? bias=None, "
      "str activation=\"none\") -> Tensor");
  // dX = dY W for a balanced-sparse W; in_features fixes the width of dX (the last bank may be ragged).
  m.def(
      "balanced_linear_grad_input(Tensor grad_out, Tensor values, Tensor indices, int bank, SymInt in_features) "
      "-> Tensor");
  // dW[o, b, k] = sum_t dY[t, o] X[t, b*bank + indices[o, b, k]] (SDDMM on the balanced pattern).
  m.def("balanced_sddmm(Tensor grad_out, Tensor x, Tensor indices, int bank) -> Tensor");
  // Packs a 2:4 balanced weight (bank=4, keep=2; values [out, in/4, 2] fp16/bf16, uint8 indices) for the sparse
  // tensor cores: (packed_values [out/16, in/32, 32, 8], packed_meta int32 [out/16, in/64, 32]). Call once.
  // CUDA builds only (cuda/ops_cuda.cpp); a CPU build has the schema and no kernel.
  m.def("nm24_pack(Tensor values, Tensor indices) -> (Tensor, Tensor)");
  // Y = act(X W^T + b) on sparse tensor cores from nm24_pack's output; x [T, in], returns [T, out]. CUDA only.
  m.def(
      "nm24_linear(Tensor x, Tensor packed_values, Tensor packed_meta, Tensor? bias=None, str activation=\"none\") "
      "-> Tensor");
  // Y = act(X W^T + b) for an int8 block-sparse W (qvalues [nnz, ceil(block_cols / 4), block_rows, 4], per-output
  // scales w_scale, per-output sums w_sum; layout and arithmetic: cpu/int8_kernels.h). X (float32 or bfloat16) is
  // quantized inside the op: per token (clip = 0) or with one static clip value. Inference only: no autograd.
  m.def(
      "bsr_linear_int8(Tensor x, Tensor qvalues, Tensor w_scale, Tensor w_sum, Tensor row_offsets, "
      "Tensor col_indices, SymInt out_features, int block_cols, Tensor? bias=None, str activation=\"none\", "
      "float clip=0.0) -> Tensor");
  // LayerNorm(x + residual) over the last dimension (weight, bias: [x.size(-1)]), in one pass over the rows: the
  // output stage of BERT's *Output blocks after a sparse projection (sparse/nn.py, ResidualLayerNorm). residual
  // None normalises x alone. Autograd: sparse/ops.py (aten's layer_norm backward; training is not its hot path).
  m.def(
      "residual_layer_norm(Tensor x, Tensor? residual, Tensor? weight=None, Tensor? bias=None, float eps=1e-05) "
      "-> Tensor");
  // Y = act(X W^T + b) for an int8 balanced-sparse W: qvalues and window-relative uint8 indices
  // [ceil(out / 16), ceil(in / window), groups, 16, 4] (each row's kept entries of a window of `window` <= 64
  // columns, in groups of 4), per-output scales w_scale and sums w_sum; layout and arithmetic:
  // cpu/balanced_int8_kernels.h. X is quantized inside the op as for bsr_linear_int8. Inference only: no autograd.
  m.def(
      "balanced_linear_int8(Tensor x, Tensor qvalues, Tensor indices, Tensor w_scale, Tensor w_sum, "
      "SymInt out_features, int window, Tensor? bias=None, str activation=\"none\", float clip=0.0) -> Tensor");
  // softmax(q k^T * scale + mask) v for q [B, H, Lq, D], k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv] (H a multiple of
  // Hkv: grouped-query heads share k and v), returned as [B, Lq, H, Dv], the layout the output projection reads.
  // mask: bool (true: attend) or floating (added), broadcastable to [B, H, Lq, Lk]; causal: query i sees keys
  // j <= i (top-left, as torch's SDPA). Rows with every key masked give 0. Autograd: sparse/ops.py.
  m.def("attention(Tensor q, Tensor k, Tensor v, Tensor? mask=None, float scale=1.0, bool causal=False) -> Tensor");
  // grad * act'(z): the activation's backward, as the backward of every forward op uses it. Its kernel is the
  // activation table of sparse/activations.py (CompositeImplicitAutograd, registered from Python), so it runs on
  // every device and torch.compile traces it into aten ops.
  m.def("act_backward(Tensor grad, Tensor z, str activation) -> Tensor");
}

namespace {

PyObject* py_cpu_features(PyObject*, PyObject*) {
  const auto& f = sparsekern::cpu::features();
  return Py_BuildValue("{s:O,s:O,s:O,s:O,s:O,s:O,s:O,s:O,s:O,s:O}", "avx2", f.avx2 ? Py_True : Py_False, "fma",
                       f.fma ? Py_True : Py_False, "avx512f", f.avx512f ? Py_True : Py_False, "avx512bw",
                       f.avx512bw ? Py_True : Py_False, "avx512vl", f.avx512vl ? Py_True : Py_False, "avx512bf16",
                       f.avx512bf16 ? Py_True : Py_False, "avx512vnni", f.avx512vnni ? Py_True : Py_False, "avxvnni",
                       f.avxvnni ? Py_True : Py_False, "amx_int8", f.amx_int8 ? Py_True : Py_False, "amx_bf16",
                       f.amx_bf16 ? Py_True : Py_False);
}

PyObject* py_get_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(sparsekern::cpu::isa_name(sparsekern::cpu::active_isa()));
}

PyObject* py_best_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(sparsekern::cpu::isa_name(sparsekern::cpu::best_isa()));
}

PyObject* py_set_isa(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) return nullptr;
  std::string err = sparsekern::cpu::set_isa_limit(name);
  if (!err.empty()) {
    PyErr_SetString(PyExc_ValueError, err.c_str());
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyObject* py_set_amx(PyObject*, PyObject* arg) {
  const int on = PyObject_IsTrue(arg);
  if (on < 0) return nullptr;
  std::string err = sparsekern::cpu::set_amx_enabled(on != 0);
  if (!err.empty()) {
    PyErr_SetString(PyExc_ValueError, err.c_str());
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyObject* py_amx_enabled(PyObject*, PyObject*) {
  return PyBool_FromLong(sparsekern::cpu::amx_enabled());
}

PyObject* py_isa_env(PyObject*, PyObject*) {
  const std::string cap = sparsekern::cpu::env_cap(), err = sparsekern::cpu::env_cap_error();
  return Py_BuildValue("(ss)", cap.c_str(), err.c_str());
}

PyObject* py_activation_names(PyObject*, PyObject*) {
  PyObject* t = PyTuple_New(sparsekern::kNumActivations);
  if (t == nullptr) return nullptr;
  for (int i = 0; i < sparsekern::kNumActivations; ++i) {
    PyObject* s = PyUnicode_FromString(sparsekern::act_name(i));
    if (s == nullptr) {
      Py_DECREF(t);
      return nullptr;
    }
    PyTuple_SET_ITEM(t, i, s);
  }
  return t;
}

PyObject* py_int8_act_qmax(PyObject*, PyObject*) {
  return PyLong_FromLong(sparsekern::cpu::int8_act_qmax());
}

PyObject* py_int8_kernel(PyObject*, PyObject*) {
  return PyUnicode_FromString(sparsekern::cpu::int8_kernel_name());
}

PyObject* py_has_cuda(PyObject*, PyObject*) {
#ifdef SPARSEKERN_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

PyMethodDef methods[] = {
    {"cpu_features", py_cpu_features, METH_NOARGS,
     "x86 features the CPU kernels can use on this machine (less those SPARSEKERN_ISA removes)."},
    {"get_isa", py_get_isa, METH_NOARGS, "The code path the CPU kernels take now: avx512, avx2 or portable."},
    {"best_isa", py_best_isa, METH_NOARGS, "The fastest code path this CPU supports (capped by SPARSEKERN_ISA)."},
    {"set_isa", py_set_isa, METH_O,
     "Cap the CPU code path ('avx512', 'avxvnni', 'avx2', 'portable' or 'auto'; avxvnni: AVX2 plus AVX-VNNI); "
     "for tests and benchmarks."},
    {"set_amx", py_set_amx, METH_O,
     "Let the int8 and the bfloat16 block-sparse forward kernels use AMX (True, the default where the CPU has "
     "AMX-INT8 / AMX-BF16) or not (the AVX-512 kernels); for tests and benchmarks."},
    {"amx_enabled", py_amx_enabled, METH_NOARGS, "Whether the int8 kernels use AMX now."},
    {"isa_env", py_isa_env, METH_NOARGS,
     "(SPARSEKERN_ISA as read at load, '' if unset or auto; an error message for a value that is no level, else '')."},
    {"activation_names", py_activation_names, METH_NOARGS,
     "The activations the kernels implement (csrc/activations.h), in the order of their codes."},
    {"int8_act_qmax", py_int8_act_qmax, METH_NOARGS,
     "The largest |quantized activation| of the int8 op on the active code path: 127, or 63 on AVX2 without VNNI."},
    {"int8_kernel", py_int8_kernel, METH_NOARGS,
     "The int8 kernel the active code path takes: avx512vnni, avxvnni, avx2 (vpmaddubsw) or portable."},
    {"has_cuda", py_has_cuda, METH_NOARGS, "Whether this build contains the CUDA kernels."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "sparsekern C++/CUDA kernels", -1, methods};

}  // namespace

namespace sparsekern {
extern PyMethodDef python_call_methods[];  // python_calls.cpp
}

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&module_def);
  if (m != nullptr && PyModule_AddFunctions(m, sparsekern::python_call_methods) != 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
