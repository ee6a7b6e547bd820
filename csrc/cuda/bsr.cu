// Block-sparse (BSR) kernels: forward, input gradient and weight-gradient SDDMM.
//
// Tensor-core path (fp16/bf16, fp32 accumulation, mma.sync m16n8k16, sm_80+), taken when both block sides are
// multiples of 32 and the feature counts multiples of 8 (16-byte cp.async chunks never straddle a matrix edge):
//   forward     Y[t, o] = sum over kept blocks (r, c) of X[t, c*bi + k] W_p[o, k]: one CTA per 128 tokens x BN
//               outputs of one block row; the K loop walks the row's blocks, 32 inputs per stage.
//   grad input  dX[t, i] = sum over blocks (r, c) of dY[t, r*bo + o] W_p[o, i]: the same kernel walking a
//               block column (transposed metadata), so every CTA owns its slice of dX (no atomics).
//   sddmm       dW_p[o, i] = sum_t dY[t, r*bo + o] X[t, c*bi + i]: one CTA per 32/64-square tile of a block,
//               K = tokens.
// Blocks are stored input-major ([bi][bo] per block): the forward reads W^T tiles [k][n] with ldmatrix.trans,
// the input gradient reads W tiles [n][k] with plain ldmatrix. Rows/columns past the matrix edge are zero-filled
// by cp.async, so ragged edge blocks contribute nothing even if their outside part holds garbage.
// Everything else (fp32, fp64, other blocks or alignments) takes a plain SIMT kernel: correct, not fast.
#include <algorithm>

#include "common.cuh"

