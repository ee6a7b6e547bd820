"""INT8 balanced-sparse forward (sparsekern::balanced_linear_int8) against our float32 balanced kernel
(sparsekern::balanced_linear), both through their direct entry points, on BERT-base shapes.

Each sample is the mean of enough back-to-back calls to last ``--sample-ms``; the two kernels' samples are taken
in alternation (interleaved rounds), so a slow phase of a shared machine hits both. Prints medians and the range
(min..max) of the samples over the rounds, and the speedup of the medians. Every result is first checked against
the float64 reference (the int8 one against the reference of the same integers).

    python scripts/int8_balanced_bench.py [--threads 1] [--rounds 15] [--isa avx512|avx2|portable]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import time

import torch

import sparse
from sparse import reference
from sparse._ext import _C
from sparse.quant import QuantizedBalancedSparseWeight, activation_qmax

SHAPES = [(768, 768), (3072, 768), (768, 3072)]  # BERT-base (out, in): attention output, FFN up, FFN down


def sample(fn, min_s: float) -> float:
    """Seconds per call: the mean over enough calls to last min_s."""
    n, t = 1, 0.0
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        t = time.perf_counter() - t0
        if t >= min_s:
            return t / n
        n *= 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--sample-ms", type=float, default=5.0)
    ap.add_argument("--tokens", type=int, nargs="+", default=[128, 1])
    ap.add_argument("--keep", type=int, nargs="+", default=[3, 8])
    ap.add_argument("--bank", type=int, default=32)
    ap.add_argument("--isa", default="auto")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    _C.set_isa(args.isa)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"# {platform.processor() or platform.machine()}, isa {_C.get_isa()}, activation qmax {activation_qmax()}, "
          f"{args.threads} thread(s), torch {torch.__version__}, commit {commit}")
    print("| out x in | T | keep/bank | fp32 us (range) | int8 us (range) | speedup |")
    print("|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    for out, inn in SHAPES:
        W = torch.randn(out, inn, generator=gen) * inn ** -0.5
        for keep in args.keep:
            w = sparse.BalancedSparseWeight.from_dense(W, bank=args.bank, keep=keep)
            q = QuantizedBalancedSparseWeight.from_float(w)
            for T in args.tokens:
                X = torch.randn(T, inn, generator=gen)
                fp32 = lambda: _C.balanced_linear_call(X, w.values, w.indices, w.bank, None, "none")  # noqa: E731
                int8 = lambda: _C.balanced_linear_int8_call(  # noqa: E731
                    X, q.qvalues, q.indices, q.w_scale, q.w_sum, out, q.window, None, "none", 0.0)
                torch.testing.assert_close(fp32().double(), reference.linear(X, w), rtol=1e-4, atol=1e-4)
                ref8 = reference.int8_linear(X, q, None, "none", activation_qmax())
                torch.testing.assert_close(int8().double(), ref8, rtol=1e-5, atol=1e-5)
                times = {"fp32": [], "int8": []}
                for _ in range(args.rounds):
                    for name, fn in (("fp32", fp32), ("int8", int8)):
                        times[name].append(sample(fn, args.sample_ms / 1e3) * 1e6)
                med = {k: statistics.median(v) for k, v in times.items()}
                cell = lambda k: f"{med[k]:.1f} ({min(times[k]):.1f}..{max(times[k]):.1f})"  # noqa: E731
                print(f"| {out}x{inn} | {T} | {keep}/{args.bank} | {cell('fp32')} | {cell('int8')} | "
                      f"{med['fp32'] / med['int8']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
