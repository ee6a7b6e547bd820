// Host entry points of the CUDA kernels: raw device pointers, a cudaStream_t, and a cudaError_t back (from the
// launch itself or from cudaGetLastError after it). Shapes and layouts are checked by the caller (ops_cuda.cpp);
// the metadata (offsets, indices) is trusted: the weight formats validate it once, when the weight is built.
#pragma once

// Host-only declarations (no device code), so that the torch launcher compiled by the host compiler can
// include it.
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "../activations.h"

namespace sparsekern::cuda {

// Element type of a tensor, as the launcher passes it (the kernels are templated on the C++ type).
enum class DType : int { F32 = 0, F64 = 1, F16 = 2, BF16 = 3 };

// Act (the activations of the output stage) and apply_act: csrc/activations.h.

// ---- block-sparse (bsr.cu) ---------------------------------------------------------------------------------
// values: [nnz, bo, bi] with strides (bo*bi, 1, bo) (each block stored input-major). x rows are `ldx` apart.
struct BsrShape {
  int64_t T, out, in, bo, bi, nnz;
};

// y [T, out] = act(x W^T + bias). bias may be null.
cudaError_t bsr_linear(DType dt, const BsrShape& s, const void* x, int64_t ldx, const void* values,
                       const int32_t* row_offsets, const int32_t* col_indices, const void* bias, Act act, void* y,
                       cudaStream_t stream);
// dx [T, in] = dy W, walking W by block columns.
cudaError_t bsr_linear_grad_input(DType dt, const BsrShape& s, const void* dy, int64_t lddy, const void* values,
                                  const int32_t* col_offsets, const int32_t* row_indices, const int32_t* block_perm,
                                  void* dx, cudaStream_t stream);
// dw (layout of values) = (dy^T x) at the kept blocks.
cudaError_t bsr_sddmm(DType dt, const BsrShape& s, const void* dy, int64_t lddy, const void* x, int64_t ldx,
                      const int32_t* row_offsets, const int32_t* col_indices, void* dw, cudaStream_t stream);

// ---- unstructured: block-sparse with 1x1 blocks, i.e. CSR (csr.cu) -------------------------------------------
// The same operands as the bsr_* calls (bo == bi == 1), plus a device workspace of csr_workspace_bytes() bytes
// (16-byte aligned; null when that is 0) for the token-major copies of x / dy the kernels gather from.
//
// Which kernels run: CsrKernel::Auto lets the shape decide (csr.cu); the others force one, for tests and
// benchmarks, through SPARSEKERN_CUDA_CSR (read at every call by csr_kernel_from_env): unset / "auto", "gemv"
// (lanes along the nonzeros, row-major inputs), "narrow" (4 lanes per row, lanes along tokens), "wide" (a warp
// per row), or "off" (the caller routes 1x1 blocks to bsr_* and its SIMT fallback, as before csr.cu existed).
enum class CsrKernel : int { Auto, Off, Gemv, Narrow, Wide, Invalid };
enum class CsrOp : int { Linear, GradInput, Sddmm };
CsrKernel csr_kernel_from_env();  // Invalid for an unknown value
size_t csr_workspace_bytes(CsrOp op, CsrKernel k, DType dt, const BsrShape& s);

// y [T, out] = act(x W^T + bias). bias may be null.
cudaError_t csr_linear(CsrKernel k, DType dt, const BsrShape& s, const void* x, int64_t ldx, const void* values,
                       const int32_t* row_offsets, const int32_t* col_indices, const void* bias, Act act, void* y,
                       void* workspace, size_t workspace_bytes, cudaStream_t stream);
// dx [T, in] = dy W, walking W by columns (col_offsets, row_indices, block_perm).
cudaError_t csr_linear_grad_input(CsrKernel k, DType dt, const BsrShape& s, const void* dy, int64_t lddy,
                                  const void* values, const int32_t* col_offsets, const int32_t* row_indices,
                                  const int32_t* block_perm, void* dx, void* workspace, size_t workspace_bytes,
                                  cudaStream_t stream);
// dw [nnz] = (dy^T x) at the nonzeros.
cudaError_t csr_sddmm(CsrKernel k, DType dt, const BsrShape& s, const void* dy, int64_t lddy, const void* x,
                      int64_t ldx, const int32_t* row_offsets, const int32_t* col_indices, void* dw, void* workspace,
                      size_t workspace_bytes, cudaStream_t stream);

// ---- balanced, any bank/keep (balanced.cu) -------------------------------------------------------------------
// values, indices: [out, n_banks, keep] contiguous; indices uint8 (idx16 = false) or int16 (idx16 = true).
struct BalShape {
  int64_t T, out, in, bank, n_banks, keep;
};

cudaError_t balanced_linear(DType dt, const BalShape& s, const void* x, int64_t ldx, const void* values,
                            const void* indices, bool idx16, const void* bias, Act act, void* y, cudaStream_t stream);
cudaError_t balanced_linear_grad_input(DType dt, const BalShape& s, const void* dy, int64_t lddy, const void* values,
                                       const void* indices, bool idx16, void* dx, cudaStream_t stream);
cudaError_t balanced_sddmm(DType dt, const BalShape& s, const void* dy, int64_t lddy, const void* x, int64_t ldx,
                           const void* indices, bool idx16, void* dw, cudaStream_t stream);

// ---- 2:4 on sparse tensor cores (nm24.cu; layout in nm24_layout.h) --------------------------------------------
// Packs values [out, in/4, 2] (16-bit elements, any 16-bit type: the bits are copied) and uint8 indices of the
// same shape into packed_values [out/16, in/32, 32, 8] and packed_meta [out/16, in/64, 32] (uint32).
cudaError_t nm24_pack(int64_t out, int64_t in, const uint16_t* values, const uint8_t* indices, uint16_t* packed_values,
                      uint32_t* packed_meta, cudaStream_t stream);
// y [T, out] = act(x W^T + bias) for fp16/bf16 (dt), x rows `ldx` apart (ldx % 8 == 0, 16-byte aligned).
cudaError_t nm24_linear(DType dt, int64_t T, int64_t out, int64_t in, const void* x, int64_t ldx,
                        const uint16_t* packed_values, const uint32_t* packed_meta, const void* bias, Act act, void* y,
                        cudaStream_t stream);

}  // namespace sparsekern::cuda
