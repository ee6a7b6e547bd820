"""CUDA kernels vs cuBLAS on Llama-7B MLP shapes: bf16, T = 4096 tokens, hot weights.

    python -m benchmarks.gpu_cuda [--out DIR] [--repeats N] [--max-seconds S]

Per shape (out x in: 4096x4096, 11008x4096, 4096x11008), timed together with interleaved repeats (CUDA events,
each sample preceded by an untimed call of the same contender; medians):
- dense ``F.linear`` (cuBLAS) on the dense weight: the baseline of every ratio;
- 2:4 on sparse tensor cores (``sparsekern::nm24_linear``, weight packed once) and
  ``torch.sparse.to_sparse_semi_structured`` (cuSPARSELt / CUTLASS) on the same 2:4 weight;
- block-sparse, block 64, density 0.5 / 0.25 / 0.1 (``sparsekern::bsr_linear``), target >= 0.8 / density.
Each contender's output is compared with dense ``F.linear`` on its own (pruned) weight, so a wrong kernel shows
up as a large error here rather than as a fast time. Writes DIR/gpu_cuda.csv (the columns of benchmarks/harness.py)
and prints a table. About a minute on an H200. The rows of each shape are appended to the CSV as soon as that shape
is measured, so a run stopped early keeps the shapes it finished; ``--max-seconds`` starts no shape after that long.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import os
import statistics
import subprocess
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

import sparse  # noqa: F401  (registers the ops)
from sparse import BalancedSparseWeight, BlockSparseWeight, _ext, timing

COLUMNS = ["bench", "case", "op", "backend", "format", "block", "dtype", "out_features", "in_features", "shape",
           "tokens", "sparsity", "density", "threads", "weights", "weight_bytes", "median_s", "p10_s", "p90_s",
           "repeats", "baseline", "baseline_s", "ratio", "ideal_ratio", "machine", "cpu_features", "isa", "torch",
           "triton", "cuda", "git_rev", "timestamp"]
SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
TOKENS = 4096
BLOCK = 64
DENSITIES = (0.5, 0.25, 0.1)


def _time(contenders: Dict[str, Callable[[], torch.Tensor]], repeats: int) -> Dict[str, List[float]]:
    """Seconds per call of each contender, by CUDA events (sparse.timing.interleaved): one untimed call of each
    first (compile / autotune / allocate), then rounds that interleave the contenders in rotating order, each
    sample right after an untimed call of the same contender (its steady state)."""
    samples = timing.interleaved(contenders, repeats=repeats, warmup=1, device="cuda", rotate=True, presample=True,
                                 cuda_events=True)
    return {n: list(s.seconds) for n, s in samples.items()}


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30)).item()


def _git_rev() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        return ""


def run(out_dir: str, repeats: int, max_seconds: Optional[float] = None) -> List[Dict[str, object]]:
    deadline = time.monotonic() + max_seconds if max_seconds is not None else float("inf")
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.gpu_cuda needs a CUDA GPU")
    if not (_ext.available() and _ext.require().has_cuda()):
        raise SystemExit("sparse._C was built without CUDA: rebuild with torch+CUDA and nvcc (SPARSEKERN_CUDA=1)")
    ops = torch.ops.sparsekern
    dev, dt = "cuda", torch.bfloat16
    common = {
        "bench": "gpu_cuda", "dtype": "bfloat16", "tokens": TOKENS, "threads": "", "weights": "hot",
        "machine": torch.cuda.get_device_name(), "cpu_features": "", "isa": "", "torch": torch.__version__,
        "triton": "", "cuda": torch.version.cuda, "git_rev": _git_rev(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    rows: List[Dict[str, object]] = []
    gen = torch.Generator(device=dev).manual_seed(0)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "gpu_cuda.csv")
    f = open(path, "w", newline="")
    wr = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
    wr.writeheader()
    f.flush()
    for out, inn in SHAPES:
        if time.monotonic() > deadline:
            print(f"time limit reached: stopped before {out}x{inn}", flush=True)
            break
        first = len(rows)
        W = torch.randn(out, inn, device=dev, dtype=dt, generator=gen) / inn**0.5
        x = torch.randn(TOKENS, inn, device=dev, dtype=dt, generator=gen)
        case = f"linear_{out}x{inn}"
        contenders: Dict[str, Callable[[], torch.Tensor]] = {"F.linear": lambda: F.linear(x, W)}
        meta: Dict[str, Dict[str, object]] = {
            "F.linear": {"format": "dense", "block": "", "density": 1.0, "weight_bytes": W.numel() * 2, "err": 0.0}}

        w24 = BalancedSparseWeight.from_dense(W, bank=4, keep=2)
        W24 = w24.to_dense()
        pv, pm = ops.nm24_pack(w24.values, w24.indices)  # once, when the weight is built
        contenders["nm24_linear"] = lambda: ops.nm24_linear(x, pv, pm, None, "none")
        ref24 = F.linear(x, W24)
        meta["nm24_linear"] = {"format": "balanced", "block": "bank4/keep2", "density": 0.5,
                               "weight_bytes": pv.numel() * 2 + pm.numel() * 4,
                               "err": _rel_err(contenders["nm24_linear"](), ref24)}
        try:
            Wss = torch.sparse.to_sparse_semi_structured(W24)
            contenders["to_sparse_semi_structured"] = lambda: F.linear(x, Wss)
            meta["to_sparse_semi_structured"] = {"format": "semi_structured", "block": "2:4", "density": 0.5,
                                                 "weight_bytes": W.numel() * 2 // 2 + W.numel() // 8,
                                                 "err": _rel_err(contenders["to_sparse_semi_structured"](), ref24)}
        except (RuntimeError, NotImplementedError, ValueError) as exc:
            print(f"{case}: torch.sparse.to_sparse_semi_structured unavailable: {exc}")

        for d in DENSITIES:
            wb = BlockSparseWeight.from_dense(W, block=BLOCK, sparsity=1.0 - d)
            name = f"bsr_linear_d{d}"
            contenders[name] = (lambda wb=wb: ops.bsr_linear(x, wb.values, wb.row_offsets, wb.col_indices,
                                                             wb.col_offsets, wb.row_indices, wb.block_perm, out,
                                                             None, "none"))
            meta[name] = {"format": "bsr", "block": f"{BLOCK}x{BLOCK}", "density": wb.density,
                          "weight_bytes": wb.nbytes, "err": _rel_err(contenders[name](), F.linear(x, wb.to_dense()))}

        samples = _time(contenders, repeats)
        base = statistics.median(samples["F.linear"])
        for name, s in samples.items():
            m = meta[name]
            q = statistics.quantiles(s, n=10) if len(s) >= 2 else [s[0]] * 9
            med = statistics.median(s)
            rows.append({**common, "case": case, "op": "linear", "backend": name, "format": m["format"],
                         "block": m["block"], "out_features": out, "in_features": inn, "shape": f"{out}x{inn}",
                         "sparsity": round(1 - float(m["density"]), 4), "density": round(float(m["density"]), 4),
                         "weight_bytes": m["weight_bytes"], "median_s": med, "p10_s": q[0], "p90_s": q[-1],
                         "repeats": len(s), "baseline": "F.linear", "baseline_s": base, "ratio": base / med,
                         "ideal_ratio": 1 / float(m["density"]), "_err": m["err"]})
        wr.writerows(rows[first:])
        f.flush()
        print(f"{case}: {len(rows) - first} rows written", flush=True)
        # Free this shape's tensors before the next one's (the closures in `contenders` hold them too).
        contenders.clear()
        W = x = w24 = W24 = pv = pm = None
        torch.cuda.empty_cache()
    f.close()
    _print(rows)
    print(f"wrote {path}")
    return rows


def _target(row: Dict[str, object], by_case: Dict[str, Dict[str, Dict[str, object]]]) -> str:
    if row["backend"] == "nm24_linear":
        ss = by_case[row["case"]].get("to_sparse_semi_structured")
        vs_ss = "" if ss is None else f"; {float(ss['median_s']) / float(row['median_s']):.2f}x semi_structured (>= 1)"
        return f">= 1.6x cuBLAS{vs_ss}"
    if str(row["backend"]).startswith("bsr_linear"):
        return f">= {0.8 / float(row['density']):.2f}x cuBLAS"
    return ""


def _print(rows: List[Dict[str, object]]) -> None:
    by_case: Dict[str, Dict[str, Dict[str, object]]] = {}
    for r in rows:
        by_case.setdefault(str(r["case"]), {})[str(r["backend"])] = r
    print(f"\n{'shape':<12} {'contender':<27} {'density':>7} {'median ms':>10} {'vs cuBLAS':>9} {'rel err':>9}  target")
    for r in rows:
        print(f"{r['shape']:<12} {r['backend']:<27} {float(r['density']):>7.3f} {float(r['median_s']) * 1e3:>10.3f} "
              f"{float(r['ratio']):>8.2f}x {float(r['_err']):>9.2e}  {_target(r, by_case)}")


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=".", help="folder for gpu_cuda.csv")
    p.add_argument("--repeats", type=int, default=30, help="timed samples per contender")
    p.add_argument("--max-seconds", type=float, default=None, help="start no shape after this many seconds")
    args = p.parse_args(argv)
    run(args.out, args.repeats, args.max_seconds)


if __name__ == "__main__":
    main()
