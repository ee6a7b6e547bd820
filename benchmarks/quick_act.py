"""Quick check that an activation fused into the CPU kernels' output stage beats the unfused pair (the kernel with
activation="none", then torch.nn.functional's activation), for tuning the vectorised activations.

Prints one line per (format, density, dtype, threads): the median time per call of the kernel alone ("none"), the
fused kernel and the unfused pair, and unfused / fused (> 1: fusing pays). The contenders take turns call by call
(interleaved), so load from other jobs on the cores hits all of them alike; with --threads 1 each call is timed by
the thread's CPU time, which other jobs do not inflate.

  python -m benchmarks.quick_act                                  # BERT's intermediate layer, gelu
  python -m benchmarks.quick_act --act silu --dens 0.5 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict

import torch
import torch.nn.functional as F

from sparse.formats import BalancedSparseWeight, BlockSparseWeight

OPS = torch.ops.sparsekern
TORCH_ACT: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda y: F.gelu(y, approximate="tanh"),
    "silu": F.silu,
}


def _kernel(fmt: str, W: torch.Tensor, d: float, block: int, bank: int) -> Callable[..., torch.Tensor]:
    """fn(X, bias, act) running the CPU kernel of a `fmt` weight kept at density ~d."""
    if fmt == "bsr":
        w = BlockSparseWeight.from_dense(W, block, sparsity=1.0 - d)
        return lambda X, b, act: OPS.bsr_linear(X, w.values, w.row_offsets, w.col_indices, w.col_offsets,
                                                w.row_indices, w.block_perm, W.shape[0], b, act)
    wb = BalancedSparseWeight.from_dense(W, bank=bank, keep=max(1, round(d * bank)))
    return lambda X, b, act: OPS.balanced_linear(X, wb.values, wb.indices, bank, b, act)


def _medians(fns: Dict[str, Callable[[], object]], threads: int, rounds: int) -> Dict[str, float]:
    """Median seconds per call of each function, the calls interleaved round by round after two warm-up rounds."""
    torch.set_num_threads(threads)
    clock = time.thread_time if threads == 1 else time.perf_counter
    times: Dict[str, list] = {k: [] for k in fns}
    for r in range(rounds + 2):
        for k, f in fns.items():
            t0 = clock()
            f()
            if r >= 2:
                times[k].append(clock() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="3072x768", help="out x in (default: BERT-base's intermediate layer)")
    ap.add_argument("--T", type=int, default=1024)
    ap.add_argument("--act", default="gelu", choices=sorted(TORCH_ACT))
    ap.add_argument("--formats", default="bsr,balanced")
    ap.add_argument("--dens", default="0.1,0.5")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--bank", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=21)
    args = ap.parse_args()
    out, inn = (int(s) for s in args.shape.split("x"))
    gen = torch.Generator().manual_seed(0)
    W0, b0, X0 = torch.randn(out, inn, generator=gen), torch.randn(out, generator=gen), torch.randn(args.T, inn, generator=gen)
    act_fn = TORCH_ACT[args.act]
    print(f"{args.act}, {out}x{inn}, T={args.T}; median ms per call; unfused = kernel 'none' then torch's {args.act}")
    print(f"{'format':9s} {'d':>4s} {'dtype':9s} {'thr':>3s} {'none':>8s} {'fused':>8s} {'unfused':>8s} {'unf/fused':>9s}")
    with torch.inference_mode():
        for fmt in args.formats.split(","):
            for d in (float(s) for s in args.dens.split(",")):
                for dt in (getattr(torch, s) for s in args.dtypes.split(",")):
                    W, b, X = W0.to(dt), b0.to(dt), X0.to(dt)
                    k = _kernel(fmt, W, d, args.block, args.bank)
                    fns = {
                        "none": lambda: k(X, b, "none"),
                        "fused": lambda: k(X, b, args.act),
                        "unfused": lambda: act_fn(k(X, b, "none")),
                    }
                    for th in (int(s) for s in args.threads.split(",")):
                        m = _medians(fns, th, args.rounds)
                        print(f"{fmt:9s} {d:4.2f} {str(dt)[6:]:9s} {th:3d} {m['none'] * 1e3:8.3f} {m['fused'] * 1e3:8.3f} "
                              f"{m['unfused'] * 1e3:8.3f} {m['unfused'] / m['fused']:9.3f}", flush=True)


if __name__ == "__main__":
    main()