namespace sparsekern::cuda {
namespace {

constexpr int kBM = 128;  // tokens per CTA
constexpr int kBK = 32;   // reduction elements per stage
constexpr int kStages = 3;
constexpr int kThreads = 128;
constexpr int kAPitch = kBK + 8;  // shared row pitch (elements) of k-contiguous tiles: conflict-free ldmatrix

bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

// One kernel for forward (GRAD = false) and input gradient (GRAD = true). In both, A is a dense [T, a_width]
// activation (x or dy), the reduction runs over segments (kept blocks of one block row / column) of seg_k
// elements each, and B is the block's [seg_k x BN] slice of W^T (forward) or W (gradient).
template <typename T, int BN, bool GRAD>
__global__ void __launch_bounds__(kThreads)
    bsr_tc_kernel(int64_t T_tokens, int64_t a_width, int64_t n_total, int64_t bo, int64_t bi, const T* __restrict__ a,
                  int64_t lda, const T* __restrict__ values, const int32_t* __restrict__ offsets,
                  const int32_t* __restrict__ seg_index, const int32_t* __restrict__ perm, const T* __restrict__ bias,
                  Act act, T* __restrict__ c) {
  constexpr int kBPitch = GRAD ? kAPitch : BN + 8;
  constexpr int kBRows = GRAD ? BN : kBK;
  constexpr int kNJ = BN / 8;
  __shared__ __align__(16) T As[kStages][kBM][kAPitch];
  __shared__ __align__(16) T Bs[kStages][kBRows][kBPitch];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t seg_k = GRAD ? bo : bi;  // reduction length of one block
  const int64_t n_ext = GRAD ? bi : bo;  // output width of one block
  const int64_t n_sub = n_ext / BN;
  const int64_t line = blockIdx.x / n_sub;  // block row (forward) or block column (gradient)
  const int64_t n_off = (blockIdx.x % n_sub) * BN;
  const int64_t t0 = int64_t(blockIdx.y) * kBM;
  const int32_t seg_begin = offsets[line], seg_end = offsets[line + 1];
  const int kper = int(seg_k / kBK);
  const int iters = (seg_end - seg_begin) * kper;

  auto load_stage = [&](int s, int it) {
    const int32_t seg = seg_begin + it / kper;
    const int64_t k0 = int64_t(it % kper) * kBK;
    const int64_t a_col = int64_t(seg_index[seg]) * seg_k + k0;
    const T* blk = values + int64_t(GRAD ? perm[seg] : seg) * bo * bi;
#pragma unroll
    for (int j = 0; j < (kBM * kBK / 8) / kThreads; ++j) {
      const int ch = tid + j * kThreads, r = ch >> 2, cc = (ch & 3) * 8;
      const int64_t t = t0 + r;
      const bool ok = t < T_tokens && a_col + cc < a_width;
      cp_async16(&As[s][r][cc], ok ? a + t * lda + a_col + cc : a, ok ? 16 : 0);
    }
    constexpr int kBChunks = (kBK * BN / 8 + kThreads - 1) / kThreads;
#pragma unroll
    for (int j = 0; j < kBChunks; ++j) {
      const int ch = tid + j * kThreads;
      if (ch >= kBK * BN / 8) break;
      if (GRAD) {  // tile [BN][kBK] of W: n = input in block, k = output in block (contiguous)
        const int r = ch >> 2, cc = (ch & 3) * 8;
        const bool ok = a_col + cc < a_width;
        cp_async16(&Bs[s][r][cc], ok ? blk + (n_off + r) * bo + k0 + cc : values, ok ? 16 : 0);
      } else {  // tile [kBK][BN] of W^T: k = input in block, n = output in block (contiguous)
        const int r = ch / (BN / 8), cc = (ch % (BN / 8)) * 8;
        const bool ok = a_col + r < a_width;
        cp_async16(&Bs[s][r][cc], ok ? blk + (k0 + r) * bo + n_off + cc : values, ok ? 16 : 0);
      }
    }
  };

  float acc[2][kNJ][4];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < kNJ; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < iters) load_stage(s, s);
    cp_async_commit();
  }
  for (int it = 0; it < iters; ++it) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    if (it + kStages - 1 < iters) load_stage((it + kStages - 1) % kStages, it + kStages - 1);
    cp_async_commit();
    const int s = it % kStages;
#pragma unroll
    for (int kk = 0; kk < kBK / 16; ++kk) {
      uint32_t af[2][4];
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
        ldmatrix_x4(af[mi], &As[s][warp * 32 + mi * 16 + (lane & 15)][kk * 16 + (lane >> 4) * 8]);
#pragma unroll
      for (int nj = 0; nj < kNJ; nj += 2) {
        uint32_t bf[4];
        if (GRAD) ldmatrix_x4(bf, &Bs[s][nj * 8 + (lane & 7) + (lane >> 4) * 8][kk * 16 + ((lane >> 3) & 1) * 8]);
        else ldmatrix_x4_trans(bf, &Bs[s][kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8][nj * 8 + (lane >> 4) * 8]);
        const uint32_t b0[2] = {bf[0], bf[1]}, b1[2] = {bf[2], bf[3]};
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
          mma_16816<T>(acc[mi][nj], af[mi], b0);
          mma_16816<T>(acc[mi][nj + 1], af[mi], b1);
        }
      }
    }
  }
  cp_async_wait<0>();

  const int g = lane >> 2, q = lane & 3;
#pragma unroll
  for (int nj = 0; nj < kNJ; ++nj) {
    const int64_t n = line * n_ext + n_off + nj * 8 + 2 * q;
    if (n >= n_total) continue;  // n_total % 8 == 0: the pair (n, n + 1) is either inside or outside
    const float b0 = bias != nullptr ? to_acc(bias[n]) : 0.f, b1 = bias != nullptr ? to_acc(bias[n + 1]) : 0.f;
#pragma unroll
    for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t t = t0 + warp * 32 + mi * 16 + g + 8 * h;
        if (t >= T_tokens) continue;
        const float v0 = apply_act(acc[mi][nj][2 * h] + b0, act), v1 = apply_act(acc[mi][nj][2 * h + 1] + b1, act);
        *reinterpret_cast<uint32_t*>(c + t * n_total + n) = pack2<T>(v0, v1);
      }
    }
  }
}

