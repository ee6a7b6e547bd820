"""The CUDA kernels, checked on a machine without a GPU.

- Every ``csrc/cuda/*.cu`` compiles with nvcc for sm_80 and sm_90, warnings as errors; the registers and spills
  that ptxas reports are printed, and any spill fails the test.
- The torch launcher ``csrc/cuda/ops_cuda.cpp`` passes the host compiler's syntax check against torch's headers
  (a CPU wheel ships the c10/cuda headers but not one generated header, which is stubbed here).
- The 2:4 packing (``csrc/cuda/nm24_layout.h``) is compiled as plain C++ and checked against an emulation of
  ``mma.sp.m16n8k32`` written from the PTX ISA's description of its operand fragments and metadata.
What this cannot check: that the kernels run and give the right numbers on a GPU (tests/test_gpu_cuda.py).
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
