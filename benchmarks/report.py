"""The markdown summary: one table per target of the CPU kernels (:func:`kernel_target_tables`) and of the
end-to-end model (:func:`e2e_target_tables`), each line a measured ratio against its target with PASS/MISS.
Everything is computed from harness rows, and every ratio compares two rows of the same case (timed together),
never two runs.

    python -m benchmarks.report bench-out/cpu_ops.csv [bench-out/e2e_bert.csv] --out bench-out
    python -m benchmarks.report bench-out/e2e_bert.csv --compare old-bench-out   # + compare.md: vs an earlier run

The comparison with an earlier run (:func:`compare_runs`) is the one place two runs meet: it matches rows by
case and contender and flags those whose ratio to their own run's baseline dropped by more than the noise
margin (``MARGIN``), so a different load on the machine, which moves both times, does not count.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from .harness import read_csv

Row = Dict[str, object]

BERT_SHAPES = {"768x768", "3072x768", "768x3072"}


def by_case(rows: Iterable[Row]) -> Dict[str, List[Row]]:
    cases: Dict[str, List[Row]] = defaultdict(list)
    for r in rows:
        cases[str(r["case"])].append(r)
    return cases


def nominal(d: float, choices: Sequence[float], rel: float = 0.06) -> Optional[float]:
    """The nominal density ``d`` was built for (block counts round it), or None if it is none of ``choices``."""
    for c in choices:
        if abs(d - c) <= rel * c:
            return c
    return None


def _fmt_ratio(x: float) -> str:
    return f"{x:.2f}x"


class Table:
    def __init__(self, title: str, note: str = "") -> None:
        self.title, self.note = title, note
        self.lines: List[Tuple[str, ...]] = []
        self.passed = self.total = 0

    def add(self, case: str, what: str, target: float, measured: float, extra: str = "") -> None:
        ok = measured >= target
        self.passed += ok
        self.total += 1
        self.lines.append((case, what, _fmt_ratio(target), _fmt_ratio(measured), extra, "PASS" if ok else "**MISS**"))

    def markdown(self) -> str:
        out = [f"### {self.title}", ""]
        if self.note:
            out += [self.note, ""]
        if not self.lines:
            return "\n".join(out + ["(no rows for this target in this run)", ""])
        out += [f"{self.passed}/{self.total} PASS", ""]
        out += ["| case | contender | target | measured | detail | status |", "|---|---|---|---|---|---|"]
        out += ["| " + " | ".join(line) + " |" for line in self.lines]
        return "\n".join(out + [""])


NOISY = 2.0  # p90/p10 of a contender's samples above this: the machine was busy during the measurement


def noise(*rows: Row) -> str:
    """' (noisy: p90/p10 = x)' when any of ``rows`` has samples spread more than NOISY, else ''."""
    spread = max(float(r["p90_s"]) / max(float(r["p10_s"]), 1e-12) for r in rows)
    return f" (noisy: p90/p10 {spread:.1f})" if spread > NOISY else ""


def _baseline_row(r: Row, rows: List[Row]) -> Row:
    label = str(r["baseline"])
    name = label[len("best_dense("):-1] if label.startswith("best_dense(") else label
    return next((x for x in rows if x["backend"] == name), r)


def _case_label(r: Row) -> str:
    return f"{r['shape']} T={r['tokens']} {r['dtype']} {r['threads']}t {r['weights']}"


def _ours(rows: List[Row], backend: str = "sparsekern") -> List[Row]:
    return [r for r in rows if r["backend"] == backend]


def _fwd_ratio_table(
    cases: Dict[str, List[Row]],
    title: str,
    dtype: str,
    fmt: str,
    block: str,
    target: Callable[[float], Optional[float]],
    densities: Sequence[float],
    min_tokens: int = 16,
) -> Table:
    t = Table(
        title,
        "ratio = best dense (F.linear or pre-packed oneDNN, same dtype, same case) / ours; 2 threads, hot weights",
    )
    for rows in cases.values():
        for r in _ours(rows):
            if (r["op"], r["dtype"], r["format"], r["block"], r["weights"]) != ("linear", dtype, fmt, block, "hot"):
                continue
            if r["threads"] != 2 or r["tokens"] < min_tokens or r["shape"] not in BERT_SHAPES:
                continue
            d = nominal(float(r["density"]), densities)
            if d is None or target(d) is None:
                continue
            t.add(_case_label(r), f"{fmt} {block} d={float(r['density']):.3f}", target(d), float(r["ratio"]),
                  str(r["baseline"]) + noise(r, _baseline_row(r, rows)))
    return t


def kernel_target_tables(rows: List[Row]) -> List[Table]:
    """The CPU kernel targets, from ``cpu_ops`` rows: forward ratios per format and dtype, batch-1 decode with cold
    weights, gradients, torch.sparse, thread scaling; and, for runs with ``linear+<act>`` cases (preset ``act``),
    the gain of fusing the activation."""
    cases = by_case(r for r in rows if r["bench"] == "cpu_ops")
    tables = []
    tables.append(_fwd_ratio_table(
        cases, "Block 32x32 fp32 forward: >= 0.9/d at d=0.5/0.25/0.1, >= 0.75/d at d=0.05, >= 0.9 at d=1",
        "float32", "bsr", "32x32",
        lambda d: 0.9 if d == 1.0 else (0.75 / d if d == 0.05 else 0.9 / d), [1.0, 0.5, 0.25, 0.1, 0.05],
    ))
    tables.append(_fwd_ratio_table(
        cases, "Block 16x16 fp32 forward: >= 0.75/d at d=0.5/0.25/0.1", "float32", "bsr", "16x16",
        lambda d: 0.75 / d, [0.5, 0.25, 0.1],
    ))
    bal = Table("Balanced bank 32, keep 16/8/4, fp32 forward: >= 1.5x / 3x / 6x",
                "ratio = best dense fp32 / ours; 2 threads, hot weights")
    for rows in cases.values():
        for r in _ours(rows):
            if (r["op"], r["dtype"], r["format"], r["weights"], r["threads"]) != (
                "linear",
                "float32",
                "balanced",
                "hot",
                2,
            ):
                continue
            target = {"bank32/keep16": 1.5, "bank32/keep8": 3.0, "bank32/keep4": 6.0}.get(str(r["block"]))
            if target is None or r["tokens"] < 16 or r["shape"] not in BERT_SHAPES:
                continue
            bal.add(_case_label(r), f"balanced {r['block']}", target, float(r["ratio"]),
                    str(r["baseline"]) + noise(r, _baseline_row(r, rows)))
    tables.append(bal)
    tables.append(_fwd_ratio_table(
        cases, "bf16 block 32x32 forward: >= 0.8/d against the best dense bf16", "bfloat16", "bsr", "32x32",
        lambda d: 0.8 / d, [1.0, 0.5, 0.25, 0.1, 0.05],
    ))

    cold = Table("Batch-1 decode, cold weights: >= 0.8 x (dense bytes / sparse bytes) against the best dense",
                 "weights cycled through copies totalling 2x the last-level cache (at most 1/32 of RAM); bytes "
                 "include every index array")
    for rows in cases.values():
        dense = [r for r in rows if r["format"] == "dense"]
        for r in _ours(rows):
            if r["op"] != "linear" or r["weights"] != "cold" or not dense:
                continue
            byte_ratio = float(dense[0]["weight_bytes"]) / float(r["weight_bytes"])
            cold.add(_case_label(r), f"{r['format']} {r['block']} d={float(r['density']):.3f}", 0.8 * byte_ratio,
                     float(r["ratio"]), f"bytes ratio {byte_ratio:.2f}" + noise(r, _baseline_row(r, rows)))
    tables.append(cold)

    grads = Table("Input and weight gradient, block 32x32, T=512: >= 0.75/d against dense dY@W and dY^T@X",
                  "ratio = best dense equivalent (torch.mm / pre-packed oneDNN) / ours")
    for rows in cases.values():
        for r in _ours(rows):
            if r["op"] not in ("grad_input", "sddmm") or r["block"] != "32x32" or r["tokens"] != 512:
                continue
            d = float(r["density"])
            grads.add(_case_label(r), f"{r['op']} d={d:.3f}", 0.75 / d, float(r["ratio"]),
                      str(r["baseline"]) + noise(r, _baseline_row(r, rows)))
    tables.append(grads)

    ts = Table("Against torch.sparse (best of CSR and BSR, fast call form, same nonzeros), fp32: >= 5x",
               "ratio = min(torch.sparse CSR, BSR) time / ours, same case")
    for rows in cases.values():
        for r in _ours(rows):
            if r["op"] != "linear" or r["dtype"] != "float32" or r["format"] != "bsr":
                continue
            rivals = [x for x in rows if x["backend"] == "torch.sparse" and x["density"] == r["density"]
                      and x["block"] in ("", r["block"]) and x["threads"] == r["threads"]]
            if not rivals:
                continue
            best = min(rivals, key=lambda x: float(x["median_s"]))
            ts.add(_case_label(r), f"bsr {r['block']} d={float(r['density']):.3f}", 5.0,
                   float(best["median_s"]) / float(r["median_s"]), f"vs {best['format']}" + noise(r, best))
    tables.append(ts)

    sc = Table("Thread scaling 1 -> 2 threads at T >= 16: parallel efficiency >= 90%",
               "efficiency = t(1 thread) / (2 x t(2 threads)), both timed in the same case; shown as a fraction")
    for rows in cases.values():
        for one in _ours(rows):
            if one["threads"] != 1 or one["tokens"] < 16:
                continue
            two = [r for r in _ours(rows) if r["threads"] == 2 and r["format"] == one["format"]
                   and r["block"] == one["block"] and r["density"] == one["density"]]
            if not two:
                continue
            eff = float(one["median_s"]) / (2.0 * float(two[0]["median_s"]))
            sc.add(_case_label(two[0]), f"{one['format']} {one['block']} d={float(one['density']):.3f}", 0.9, eff,
                   noise(one, two[0]).strip())
    tables.append(sc)
    if any(str(r["op"]).startswith("linear+") for rs in cases.values() for r in rs):
        tables.append(_fused_activation_table(cases))
    if any(r["backend"] == "sparsekern-int8" for rs in cases.values() for r in rs):
        tables += _int8_tables(cases)
    return tables


def _int8_tables(cases: Dict[str, List[Row]]) -> List[Table]:
    """INT8 (preset ``int8``): against our float32 kernel on the same weight (hot, d = 0.1, T >= 128; cold, T = 1)
    and, at d = 1, against PyTorch's dense dynamic INT8."""
    vnni = Table("INT8 block 32, d=0.1, T >= 128: >= 2.5x our fp32 block-32 kernel with VNNI, >= 1.6x on AVX2",
                 "ratio = our fp32 kernel's time / our int8 kernel's time, same case and weight")
    dense = Table("INT8 block 32 at d=1: within 15% of the best dense INT8 GEMM (ratio >= 0.87)",
                  "ratio = PyTorch dynamic INT8 (quantize_dynamic, x86 engine) time / ours, same case")
    cold = Table("INT8 T=1, cold weights: >= 3x faster than the fp32 sparse layer",
                 "ratio = our fp32 kernel's time / our int8 kernel's time; weights cycled through cold copies")
    for rows in cases.values():
        for q in _ours(rows, "sparsekern-int8"):
            f32 = [r for r in _ours(rows) if (r["format"], r["block"], r["density"]) == ("bsr", q["block"],
                                                                                          q["density"])]
            d = nominal(float(q["density"]), [1.0, 0.5, 0.25, 0.1, 0.05])
            what = f"int8 {q['block']} d={float(q['density']):.3f}"
            if f32 and q["weights"] == "cold" and int(q["tokens"]) == 1:
                cold.add(_case_label(q), what, 3.0, float(f32[0]["median_s"]) / float(q["median_s"]),
                         noise(q, f32[0]).strip())
            if f32 and q["weights"] == "hot" and d == 0.1 and int(q["tokens"]) >= 128:
                has_vnni = "avx512vnni" in str(q["cpu_features"]).split(",") and q["isa"] == "avx512"
                vnni.add(_case_label(q), what + (" (VNNI)" if has_vnni else " (AVX2)"), 2.5 if has_vnni else 1.6,
                         float(f32[0]["median_s"]) / float(q["median_s"]), noise(q, f32[0]).strip())
            rivals = [r for r in rows if r["backend"] == "torch.ao.dynamic_int8"]
            if rivals and d == 1.0 and q["weights"] == "hot":
                dense.add(_case_label(q), what, 1 / 1.15, float(rivals[0]["median_s"]) / float(q["median_s"]),
                          noise(q, rivals[0]).strip())
    return [vnni, dense, cold]


