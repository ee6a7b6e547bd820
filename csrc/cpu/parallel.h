// The work split shared by every CPU op: contiguous ranges of rows (block rows, block columns, output rows or
// banks) balanced by cost, one range per torch thread. The split depends only on the weight and the thread
// count, so repeated calls give each thread the same slice of W and it stays in that core's cache.
#pragma once

#include <ATen/Parallel.h>

#include <cstdint>
#include <vector>

namespace sparsekern::cpu {

// Chunk bounds over n rows whose cost is (offsets[r+1] - offsets[r]) * unit + fixed; offsets may be null for
// uniform rows. Returns nchunks+1 bounds, nchunks <= max(1, min(threads, n)).
inline std::vector<int64_t> split_rows(const int32_t* offsets, int64_t n, int64_t unit, int64_t fixed,
                                       int64_t threads) {
  int64_t chunks = threads < n ? threads : n;
  if (chunks < 1) chunks = 1;
  std::vector<int64_t> bounds(chunks + 1, n);
  bounds[0] = 0;
  auto cost_before = [&](int64_t r) { return (offsets ? int64_t(offsets[r]) : r) * unit + r * fixed; };
  const int64_t total = cost_before(n);
  int64_t r = 0;
  for (int64_t c = 1; c < chunks; ++c) {
    const int64_t target = (total * c + chunks - 1) / chunks;
    while (r < n && cost_before(r) < target) ++r;
    bounds[c] = r;
  }
  return bounds;
}

// Runs fn(begin, end) on each chunk, one chunk per torch thread.
template <typename F>
inline void run_chunks(const std::vector<int64_t>& bounds, const F& fn) {
  const int64_t chunks = static_cast<int64_t>(bounds.size()) - 1;
  if (chunks == 1) {
    fn(bounds[0], bounds[1]);
    return;
  }
  at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {
      if (bounds[c] < bounds[c + 1]) fn(bounds[c], bounds[c + 1]);
    }
  });
}

}  // namespace sparsekern::cpu
