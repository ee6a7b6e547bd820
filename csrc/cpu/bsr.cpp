// Block-sparse (BSR) CPU ops: checks, the work split, and a portable implementation for every dtype and layout.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <optional>
#include <vector>

#include "../checks.h"
#include "bsr_kernels.h"
#include "epilogue.h"
#include "isa.h"
#include "parallel.h"

namespace sparsekern::cpu {
namespace {

// Token tile of the portable kernels: the accumulators of 8 tokens x one block row stay in L1.
constexpr int64_t kTokTile = 8;

struct BsrGeom {
  int64_t out, in, bo, bi, n_brow, n_bcol, nnz;
};

// Strides of `values` [nnz, bo, bi], so the portable path accepts any layout.
struct VStrides {
  int64_t blk, o, k;
};

// The kernels size scratch by the block (8 * bo accumulators): an empty `values` of a huge block shape would
// overflow that size. A block never needs to exceed the matrix (an empty matrix takes a 1x1 block).
void check_block_fits(int64_t bo, int64_t bi, int64_t out, int64_t in) {
  TORCH_CHECK(bo <= std::max<int64_t>(out, 1) && bi <= std::max<int64_t>(in, 1), "block (", bo, ", ", bi,
              ") must not exceed the matrix [", out, ", ", in, "]");
}

BsrGeom check_bsr(const at::Tensor& values, const at::Tensor& row_offsets, const at::Tensor& col_indices, int64_t out,
                  int64_t in) {
  TORCH_CHECK(values.dim() == 3, "values must have shape [nnz_blocks, block_rows, block_cols], got ", values.sizes());
  SK_CHECK_FLOATING(values);
  const int64_t bo = values.size(1), bi = values.size(2), nnz = values.size(0);
  TORCH_CHECK(bo >= 1 && bi >= 1, "block shape must be positive, got (", bo, ", ", bi, ")");
  TORCH_CHECK(out >= 0 && in >= 0, "matrix shape must be non-negative, got [", out, ", ", in, "]");
  check_block_fits(bo, bi, out, in);
  TORCH_CHECK(nnz <= INT32_MAX, "at most 2^31-1 blocks are supported, got ", nnz);
  const int64_t n_brow = (out + bo - 1) / bo, n_bcol = (in + bi - 1) / bi;
  check_offsets(row_offsets, n_brow, nnz, "row_offsets");
  check_indices(col_indices, nnz, n_bcol, "col_indices");
  return {out, in, bo, bi, n_brow, n_bcol, nnz};
}

void check_bias(const std::optional<at::Tensor>& bias, const at::Tensor& x, int64_t out) {
  if (!bias) return;
  SK_CHECK_CPU(*bias);
  SK_CHECK_SAME_DTYPE(*bias, x);
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out, "bias must have shape [", out, "], got ", bias->sizes());
}

at::Tensor check_x(const at::Tensor& x, const at::Tensor& values, int64_t in, const char* name) {
  SK_CHECK_CPU(x);
  SK_CHECK_CPU(values);
  TORCH_CHECK(x.dim() == 2, name, " must be 2-D [tokens, features], got shape ", x.sizes());
  SK_CHECK_FLOATING(x);
  TORCH_CHECK(x.scalar_type() == values.scalar_type(), name, " and values must have the same dtype, got ",
              x.scalar_type(), " and ", values.scalar_type());
  TORCH_CHECK(x.size(1) == in, name, " must have ", in, " features in its last dimension, got shape ", x.sizes());
  // Rows may be strided; features must be contiguous.
  return x.stride(1) == 1 && x.stride(0) >= x.size(1) ? x : x.contiguous();
}

// The 1x1-block kernels (csr_avx512.cpp, csr_avx2.cpp) walk the entries of a row panel by panel with one cursor per
// row, which needs the indices of each row strictly increasing (the format builds them so). O(nnz), like the range
// check.
void check_sorted(const at::Tensor& offsets, const at::Tensor& idx, const char* off_name, const char* idx_name) {
  const int32_t* o = offsets.data_ptr<int32_t>();
  const int32_t* p = idx.data_ptr<int32_t>();
  const int64_t n = offsets.numel() - 1;
  uint32_t bad = 0;  // branch-free (vectorised) per segment; the search for the message only on failure
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t j = int64_t(o[r]) + 1; j < o[r + 1]; ++j) bad |= uint32_t(p[j] <= p[j - 1]);
  }
  if (!bad) return;
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t j = int64_t(o[r]) + 1; j < o[r + 1]; ++j) {
      TORCH_CHECK(p[j] > p[j - 1], idx_name, " must be strictly increasing within each segment of ", off_name,
                  " (1x1 blocks), but ", idx_name, "[", j - 1, "] = ", p[j - 1], " and ", idx_name, "[", j,
                  "] = ", p[j], " in segment ", r);
    }
  }
}