def _fused_activation_table(cases: Dict[str, List[Row]]) -> Table:
    t = Table("Activation fused into the kernel's output stage: unfused pair / fused >= 1",
              "ratio = time of the kernel followed by torch's activation / time of the kernel with it fused, same case")
    for rows in cases.values():
        for fused in _ours(rows):
            if not str(fused["op"]).startswith("linear+"):
                continue
            pair = [r for r in _ours(rows, "sparsekern+torch") if (r["format"], r["block"], r["density"])
                    == (fused["format"], fused["block"], fused["density"])]
            if not pair:
                continue
            act = str(fused["op"]).split("+", 1)[1]
            t.add(_case_label(fused), f"{fused['format']} {fused['block']} d={float(fused['density']):.3f} {act}", 1.0,
                  float(pair[0]["median_s"]) / float(fused["median_s"]), noise(fused, pair[0]).strip())
    return t


def _e2e_int8_table(cases: Dict[str, List[Row]]) -> Table:
    t = Table("BERT-base 90% block 32, int8: >= 2x faster than ONNX Runtime's dense INT8, >= 1.5x faster than our "
              "fp32 sparse model",
              "ratio = the rival's time / the int8 model's, same case; our fp32 model: the same block model (GELU, "
              "QKV and add + LayerNorm fused) in float32, run the same way as the int8 one (eager or sparse.compile)")
    for rows in cases.values():
        for q in rows:
            if q["format"] != "bsr-int8" or q["op"] != "bert_forward":
                continue
            ort = [r for r in rows if r["format"] == "dense-int8" and str(r["backend"]).startswith("onnxruntime")]
            twin = str(q["backend"]).replace(", int8)", ")")
            f32 = [r for r in rows if r["format"] == "bsr" and r["dtype"] == "float32" and r["density"] == q["density"]
                   and str(r["backend"]) == twin]
            for rival, target, label in ((ort, 2.0, "vs ONNX Runtime dense INT8"), (f32, 1.5, "vs our fp32 sparse")):
                if rival:
                    t.add(_case_label(q), f"{q['backend']} {label}", target,
                          float(rival[0]["median_s"]) / float(q["median_s"]), noise(q, rival[0]).strip())
    return t


