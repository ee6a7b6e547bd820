// Unstructured sparsity on CUDA cores: a BlockSparseWeight with 1x1 blocks is a CSR matrix, and bsr.cu's
// one-thread-per-output fallback re-reads each row's metadata once per token and gathers x with no reuse. These
// kernels are a row-split CSR SpMM (the design of Sputnik's and cuSPARSE's CSR kernels: rows mapped to warps or
// groups of lanes, the row's nonzeros staged once and broadcast, the dense operand read along its contiguous
// dimension), for every dtype (fp32 accumulation for fp16/bf16 and fp32, fp64 for fp64).
//
// Maths (W [N = out, K = in], nonzero j at (r_j, c_j) holding v_j; X [T, K], dY [T, N]):
//   forward     Y[t, r]  = act(sum_{j in row r} v_j X[t, c_j] + b[r])
//   grad input  dX[t, c] = sum_{k in column c} v_{perm_k} dY[t, r_k]        (col_offsets / row_indices / block_perm)
//   sddmm       dW[j]    = sum_t dY[t, r_j] X[t, c_j]
// The forward and the grad input are one kernel walking "rows" (rows of W, or its columns through the transposed
// metadata) and gathering the matching features of its dense operand A (X or dY).
//
// Token-major copy. Every multiply-add gathers its own A[t, c_j]. Read from row-major A [T, F] with lanes along
// tokens, a warp's 32 loads are 32 rows apart (one useful element per 32-byte sector); with lanes along the
// nonzeros, one token's gathers span ~32/density columns (at density 0.1 a sector serves ~1.6 useful 16-bit
// elements of 16). So for T > kGemvMaxT the launcher first copies A token-major, A^T [F, TP] (TP = T rounded up to
// 8, the pad zeroed), with a 32x32 shared-memory transpose: a gather of feature c is then TP-contiguous tokens, and
// each lane loads 16 bytes (V = 8 / 4 / 2 tokens of a 16-bit / fp32 / fp64 type), whole sectors. The copy moves
// T*F elements once against the T*nnz the kernel gathers: 2 / (density * rows) of the traffic (N = 4096, d = 0.1:
// 0.5%). The alternative without a copy, a CTA staging X[t-tile, k-tile] through shared memory and walking each
// row's columns inside the k-tile, reads the whole X tile per 32 rows (1 / (32 d) of the gathers: 30% at d = 0.1,
// 300% at d = 0.01): worse at the densities where a CSR kernel is worth running. The pad is zero so that the
// SDDMM's token sums need no mask; the forward never stores a pad token.
//
// Kernels and when each runs (SPARSEKERN_CUDA_CSR forces one, for tests and benchmarks; see kernels.h):
//   gemv    T <= kGemvMaxT (decode): a warp per row, lanes along the row's nonzeros (4 in flight per lane),
//           tokens in groups of TT = 1 or 4 held in registers, a shuffle reduction per token; reads A row-major
//           (a few rows: L1-resident), no copy. The SDDMM twin: a warp per row, lane per nonzero, tokens looped.
//   narrow  forward / grad input otherwise: a CTA of 4 warps owns 32 rows x BT tokens; a group of SUB = 4 lanes
//           walks one row (8 rows per warp at once), staging the row's nonzeros 8 at a time (column + value, one
//           8/16-byte shared-memory broadcast per nonzero) and gathering A^T[c_j, BT tokens] as one 16-byte vector
//           per lane (BT = 4 V = 32 / 16 / 8 tokens), 4 gathers in flight. The warp runs as many chunk steps as
//           its longest row needs, so its __syncwarp()s are full-warp (a finished group idles). The [BT x 32]
//           output tile goes through shared memory so that Y is stored coalesced along the outputs. Row groups
//           vary fastest on the grid: the CTAs running together share the A^T slab of one token tile, K x 64
//           bytes (256 KiB at K = 4096), about an SM's L1.
//   wide    the same kernel with SUB = 32 (a warp per row, BT = 256 / 128 / 64 tokens): 512-byte gathers, no
//           divergence between rows, 8x the slab. The SDDMM's default for T >= 2 x BT.
//   sddmm   (narrow / wide) a group of SUB lanes per chunk of 8 consecutive nonzeros (row of the first by a
//           binary search of row_offsets, then walked forward), lanes along tokens: per 16-byte token step the
//           dY^T row is loaded once per row change and the 8 X^T columns gathered; 8 accumulators per lane,
//           shuffle-reduced over the group at the end. No atomics: every dW[j] is written once.
// Only stored nonzeros are ever multiplied (no padding of a row's chunk with other rows' entries), so NaN/Inf in
// A reach exactly the outputs whose row stores that column; empty rows give act(bias) (0 for the grad input).
//
// Not measured (no GPU where this was written). Like the Triton version (kernels/csr.py) the gathers bound it:
// about d*T*N*K elements from L2 (L1 when the slab fits), against cuBLAS's tensor cores; beating dense needs very
// high sparsity. benchmarks/gpu_cuda.py times gemv / narrow / wide, the old SIMT path and cuBLAS.
#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "common.cuh"