// Raises if a 1x1-block or vector-block kernel could not allocate its scratch.
void check_scratch(bool ok, const char* op) {
  TORCH_CHECK(ok, op, ": out of memory for the per-thread scratch of the kernel");
}

// Vector blocks (vec_avx512.cpp, vec_avx2.cpp): column vectors (V, 1) and row vectors (1, V), V in {4, 8, 16, 32}.
bool vec_block(int64_t bo, int64_t bi) {
  auto v = [](int64_t n) { return n == 4 || n == 8 || n == 16 || n == 32; };
  return (bi == 1 && v(bo)) || (bo == 1 && v(bi));
}

// Runs body(c0, c1) over the chunks of `bounds`; body returns false when its kernel could not allocate scratch,
// which raises once every chunk has finished.
template <typename Body>
void run_checked(const std::vector<int64_t>& bounds, const char* op, const Body& body) {
  std::atomic<bool> ok{true};
  run_chunks(bounds, [&](int64_t c0, int64_t c1) {
    if (!body(c0, c1)) ok = false;
  });
  check_scratch(ok, op);
}

VStrides vstrides(const at::Tensor& v) {
  return {v.stride(0), v.stride(1), v.stride(2)};
}

// The vectorised kernels of bsr_kernels.h: float32 or bfloat16 values in the kernel layout (strides
// (bo*bi, 1, bo), what BlockSparseWeight builds), blocks up to kBsrFastMaxBlock a side. Anything else, or a
// CPU without AVX2+FMA, takes the portable kernels below.
enum class FastPath { None, F32Avx512, Bf16Avx512, F32Avx2, Bf16Avx2 };

FastPath fast_path(const at::Tensor& values) {
#if defined(__x86_64__)
  const Isa isa = active_isa();
  const auto st = values.scalar_type();
  if (isa == Isa::Portable || (st != at::kFloat && st != at::kBFloat16)) return FastPath::None;
  const int64_t bo = values.size(1), bi = values.size(2);
  if (bo > kBsrFastMaxBlock || bi > kBsrFastMaxBlock) return FastPath::None;
  // With no blocks the layout is moot (an empty tensor reports the logical strides): a fully pruned layer still
  // takes the fast kernels, which write the bias (forward) or zeros (grad_input).
  if (values.size(0) > 0 && ((values.size(0) > 1 && values.stride(0) != bo * bi) || (bo > 1 && values.stride(1) != 1) ||
                             (bi > 1 && values.stride(2) != bo)))
    return FastPath::None;
  if (st == at::kFloat) return isa == Isa::Avx512 ? FastPath::F32Avx512 : FastPath::F32Avx2;
  // AVX-512 without AVX512_BF16 (Skylake-X, Ice Lake) widens bf16 to float32 in the AVX2 kernels.
  return isa == Isa::Avx512 && features().avx512bf16 ? FastPath::Bf16Avx512 : FastPath::Bf16Avx2;
#else
  (void)values;
  return FastPath::None;
#endif
}

// One kernel family's variant for the fast path `fp`.
template <typename F>
F* pick(FastPath fp, F* f32_avx512, F* bf16_avx512, F* f32_avx2, F* bf16_avx2) {
  return fp == FastPath::F32Avx512    ? f32_avx512
         : fp == FastPath::Bf16Avx512 ? bf16_avx512
         : fp == FastPath::F32Avx2    ? f32_avx2
                                      : bf16_avx2;
}