def e2e_target_tables(rows: List[Row]) -> List[Table]:
    """The end-to-end targets, from ``e2e_bert`` rows: BERT-base forward and training step, 90% block 32."""
    cases = by_case(r for r in rows if r["bench"] == "e2e_bert")
    fwd = Table(
        "BERT-base, 90% block-32 linears, batch 8, seq 128, forward: >= 6x dense eager fp32, >= 3.5x best dense; "
        "bf16 >= 3.5x dense eager bf16",
        "best dense = fastest of eager, oneDNN with pre-packed weights and torch.compile in the row's dtype (same "
        "case); the last line of a case races the fastest sparse model against the fastest dense one in any dtype",
    )
    train = Table("BERT-base training step (forward+backward), 90% block-32, batch 8: >= 3x dense eager fp32")
    for rows in cases.values():
        rows = [r for r in rows if not is_peer(r)]  # other runtimes have their own table (peer_target_tables)
        dense = {str(r["backend"]) + "|" + str(r["dtype"]): r for r in rows if r["format"] == "dense"}
        eager = dense.get("eager_fp32|float32")
        ours = []
        for r in rows:
            if r["format"] != "bsr" or r["block"] != "32x32" or nominal(float(r["density"]), [0.1]) is None:
                continue
            if r["tokens"] != 8 * 128 or eager is None:
                continue
            vs_eager = float(eager["median_s"]) / float(r["median_s"])
            what = f"{r['backend']} bsr 32x32 90% {r['dtype']}"
            if r["op"] == "bert_forward":
                ours.append(r)
                fwd.add(_case_label(r), f"{what} vs eager fp32", 6.0, vs_eager, noise(r, eager).strip())
                same = [d for d in dense.values() if d["dtype"] == r["dtype"]]
                best = min(same, key=lambda x: float(x["median_s"]))
                fwd.add(_case_label(r), f"{what} vs best dense {r['dtype']}", 3.5,
                        float(best["median_s"]) / float(r["median_s"]), f"best: {best['backend']}" + noise(r, best))
                own = dense.get(f"eager_bf16|{r['dtype']}")
                if own is not None:
                    fwd.add(_case_label(r), f"{what} vs eager bf16", 3.5, float(own["median_s"]) / float(r["median_s"]),
                            noise(r, own).strip())
            elif r["op"] == "bert_train_step":
                train.add(_case_label(r), f"{what} vs eager fp32", 3.0, vs_eager, noise(r, eager).strip())
        if ours and dense:
            fast = min(ours, key=lambda x: float(x["median_s"]))
            best = min(dense.values(), key=lambda x: float(x["median_s"]))
            fwd.add(
                _case_label(fast),
                f"fastest sparse ({fast['backend']} {fast['dtype']}) vs fastest dense, any dtype",
                3.5,
                float(best["median_s"]) / float(fast["median_s"]),
                f"best: {best['backend']} {best['dtype']}" + noise(fast, best),
            )
    int8 = _e2e_int8_table(cases)
    return [fwd, train] + ([int8] if int8.lines else [])


