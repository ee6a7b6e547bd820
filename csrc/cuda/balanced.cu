// Balanced sparsity for any bank/keep (the 2:4 case also has a sparse-tensor-core path, nm24.cu): gather-based
// SIMT kernels with fp32 accumulation (fp64 for fp64).
//   forward     Y[t, o] = sum_{b,k} W[o, b, k] X[t, b*bank + idx[o, b, k]]: one thread per (t, o), outputs
//               fastest so that a warp reads one X row (cached) and neighbouring weight rows.
//   grad input  dX[t, b*bank + c] = sum over (o, k) with idx[o, b, k] = c of dY[t, o] W[o, b, k]: one CTA per
//               (bank, token tile) scatters into a shared-memory accumulator [tokens][bank], then writes its
//               slice of dX once (no global atomics).
//   sddmm       dW[o, b, k] = sum_t dY[t, o] X[t, b*bank + idx[o, b, k]]: one thread per kept entry.
#include <algorithm>

#include "common.cuh"

namespace sparsekern::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kGradTokTile = 32;  // token tile of the input-gradient CTA (fewer when the bank is wide)

int grid_for(int64_t work) {
  return int(std::max<int64_t>(1, std::min<int64_t>(ceil_div(work, kThreads), 1 << 16)));
}

template <typename T, typename I>
__global__ void balanced_fwd_kernel(BalShape s, const T* __restrict__ x, int64_t ldx, const T* __restrict__ w,
                                    const I* __restrict__ idx, const T* __restrict__ bias, Act act, T* __restrict__ y) {
  using A = typename AccT<T>::type;
  const int64_t row = s.n_banks * s.keep;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < s.T * s.out;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = e / s.out, o = e % s.out;
    const T* wr = w + o * row;
    const I* ir = idx + o * row;
    const T* xr = x + t * ldx;
    A acc = 0;
    for (int64_t b = 0; b < s.n_banks; ++b)
      for (int64_t k = 0; k < s.keep; ++k)
        acc += to_acc(wr[b * s.keep + k]) * to_acc(xr[b * s.bank + int64_t(ir[b * s.keep + k])]);
    if (bias != nullptr) acc += to_acc(bias[o]);
    y[e] = from_acc<T>(apply_act(acc, act));
  }
}

// grid: (n_banks, token tiles of `tok` tokens); dynamic shared memory: tok * bank accumulators.
template <typename T, typename I>
__global__ void balanced_grad_input_kernel(BalShape s, int tok, const T* __restrict__ dy, int64_t lddy,
                                           const T* __restrict__ w, const I* __restrict__ idx, T* __restrict__ dx) {
  using A = typename AccT<T>::type;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  A* acc = reinterpret_cast<A*>(smem_raw);
  const int64_t b = blockIdx.x, t0 = int64_t(blockIdx.y) * tok;
  const int64_t tb = min(int64_t(tok), s.T - t0), width = min(s.bank, s.in - b * s.bank);
  for (int64_t i = threadIdx.x; i < tb * s.bank; i += blockDim.x) acc[i] = A(0);
  __syncthreads();
  const int64_t row = s.n_banks * s.keep;
  for (int64_t e = threadIdx.x; e < tb * s.out; e += blockDim.x) {
    const int64_t tl = e / s.out, o = e % s.out;
    const A g = to_acc(dy[(t0 + tl) * lddy + o]);
    const T* wr = w + o * row + b * s.keep;
    const I* ir = idx + o * row + b * s.keep;
    for (int64_t k = 0; k < s.keep; ++k) atomicAdd(&acc[tl * s.bank + int64_t(ir[k])], g * to_acc(wr[k]));
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < tb * width; i += blockDim.x) {
    const int64_t tl = i / width, c = i % width;
    dx[(t0 + tl) * s.in + b * s.bank + c] = from_acc<T>(acc[tl * s.bank + c]);
  }
}

