"""Times the weight gradient of block-sparse weights (``bsr_sddmm``) in two builds of the package side by side, and
the dense ``dY^T @ X`` (torch.mm) it stands in for, in the same run.

Two builds cannot share a process (both register the ``sparsekern`` ops), so each build runs in a worker process
of its own (``--worker ROOT``: ROOT goes first on sys.path) and this driver asks them for one sample at a time,
alternating: in every round each case is timed once per contender, the contenders' order rotated by one per
round, so a slow spell of a shared machine hits all of them alike. A sample is a fixed number of calls (calibrated
once per contender and case to about ``--sample-ms``), preceded by one untimed call. The weights come from the same
seed in both workers; the driver checks that the two builds' gradients agree.

    python scripts/sddmm_ab.py --before /path/to/old/checkout --after .            # the default grid
    python scripts/sddmm_ab.py --before OLD --after . --blocks 8x1,1x4 --tokens 128 --threads 1 --rounds 5

Prints one line per case: the medians (ms) and, over the rounds, the range of before / after (the speedup) and of
torch.mm / after (the speedup over dense), and speedup x density.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Dict, List


def _worker(root: str) -> int:
    sys.path.insert(0, os.path.abspath(root))
    import torch

    from sparse._ext import _C
    from sparse.formats import BlockSparseWeight

    cache: Dict[str, tuple] = {}

    def setup(c: dict) -> tuple:
        key = json.dumps(c, sort_keys=True)
        if key not in cache:
            cache.clear()  # one case at a time would do; keep memory flat
            g = torch.Generator().manual_seed(c["seed"])
            dt = getattr(torch, c["dtype"])
            W = torch.randn(c["out"], c["in"], generator=g)
            w = BlockSparseWeight.from_dense(W, tuple(c["block"]), sparsity=1 - c["density"]).to(dtype=dt)
            X = torch.randn(c["T"], c["in"], generator=g).to(dt)
            dY = torch.randn(c["T"], c["out"], generator=g).to(dt)
            sddmm = torch.ops.sparsekern.bsr_sddmm.default
            cache[key] = (lambda: sddmm(dY, X, w.values, w.row_offsets, w.col_indices), lambda: torch.mm(dY.t(), X))
        return cache[key]

    print("ready", flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        torch.set_num_threads(req["case"]["threads"])
        _C.set_isa(req["case"]["isa"])
        fn = setup(req["case"])[0 if req["what"] == "sddmm" else 1]
        if req.get("check"):
            dw = fn().double()
            print(json.dumps({"sum": float(dw.sum()), "abs": float(dw.abs().sum())}), flush=True)
            continue
        fn()
        clock = time.thread_time if req.get("cpu") else time.perf_counter
        t = clock()
        for _ in range(req["calls"]):
            fn()
        print(json.dumps({"s": (clock() - t) / req["calls"]}), flush=True)
    return 0


class Worker:
    def __init__(self, root: str):
        self.p = subprocess.Popen([sys.executable, __file__, "--worker", root], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, cwd=os.path.abspath(root))
        assert self.p.stdout.readline().strip() == "ready", f"worker for {root} did not start"

    def ask(self, **req) -> dict:
        self.p.stdin.write(json.dumps(req) + "\n")
        self.p.stdin.flush()
        return json.loads(self.p.stdout.readline())

    def close(self) -> None:
        self.p.stdin.close()
        self.p.wait()


def _pairs(text: str) -> List[List[int]]:
    return [[int(v) for v in s.split("x")] for s in text.split(",")]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--before", help="checkout (with the extension built in place) of the old build")
    ap.add_argument("--after", default=".", help="checkout of the new build (default: .)")
    ap.add_argument("--shapes", default="3072x768,768x3072", help="OUTxIN list")
    ap.add_argument("--blocks", default="8x1,1x4", help="block list, ROWSxCOLS")
    ap.add_argument("--tokens", default="128,512")
    ap.add_argument("--densities", default="0.1,0.5")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--isa", default="auto", help="code path of the kernels (sparse._C.set_isa): auto, avx512, "
                    "avx2 (on an AVX-512 machine an emulation of an AVX2 one: torch's own code keeps its path)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--sample-ms", type=float, default=30.0)
    ap.add_argument("--cpu-time", action="store_true",
                    help="time the calling thread's CPU time, not wall time (1 thread only: on a machine shared with "
                    "other work, preemption then does not count)")
    args = ap.parse_args(argv)
    if args.worker:
        return _worker(args.worker)
    if not args.before:
        ap.error("--before is required")
    if args.cpu_time and args.threads != "1":
        ap.error("--cpu-time needs --threads 1 (the other threads' time would not count)")
    before, after = Worker(args.before), Worker(args.after)
    contenders = {"before": (before, "sddmm"), "after": (after, "sddmm"), "mm": (after, "mm")}
    cases = []
    for (o, i), b, t, d, n in itertools.product(_pairs(args.shapes), _pairs(args.blocks),
                                                [int(v) for v in args.tokens.split(",")],
                                                [float(v) for v in args.densities.split(",")],
                                                [int(v) for v in args.threads.split(",")]):
        cases.append({"out": o, "in": i, "block": b, "T": t, "density": d, "threads": n, "dtype": args.dtype,
                      "isa": args.isa, "seed": 1})
    calls: Dict[tuple, int] = {}
    for c in cases:
        sb, sa = (before.ask(case=c, what="sddmm", check=True), after.ask(case=c, what="sddmm", check=True))
        rel = abs(sb["sum"] - sa["sum"]) / max(sa["abs"], 1e-30)
        assert rel < 1e-3, f"the builds disagree on {c}: {sb} vs {sa}"
        for name, (w, what) in contenders.items():
            one = w.ask(case=c, what=what, calls=1)["s"]
            calls[(json.dumps(c), name)] = max(1, min(1000, round(args.sample_ms / 1e3 / max(one, 1e-7))))
    samples: Dict[tuple, Dict[str, List[float]]] = {json.dumps(c): {k: [] for k in contenders} for c in cases}
    names = list(contenders)
    for r in range(args.rounds):
        for c in cases:
            key = json.dumps(c)
            for name in names[r % 3:] + names[:r % 3]:
                w, what = contenders[name]
                samples[key][name].append(w.ask(case=c, what=what, calls=calls[(key, name)], cpu=args.cpu_time)["s"])
    before.close()
    after.close()
    print("| shape | block | T | d | threads | before ms | after ms | torch.mm ms | before/after | mm/after | "
          "mm/after x d |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for c in cases:
        s = samples[json.dumps(c)]
        sp = [b / a for b, a in zip(s["before"], s["after"])]
        dn = [m / a for m, a in zip(s["mm"], s["after"])]
        med = {k: statistics.median(v) * 1e3 for k, v in s.items()}
        print(f"| {c['out']}x{c['in']} | {c['block'][0]}x{c['block'][1]} | {c['T']} | {c['density']} | "
              f"{c['threads']} | {med['before']:.2f} | {med['after']:.3f} | {med['mm']:.2f} | "
              f"{min(sp):.1f}-{max(sp):.1f} | {min(dn):.2f}-{max(dn):.2f} | "
              f"{min(dn) * c['density']:.2f}-{max(dn) * c['density']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
