// Thin torch launcher for the CUDA kernels: checks shapes, dtypes and devices, allocates outputs, passes raw
// pointers and the current stream, and turns a returned cudaError_t into a TORCH_CHECK.
//
// Registers the CUDA implementation of the package's ops (schemas in csrc/ops.cpp) and two CUDA-only ops for
// 2:4 sparsity on sparse tensor cores (defined here, because they exist only in CUDA builds):
//   nm24_pack(values, indices) -> (packed_values, packed_meta): a balanced weight with bank=4, keep=2 (values
//       [out, in/4, 2] fp16/bf16, indices uint8) packed ONCE into the register layout of mma.sp (nm24_layout.h).
//   nm24_linear(x, packed_values, packed_meta, bias=None, activation="none") -> act(x W^T + bias) [T, out].
// Block-sparse weights with 1x1 blocks (unstructured sparsity) take the CSR kernels of csr.cu (csr_route).
// The block-sparse metadata (offsets, indices) is not re-validated here: reading it on the host would
// synchronise the stream on every call. The weight formats validate it once, when the weight is built.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdlib>
#include <optional>
#include <string>
#include <tuple>

#include "../checks.h"
#include "kernels.h"
#include "nm24_layout.h"

namespace sparsekern::cuda {
namespace {

#define SK_CHECK_CUDA(t) TORCH_CHECK((t).is_cuda(), #t " must be a CUDA tensor, got device ", (t).device())

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "sparsekern::", op, ": CUDA kernel failed: ", cudaGetErrorString(err));
}

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::F32;
    case at::kDouble: return DType::F64;
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    default: TORCH_CHECK(false, "expected float32, float64, bfloat16 or float16, got ", t.scalar_type());
  }
}

Act act_of(c10::string_view name) {
  return parse_activation(name);
}

// A 2-D activation [T, features] on `like`'s device and dtype, rows possibly strided, features contiguous.
at::Tensor dense_input(const at::Tensor& t, const at::Tensor& like, int64_t features, const char* name) {
  SK_CHECK_CUDA(t);
  TORCH_CHECK(t.dim() == 2, name, " must be 2-D [tokens, features], got shape ", t.sizes());
  TORCH_CHECK(t.device() == like.device(), name, " is on ", t.device(), " but the weight is on ", like.device());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, " and the weight must have the same dtype, got ",
              t.scalar_type(), " and ", like.scalar_type());
  TORCH_CHECK(t.size(1) == features, name, " must have ", features, " features in its last dimension, got shape ",
              t.sizes());
  return t.stride(1) == 1 && t.stride(0) >= t.size(1) ? t : t.contiguous();
}

void check_meta(const at::Tensor& t, const at::Tensor& values, int64_t n, const char* name) {
  TORCH_CHECK(t.device() == values.device(), name, " is on ", t.device(), " but values are on ", values.device());
  TORCH_CHECK(t.scalar_type() == at::kInt && t.dim() == 1 && t.numel() == n && t.is_contiguous(), name,
              " must be a contiguous 1-D int32 tensor of ", n, " entries, got ", t.scalar_type(), " ", t.sizes());
}

const void* bias_ptr(const std::optional<at::Tensor>& bias, const at::Tensor& values, int64_t out, at::Tensor& keep) {
  if (!bias) return nullptr;
  TORCH_CHECK(bias->device() == values.device() && bias->scalar_type() == values.scalar_type(), "bias must be ",
              values.scalar_type(), " on ", values.device(), ", got ", bias->scalar_type(), " on ", bias->device());
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out, "bias must have shape [", out, "], got ", bias->sizes());
  keep = bias->contiguous();
  return keep.data_ptr();
}

