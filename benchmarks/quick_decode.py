"""Quick batch-1 decode benchmark (T tokens, cold weights): balanced-sparse forward against the best dense path.

    python benchmarks/quick_decode.py [--tokens 1] [--keep 16 8 4] [--threads 2] [--dtype float32]

Every contender cycles through enough independent weight copies to total --factor x the L3 (32 MiB), so each call
streams its weight from main memory. Times are medians of --rounds rounds, each round timing one pass over all
copies of every contender in turn (interleaved, so load on the shared machine hits all of them alike). Prints the
speedup over the faster dense contender, the target 0.8 x (dense bytes / sparse bytes) and the achieved GB/s.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

import sparse
from sparse.formats import BalancedSparseWeight

L3 = 32 << 20


def pass_time(fns) -> float:
    # One thread: its CPU time, which time slices lost to the other processes on this shared machine do not inflate.
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    t = clock()
    for f in fns:
        f()
    return (clock() - t) / len(fns) * 1e3


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, nargs="+", default=[1])
    p.add_argument("--keep", type=int, nargs="+", default=[16, 8, 4])
    p.add_argument("--bank", type=int, default=32)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--shapes", nargs="+", default=["768x768", "3072x768", "768x3072"], help="OUTxIN")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--factor", type=float, default=2.0)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    dt = getattr(torch, a.dtype)
    print(f"{sparse._ext._C.__file__} isa={sparse._ext._C.get_isa()} threads={a.threads} dtype={a.dtype}")
    for shape in a.shapes:
        out, inn = map(int, shape.split("x"))
        W = torch.randn(out, inn).to(dt)
        dbytes = W.numel() * W.element_size()
        n_d = max(2, math.ceil(a.factor * L3 / dbytes))
        Ws = [W.clone() for _ in range(n_d)]
        Wp = [torch.ops.mkldnn._reorder_linear_weight(w, None) for w in Ws] if dt == torch.float32 else None
        sp = {}
        for keep in a.keep:
            w = BalancedSparseWeight.from_dense(W.float(), bank=a.bank, keep=keep).to(dtype=dt)
            n_s = max(2, math.ceil(a.factor * L3 / w.nbytes))
            sp[keep] = (w.nbytes, [(w.values.clone(), w.indices.clone()) for _ in range(n_s)])
        for T in a.tokens:
            x = torch.randn(T, inn).to(dt)
            cont = {"F.linear": [lambda w=w: F.linear(x, w) for w in Ws]}
            if Wp is not None:
                cont["onednn"] = [lambda w=w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "") for w in Wp]
            op = torch.ops.sparsekern.balanced_linear.default
            for keep, (_, cs) in sp.items():
                cont[keep] = [lambda v=v, i=i: op(x, v, i, a.bank, None, "none") for v, i in cs]
            ts = {k: [] for k in cont}
            for _ in range(2):
                for fns in cont.values():
                    pass_time(fns)
            for _ in range(a.rounds):
                for k, fns in cont.items():
                    ts[k].append(pass_time(fns))
            med = {k: sorted(v)[len(v) // 2] for k, v in ts.items()}
            dense = min(med["F.linear"], med.get("onednn", math.inf))
            print(f"{shape:>9} T={T} dense {dense * 1e3:7.1f} us ({dbytes / dense / 1e6:5.1f} GB/s; F.linear "
                  f"{med['F.linear'] * 1e3:.1f} onednn {med.get('onednn', math.inf) * 1e3:.1f})")
            for keep, (nb, _) in sp.items():
                target = 0.8 * dbytes / nb
                print(f"{'':>9}   keep={keep:<3} {med[keep] * 1e3:7.1f} us ({nb / med[keep] / 1e6:5.1f} GB/s)  "
                      f"speedup {dense / med[keep]:5.2f}x  target {target:4.2f}x", flush=True)


if __name__ == "__main__":
    main()