PEERS = ("onnxruntime", "deepsparse", "openvino")


def is_peer(r: Row) -> bool:
    """A row of another runtime (benchmarks.peers): its backend is "<runtime> <version>"."""
    return str(r["backend"]).split(" ")[0] in PEERS


def _sparse_90(r: Row, fmt: str) -> bool:
    return r["format"] == fmt and r["dtype"] == "float32" and nominal(float(r["density"]), [0.1, 3 / 32]) is not None


def peer_target_tables(rows: List[Row]) -> List[Table]:
    """The whole-model targets against other runtimes, from ``e2e_bert`` rows: our fastest way to run the 90%
    model (eager, fused GELU, compiled) against DeepSparse on the same weights, and our remainder (time outside
    Linear/MatMul kernels, from the profiles) against ONNX Runtime's."""
    cases = by_case(r for r in rows if r["bench"] == "e2e_bert")
    vs_ds = Table(
        "BERT-base, 90% of every encoder Linear, fp32, forward: >= 1.5x DeepSparse on the same block-32 and "
        "unstructured weights, >= 1.3x on the same balanced weights",
        "ours = the fastest of this package's ways to run that model in the same case (eager, GELU fused, "
        "sparse.compile); DeepSparse reads the same pruned weights as zeros of an ONNX model",
    )
    rest = Table(
        "BERT-base, 90% block-32, fp32: the sparse model's remainder no slower than ONNX Runtime's dense model "
        "minus its MatMul/Gemm time",
        "remainder = one profiled forward's self time outside Linear/MatMul kernels (e2e_profile.md; ONNX "
        "Runtime's MatMuls between two activations are attention and stay in its remainder, as torch's bmm and "
        "SDPA do in ours); measured = ONNX Runtime's remainder / ours, for our fastest-remainder way to run the model",
    )
    aoti = Table("BERT-base, 90% block-32, fp32, forward: an AOTInductor package no slower than the eager sparse "
                 "model",
                 "eager = sparse.sparsify with GELU fused, the same model the package was built from")
    for case_rows in cases.values():
        op = case_rows[0]["op"]
        pkg = next((r for r in case_rows if r["backend"] == "AOTInductor package"), None)
        eager = next((r for r in case_rows if r["backend"] == "sparse.sparsify(fused gelu)" and _sparse_90(r, "bsr")),
                     None)
        if op == "bert_forward" and pkg is not None and eager is not None:
            aoti.add(_case_label(pkg), "AOTInductor package vs eager", 1.0,
                     float(eager["median_s"]) / float(pkg["median_s"]), noise(pkg, eager).strip())
        for fmt, target in (("bsr", 1.5), ("unstructured", 1.5), ("balanced", 1.3)):
            mine = [r for r in case_rows if _sparse_90(r, fmt) and not is_peer(r)]
            theirs = [r for r in case_rows if _sparse_90(r, fmt) and str(r["backend"]).startswith("deepsparse")]
            if op != "bert_forward" or not mine or not theirs:
                continue
            best = min(mine, key=lambda r: float(r["median_s"]))
            ds = theirs[0]
            vs_ds.add(_case_label(best), f"{best['backend']} {fmt} {best['block']} vs {ds['backend']}", target,
                      float(ds["median_s"]) / float(best["median_s"]), noise(best, ds).strip())
        if op == "bert_forward_remainder":
            ort = next((r for r in case_rows if str(r["backend"]).startswith("onnxruntime")), None)
            mine = [r for r in case_rows if _sparse_90(r, "bsr")]
            if ort is not None and mine:
                best = min(mine, key=lambda r: float(r["median_s"]))
                rest.add(_case_label(best), f"{best['backend']} remainder vs ONNX Runtime dense", 1.0,
                         float(ort["median_s"]) / float(best["median_s"]),
                         f"{1e3 * float(best['median_s']):.1f} ms vs {1e3 * float(ort['median_s']):.1f} ms")
    return [vs_ds, rest] + ([aoti] if aoti.lines else [])


