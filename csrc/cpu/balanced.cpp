// Balanced-sparse CPU ops (Yao et al., 2019): every row of W is cut into banks of `bank` columns and each bank
// keeps `keep` values. Checks, the work split, and a portable implementation for every dtype.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "balanced_kernels.h"
#include "epilogue.h"
#include "isa.h"
#include "parallel.h"

namespace sparsekern::cpu {
namespace {

constexpr int64_t kTokTile = 16;

struct BalGeom {
  int64_t out, in, bank, n_banks, keep;
  int64_t width(int64_t b) const { return std::min(bank, in - b * bank); }
};

// Runs on every call, so the common case is one branch-free pass the compiler vectorises (the indices of all but
// the last bank share one bound); the slow loop only looks for the first bad entry to name it.
template <typename idx_t>
void check_index_range(const at::Tensor& indices, const BalGeom& g) {
  using uidx_t = std::make_unsigned_t<idx_t>;  // negative int16 values become large: one compare checks both ends
  const uidx_t* p = static_cast<const uidx_t*>(indices.data_ptr());
  const int64_t full = (g.n_banks - 1) * g.keep, row = g.n_banks * g.keep;
  const uidx_t bank = static_cast<uidx_t>(std::min<int64_t>(g.bank, std::numeric_limits<uidx_t>::max()));
  const uidx_t last = static_cast<uidx_t>(g.width(g.n_banks - 1));
  bool bad = g.bank > std::numeric_limits<uidx_t>::max();  // uint8 with bank 256: every value fits; re-check slowly
  for (int64_t o = 0; o < g.out && !bad; ++o) {
    const uidx_t* r = p + o * row;
    uidx_t m = 0;
    for (int64_t j = 0; j < full; ++j) m |= static_cast<uidx_t>(r[j] >= bank);
    for (int64_t j = full; j < row; ++j) m |= static_cast<uidx_t>(r[j] >= last);
    bad = m != 0;
  }
  if (!bad) return;
  const idx_t* q = indices.data_ptr<idx_t>();
  for (int64_t o = 0; o < g.out; ++o) {
    for (int64_t b = 0; b < g.n_banks; ++b) {
      const int64_t w = g.width(b);
      for (int64_t k = 0; k < g.keep; ++k) {
        const int64_t v = q[(o * g.n_banks + b) * g.keep + k];
        TORCH_CHECK(v >= 0 && v < w, "indices[", o, ", ", b, ", ", k, "] = ", v, " is out of range [0, ", w,
                    ") for bank ", b, " of width ", w);
      }
    }
  }
}

void check_indices(const at::Tensor& indices, const BalGeom& g) {
  if (indices.scalar_type() == at::kByte) check_index_range<uint8_t>(indices, g);
  else check_index_range<int16_t>(indices, g);
}

// Checks the pattern (shape, dtype, and unless the kernel that runs checks them, every index inside its bank) and
// returns its geometry.
BalGeom check_balanced(const at::Tensor& values, const at::Tensor& indices, int64_t bank, int64_t in,
                       bool with_indices = true) {
  SK_CHECK_CPU(values);
  SK_CHECK_CPU(indices);
  SK_CHECK_FLOATING(values);
  TORCH_CHECK(values.dim() == 3, "values must have shape [out_features, n_banks, keep], got ", values.sizes());
  TORCH_CHECK(indices.sizes() == values.sizes(), "indices must have the shape of values ", values.sizes(), ", got ",
              indices.sizes());
  TORCH_CHECK(indices.scalar_type() == at::kByte || indices.scalar_type() == at::kShort,
              "indices must be uint8 or int16, got ", indices.scalar_type());
  TORCH_CHECK(values.is_contiguous() && indices.is_contiguous(), "values and indices must be contiguous");
  TORCH_CHECK(in >= 1, "in_features must be >= 1, got ", in);
  // bank > in would still pass as one ragged bank, but the kernels size scratch by bank (16 * bank overflows).
  TORCH_CHECK(bank >= 1 && bank <= in, "bank must be in [1, in_features=", in, "], got ", bank);
  const BalGeom g{values.size(0), in, bank, values.size(1), values.size(2)};
  TORCH_CHECK(g.n_banks == (in + bank - 1) / bank, "values has ", g.n_banks, " banks, but ", in,
              " input features in banks of ", bank, " need ", (in + bank - 1) / bank);
  TORCH_CHECK(g.keep >= 1 && g.keep <= g.width(g.n_banks - 1), "keep must be in [1, ", g.width(g.n_banks - 1),
              "] (the width of the last bank), got ", g.keep);
  if (with_indices) check_indices(indices, g);
  return g;
}

at::Tensor check_act_input(const at::Tensor& x, const at::Tensor& values, int64_t features, const char* name) {
  SK_CHECK_CPU(x);
  TORCH_CHECK(x.dim() == 2, name, " must be 2-D [tokens, features], got shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == values.scalar_type(), name, " and values must have the same dtype, got ",
              x.scalar_type(), " and ", values.scalar_type());
  TORCH_CHECK(x.size(1) == features, name, " must have ", features, " features in its last dimension, got shape ",
              x.sizes());
  return x.stride(1) == 1 && x.stride(0) >= x.size(1) ? x : x.contiguous();
}

template <typename scalar_t, typename idx_t>
void fwd_portable(const BalGeom& g, const scalar_t* x, int64_t ldx, int64_t T, const scalar_t* w, const idx_t* idx,
                  const scalar_t* bias, Act act, scalar_t* y, int64_t o0, int64_t o1) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t acc[kTokTile];
  const int64_t row = g.n_banks * g.keep;
  for (int64_t t0 = 0; t0 < T; t0 += kTokTile) {
    const int64_t tb = std::min(kTokTile, T - t0);
    for (int64_t o = o0; o < o1; ++o) {
      std::fill(acc, acc + kTokTile, acc_t(0));
      const scalar_t* wr = w + o * row;
      const idx_t* ir = idx + o * row;
      for (int64_t b = 0; b < g.n_banks; ++b) {
        for (int64_t k = 0; k < g.keep; ++k) {
          const acc_t wv = static_cast<acc_t>(wr[b * g.keep + k]);
          const scalar_t* xc = x + t0 * ldx + b * g.bank + ir[b * g.keep + k];
          for (int64_t t = 0; t < tb; ++t) acc[t] += wv * static_cast<acc_t>(xc[t * ldx]);
        }
      }
      const acc_t bv = bias ? static_cast<acc_t>(bias[o]) : acc_t(0);
      for (int64_t t = 0; t < tb; ++t) y[(t0 + t) * g.out + o] = static_cast<scalar_t>(apply_act(acc[t] + bv, act));
    }
  }
}

template <typename scalar_t, typename idx_t>
void grad_input_portable(const BalGeom& g, const scalar_t* dy, int64_t lddy, int64_t T, const scalar_t* w,
                         const idx_t* idx, scalar_t* dx, int64_t b0, int64_t b1) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<acc_t> acc(kTokTile * g.bank);
  const int64_t row = g.n_banks * g.keep;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t c0 = b * g.bank, wdt = g.width(b);
    for (int64_t t0 = 0; t0 < T; t0 += kTokTile) {
      const int64_t tb = std::min(kTokTile, T - t0);
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t o = 0; o < g.out; ++o) {
        const scalar_t* wr = w + o * row + b * g.keep;
        const idx_t* ir = idx + o * row + b * g.keep;
        for (int64_t t = 0; t < tb; ++t) {
          const acc_t gv = static_cast<acc_t>(dy[(t0 + t) * lddy + o]);
          acc_t* a = acc.data() + t * g.bank;
          for (int64_t k = 0; k < g.keep; ++k) a[ir[k]] += gv * static_cast<acc_t>(wr[k]);
        }
      }
      for (int64_t t = 0; t < tb; ++t) {
        scalar_t* dxr = dx + (t0 + t) * g.in + c0;
        for (int64_t c = 0; c < wdt; ++c) dxr[c] = static_cast<scalar_t>(acc[t * g.bank + c]);
      }
    }
  }
}

