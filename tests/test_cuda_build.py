"""The CUDA kernels, checked on a machine without a GPU.

- Every ``csrc/cuda/*.cu`` compiles with nvcc for sm_80 and sm_90, warnings as errors; the registers and spills
  that ptxas reports are printed, and any spill fails the test.
- The torch launcher ``csrc/cuda/ops_cuda.cpp`` passes the host compiler's syntax check against torch's headers
  (a CPU wheel ships the c10/cuda headers but not one generated header, which is stubbed here).
- The 2:4 packing (``csrc/cuda/nm24_layout.h``) is compiled as plain C++ and checked against an emulation of
  ``mma.sp.m16n8k32`` written from the PTX ISA's description of its operand fragments and metadata.
- The unstructured (CSR) kernels of ``csrc/cuda/csr.cu`` are compiled by the host compiler and run on a small
  emulation of the CUDA execution model (a CTA's threads as fibers; __syncthreads, __syncwarp, warp shuffles and
  __reduce_max_sync as barriers that detect a deadlock; inputs ending at guard pages) against a float64 reference.
What this cannot check: that the kernels run and give the right numbers on a GPU (tests/test_gpu_cuda.py); the
emulation runs the kernels' code and index arithmetic, not the hardware (memory model, timing, alignment faults
other than its own 16-byte check).
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CUDA_SRC = ROOT / "csrc" / "cuda"
ARCHS = ("80", "90")


def _nvcc() -> str | None:
    for cand in (
        os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"),
        shutil.which("nvcc"),
        "/usr/local/bin/nvcc",
    ):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


NVCC = _nvcc()
CXX = shutil.which("g++") or shutil.which("c++")


def _cuda_include() -> str | None:
    if NVCC is None:
        return None
    for cand in (Path(NVCC).resolve().parent.parent / "include", Path("/usr/local/cuda/include")):
        if (cand / "cuda_runtime.h").is_file():
            return str(cand)
    return None


def _compile_cu(src: Path, outdir: Path) -> tuple[Path, int, str]:
    cmd = [NVCC, "-c", "-std=c++17", "-O3"]
    for a in ARCHS:
        cmd += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    cmd += ["-Werror", "all-warnings", "-Xptxas", "-v", str(src), "-o", str(outdir / (src.stem + ".o"))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    return src, proc.returncode, proc.stdout + proc.stderr


_ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\d+)'")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def parse_ptxas(log: str) -> list[dict]:
    """One record per (kernel, arch): registers, stack frame and spill bytes, from `-Xptxas -v` output."""
    records: list[dict] = []
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            records.append({"kernel": m.group(1), "arch": m.group(2), "regs": None, "stack": 0, "spill": 0})
        elif records and (m := _SPILL.search(line)):
            records[-1].update(stack=int(m.group(1)), spill=int(m.group(2)) + int(m.group(3)))
        elif records and (m := _REGS.search(line)):
            records[-1]["regs"] = int(m.group(1))
    return records


def _demangle(names: list[str]) -> list[str]:
    filt = shutil.which("c++filt")
    if filt is None:
        return names
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    if len(out) != len(names):
        return names
    # Drop the namespace and the (long) parameter list; keep the template arguments.
    return [
        re.sub(
            r"^.*?(\w+(<.*>)?)\(.*$", r"\1", n.replace("sparsekern::cuda::", "").replace("(anonymous namespace)::", "")
        )
        for n in out
    ]


@pytest.mark.slow  # nvcc for two archs: ~20 s
@pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME or put nvcc on PATH)")
def test_every_cu_compiles_for_sm80_sm90_without_spills(tmp_path):
    sources = sorted(CUDA_SRC.glob("*.cu"))
    assert sources, f"no .cu files under {CUDA_SRC}"
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda s: _compile_cu(s, tmp_path), sources))
    failures = [f"{src.name} (exit {rc}):\n{log[-4000:]}" for src, rc, log in results if rc != 0]
    assert not failures, "nvcc failed:\n" + "\n".join(failures)

    rows = []
    for src, _, log in results:
        recs = parse_ptxas(log)
        assert recs, f"{src.name}: no ptxas report in the nvcc output"
        for rec, name in zip(recs, _demangle([r["kernel"] for r in recs])):
            rows.append((src.name, name, rec["arch"], rec["regs"], rec["stack"], rec["spill"]))
    print(f"\n{'file':<13} {'arch':<6} {'regs':>4} {'stack':>5} {'spill':>5}  kernel")
    for f, name, arch, regs, stack, spill in rows:
        print(f"{f:<13} {arch:<6} {regs:>4} {stack:>5} {spill:>5}  {name}")
    spilled = [r for r in rows if r[5] > 0]
    assert not spilled, f"kernels spill registers: {spilled}"
    for a in ARCHS:
        assert any(r[2] == f"sm_{a}" for r in rows), f"no kernel was compiled for sm_{a}"


def test_parse_ptxas_reads_registers_and_spills():
    log = (
        "ptxas info    : Compiling entry function '_Z1kv' for 'sm_90'\n"
        "ptxas info    : Function properties for _Z1kv\n"
        "    8 bytes stack frame, 12 bytes spill stores, 4 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 1 barriers\n"
    )
    assert parse_ptxas(log) == [{"kernel": "_Z1kv", "arch": "sm_90", "regs": 255, "stack": 8, "spill": 16}]


@pytest.mark.slow  # the host compiler over torch's headers: ~8 s
@pytest.mark.skipif(CXX is None or _cuda_include() is None, reason="needs a host C++ compiler and the CUDA headers")
def test_launcher_passes_host_syntax_check(tmp_path):
    torch = pytest.importorskip("torch")
    tinc = Path(torch.__file__).parent / "include"
    if not (tinc / "c10" / "cuda" / "CUDAGuard.h").is_file():
        pytest.skip(f"torch at {tinc} ships no c10/cuda headers")
    # Generated at torch's build time and missing from CPU wheels; its whole content in a CUDA build:
    stub = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    stub.parent.mkdir(parents=True)
    stub.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    cmd = [CXX, "-std=c++17", "-fsyntax-only", "-Wall", "-Werror", f"-I{tmp_path}", "-isystem", str(tinc),
           "-isystem", str(tinc / "torch" / "csrc" / "api" / "include"), "-isystem", _cuda_include(),
           f"-I{sysconfig.get_paths()['include']}", "-DSPARSEKERN_WITH_CUDA", str(CUDA_SRC / "ops_cuda.cpp")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


# The emulation below follows the PTX ISA's fragment tables for mma.sp.sync.aligned.m16n8k32 (.f16/.bf16), written
# independently of nm24_layout.h: A (compressed 16 x 16): a0,a1 row g cols 2q+{0,1}; a2,a3 row g+8; a4..a7 the
# same rows at cols 8+2q+{0,1}. Metadata: with sparsity selector s, lanes 4g+2s (logical cols 0-15) and 4g+2s+1
# (cols 16-31) hold row g in bits 0-15 and row g+8 in bits 16-31, 4 bits per 4-column group, first index low.
_NM24_CHECK = r"""
#include <cstdio>
#include <cstdlib>
#include <cstdint>
#include <vector>
#include "nm24_layout.h"
using namespace sparsekern;