def e2e_table(rows: List[Row]) -> str:
    """Every end-to-end row: time and speedup over eager fp32 in the same case."""
    e2e = [r for r in rows if r["bench"] == "e2e_bert"]
    if not e2e:
        return ""
    out = ["### End-to-end BERT-base (all rows)", "",
           "| op | tokens | contender | dtype | median ms | vs eager fp32 | notes |", "|---|---|---|---|---|---|---|"]
    for case_rows in by_case(e2e).values():
        eager = next((r for r in case_rows if r["backend"] == "eager_fp32"), None)
        for r in case_rows:
            what = str(r["backend"]) if r["format"] == "dense" else (
                f"{r['backend']} {r['format']} {r['block']} s={float(r['sparsity']):.2f}")
            sp = f"{float(eager['median_s']) / float(r['median_s']):.2f}x" if eager else ""
            out.append(
                f"| {r['op']} | {r['tokens']} | {what} | {r['dtype']} | {1e3 * float(r['median_s']):.1f} | {sp} | "
                f"{r.get('notes', '')} |"
            )
    return "\n".join(out + [""])


def other_table(rows: List[Row]) -> str:
    """Rows of benchmarks without targets here (e.g. the GPU ones): time and ratio against their own baseline."""
    other = [r for r in rows if r["bench"] not in ("cpu_ops", "e2e_bert")]
    if not other:
        return ""
    out = ["## Other benchmarks", "", "| bench | op | backend | format | block | dtype | shape | tokens | sparsity | "
           "median ms | baseline | ratio | ideal |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in other:
        out.append(f"| {r['bench']} | {r['op']} | {r['backend']} | {r['format']} | {r['block']} | {r['dtype']} | "
                   f"{r['shape']} | {r['tokens']} | {float(r['sparsity']):.2f} | {1e3 * float(r['median_s']):.3f} | "
                   f"{r['baseline']} | {float(r['ratio']):.2f}x | {float(r['ideal_ratio']):.1f}x |")
    return "\n".join(out + [""])


def machine_line(rows: List[Row]) -> str:
    if not rows:
        return ""
    r = rows[0]
    return (f"Machine: {r['machine']} ({r['cpu_features']}; sparsekern ISA {r['isa']}), torch {r['torch']}, "
            f"triton {r['triton'] or '-'}, CUDA {r['cuda'] or '-'}, git {r['git_rev']}.")


def malloc_line() -> str:
    from sparse.runtime import malloc_tuning

    t = malloc_tuning()
    if t is None:
        return "glibc malloc ran with its default, adaptive thresholds (`SPARSEKERN_TUNE_MALLOC=0`, or not glibc)."
    return (f"glibc malloc ran with fixed thresholds for every contender (`sparse.runtime.tune_malloc`: mmap "
            f"{t['mmap_threshold'] >> 20} MiB, trim {t['trim_threshold'] >> 20} MiB), so large activation buffers "
            f"are not faulted in again on every call.")


def summary_markdown(rows: List[Row], skipped: Sequence[str] = ()) -> str:
    from sparse.runtime import cpu_summary

    parts = ["# sparsekern benchmark summary", "", f"`{cpu_summary()}`", "", machine_line(rows), "", malloc_line(), "",
             f"Ratios compare rows timed together in one case (interleaved medians). A detail marked noisy had its "
             f"samples spread by more than {NOISY:.0f}x (p90/p10): the machine was busy; rerun before trusting it.", ""]
    kernel = kernel_target_tables(rows) if any(r["bench"] == "cpu_ops" for r in rows) else []
    e2e = e2e_target_tables(rows) if any(r["bench"] == "e2e_bert" for r in rows) else []
    if kernel:
        parts += ["## CPU kernel targets", ""] + [t.markdown() for t in kernel]
    if e2e:
        parts += ["## End-to-end targets", ""] + [t.markdown() for t in e2e]
        parts += ["## Whole-model targets against other runtimes", ""]
        parts += [t.markdown() for t in peer_target_tables(rows)] + [e2e_table(rows)]
    parts.append(other_table(rows))
    if skipped:
        parts += ["## Contenders that could not run", ""] + [f"- {s}" for s in skipped] + [""]
    return "\n".join(parts)


# ---- against an earlier run ------------------------------------------------------------------------------------
MARGIN = 0.10  # a row's ratio to its own baseline may drop this much between two runs before it counts as worse


def contender_key(r: Row) -> Tuple[str, ...]:
    """What identifies a row across runs: its case and contender (another runtime's version left out, so that an
    upgrade of ONNX Runtime still compares with the old row)."""
    backend = str(r["backend"]).split(" ")[0] if is_peer(r) else str(r["backend"])
    return (str(r["bench"]), str(r["case"]), backend, str(r["format"]), str(r["block"]), str(r["dtype"]),
            f"{float(r['density'] or 0):.4f}")


def read_run(path: str) -> List[Row]:
    """The rows of an earlier run: a harness CSV, or every harness CSV of a folder (``bench-out/``); CSVs of
    another schema (e.g. the GPU benchmarks') are left out."""
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".csv"))
    else:
        files = [path]
    rows: List[Row] = []
    for f in files:
        try:
            rows += read_csv(f)
        except ValueError:
            if not os.path.isdir(path):
                raise
    if not rows:
        raise ValueError(f"{path}: no harness CSV rows (expected e2e_bert.csv / cpu_ops.csv of an earlier run)")
    return rows