// values [nnz, bo, bi] in the kernels' layout: strides (bo*bi, 1, bo).
at::Tensor bsr_values(const at::Tensor& values) {
  SK_CHECK_CUDA(values);
  TORCH_CHECK(values.dim() == 3, "values must have shape [nnz_blocks, block_rows, block_cols], got ", values.sizes());
  dtype_of(values);
  const int64_t bo = values.size(1), bi = values.size(2);
  TORCH_CHECK(bo >= 1 && bi >= 1, "block shape must be positive, got (", bo, ", ", bi, ")");
  if (values.size(0) == 0 || (values.stride(0) == bo * bi && values.stride(1) == 1 && values.stride(2) == bo))
    return values;
  return values.transpose(1, 2).contiguous().transpose(1, 2);
}

// 1x1 blocks (unstructured sparsity) take csr.cu's kernels, unless SPARSEKERN_CUDA_CSR=off (kernels.h); `ws`
// receives their workspace. Returns CsrKernel::Off for every other block shape.
CsrKernel csr_route(const BsrShape& s, CsrOp op, const at::Tensor& like, at::Tensor& ws) {
  if (s.bo != 1 || s.bi != 1) return CsrKernel::Off;
  const CsrKernel k = csr_kernel_from_env();
  TORCH_CHECK(k != CsrKernel::Invalid, "SPARSEKERN_CUDA_CSR must be auto, off, gemv, narrow or wide, got '",
              std::getenv("SPARSEKERN_CUDA_CSR"), "'");
  if (k == CsrKernel::Off) return k;
  const size_t bytes = csr_workspace_bytes(op, k, dtype_of(like), s);
  if (bytes > 0) ws = at::empty({int64_t(bytes)}, like.options().dtype(at::kByte));
  return k;
}

void* ws_ptr(const at::Tensor& ws) {
  return ws.defined() ? ws.data_ptr() : nullptr;
}

size_t ws_size(const at::Tensor& ws) {
  return ws.defined() ? size_t(ws.numel()) : 0;
}

at::Tensor bsr_linear_cuda(const at::Tensor& x_in, const at::Tensor& values_in, const at::Tensor& row_offsets,
                           const at::Tensor& col_indices, const at::Tensor& col_offsets, const at::Tensor& row_indices,
                           const at::Tensor& block_perm, int64_t out_features, const std::optional<at::Tensor>& bias,
                           c10::string_view activation) {
  (void)col_offsets, (void)row_indices, (void)block_perm;  // used by the registered backward only
  const at::Tensor values = bsr_values(values_in);
  TORCH_CHECK(x_in.dim() == 2, "x must be 2-D [tokens, in_features], got shape ", x_in.sizes());
  const at::Tensor x = dense_input(x_in, values, x_in.size(1), "x");
  const BsrShape s{x.size(0), out_features, x.size(1), values.size(1), values.size(2), values.size(0)};
  TORCH_CHECK(s.out >= 0, "out_features must be non-negative, got ", s.out);
  check_meta(row_offsets, values, (s.out + s.bo - 1) / s.bo + 1, "row_offsets");
  check_meta(col_indices, values, s.nnz, "col_indices");
  const Act act = act_of(activation);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor keep_bias;
  const void* bp = bias_ptr(bias, values, s.out, keep_bias);
  at::Tensor y = at::empty({s.T, s.out}, x.options());
  at::Tensor ws;
  const CsrKernel ck = csr_route(s, CsrOp::Linear, x, ws);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int32_t *ro = row_offsets.data_ptr<int32_t>(), *ci = col_indices.data_ptr<int32_t>();
  check_launch(ck != CsrKernel::Off ? csr_linear(ck, dtype_of(x), s, x.data_ptr(), x.stride(0), values.data_ptr(), ro,
                                                 ci, bp, act, y.data_ptr(), ws_ptr(ws), ws_size(ws), stream)
                                    : bsr_linear(dtype_of(x), s, x.data_ptr(), x.stride(0), values.data_ptr(), ro, ci,
                                                 bp, act, y.data_ptr(), stream),
               "bsr_linear");
  return y;
}