template <typename scalar_t>
void fwd_portable(const BsrGeom& g, const int32_t* ro, const int32_t* ci, const scalar_t* x, int64_t ldx, int64_t T,
                  const scalar_t* w, VStrides vs, const scalar_t* bias, Act act, scalar_t* y, int64_t r0, int64_t r1) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<acc_t> acc(kTokTile * g.bo);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t o0 = r * g.bo, ob = std::min(g.bo, g.out - o0);
    for (int64_t t0 = 0; t0 < T; t0 += kTokTile) {
      const int64_t tb = std::min(kTokTile, T - t0);
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t p = ro[r]; p < ro[r + 1]; ++p) {
        const int64_t i0 = int64_t(ci[p]) * g.bi, ib = std::min(g.bi, g.in - i0);
        const scalar_t* wb = w + p * vs.blk;
        for (int64_t t = 0; t < tb; ++t) {
          const scalar_t* xr = x + (t0 + t) * ldx + i0;
          acc_t* a = acc.data() + t * g.bo;
          for (int64_t k = 0; k < ib; ++k) {
            const acc_t xv = static_cast<acc_t>(xr[k]);
            for (int64_t o = 0; o < ob; ++o) a[o] += xv * static_cast<acc_t>(wb[o * vs.o + k * vs.k]);
          }
        }
      }
      for (int64_t t = 0; t < tb; ++t) {
        scalar_t* yr = y + (t0 + t) * g.out + o0;
        const acc_t* a = acc.data() + t * g.bo;
        for (int64_t o = 0; o < ob; ++o) {
          acc_t v = a[o] + (bias ? static_cast<acc_t>(bias[o0 + o]) : acc_t(0));
          yr[o] = static_cast<scalar_t>(apply_act(v, act));
        }
      }
    }
  }
}

template <typename scalar_t>
void grad_input_portable(const BsrGeom& g, const int32_t* co, const int32_t* ri, const int32_t* perm,
                         const scalar_t* dy, int64_t lddy, int64_t T, const scalar_t* w, VStrides vs, scalar_t* dx,
                         int64_t c0, int64_t c1) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<acc_t> acc(kTokTile * g.bi);
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t i0 = c * g.bi, ib = std::min(g.bi, g.in - i0);
    for (int64_t t0 = 0; t0 < T; t0 += kTokTile) {
      const int64_t tb = std::min(kTokTile, T - t0);
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t q = co[c]; q < co[c + 1]; ++q) {
        const int64_t o0 = int64_t(ri[q]) * g.bo, ob = std::min(g.bo, g.out - o0);
        const scalar_t* wb = w + int64_t(perm[q]) * vs.blk;
        for (int64_t t = 0; t < tb; ++t) {
          const scalar_t* dyr = dy + (t0 + t) * lddy + o0;
          acc_t* a = acc.data() + t * g.bi;
          for (int64_t o = 0; o < ob; ++o) {
            const acc_t gv = static_cast<acc_t>(dyr[o]);
            for (int64_t k = 0; k < ib; ++k) a[k] += gv * static_cast<acc_t>(wb[o * vs.o + k * vs.k]);
          }
        }
      }
      for (int64_t t = 0; t < tb; ++t) {
        scalar_t* dxr = dx + (t0 + t) * g.in + i0;
        const acc_t* a = acc.data() + t * g.bi;
        for (int64_t k = 0; k < ib; ++k) dxr[k] = static_cast<scalar_t>(a[k]);
      }
    }
  }
}