@dataclass
class Change:
    """One contender present in both runs: its times and its ratios to its own run's baseline."""

    new: Row
    old: Row

    @property
    def time_ratio(self) -> float:  # > 1: slower than before
        return float(self.new["median_s"]) / float(self.old["median_s"])

    @property
    def baseline_change(self) -> float:  # < 1: lost ground against its own run's baseline
        return float(self.new["ratio"]) / float(self.old["ratio"])

    @property
    def same_baseline(self) -> bool:
        """Whether both ratios are against the same contender (a peer's version aside): a remainder row's baseline
        is ONNX Runtime where it ran, else the first profiled model, and ratios to different ones do not compare."""
        return _peerless(self.new["baseline"]) == _peerless(self.old["baseline"])

    def worse(self, margin: float = MARGIN) -> bool:
        return self.same_baseline and self.baseline_change < 1.0 - margin


def _peerless(label: object) -> str:
    """A baseline label without a peer runtime's version ("onnxruntime 1.32.0" -> "onnxruntime")."""
    label = str(label)
    return label.split(" ")[0] if label.split(" ")[0] in PEERS else label


def compare_runs(new: Sequence[Row], old: Sequence[Row], benches: Sequence[str] = ("e2e_bert",)) -> List[Change]:
    """The rows of ``benches`` present in both runs (same case and contender, :func:`contender_key`), in the new
    run's order."""
    before = {contender_key(r): r for r in old if r["bench"] in benches}
    return [Change(r, before[contender_key(r)]) for r in new if r["bench"] in benches and contender_key(r) in before]