int main() {
  const int64_t out = 48, in = 256, nb = in / 4;
  std::vector<float> W(out * in, 0.f);
  std::vector<uint16_t> vals(out * nb * 2);  // stand-in 16-bit payloads: the value's id
  std::vector<uint8_t> idx(out * nb * 2);
  const int pairs[6][2] = {{0, 1}, {0, 2}, {0, 3}, {1, 2}, {1, 3}, {2, 3}};
  uint32_t rng = 12345u;
  for (int64_t o = 0; o < out; ++o)
    for (int64_t b = 0; b < nb; ++b) {
      rng = rng * 1664525u + 1013904223u;
      const int* p = pairs[(rng >> 16) % 6];
      for (int k = 0; k < 2; ++k) {
        const int64_t e = (o * nb + b) * 2 + k;
        idx[e] = uint8_t(p[k]);
        vals[e] = uint16_t(1 + (e % 60000));
        W[o * in + b * 4 + p[k]] = float(vals[e]);
      }
    }
  const int64_t MT = out / 16, KT = in / 32, KP = KT / 2;
  std::vector<uint16_t> pv(MT * KT * 32 * 8);
  std::vector<uint32_t> pm(MT * KP * 32);
  for (int64_t mt = 0; mt < MT; ++mt)
    for (int64_t kt = 0; kt < KT; ++kt)
      for (int lane = 0; lane < 32; ++lane)
        for (int e = 0; e < 8; ++e) {
          const nm24::Src s = nm24::value_source(mt, kt, lane, e);
          pv[((mt * KT + kt) * 32 + lane) * 8 + e] = vals[(s.row * nb + s.bank) * 2 + s.slot];
        }
  for (int64_t mt = 0; mt < MT; ++mt)
    for (int64_t p = 0; p < KP; ++p)
      for (int lane = 0; lane < 32; ++lane)
        pm[(mt * KP + p) * 32 + lane] = nm24::meta_word(idx.data(), nb, mt, p, lane);

  // Emulated mma.sp: rebuild each logical 16 x 32 tile of A from the 32 lanes' registers, then compare with W.
  int bad = 0;
  for (int64_t mt = 0; mt < MT; ++mt)
    for (int64_t kt = 0; kt < KT; ++kt) {
      const int sel = int(kt % 2);
      float comp[16][16], logical[16][32] = {};
      for (int lane = 0; lane < 32; ++lane) {
        const int g = lane / 4, q = lane % 4;
        const uint16_t* r = &pv[((mt * KT + kt) * 32 + lane) * 8];
        comp[g][2 * q] = r[0];     comp[g][2 * q + 1] = r[1];
        comp[g + 8][2 * q] = r[2]; comp[g + 8][2 * q + 1] = r[3];
        comp[g][8 + 2 * q] = r[4];     comp[g][9 + 2 * q] = r[5];
        comp[g + 8][8 + 2 * q] = r[6]; comp[g + 8][9 + 2 * q] = r[7];
      }
      for (int row = 0; row < 16; ++row)
        for (int G = 0; G < 8; ++G) {
          const int lane = (row % 8) * 4 + 2 * sel + G / 4;
          const uint32_t word = pm[(mt * KP + kt / 2) * 32 + lane];
          const uint32_t bits = (word >> ((row >= 8 ? 16 : 0) + 4 * (G % 4))) & 0xF;
          const int i0 = bits & 3, i1 = bits >> 2;
          if (i0 >= i1) ++bad;  // mma.sp::ordered_metadata needs increasing indices
          logical[row][4 * G + i0] = comp[row][2 * G];
          logical[row][4 * G + i1] = comp[row][2 * G + 1];
        }
      for (int row = 0; row < 16; ++row)
        for (int c = 0; c < 32; ++c)
          if (logical[row][c] != W[(mt * 16 + row) * in + kt * 32 + c]) ++bad;
    }
  if (!nm24::shape_ok(out, in) || nm24::shape_ok(40, 256) || nm24::shape_ok(48, 224)) ++bad;
  std::printf("mismatches %d\n", bad);
  return bad != 0;
}
"""


@pytest.mark.skipif(CXX is None, reason="needs a host C++ compiler (g++ or c++)")
def test_nm24_packing_matches_emulated_mma_sp(tmp_path):
    src = tmp_path / "nm24_check.cpp"
    src.write_text(_NM24_CHECK)
    exe = tmp_path / "nm24_check"
    comp = subprocess.run([CXX, "-std=c++17", "-O1", "-Wall", "-Werror", f"-I{CUDA_SRC}", str(src), "-o", str(exe)],
                          capture_output=True, text=True, timeout=300)
    assert comp.returncode == 0, comp.stderr[-4000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.strip() == "mismatches 0", run.stdout + run.stderr


# ---- csr.cu on the CPU --------------------------------------------------------------------------------------------
# sk_emu.h: enough of CUDA to run csr.cu's SIMT kernels on the host, one CTA at a time (a function-local static is
# the CTA's shared memory), each thread a fiber. Written for these kernels: a block is 1-D, a barrier's mask is the
# full warp, shuffles are xor shuffles of <= 8 bytes.
_SK_EMU_H = r"""
// A CTA of CUDA threads as fibers on one host thread: enough of the CUDA execution model to run SIMT kernels
// that use __syncthreads, __syncwarp, warp shuffles and __reduce_max_sync. One CTA at a time (so a function-local
// `static` is the CTA's shared memory); a barrier parks the fiber until every live thread of its warp / CTA
// has reached one, and a state where no fiber can move (a barrier some threads skip) aborts as a deadlock.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __host__
#define __host__
#undef __shared__
#define __shared__ static
#undef __launch_bounds__
#define __launch_bounds__(...)
#undef __forceinline__
#define __forceinline__ inline

