"""Quick balanced-sparse forward benchmark against the best dense path (oneDNN pre-packed or F.linear).

    python benchmarks/quick_balanced.py [--tokens 16 128 512] [--keep 16 8 4] [--bank 32] [--dtype float32]

Prints one line per (shape, T, keep): median times (ms) and the speedup over the faster dense contender, both
measured in the same run. The full CSV benchmark is benchmarks/ (make bench); this is the kernel tuning loop.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import sparse  # noqa: F401  (registers the ops)
from sparse.formats import BalancedSparseWeight


def bench(fn, reps: int, stat: str = "median") -> float:
    """Median (or minimum: robust on a shared, loaded machine) time of fn() in ms, after warm-up. With one torch
    thread this is the thread's CPU time, which time slices lost to other processes do not inflate."""
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    for _ in range(3):
        fn()
    ts = []
    for _ in range(reps):
        t = clock()
        fn()
        ts.append(clock() - t)
    ts.sort()
    return (ts[0] if stat == "min" else ts[len(ts) // 2]) * 1e3


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, nargs="+", default=[16, 128, 512])
    p.add_argument("--keep", type=int, nargs="+", default=[16, 8, 4])
    p.add_argument("--bank", type=int, default=32)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--shapes", nargs="+", default=["768x768", "3072x768", "768x3072"], help="OUTxIN")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--stat", default="median", choices=["median", "min"])
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    dt = getattr(torch, a.dtype)
    print(f"isa={sparse._ext._C.get_isa()} threads={a.threads} dtype={a.dtype} bank={a.bank}")
    for shape in a.shapes:
        out, inn = map(int, shape.split("x"))
        W = torch.randn(out, inn).to(dt)
        b = torch.randn(out).to(dt)
        Wp = torch.ops.mkldnn._reorder_linear_weight(W, None) if dt == torch.float32 else None
        for T in a.tokens:
            x = torch.randn(T, inn).to(dt)
            t_lin = bench(lambda: F.linear(x, W, b), a.reps, a.stat)
            t_dnn = bench(lambda: torch.ops.mkldnn._linear_pointwise(x, Wp, b, "none", [], ""), a.reps, a.stat) if Wp is not None else float("inf")
            dense = min(t_lin, t_dnn)
            for keep in a.keep:
                w = BalancedSparseWeight.from_dense(W.float(), bank=a.bank, keep=keep).to(dtype=dt)
                t_sp = bench(lambda: torch.ops.sparsekern.balanced_linear(x, w.values, w.indices, a.bank, b, "none"), a.reps, a.stat)
                print(f"{shape:>9} T={T:<4} keep={keep:<3} d={keep / a.bank:.3f}  sparse {t_sp:8.4f}  "
                      f"F.linear {t_lin:8.4f}  onednn {t_dnn:8.4f}  speedup {dense / t_sp:5.2f}x", flush=True)


if __name__ == "__main__":
    main()
