// Input checks shared by every op. Each message names the offending value and what was expected, because
// these errors reach users who called a module, not the op.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "activations.h"

#define SK_CHECK_CPU(t) TORCH_CHECK((t).device().is_cpu(), #t " must be a CPU tensor, got device ", (t).device())

#define SK_CHECK_DIM(t, d) TORCH_CHECK((t).dim() == (d), #t " must have ", d, " dimensions, got shape ", (t).sizes())

#define SK_CHECK_DTYPE(t, dt) \
  TORCH_CHECK((t).scalar_type() == (dt), #t " must have dtype ", dt, ", got ", (t).scalar_type())

#define SK_CHECK_SAME_DTYPE(a, b)                                                                      \
  TORCH_CHECK((a).scalar_type() == (b).scalar_type(), #a " and " #b " must have the same dtype, got ", \
              (a).scalar_type(), " and ", (b).scalar_type())

#define SK_CHECK_SAME_DEVICE(a, b)                                                                                    \
  TORCH_CHECK((a).device() == (b).device(), #a " and " #b " must be on the same device, got ", (a).device(), " and ", \
              (b).device())

#define SK_CHECK_FLOATING(t)                                                            \
  TORCH_CHECK((t).scalar_type() == at::kFloat || (t).scalar_type() == at::kDouble ||    \
                  (t).scalar_type() == at::kBFloat16 || (t).scalar_type() == at::kHalf, \
              #t " must be float32, float64, bfloat16 or float16, got ", (t).scalar_type())

namespace sparsekern {

// The activation called `name`, or an error listing the valid names (csrc/activations.h holds the list).
inline Act parse_activation(c10::string_view name) {
  Act act;
  if (find_act(name.data(), name.size(), &act)) return act;
  std::string valid;
  for (int i = 0; i < kNumActivations; ++i) valid += std::string(i ? ", '" : "'") + act_name(i) + "'";
  TORCH_CHECK(false, "activation must be one of ", valid, ", got '", name, "'");
}

// Checks that an int32 offsets vector of length n+1 starts at 0, ends at `total` and never decreases.
// O(n): cheap next to any kernel, and it is what keeps a malformed weight from reading out of bounds.
inline void check_offsets(const at::Tensor& offsets, int64_t n, int64_t total, const char* name) {
  TORCH_CHECK(offsets.dim() == 1 && offsets.numel() == n + 1, name, " must have shape [", n + 1, "], got ",
              offsets.sizes());
  TORCH_CHECK(offsets.scalar_type() == at::kInt, name, " must be int32, got ", offsets.scalar_type());
  TORCH_CHECK(offsets.is_contiguous(), name, " must be contiguous");
  const int32_t* p = offsets.data_ptr<int32_t>();
  TORCH_CHECK(p[0] == 0, name, "[0] must be 0, got ", p[0]);
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(p[i + 1] >= p[i], name, " must be non-decreasing, but ", name, "[", i + 1, "] = ", p[i + 1], " < ",
                name, "[", i, "] = ", p[i]);
  }
  TORCH_CHECK(p[n] == total, name, "[-1] must equal the number of stored blocks ", total, ", got ", p[n]);
}

// Checks that every entry of an int32 index vector lies in [0, bound).
inline void check_indices(const at::Tensor& idx, int64_t n, int64_t bound, const char* name) {
  TORCH_CHECK(idx.dim() == 1 && idx.numel() == n, name, " must have shape [", n, "], got ", idx.sizes());
  TORCH_CHECK(idx.scalar_type() == at::kInt, name, " must be int32, got ", idx.scalar_type());
  TORCH_CHECK(idx.is_contiguous(), name, " must be contiguous");
  const int32_t* p = idx.data_ptr<int32_t>();
  // One branch-free pass (vectorised: it runs on every call, over one index per entry for 1x1 blocks); the search
  // for the first bad index only when there is one.
  const uint32_t b = uint32_t(std::min<int64_t>(std::max<int64_t>(bound, 0), int64_t(INT32_MAX) + 1));
  uint32_t bad = 0;
  for (int64_t i = 0; i < n; ++i) bad |= uint32_t(uint32_t(p[i]) >= b);
  if (!bad) return;
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(p[i] >= 0 && p[i] < bound, name, "[", i, "] = ", p[i], " is out of range [0, ", bound, ")");
  }
}

}  // namespace sparsekern