namespace sk_emu {

enum State { kRun, kWarpWait, kBlockWait, kDone };

#if defined(__x86_64__) && defined(__linux__) && !defined(SK_EMU_UCONTEXT)
// A fiber switch without ucontext's signal-mask system call (10-50x faster; the emulation is switch-bound):
// saves the callee-saved registers, MXCSR and the x87 control word on the current stack, stores its pointer in
// *from, and resumes the stack `to` (System V x86-64 ABI).
extern "C" void sk_emu_switch(void** from, void* to);
asm(R"(
  .text
  .globl sk_emu_switch
  .type sk_emu_switch, @function
sk_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size sk_emu_switch, .-sk_emu_switch
)");
struct Context {
  void* sp = nullptr;
};
inline void switch_to(Context& from, Context& to) {
  sk_emu_switch(&from.sp, to.sp);
}
// A fresh stack whose first switch "returns" into fn, entered with the alignment of a call (rsp = 8 mod 16).
inline void prepare(Context& c, char* stack, size_t size, void (*fn)()) {
  uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + size) & ~uintptr_t(15);
  uint64_t* sp = reinterpret_cast<uint64_t*>(top);
  *--sp = 0;                               // where a caller's return address would be
  *--sp = reinterpret_cast<uint64_t>(fn);  // popped by `ret`
  for (int i = 0; i < 6; ++i) *--sp = 0;   // rbp rbx r12 r13 r14 r15
  *--sp = 0x1F80ull | (0x037Full << 32);   // MXCSR (default), x87 control word (default)
  c.sp = sp;
}
#else
struct Context {
  ucontext_t uc;
};
inline void switch_to(Context& from, Context& to) {
  swapcontext(&from.uc, &to.uc);
}
inline void prepare(Context& c, char* stack, size_t size, void (*fn)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, fn, 0);
}
#endif