template <typename scalar_t>
void sddmm_portable(const BsrGeom& g, const int32_t* ro, const int32_t* ci, const scalar_t* dy, int64_t lddy,
                    const scalar_t* x, int64_t ldx, int64_t T, scalar_t* dw, VStrides vs, int64_t r0, int64_t r1) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<acc_t> acc(g.bo * g.bi);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t o0 = r * g.bo, ob = std::min(g.bo, g.out - o0);
    for (int64_t p = ro[r]; p < ro[r + 1]; ++p) {
      const int64_t i0 = int64_t(ci[p]) * g.bi, ib = std::min(g.bi, g.in - i0);
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t t = 0; t < T; ++t) {
        const scalar_t* dyr = dy + t * lddy + o0;
        const scalar_t* xr = x + t * ldx + i0;
        for (int64_t o = 0; o < ob; ++o) {
          const acc_t gv = static_cast<acc_t>(dyr[o]);
          acc_t* a = acc.data() + o * g.bi;
          for (int64_t k = 0; k < ib; ++k) a[k] += gv * static_cast<acc_t>(xr[k]);
        }
      }
      // Entries of a ragged edge block lie outside the matrix: their gradient is exactly zero.
      scalar_t* db = dw + p * vs.blk;
      for (int64_t o = 0; o < g.bo; ++o)
        for (int64_t k = 0; k < g.bi; ++k) db[o * vs.o + k * vs.k] = static_cast<scalar_t>(acc[o * g.bi + k]);
    }
  }
}

// Forward work split. By default each thread takes a contiguous range of block rows balanced by nonzeros, and
// keeps its part of W in its own L2 across calls. When all of W fits in half of a core's L2 the threads may
// instead take contiguous token ranges, each running every block row with the whole of W in its L2: the same W
// traffic per tile, half the X per core, and an exact balance, whereas rows balance the nonzeros only to within a
// block row, which at high sparsity (a few blocks per row) leaves one thread with noticeably more work. The token
// split is taken with at least four 8-token tiles per thread, or two when the row split is off balance by more
// than 5%: with fewer tiles each core streams all of W in a larger share of them, and the token split measured
// slower than the row split there (numbers: docs/measurements.md, "Block-sparse forward work split").
// 16x16 blocks keep the row split: the AVX-512 float32 kernel for them runs 16-token tiles (and splits the k loop
// of tiles of 1-3 tokens), so halving the tokens would cost it tiles and change its rounding. 1x1 blocks (CSR)
// keep it too: their kernel's number of accumulator sets depends on the tile's width, and so would the rounding.
constexpr int64_t kTokenSplitBytes = 512 * 1024;

std::vector<int64_t> fwd_split(const BsrGeom& g, const int32_t* ro, int64_t T, int64_t elt, int64_t threads,
                               bool& by_tokens) {
  auto rows = split_rows(ro, g.n_brow, T * g.bo * g.bi, T * g.bo, threads);
  by_tokens = false;
  if (threads < 2 || T < 16 * threads || g.nnz * g.bo * g.bi * elt > kTokenSplitBytes || (g.bo == 16 && g.bi == 16) ||
      (g.bo == 1 && g.bi == 1))
    return rows;
  int64_t worst = 0;
  for (size_t c = 0; c + 1 < rows.size(); ++c)
    worst = std::max<int64_t>(worst, (ro[rows[c + 1]] - ro[rows[c]]) * g.bi + (rows[c + 1] - rows[c]));
  const int64_t total = int64_t(ro[g.n_brow]) * g.bi + g.n_brow;  // the costs of split_rows above, / (T * bo)
  by_tokens = T >= 32 * threads || worst * threads * 100 > total * 105;
  return by_tokens ? split_rows(nullptr, T, 1, 0, threads) : rows;
}