namespace sparsekern::cuda {
namespace {

constexpr int kPitch = 8;      // token pitch multiple of the copies: 16-byte rows for every dtype
constexpr int kThreads = 128;  // narrow / wide / sddmm CTAs: 4 warps
constexpr int kWarps = kThreads / 32;
constexpr int kRowsPerWarp = 8;  // narrow / wide: rows of one warp
constexpr int kRowsPerCta = kWarps * kRowsPerWarp;
constexpr int kGemvWarps = 8;   // gemv CTAs: one row per warp
constexpr int kGemvMaxT = 4;    // auto: T <= this takes gemv
constexpr int kSddmmChunk = 8;  // nonzeros per lane group in the token-major SDDMM
constexpr int kMaxGridY = 65535;

// Elements of T in one 16-byte load: tokens per lane in the token-major kernels.
template <typename T>
constexpr int kVec = 16 / int(sizeof(T));

int elem_size(DType dt) {
  return dt == DType::F64 ? 8 : dt == DType::F32 ? 4 : 2;
}

int64_t token_pitch(int64_t n_tok) {
  return ceil_div(n_tok, kPitch) * kPitch;
}

size_t round256(size_t b) {
  return (b + 255) / 256 * 256;
}

bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

// ---- device helpers ----------------------------------------------------------------------------------------------

// One column index and its value (in the accumulation type), read by a whole lane group as one 8/16-byte
// shared-memory broadcast.
template <typename A>
struct alignas(2 * sizeof(A)) Entry {
  int32_t col;
  A val;
};

__device__ __forceinline__ uint4 ldg16(const void* p) {
  return __ldg(reinterpret_cast<const uint4*>(p));
}

// 16 bytes of T -> the accumulation type.
template <typename T>
struct Unpack;
template <>
struct Unpack<float> {
  static __device__ __forceinline__ void run(const uint4& u, float (&o)[4]) {
    o[0] = __uint_as_float(u.x), o[1] = __uint_as_float(u.y), o[2] = __uint_as_float(u.z), o[3] = __uint_as_float(u.w);
  }
};
template <>
struct Unpack<double> {
  static __device__ __forceinline__ void run(const uint4& u, double (&o)[2]) {
    o[0] = __hiloint2double(int(u.y), int(u.x)), o[1] = __hiloint2double(int(u.w), int(u.z));
  }
};
template <>
struct Unpack<__half> {
  static __device__ __forceinline__ void run(const uint4& u, float (&o)[8]) {
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      o[2 * i] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] & 0xffffu)));
      o[2 * i + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] >> 16)));
    }
  }
};
template <>
struct Unpack<__nv_bfloat16> {
  static __device__ __forceinline__ void run(const uint4& u, float (&o)[8]) {
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // a bf16 is the top half of an fp32: exact
      o[2 * i] = __uint_as_float(w[i] << 16);
      o[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  }
};

// ---- token-major copy --------------------------------------------------------------------------------------------

// at [f, tp] = a [t, f] for t < n_tok, 0 for n_tok <= t < tp. 32x32 tiles through shared memory (reads along f,
// writes along t, both coalesced); token tiles grid-strided on axis y.
template <typename T>
__global__ void __launch_bounds__(256) token_major_kernel(int64_t n_tok, int64_t feat, const T* __restrict__ a,
                                                          int64_t lda, int64_t tp, T* __restrict__ at) {
  __shared__ T tile[32][33];
  const int tx = threadIdx.x & 31, ty = threadIdx.x >> 5;
  const int64_t f0 = int64_t(blockIdx.x) * 32;
  for (int64_t t0 = int64_t(blockIdx.y) * 32; t0 < tp; t0 += int64_t(gridDim.y) * 32) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int i = ty + 8 * k;
      const int64_t t = t0 + i, f = f0 + tx;
      tile[i][tx] = t < n_tok && f < feat ? a[t * lda + f] : from_acc<T>(0);
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int i = ty + 8 * k;
      const int64_t f = f0 + i, t = t0 + tx;
      if (f < feat && t < tp) at[f * tp + t] = tile[tx][i];
    }
    __syncthreads();
  }
}