struct Fiber {
  Context ctx;
  State state;
};
inline std::vector<Fiber> fibers;
inline std::vector<std::vector<char>> stacks;
inline Context sched;
inline int cur = 0;
inline uint3 thread_idx, block_idx;
inline dim3 block_dim, grid_dim;
inline std::function<void()> body;
inline unsigned char slots[2][1024][8];  // double-buffered: one barrier per exchange
inline int phase[1024];

[[noreturn]] inline void fail(const char* what) {
  std::printf("EMULATION ERROR: %s (block %u,%u thread %d)\n", what, block_idx.x, block_idx.y, cur);
  std::fflush(stdout);
  std::abort();
}

inline void park(State s) {
  fibers[cur].state = s;
  switch_to(fibers[cur].ctx, sched);
}

[[noreturn]] inline void entry() {
  body();
  fibers[cur].state = kDone;
  switch_to(fibers[cur].ctx, sched);
  fail("a finished fiber was resumed");
}

inline void run_cta(int n) {
  fibers.assign(n, Fiber{});
  std::fill(phase, phase + n, 0);
  if (int(stacks.size()) < n) stacks.resize(n, std::vector<char>(1 << 16));
  for (int i = 0; i < n; ++i) {
    prepare(fibers[i].ctx, stacks[i].data(), stacks[i].size(), entry);
    fibers[i].state = kRun;
  }
  for (;;) {
    bool ran = false;
    for (int i = 0; i < n; ++i)
      while (fibers[i].state == kRun) {
        cur = i;
        thread_idx = uint3{unsigned(i), 0, 0};
        switch_to(sched, fibers[i].ctx);
        ran = true;
      }
    int done = 0, block_wait = 0;
    for (const Fiber& f : fibers) done += f.state == kDone, block_wait += f.state == kBlockWait;
    if (done == n) return;
    bool released = false;
    for (int w = 0; w * 32 < n; ++w) {  // a warp barrier opens when all 32 lanes wait at one
      int waiting = 0;
      for (int l = 0; l < 32; ++l) waiting += fibers[w * 32 + l].state == kWarpWait;
      if (waiting != 32) continue;
      for (int l = 0; l < 32; ++l) fibers[w * 32 + l].state = kRun;
      released = true;
    }
    if (!released && block_wait > 0 && block_wait + done == n) {  // exited threads do not hold a CTA barrier
      for (Fiber& f : fibers)
        if (f.state == kBlockWait) f.state = kRun;
      released = true;
    }
    if (!released) fail(ran ? "deadlock: a barrier that not every thread reaches" : "deadlock");
  }
}

template <typename K, typename... Args>
void launch(dim3 grid, dim3 block, size_t, cudaStream_t, K kernel, Args... args) {
  if (block.y != 1 || block.z != 1 || block.x % 32 != 0 || block.x > 1024) fail("unsupported block shape");
  grid_dim = grid, block_dim = block;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        block_idx = uint3{x, y, z};
        body = [&] { kernel(args...); };
        run_cta(int(block.x));
      }
}

