"""CUDA kernels vs cuBLAS on Llama-7B MLP shapes: bf16, T = 4096 tokens, hot weights.

    python -m benchmarks.gpu_cuda [--out DIR] [--repeats N] [--max-seconds S]

Per shape (out x in: 4096x4096, 11008x4096, 4096x11008), timed together with interleaved repeats (CUDA events,
each sample preceded by an untimed call of the same contender; medians):
- dense ``F.linear`` (cuBLAS) on the dense weight: the baseline of every ratio;
- 2:4 on sparse tensor cores (``sparsekern::nm24_linear``, weight packed once) and
  ``torch.sparse.to_sparse_semi_structured`` (cuSPARSELt / CUTLASS) on the same 2:4 weight;
- block-sparse, block 64, density 0.5 / 0.25 / 0.1 (``sparsekern::bsr_linear``), target >= 0.8 / density;
- unstructured (``bsr_linear`` with 1x1 blocks: csrc/cuda/csr.cu), density 0.1 / 0.05 / 0.01 with the kernel the
  shape picks, the warp-per-row variant at 0.1 (SPARSEKERN_CUDA_CSR=wide) and bsr.cu's SIMT fallback, the path
  before csr.cu, at 0.01 (SPARSEKERN_CUDA_CSR=off; slow).
Then, each against its own cuBLAS baseline: the unstructured input gradient (``dy @ W``) and SDDMM (``dy^T x``, the
dense weight gradient) at density 0.1, and decode (T = 1: cuBLAS's GEMV against csr.cu's warp-per-row kernel and
the SIMT fallback, 20 calls a sample).
Each contender's output is compared with dense ``F.linear`` on its own (pruned) weight, so a wrong kernel shows
up as a large error here rather than as a fast time. Writes DIR/gpu_cuda.csv (the columns of benchmarks/harness.py)
and prints a table. About 1.5 minutes on an H200 (estimated: the unstructured cases have not run on a GPU yet). The
rows of each shape are appended to the CSV as soon as that shape is measured, so a run stopped early keeps the
shapes it finished; ``--max-seconds`` starts no shape after that long.
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
from sparse import BalancedSparseWeight, BlockSparseWeight, _ext, reference, timing

COLUMNS = ["bench", "case", "op", "backend", "format", "block", "dtype", "out_features", "in_features", "shape",
           "tokens", "sparsity", "density", "threads", "weights", "weight_bytes", "median_s", "p10_s", "p90_s",
           "repeats", "baseline", "baseline_s", "ratio", "ideal_ratio", "machine", "cpu_features", "isa", "torch",
           "triton", "cuda", "git_rev", "timestamp"]
SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
TOKENS = 4096
BLOCK = 64
DENSITIES = (0.5, 0.25, 0.1)
CSR_DENSITIES = (0.1, 0.05, 0.01)  # unstructured: csr.cu's default kernel at each
CSR_WIDE_DENSITY = 0.1  # ... the warp-per-row variant at this one
CSR_SIMT_DENSITY = 0.01  # ... bsr.cu's SIMT fallback (the path before csr.cu) at this one: ~10x slower per nonzero
CSR_GRAD_DENSITY = 0.1  # input gradient and SDDMM
DECODE_CALLS = 20  # calls per timed sample at T = 1 (microseconds each)


def _time(contenders: Dict[str, Callable[[], torch.Tensor]], repeats: int, calls: int = 1) -> Dict[str, List[float]]:
    """Seconds per call of each contender, by CUDA events (sparse.timing.interleaved): one untimed call of each
    first (compile / autotune / allocate), then rounds that interleave the contenders in rotating order, each
    sample (``calls`` calls in a row) right after an untimed call of the same contender (its steady state)."""
    samples = timing.interleaved(contenders, repeats=repeats, warmup=1, device="cuda", calls=calls, rotate=True,
                                 presample=True, cuda_events=True)
    return {n: list(s.seconds) for n, s in samples.items()}


def _add_rows(rows: List[Dict[str, object]], common: Dict[str, object], case: str, op: str, tokens: int, out: int,
              inn: int, samples: Dict[str, List[float]], meta: Dict[str, Dict[str, object]], baseline: str) -> None:
    """One row per contender of a case, its ratio against the case's baseline."""
    base = statistics.median(samples[baseline])
    for name, s in samples.items():
        m = meta[name]
        q = statistics.quantiles(s, n=10) if len(s) >= 2 else [s[0]] * 9
        med = statistics.median(s)
        rows.append({**common, "case": case, "op": op, "tokens": tokens, "backend": name, "format": m["format"],
                     "block": m["block"], "out_features": out, "in_features": inn, "shape": f"{out}x{inn}",
                     "sparsity": round(1 - float(m["density"]), 4), "density": round(float(m["density"]), 4),
                     "weight_bytes": m["weight_bytes"], "median_s": med, "p10_s": q[0], "p90_s": q[-1],
                     "repeats": len(s), "baseline": baseline, "baseline_s": base, "ratio": base / med,
                     "ideal_ratio": 1 / float(m["density"]), "_err": m["err"]})