at::Tensor bsr_linear_grad_input_cuda(const at::Tensor& dy_in, const at::Tensor& values_in,
                                      const at::Tensor& col_offsets, const at::Tensor& row_indices,
                                      const at::Tensor& block_perm, int64_t in_features) {
  const at::Tensor values = bsr_values(values_in);
  TORCH_CHECK(dy_in.dim() == 2, "grad_out must be 2-D [tokens, out_features], got shape ", dy_in.sizes());
  const at::Tensor dy = dense_input(dy_in, values, dy_in.size(1), "grad_out");
  const BsrShape s{dy.size(0), dy.size(1), in_features, values.size(1), values.size(2), values.size(0)};
  TORCH_CHECK(s.in >= 0, "in_features must be non-negative, got ", s.in);
  check_meta(col_offsets, values, (s.in + s.bi - 1) / s.bi + 1, "col_offsets");
  check_meta(row_indices, values, s.nnz, "row_indices");
  check_meta(block_perm, values, s.nnz, "block_perm");
  const c10::cuda::CUDAGuard guard(dy.device());
  at::Tensor dx = at::empty({s.T, s.in}, dy.options());
  at::Tensor ws;
  const CsrKernel ck = csr_route(s, CsrOp::GradInput, dy, ws);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int32_t *co = col_offsets.data_ptr<int32_t>(), *ri = row_indices.data_ptr<int32_t>(),
                *bp = block_perm.data_ptr<int32_t>();
  check_launch(ck != CsrKernel::Off
                   ? csr_linear_grad_input(ck, dtype_of(dy), s, dy.data_ptr(), dy.stride(0), values.data_ptr(), co, ri,
                                           bp, dx.data_ptr(), ws_ptr(ws), ws_size(ws), stream)
                   : bsr_linear_grad_input(dtype_of(dy), s, dy.data_ptr(), dy.stride(0), values.data_ptr(), co, ri, bp,
                                           dx.data_ptr(), stream),
               "bsr_linear_grad_input");
  return dx;
}

at::Tensor bsr_sddmm_cuda(const at::Tensor& dy_in, const at::Tensor& x_in, const at::Tensor& values_in,
                          const at::Tensor& row_offsets, const at::Tensor& col_indices) {
  const at::Tensor values = bsr_values(values_in);
  TORCH_CHECK(dy_in.dim() == 2 && x_in.dim() == 2, "grad_out and x must be 2-D, got shapes ", dy_in.sizes(), " and ",
              x_in.sizes());
  TORCH_CHECK(dy_in.size(0) == x_in.size(0), "grad_out and x must have the same number of tokens, got ", dy_in.size(0),
              " and ", x_in.size(0));
  const at::Tensor dy = dense_input(dy_in, values, dy_in.size(1), "grad_out");
  const at::Tensor x = dense_input(x_in, values, x_in.size(1), "x");
  const BsrShape s{x.size(0), dy.size(1), x.size(1), values.size(1), values.size(2), values.size(0)};
  check_meta(row_offsets, values, (s.out + s.bo - 1) / s.bo + 1, "row_offsets");
  check_meta(col_indices, values, s.nnz, "col_indices");
  const c10::cuda::CUDAGuard guard(x.device());
  // The gradient has the shape and strides of values (the parameter's own layout, which the kernels write).
  at::Tensor dw = at::empty_like(values);
  at::Tensor ws;
  const CsrKernel ck = csr_route(s, CsrOp::Sddmm, x, ws);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int32_t *ro = row_offsets.data_ptr<int32_t>(), *ci = col_indices.data_ptr<int32_t>();
  check_launch(ck != CsrKernel::Off ? csr_sddmm(ck, dtype_of(x), s, dy.data_ptr(), dy.stride(0), x.data_ptr(),
                                                x.stride(0), ro, ci, dw.data_ptr(), ws_ptr(ws), ws_size(ws), stream)
                                    : bsr_sddmm(dtype_of(x), s, dy.data_ptr(), dy.stride(0), x.data_ptr(), x.stride(0),
                                                ro, ci, dw.data_ptr(), stream),
               "bsr_sddmm");
  return dw;
}