// dW_p tile [TM outputs x TN inputs] of block p = dY[:, rows]^T X[:, cols], K = tokens. 4 warps as 2 x 2.
template <typename T, int TM, int TN>
__global__ void __launch_bounds__(kThreads)
    bsr_sddmm_tc_kernel(int64_t T_tokens, int64_t out, int64_t in, int64_t bo, int64_t bi, int64_t n_brow,
                        const T* __restrict__ dy, int64_t lddy, const T* __restrict__ x, int64_t ldx,
                        const int32_t* __restrict__ row_offsets, const int32_t* __restrict__ col_indices,
                        T* __restrict__ dw) {
  constexpr int kMI = TM / 32, kNJ = TN / 16;  // per warp: (TM/2) x (TN/2)
  __shared__ __align__(16) T As[kStages][kBK][TM + 8];
  __shared__ __align__(16) T Bs[kStages][kBK][TN + 8];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, wm = warp >> 1, wn = warp & 1;
  const int64_t tiles_m = bo / TM, tiles_n = bi / TN;
  const int64_t p = blockIdx.x / (tiles_m * tiles_n);
  const int64_t m_off = (blockIdx.x / tiles_n % tiles_m) * TM, n_off = (blockIdx.x % tiles_n) * TN;
  // Block row of block p: the last r with row_offsets[r] <= p (binary search; row_offsets is non-decreasing).
  int64_t lo = 0, hi = n_brow;
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (row_offsets[mid] <= p) lo = mid;
    else hi = mid;
  }
  const int64_t o0 = lo * bo + m_off, i0 = int64_t(col_indices[p]) * bi + n_off;
  const int iters = int((T_tokens + kBK - 1) / kBK);

  auto load_stage = [&](int s, int it) {
    const int64_t tb = int64_t(it) * kBK;
#pragma unroll
    for (int j = 0; j < (kBK * TM / 8 + kThreads - 1) / kThreads; ++j) {
      const int ch = tid + j * kThreads;
      if (ch < kBK * TM / 8) {
        const int r = ch / (TM / 8), cc = (ch % (TM / 8)) * 8;
        const bool ok = tb + r < T_tokens && o0 + cc < out;
        cp_async16(&As[s][r][cc], ok ? dy + (tb + r) * lddy + o0 + cc : dy, ok ? 16 : 0);
      }
    }
#pragma unroll
    for (int j = 0; j < (kBK * TN / 8 + kThreads - 1) / kThreads; ++j) {
      const int ch = tid + j * kThreads;
      if (ch < kBK * TN / 8) {
        const int r = ch / (TN / 8), cc = (ch % (TN / 8)) * 8;
        const bool ok = tb + r < T_tokens && i0 + cc < in;
        cp_async16(&Bs[s][r][cc], ok ? x + (tb + r) * ldx + i0 + cc : x, ok ? 16 : 0);
      }
    }
  };

  float acc[kMI][kNJ][4];
#pragma unroll
  for (int i = 0; i < kMI; ++i)
#pragma unroll
    for (int j = 0; j < kNJ; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < iters) load_stage(s, s);
    cp_async_commit();
  }
  for (int it = 0; it < iters; ++it) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    if (it + kStages - 1 < iters) load_stage((it + kStages - 1) % kStages, it + kStages - 1);
    cp_async_commit();
    const int s = it % kStages;
#pragma unroll
    for (int kk = 0; kk < kBK / 16; ++kk) {
      uint32_t af[kMI][4];
#pragma unroll
      for (int mi = 0; mi < kMI; ++mi)  // A = dY^T, stored [k][m]: transposed load gives the row-major fragment
        ldmatrix_x4_trans(
            af[mi], &As[s][kk * 16 + (lane & 7) + (lane >> 4) * 8][wm * (TM / 2) + mi * 16 + ((lane >> 3) & 1) * 8]);
#pragma unroll
      for (int nj = 0; nj < kNJ; nj += 2) {
        uint32_t bf[4];
        ldmatrix_x4_trans(
            bf, &Bs[s][kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8][wn * (TN / 2) + nj * 8 + (lane >> 4) * 8]);
        const uint32_t b0[2] = {bf[0], bf[1]}, b1[2] = {bf[2], bf[3]};
#pragma unroll
        for (int mi = 0; mi < kMI; ++mi) {
          mma_16816<T>(acc[mi][nj], af[mi], b0);
          mma_16816<T>(acc[mi][nj + 1], af[mi], b1);
        }
      }
    }
  }
  cp_async_wait<0>();

  // Block p is stored [bi][bo]: element (o, i) at i * bo + o.
  T* blk = dw + p * bo * bi;
  const int g = lane >> 2, q = lane & 3;