def compare_markdown(changes: Sequence[Change], margin: float = MARGIN, old_label: str = "old") -> str:
    """A table of every compared row: old and new ms, new/old, the ratio to its own run's baseline before and
    now; a row whose ratio to its baseline dropped by more than ``margin`` is flagged **WORSE**."""
    worse = [c for c in changes if c.worse(margin)]
    out = [f"## Against an earlier run ({old_label})", "",
           f"{len(changes)} rows in both runs (same case and contender); {len(worse)} lost more than "
           f"{100 * margin:.0f}% of their ratio to their own run's baseline (the noise margin). new/old > 1: slower "
           "than before; the ratio columns are baseline time / row time within each run, so a slower machine or a "
           "busier run moves the times but not them (a row whose baseline differs between the runs is not judged).",
           ""]
    if not changes:
        return "\n".join(out)
    out += ["| case | contender | old ms | new ms | new/old | vs baseline before | now | status |",
            "|---|---|---|---|---|---|---|---|"]
    for c in changes:
        r = c.new
        what = " ".join(x for x in (str(r["backend"]), str(r["format"]) if r["format"] != "dense" else "",
                                    str(r["block"]), str(r["dtype"])) if x)
        status = "**WORSE**" if c.worse(margin) else ("ok" if c.same_baseline else "other baseline")
        case = str(r["case"]).replace("|", "\\|")  # a case id holds pipes
        out.append(f"| {case} | {what} | {1e3 * float(c.old['median_s']):.2f} | {1e3 * float(r['median_s']):.2f} "
                   f"| {c.time_ratio:.2f} | {float(c.old['ratio']):.2f}x ({c.old['baseline']}) | "
                   f"{float(r['ratio']):.2f}x ({r['baseline']}) | {status} |")
    return "\n".join(out + [""])


