// Vectorised block-sparse (BSR) CPU kernels: the raw-pointer interface between bsr.cpp (checks, threading,
// dispatch) and the translation units compiled for one ISA each (bsr_avx512.cpp, bsr_avx2.cpp). No torch or STL
// headers: those translation units are compiled with target pragmas and must not instantiate shared inline code.
//
// Every kernel takes `values` in the kernel layout: block p is stored input-major, element (o, k) of the logical
// [bo, bi] block at w[p * bo * bi + k * bo + o] (the strides (bo*bi, 1, bo) of a [nnz, bo, bi] tensor).
// Edge blocks may be ragged (out % bo, in % bi != 0); the part of a block outside the matrix is never read into
// a result (forward, grad_input) and is written as exact zeros (sddmm). A kernel handles one contiguous range of
// block rows (forward, sddmm) or block columns (grad_input); bsr.cpp gives each torch thread one range.
#pragma once

#include <cstdint>

namespace sparsekern::cpu {

// Largest block side the vectorised kernels take (their stack buffers are sized for it); larger blocks use
// the portable kernels.
constexpr int64_t kBsrFastMaxBlock = 64;

// y[t, :] = act(x[t, :] W^T + bias) for the block rows [r0, r1). y is [T, out], row stride `out`.
struct BsrFwdArgs {
  int64_t out, in, bo, bi, T;
  const int32_t* row_offsets;  // [n_block_rows + 1]
  const int32_t* col_indices;  // [nnz]
  const void* x;               // [T, in], row stride ldx, features contiguous
  int64_t ldx;
  const void* w;     // kernel layout, see above
  const void* bias;  // [out] or null
  void* y;
  int act;  // sparsekern::cpu::Act
};

// dx[t, :] = dy[t, :] W for the block columns [c0, c1). dx is [T, in], row stride `in`.
struct BsrGradInputArgs {
  int64_t out, in, bo, bi, T;
  const int32_t* col_offsets;  // [n_block_cols + 1]
  const int32_t* row_indices;  // [nnz], block row of the k-th block in column order
  const int32_t* block_perm;   // [nnz], its index into w
  const void* dy;              // [T, out], row stride lddy, features contiguous
  int64_t lddy;
  const void* w;
  void* dx;
};

// dw[p] = (dy^T x) restricted to block p, for the blocks of block rows [r0, r1); dw in the kernel layout.
struct BsrSddmmArgs {
  int64_t out, in, bo, bi, T;
  const int32_t* row_offsets;
  const int32_t* col_indices;
  const void* dy;  // [T, out], row stride lddy
  int64_t lddy;
  const void* x;  // [T, in], row stride ldx
  int64_t ldx;
  void* dw;
};

// float32 and bfloat16 (as uint16_t bits) kernels. The AVX-512 bf16 kernels need AVX512_BF16 (vdpbf16ps);
// the AVX2 bf16 kernels widen to float32 and need only AVX2 + FMA. All accumulate in float32.
void bsr_fwd_f32_avx512(const BsrFwdArgs& a, int64_t r0, int64_t r1);
void bsr_fwd_bf16_avx512(const BsrFwdArgs& a, int64_t r0, int64_t r1);
// bfloat16 forward with AMX tiles (tdpbf16ps) for the shapes bsr_amx_bf16_fits; needs features().amx_bf16.
bool bsr_amx_bf16_fits(int64_t bo, int64_t bi, int64_t in);
void bsr_fwd_bf16_amx(const BsrFwdArgs& a, int64_t r0, int64_t r1);
void bsr_grad_input_f32_avx512(const BsrGradInputArgs& a, int64_t c0, int64_t c1);
void bsr_grad_input_bf16_avx512(const BsrGradInputArgs& a, int64_t c0, int64_t c1);
void bsr_sddmm_f32_avx512(const BsrSddmmArgs& a, int64_t r0, int64_t r1);
void bsr_sddmm_bf16_avx512(const BsrSddmmArgs& a, int64_t r0, int64_t r1);

void bsr_fwd_f32_avx2(const BsrFwdArgs& a, int64_t r0, int64_t r1);
void bsr_fwd_bf16_avx2(const BsrFwdArgs& a, int64_t r0, int64_t r1);
void bsr_grad_input_f32_avx2(const BsrGradInputArgs& a, int64_t c0, int64_t c1);
void bsr_grad_input_bf16_avx2(const BsrGradInputArgs& a, int64_t c0, int64_t c1);
void bsr_sddmm_f32_avx2(const BsrSddmmArgs& a, int64_t r0, int64_t r1);
void bsr_sddmm_bf16_avx2(const BsrSddmmArgs& a, int64_t r0, int64_t r1);

// 1x1 blocks (unstructured sparsity, CSR), csr_avx512.cpp and csr_avx2.cpp: the same arguments with bo = bi = 1,
// so w is [nnz] and row_offsets / col_indices index single rows and columns, the columns strictly increasing
// within a row (and the rows within a column for grad_input; bsr.cpp checks both). Each returns false if a scratch
// buffer could not be allocated (nothing is then written).
bool csr_fwd_f32_avx512(const BsrFwdArgs& a, int64_t r0, int64_t r1);
bool csr_fwd_bf16_avx512(const BsrFwdArgs& a, int64_t r0, int64_t r1);
bool csr_grad_input_f32_avx512(const BsrGradInputArgs& a, int64_t c0, int64_t c1);
bool csr_grad_input_bf16_avx512(const BsrGradInputArgs& a, int64_t c0, int64_t c1);
bool csr_sddmm_f32_avx512(const BsrSddmmArgs& a, int64_t r0, int64_t r1);
bool csr_sddmm_bf16_avx512(const BsrSddmmArgs& a, int64_t r0, int64_t r1);
bool csr_fwd_f32_avx2(const BsrFwdArgs& a, int64_t r0, int64_t r1);
bool csr_fwd_bf16_avx2(const BsrFwdArgs& a, int64_t r0, int64_t r1);
bool csr_grad_input_f32_avx2(const BsrGradInputArgs& a, int64_t c0, int64_t c1);
bool csr_grad_input_bf16_avx2(const BsrGradInputArgs& a, int64_t c0, int64_t c1);
bool csr_sddmm_f32_avx2(const BsrSddmmArgs& a, int64_t r0, int64_t r1);
bool csr_sddmm_bf16_avx2(const BsrSddmmArgs& a, int64_t r0, int64_t r1);

// Vector blocks, vec_avx512.cpp and vec_avx2.cpp: column vectors (V, 1) and row vectors (1, V), V in {4, 8, 16,
// 32} (bsr.cpp's vec_block), the same arguments. Each returns false if a scratch buffer could not be allocated
// (nothing is then written).
bool vec_fwd_f32_avx512(const BsrFwdArgs& a, int64_t r0, int64_t r1);
bool vec_fwd_bf16_avx512(const BsrFwdArgs& a, int64_t r0, int64_t r1);
bool vec_grad_input_f32_avx512(const BsrGradInputArgs& a, int64_t c0, int64_t c1);
bool vec_grad_input_bf16_avx512(const BsrGradInputArgs& a, int64_t c0, int64_t c1);
bool vec_sddmm_f32_avx512(const BsrSddmmArgs& a, int64_t r0, int64_t r1);
bool vec_sddmm_bf16_avx512(const BsrSddmmArgs& a, int64_t r0, int64_t r1);
bool vec_fwd_f32_avx2(const BsrFwdArgs& a, int64_t r0, int64_t r1);
bool vec_fwd_bf16_avx2(const BsrFwdArgs& a, int64_t r0, int64_t r1);
bool vec_grad_input_f32_avx2(const BsrGradInputArgs& a, int64_t c0, int64_t c1);
bool vec_grad_input_bf16_avx2(const BsrGradInputArgs& a, int64_t c0, int64_t c1);
bool vec_sddmm_f32_avx2(const BsrSddmmArgs& a, int64_t r0, int64_t r1);
bool vec_sddmm_bf16_avx2(const BsrSddmmArgs& a, int64_t r0, int64_t r1);

}  // namespace sparsekern::cpu
