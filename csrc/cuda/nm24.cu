// 2:4 sparsity on sparse tensor cores: Y = act(X W^T + b) with W 2:4-sparse along its input dimension.
//
// Computed as Y^T = W X^T, so that W is the sparse A operand of mma.sp.sync.aligned.m16n8k32 (fp16/bf16 in,
// fp32 accumulate) and X, read row-major as stored, is the "col" B operand. The weight is packed once, when it
// is built (nm24_pack), into the exact register order of the A fragments and metadata words (nm24_layout.h):
// the main loop then loads each lane's 8 kept values with one 16-byte shared-memory load and never decodes
// indices.
//
// CTA tile: 128 outputs x 128 tokens, 64 input columns per stage (2 mma k-steps, one metadata word per lane),
// 3-stage cp.async pipeline, 8 warps as 2 (outputs) x 4 (tokens), each warp 64 x 32 (4 x 4 mma tiles). The
// X tile is stored with its 16-byte chunks XOR-swizzled by row so that ldmatrix reads are conflict-free without
// padding. The epilogue adds the bias, applies the activation, transposes through shared memory and writes Y
// with 16-byte stores.
#include <algorithm>

#include "common.cuh"
#include "nm24_layout.h"

namespace sparsekern::cuda {
namespace {

constexpr int kBM = 128;  // outputs per CTA
constexpr int kBN = 128;  // tokens per CTA
constexpr int kBK = 64;   // logical input columns per stage
constexpr int kStages = 3;
constexpr int kThreads = 256;
constexpr int kMT = kBM / 16;  // 16-row A tiles per CTA

// Per-stage shared memory, in bytes: packed A (kMT tiles x 2 k-tiles x 512 B), metadata (kMT x 32 words), X.
constexpr int kASmem = kMT * 2 * 32 * 8 * 2;
constexpr int kMSmem = kMT * 32 * 4;
constexpr int kXSmem = kBN * kBK * 2;
constexpr int kStageSmem = kASmem + kMSmem + kXSmem;
constexpr int kYPitch = kBM + 8;  // epilogue staging row pitch (elements): breaks bank alignment of columns
constexpr int kSmem = kStages * kStageSmem;
static_assert(kBN * kYPitch * 2 <= kSmem, "the epilogue staging tile must fit in the pipeline's shared memory");

__global__ void nm24_pack_kernel(int64_t out, int64_t in, const uint16_t* __restrict__ values,
                                 const uint8_t* __restrict__ indices, uint16_t* __restrict__ pv,
                                 uint32_t* __restrict__ pm) {
  const int64_t n_banks = in / 4, KT = in / nm24::kTileCols, KP = KT / 2;
  const int64_t n_frag = (out / nm24::kTileRows) * KT * nm24::kLanes;
  const int64_t n_meta = (out / nm24::kTileRows) * KP * nm24::kLanes;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n_frag + n_meta;
       i += int64_t(gridDim.x) * blockDim.x) {
    if (i < n_frag) {
      const int lane = int(i % nm24::kLanes);
      const int64_t kt = (i / nm24::kLanes) % KT, mt = i / (nm24::kLanes * KT);
      uint16_t frag[nm24::kFragElems];
      for (int e = 0; e < nm24::kFragElems; ++e) {
        const nm24::Src s = nm24::value_source(mt, kt, lane, e);
        frag[e] = values[(s.row * n_banks + s.bank) * 2 + s.slot];
      }
      uint4 v;
      v.x = frag[0] | (uint32_t(frag[1]) << 16);
      v.y = frag[2] | (uint32_t(frag[3]) << 16);
      v.z = frag[4] | (uint32_t(frag[5]) << 16);
      v.w = frag[6] | (uint32_t(frag[7]) << 16);
      reinterpret_cast<uint4*>(pv)[i] = v;
    } else {
      const int64_t j = i - n_frag;
      const int lane = int(j % nm24::kLanes);
      const int64_t p = (j / nm24::kLanes) % KP, mt = j / (nm24::kLanes * KP);
      pm[j] = nm24::meta_word(indices, n_banks, mt, p, lane);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
    nm24_linear_kernel(int64_t T_tokens, int64_t out, int64_t in, const T* __restrict__ x, int64_t ldx,
                       const uint16_t* __restrict__ pv, const uint32_t* __restrict__ pm, const T* __restrict__ bias,
                       Act act, T* __restrict__ y) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp >> 2, warp_n = warp & 3;  // 2 x 4 warps
  const int64_t m0 = int64_t(blockIdx.x) * kBM, n0 = int64_t(blockIdx.y) * kBN;
  const int64_t MT = out / 16, KT = in / 32, KP = KT / 2;
  const int ksteps = int(in / kBK);

  auto stage_a = [&](int s) { return reinterpret_cast<uint16_t*>(smem + s * kStageSmem); };
  auto stage_m = [&](int s) { return reinterpret_cast<uint32_t*>(smem + s * kStageSmem + kASmem); };
  auto stage_x = [&](int s) { return reinterpret_cast<T*>(smem + s * kStageSmem + kASmem + kMSmem); };

  auto load_stage = [&](int s, int ks) {
    uint16_t* As = stage_a(s);
    // Packed A: per row tile, the two k-tiles of this stage are 1 KiB contiguous in global memory. Row tiles
    // past the matrix load the last real tile instead of zeros: zero metadata would repeat index 0, which
    // mma.sp::ordered_metadata does not allow; those output rows are never stored.
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int c = tid + j * kThreads, mt_l = c >> 6, off = c & 63;
      const int64_t mt = min(m0 / 16 + mt_l, MT - 1);
      cp_async16(As + mt_l * 512 + off * 8, pv + (mt * KT + 2 * int64_t(ks)) * 256 + off * 8, 16);
    }
    if (tid < kMT * 8) {
      const int mt_l = tid >> 3, off = tid & 7;
      const int64_t mt = min(m0 / 16 + mt_l, MT - 1);
      cp_async16(stage_m(s) + mt_l * 32 + off * 4, pm + (mt * KP + ks) * 32 + off * 4, 16);
    }
    T* Xs = stage_x(s);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int c = tid + j * kThreads, r = c >> 3, ch = c & 7;
      const int64_t t = n0 + r;
      const bool ok = t < T_tokens;
      const T* src = x + (ok ? t : 0) * ldx + int64_t(ks) * kBK + ch * 8;
      cp_async16(Xs + r * kBK + ((ch ^ (r & 7)) * 8), src, ok ? 16 : 0);
    }
  };

