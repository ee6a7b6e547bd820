"""Quick check that an activation fused into the CPU kernels' output stage beats the unfused pair (the kernel with
activation="none", then torch.nn.functional's activation), for tuning the vectorised activations.

Prints one line per (format, density, dtype, threads): the median time per call of the kernel alone ("none"), the
fused kernel and the unfused pair, unfused / fused of the medians (> 1: fusing pays), and the same ratio of the
minima (a busy machine only ever adds time, so the minima are the steadier estimate there). The contenders take
turns call by call (interleaved), so load from other jobs on the cores hits all of them alike; with --threads 1 each
call is timed by the thread's CPU time, which other jobs do not inflate.

  python -m benchmarks.quick_act                                  # BERT's intermediate layer, gelu
  python -m benchmarks.quick_act --act silu --dens 0.5 --threads 2
  python -m benchmarks.quick_act --isa avx2                       # the AVX2 kernels on an AVX-512 machine
  python -m benchmarks.quick_act --bert --threads 1               # BERT-base forward, 90% block-32, GELU fused or not
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

import sparse
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


def _keep_freed_memory() -> None:
    """Keeps glibc from handing freed outputs (12 MiB at BERT's shape) back to the kernel: otherwise each call's output
    may be a fresh mapping whose first touch page-faults, which showed as +/- 5 ms on a 2.5 ms call depending on the
    order of the calls. Both contenders allocate the same way in a model; here only their compute is compared."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)


def _times(fns: Dict[str, Callable[[], object]], threads: int, rounds: int) -> Dict[str, List[float]]:
    """Seconds per call of each function, `rounds` calls each, interleaved round by round after two warm-up rounds."""
    torch.set_num_threads(threads)
    clock = time.thread_time if threads == 1 else time.perf_counter
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for r in range(rounds + 2):
        for k, f in fns.items():
            t0 = clock()
            f()
            if r >= 2:
                times[k].append(clock() - t0)
    return times


def bert(threads: List[int], rounds: int) -> None:
    """BERT-base encoder forward (batch 8, sequence 128, random weights) with every encoder Linear 90% block-32
    sparse, the intermediate GELU fused into the kernel or left to torch, in fp32 and bf16."""
    from .e2e_bert import build_model, sparsify

    base = build_model()
    ids = torch.randint(0, base.config.vocab_size, (8, 128), generator=torch.Generator().manual_seed(8))
    print("BERT-base forward, batch 8, seq 128, 90% block-32; median ms per forward")
    print(f"{'dtype':9s} {'thr':>3s} {'unfused':>8s} {'fused':>8s} {'unf/fused':>9s} {'(minima)':>8s}")
    with torch.inference_mode():
        for dt in (torch.float32, torch.bfloat16):
            models = {fuse: sparsify(base, "block", 0.9, fuse=fuse).to(dt).eval() for fuse in (False, True)}
            fns = {"unfused": lambda: models[False](input_ids=ids), "fused": lambda: models[True](input_ids=ids)}
            for th in threads:
                t = _times(fns, th, rounds)
                m = {name: statistics.median(v) for name, v in t.items()}
                print(f"{str(dt)[6:]:9s} {th:3d} {m['unfused'] * 1e3:8.1f} {m['fused'] * 1e3:8.1f} "
                      f"{m['unfused'] / m['fused']:9.3f} {min(t['unfused']) / min(t['fused']):8.3f}", flush=True)


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
    ap.add_argument("--isa", default="auto", help="CPU kernel family: auto, avx512, avx2, portable")
    ap.add_argument("--bert", action="store_true", help="time BERT-base end to end instead of one layer")
    args = ap.parse_args()
    sparse._ext._C.set_isa(args.isa)
    _keep_freed_memory()
    if args.bert:
        return bert([int(s) for s in args.threads.split(",")], args.rounds)
    out, inn = (int(s) for s in args.shape.split("x"))
    gen = torch.Generator().manual_seed(0)
    W0, b0 = torch.randn(out, inn, generator=gen), torch.randn(out, generator=gen)
    X0 = torch.randn(args.T, inn, generator=gen)
    act_fn = TORCH_ACT[args.act]
    print(f"{args.act}, {out}x{inn}, T={args.T}, {sparse._ext._C.get_isa()} kernels; median ms per call; "
          f"unfused = kernel 'none' then torch's {args.act}")
    print(f"{'format':9s} {'d':>4s} {'dtype':9s} {'thr':>3s} {'none':>8s} {'fused':>8s} {'unfused':>8s} "
          f"{'unf/fused':>9s} {'(minima)':>8s}")
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
                        t = _times(fns, th, args.rounds)
                        m = {name: statistics.median(v) for name, v in t.items()}
                        print(f"{fmt:9s} {d:4.2f} {str(dt)[6:]:9s} {th:3d} {m['none'] * 1e3:8.3f} "
                              f"{m['fused'] * 1e3:8.3f} {m['unfused'] * 1e3:8.3f} {m['unfused'] / m['fused']:9.3f} "
                              f"{min(t['unfused']) / min(t['fused']):8.3f}", flush=True)


if __name__ == "__main__":
    main()