at::Tensor bsr_linear_cpu(const at::Tensor& x_in, const at::Tensor& values, const at::Tensor& row_offsets,
                          const at::Tensor& col_indices, const at::Tensor& col_offsets, const at::Tensor& row_indices,
                          const at::Tensor& block_perm, int64_t out_features, const std::optional<at::Tensor>& bias_in,
                          c10::string_view activation) {
  (void)col_offsets, (void)row_indices, (void)block_perm;  // used by the registered backward only
  TORCH_CHECK(x_in.dim() == 2, "x must be 2-D [tokens, in_features], got shape ", x_in.sizes());
  const BsrGeom g = check_bsr(values, row_offsets, col_indices, out_features, x_in.size(1));
  const at::Tensor x = check_x(x_in, values, g.in, "x");
  check_bias(bias_in, x, g.out);
  const Act act = parse_activation(activation);
  const int64_t T = x.size(0);
  at::Tensor y = at::empty({T, g.out}, x.options());
  if (T == 0 || g.out == 0) return y;
  const at::Tensor bias = bias_in ? bias_in->contiguous() : at::Tensor();
  const int32_t* ro = row_offsets.data_ptr<int32_t>();
  const int32_t* ci = col_indices.data_ptr<int32_t>();
  bool by_tokens;
  const auto bounds = fwd_split(g, ro, T, values.element_size(), at::get_num_threads(), by_tokens);
  // Chunk [c0, c1) of the split: tokens (every block row) or block rows (every token).
  auto chunk = [&](int64_t c0, int64_t c1, const auto& rows) {
    if (by_tokens) {
      rows(c0, c1 - c0, int64_t(0), g.n_brow);
    } else {
      rows(int64_t(0), T, c0, c1);
    }
  };
#if defined(__x86_64__)
  if (const FastPath fp = fast_path(values); fp != FastPath::None) {
    const BsrFwdArgs a{g.out,
                       g.in,
                       g.bo,
                       g.bi,
                       T,
                       ro,
                       ci,
                       x.data_ptr(),
                       x.stride(0),
                       values.data_ptr(),
                       bias.defined() ? bias.data_ptr() : nullptr,
                       y.data_ptr(),
                       static_cast<int>(act)};
    // 1x1 blocks and vectors have kernels of their own, which allocate scratch; any other block the generic one.
    using Special = bool (*)(const BsrFwdArgs&, int64_t, int64_t);
    Special special = nullptr;
    if (g.bo == 1 && g.bi == 1) {
      check_sorted(row_offsets, col_indices, "row_offsets", "col_indices");
      special = pick(fp, &csr_fwd_f32_avx512, &csr_fwd_bf16_avx512, &csr_fwd_f32_avx2, &csr_fwd_bf16_avx2);
    } else if (vec_block(g.bo, g.bi)) {
      special = pick(fp, &vec_fwd_f32_avx512, &vec_fwd_bf16_avx512, &vec_fwd_f32_avx2, &vec_fwd_bf16_avx2);
    }
    auto* kernel = pick(fp, &bsr_fwd_f32_avx512, &bsr_fwd_bf16_avx512, &bsr_fwd_f32_avx2, &bsr_fwd_bf16_avx2);
    if (fp == FastPath::Bf16Avx512 && !special && T >= 16 && bsr_amx_bf16_fits(g.bo, g.bi, g.in) && amx_bf16_enabled())
      kernel = &bsr_fwd_bf16_amx;
    const int64_t es = x.element_size();
    run_checked(bounds, "bsr_linear", [&](int64_t c0, int64_t c1) {
      bool ok = true;
      chunk(c0, c1, [&](int64_t t0, int64_t tn, int64_t r0, int64_t r1) {
        BsrFwdArgs ac = a;
        ac.T = tn;
        ac.x = static_cast<const char*>(a.x) + t0 * a.ldx * es;
        ac.y = static_cast<char*>(a.y) + t0 * g.out * es;
        if (special) {
          ok = special(ac, r0, r1) && ok;
        } else {
          kernel(ac, r0, r1);
        }
      });
      return ok;
    });
    return y;
  }
#endif
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bsr_linear_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = values.data_ptr<scalar_t>();
    const scalar_t* bp = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.data_ptr<scalar_t>();
    const int64_t ldx = x.stride(0);
    const VStrides vs = vstrides(values);
    run_chunks(bounds, [&](int64_t c0, int64_t c1) {
      chunk(c0, c1, [&](int64_t t0, int64_t tn, int64_t r0, int64_t r1) {
        fwd_portable<scalar_t>(g, ro, ci, xp + t0 * ldx, ldx, tn, wp, vs, bp, act, yp + t0 * g.out, r0, r1);
      });
    });
  });
  return y;
}