// ---- forward / grad input, token-major (narrow: SUB = 4, wide: SUB = 32) ------------------------------------------

// acc[V] += sum over the n staged entries of val * at[col, lane's V tokens]; 4 gathers in flight.
template <typename T, typename A, int V>
__device__ __forceinline__ void gather_entries(const Entry<A>* ent, int n, const T* xcol, int64_t tp, A (&acc)[V]) {
  int k = 0;
  for (; k + 4 <= n; k += 4) {
    uint4 raw[4];
    A w[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const Entry<A> e = ent[k + u];
      w[u] = e.val;
      raw[u] = ldg16(xcol + int64_t(e.col) * tp);
    }
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      A xv[V];
      Unpack<T>::run(raw[u], xv);
#pragma unroll
      for (int i = 0; i < V; ++i) acc[i] += w[u] * xv[i];
    }
  }
  // Tail loops stay rolled: unrolled, they made ptxas (nvcc 13.0) spill a few bytes at ~48 registers.
#pragma unroll 1
  for (; k < n; ++k) {
    const Entry<A> e = ent[k];
    A xv[V];
    Unpack<T>::run(ldg16(xcol + int64_t(e.col) * tp), xv);
#pragma unroll
    for (int i = 0; i < V; ++i) acc[i] += e.val * xv[i];
  }
}

