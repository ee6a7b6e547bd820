// Device helpers shared by the CUDA kernels: error propagation, element types, and thin wrappers
// over the PTX instructions the tensor-core kernels use (cp.async, ldmatrix, mma.sync, mma.sp.sync).
// No torch headers: the kernels take raw pointers and a cudaStream_t and return a cudaError_t, which the torch
// launcher (ops_cuda.cpp) turns into a TORCH_CHECK.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels.h"

// Returns from the enclosing function with the error of a failed CUDA runtime call.
#define SK_CUDA_TRY(call)                       \
  do {                                          \
    const cudaError_t sk_err_ = (call);         \
    if (sk_err_ != cudaSuccess) return sk_err_; \
  } while (0)

// After a kernel launch: a bad configuration shows up only through cudaGetLastError.
#define SK_LAUNCH_CHECK() SK_CUDA_TRY(cudaGetLastError())

namespace sparsekern::cuda {

// Accumulation type: fp32 for every 16/32-bit type, fp64 for fp64 (as at::opmath_type).
template <typename T>
struct AccT {
  using type = float;
};
template <>
struct AccT<double> {
  using type = double;
};

template <typename T>
__device__ __forceinline__ typename AccT<T>::type to_acc(T v) {
  return static_cast<typename AccT<T>::type>(v);
}
template <>
__device__ __forceinline__ float to_acc<__half>(__half v) {
  return __half2float(v);
}
template <>
__device__ __forceinline__ float to_acc<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ T from_acc(typename AccT<T>::type v) {
  return static_cast<T>(v);
}
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Two fp32 values as one packed 16-bit pair (the low half is `lo`), for 4-byte stores.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

// ---- PTX wrappers (sm_80+) -------------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy that bypasses L1; src_bytes < 16 zero-fills the rest (0: a pure zero fill, used
// for rows and columns outside the matrix, whose address must still be valid).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::);
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// D += A B for one m16n8k16 tile, fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                         const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// mma.sp::ordered_metadata (PTX ISA 8.5, CUDA 12.5+) is the form ptxas recommends; it requires the two indices of
// each group in increasing order, which the balanced format guarantees (indices sorted per bank). Older
// toolkits only know the plain form, with the same operands.
#if defined(__CUDACC_VER_MAJOR__) && \
    (__CUDACC_VER_MAJOR__ > 12 || (__CUDACC_VER_MAJOR__ == 12 && __CUDACC_VER_MINOR__ >= 5))
#define SK_MMA_SP "mma.sp::ordered_metadata"
#else
#define SK_MMA_SP "mma.sp"
#endif

// D += A B for one m16n8k32 tile with a 2:4-sparse A (16 x 16 compressed values + 2-bit indices in `meta`).
// SEL is the sparsity selector: which pair of threads of each quad supplies the metadata (0: lanes 0,1; 1: 2,3).
template <int SEL>
__device__ __forceinline__ void mma_sp_16832_f16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[4],
                                                 uint32_t meta) {
  asm volatile(SK_MMA_SP
               ".sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, "
               "{%0,%1,%2,%3}, %12, %13;\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(meta),
                 "n"(SEL));
}
template <int SEL>
__device__ __forceinline__ void mma_sp_16832_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[4],
                                                  uint32_t meta) {
  asm volatile(SK_MMA_SP
               ".sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, "
               "{%0,%1,%2,%3}, %12, %13;\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(meta),
                 "n"(SEL));
}
template <typename T, int SEL>
struct MmaSp;
template <int SEL>
struct MmaSp<__half, SEL> {
  static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[4],
                                             uint32_t m) {
    mma_sp_16832_f16<SEL>(d, a, b, m);
  }
};
template <int SEL>
struct MmaSp<__nv_bfloat16, SEL> {
  static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[4],
                                             uint32_t m) {
    mma_sp_16832_bf16<SEL>(d, a, b, m);
  }
};

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Calls f(T{}) with the element type of dt (every kernel family's launcher dispatches through it).
template <typename F>
cudaError_t dispatch_dtype(DType dt, F&& f) {
  switch (dt) {
    case DType::F32: return f(float{});
    case DType::F64: return f(double{});
    case DType::F16: return f(__half{});
    case DType::BF16: return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace sparsekern::cuda