#pragma unroll
  for (int mi = 0; mi < kMI; ++mi)
#pragma unroll
    for (int nj = 0; nj < kNJ; ++nj)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t o = m_off + wm * (TM / 2) + mi * 16 + g + 8 * (e >> 1);
        const int64_t i = n_off + wn * (TN / 2) + nj * 8 + 2 * q + (e & 1);
        blk[i * bo + o] = from_acc<T>(acc[mi][nj][e]);
      }
}

// ---- SIMT fallbacks (any dtype, block shape and alignment) ---------------------------------------------------

template <typename T>
__global__ void bsr_fwd_simt(BsrShape s, const T* __restrict__ x, int64_t ldx, const T* __restrict__ w,
                             const int32_t* __restrict__ ro, const int32_t* __restrict__ ci, const T* __restrict__ bias,
                             Act act, T* __restrict__ y) {
  using A = typename AccT<T>::type;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < s.T * s.out;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = e / s.out, o = e % s.out, r = o / s.bo, ol = o % s.bo;
    A acc = 0;
    for (int32_t p = ro[r]; p < ro[r + 1]; ++p) {
      const int64_t i0 = int64_t(ci[p]) * s.bi, ib = min(s.bi, s.in - i0);
      const T* wb = w + int64_t(p) * s.bo * s.bi + ol;
      const T* xr = x + t * ldx + i0;
      for (int64_t k = 0; k < ib; ++k) acc += to_acc(xr[k]) * to_acc(wb[k * s.bo]);
    }
    if (bias != nullptr) acc += to_acc(bias[o]);
    y[e] = from_acc<T>(apply_act(acc, act));
  }
}

template <typename T>
__global__ void bsr_grad_input_simt(BsrShape s, const T* __restrict__ dy, int64_t lddy, const T* __restrict__ w,
                                    const int32_t* __restrict__ co, const int32_t* __restrict__ ri,
                                    const int32_t* __restrict__ perm, T* __restrict__ dx) {
  using A = typename AccT<T>::type;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < s.T * s.in;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = e / s.in, i = e % s.in, c = i / s.bi, il = i % s.bi;
    A acc = 0;
    for (int32_t q = co[c]; q < co[c + 1]; ++q) {
      const int64_t o0 = int64_t(ri[q]) * s.bo, ob = min(s.bo, s.out - o0);
      const T* wb = w + int64_t(perm[q]) * s.bo * s.bi + il * s.bo;
      const T* dyr = dy + t * lddy + o0;
      for (int64_t o = 0; o < ob; ++o) acc += to_acc(dyr[o]) * to_acc(wb[o]);
    }
    dx[e] = from_acc<T>(acc);
  }
}

template <typename T>
__global__ void bsr_sddmm_simt(BsrShape s, int64_t n_brow, const T* __restrict__ dy, int64_t lddy,
                               const T* __restrict__ x, int64_t ldx, const int32_t* __restrict__ ro,
                               const int32_t* __restrict__ ci, T* __restrict__ dw) {
  using A = typename AccT<T>::type;
  const int64_t bsz = s.bo * s.bi;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < s.nnz * bsz;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t p = e / bsz, il = (e % bsz) / s.bo, ol = e % s.bo;  // element (ol, il) at il * bo + ol
    int64_t lo = 0, hi = n_brow;
    while (hi - lo > 1) {
      const int64_t mid = (lo + hi) / 2;
      if (ro[mid] <= p) lo = mid;
      else hi = mid;
    }
    const int64_t o = lo * s.bo + ol, i = int64_t(ci[p]) * s.bi + il;
    A acc = 0;
    if (o < s.out && i < s.in)  // outside a ragged edge block the gradient is exactly zero
      for (int64_t t = 0; t < s.T; ++t) acc += to_acc(dy[t * lddy + o]) * to_acc(x[t * ldx + i]);
    dw[e] = from_acc<T>(acc);
  }
}

