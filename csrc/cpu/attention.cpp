// sparsekern::attention on the CPU: softmax(q k^T * scale + mask) v for [B, H, L, D] queries, keys and values,
// written as [B, Lq, H, Dv] (the layout the output projection reads). float32 and bfloat16 run the kernels of
// attention.h (AVX-512 / AVX2); float64, float16 and CPUs without AVX2 compute the same in aten (its SDPA, then
// the transpose). Design and numbers: attention.h, docs/measurements.md ("Our attention kernel").
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>

#include "../checks.h"
#include "attention.h"
#include "isa.h"
#include "parallel.h"
#include "thread_buf.h"

namespace sparsekern::cpu {
namespace {

at::Tensor aten_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const std::optional<at::Tensor>& mask, double scale, bool causal) {
  const bool gqa = q.size(1) != k.size(1);
  std::optional<at::Tensor> m = mask;
  if (m && m->scalar_type() != at::kBool) m = m->to(q.scalar_type());
  return at::scaled_dot_product_attention(q, k, v, m, 0.0, causal, scale, gqa).transpose(1, 2).contiguous();
}

at::Tensor attention_cpu(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                         const std::optional<at::Tensor>& mask_in, double scale, bool causal) {
  SK_CHECK_CPU(q_in);
  SK_CHECK_CPU(k_in);
  SK_CHECK_CPU(v_in);
  SK_CHECK_FLOATING(q_in);
  SK_CHECK_SAME_DTYPE(q_in, k_in);
  SK_CHECK_SAME_DTYPE(q_in, v_in);
  TORCH_CHECK(q_in.dim() == 4 && k_in.dim() == 4 && v_in.dim() == 4,
              "q, k and v must be 4-D [batch, heads, length, head_dim], got shapes ", q_in.sizes(), ", ", k_in.sizes(),
              " and ", v_in.sizes());
  const int64_t B = q_in.size(0), H = q_in.size(1), Lq = q_in.size(2), D = q_in.size(3);
  const int64_t Hkv = k_in.size(1), Lk = k_in.size(2), Dv = v_in.size(3);
  TORCH_CHECK(k_in.size(0) == B && v_in.size(0) == B, "k and v must have q's batch ", B, ", got ", k_in.size(0),
              " and ", v_in.size(0));
  TORCH_CHECK(k_in.size(3) == D, "k must have q's head_dim ", D, ", got ", k_in.size(3));
  TORCH_CHECK(v_in.size(1) == Hkv && v_in.size(2) == Lk, "v must have k's heads and length [", Hkv, ", ", Lk, "], got ",
              v_in.sizes());
  TORCH_CHECK(Hkv >= 1 && H % Hkv == 0, "q's heads (", H, ") must be a multiple of k's heads (", Hkv, ")");
  TORCH_CHECK(std::isfinite(scale), "scale must be finite, got ", scale);
  std::optional<at::Tensor> mask;
  if (mask_in) {
    SK_CHECK_CPU(*mask_in);
    const auto mt = mask_in->scalar_type();
    TORCH_CHECK(mt == at::kBool || mt == at::kFloat || mt == at::kBFloat16 || mt == at::kDouble || mt == at::kHalf,
                "mask must be bool (true: attend) or floating (added to the scores), got ", mt);
    TORCH_CHECK(mask_in->dim() <= 4, "mask must have at most 4 dimensions, got shape ", mask_in->sizes());
    TORCH_CHECK(!causal, "give either a mask or causal=True, not both");
    auto shape = mask_in->sizes().vec();
    shape.insert(shape.begin(), 4 - shape.size(), 1);
    const int64_t want[4] = {B, H, Lq, Lk};
    for (int i = 0; i < 4; ++i)
      TORCH_CHECK(shape[i] == 1 || shape[i] == want[i], "mask of shape ", mask_in->sizes(),
                  " does not broadcast to [batch, heads, Lq, Lk] = [", B, ", ", H, ", ", Lq, ", ", Lk, "]");
    mask = mask_in->reshape(shape).expand({B, H, Lq, Lk});
  }
  const auto st = q_in.scalar_type();
  const Isa isa = active_isa();
  if ((st != at::kFloat && st != at::kBFloat16) || isa == Isa::Portable) {
    return aten_attention(q_in, k_in, v_in, mask, scale, causal);
  }
  at::Tensor out = at::empty({B, Lq, H, Dv}, q_in.options());
  if (out.numel() == 0) return out;
  if (Lk == 0) return out.zero_();
  auto last_contig = [](const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); };
  const at::Tensor q = last_contig(q_in), k = last_contig(k_in), v = last_contig(v_in);
  at::Tensor m;
  AttnMask kind = AttnMask::None;
  if (mask) {
    m = *mask;
    if (m.scalar_type() == at::kBool) {
      kind = AttnMask::Bool;
    } else if (m.scalar_type() == at::kBFloat16) {
      kind = AttnMask::Bf16;
    } else {
      if (m.scalar_type() != at::kFloat) m = m.to(at::kFloat);
      kind = AttnMask::F32;
    }
  }
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  // Query chunks per (batch, head): one unless there are fewer (batch, head) pairs than about two per thread.
  const int64_t per_bh = std::max<int64_t>(1, (2 * threads + B * H - 1) / (B * H));
  int64_t q_chunk = (Lq + per_bh - 1) / per_bh;
  q_chunk = std::max<int64_t>(kAttnMaxMR, (q_chunk + kAttnMaxMR - 1) / kAttnMaxMR * kAttnMaxMR);
  AttnArgs a{};
  a.B = B, a.H = H, a.Hkv = Hkv, a.Lq = Lq, a.Lk = Lk, a.D = D, a.Dv = Dv;
  a.q = q.data_ptr(), a.qs[0] = q.stride(0), a.qs[1] = q.stride(1), a.qs[2] = q.stride(2);
  a.k = k.data_ptr(), a.ks[0] = k.stride(0), a.ks[1] = k.stride(1), a.ks[2] = k.stride(2);
  a.v = v.data_ptr(), a.vs[0] = v.stride(0), a.vs[1] = v.stride(1), a.vs[2] = v.stride(2);
  if (kind != AttnMask::None) {
    a.mask = m.data_ptr();
    for (int i = 0; i < 4; ++i) a.ms[i] = m.stride(i);
  }
  a.mask_kind = kind;
  a.out = out.data_ptr();
  a.bf16 = st == at::kBFloat16;
  a.scale = static_cast<float>(scale);
  a.causal = causal;
  a.q_chunk = q_chunk;
#if defined(__x86_64__)
  auto* fn = isa == Isa::Avx512 ? &attention_avx512 : &attention_avx2;
  const int64_t tasks = attention_tasks(a);
  const int64_t scratch_floats = attention_scratch_floats(a);
  run_chunks(split_rows(nullptr, tasks, 1, 0, threads), [&](int64_t t0, int64_t t1) {
    float* scratch = thread_buf(0, scratch_floats);  // kept per thread: a call allocates nothing once warm
    TORCH_CHECK(scratch, "attention: could not allocate ", scratch_floats * 4, " bytes of scratch");
    fn(a, t0, t1, scratch);
  });
  return out;
#else
  return aten_attention(q_in, k_in, v_in, mask, scale, causal);
#endif
}

}  // namespace
}  // namespace sparsekern::cpu

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) {
  m.impl("attention", &sparsekern::cpu::attention_cpu);
}