at::Tensor bsr_linear_grad_input_cpu(const at::Tensor& dy_in, const at::Tensor& values, const at::Tensor& col_offsets,
                                     const at::Tensor& row_indices, const at::Tensor& block_perm, int64_t in_features) {
  SK_CHECK_CPU(values);
  TORCH_CHECK(dy_in.dim() == 2, "grad_out must be 2-D [tokens, out_features], got shape ", dy_in.sizes());
  TORCH_CHECK(values.dim() == 3, "values must have shape [nnz_blocks, block_rows, block_cols], got ", values.sizes());
  const int64_t out = dy_in.size(1);
  const BsrGeom g{out, in_features, values.size(1), values.size(2), 0, 0, values.size(0)};
  TORCH_CHECK(g.bo >= 1 && g.bi >= 1, "block shape must be positive, got (", g.bo, ", ", g.bi, ")");
  TORCH_CHECK(in_features >= 0, "in_features must be non-negative, got ", in_features);
  check_block_fits(g.bo, g.bi, out, in_features);
  const int64_t n_brow = (out + g.bo - 1) / g.bo, n_bcol = (in_features + g.bi - 1) / g.bi;
  check_offsets(col_offsets, n_bcol, g.nnz, "col_offsets");
  check_indices(row_indices, g.nnz, n_brow, "row_indices");
  check_indices(block_perm, g.nnz, g.nnz, "block_perm");
  const at::Tensor dy = check_x(dy_in, values, out, "grad_out");
  const int64_t T = dy.size(0);
  at::Tensor dx = at::empty({T, in_features}, dy.options());
  if (T == 0 || in_features == 0) return dx;
  const int32_t* co = col_offsets.data_ptr<int32_t>();
  const int32_t* ri = row_indices.data_ptr<int32_t>();
  const int32_t* perm = block_perm.data_ptr<int32_t>();
  const auto bounds = split_rows(co, n_bcol, T * g.bo * g.bi, T * g.bi, at::get_num_threads());
#if defined(__x86_64__)
  if (const FastPath fp = fast_path(values); fp != FastPath::None) {
    const BsrGradInputArgs a{out,          in_features,       g.bo,         g.bi, T, co, ri, perm, dy.data_ptr(),
                             dy.stride(0), values.data_ptr(), dx.data_ptr()};
    using Special = bool (*)(const BsrGradInputArgs&, int64_t, int64_t);
    Special special = nullptr;
    if (g.bo == 1 && g.bi == 1) {
      check_sorted(col_offsets, row_indices, "col_offsets", "row_indices");
      special = pick(fp, &csr_grad_input_f32_avx512, &csr_grad_input_bf16_avx512, &csr_grad_input_f32_avx2,
                     &csr_grad_input_bf16_avx2);
    } else if (vec_block(g.bo, g.bi)) {
      special = pick(fp, &vec_grad_input_f32_avx512, &vec_grad_input_bf16_avx512, &vec_grad_input_f32_avx2,
                     &vec_grad_input_bf16_avx2);
    }
    if (special) {
      run_checked(bounds, "bsr_linear_grad_input", [&](int64_t c0, int64_t c1) { return special(a, c0, c1); });
      return dx;
    }
    auto* kernel = pick(fp, &bsr_grad_input_f32_avx512, &bsr_grad_input_bf16_avx512, &bsr_grad_input_f32_avx2,
                        &bsr_grad_input_bf16_avx2);
    run_chunks(bounds, [&](int64_t c0, int64_t c1) { kernel(a, c0, c1); });
    return dx;
  }
#endif
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dy.scalar_type(), "bsr_linear_grad_input_cpu", [&] {
    const scalar_t* dyp = dy.data_ptr<scalar_t>();
    const scalar_t* wp = values.data_ptr<scalar_t>();
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    const int64_t lddy = dy.stride(0);
    const VStrides vs = vstrides(values);
    run_chunks(bounds, [&](int64_t c0, int64_t c1) {
      grad_input_portable<scalar_t>(g, co, ri, perm, dyp, lddy, T, wp, vs, dxp, c0, c1);
    });
  });
  return dx;
}

