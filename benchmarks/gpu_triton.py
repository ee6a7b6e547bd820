"""GPU benchmark of the Triton kernels against cuBLAS (``F.linear``) and torch's own BSR kernels, measured in
the same run, bf16, T = 4096 tokens, Llama-7B shapes. Writes a CSV (hardware and versions on every row) and
prints a table against these targets:

    forward, block 64 and 32, d = 0.5/0.25/0.1: >= 0.8/d x cuBLAS and >= 1.5x torch BSR
    input and weight gradient (SDDMM), block 64:  >= 0.7/d x cuBLAS (dense dX = dY W, dW = dY^T X)
    balanced, bank 64, keep 16 (d = 0.25):          >= 1.5x cuBLAS

Each case also checks the result against the dense computation on the pruned weight (max error relative to
the output's largest value). Runs in about 2-3 minutes on an H100/H200 (autotuning included). Rows are
appended to the CSV as they are measured, so a run stopped early keeps what it measured; ``--max-seconds``
stops it cleanly before the next case once that long has passed (the 4096x4096 shape, every op, comes first).
A case that raises is reported and skipped; the exit status is then 1.

    python benchmarks/gpu_triton.py [--csv gpu_triton.csv] [--tokens 4096] [--max-seconds S]
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import sys
import time
import traceback
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
import sparse  # noqa: E402,F401  (maps sparse.kernels)
from sparse import reference, timing  # noqa: E402
from sparse.formats import BalancedSparseWeight, BlockSparseWeight  # noqa: E402
from sparse.kernels import balanced, bsr  # noqa: E402

SHAPES = {"attn 4096x4096": (4096, 4096), "mlp up 11008x4096": (11008, 4096), "mlp down 4096x11008": (4096, 11008)}
DENSITIES = (0.5, 0.25, 0.1)
DTYPE = torch.bfloat16
ENV_FIELDS = ["gpu", "capability", "torch", "triton", "cuda", "host", "date"]
FIELDS = ["op", "shape", "tokens", "pattern", "density", "ours_ms", "cublas_ms", "speedup_vs_cublas",
          "target_vs_cublas", "meets_cublas_target", "max_rel_err", "speedup_vs_torch_bsr", "torch_bsr_linear_ms",
          "torch_bsr_dense_mm_ms"] + ENV_FIELDS


def bench(fn: Callable[[], object]) -> float:
    """Median milliseconds of ``fn`` (triton.testing.do_bench: L2 flushed between runs). A call slower than
    50 ms (a slow fallback path) is timed 3 times instead, and one slower than 1 s once, to keep the whole run
    within its few minutes (those samples by sparse.timing, the device synchronised around each)."""
    import triton.testing

    once = timing.sample(fn, repeats=1, warmup=1, device="cuda").median  # warm-up: compile / autotune
    if once > 1.0:
        return once * 1e3
    if once > 0.05:
        return timing.sample(fn, repeats=3, warmup=0, device="cuda").median * 1e3
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30)).item()


def torch_bsr_times(W: torch.Tensor, block: int, x: torch.Tensor) -> Dict[str, Optional[float]]:
    """torch's BSR: F.linear with a sparse_bsr weight, and torch.sparse's Triton bsr_dense_mm (W @ X^T)."""
    out: Dict[str, Optional[float]] = {"torch_bsr_linear_ms": None, "torch_bsr_dense_mm_ms": None}
    try:
        Wb = W.to_sparse_bsr((block, block))
    except (RuntimeError, NotImplementedError) as exc:
        print(f"  torch BSR conversion failed: {exc}", file=sys.stderr)
        return out
    try:
        out["torch_bsr_linear_ms"] = bench(lambda: F.linear(x, Wb))
    except (RuntimeError, NotImplementedError) as exc:
        print(f"  F.linear(x, W_bsr) failed: {str(exc).splitlines()[0]}", file=sys.stderr)
    try:
        from torch.sparse._triton_ops import bsr_dense_mm

        xt = x.t().contiguous()
        out["torch_bsr_dense_mm_ms"] = bench(lambda: bsr_dense_mm(Wb, xt))
    except (ImportError, RuntimeError, NotImplementedError, ValueError, TypeError) as exc:
        print(f"  bsr_dense_mm failed: {str(exc).splitlines()[0]}", file=sys.stderr)
    return out


def run(T: int, dev: torch.device, shapes: Dict[str, Tuple[int, int]], env: Dict[str, str],
        writer: Optional[csv.DictWriter] = None, flush: Callable[[], None] = lambda: None,
        deadline: float = float("inf")) -> Tuple[List[dict], List[str]]:
    """Every case on ``dev``, T tokens, bf16; one row per case (printed, and written to ``writer`` then flushed,
    as it is measured). No case starts after ``deadline`` (time.monotonic()). Returns the rows and the cases
    that raised (each reported on stderr, the others still run)."""
    rows: List[dict] = []
    errors: List[str] = []
    g = torch.Generator(device=dev).manual_seed(0)

    def late(what: str) -> bool:
        if time.monotonic() < deadline:
            return False
        print(f"time limit reached: stopped before {what}", flush=True)
        return True

    def failed(what: str, exc: BaseException) -> None:
        errors.append(f"{what}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        print(f"FAILED {what}:", file=sys.stderr)
        traceback.print_exc()
        sys.stderr.flush()

    def add(
        op: str, shape: str, pattern: str, density: float, ours: float, dense: float, target: float, err: float, **extra
    ):
        row = {
            "op": op,
            "shape": shape,
            "tokens": T,
            "pattern": pattern,
            "density": density,
            "ours_ms": round(ours, 4),
            "cublas_ms": round(dense, 4),
            "speedup_vs_cublas": round(dense / ours, 3),
            "target_vs_cublas": round(target, 2),
            "meets_cublas_target": dense / ours >= target,
            "max_rel_err": f"{err:.2e}",
            **extra,
            **env,
        }
        rows.append(row)
        if writer is not None:
            writer.writerow(row)
            flush()
        print(f"{op:<12}{shape:<22}{pattern:<16}{density:>6.2f}{ours:>9.3f}{dense:>9.3f}{dense / ours:>8.2f}x"
              f"{target:>7.2f}x  {extra.get('speedup_vs_torch_bsr', ''):>7}  err {err:.1e}", flush=True)

    def block_case(shape_name, N, K, block, d, x, gy, W, t_fwd, t_dx, t_dw) -> None:
        w = BlockSparseWeight.from_dense(W, block, sparsity=1.0 - d)
        Wp = w.to_dense()
        y = bsr.bsr_linear(x, w.values, w.row_offsets, w.col_indices, N)
        err = rel_err(y, F.linear(x, Wp))
        t = bench(lambda: bsr.bsr_linear(x, w.values, w.row_offsets, w.col_indices, N))
        tb = torch_bsr_times(Wp, block, x)
        best = min((v for v in tb.values() if v is not None), default=None)
        add(
            "fwd",
            shape_name,
            f"block {block}",
            w.density,
            t,
            t_fwd,
            0.8 / w.density,
            err,
            speedup_vs_torch_bsr=round(best / t, 2) if best else "n/a",
            **{k: round(v, 4) if v else "n/a" for k, v in tb.items()},
        )
        if block == 64:
            dx = bsr.bsr_linear_grad_input(gy, w.values, w.col_offsets, w.row_indices, w.block_perm, K)
            t = bench(lambda: bsr.bsr_linear_grad_input(gy, w.values, w.col_offsets, w.row_indices, w.block_perm, K))
            add("grad_input", shape_name, "block 64", w.density, t, t_dx, 0.7 / w.density, rel_err(dx, gy @ Wp))
            dv = bsr.bsr_sddmm(gy, x, w.values, w.row_offsets, w.col_indices)
            ref = reference.gather(gy.t() @ x, w)
            t = bench(lambda: bsr.bsr_sddmm(gy, x, w.values, w.row_offsets, w.col_indices))
            add("sddmm", shape_name, "block 64", w.density, t, t_dw, 0.7 / w.density, rel_err(dv, ref))

    def balanced_case(shape_name, N, K, x, gy, W, t_fwd, t_dx, t_dw) -> None:
        wb = BalancedSparseWeight.from_dense(W, 64, 16)
        Wp = wb.to_dense()
        y = balanced.balanced_linear(x, wb.values, wb.indices, 64)
        t = bench(lambda: balanced.balanced_linear(x, wb.values, wb.indices, 64))
        add("fwd", shape_name, "balanced 64/16", wb.density, t, t_fwd, 1.5, rel_err(y, F.linear(x, Wp)))
        dx = balanced.balanced_linear_grad_input(gy, wb.values, wb.indices, 64, K)
        t = bench(lambda: balanced.balanced_linear_grad_input(gy, wb.values, wb.indices, 64, K))
        add("grad_input", shape_name, "balanced 64/16", wb.density, t, t_dx, 0.7 / wb.density, rel_err(dx, gy @ Wp))
        dv = balanced.balanced_sddmm(gy, x, wb.indices, 64)
        t = bench(lambda: balanced.balanced_sddmm(gy, x, wb.indices, 64))
        add(
            "sddmm",
            shape_name,
            "balanced 64/16",
            wb.density,
            t,
            t_dw,
            0.7 / wb.density,
            rel_err(dv, reference.gather(gy.t() @ x, wb)),
        )

    print(f"{env['gpu']} (sm_{env['capability']}), torch {env['torch']}, triton {env['triton']}, bf16, T={T}")
    print(
        f"{'op':<12}{'shape':<22}{'pattern':<16}{'d':>6}"
        f"{'ours ms':>9}{'cuBLAS':>9}{'speedup':>9}{'target':>8}  vs torch BSR"
    )
    for shape_name, (N, K) in shapes.items():
        if late(shape_name):
            break
        x = torch.randn(T, K, device=dev, dtype=DTYPE, generator=g)
        gy = torch.randn(T, N, device=dev, dtype=DTYPE, generator=g)
        W = torch.randn(N, K, device=dev, dtype=DTYPE, generator=g) / K**0.5
        t_fwd = bench(lambda: F.linear(x, W))
        t_dx = bench(lambda: gy @ W)
        t_dw = bench(lambda: gy.t() @ x)
        cases = [(f"{shape_name} block {block} d={d}", block_case, (block, d)) for block in (64, 32) for d in DENSITIES]
        cases.append((f"{shape_name} balanced 64/16", balanced_case, ()))
        for case, fn, params in cases:
            if late(case):
                return rows, errors
            try:
                fn(shape_name, N, K, *params, x, gy, W, t_fwd, t_dx, t_dw)
            except Exception as exc:  # noqa: BLE001  (reported; the other cases still run)
                failed(case, exc)
        x = gy = W = None  # freed before the next shape's tensors
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows, errors


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--csv", default="gpu_triton.csv", help="output CSV path (rows appended as measured)")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="start no case after this many seconds (the rows so far stay in the CSV)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu_triton.py needs a CUDA device")
    import triton

    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.device("cuda")
    env = {
        "gpu": torch.cuda.get_device_name(dev), "capability": "%d.%d" % torch.cuda.get_device_capability(dev),
        "torch": torch.__version__, "triton": triton.__version__, "cuda": str(torch.version.cuda),
        "host": platform.node(), "date": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }
    start = time.time()
    deadline = time.monotonic() + args.max_seconds if args.max_seconds is not None else float("inf")
    with open(args.csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, restval="")
        writer.writeheader()
        f.flush()
        rows, errors = run(args.tokens, dev, SHAPES, env, writer, f.flush, deadline)
    met = sum(r["meets_cublas_target"] for r in rows)
    print(f"{met}/{len(rows)} cases meet their cuBLAS target; wrote {args.csv} in {time.time() - start:.0f} s")
    if errors:
        print(f"{len(errors)} case(s) failed:", *errors, sep="\n  ")
        raise SystemExit(1)


if __name__ == "__main__":
    main()