inline void syncthreads() {
  park(kBlockWait);
}
inline void syncwarp(unsigned mask = 0xffffffffu) {
  if (mask != 0xffffffffu) fail("__syncwarp with a partial mask is not emulated");
  park(kWarpWait);
}
// One barrier per exchange: the slots alternate between two buffers, so a lane that runs ahead to the next
// exchange cannot overwrite what a slower lane has still to read.
template <typename V>
V shfl_xor(unsigned mask, V v, int off) {
  static_assert(sizeof(V) <= 8, "shuffle of at most 8 bytes");
  const int b = phase[cur]++ & 1;
  std::memcpy(slots[b][cur], &v, sizeof v);
  syncwarp(mask);
  V r;
  std::memcpy(&r, slots[b][(cur & ~31) | ((cur & 31) ^ off)], sizeof r);
  return r;
}
inline unsigned reduce_max(unsigned mask, unsigned v) {
  const int b = phase[cur]++ & 1;
  std::memcpy(slots[b][cur], &v, sizeof v);
  syncwarp(mask);
  unsigned m = 0;
  for (int l = 0; l < 32; ++l) {
    unsigned o;
    std::memcpy(&o, slots[b][(cur & ~31) | l], sizeof o);
    m = std::max(m, o);
  }
  return m;
}
template <typename V>
V ldg(const V* p) {
  if (reinterpret_cast<uintptr_t>(p) % alignof(V) != 0) fail("misaligned vector load");
  return *p;
}
inline float uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline double hiloint2double(int hi, int lo) {
  const uint64_t b = (uint64_t(uint32_t(hi)) << 32) | uint32_t(lo);
  double d;
  std::memcpy(&d, &b, 8);
  return d;
}
inline size_t cvta_generic_to_shared(const void*) {
  return 0;
}

}  // namespace sk_emu

#define threadIdx sk_emu::thread_idx
#define blockIdx sk_emu::block_idx
#define blockDim sk_emu::block_dim
#define gridDim sk_emu::grid_dim
#define __syncthreads sk_emu::syncthreads
#define __syncwarp sk_emu::syncwarp
#define __shfl_xor_sync sk_emu::shfl_xor
#define __reduce_max_sync sk_emu::reduce_max
#define __ldg sk_emu::ldg
#define __uint_as_float sk_emu::uint_as_float
#define __hiloint2double sk_emu::hiloint2double
#define __cvta_generic_to_shared sk_emu::cvta_generic_to_shared
using std::max;
using std::min;
"""

# The harness: csr.cu (its launches rewritten by _emulated_csr_source) against float64 sums of the same inputs.
_CSR_EMU = r"""
// csr.cu's kernels (launches rewritten for sk_emu.h, the grid's y axis capped at 2) against a float64 reference:
// every kernel variant, dtype and op, ragged shapes, empty rows, no nonzeros, strided inputs, NaN locality.
#include "sk_emu.h"
// clang-format off
#include "common.cuh"
// clang-format on
#undef SK_LAUNCH_CHECK
#define SK_LAUNCH_CHECK() \
  do {                    \
  } while (0)
#include "csr_emu.inc"

#include <sys/mman.h>
#include <unistd.h>

#include <cmath>
#include <string>
#include <utility>

using namespace sparsekern;
using namespace sparsekern::cuda;

static uint32_t rng = 12345u;
static uint32_t next_u32() {
  rng = rng * 1664525u + 1013904223u;
  return rng >> 8;
}
static double uniform() {
  return double(next_u32() % 1000003) / 1000003.0;
}
// Multiples of 1/64 in [-4, 4]: the products and the short sums of the tests are exact in every dtype's accumulator.
static double exact_val() {
  return double(int(next_u32() % 513) - 256) / 64.0;
}

template <typename T>
static T to_t(double v) {
  if constexpr (std::is_same_v<T, __half>) return __float2half_rn(float(v));
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __float2bfloat16_rn(float(v));
  else return T(v);
}
template <typename T>
static double from_t(T v) {
  if constexpr (std::is_same_v<T, __half>) return double(__half2float(v));
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return double(__bfloat162float(v));
  else return double(v);
}
template <typename T>
static constexpr DType dtype_of() {
  if constexpr (std::is_same_v<T, float>) return DType::F32;
  else if constexpr (std::is_same_v<T, double>) return DType::F64;
  else if constexpr (std::is_same_v<T, __half>) return DType::F16;
  else return DType::BF16;
}
template <typename T>
static double eps() {
  if constexpr (std::is_same_v<T, double>) return 1e-15;
  else if constexpr (std::is_same_v<T, float>) return 1e-6;
  else if constexpr (std::is_same_v<T, __half>) return 1.0 / 1024;
  else return 1.0 / 128;
}