int simt_blocks(int64_t work) {
  return int(std::max<int64_t>(1, std::min<int64_t>(ceil_div(work, 256), 1 << 16)));
}

template <typename F>
cudaError_t dispatch16(DType dt, F&& f) {
  if (dt == DType::F16) return f(__half{});
  if (dt == DType::BF16) return f(__nv_bfloat16{});
  return cudaErrorInvalidValue;
}

// Whether the tensor-core kernels take this problem: 16-bit types, whole 32-wide sub-tiles in every block, and
// 16-byte cp.async chunks that never straddle a matrix edge or a misaligned address.
bool bsr_tc_supported(DType dt, const BsrShape& s, int64_t ld_a, const void* a, const void* c) {
  return (dt == DType::F16 || dt == DType::BF16) && s.bo % 32 == 0 && s.bi % 32 == 0 && s.in % 8 == 0 &&
         s.out % 8 == 0 && ld_a % 8 == 0 && aligned16(a) && aligned16(c);
}

}  // namespace

cudaError_t bsr_linear(DType dt, const BsrShape& s, const void* x, int64_t ldx, const void* values,
                       const int32_t* row_offsets, const int32_t* col_indices, const void* bias, Act act, void* y,
                       cudaStream_t stream) {
  if (s.T == 0 || s.out == 0) return cudaSuccess;
  const int64_t n_brow = ceil_div(s.out, s.bo);
  if (bsr_tc_supported(dt, s, ldx, x, values) && ceil_div(s.T, kBM) <= 65535) {
    return dispatch16(dt, [&](auto tag) -> cudaError_t {
      using T = decltype(tag);
      const auto* xp = static_cast<const T*>(x);
      const auto* wp = static_cast<const T*>(values);
      const auto* bp = static_cast<const T*>(bias);
      auto* yp = static_cast<T*>(y);
      if (s.bo % 64 == 0) {
        const dim3 grid(unsigned(n_brow * (s.bo / 64)), unsigned(ceil_div(s.T, kBM)));
        bsr_tc_kernel<T, 64, false><<<grid, kThreads, 0, stream>>>(s.T, s.in, s.out, s.bo, s.bi, xp, ldx, wp,
                                                                   row_offsets, col_indices, nullptr, bp, act, yp);
      } else {
        const dim3 grid(unsigned(n_brow * (s.bo / 32)), unsigned(ceil_div(s.T, kBM)));
        bsr_tc_kernel<T, 32, false><<<grid, kThreads, 0, stream>>>(s.T, s.in, s.out, s.bo, s.bi, xp, ldx, wp,
                                                                   row_offsets, col_indices, nullptr, bp, act, yp);
      }
      SK_LAUNCH_CHECK();
      return cudaSuccess;
    });
  }
  return dispatch_dtype(dt, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    bsr_fwd_simt<T><<<simt_blocks(s.T * s.out), 256, 0, stream>>>(
        s, static_cast<const T*>(x), ldx, static_cast<const T*>(values), row_offsets, col_indices,
        static_cast<const T*>(bias), act, static_cast<T*>(y));
    SK_LAUNCH_CHECK();
    return cudaSuccess;
  });
}