template <typename scalar_t, typename idx_t>
void sddmm_portable(const BalGeom& g, const scalar_t* dy, int64_t lddy, const scalar_t* x, int64_t ldx, int64_t T,
                    const idx_t* idx, scalar_t* dw, int64_t o0, int64_t o1) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t row = g.n_banks * g.keep;
  std::vector<acc_t> acc(row);
  for (int64_t o = o0; o < o1; ++o) {
    std::fill(acc.begin(), acc.end(), acc_t(0));
    const idx_t* ir = idx + o * row;
    for (int64_t t = 0; t < T; ++t) {
      const acc_t gv = static_cast<acc_t>(dy[t * lddy + o]);
      const scalar_t* xr = x + t * ldx;
      for (int64_t b = 0; b < g.n_banks; ++b)
        for (int64_t k = 0; k < g.keep; ++k)
          acc[b * g.keep + k] += gv * static_cast<acc_t>(xr[b * g.bank + ir[b * g.keep + k]]);
    }
    for (int64_t j = 0; j < row; ++j) dw[o * row + j] = static_cast<scalar_t>(acc[j]);
  }
}

// Per-thread scratch for the vectorised kernels, kept across calls: a fresh buffer of this size (up to a few MiB)
// would be page-faulted in on every call.
float* thread_scratch(int64_t floats) {
  thread_local std::vector<float> buf;
  if (static_cast<int64_t>(buf.size()) < floats) {
    buf.clear();
    buf.shrink_to_fit();
    buf.resize(floats);
  }
  return buf.data();
}

