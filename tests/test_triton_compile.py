"""Every Triton kernel, every autotune configuration of its arch and every dtype compiles for sm_80 and sm_90
without a GPU (ptxas ships in the triton wheel), with no register spills and shared memory within the
target's per-block limit.

The kernels are compiled with exactly the arguments their launchers pass (captured by replacing
``torch.library.wrap_triton`` while calling the launcher on ``meta`` tensors of the benchmark's shapes), so
the compiled code matches a real launch's specialisation (strides of 1 as constants, 16-divisible pointers
and sizes marked as such). Registers, spills and shared memory are read from the cubin with the wheel's
``cuobjdump`` and from the compiled metadata: ``CompiledKernel.n_regs``/``n_spills`` need a driver to load the
binary, which a machine without a GPU does not have.

The compiling runs in a child process: this test session sets TRITON_INTERPRET=1, under which ``@triton.jit``
yields interpreter functions that cannot be compiled. ``pytest -s`` prints the table.

The unstructured (CSR) kernels compile at the same shapes with density 0.1 (``CSR_DENSITY``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from typing import Dict, Iterator, List

import pytest

# Per-block shared-memory limits (opt-in maximum): A100 163 KiB, H100/H200 227 KiB.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
# Shapes of the benchmark's targets: 4096x4096, T=4096, block 64, balanced bank 64 keep 16.
T, N, K, BLOCK, BANK, KEEP = 4096, 4096, 4096, 64, 64, 16
CSR_DENSITY = 0.1
# fp32 twice: exact (ieee, the dot on the CUDA cores) and with torch.backends.cuda.matmul.allow_tf32 (tf32).
DTYPES = ("float16", "bfloat16", "float32", "float32+tf32")


def _bits(dtype_name: str) -> int:
    return 32 if dtype_name.startswith("float32") else 16


def _capture_launches(arch: int) -> List[dict]:
    """Calls every launcher once per (config of ``arch``, dtype) on meta tensors and records the kernel,
    arguments and meta-parameters it would have launched with."""
    import torch
    import triton

    from sparse.kernels import balanced, bsr, csr

    launches: List[dict] = []

    class _Capture:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def call(*args, **meta):
                launches.append({"kernel": self.kernel, "args": args, "meta": meta})
            return call

    torch.library.wrap_triton, saved = _Capture, torch.library.wrap_triton
    try:
        for name in DTYPES:
            dtype = getattr(torch, name.split("+")[0])
            torch.backends.cuda.matmul.allow_tf32 = name.endswith("+tf32")
            meta = dict(device="meta", dtype=dtype)
            x, g = torch.empty(T, K, **meta), torch.empty(T, N, **meta)
            bias = torch.empty(N, **meta)
            nnz, n_brow, n_bcol = (N // BLOCK) * (K // BLOCK) // 2, N // BLOCK, K // BLOCK
            values = torch.empty(nnz, BLOCK, BLOCK, **meta).transpose(1, 2)  # the format's [nnz, bi, bo] storage
            i32 = dict(device="meta", dtype=torch.int32)
            ro, ci = torch.empty(n_brow + 1, **i32), torch.empty(nnz, **i32)
            co, ri, bp = torch.empty(n_bcol + 1, **i32), torch.empty(nnz, **i32), torch.empty(nnz, **i32)
            bvalues = torch.empty(N, K // BANK, KEEP, **meta)
            bindices = torch.empty(N, K // BANK, KEEP, device="meta", dtype=torch.uint8)
            cnnz = int(N * K * CSR_DENSITY)
            cvalues = torch.empty(cnnz, 1, 1, **meta)
            cro, cci = torch.empty(N + 1, **i32), torch.empty(cnnz, **i32)
            cco, cri, cbp = torch.empty(K + 1, **i32), torch.empty(cnnz, **i32), torch.empty(cnnz, **i32)
            calls = {
                ("bsr", "fwd"): lambda c: bsr.bsr_linear(x, values, ro, ci, N, bias, "gelu", config=c),
                ("bsr", "grad_input"): lambda c: bsr.bsr_linear_grad_input(g, values, co, ri, bp, K, config=c),
                ("bsr", "sddmm"): lambda c: bsr.bsr_sddmm(g, x, values, ro, ci, config=c),
                ("balanced", "fwd"): lambda c: balanced.balanced_linear(
                    x, bvalues, bindices, BANK, bias, "gelu", config=c
                ),
                ("balanced", "grad_input"): lambda c: balanced.balanced_linear_grad_input(
                    g, bvalues, bindices, BANK, K, config=c
                ),
                ("balanced", "sddmm"): lambda c: balanced.balanced_sddmm(g, x, bindices, BANK, config=c),
                ("csr", "fwd"): lambda c: csr.csr_linear(x, cvalues, cro, cci, N, bias, "gelu", config=c),
                ("csr", "grad_input"): lambda c: csr.csr_linear_grad_input(g, cvalues, cco, cri, cbp, K, config=c),
                ("csr", "sddmm"): lambda c: csr.csr_sddmm(g, x, cvalues, cro, cci, config=c),
            }
            modules = {"bsr": bsr, "balanced": balanced, "csr": csr}
            for (family, op), call in calls.items():
                module = modules[family]
                for i, config in enumerate(module.CONFIGS[op][(arch, _bits(name))]):
                    call(config)
                    launches[-1].update(family=family, op=op, config=i, dtype=name, config_kwargs=config.kwargs)
    finally:
        torch.library.wrap_triton = saved
        torch.backends.cuda.matmul.allow_tf32 = False
    assert all(isinstance(launch["kernel"], triton.runtime.JITFunction) for launch in launches)
    return launches


_TRITON_TYPES = {
    "float16": "fp16",
    "bfloat16": "bf16",
    "float32": "fp32",
    "int32": "i32",
    "uint8": "u8",
    "int8": "i8",
    "int16": "i16",
}


def _source(launch: dict):
    """The ASTSource a launch with these arguments compiles, specialised the way the JIT would."""
    import torch
    from triton.compiler import ASTSource

    kernel = launch["kernel"]
    values = dict(zip(kernel.arg_names, launch["args"]))
    values.update({k: v for k, v in launch["meta"].items() if k in kernel.arg_names})
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(kernel.params):
        v = values[param.name]
        if param.is_constexpr:
            signature[param.name], constexprs[param.name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            signature[param.name] = "*" + _TRITON_TYPES[str(v.dtype).replace("torch.", "")]
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        elif v == 1:
            signature[param.name], constexprs[param.name] = "constexpr", 1
        else:
            signature[param.name] = "i32" if -(2**31) <= v < 2**31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)


def _resources(cubin: bytes, path: str) -> Dict[str, int]:
    """REG, LOCAL (spilled/stack bytes per thread) and static SHARED from ``cuobjdump --dump-resource-usage``."""
    import triton

    with open(path, "wb") as f:
        f.write(cubin)
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    out = subprocess.run([tool, "--dump-resource-usage", path], check=True, capture_output=True, text=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out))
    return {k: int(v) for k, v in fields.items()}


def compile_all(arch: int, workdir: str) -> List[dict]:
    """Compiles every launch of ``arch``; one row per (kernel, config, dtype)."""
    import triton
    from triton.backends.compiler import GPUTarget

    rows = []
    for launch in _capture_launches(arch):
        meta = launch["meta"]
        options = {k: meta[k] for k in ("num_warps", "num_stages") if k in meta}
        compiled = triton.compile(_source(launch), target=GPUTarget("cuda", arch, 32), options=options)
        res = _resources(compiled.asm["cubin"], os.path.join(workdir, "kernel.cubin"))
        rows.append({
            "kernel": f"{launch['family']}.{launch['op']}", "config": launch["config"], "dtype": launch["dtype"],
            "tile": launch["config_kwargs"], **options,
            "regs": res["REG"], "spill_bytes": res.get("LOCAL", 0) + res.get("STACK", 0),
            # Triton's kernels use dynamic shared memory (metadata.shared) on top of any static allocation.
            "shared": compiled.metadata.shared + res.get("SHARED", 0),
        })
    return rows


@pytest.fixture(scope="module")
def compiled_rows(tmp_path_factory) -> Iterator[Dict[int, subprocess.Popen]]:
    """Starts one child per arch, both at once (the work is ptxas and MLIR passes, one core each)."""
    tmp = tmp_path_factory.mktemp("triton_compile")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp / "cache")  # nothing cached outside the tmp dir
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    procs = {}
    for arch in SMEM_LIMIT:
        workdir = tmp / f"sm_{arch}"
        workdir.mkdir()
        procs[arch] = subprocess.Popen([sys.executable, os.path.abspath(__file__), str(arch), str(workdir)], env=env,
                                       cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield procs
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow  # ptxas and MLIR for every config of both archs: ~30 s of two cores
@pytest.mark.parametrize("arch", sorted(SMEM_LIMIT))
def test_every_kernel_and_config_compiles_within_limits(arch: int, compiled_rows) -> None:
    out, err = compiled_rows[arch].communicate(timeout=600)
    assert compiled_rows[arch].returncode == 0, err[-4000:]
    rows = json.loads(out.strip().splitlines()[-1])

    from sparse.kernels import balanced, bsr, csr

    expected = sum(
        len(m.CONFIGS[op][(arch, _bits(d))])
        for m in (bsr, balanced, csr)
        for op in ("fwd", "grad_input", "sddmm")
        for d in DTYPES
    )
    assert len(rows) == expected
    print(f"\nsm_{arch}: T={T}, {N}x{K}, block {BLOCK}, bank {BANK} keep {KEEP}; shared limit {SMEM_LIMIT[arch]} B")
    print(
        f"{'kernel':<20}{'cfg':>4} {'dtype':<13}{'tile':<28}"
        f"{'warps':>6}{'stages':>7}{'regs':>6}{'spill B':>8}{'shared B':>10}"
    )
    for r in rows:
        tile = ",".join(f"{k}={v}" for k, v in r["tile"].items())
        print(f"{r['kernel']:<20}{r['config']:>4} {r['dtype']:<13}{tile:<28}{r['num_warps']:>6}{r['num_stages']:>7}"
              f"{r['regs']:>6}{r['spill_bytes']:>8}{r['shared']:>10}")
    spilled = [r for r in rows if r["spill_bytes"]]
    too_big = [r for r in rows if r["shared"] > SMEM_LIMIT[arch]]
    assert not spilled, f"register spills on sm_{arch}: {spilled}"
    assert not too_big, f"shared memory over {SMEM_LIMIT[arch]} B on sm_{arch}: {too_big}"


if __name__ == "__main__":  # the child process of the test above: python tests/test_triton_compile.py ARCH WORKDIR
    print(json.dumps(compile_all(int(sys.argv[1]), sys.argv[2])))