struct Csr {
  int64_t out, in;
  std::vector<int32_t> ro, ci, co, ri, perm;
};

static Csr make_csr(int64_t out, int64_t in, double density, bool empty_even_rows) {
  Csr w{out, in, {0}, {}, {}, {}, {}};
  for (int64_t r = 0; r < out; ++r) {
    for (int64_t c = 0; c < in; ++c)
      if (!(empty_even_rows && r % 2 == 0) && uniform() < density) w.ci.push_back(int32_t(c));
    w.ro.push_back(int32_t(w.ci.size()));
  }
  const int64_t nnz = int64_t(w.ci.size());
  w.co.assign(in + 1, 0);
  for (int32_t c : w.ci) ++w.co[c + 1];
  for (int64_t c = 0; c < in; ++c) w.co[c + 1] += w.co[c];
  std::vector<int32_t> fill(w.co.begin(), w.co.end() - 1);
  w.ri.assign(nnz, 0), w.perm.assign(nnz, 0);
  for (int64_t r = 0; r < out; ++r)
    for (int32_t p = w.ro[r]; p < w.ro[r + 1]; ++p) {
      const int32_t k = fill[w.ci[p]]++;
      w.ri[k] = int32_t(r), w.perm[k] = p;
    }
  return w;
}

// A buffer that ends (to within 15 bytes: vector loads stay 16-byte aligned) at an inaccessible page, so a
// kernel reading or writing past its end faults instead of silently using a neighbour's memory.
template <typename T>
struct Guarded {
  unsigned char* base = nullptr;
  size_t map = 0;
  T* p = nullptr;
  size_t n = 0;
  explicit Guarded(size_t count, unsigned char fill = 0xff) : n(count) {
    const size_t page = size_t(sysconf(_SC_PAGESIZE)), bytes = count * sizeof(T);
    map = (bytes + 15 + page - 1) / page * page + page;
    base = static_cast<unsigned char*>(mmap(nullptr, map, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    if (base == MAP_FAILED) std::abort();
    mprotect(base + map - page, page, PROT_NONE);
    p = reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(base + map - page - bytes)) & ~uintptr_t(15));
    std::memset(base, fill, map - page);  // 0xff bytes: NaN in every float type, -1 as an index
  }
  Guarded(const std::vector<T>& v) : Guarded(v.size()) { std::copy(v.begin(), v.end(), p); }
  Guarded(const Guarded&) = delete;
  ~Guarded() { munmap(base, map); }
  T& operator[](size_t i) { return p[i]; }
};

static int failures = 0, checks = 0;
static void expect(bool ok, const std::string& what) {
  ++checks;
  if (!ok && failures++ < 20) std::printf("FAIL %s\n", what.c_str());
}

// Max |got - want| <= tol * (scale + 1), NaN positions identical.
static void compare(const std::vector<double>& got, const std::vector<double>& want, const std::vector<double>& scale,
                    double tol, const std::string& what) {
  double worst = 0;
  int64_t bad = -1;
  for (size_t i = 0; i < got.size(); ++i) {
    if (std::isnan(got[i]) != std::isnan(want[i])) {
      bad = int64_t(i);
      break;
    }
    if (std::isnan(want[i])) continue;
    const double e = std::fabs(got[i] - want[i]) / (scale[i] + 1);
    if (e > worst) worst = e;
    if (e > tol && bad < 0) bad = int64_t(i);
  }
  expect(bad < 0,
         what + " at " + std::to_string(bad) +
             (bad >= 0 ? " got " + std::to_string(got[bad]) + " want " + std::to_string(want[bad]) : std::string()));
}

static const char* kname(CsrKernel k) {
  switch (k) {
    case CsrKernel::Auto: return "auto";
    case CsrKernel::Gemv: return "gemv";
    case CsrKernel::Narrow: return "narrow";
    case CsrKernel::Wide: return "wide";
    default: return "?";
  }
}