def write_comparison(rows: Sequence[Row], old: Sequence[Row], out_dir: str, old_label: str = "old",
                     margin: float = MARGIN) -> Tuple[str, int]:
    """Compares ``rows`` with ``old`` (an earlier run's rows, :func:`read_run`, read before this run could
    overwrite them), prints the table and writes it to ``<out_dir>/compare.md``. Returns the path and the number
    of rows flagged worse."""
    changes = compare_runs(rows, old)
    md = compare_markdown(changes, margin, old_label)
    print(md)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "compare.md")
    with open(path, "w") as f:
        f.write(md)
    return path, sum(c.worse(margin) for c in changes)


def write_report(rows: List[Row], out_dir: str, skipped: Sequence[str] = (), plots: bool = True) -> List[str]:
    """Writes ``summary.md`` and the plots; returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "summary.md")
    with open(path, "w") as f:
        f.write(summary_markdown(rows, skipped))
    paths = [path]
    if plots:
        try:
            from .plots import write_plots
        except ImportError as exc:  # e.g. a GPU machine without matplotlib: the CSV and summary still stand
            print(f"plots left out: {exc}", file=sys.stderr)
        else:
            paths += write_plots(rows, out_dir)
    return paths


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks.report", description="summary.md and plots from harness CSVs")
    ap.add_argument("csv", nargs="+")
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--compare", metavar="OLD", help="an earlier run (its folder or CSV): every e2e row in both, "
                    f"new/old, flagged where its ratio to its baseline dropped by more than {100 * MARGIN:.0f}%%")
    args = ap.parse_args(argv)
    old = read_run(args.compare) if args.compare else None
    rows: List[Row] = []
    for p in args.csv:
        rows += read_csv(p)
    for p in write_report(rows, args.out):
        print(f"wrote {p}")
    if old is not None:
        path, _ = write_comparison(rows, old, args.out, args.compare)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