// c [n_tok, m] (rows walked: m; row r's nonzeros offsets[r]..offsets[r+1], feature indices[p], value
// values[perm ? perm[p] : p]) from the token-major copy at [*, tp]. grid: (ceil(m / 32), token tiles of BT).
template <typename T, int SUB, bool PERM>
__global__ void __launch_bounds__(kThreads)
    csr_rows_kernel(int64_t n_tok, int64_t tp, int64_t m, const T* __restrict__ at, const T* __restrict__ values,
                    const int32_t* __restrict__ offsets, const int32_t* __restrict__ indices,
                    const int32_t* __restrict__ perm, const T* __restrict__ bias, Act act, T* __restrict__ c) {
  using A = typename AccT<T>::type;
  constexpr int V = kVec<T>;                 // tokens per lane (one 16-byte load)
  constexpr int BT = SUB * V;                // tokens per CTA tile
  constexpr int kGroups = 32 / SUB;          // rows one warp walks at once
  constexpr int kChunk = SUB < 8 ? 8 : SUB;  // nonzeros staged per refill
  constexpr int kPasses = kRowsPerWarp / kGroups;
  constexpr int kOutPitch = kRowsPerCta + 2;  // output tile row pitch (elements)
  static_assert(kRowsPerWarp % kGroups == 0 && kChunk % SUB == 0, "lane groups must tile the warp's rows");
  // One slice per lane group, padded by one entry: the groups of a warp broadcast from distinct banks.
  __shared__ Entry<A> meta[kThreads / SUB][kChunk + 1];
  __shared__ T out_s[BT][kOutPitch];

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, sl = lane % SUB;
  Entry<A>* const ent = meta[threadIdx.x / SUB];
  const int64_t r0 = int64_t(blockIdx.x) * kRowsPerCta;
  const int rows_here = int(min(int64_t(kRowsPerCta), m - r0));
  const int64_t tiles = (n_tok + BT - 1) / BT;
  const int tl = sl * V;  // the lane's first token in the tile

  for (int64_t tile = blockIdx.y; tile < tiles; tile += gridDim.y) {
    const int64_t t0 = tile * BT;
    const bool live = t0 + tl < tp;  // tp % V == 0: the lane's V tokens are all inside the copy or all outside
    const T* const xcol = at + t0 + tl;
#pragma unroll 1
    for (int pass = 0; pass < kPasses; ++pass) {
      const int rl = warp * kRowsPerWarp + pass * kGroups + lane / SUB;
      const bool has_row = rl < rows_here;
      const int64_t r = r0 + rl;
      const int32_t begin = has_row ? offsets[r] : 0, end = has_row ? offsets[r + 1] : 0;
      // The warp walks max-over-its-groups chunks, every lane of it in every step: the __syncwarp()s stay
      // full-warp and unconditional (a group whose row has ended stages and gathers nothing).
      const unsigned chunks = unsigned(end - begin + kChunk - 1) / kChunk;
      const unsigned warp_chunks = SUB == 32 ? chunks : __reduce_max_sync(0xffffffffu, chunks);
      A acc[V];
#pragma unroll
      for (int i = 0; i < V; ++i) acc[i] = A(0);
      for (unsigned ch = 0; ch < warp_chunks; ++ch) {
        const int32_t p0 = begin + int32_t(ch) * kChunk;
        const int n = max(0, min(kChunk, end - p0));
        __syncwarp();  // the previous chunk has been read
#pragma unroll
        for (int e = 0; e < kChunk / SUB; ++e) {
          const int k = e * SUB + sl;
          if (k < n) {
            const int32_t p = p0 + k;
            ent[k] = Entry<A>{indices[p], to_acc(values[PERM ? perm[p] : p])};
          }
        }
        __syncwarp();
        if (live) gather_entries<T, A, V>(ent, n, xcol, tp, acc);
      }
      if (has_row) {
        const A b = bias != nullptr ? to_acc(bias[r]) : A(0);
#pragma unroll
        for (int i = 0; i < V; ++i) out_s[tl + i][rl] = from_acc<T>(apply_act(acc[i] + b, act));
      }
    }
    __syncthreads();
    // The tile's outputs, stored along the rows: a warp writes 32 consecutive outputs of one token.
    for (int i = threadIdx.x; i < BT * kRowsPerCta; i += kThreads) {
      const int tt = i / kRowsPerCta, rr = i % kRowsPerCta;
      const int64_t t = t0 + tt;
      if (t < n_tok && rr < rows_here) c[t * m + r0 + rr] = out_s[tt][rr];
    }
    __syncthreads();
  }
}

// ---- forward / grad input, small T (gemv) ------------------------------------------------------------------------

// One warp per row r, lanes along its nonzeros; tokens in groups of TT (grid axis y, strided). a is row-major.
template <typename T, int TT, bool PERM>
__global__ void __launch_bounds__(kGemvWarps * 32)
    csr_gemv_kernel(int64_t n_tok, int64_t m, const T* __restrict__ a, int64_t lda, const T* __restrict__ values,
                    const int32_t* __restrict__ offsets, const int32_t* __restrict__ indices,
                    const int32_t* __restrict__ perm, const T* __restrict__ bias, Act act, T* __restrict__ c) {
  using A = typename AccT<T>::type;
  const int lane = threadIdx.x & 31;
  const int64_t r = int64_t(blockIdx.x) * kGemvWarps + (threadIdx.x >> 5);
  if (r >= m) return;  // whole warps only: the shuffles below see all 32 lanes
  const int32_t begin = offsets[r], end = offsets[r + 1];
  const A b = bias != nullptr ? to_acc(bias[r]) : A(0);
  const int64_t groups = (n_tok + TT - 1) / TT;
  for (int64_t g = blockIdx.y; g < groups; g += gridDim.y) {
    const int64_t t0 = g * TT;
    const int nt = int(min(int64_t(TT), n_tok - t0));
    // Token rows past the end re-read the last one: their sums are never stored, so no branch is needed.
    const T* arow[TT];
#pragma unroll
    for (int tt = 0; tt < TT; ++tt) arow[tt] = a + (t0 + min(tt, nt - 1)) * lda;
    A acc[TT];
#pragma unroll
    for (int tt = 0; tt < TT; ++tt) acc[tt] = A(0);
    int32_t p = begin + lane;
    for (; p + 96 < end; p += 128) {  // 4 nonzeros per lane in flight
      int32_t col[4];
      A w[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int32_t q = p + 32 * u;
        col[u] = indices[q];
        w[u] = to_acc(values[PERM ? perm[q] : q]);
      }
#pragma unroll
      for (int u = 0; u < 4; ++u)
#pragma unroll
        for (int tt = 0; tt < TT; ++tt) acc[tt] += w[u] * to_acc(arow[tt][col[u]]);
    }
#pragma unroll 1  // see gather_entries
    for (; p < end; p += 32) {
      const int32_t col = indices[p];
      const A w = to_acc(values[PERM ? perm[p] : p]);
#pragma unroll
      for (int tt = 0; tt < TT; ++tt) acc[tt] += w * to_acc(arow[tt][col]);
    }
#pragma unroll
    for (int tt = 0; tt < TT; ++tt) {
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) acc[tt] += __shfl_xor_sync(0xffffffffu, acc[tt], off);
      if (lane == tt && tt < nt) c[(t0 + tt) * m + r] = from_acc<T>(apply_act(acc[tt] + b, act));
    }
  }
}