at::Tensor bsr_sddmm_cpu(const at::Tensor& dy_in, const at::Tensor& x_in, const at::Tensor& values,
                         const at::Tensor& row_offsets, const at::Tensor& col_indices) {
  TORCH_CHECK(dy_in.dim() == 2, "grad_out must be 2-D [tokens, out_features], got shape ", dy_in.sizes());
  TORCH_CHECK(x_in.dim() == 2, "x must be 2-D [tokens, in_features], got shape ", x_in.sizes());
  TORCH_CHECK(dy_in.size(0) == x_in.size(0), "grad_out and x must have the same number of tokens, got ", dy_in.size(0),
              " and ", x_in.size(0));
  const BsrGeom g = check_bsr(values, row_offsets, col_indices, dy_in.size(1), x_in.size(1));
  const at::Tensor dy = check_x(dy_in, values, g.out, "grad_out");
  const at::Tensor x = check_x(x_in, values, g.in, "x");
  const int64_t T = x.size(0);
  // Same shape and strides as values, so the gradient lands in the parameter's own layout.
  at::Tensor dw = at::empty_like(values);
  if (g.nnz == 0) return dw;
  const int32_t* ro = row_offsets.data_ptr<int32_t>();
  const int32_t* ci = col_indices.data_ptr<int32_t>();
  const auto bounds = split_rows(ro, g.n_brow, std::max<int64_t>(T, 1) * g.bo * g.bi, 0, at::get_num_threads());
#if defined(__x86_64__)
  if (const FastPath fp = fast_path(values); fp != FastPath::None) {
    const BsrSddmmArgs a{g.out, g.in,          g.bo,         g.bi,         T,           ro,
                         ci,    dy.data_ptr(), dy.stride(0), x.data_ptr(), x.stride(0), dw.data_ptr()};
    if (g.bo == 1 && g.bi == 1) {
      check_sorted(row_offsets, col_indices, "row_offsets", "col_indices");
      auto* csr = pick(fp, &csr_sddmm_f32_avx512, &csr_sddmm_bf16_avx512, &csr_sddmm_f32_avx2, &csr_sddmm_bf16_avx2);
      run_checked(bounds, "bsr_sddmm", [&](int64_t r0, int64_t r1) { return csr(a, r0, r1); });
      return dw;
    }
    if (vec_block(g.bo, g.bi)) {
      auto* vec = pick(fp, &vec_sddmm_f32_avx512, &vec_sddmm_bf16_avx512, &vec_sddmm_f32_avx2, &vec_sddmm_bf16_avx2);
      run_checked(bounds, "bsr_sddmm", [&](int64_t r0, int64_t r1) { return vec(a, r0, r1); });
      return dw;
    }
    auto* kernel = pick(fp, &bsr_sddmm_f32_avx512, &bsr_sddmm_bf16_avx512, &bsr_sddmm_f32_avx2, &bsr_sddmm_bf16_avx2);
    run_chunks(bounds, [&](int64_t r0, int64_t r1) { kernel(a, r0, r1); });
    return dw;
  }
#endif
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bsr_sddmm_cpu", [&] {
    const scalar_t* dyp = dy.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* dwp = dw.data_ptr<scalar_t>();
    const int64_t lddy = dy.stride(0), ldx = x.stride(0);
    const VStrides vs = vstrides(dw);
    run_chunks(bounds, [&](int64_t r0, int64_t r1) {
      sddmm_portable<scalar_t>(g, ro, ci, dyp, lddy, xp, ldx, T, dwp, vs, r0, r1);
    });
  });
  return dw;
}

}  // namespace
}  // namespace sparsekern::cpu

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) {
  m.impl("bsr_linear", &sparsekern::cpu::bsr_linear_cpu);
  m.impl("bsr_linear_grad_input", &sparsekern::cpu::bsr_linear_grad_input_cpu);
  m.impl("bsr_sddmm", &sparsekern::cpu::bsr_sddmm_cpu);
}