BalShape balanced_shape(const at::Tensor& values, const at::Tensor& indices, int64_t bank, int64_t in, int64_t T) {
  SK_CHECK_CUDA(values);
  dtype_of(values);
  TORCH_CHECK(values.dim() == 3, "values must have shape [out_features, n_banks, keep], got ", values.sizes());
  TORCH_CHECK(indices.sizes() == values.sizes(), "indices must have the shape of values ", values.sizes(), ", got ",
              indices.sizes());
  TORCH_CHECK(indices.device() == values.device(), "indices are on ", indices.device(), " but values are on ",
              values.device());
  TORCH_CHECK(indices.scalar_type() == at::kByte || indices.scalar_type() == at::kShort,
              "indices must be uint8 or int16, got ", indices.scalar_type());
  TORCH_CHECK(bank >= 1, "bank must be >= 1, got ", bank);
  TORCH_CHECK(in >= 1, "in_features must be >= 1, got ", in);
  const BalShape s{T, values.size(0), in, bank, values.size(1), values.size(2)};
  TORCH_CHECK(s.n_banks == (in + bank - 1) / bank, "values has ", s.n_banks, " banks, but ", in,
              " input features in banks of ", bank, " need ", (in + bank - 1) / bank);
  const int64_t last = in - (s.n_banks - 1) * bank;
  TORCH_CHECK(s.keep >= 1 && s.keep <= last, "keep must be in [1, ", last, "] (the width of the last bank), got ",
              s.keep);
  return s;
}

at::Tensor balanced_linear_cuda(const at::Tensor& x_in, const at::Tensor& values_in, const at::Tensor& indices_in,
                                int64_t bank, const std::optional<at::Tensor>& bias, c10::string_view activation) {
  TORCH_CHECK(x_in.dim() == 2, "x must be 2-D [tokens, in_features], got shape ", x_in.sizes());
  const at::Tensor values = values_in.contiguous(), indices = indices_in.contiguous();
  const BalShape s = balanced_shape(values, indices, bank, x_in.size(1), x_in.size(0));
  const at::Tensor x = dense_input(x_in, values, s.in, "x");
  const Act act = act_of(activation);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor keep_bias;
  const void* bp = bias_ptr(bias, values, s.out, keep_bias);
  at::Tensor y = at::empty({s.T, s.out}, x.options());
  check_launch(
      balanced_linear(dtype_of(x), s, x.data_ptr(), x.stride(0), values.data_ptr(), indices.data_ptr(),
                      indices.scalar_type() == at::kShort, bp, act, y.data_ptr(), c10::cuda::getCurrentCUDAStream()),
      "balanced_linear");
  return y;
}

at::Tensor balanced_linear_grad_input_cuda(const at::Tensor& dy_in, const at::Tensor& values_in,
                                           const at::Tensor& indices_in, int64_t bank, int64_t in_features) {
  TORCH_CHECK(dy_in.dim() == 2, "grad_out must be 2-D [tokens, out_features], got shape ", dy_in.sizes());
  const at::Tensor values = values_in.contiguous(), indices = indices_in.contiguous();
  const BalShape s = balanced_shape(values, indices, bank, in_features, dy_in.size(0));
  const at::Tensor dy = dense_input(dy_in, values, s.out, "grad_out");
  const c10::cuda::CUDAGuard guard(dy.device());
  at::Tensor dx = at::empty({s.T, s.in}, dy.options());
  check_launch(
      balanced_linear_grad_input(dtype_of(dy), s, dy.data_ptr(), dy.stride(0), values.data_ptr(), indices.data_ptr(),
                                 indices.scalar_type() == at::kShort, dx.data_ptr(), c10::cuda::getCurrentCUDAStream()),
      "balanced_linear_grad_input (a bank too wide for one CTA's shared memory also lands here)");
  return dx;
}