// ---- SDDMM ---------------------------------------------------------------------------------------------------------

// Token-major (narrow: SUB = 4, wide: SUB = 32): a group of SUB lanes per chunk of kSddmmChunk consecutive
// nonzeros, lanes along tokens. gt [m, tp], xt [*, tp], zero past the last token.
template <typename T, int SUB>
__global__ void __launch_bounds__(kThreads)
    csr_sddmm_kernel(int64_t tp, int64_t m, int64_t nnz, const T* __restrict__ gt, const T* __restrict__ xt,
                     const int32_t* __restrict__ row_offsets, const int32_t* __restrict__ col_indices,
                     T* __restrict__ dw) {
  using A = typename AccT<T>::type;
  constexpr int V = kVec<T>;
  constexpr int CH = kSddmmChunk;
  const int lane = threadIdx.x & 31, sl = lane % SUB;
  const int64_t group = int64_t(blockIdx.x) * (kThreads / SUB) + threadIdx.x / SUB;
  const int64_t j0 = group * CH;
  // Row of j0: the last r with row_offsets[r] <= j0 (row_offsets[m] = nnz > j0; empty rows never qualify).
  int64_t r = 0;
  if (j0 < nnz) {
    int64_t hi = m;
    while (hi - r > 1) {
      const int64_t mid = (r + hi) / 2;
      if (row_offsets[mid] <= j0) r = mid;
      else hi = mid;
    }
  }
  int32_t row[CH], col[CH];
#pragma unroll
  for (int e = 0; e < CH; ++e) {
    const int64_t j = j0 + e;
    row[e] = 0, col[e] = 0;
    if (j < nnz) {
      while (row_offsets[r + 1] <= j) ++r;
      row[e] = int32_t(r), col[e] = col_indices[j];
    }
  }
  A acc[CH];
#pragma unroll
  for (int e = 0; e < CH; ++e) acc[e] = A(0);
  for (int64_t t = int64_t(sl) * V; t < tp; t += int64_t(SUB) * V) {
    A g[V] = {};
    int32_t g_row = -1;
#pragma unroll
    for (int e = 0; e < CH; ++e) {
      if (j0 + e >= nnz) break;  // uniform over the lane group
      if (row[e] != g_row) {     // mostly once per chunk: its nonzeros share a row
        Unpack<T>::run(ldg16(gt + int64_t(row[e]) * tp + t), g);
        g_row = row[e];
      }
      A xv[V];
      Unpack<T>::run(ldg16(xt + int64_t(col[e]) * tp + t), xv);
#pragma unroll
      for (int i = 0; i < V; ++i) acc[e] += g[i] * xv[i];
    }
  }
  // Every lane of the warp gets here (no early exit), so the full-mask shuffles are well defined; offsets below
  // SUB stay within the lane group.
#pragma unroll
  for (int e = 0; e < CH; ++e) {
    A v = acc[e];
#pragma unroll
    for (int off = SUB / 2; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    if (sl == 0 && j0 + e < nnz) dw[j0 + e] = from_acc<T>(v);
  }
}

// Small T: one warp per row, a lane per nonzero, the tokens looped over (row-major dy and x, no copy).
template <typename T>
__global__ void __launch_bounds__(kGemvWarps * 32)
    csr_sddmm_rows_kernel(int64_t n_tok, int64_t m, const T* __restrict__ dy, int64_t lddy, const T* __restrict__ x,
                          int64_t ldx, const int32_t* __restrict__ row_offsets, const int32_t* __restrict__ col_indices,
                          T* __restrict__ dw) {
  using A = typename AccT<T>::type;
  const int64_t r = int64_t(blockIdx.x) * kGemvWarps + (threadIdx.x >> 5);
  if (r >= m) return;
  const int32_t end = row_offsets[r + 1];
  for (int32_t p = row_offsets[r] + int32_t(threadIdx.x & 31); p < end; p += 32) {
    const int64_t cj = col_indices[p];
    A acc = A(0);
    for (int64_t t = 0; t < n_tok; ++t) acc += to_acc(dy[t * lddy + r]) * to_acc(x[t * ldx + cj]);
    dw[p] = from_acc<T>(acc);
  }
}

// ---- host side -----------------------------------------------------------------------------------------------------

enum class Kind { Gemv, Narrow, Wide };

Kind resolve(CsrKernel k, CsrOp op, DType dt, const BsrShape& s) {
  if (k == CsrKernel::Gemv) return Kind::Gemv;
  if (k == CsrKernel::Narrow) return Kind::Narrow;
  if (k == CsrKernel::Wide) return Kind::Wide;
  // Auto. No nonzeros: the gemv walk of empty rows (nothing to copy).
  if (s.T <= kGemvMaxT || s.nnz == 0) return Kind::Gemv;
  if (op == CsrOp::Sddmm && s.T >= 2 * 32 * (16 / elem_size(dt))) return Kind::Wide;
  return Kind::Narrow;
}

unsigned grid_y(int64_t n) {
  return unsigned(std::max<int64_t>(1, std::min<int64_t>(n, kMaxGridY)));
}

template <typename T>
cudaError_t launch_token_major(int64_t n_tok, int64_t feat, const T* a, int64_t lda, int64_t tp, T* at,
                               cudaStream_t stream) {
  if (feat == 0 || tp == 0) return cudaSuccess;
  if (ceil_div(feat, 32) > INT32_MAX) return cudaErrorInvalidConfiguration;
  const dim3 grid(unsigned(ceil_div(feat, 32)), grid_y(ceil_div(tp, 32)));
  token_major_kernel<T><<<grid, 256, 0, stream>>>(n_tok, feat, a, lda, tp, at);
  SK_LAUNCH_CHECK();
  return cudaSuccess;
}

// c [n_tok, m] from a [n_tok, f] (rows lda apart) walking m rows of a CSR pattern.
cudaError_t rows_op(Kind kind, DType dt, int64_t n_tok, int64_t m, int64_t f, const void* a, int64_t lda,
                    const void* values, const int32_t* offsets, const int32_t* indices, const int32_t* perm,
                    const void* bias, Act act, void* c, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  return dispatch_dtype(dt, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    const auto* ap = static_cast<const T*>(a);
    const auto* vp = static_cast<const T*>(values);
    const auto* bp = static_cast<const T*>(bias);
    auto* cp = static_cast<T*>(c);
    if (kind == Kind::Gemv) {
      if (ceil_div(m, kGemvWarps) > INT32_MAX) return cudaErrorInvalidConfiguration;
      const unsigned gx = unsigned(ceil_div(m, kGemvWarps));
      const int tt = n_tok == 1 ? 1 : 4;
      const dim3 grid(gx, grid_y(ceil_div(n_tok, tt)));
      const dim3 block(kGemvWarps * 32);
      if (tt == 1 && perm == nullptr)
        csr_gemv_kernel<T, 1, false>
            <<<grid, block, 0, stream>>>(n_tok, m, ap, lda, vp, offsets, indices, perm, bp, act, cp);
      else if (tt == 1)
        csr_gemv_kernel<T, 1, true>
            <<<grid, block, 0, stream>>>(n_tok, m, ap, lda, vp, offsets, indices, perm, bp, act, cp);
      else if (perm == nullptr)
        csr_gemv_kernel<T, 4, false>
            <<<grid, block, 0, stream>>>(n_tok, m, ap, lda, vp, offsets, indices, perm, bp, act, cp);
      else
        csr_gemv_kernel<T, 4, true>
            <<<grid, block, 0, stream>>>(n_tok, m, ap, lda, vp, offsets, indices, perm, bp, act, cp);
      SK_LAUNCH_CHECK();
      return cudaSuccess;
    }
    const int64_t tp = token_pitch(n_tok);
    if (workspace_bytes < size_t(f * tp) * sizeof(T) || !aligned16(workspace)) return cudaErrorInvalidValue;
    auto* at = static_cast<T*>(workspace);
    SK_CUDA_TRY(launch_token_major<T>(n_tok, f, ap, lda, tp, at, stream));
    if (ceil_div(m, kRowsPerCta) > INT32_MAX) return cudaErrorInvalidConfiguration;
    const unsigned gx = unsigned(ceil_div(m, kRowsPerCta));
    if (kind == Kind::Narrow) {
      const dim3 grid(gx, grid_y(ceil_div(n_tok, 4 * kVec<T>)));
      if (perm == nullptr)
        csr_rows_kernel<T, 4, false>
            <<<grid, kThreads, 0, stream>>>(n_tok, tp, m, at, vp, offsets, indices, perm, bp, act, cp);
      else
        csr_rows_kernel<T, 4, true>
            <<<grid, kThreads, 0, stream>>>(n_tok, tp, m, at, vp, offsets, indices, perm, bp, act, cp);
    } else {
      const dim3 grid(gx, grid_y(ceil_div(n_tok, 32 * kVec<T>)));
      if (perm == nullptr)
        csr_rows_kernel<T, 32, false>
            <<<grid, kThreads, 0, stream>>>(n_tok, tp, m, at, vp, offsets, indices, perm, bp, act, cp);
      else
        csr_rows_kernel<T, 32, true>
            <<<grid, kThreads, 0, stream>>>(n_tok, tp, m, at, vp, offsets, indices, perm, bp, act, cp);
    }
    SK_LAUNCH_CHECK();
    return cudaSuccess;
  });
}

}  // namespace

