"""Quick ratio check of the block-sparse CPU kernels against the best dense path, for kernel tuning.

Prints one line per (op, dtype, block, shape, tokens) with speedup over dense and speedup x density (the targets
of issue 3 are >= 0.75-0.9 in that column). The full CSV benchmark is `make bench`; this one is for iterating on
the kernels and tolerates a busy machine:
  * with --threads 1 each call is timed by the thread's CPU time, which other jobs on the cores do not inflate;
  * with --threads 2 the contenders are timed by wall clock, interleaved, and the minimum over rounds is kept
    (contention only ever adds time); the 1-thread run is done in the same process to report the scaling.
The forward runs under torch.inference_mode(): a deployed model runs that way, and the op's Python autograd
wrapper otherwise adds ~3.5 us per call, which dominates at T = 16 and 95% sparsity.

  python -m benchmarks.quick_bsr --op fwd --dtype float32 --block 32 --threads 1
  python -m benchmarks.quick_bsr --op cold --threads 1      # T = 1 with weights cycled through 3x the L3
"""

from __future__ import annotations

import argparse
import time
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from sparse.formats import BlockSparseWeight

OPS = torch.ops.sparsekern


def _fwd(X: torch.Tensor, w: BlockSparseWeight, b: torch.Tensor) -> Callable[[], torch.Tensor]:
    out = w.shape[0]
    return lambda: OPS.bsr_linear(X, w.values, w.row_offsets, w.col_indices, w.col_offsets, w.row_indices,
                                  w.block_perm, out, b, "none")


def _min_times(fns: Dict[str, Callable[[], object]], threads: int, rounds: int) -> Dict[str, float]:
    """Minimum time per call of each function, hot cache: each one runs `rounds` times in a row (after two warm-up
    calls), and the contenders take turns in three passes, so a burst of load from other jobs hits all of them."""
    torch.set_num_threads(threads)
    clock = time.thread_time if threads == 1 else time.perf_counter
    best = {k: float("inf") for k in fns}
    for _ in range(3):
        for k, f in fns.items():
            f()
            f()
            for _ in range(rounds):
                t0 = clock()
                f()
                best[k] = min(best[k], clock() - t0)
    return best


def hot(args: argparse.Namespace) -> None:
    dt = getattr(torch, args.dtype)
    dens = [float(d) for d in args.dens.split(",")]
    for shape in args.shapes.split(","):
        out, inn = (int(s) for s in shape.split("x"))
        W = torch.randn(out, inn).to(dt)
        b = torch.randn(out).to(dt)
        ws = {d: BlockSparseWeight.from_dense(W, args.block, sparsity=1.0 - d) for d in dens}
        for T in (int(t) for t in args.T.split(",")):
            X, dY = torch.randn(T, inn).to(dt), torch.randn(T, out).to(dt)
            fns: Dict[str, Callable[[], object]] = {}
            if args.op == "fwd":
                Wp = torch.ops.mkldnn._reorder_linear_weight(W, None)
                fns["dense:onednn"] = lambda: torch.ops.mkldnn._linear_pointwise(X, Wp, b, "none", [], "")
                fns["dense:F.linear"] = lambda: F.linear(X, W, b)
                fns.update({d: _fwd(X, w, b) for d, w in ws.items()})
            elif args.op == "grad_input":
                fns["dense:dY@W"] = lambda: dY @ W
                fns.update({d: (lambda w=w: OPS.bsr_linear_grad_input(dY, w.values, w.col_offsets, w.row_indices,
                                                                          w.block_perm, inn)) for d, w in ws.items()})
            else:
                fns["dense:dY^T@X"] = lambda: dY.t() @ X
                fns.update({d: (lambda w=w: OPS.bsr_sddmm(dY, X, w.values, w.row_offsets, w.col_indices))
                            for d, w in ws.items()})
            res = {th: _min_times(fns, th, args.rounds) for th in sorted({1, args.threads})}
            t = res[args.threads]
            base = min(v for k, v in t.items() if isinstance(k, str))
            cells: List[str] = []
            for d in dens:
                s = f"d={d}: {base / t[d]:6.2f}x ({base / t[d] * d:4.2f}/d)"
                if args.threads == 2:
                    s += f" scaling {res[1][d] / t[d] / 2:4.2f}"
                cells.append(s)
            dense = " ".join(f"{k[6:]} {v * 1e6:.0f}us" for k, v in t.items() if isinstance(k, str))
            print(f"{args.op} {args.dtype} b{args.block} {shape} T={T} {args.threads}t [{dense}] | " + " | ".join(cells),
                  flush=True)


def cold(args: argparse.Namespace) -> None:
    """T = 1, every call on a different weight copy, the copies together ~3x the L3, so W comes from memory."""
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    dt = getattr(torch, args.dtype)

    def per_call(fns: List[Callable[[], object]]) -> float:
        best = float("inf")
        for _ in range(5):
            t0 = clock()
            for f in fns:
                f()
            best = min(best, (clock() - t0) / len(fns))
        return best

    for shape in args.shapes.split(","):
        out, inn = (int(s) for s in shape.split("x"))
        n = max(8, int(96e6 // (out * inn * dt.itemsize)))
        X, b = torch.randn(1, inn).to(dt), torch.randn(out).to(dt)
        Ws = [torch.randn(out, inn).to(dt) for _ in range(n)]
        Wp = [torch.ops.mkldnn._reorder_linear_weight(W, None) for W in Ws]
        base = min(per_call([lambda W=W: torch.ops.mkldnn._linear_pointwise(X, W, b, "none", [], "") for W in Wp]),
                   per_call([lambda W=W: F.linear(X, W, b) for W in Ws]))
        cells = []
        for d in (float(v) for v in args.dens.split(",") if float(v) < 1):
            # as many sparse copies as fit in the same bytes, so they are as cold as the dense ones
            ws = [BlockSparseWeight.from_dense(torch.randn(out, inn).to(dt), args.block, sparsity=1 - d)
                  for _ in range(int(n / d))]
            t = per_call([_fwd(X, w, b) for w in ws])
            w = ws[0]
            sparse_bytes = w.values.numel() * dt.itemsize + 4 * (w.row_offsets.numel() + w.col_indices.numel())
            bytes_ratio = out * inn * dt.itemsize / sparse_bytes
            cells.append(f"d={d}: {base / t:5.2f}x = {base / t / bytes_ratio:4.2f} of the bytes ratio {bytes_ratio:.2f}")
        print(f"cold T=1 {args.dtype} b{args.block} {shape} {args.threads}t [dense {base * 1e6:.0f}us, {n} copies] | "
              + " | ".join(cells), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--op", choices=["fwd", "grad_input", "sddmm", "cold"], default="fwd")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--block", type=int, default=32)
    p.add_argument("--dens", default="1,0.5,0.25,0.1,0.05", help="densities, comma-separated")
    p.add_argument("--T", default="16,128,512", help="token counts, comma-separated")
    p.add_argument("--shapes", default="768x768,3072x768,768x3072", help="out x in, comma-separated")
    p.add_argument("--threads", type=int, choices=[1, 2], default=2)
    p.add_argument("--rounds", type=int, default=15, help="timed calls in a row per contender and pass")
    args = p.parse_args()
    torch.manual_seed(0)
    with torch.inference_mode():
        (cold if args.op == "cold" else hot)(args)


if __name__ == "__main__":
    main()