// The vectorised kernels cover float32 and bfloat16 on x86-64 CPUs with AVX2+FMA or AVX-512.
bool use_fast_path(at::ScalarType dt) {
#if defined(__x86_64__)
  return (dt == at::kFloat || dt == at::kBFloat16) && active_isa() != Isa::Portable;
#else
  (void)dt;
  return false;
#endif
}

BalShape bal_shape(const BalGeom& g, at::ScalarType dt, at::ScalarType it) {
  return BalShape{g.out, g.in, g.bank, g.n_banks, g.keep, dt == at::kBFloat16, it == at::kShort};
}

// Calls fn(scalar_t{}, idx_t{}) for the tensors' dtypes; fn reads the types back with decltype.
template <typename F>
void dispatch_types(at::ScalarType dt, at::ScalarType it, const F& fn) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, "balanced_cpu", [&] {
    if (it == at::kByte) fn(scalar_t{}, uint8_t{});
    else fn(scalar_t{}, int16_t{});
  });
}

at::Tensor balanced_linear_cpu(const at::Tensor& x_in, const at::Tensor& values, const at::Tensor& indices,
                               int64_t bank, const std::optional<at::Tensor>& bias_in, c10::string_view activation) {
  TORCH_CHECK(x_in.dim() == 2, "x must be 2-D [tokens, in_features], got shape ", x_in.sizes());
  // The AVX-512 decode path checks the indices as it reads them (see bal_fwd_checks_indices_avx512).
  bool kernel_checks = false;
#if defined(__x86_64__)
  if (use_fast_path(values.scalar_type()) && active_isa() == Isa::Avx512 && values.dim() == 3 &&
      indices.sizes() == values.sizes() && (indices.scalar_type() == at::kByte || indices.scalar_type() == at::kShort))
    kernel_checks = bal_fwd_checks_indices_avx512(
        BalShape{values.size(0), x_in.size(1), bank, values.size(1), values.size(2), false, false}, x_in.size(0));
#endif
  const BalGeom g = check_balanced(values, indices, bank, x_in.size(1), !kernel_checks);
  const at::Tensor x = check_act_input(x_in, values, g.in, "x");
  if (bias_in) {
    SK_CHECK_CPU(*bias_in);
    SK_CHECK_SAME_DTYPE(*bias_in, x_in);
    TORCH_CHECK(bias_in->dim() == 1 && bias_in->size(0) == g.out, "bias must have shape [", g.out, "], got ",
                bias_in->sizes());
  }
  const at::Tensor bias = bias_in ? bias_in->contiguous() : at::Tensor();
  const Act act = parse_activation(activation);
  const int64_t T = x.size(0);
  at::Tensor y = at::empty({T, g.out}, x.options());
  if (T == 0 || g.out == 0) return y;
  const auto bounds = split_rows(nullptr, g.out, 1, 0, at::get_num_threads());
#if defined(__x86_64__)
  if (use_fast_path(x.scalar_type())) {
    const BalShape s = bal_shape(g, x.scalar_type(), indices.scalar_type());
    const bool avx512 = active_isa() == Isa::Avx512;
    std::atomic<bool> indices_ok{true};
    run_chunks(bounds, [&](int64_t o0, int64_t o1) {
      float* scratch = thread_scratch(bal_scratch_floats(s, o1 - o0));
      const void* bp = bias.defined() ? bias.data_ptr() : nullptr;
      if (avx512) {
        if (!balanced_fwd_avx512(s, x.data_ptr(), x.stride(0), T, values.data_ptr(), indices.data_ptr(), bp,
                                 static_cast<int>(act), y.data_ptr(), o0, o1, scratch))
          indices_ok = false;
      } else {
        balanced_fwd_avx2(s, x.data_ptr(), x.stride(0), T, values.data_ptr(), indices.data_ptr(), bp,
                          static_cast<int>(act), y.data_ptr(), o0, o1, scratch);
      }
    });
    if (!indices_ok) check_indices(indices, g);  // throws, naming the first bad index
    TORCH_CHECK(indices_ok, "balanced_linear: the kernel found an index out of range that the check did not");
    return y;
  }
#endif
  dispatch_types(x.scalar_type(), indices.scalar_type(), [&](auto s_tag, auto i_tag) {
    using scalar_t = decltype(s_tag);
    using idx_t = decltype(i_tag);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = values.data_ptr<scalar_t>();
    const idx_t* ip = static_cast<const idx_t*>(indices.data_ptr());
    const scalar_t* bp = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.data_ptr<scalar_t>();
    const int64_t ldx = x.stride(0);
    run_chunks(bounds, [&](int64_t o0, int64_t o1) {
      fwd_portable<scalar_t, idx_t>(g, xp, ldx, T, wp, ip, bp, act, yp, o0, o1);
    });
  });
  return y;
}