CsrKernel csr_kernel_from_env() {
  const char* v = std::getenv("SPARSEKERN_CUDA_CSR");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "auto") == 0) return CsrKernel::Auto;
  if (std::strcmp(v, "off") == 0) return CsrKernel::Off;
  if (std::strcmp(v, "gemv") == 0) return CsrKernel::Gemv;
  if (std::strcmp(v, "narrow") == 0) return CsrKernel::Narrow;
  if (std::strcmp(v, "wide") == 0) return CsrKernel::Wide;
  return CsrKernel::Invalid;
}

size_t csr_workspace_bytes(CsrOp op, CsrKernel k, DType dt, const BsrShape& s) {
  if (s.T == 0 || resolve(k, op, dt, s) == Kind::Gemv) return 0;
  const size_t row = size_t(token_pitch(s.T)) * size_t(elem_size(dt));
  switch (op) {
    case CsrOp::Linear: return round256(size_t(s.in) * row);
    case CsrOp::GradInput: return round256(size_t(s.out) * row);
    case CsrOp::Sddmm: return round256(size_t(s.out) * row) + round256(size_t(s.in) * row);
  }
  return 0;
}

cudaError_t csr_linear(CsrKernel k, DType dt, const BsrShape& s, const void* x, int64_t ldx, const void* values,
                       const int32_t* row_offsets, const int32_t* col_indices, const void* bias, Act act, void* y,
                       void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (s.bo != 1 || s.bi != 1 || k == CsrKernel::Off || k == CsrKernel::Invalid) return cudaErrorInvalidValue;
  if (s.T == 0 || s.out == 0) return cudaSuccess;
  return rows_op(resolve(k, CsrOp::Linear, dt, s), dt, s.T, s.out, s.in, x, ldx, values, row_offsets, col_indices,
                 nullptr, bias, act, y, workspace, workspace_bytes, stream);
}