def _csr_kernel(kernel: str, fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """fn with SPARSEKERN_CUDA_CSR=kernel (read by the bsr ops at every call; csrc/cuda/README.md), restored after."""

    def call() -> torch.Tensor:
        old = os.environ.get("SPARSEKERN_CUDA_CSR")
        os.environ["SPARSEKERN_CUDA_CSR"] = kernel
        try:
            return fn()
        finally:
            if old is None:
                del os.environ["SPARSEKERN_CUDA_CSR"]
            else:
                os.environ["SPARSEKERN_CUDA_CSR"] = old

    return call


def _csr_meta(w: BlockSparseWeight, err: float) -> Dict[str, object]:
    return {"format": "csr", "block": "1x1", "density": w.density, "weight_bytes": w.nbytes, "err": err}


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

        # Unstructured: 1x1 blocks, which the bsr ops send to csr.cu.
        csr: Dict[float, BlockSparseWeight] = {}
        for d in sorted(set(CSR_DENSITIES) | {CSR_WIDE_DENSITY, CSR_SIMT_DENSITY, CSR_GRAD_DENSITY}):
            csr[d] = BlockSparseWeight.from_dense(W, block=1, sparsity=1.0 - d)

        def csr_fwd(wc: BlockSparseWeight, xx: torch.Tensor) -> Callable[[], torch.Tensor]:
            return lambda: ops.bsr_linear(xx, wc.values, wc.row_offsets, wc.col_indices, wc.col_offsets,
                                          wc.row_indices, wc.block_perm, out, None, "none")

        for d, kernel in [(d, "auto") for d in CSR_DENSITIES] + [(CSR_WIDE_DENSITY, "wide"),
                                                                   (CSR_SIMT_DENSITY, "off")]:
            name = f"csr_{'simt' if kernel == 'off' else kernel}_d{d}"
            contenders[name] = _csr_kernel(kernel, csr_fwd(csr[d], x))
            meta[name] = _csr_meta(csr[d], _rel_err(contenders[name](), F.linear(x, csr[d].to_dense())))

        samples = _time(contenders, repeats)
        _add_rows(rows, common, case, "linear", TOKENS, out, inn, samples, meta, "F.linear")

        # The unstructured backward at CSR_GRAD_DENSITY, each op against its dense cuBLAS counterpart.
        wg = csr[CSR_GRAD_DENSITY]
        Wg = wg.to_dense()
        dy = torch.randn(TOKENS, out, device=dev, dtype=dt, generator=gen)
        gi = lambda: ops.bsr_linear_grad_input(dy, wg.values, wg.col_offsets, wg.row_indices,  # noqa: E731
                                               wg.block_perm, inn)
        contenders = {"dy@W": lambda: dy @ Wg, f"csr_auto_d{CSR_GRAD_DENSITY}": gi}
        meta = {"dy@W": {"format": "dense", "block": "", "density": 1.0, "weight_bytes": W.numel() * 2, "err": 0.0},
                f"csr_auto_d{CSR_GRAD_DENSITY}": _csr_meta(wg, _rel_err(gi(), dy @ Wg))}
        _add_rows(rows, common, f"grad_input_{out}x{inn}", "grad_input", TOKENS, out, inn,
                  _time(contenders, repeats), meta, "dy@W")
        sd = lambda: ops.bsr_sddmm(dy, x, wg.values, wg.row_offsets, wg.col_indices)  # noqa: E731
        sd_ref = reference.gather(dy.t() @ x, wg)
        contenders = {"dy^T@x": lambda: dy.t() @ x}
        meta = {"dy^T@x": {"format": "dense", "block": "", "density": 1.0, "weight_bytes": W.numel() * 2,
                           "err": 0.0}}
        for kernel in ("auto", "narrow"):  # auto: the warp-per-chunk ("wide") kernel at T = 4096
            name = f"csr_{kernel}_d{CSR_GRAD_DENSITY}"
            contenders[name] = _csr_kernel(kernel, sd)
            meta[name] = _csr_meta(wg, _rel_err(contenders[name](), sd_ref))
        _add_rows(rows, common, f"sddmm_{out}x{inn}", "sddmm", TOKENS, out, inn, _time(contenders, repeats), meta,
                  "dy^T@x")

        # Decode: one token.
        x1 = x[:1].clone()
        contenders = {"F.linear": lambda: F.linear(x1, W)}
        meta = {"F.linear": {"format": "dense", "block": "", "density": 1.0, "weight_bytes": W.numel() * 2,
                             "err": 0.0}}
        for d, kernel in [(CSR_GRAD_DENSITY, "auto"), (CSR_SIMT_DENSITY, "auto"), (CSR_GRAD_DENSITY, "off")]:
            name = f"csr_{'simt' if kernel == 'off' else kernel}_d{d}"
            contenders[name] = _csr_kernel(kernel, csr_fwd(csr[d], x1))
            meta[name] = _csr_meta(csr[d], _rel_err(contenders[name](), F.linear(x1, csr[d].to_dense())))
        _add_rows(rows, common, f"decode_{out}x{inn}", "linear", 1, out, inn,
                  _time(contenders, repeats, calls=DECODE_CALLS), meta, "F.linear")

        wr.writerows(rows[first:])
        f.flush()
        print(f"{case}: {len(rows) - first} rows written", flush=True)
        # Free this shape's tensors before the next one's (the closures in `contenders` hold them too).
        contenders.clear()
        W = x = w24 = W24 = pv = pm = csr = wg = Wg = dy = x1 = sd_ref = None
        torch.cuda.empty_cache()
    f.close()
    _print(rows)
    print(f"wrote {path}")
    return rows


def _target(row: Dict[str, object], by_case: Dict[str, Dict[str, Dict[str, object]]]) -> str:
    backend = str(row["backend"])
    if backend == "nm24_linear":
        ss = by_case[row["case"]].get("to_sparse_semi_structured")
        vs_ss = "" if ss is None else f"; {float(ss['median_s']) / float(row['median_s']):.2f}x semi_structured (>= 1)"
        return f">= 1.6x cuBLAS{vs_ss}"
    if backend.startswith("bsr_linear"):
        return f">= {0.8 / float(row['density']):.2f}x cuBLAS"
    if backend.startswith("csr_") and not backend.startswith("csr_simt"):
        # No target: on CUDA cores unstructured sparsity beats cuBLAS only at very high sparsity (csr.cu's notes).
        simt = by_case[row["case"]].get("csr_simt_d" + backend.rsplit("_d", 1)[1])
        return "" if simt is None else f"{float(simt['median_s']) / float(row['median_s']):.1f}x the SIMT fallback"
    return ""


def _print(rows: List[Dict[str, object]]) -> None:
    by_case: Dict[str, Dict[str, Dict[str, object]]] = {}
    for r in rows:
        by_case.setdefault(str(r["case"]), {})[str(r["backend"])] = r
    print(f"\n{'case':<22} {'contender':<27} {'density':>7} {'median ms':>10} {'vs base':>8} {'rel err':>9}  target")
    for r in rows:
        print(f"{r['case']:<22} {r['backend']:<27} {float(r['density']):>7.3f} {float(r['median_s']) * 1e3:>10.3f} "
              f"{float(r['ratio']):>7.2f}x {float(r['_err']):>9.2e}  {_target(r, by_case)}")


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=".", help="folder for gpu_cuda.csv")
    p.add_argument("--repeats", type=int, default=30, help="timed samples per contender")
    p.add_argument("--max-seconds", type=float, default=None, help="start no shape after this many seconds")
    args = p.parse_args(argv)
    run(args.out, args.repeats, args.max_seconds)


if __name__ == "__main__":
    main()