  float acc[4][4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < ksteps) load_stage(s, s);
    cp_async_commit();
  }

  for (int ks = 0; ks < ksteps; ++ks) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    const int nk = ks + kStages - 1;
    if (nk < ksteps) load_stage(nk % kStages, nk);
    cp_async_commit();

    const int s = ks % kStages;
    const uint16_t* As = stage_a(s);
    const uint32_t* Ms = stage_m(s);
    const T* Xs = stage_x(s);
    uint32_t meta[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) meta[i] = Ms[(warp_m * 4 + i) * 32 + lane];
#pragma unroll
    for (int kk = 0; kk < 2; ++kk) {
      uint32_t a[4][4], b[4][4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const uint4 v = *reinterpret_cast<const uint4*>(As + (warp_m * 4 + i) * 512 + kk * 256 + lane * 8);
        a[i][0] = v.x, a[i][1] = v.y, a[i][2] = v.z, a[i][3] = v.w;
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int r = warp_n * 32 + j * 8 + (lane & 7), ch = kk * 4 + (lane >> 3);
        ldmatrix_x4(b[j], Xs + r * kBK + ((ch ^ (r & 7)) * 8));
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          if (kk == 0) MmaSp<T, 0>::run(acc[i][j], a[i], b[j], meta[i]);
          else MmaSp<T, 1>::run(acc[i][j], a[i], b[j], meta[i]);
        }
    }
  }
  cp_async_wait<0>();
  __syncthreads();

  // Epilogue: accumulator (row = output, column = token) -> bias, activation -> Ys [token][output] -> Y.
  T* Ys = reinterpret_cast<T*>(smem);
  const int g = lane >> 2, q = lane & 3;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int o_l = warp_m * 64 + i * 16 + g + 8 * h;
      const int64_t o = m0 + o_l;
      const float bv = (bias != nullptr && o < out) ? to_acc(bias[o]) : 0.f;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int t_l = warp_n * 32 + j * 8 + 2 * q;
        Ys[t_l * kYPitch + o_l] = from_acc<T>(apply_act(acc[i][j][2 * h] + bv, act));
        Ys[(t_l + 1) * kYPitch + o_l] = from_acc<T>(apply_act(acc[i][j][2 * h + 1] + bv, act));
      }
    }
  }
  __syncthreads();
