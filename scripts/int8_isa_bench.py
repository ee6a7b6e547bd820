"""The INT8 block-sparse forward on each x86 code path against the float32 kernel, in one process.

Per (shape, density): the int8 op capped at each level (``sparse._C.set_isa``: avx512 -> AVX-512 VNNI on zmm,
avxvnni -> AVX-VNNI on ymm, avx2 -> vpmaddubsw with 7-bit activations) and the float32 block-sparse forward at
avx2 and avx512, all on the same weight and X. The contenders are interleaved: each round times every one of them
(``--calls`` calls after a warm-up call), ``--rounds`` rounds; printed are the median per-call time and the range
over rounds, and the speedup of each int8 path over float32 AVX2 (median / median). Each result is first checked
against the float64 reference of the same numbers. One thread unless ``--threads``.

    python scripts/int8_isa_bench.py                       # BERT-base shapes, T = 128, d = 0.1 and 0.5, block 32
    python scripts/int8_isa_bench.py --shapes 768x768 --densities 0.1 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's build
import sparse  # noqa: E402
from sparse import reference, runtime  # noqa: E402
from sparse._ext import require  # noqa: E402
from sparse.quant import QuantizedBlockSparseWeight  # noqa: E402

# (name, set_isa level, int8 kernel expected there or None for float32)
CONTENDERS = [
    ("fp32 avx2", "avx2", None),
    ("fp32 avx512", "avx512", None),
    ("int8 avx2 (vpmaddubsw)", "avx2", "avx2"),
    ("int8 avxvnni (ymm)", "avxvnni", "avxvnni"),
    ("int8 avx512vnni (zmm)", "avx512", "avx512vnni"),
]


def _usable(C, level: str, kernel) -> bool:
    try:
        C.set_isa(level)
    except ValueError:
        return False
    ok = kernel is None or C.int8_kernel() == kernel
    C.set_isa("auto")
    return ok


def _calls(w: sparse.BlockSparseWeight, X: torch.Tensor) -> Dict[str, Tuple[str, Callable[[], torch.Tensor]]]:
    C = require()
    q = QuantizedBlockSparseWeight.from_float(w)
    f32 = lambda: C.bsr_linear_call(X, w.values, w.row_offsets, w.col_indices, w.col_offsets, w.row_indices,
                                    w.block_perm, w.shape[0], None, "none")
    i8 = lambda: C.bsr_linear_int8_call(X, q.qvalues, q.w_scale, q.w_sum, q.row_offsets, q.col_indices, q.shape[0],
                                        q.block[1], None, "none", 0.0)
    out = {}
    for name, level, kernel in CONTENDERS:
        if not _usable(C, level, kernel):
            continue
        fn = f32 if kernel is None else i8
        C.set_isa(level)
        try:
            y = fn().double()
            if kernel is None:
                ref = reference.linear(X, w, None, "none")
            else:
                ref = reference.int8_linear(X, q, None, "none", C.int8_act_qmax())
            err = float((y - ref).abs().max()) / max(1.0, float(ref.abs().max()))
            assert err < 1e-5, f"{name}: relative error {err:.2e} against the float64 reference"
        finally:
            C.set_isa("auto")
        out[name] = (level, fn)
    return out


def bench(shape: Tuple[int, int], density: float, T: int, block: int, rounds: int,
          calls: int) -> Dict[str, List[float]]:
    """Per contender: the mean per-call time (us) of each round."""
    C = require()
    torch.manual_seed(0)
    out_f, in_f = shape
    W = torch.randn(out_f, in_f)
    w = sparse.BlockSparseWeight.from_dense(W, block, sparsity=1.0 - density)
    X = torch.randn(T, in_f)
    fns = _calls(w, X)
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, (level, fn) in fns.items():
            C.set_isa(level)
            try:
                fn()
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn()
                times[name].append((time.perf_counter() - t0) / calls * 1e6)
            finally:
                C.set_isa("auto")
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="768x768,3072x768,768x3072", help="out x in, comma-separated")
    ap.add_argument("--densities", default="0.1,0.5")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(runtime.cpu_summary())
    print(f"torch {torch.__version__}, {args.threads} thread(s), T = {args.tokens}, block {args.block}, "
          f"{args.rounds} interleaved rounds of {args.calls} calls: median us [min-max over rounds]")
    for s in args.shapes.split(","):
        shape = tuple(int(v) for v in s.split("x"))
        for d in (float(v) for v in args.densities.split(",")):
            times = bench(shape, d, args.tokens, args.block, args.rounds, args.calls)
            base = statistics.median(times["fp32 avx2"])
            cells = []
            for name, ts in times.items():
                med = statistics.median(ts)
                cells.append(f"{name} {med:.0f} [{min(ts):.0f}-{max(ts):.0f}] ({base / med:.2f}x)")
            print(f"{s} d={d}: " + "; ".join(cells), flush=True)


if __name__ == "__main__":
    main()