at::Tensor balanced_linear_grad_input_cpu(const at::Tensor& dy_in, const at::Tensor& values, const at::Tensor& indices,
                                          int64_t bank, int64_t in_features) {
  TORCH_CHECK(dy_in.dim() == 2, "grad_out must be 2-D [tokens, out_features], got shape ", dy_in.sizes());
  const BalGeom g = check_balanced(values, indices, bank, in_features);
  const at::Tensor dy = check_act_input(dy_in, values, g.out, "grad_out");
  const int64_t T = dy.size(0);
  at::Tensor dx = at::empty({T, g.in}, dy.options());
  if (T == 0) return dx;
  const auto bounds = split_rows(nullptr, g.n_banks, 1, 0, at::get_num_threads());
#if defined(__x86_64__)
  if (use_fast_path(dy.scalar_type())) {
    const BalShape s = bal_shape(g, dy.scalar_type(), indices.scalar_type());
    const bool avx512 = active_isa() == Isa::Avx512;
    run_chunks(bounds, [&](int64_t b0, int64_t b1) {
      float* scratch = thread_scratch(bal_scratch_floats(s, g.out));
      if (avx512)
        balanced_grad_input_avx512(s, dy.data_ptr(), dy.stride(0), T, values.data_ptr(), indices.data_ptr(),
                                   dx.data_ptr(), b0, b1, scratch);
      else
        balanced_grad_input_avx2(s, dy.data_ptr(), dy.stride(0), T, values.data_ptr(), indices.data_ptr(),
                                 dx.data_ptr(), b0, b1, scratch);
    });
    return dx;
  }
#endif
  dispatch_types(dy.scalar_type(), indices.scalar_type(), [&](auto s_tag, auto i_tag) {
    using scalar_t = decltype(s_tag);
    using idx_t = decltype(i_tag);
    const scalar_t* dyp = dy.data_ptr<scalar_t>();
    const scalar_t* wp = values.data_ptr<scalar_t>();
    const idx_t* ip = static_cast<const idx_t*>(indices.data_ptr());
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    const int64_t lddy = dy.stride(0);
    run_chunks(bounds, [&](int64_t b0, int64_t b1) {
      grad_input_portable<scalar_t, idx_t>(g, dyp, lddy, T, wp, ip, dxp, b0, b1);
    });
  });
  return dx;
}