#pragma unroll
  for (int j = 0; j < (kBN * kBM / 8) / kThreads; ++j) {
    const int c = tid + j * kThreads, r = c / (kBM / 8), ch = c % (kBM / 8);
    const int64_t t = n0 + r, o = m0 + ch * 8;
    if (t < T_tokens && o < out)
      *reinterpret_cast<uint4*>(y + t * out + o) = *reinterpret_cast<const uint4*>(Ys + r * kYPitch + ch * 8);
  }
}

}  // namespace

cudaError_t nm24_pack(int64_t out, int64_t in, const uint16_t* values, const uint8_t* indices, uint16_t* packed_values,
                      uint32_t* packed_meta, cudaStream_t stream) {
  if (!nm24::shape_ok(out, in)) return cudaErrorInvalidValue;
  const int64_t work = (out / 16) * (in / 32) * 32 + (out / 16) * (in / 64) * 32;
  const int threads = 256;
  const int blocks = int(std::min<int64_t>(ceil_div(work, threads), 65535));
  nm24_pack_kernel<<<blocks, threads, 0, stream>>>(out, in, values, indices, packed_values, packed_meta);
  SK_LAUNCH_CHECK();
  return cudaSuccess;
}

template <typename T>
static cudaError_t nm24_linear_t(int64_t T_tokens, int64_t out, int64_t in, const void* x, int64_t ldx,
                                 const uint16_t* pv, const uint32_t* pm, const void* bias, Act act, void* y,
                                 cudaStream_t stream) {
  SK_CUDA_TRY(cudaFuncSetAttribute(nm24_linear_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem));
  const dim3 grid(unsigned(ceil_div(out, kBM)), unsigned(ceil_div(T_tokens, kBN)));
  nm24_linear_kernel<T><<<grid, kThreads, kSmem, stream>>>(T_tokens, out, in, static_cast<const T*>(x), ldx, pv, pm,
                                                           static_cast<const T*>(bias), act, static_cast<T*>(y));
  SK_LAUNCH_CHECK();
  return cudaSuccess;
}

cudaError_t nm24_linear(DType dt, int64_t T, int64_t out, int64_t in, const void* x, int64_t ldx,
                        const uint16_t* packed_values, const uint32_t* packed_meta, const void* bias, Act act, void* y,
                        cudaStream_t stream) {
  if (!nm24::shape_ok(out, in) || ldx % 8 != 0 || ldx < in) return cudaErrorInvalidValue;
  if (T == 0) return cudaSuccess;
  if (ceil_div(T, kBN) > 65535) return cudaErrorInvalidConfiguration;
  if (dt == DType::F16)
    return nm24_linear_t<__half>(T, out, in, x, ldx, packed_values, packed_meta, bias, act, y, stream);
  if (dt == DType::BF16)
    return nm24_linear_t<__nv_bfloat16>(T, out, in, x, ldx, packed_values, packed_meta, bias, act, y, stream);
  return cudaErrorInvalidValue;
}

}  // namespace sparsekern::cuda