at::Tensor balanced_sddmm_cuda(const at::Tensor& dy_in, const at::Tensor& x_in, const at::Tensor& indices_in,
                               int64_t bank) {
  TORCH_CHECK(dy_in.dim() == 2 && x_in.dim() == 2, "grad_out and x must be 2-D, got shapes ", dy_in.sizes(), " and ",
              x_in.sizes());
  TORCH_CHECK(dy_in.size(0) == x_in.size(0), "grad_out and x must have the same number of tokens, got ", dy_in.size(0),
              " and ", x_in.size(0));
  SK_CHECK_CUDA(x_in);
  const at::Tensor indices = indices_in.contiguous();
  // balanced_shape wants values: an empty tensor of the gradient's shape and dtype stands in.
  at::Tensor dw = at::empty(indices.sizes(), x_in.options());
  const BalShape s = balanced_shape(dw, indices, bank, x_in.size(1), x_in.size(0));
  const at::Tensor dy = dense_input(dy_in, dw, s.out, "grad_out");
  const at::Tensor x = dense_input(x_in, dw, s.in, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  check_launch(
      balanced_sddmm(dtype_of(x), s, dy.data_ptr(), dy.stride(0), x.data_ptr(), x.stride(0), indices.data_ptr(),
                     indices.scalar_type() == at::kShort, dw.data_ptr(), c10::cuda::getCurrentCUDAStream()),
      "balanced_sddmm");
  return dw;
}

std::tuple<at::Tensor, at::Tensor> nm24_pack_cuda(const at::Tensor& values_in, const at::Tensor& indices_in) {
  SK_CHECK_CUDA(values_in);
  TORCH_CHECK(values_in.scalar_type() == at::kHalf || values_in.scalar_type() == at::kBFloat16,
              "nm24_pack: values must be float16 or bfloat16 (the sparse tensor cores' types), got ",
              values_in.scalar_type());
  TORCH_CHECK(values_in.dim() == 3 && values_in.size(2) == 2,
              "nm24_pack: values must be [out, in/4, 2] (a balanced weight with bank=4, keep=2), got ",
              values_in.sizes());
  TORCH_CHECK(indices_in.sizes() == values_in.sizes() && indices_in.scalar_type() == at::kByte &&
                  indices_in.device() == values_in.device(),
              "nm24_pack: indices must be uint8 ", values_in.sizes(), " on ", values_in.device(), ", got ",
              indices_in.scalar_type(), " ", indices_in.sizes(), " on ", indices_in.device());
  const int64_t out = values_in.size(0), in = values_in.size(1) * 4;
  TORCH_CHECK(nm24::shape_ok(out, in), "nm24_pack: out_features must be a multiple of 16 and in_features of 64, got ",
              out, " x ", in);
  const at::Tensor values = values_in.contiguous(), indices = indices_in.contiguous();
  const c10::cuda::CUDAGuard guard(values.device());
  at::Tensor pv = at::empty({out / 16, in / 32, 32, 8}, values.options());
  at::Tensor pm = at::empty({out / 16, in / 64, 32}, values.options().dtype(at::kInt));
  check_launch(nm24_pack(out, in, static_cast<const uint16_t*>(values.data_ptr()), indices.data_ptr<uint8_t>(),
                         static_cast<uint16_t*>(pv.data_ptr()), reinterpret_cast<uint32_t*>(pm.data_ptr<int32_t>()),
                         c10::cuda::getCurrentCUDAStream()),
               "nm24_pack");
  return {pv, pm};
}

at::Tensor nm24_linear_cuda(const at::Tensor& x_in, const at::Tensor& pv, const at::Tensor& pm,
                            const std::optional<at::Tensor>& bias, c10::string_view activation) {
  SK_CHECK_CUDA(pv);
  TORCH_CHECK(pv.dim() == 4 && pv.size(2) == 32 && pv.size(3) == 8 && pv.is_contiguous(),
              "nm24_linear: packed_values must be a contiguous [out/16, in/32, 32, 8] tensor from nm24_pack, got ",
              pv.sizes());
  TORCH_CHECK(pv.scalar_type() == at::kHalf || pv.scalar_type() == at::kBFloat16,
              "nm24_linear: packed_values must be float16 or bfloat16, got ", pv.scalar_type());
  const int64_t out = pv.size(0) * 16, in = pv.size(1) * 32;
  TORCH_CHECK(pm.device() == pv.device() && pm.scalar_type() == at::kInt && pm.is_contiguous() &&
                  pm.sizes() == at::IntArrayRef({out / 16, in / 64, 32}),
              "nm24_linear: packed_meta must be a contiguous int32 [", out / 16, ", ", in / 64, ", 32] tensor on ",
              pv.device(), " from nm24_pack, got ", pm.scalar_type(), " ", pm.sizes());
  TORCH_CHECK(x_in.dim() == 2, "x must be 2-D [tokens, in_features], got shape ", x_in.sizes());
  at::Tensor x = dense_input(x_in, pv, in, "x");
  // 16-byte cp.async loads of X rows.
  if (x.stride(0) % 8 != 0 || reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 != 0)
    x = x.clone(at::MemoryFormat::Contiguous);
  const Act act = act_of(activation);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor keep_bias;
  const void* bp = bias_ptr(bias, pv, out, keep_bias);
  at::Tensor y = at::empty({x.size(0), out}, x.options());
  check_launch(nm24_linear(dtype_of(x), x.size(0), out, in, x.data_ptr(), x.stride(0),
                           static_cast<const uint16_t*>(pv.data_ptr()),
                           reinterpret_cast<const uint32_t*>(pm.data_ptr<int32_t>()), bp, act, y.data_ptr(),
                           c10::cuda::getCurrentCUDAStream()),
               "nm24_linear");
  return y;
}

// Shape-only (Meta) kernels of the two CUDA-only ops, for fake tensors (torch.compile, opcheck). They live here
// rather than in sparse/ops.py because the ops exist only in CUDA builds.
std::tuple<at::Tensor, at::Tensor> nm24_pack_meta(const at::Tensor& values, const at::Tensor& indices) {
  (void)indices;
  TORCH_CHECK(values.dim() == 3 && values.size(2) == 2, "nm24_pack: values must be [out, in/4, 2], got ",
              values.sizes());
  const int64_t out = values.size(0), in = values.size(1) * 4;
  TORCH_CHECK(nm24::shape_ok(out, in), "nm24_pack: out_features must be a multiple of 16 and in_features of 64, got ",
              out, " x ", in);
  return {at::empty({out / 16, in / 32, 32, 8}, values.options()),
          at::empty({out / 16, in / 64, 32}, values.options().dtype(at::kInt))};
}

at::Tensor nm24_linear_meta(const at::Tensor& x, const at::Tensor& pv, const at::Tensor& pm,
                            const std::optional<at::Tensor>& bias, c10::string_view activation) {
  (void)pm, (void)bias, (void)activation;
  TORCH_CHECK(x.dim() == 2 && pv.dim() == 4, "nm24_linear: x must be 2-D and packed_values 4-D, got ", x.sizes(),
              " and ", pv.sizes());
  return at::empty({x.size(0), pv.size(0) * 16}, x.options());
}

}  // namespace
}  // namespace sparsekern::cuda

TORCH_LIBRARY_IMPL(sparsekern, CUDA, m) {
  m.impl("bsr_linear", &sparsekern::cuda::bsr_linear_cuda);
  m.impl("bsr_linear_grad_input", &sparsekern::cuda::bsr_linear_grad_input_cuda);
  m.impl("bsr_sddmm", &sparsekern::cuda::bsr_sddmm_cuda);
  m.impl("balanced_linear", &sparsekern::cuda::balanced_linear_cuda);
  m.impl("balanced_linear_grad_input", &sparsekern::cuda::balanced_linear_grad_input_cuda);
  m.impl("balanced_sddmm", &sparsekern::cuda::balanced_sddmm_cuda);
  m.impl("nm24_pack", &sparsekern::cuda::nm24_pack_cuda);
  m.impl("nm24_linear", &sparsekern::cuda::nm24_linear_cuda);
}

TORCH_LIBRARY_IMPL(sparsekern, Meta, m) {
  m.impl("nm24_pack", &sparsekern::cuda::nm24_pack_meta);
  m.impl("nm24_linear", &sparsekern::cuda::nm24_linear_meta);
}
