"""CPU microbenchmark of the sparsekern ops against every dense and sparse baseline, on Transformer shapes.

    python -m benchmarks.cpu_ops --preset quick        # the CPU kernel target grid on BERT-base shapes (minutes)
    python -m benchmarks.cpu_ops --preset full         # every shape preset, op, format, dtype, thread count
    python -m benchmarks.cpu_ops --preset bsr          # block 32 only: forward, thread scaling, gradients, cold T = 1
    python -m benchmarks.cpu_ops --preset balanced     # balanced bank 32, keep 16/8/4 only: forward
    python -m benchmarks.cpu_ops --preset decode       # batch-1 decode only: T = 1, cold weights
    python -m benchmarks.cpu_ops --preset act          # an activation fused into the kernel vs kernel + torch's

Writes ``<out>/cpu_ops.csv`` (the harness schema), ``<out>/summary.md`` (one table per target: PASS/MISS) and
PNG plots. A case = (op, shape, tokens, dtype, threads, hot|cold); all contenders of a case are timed together
(see harness.measure) and compared with the best dense path of the same dtype measured in that case.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from . import baselines as B
from .harness import Contender, cold_copies, make_rows, measure, result_error, threads, write_csv

# (out_features, in_features) of the Linear layers of each model.
SHAPES: Dict[str, List[Tuple[int, int]]] = {
    "bert-base": [(768, 768), (3072, 768), (768, 3072)],
    "minilm": [(384, 384), (1536, 384), (384, 1536)],
    "gpt2-small": [(2304, 768), (768, 768), (3072, 768), (768, 3072)],
    "llama7b-mlp": [(11008, 4096), (4096, 11008)],
    "tiny": [(96, 64)],
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
Spec = Tuple  # ("bsr", block, sparsity) | ("balanced", bank, keep)


def _bsr(block: Union[int, Tuple[int, int]], sparsities: Sequence[float]) -> List[Spec]:
    return [("bsr", block, s) for s in sparsities]


def _bal(bank: int, keeps: Sequence[int]) -> List[Spec]:
    return [("balanced", bank, k) for k in keeps]


@dataclass
class Preset:
    """What to run. ``fwd_specs[dtype]``: sparse weights timed in the forward cases of that dtype."""

    shapes: List[Tuple[int, int]]
    tokens: List[int]
    dtypes: List[str]
    threads: List[int]
    fwd_specs: Dict[str, List[Spec]]
    api_specs: List[Spec]  # also timed through sparse.linear (the Python entry point)
    torch_sparse_specs: List[Spec]  # compared with torch.sparse CSR/BSR holding the same nonzeros (fp32)
    torch_sparse_user_form: bool
    scipy: bool
    scaling_specs: List[Spec]  # also timed with 1 thread inside the 2-thread case (parallel efficiency)
    cold_tokens: List[int]
    cold_dtypes: List[str]
    cold_specs: List[Spec]
    grad_tokens: List[int]
    grad_dtypes: List[str]
    grad_specs: List[Spec]
    rounds: int
    min_sample_s: float
    cold_cache_factor: float = 2.0  # cold copies total this many times the last-level cache
    # Forward with an activation (op "linear+<act>"): the kernel with the activation fused into its output stage,
    # the kernel followed by torch's activation, and the kernel alone, against dense F.linear / oneDNN + torch's.
    activations: List[str] = field(default_factory=list)
    act_tokens: List[int] = field(default_factory=list)
    act_dtypes: List[str] = field(default_factory=list)
    act_specs: List[Spec] = field(default_factory=list)
    # INT8 (sparse.quant): block-sparse specs also timed as int8 in the float32 forward cases (hot and cold), with
    # PyTorch's dense dynamic INT8 as a contender; report.py compares them with our float32 kernel on the same spec.
    int8_specs: List[Spec] = field(default_factory=list)


_TARGET_SPARSITIES = [0.0, 0.5, 0.75, 0.9, 0.95]

PRESETS: Dict[str, Preset] = {
    "quick": Preset(
        shapes=SHAPES["bert-base"],
        tokens=[16, 128, 512],
        dtypes=["float32", "bfloat16"],
        threads=[2],
        fwd_specs={
            "float32": _bsr(32, _TARGET_SPARSITIES) + _bsr(16, [0.5, 0.75, 0.9]) + _bal(32, [16, 8, 4]),
            "bfloat16": _bsr(32, _TARGET_SPARSITIES) + _bal(32, [8]),
        },
        api_specs=_bsr(32, [0.9]),
        torch_sparse_specs=_bsr(32, [0.5, 0.75, 0.9, 0.95]),
        torch_sparse_user_form=False,
        scipy=False,
        scaling_specs=_bsr(32, [0.5, 0.9]) + _bal(32, [8]),
        cold_tokens=[1],
        cold_dtypes=["float32"],
        cold_specs=_bsr(32, [0.5, 0.75, 0.9, 0.95]) + _bal(32, [16, 8, 4]),
        grad_tokens=[512],
        grad_dtypes=["float32"],
        grad_specs=_bsr(32, [0.5, 0.75, 0.9, 0.95]) + _bal(32, [8]),
        rounds=5,
        min_sample_s=0.005,
    ),
    "full": Preset(
        shapes=sorted({s for k, v in SHAPES.items() if k != "tiny" for s in v}),
        tokens=[1, 16, 128, 512],
        dtypes=["float32", "bfloat16"],
        threads=[1, 2],
        fwd_specs={
            dt: _bsr(32, _TARGET_SPARSITIES) + _bsr(16, _TARGET_SPARSITIES[1:]) + _bsr(64, _TARGET_SPARSITIES[1:])
            + _bal(32, [16, 8, 4]) + _bal(4, [2])
            for dt in ("float32", "bfloat16")
        },
        api_specs=_bsr(32, _TARGET_SPARSITIES) + _bal(32, [16, 8, 4]),
        torch_sparse_specs=_bsr(32, [0.5, 0.75, 0.9, 0.95]) + _bsr(16, [0.5, 0.75, 0.9, 0.95]),
        torch_sparse_user_form=True,
        scipy=True,
        scaling_specs=_bsr(32, [0.5, 0.75, 0.9]) + _bsr(16, [0.9]) + _bal(32, [16, 8, 4]),
        cold_tokens=[1],
        cold_dtypes=["float32", "bfloat16"],
        cold_specs=_bsr(32, [0.5, 0.75, 0.9, 0.95]) + _bsr(16, [0.75, 0.9]) + _bal(32, [16, 8, 4]),
        grad_tokens=[128, 512],
        grad_dtypes=["float32", "bfloat16"],
        grad_specs=_bsr(32, [0.5, 0.75, 0.9, 0.95]) + _bsr(16, [0.75, 0.9]) + _bal(32, [16, 8, 4]),
        rounds=9,
        min_sample_s=0.01,
    ),
    # A seconds-long run on a toy shape, for the smoke test of the harness (numbers mean nothing).
    "tiny": Preset(
        shapes=SHAPES["tiny"],
        tokens=[8],
        dtypes=["float32", "bfloat16"],
        threads=[2],
        fwd_specs={"float32": _bsr(32, [0.0, 0.5]) + _bsr(16, [0.75]) + _bal(32, [8]), "bfloat16": _bsr(32, [0.5])},
        api_specs=_bsr(32, [0.5]),
        torch_sparse_specs=_bsr(32, [0.5]),
        torch_sparse_user_form=True,
        scipy=True,
        scaling_specs=_bsr(32, [0.5]),
        cold_tokens=[1],
        cold_dtypes=["float32"],
        cold_specs=_bsr(32, [0.5]),
        grad_tokens=[8],
        grad_dtypes=["float32"],
        grad_specs=_bsr(32, [0.5]) + _bal(32, [8]),
        rounds=3,
        min_sample_s=0.0005,
        cold_cache_factor=0.01,
    ),
}


def _only(**fields) -> Preset:
    """A focused preset: BERT-base shapes, 2 threads, and only the cases ``fields`` ask for."""
    nothing = dict(
        shapes=SHAPES["bert-base"], tokens=[], dtypes=[], threads=[2], fwd_specs={}, api_specs=[],
        torch_sparse_specs=[], torch_sparse_user_form=False, scipy=False, scaling_specs=[], cold_tokens=[],
        cold_dtypes=[], cold_specs=[], grad_tokens=[], grad_dtypes=[], grad_specs=[], rounds=7, min_sample_s=0.005,
    )
    return Preset(**{**nothing, **fields})


_BSR32 = _bsr(32, _TARGET_SPARSITIES)  # density 1, 0.5, 0.25, 0.1, 0.05
_BAL32 = _bal(32, [16, 8, 4])
_CSR = _bsr(1, [0.5, 0.75, 0.9, 0.95])  # unstructured: density 0.5, 0.25, 0.1, 0.05
# column vectors (V output rows x 1 input column) and row vectors (1 x V): density 0.5, 0.25, 0.1
_VEC = [s for b in [(4, 1), (8, 1), (16, 1), (32, 1), (1, 4), (1, 8)] for s in _bsr(b, [0.5, 0.75, 0.9])]

# Parts of the quick grid on their own, for iterating on one kernel (``--dtypes float32,bfloat16`` adds bf16 to the
# hot forward of "bsr" and "balanced"); "act" times what the quick grid does not: fusing the activation.
PRESETS.update({
    # block 32: forward (with the 1-thread scaling contender), input and weight gradients, batch-1 cold weights
    "bsr": _only(tokens=[16, 128, 512], dtypes=["float32"], fwd_specs={"float32": _BSR32, "bfloat16": _BSR32},
                 scaling_specs=_BSR32, grad_tokens=[16, 128, 512], grad_dtypes=["float32"], grad_specs=_BSR32[1:],
                 cold_tokens=[1], cold_dtypes=["float32"], cold_specs=_BSR32[1:]),
    # balanced bank 32, keep 16 / 8 / 4: forward against the best dense path
    "balanced": _only(tokens=[16, 128, 512], dtypes=["float32"], fwd_specs={"float32": _BAL32, "bfloat16": _BAL32}),
    # batch-1 decode: T = 1, every contender streaming its weight from memory (copies 2x the last-level cache)
    "decode": _only(cold_tokens=[1], cold_dtypes=["float32"], cold_specs=_BSR32[1:] + _BAL32),
    # unstructured (1x1 blocks, CSR): forward against the best dense path and torch.sparse CSR, gradients, T = 1 cold
    "unstructured": _only(tokens=[16, 128, 512], dtypes=["float32"], fwd_specs={"float32": _CSR, "bfloat16": _CSR},
                          torch_sparse_specs=_CSR, grad_tokens=[128, 512], grad_dtypes=["float32"], grad_specs=_CSR,
                          cold_tokens=[1], cold_dtypes=["float32"], cold_specs=_CSR),
    # column vectors 4x1 / 8x1 / 16x1 / 32x1 and row vectors 1x4 / 1x8: forward, gradients at T = 512
    "vectors": _only(tokens=[128, 512], dtypes=["float32"], fwd_specs={"float32": _VEC, "bfloat16": _VEC},
                     grad_tokens=[512], grad_dtypes=["float32"], grad_specs=_VEC),
    # INT8 block 32 against our float32 block 32 and PyTorch's dense dynamic INT8: forward at T = 16 / 128 / 512, 1
    # and 2 threads, and batch-1 decode with cold weights
    "int8": _only(tokens=[16, 128, 512], dtypes=["float32"], threads=[1, 2], fwd_specs={"float32": _BSR32},
                  int8_specs=_BSR32, cold_tokens=[1], cold_dtypes=["float32"], cold_specs=_BSR32[1:]),
    # GELU fused into the output stage vs the kernel then torch's GELU, on BERT-base's intermediate layer at
    # 1024 tokens, densities 0.1 and 0.5, 1 and 2 threads
    "act": _only(shapes=[(3072, 768)], threads=[1, 2], activations=["gelu"], act_tokens=[1024],
                 act_dtypes=["float32", "bfloat16"], act_specs=_bsr(32, [0.9, 0.5]) + _bal(32, [3, 16]), rounds=11),
})


@dataclass
class Case:
    op: str  # linear | grad_input | sddmm
    shape: Tuple[int, int]
    tokens: int
    dtype: str
    threads: int
    weights: str  # hot | cold

    @property
    def id(self) -> str:
        return f"{self.op}|{self.shape[0]}x{self.shape[1]}|T{self.tokens}|{self.dtype}|{self.threads}t|{self.weights}"


def plan(p: Preset) -> List[Case]:
    cases = []
    for shape in p.shapes:
        for n in p.threads:
            for dt in p.dtypes:
                for t in p.tokens:
                    cases.append(Case("linear", shape, t, dt, n, "hot"))
            for dt in p.cold_dtypes:
                for t in p.cold_tokens:
                    cases.append(Case("linear", shape, t, dt, n, "cold"))
            for dt in p.grad_dtypes:
                for t in p.grad_tokens:
                    cases.append(Case("grad_input", shape, t, dt, n, "hot"))
                    cases.append(Case("sddmm", shape, t, dt, n, "hot"))
            for act in p.activations:
                for dt in p.act_dtypes:
                    for t in p.act_tokens:
                        cases.append(Case(f"linear+{act}", shape, t, dt, n, "hot"))
    return cases


def _usable(spec: Spec, shape: Tuple[int, int]) -> bool:
    """Specs whose block/bank does not fit the shape are left out of that shape's cases."""
    if spec[0] == "bsr":
        bo, bi = (spec[1], spec[1]) if isinstance(spec[1], int) else spec[1]
        return bo <= shape[0] and bi <= shape[1]
    bank, keep = spec[1], spec[2]
    last = shape[1] - (-(-shape[1] // bank) - 1) * bank
    return bank <= shape[1] and keep <= last


# Largest error accepted, relative to the largest |output| of the float64 reference: a sanity check that every
# contender computes the product it is timed for (the tests check accuracy properly).
TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2}


def _try(c: Contender, skipped: List[str], case: Case) -> bool:
    """Runs a contender once and checks its result; one that raises or is wrong is left out of the case and
    listed in the summary (a wrong kernel must not show up as a fast one)."""
    try:
        err = result_error(c, c.fn())
    except (RuntimeError, NotImplementedError, ValueError, TypeError) as exc:
        skipped.append(f"{case.id} {c.name}: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
        return False
    if err is not None and not err <= TOLERANCE[case.dtype]:
        skipped.append(f"{case.id} {c.name}: WRONG RESULT, max error {err:.2e} of max |reference| "
                       f"(tolerance {TOLERANCE[case.dtype]:.0e})")
        return False
    return True


def contenders_for(case: Case, p: Preset, skipped: List[str]) -> List[Contender]:
    """Builds every contender of ``case`` from one seeded dense weight and one input (shared by all of them)."""
    gen = torch.Generator().manual_seed(hash((case.shape, case.tokens)) & 0xFFFF)
    out_f, in_f = case.shape
    dtype = DTYPES[case.dtype]
    W = torch.randn(out_f, in_f, generator=gen) * in_f ** -0.5
    X = torch.randn(case.tokens, in_f, generator=gen).to(dtype)
    dY = torch.randn(case.tokens, out_f, generator=gen).to(dtype)
    cold = case.weights == "cold"
    if case.op.startswith("linear+"):
        return _act_contenders(case, p, W, X, torch.randn(out_f, generator=gen).to(dtype), skipped)
    specs = {
        "linear": p.cold_specs if cold else p.fwd_specs.get(case.dtype, []),
        "grad_input": p.grad_specs,
        "sddmm": p.grad_specs,
    }[case.op]
    specs = [s for s in specs if _usable(s, case.shape)]

    int8 = [s for s in p.int8_specs if _usable(s, case.shape) and case.op == "linear" and case.dtype == "float32"]
    if case.op == "linear":
        cs = B.dense_linear(W, X, cold_copies(out_f * in_f * X.element_size(), p.cold_cache_factor) if cold else 1)
        if int8:
            cs += B.dense_int8_linear(W, X, cold_copies(out_f * in_f, p.cold_cache_factor) if cold else 1)
    elif case.op == "grad_input":
        cs = B.dense_grad_input(W, dY)
    else:
        cs = B.dense_sddmm(W, dY, X)

    seen = set()
    for spec in specs:
        w = B.build_weight(W, spec, dtype)
        key = (spec[0], spec[1], round(w.density, 6))
        if key in seen:  # on small shapes two nominal sparsities can round to the same block count
            continue
        seen.add(key)
        copies = cold_copies(w.nbytes, p.cold_cache_factor) if cold else 1
        if case.op == "linear":
            ours = B.ours_linear(w, X, copies, via_api=spec in p.api_specs)
            if spec in int8:
                ours += B.ours_int8_linear(w, X, cold_copies(w.nbytes // 4, p.cold_cache_factor) if cold else 1)
            if spec in p.scaling_specs and case.threads > 1 and not cold and dtype == torch.float32:
                ours.append(B.with_threads(ours[0], 1))
            cs += ours
            if spec in p.torch_sparse_specs and dtype == torch.float32:
                Wd = w.to_dense()
                tag = f"{spec[1]}x{spec[1]}:{w.density:.4f}"
                extra = B.torch_sparse_linear(Wd, X, None, tag, copies, user_form=p.torch_sparse_user_form)
                if spec[1] > 1:  # 1x1 blocks: the CSR contender above is torch's form of them
                    extra += B.torch_sparse_linear(Wd, X, spec[1], tag, copies, user_form=p.torch_sparse_user_form)
                if p.scipy:
                    extra += B.scipy_linear(Wd, X, tag, copies)
                for c in extra:
                    c.info["density"] = w.density
                cs += extra
        elif case.op == "grad_input":
            cs += B.ours_grad_input(w, dY)
        else:
            cs += B.ours_sddmm(w, dY, X)
    return [c for c in cs if _try(c, skipped, case)]


def _act_contenders(case: Case, p: Preset, W: torch.Tensor, X: torch.Tensor, bias: torch.Tensor,
                    skipped: List[str]) -> List[Contender]:
    """A ``linear+<act>`` case: per spec, our kernel with the activation fused, the kernel then torch's
    activation, and the kernel alone; the dense references are F.linear and oneDNN, each then torch's."""
    act = case.op.split("+", 1)[1]
    dtype = DTYPES[case.dtype]
    cs = B.dense_linear_act(W, X, bias, act)
    for spec in p.act_specs:
        if _usable(spec, case.shape):
            cs += B.ours_linear_act(B.build_weight(W, spec, dtype), X, bias, act)
    return [c for c in cs if _try(c, skipped, case)]


def run_case(case: Case, p: Preset, skipped: List[str]) -> List[dict]:
    with threads(case.threads):
        cs = contenders_for(case, p, skipped)
        timings = measure(cs, rounds=p.rounds, min_sample_s=p.min_sample_s)
    common = {
        "op": case.op, "dtype": case.dtype, "out_features": case.shape[0], "in_features": case.shape[1],
        "shape": f"{case.shape[0]}x{case.shape[1]}", "tokens": case.tokens, "threads": case.threads,
        "weights": case.weights,
    }
    return make_rows("cpu_ops", case.id, common, cs, timings, "best_dense")


def run(p: Preset, out_dir: str, progress: bool = True) -> Tuple[List[dict], List[str]]:
    """Runs every case of ``p``; writes ``cpu_ops.csv`` after each case (a long run keeps what it measured)."""
    from tqdm.auto import tqdm

    cases = plan(p)
    rows: List[dict] = []
    skipped: List[str] = []
    path = os.path.join(out_dir, "cpu_ops.csv")
    bar = tqdm(cases, desc="cpu_ops", unit="case", disable=not progress, file=sys.stderr)
    for case in bar:
        bar.set_postfix_str(case.id, refresh=False)
        rows += run_case(case, p, skipped)
        write_csv(path, rows)
    return rows, skipped


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="benchmarks.cpu_ops", description=__doc__.split("\n\n")[0])
    add_arguments(ap)
    return ap.parse_args(argv)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    ap.add_argument("--out", default="bench-out", help="output folder (default: bench-out/)")
    ap.add_argument("--shapes", help=f"comma list of shape presets ({', '.join(SHAPES)}) or OUTxIN")
    ap.add_argument(
        "--tokens", help="comma list of token counts for the hot forward cases (with or without activation)"
    )
    ap.add_argument("--dtypes", help="comma list: float32,bfloat16")
    ap.add_argument("--threads", help="comma list of thread counts")
    ap.add_argument("--rounds", type=int, help="timed samples per contender (interleaved)")
    ap.add_argument("--no-progress", action="store_true")


def parse_shapes(text: str) -> List[Tuple[int, int]]:
    shapes: List[Tuple[int, int]] = []
    for item in text.split(","):
        item = item.strip()
        if item in SHAPES:
            shapes += SHAPES[item]
        elif "x" in item:
            o, i = item.split("x")
            shapes.append((int(o), int(i)))
        else:
            raise ValueError(f"--shapes: {item!r} is neither a preset ({', '.join(SHAPES)}) nor OUTxIN")
    return shapes


def preset_from_args(args: argparse.Namespace) -> Preset:
    p = PRESETS[args.preset]
    changes = {}
    if args.shapes:
        changes["shapes"] = parse_shapes(args.shapes)
    if args.tokens:
        changes["tokens"] = [int(t) for t in args.tokens.split(",")]
        if p.act_tokens:
            changes["act_tokens"] = changes["tokens"]
    if args.dtypes:
        dts = [d.strip() for d in args.dtypes.split(",")]
        bad = [d for d in dts if d not in DTYPES]
        if bad:
            raise ValueError(f"--dtypes: {bad} not in {list(DTYPES)}")
        changes["dtypes"] = dts
        changes["cold_dtypes"] = [d for d in p.cold_dtypes if d in dts]
        changes["grad_dtypes"] = [d for d in p.grad_dtypes if d in dts]
        changes["act_dtypes"] = [d for d in p.act_dtypes if d in dts]
    if args.threads:
        changes["threads"] = [int(t) for t in args.threads.split(",")]
    if args.rounds:
        changes["rounds"] = args.rounds
    return replace(p, **changes)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from sparse.runtime import tune_malloc_from_env

    from .report import write_report

    tune_malloc_from_env()  # before anything allocates: every contender runs with the same allocator settings
    args = parse_args(argv)
    p = preset_from_args(args)
    os.makedirs(args.out, exist_ok=True)
    rows, skipped = run(p, args.out, progress=not args.no_progress)
    paths = write_report(rows, args.out, skipped=skipped)
    print("\n".join(f"wrote {x}" for x in [os.path.join(args.out, "cpu_ops.csv")] + paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