cudaError_t csr_linear_grad_input(CsrKernel k, DType dt, const BsrShape& s, const void* dy, int64_t lddy,
                                  const void* values, const int32_t* col_offsets, const int32_t* row_indices,
                                  const int32_t* block_perm, void* dx, void* workspace, size_t workspace_bytes,
                                  cudaStream_t stream) {
  if (s.bo != 1 || s.bi != 1 || k == CsrKernel::Off || k == CsrKernel::Invalid) return cudaErrorInvalidValue;
  if (s.T == 0 || s.in == 0) return cudaSuccess;
  return rows_op(resolve(k, CsrOp::GradInput, dt, s), dt, s.T, s.in, s.out, dy, lddy, values, col_offsets, row_indices,
                 block_perm, nullptr, Act::None, dx, workspace, workspace_bytes, stream);
}

cudaError_t csr_sddmm(CsrKernel k, DType dt, const BsrShape& s, const void* dy, int64_t lddy, const void* x,
                      int64_t ldx, const int32_t* row_offsets, const int32_t* col_indices, void* dw, void* workspace,
                      size_t workspace_bytes, cudaStream_t stream) {
  if (s.bo != 1 || s.bi != 1 || k == CsrKernel::Off || k == CsrKernel::Invalid) return cudaErrorInvalidValue;
  if (s.nnz == 0) return cudaSuccess;
  const Kind kind = resolve(k, CsrOp::Sddmm, dt, s);
  return dispatch_dtype(dt, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    const auto* gp = static_cast<const T*>(dy);
    const auto* xp = static_cast<const T*>(x);
    auto* wp = static_cast<T*>(dw);
    if (kind == Kind::Gemv || s.T == 0) {  // T = 0: every dW[j] is an empty sum, written as 0
      if (ceil_div(s.out, kGemvWarps) > INT32_MAX) return cudaErrorInvalidConfiguration;
      csr_sddmm_rows_kernel<T><<<unsigned(ceil_div(s.out, kGemvWarps)), kGemvWarps * 32, 0, stream>>>(
          s.T, s.out, gp, lddy, xp, ldx, row_offsets, col_indices, wp);
      SK_LAUNCH_CHECK();
      return cudaSuccess;
    }
    const int64_t tp = token_pitch(s.T);
    const size_t g_bytes = round256(size_t(s.out * tp) * sizeof(T));
    if (workspace_bytes < g_bytes + size_t(s.in * tp) * sizeof(T) || !aligned16(workspace))
      return cudaErrorInvalidValue;
    auto* gt = static_cast<T*>(workspace);
    auto* xt = reinterpret_cast<T*>(static_cast<unsigned char*>(workspace) + g_bytes);
    SK_CUDA_TRY(launch_token_major<T>(s.T, s.out, gp, lddy, tp, gt, stream));
    SK_CUDA_TRY(launch_token_major<T>(s.T, s.in, xp, ldx, tp, xt, stream));
    const int64_t chunks = ceil_div(s.nnz, kSddmmChunk);
    if (kind == Kind::Narrow) {
      const int64_t ctas = ceil_div(chunks, kThreads / 4);
      if (ctas > INT32_MAX) return cudaErrorInvalidConfiguration;
      csr_sddmm_kernel<T, 4>
          <<<unsigned(ctas), kThreads, 0, stream>>>(tp, s.out, s.nnz, gt, xt, row_offsets, col_indices, wp);
    } else {
      const int64_t ctas = ceil_div(chunks, kThreads / 32);
      if (ctas > INT32_MAX) return cudaErrorInvalidConfiguration;
      csr_sddmm_kernel<T, 32>
          <<<unsigned(ctas), kThreads, 0, stream>>>(tp, s.out, s.nnz, gt, xt, row_offsets, col_indices, wp);
    }
    SK_LAUNCH_CHECK();
    return cudaSuccess;
  });
}

}  // namespace sparsekern::cuda