at::Tensor balanced_sddmm_cpu(const at::Tensor& dy_in, const at::Tensor& x_in, const at::Tensor& indices,
                              int64_t bank) {
  TORCH_CHECK(dy_in.dim() == 2, "grad_out must be 2-D [tokens, out_features], got shape ", dy_in.sizes());
  TORCH_CHECK(x_in.dim() == 2, "x must be 2-D [tokens, in_features], got shape ", x_in.sizes());
  TORCH_CHECK(dy_in.size(0) == x_in.size(0), "grad_out and x must have the same number of tokens, got ", dy_in.size(0),
              " and ", x_in.size(0));
  TORCH_CHECK(indices.dim() == 3 && indices.size(0) == dy_in.size(1), "indices must have shape [", dy_in.size(1),
              ", n_banks, keep], got ", indices.sizes());
  SK_CHECK_FLOATING(x_in);
  // The values are not read: a stand-in with the pattern's shape and the activations' dtype reuses the checks.
  const at::Tensor shape_of_values =
      at::empty(indices.sizes(), x_in.options().memory_format(at::MemoryFormat::Contiguous));
  const BalGeom g = check_balanced(shape_of_values, indices, bank, x_in.size(1));
  const at::Tensor dy = check_act_input(dy_in, shape_of_values, g.out, "grad_out");
  const at::Tensor x = check_act_input(x_in, shape_of_values, g.in, "x");
  const int64_t T = x.size(0);
  at::Tensor dw = at::empty(indices.sizes(), x.options());
  if (g.out == 0) return dw;
  const auto bounds = split_rows(nullptr, g.out, 1, 0, at::get_num_threads());
#if defined(__x86_64__)
  if (use_fast_path(x.scalar_type())) {
    const BalShape s = bal_shape(g, x.scalar_type(), indices.scalar_type());
    const bool avx512 = active_isa() == Isa::Avx512;
    run_chunks(bounds, [&](int64_t o0, int64_t o1) {
      float* scratch = thread_scratch(bal_sddmm_scratch_floats(s, o1 - o0));
      if (avx512)
        balanced_sddmm_avx512(s, dy.data_ptr(), dy.stride(0), x.data_ptr(), x.stride(0), T, indices.data_ptr(),
                              dw.data_ptr(), o0, o1, scratch);
      else
        balanced_sddmm_avx2(s, dy.data_ptr(), dy.stride(0), x.data_ptr(), x.stride(0), T, indices.data_ptr(),
                            dw.data_ptr(), o0, o1, scratch);
    });
    return dw;
  }
#endif
  dispatch_types(x.scalar_type(), indices.scalar_type(), [&](auto s_tag, auto i_tag) {
    using scalar_t = decltype(s_tag);
    using idx_t = decltype(i_tag);
    const scalar_t* dyp = dy.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const idx_t* ip = static_cast<const idx_t*>(indices.data_ptr());
    scalar_t* dwp = dw.data_ptr<scalar_t>();
    const int64_t lddy = dy.stride(0), ldx = x.stride(0);
    run_chunks(bounds, [&](int64_t o0, int64_t o1) {
      sddmm_portable<scalar_t, idx_t>(g, dyp, lddy, xp, ldx, T, ip, dwp, o0, o1);
    });
  });
  return dw;
}

}  // namespace
}  // namespace sparsekern::cpu

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) {
  m.impl("balanced_linear", &sparsekern::cpu::balanced_linear_cpu);
  m.impl("balanced_linear_grad_input", &sparsekern::cpu::balanced_linear_grad_input_cpu);
  m.impl("balanced_sddmm", &sparsekern::cpu::balanced_sddmm_cpu);
}