template <typename T, typename I>
__global__ void balanced_sddmm_kernel(BalShape s, const T* __restrict__ dy, int64_t lddy, const T* __restrict__ x,
                                      int64_t ldx, const I* __restrict__ idx, T* __restrict__ dw) {
  using A = typename AccT<T>::type;
  const int64_t n = s.out * s.n_banks * s.keep;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < n; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t o = e / (s.n_banks * s.keep), b = (e / s.keep) % s.n_banks;
    const int64_t col = b * s.bank + int64_t(idx[e]);
    A acc = 0;
    for (int64_t t = 0; t < s.T; ++t) acc += to_acc(dy[t * lddy + o]) * to_acc(x[t * ldx + col]);
    dw[e] = from_acc<T>(acc);
  }
}

// Calls f(T{}, I{}) with the element and index types.
template <typename F>
cudaError_t dispatch(DType dt, bool idx16, F&& f) {
  return dispatch_dtype(dt, [&](auto tag) -> cudaError_t { return idx16 ? f(tag, int16_t{}) : f(tag, uint8_t{}); });
}

}  // namespace

cudaError_t balanced_linear(DType dt, const BalShape& s, const void* x, int64_t ldx, const void* values,
                            const void* indices, bool idx16, const void* bias, Act act, void* y, cudaStream_t stream) {
  if (s.T == 0 || s.out == 0) return cudaSuccess;
  return dispatch(dt, idx16, [&](auto tt, auto it) -> cudaError_t {
    using T = decltype(tt);
    using I = decltype(it);
    balanced_fwd_kernel<T, I><<<grid_for(s.T * s.out), kThreads, 0, stream>>>(
        s, static_cast<const T*>(x), ldx, static_cast<const T*>(values), static_cast<const I*>(indices),
        static_cast<const T*>(bias), act, static_cast<T*>(y));
    SK_LAUNCH_CHECK();
    return cudaSuccess;
  });
}

cudaError_t balanced_linear_grad_input(DType dt, const BalShape& s, const void* dy, int64_t lddy, const void* values,
                                       const void* indices, bool idx16, void* dx, cudaStream_t stream) {
  if (s.T == 0 || s.in == 0) return cudaSuccess;
  return dispatch(dt, idx16, [&](auto tt, auto it) -> cudaError_t {
    using T = decltype(tt);
    using I = decltype(it);
    using A = typename AccT<T>::type;
    // Keep the accumulator within the default 48 KiB where possible; one token still needs the whole bank.
    const int64_t per_token = s.bank * int64_t(sizeof(A));
    const int tok = int(std::max<int64_t>(1, std::min<int64_t>(kGradTokTile, (48 << 10) / per_token)));
    const int64_t smem = tok * per_token;
    int dev = 0, max_smem = 0;
    SK_CUDA_TRY(cudaGetDevice(&dev));
    SK_CUDA_TRY(cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    if (smem > max_smem) return cudaErrorInvalidValue;  // bank too wide for one CTA's shared memory
    if (smem > (48 << 10))
      SK_CUDA_TRY(cudaFuncSetAttribute(balanced_grad_input_kernel<T, I>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       int(smem)));
    const int64_t tiles = ceil_div(s.T, tok);
    if (tiles > 65535 || s.n_banks > INT32_MAX) return cudaErrorInvalidConfiguration;
    const dim3 grid(unsigned(s.n_banks), unsigned(tiles));
    balanced_grad_input_kernel<T, I><<<grid, kThreads, size_t(smem), stream>>>(
        s, tok, static_cast<const T*>(dy), lddy, static_cast<const T*>(values), static_cast<const I*>(indices),
        static_cast<T*>(dx));
    SK_LAUNCH_CHECK();
    return cudaSuccess;
  });
}

cudaError_t balanced_sddmm(DType dt, const BalShape& s, const void* dy, int64_t lddy, const void* x, int64_t ldx,
                           const void* indices, bool idx16, void* dw, cudaStream_t stream) {
  const int64_t n = s.out * s.n_banks * s.keep;
  if (n == 0) return cudaSuccess;
  return dispatch(dt, idx16, [&](auto tt, auto it) -> cudaError_t {
    using T = decltype(tt);
    using I = decltype(it);
    balanced_sddmm_kernel<T, I>
        <<<grid_for(n), kThreads, 0, stream>>>(s, static_cast<const T*>(dy), lddy, static_cast<const T*>(x), ldx,
                                               static_cast<const I*>(indices), static_cast<T*>(dw));
    SK_LAUNCH_CHECK();
    return cudaSuccess;
  });
}

}  // namespace sparsekern::cuda