// nan_at: (-1, -1) or the (token, feature) of x (forward, sddmm) / dy (grad input, sddmm) set to NaN.
template <typename T>
static void run_case(const Csr& w, int64_t T_, CsrKernel k, Act act, bool with_bias, int64_t nan_t, int64_t nan_f) {
  const int64_t nnz = int64_t(w.ci.size()), ldx = w.in + 3, lddy = w.out + 5;
  const std::string tag = std::string(kname(k)) + " T=" + std::to_string(T_) + " " + std::to_string(w.out) + "x" +
                          std::to_string(w.in) + " nnz=" + std::to_string(nnz) +
                          " dt=" + std::to_string(int(dtype_of<T>())) + " act=" + act_name(int(act)) +
                          (nan_t >= 0 ? " nan" : "");
  // x and dy end with their last row's last feature (ldx, lddy > features): nothing past it is readable.
  const size_t nx = T_ ? size_t((T_ - 1) * ldx + w.in) : 0, ndy = T_ ? size_t((T_ - 1) * lddy + w.out) : 0;
  Guarded<T> vals(nnz), x(nx), dy(ndy), bias(w.out);
  Guarded<int32_t> ro(w.ro), ci(w.ci), co(w.co), ri(w.ri), perm(w.perm);
  for (Guarded<T>* b : {&vals, &x, &dy, &bias})
    for (size_t i = 0; i < b->n; ++i) (*b)[i] = to_t<T>(exact_val());
  if (nan_t >= 0) {
    x[nan_t * ldx + nan_f] = to_t<T>(NAN);
    dy[nan_t * lddy + (nan_f % w.out)] = to_t<T>(NAN);
  }
  const BsrShape s{T_, w.out, w.in, 1, 1, nnz};
  const double tol = 4 * eps<T>();

  {  // forward
    Guarded<T> y(T_ * w.out);
    Guarded<unsigned char> ws(csr_workspace_bytes(CsrOp::Linear, k, dtype_of<T>(), s));
    const cudaError_t err = csr_linear(k, dtype_of<T>(), s, x.p, ldx, vals.p, ro.p, ci.p, with_bias ? bias.p : nullptr,
                                       act, y.p, ws.n ? ws.p : nullptr, ws.n, nullptr);
    expect(err == cudaSuccess, "forward launch " + tag);
    std::vector<double> got(y.n), want(y.n), scale(y.n);
    for (int64_t t = 0; t < T_; ++t)
      for (int64_t r = 0; r < w.out; ++r) {
        double z = with_bias ? from_t(bias[r]) : 0.0, a = std::fabs(z);
        for (int32_t p = w.ro[r]; p < w.ro[r + 1]; ++p) {
          const double term = from_t(vals[p]) * from_t(x[t * ldx + w.ci[p]]);
          z += term, a += std::fabs(term);
        }
        got[t * w.out + r] = from_t(y[t * w.out + r]);
        want[t * w.out + r] = apply_act(z, act);
        scale[t * w.out + r] = a;
      }
    compare(got, want, scale, tol, "forward " + tag);
  }
  {  // grad input
    Guarded<T> dx(T_ * w.in);
    Guarded<unsigned char> ws(csr_workspace_bytes(CsrOp::GradInput, k, dtype_of<T>(), s));
    const cudaError_t err = csr_linear_grad_input(k, dtype_of<T>(), s, dy.p, lddy, vals.p, co.p, ri.p, perm.p, dx.p,
                                                  ws.n ? ws.p : nullptr, ws.n, nullptr);
    expect(err == cudaSuccess, "grad_input launch " + tag);
    std::vector<double> got(dx.n), want(dx.n, 0.0), scale(dx.n, 0.0);
    for (int64_t t = 0; t < T_; ++t)
      for (int64_t r = 0; r < w.out; ++r)
        for (int32_t p = w.ro[r]; p < w.ro[r + 1]; ++p) {
          const double term = from_t(dy[t * lddy + r]) * from_t(vals[p]);
          want[t * w.in + w.ci[p]] += term, scale[t * w.in + w.ci[p]] += std::fabs(term);
        }
    for (size_t i = 0; i < dx.n; ++i) got[i] = from_t(dx[i]);
    compare(got, want, scale, tol, "grad_input " + tag);
  }
  {  // sddmm
    Guarded<T> dw(nnz);
    Guarded<unsigned char> ws(csr_workspace_bytes(CsrOp::Sddmm, k, dtype_of<T>(), s));
    const cudaError_t err =
        csr_sddmm(k, dtype_of<T>(), s, dy.p, lddy, x.p, ldx, ro.p, ci.p, dw.p, ws.n ? ws.p : nullptr, ws.n, nullptr);
    expect(err == cudaSuccess, "sddmm launch " + tag);
    std::vector<double> got(nnz), want(nnz, 0.0), scale(nnz, 0.0);
    for (int64_t r = 0; r < w.out; ++r)
      for (int32_t p = w.ro[r]; p < w.ro[r + 1]; ++p)
        for (int64_t t = 0; t < T_; ++t) {
          const double term = from_t(dy[t * lddy + r]) * from_t(x[t * ldx + w.ci[p]]);
          want[p] += term, scale[p] += std::fabs(term);
        }
    for (int64_t j = 0; j < nnz; ++j) got[j] = from_t(dw[j]);
    compare(got, want, scale, tol, "sddmm " + tag);
  }
}