cudaError_t bsr_linear_grad_input(DType dt, const BsrShape& s, const void* dy, int64_t lddy, const void* values,
                                  const int32_t* col_offsets, const int32_t* row_indices, const int32_t* block_perm,
                                  void* dx, cudaStream_t stream) {
  if (s.T == 0 || s.in == 0) return cudaSuccess;
  const int64_t n_bcol = ceil_div(s.in, s.bi);
  if (bsr_tc_supported(dt, s, lddy, dy, values) && ceil_div(s.T, kBM) <= 65535) {
    return dispatch16(dt, [&](auto tag) -> cudaError_t {
      using T = decltype(tag);
      const auto* gp = static_cast<const T*>(dy);
      const auto* wp = static_cast<const T*>(values);
      auto* xp = static_cast<T*>(dx);
      if (s.bi % 64 == 0) {
        const dim3 grid(unsigned(n_bcol * (s.bi / 64)), unsigned(ceil_div(s.T, kBM)));
        bsr_tc_kernel<T, 64, true><<<grid, kThreads, 0, stream>>>(
            s.T, s.out, s.in, s.bo, s.bi, gp, lddy, wp, col_offsets, row_indices, block_perm, nullptr, Act::None, xp);
      } else {
        const dim3 grid(unsigned(n_bcol * (s.bi / 32)), unsigned(ceil_div(s.T, kBM)));
        bsr_tc_kernel<T, 32, true><<<grid, kThreads, 0, stream>>>(
            s.T, s.out, s.in, s.bo, s.bi, gp, lddy, wp, col_offsets, row_indices, block_perm, nullptr, Act::None, xp);
      }
      SK_LAUNCH_CHECK();
      return cudaSuccess;
    });
  }
  return dispatch_dtype(dt, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    bsr_grad_input_simt<T><<<simt_blocks(s.T * s.in), 256, 0, stream>>>(s, static_cast<const T*>(dy), lddy,
                                                                        static_cast<const T*>(values), col_offsets,
                                                                        row_indices, block_perm, static_cast<T*>(dx));
    SK_LAUNCH_CHECK();
    return cudaSuccess;
  });
}

cudaError_t bsr_sddmm(DType dt, const BsrShape& s, const void* dy, int64_t lddy, const void* x, int64_t ldx,
                      const int32_t* row_offsets, const int32_t* col_indices, void* dw, cudaStream_t stream) {
  if (s.nnz == 0) return cudaSuccess;
  const int64_t n_brow = ceil_div(s.out, s.bo);
  const bool tc = bsr_tc_supported(dt, s, lddy, dy, dw) && ldx % 8 == 0 && aligned16(x);
  if (tc) {
    return dispatch16(dt, [&](auto tag) -> cudaError_t {
      using T = decltype(tag);
      const auto* gp = static_cast<const T*>(dy);
      const auto* xp = static_cast<const T*>(x);
      auto* wp = static_cast<T*>(dw);
      const bool big = s.bo % 64 == 0 && s.bi % 64 == 0;
      const int tile = big ? 64 : 32;
      const int64_t ctas = s.nnz * (s.bo / tile) * (s.bi / tile);
      if (ctas > INT32_MAX) return cudaErrorInvalidConfiguration;
      if (big)
        bsr_sddmm_tc_kernel<T, 64, 64><<<unsigned(ctas), kThreads, 0, stream>>>(
            s.T, s.out, s.in, s.bo, s.bi, n_brow, gp, lddy, xp, ldx, row_offsets, col_indices, wp);
      else
        bsr_sddmm_tc_kernel<T, 32, 32><<<unsigned(ctas), kThreads, 0, stream>>>(
            s.T, s.out, s.in, s.bo, s.bi, n_brow, gp, lddy, xp, ldx, row_offsets, col_indices, wp);
      SK_LAUNCH_CHECK();
      return cudaSuccess;
    });
  }
  return dispatch_dtype(dt, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    bsr_sddmm_simt<T><<<simt_blocks(s.nnz * s.bo * s.bi), 256, 0, stream>>>(s, n_brow, static_cast<const T*>(dy), lddy,
                                                                            static_cast<const T*>(x), ldx, row_offsets,
                                                                            col_indices, static_cast<T*>(dw));
    SK_LAUNCH_CHECK();
    return cudaSuccess;
  });
}

}  // namespace sparsekern::cuda