template <typename T>
static void run_dtype() {
  struct Shape {
    int64_t out, in;
    double density;
    bool empty_even_rows;
  };
  const Shape shapes[] = {
      {70, 45, 0.3, false}, {33, 200, 0.05, true}, {96, 64, 0.9, false}, {1, 1, 1.0, false}, {40, 17, 0.0, false}};
  // (T, kernel): no tokens, the decode path (T = 1, 3), every variant at a ragged T, and T = 130 (several token tiles
  // and, with the grid's y axis capped at 2 here, the grid-stride loops) for the token-major ones.
  const std::pair<int64_t, CsrKernel> runs[] = {
      {0, CsrKernel::Auto},    {0, CsrKernel::Wide},  {1, CsrKernel::Auto},   {1, CsrKernel::Narrow},
      {1, CsrKernel::Wide},    {3, CsrKernel::Auto},  {3, CsrKernel::Wide},   {37, CsrKernel::Gemv},
      {37, CsrKernel::Narrow}, {37, CsrKernel::Wide}, {130, CsrKernel::Auto}, {130, CsrKernel::Narrow},
      {130, CsrKernel::Wide}};
  for (const Shape& sh : shapes) {
    const Csr w = make_csr(sh.out, sh.in, sh.density, sh.empty_even_rows);
    for (const auto& [T_, k] : runs) {
      run_case<T>(w, T_, k, T_ == 37 ? Act::Gelu : Act::None, T_ != 3, -1, -1);
      if (T_ == 37 && sh.in > 1) run_case<T>(w, T_, k, Act::Silu, true, T_ - 2, sh.in / 2);  // NaN locality
    }
  }
}

int main() {
  run_dtype<float>();
  run_dtype<double>();
  run_dtype<__half>();
  run_dtype<__nv_bfloat16>();
  std::printf("checks %d failures %d\n", checks, failures);
  return failures != 0;
}
"""

_LAUNCH = re.compile(r"([A-Za-z_]\w*(?:<[^<>;]*>)?)\s*<<<([^;]*?)>>>\s*\(")


def _emulated_csr_source() -> str:
    """csr.cu with each `kernel<<<grid, block, smem, stream>>>(args)` turned into sk_emu::launch(grid, block, smem,
    stream, kernel, args), and the grid's y axis capped at 2 so that small tests walk the grid-stride loops."""
    src = (CUDA_SRC / "csr.cu").read_text()
    out, n = _LAUNCH.subn(lambda m: f"sk_emu::launch({m.group(2)}, {m.group(1)}, ", src)
    assert n == src.count("<<<") > 0, f"rewrote {n} of {src.count('<<<')} kernel launches"
    out, k = re.subn(r"constexpr int kMaxGridY = \d+;", "constexpr int kMaxGridY = 2;", out)
    assert k == 1, "csr.cu no longer defines kMaxGridY"
    return out


@pytest.mark.slow  # g++ over the CUDA headers (~4 s) and ~1,800 emulated op calls (~3 s)
@pytest.mark.skipif(CXX is None or _cuda_include() is None, reason="needs a host C++ compiler and the CUDA headers")
def test_csr_kernels_match_reference_under_cpu_emulation(tmp_path):
    (tmp_path / "sk_emu.h").write_text(_SK_EMU_H)
    (tmp_path / "csr_emu.inc").write_text(_emulated_csr_source())
    (tmp_path / "csr_emu.cpp").write_text(_CSR_EMU)
    exe = tmp_path / "csr_emu"
    comp = subprocess.run([CXX, "-std=c++17", "-O1", "-Wall", "-Werror", "-Wno-unknown-pragmas", f"-I{tmp_path}",
                           f"-I{CUDA_SRC}", "-isystem", _cuda_include(), str(tmp_path / "csr_emu.cpp"), "-o", str(exe)],
                          capture_output=True, text=True, timeout=600)
    assert comp.returncode == 0, comp.stderr[-4000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("failures 0"), (
        f"exit {run.returncode} (-11: a guard page was hit; -6: an emulation error, e.g. a deadlock):\n"
        + run.stdout[-4000:] + run.stderr[-2000:])
