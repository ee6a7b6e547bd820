"""The pattern atlas: every sparsity pattern on a real small model (all-MiniLM-L6-v2 unless ``--model``) at several
sparsities, each point pruned one-shot, recovered by distillation for the same budget, then measured for accuracy
(held-out cosine and top-1 retrieval agreement against the dense model) and speed (end to end and per layer,
against the best dense path) in one run; the Pareto front of accuracy against end-to-end speedup says which points
are worth having.

    python -m benchmarks.atlas                                 # --preset quick: 7 patterns x 50/75/90%, 60 s each
    python -m benchmarks.atlas --total-minutes 20              # the recovery budget per point chosen to fit 20 min
    python -m benchmarks.atlas --recover-seconds 30            # or given directly (the same for every point)
    python -m benchmarks.atlas --smoke                         # = --preset tiny: seconds, the numbers mean nothing
    python -m benchmarks.atlas --report bench-out/atlas.csv    # atlas.md and atlas.png again from a CSV

Each point does what ``python -m sparse sparsify`` does (``sparse/cli.py``), with its defaults: SparseGPT one-shot
pruning of every encoder Linear on 256 calibration sentences (``sparse.distill.reconstruct``), distillation from
the dense model (``sparse.distill.distill``: lr 3e-4, batch 32, max length 64) for ``--recover-seconds`` of wall
time, then ``sparse.sparsify`` with the same masks (GELU fused into the sparse kernel, layers that measure slower
than ``F.linear`` kept dense), and the accuracy of that sparse model on the held-out sentences
(``sparse.evaluate``). Layer dropping (``sparse.prune.drop_layers``) at sparsity s keeps ``n - round(s n)`` of the
encoder's n layers, evenly spread, and distils the shallower model with each kept layer matched to the dense
layer it stands for (``sparse.prune.teacher_hidden_states``). The budget is wall time, as the CLI's: a shallower
student takes more steps in it.

Speed, fp32, 2 threads, every contender of a case timed in the same interleaved rounds (``harness.measure``, each
sample after an untimed call of the same contender):

- end to end, as the CLI's latency comparison: batch 8, sequence 128 of random token ids, every model with the
  fastest attention implementation for itself (``sparse.evaluate.pick_attention``); the dense model eager and with
  every Linear through oneDNN with a pre-packed weight (GELU fused; the faster is the baseline), the pruned model as
  built and with its remaining dense Linear layers pre-packed (the faster counts);
- per layer: each Linear of the middle Transformer layer (every layer is pruned to the same sparsity) on a random
  ``[batch x seq, in]`` input, the pattern's sparse module (GELU fused) against the dense model's layer through
  ``F.linear`` (then torch's GELU) and through oneDNN pre-packed (GELU fused); the faster dense one is the
  baseline.

Output in ``--out`` (default ``bench-out/``): ``atlas.csv`` (the harness schema: per point the four end-to-end
rows, the accuracy in the ``cosine`` / ``top1_agreement`` columns of the pruned model's rows, and three rows per
timed layer), ``atlas.png`` (cosine against end-to-end speedup, one marker per pattern, the Pareto front drawn) and
``atlas.md`` (the table, the front, and the point the demo rule picks).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import re
import sys
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .harness import Contender, machine_info, make_rows, measure, read_csv, threads, write_csv

BENCH = "atlas"


@dataclass(frozen=True)
class Pattern:
    """One pattern of the atlas. ``kind``: the ``sparse.sparsify`` pattern (``"unstructured"``, ``"balanced"``,
    ``"block"``), or ``"layers"`` for layer dropping. ``block`` is ``(rows, cols)``: 8x1 = column vectors (8 output
    rows share each kept input column), 1x4 = row vectors."""

    key: str
    label: str
    kind: str
    block: Tuple[int, int] = (32, 32)
    bank: int = 32


PATTERNS: Dict[str, Pattern] = {p.key: p for p in (
    Pattern("unstructured", "unstructured", "unstructured", block=(1, 1)),
    Pattern("balanced32", "balanced, bank 32", "balanced"),
    Pattern("vector8x1", "column vectors 8x1", "block", block=(8, 1)),
    Pattern("vector1x4", "row vectors 1x4", "block", block=(1, 4)),
    Pattern("block16", "blocks 16x16", "block", block=(16, 16)),
    Pattern("block32", "blocks 32x32", "block", block=(32, 32)),
    Pattern("layers", "layer dropping", "layers"),
)}
# What `make demo` (python -m sparse demo) can run: sparsify's --pattern with a square --block.
DEMO_PATTERNS = ("unstructured", "balanced32", "block16", "block32")


@dataclass(frozen=True)
class Preset:
    patterns: Tuple[str, ...]  # keys of PATTERNS
    sparsities: Tuple[float, ...]
    recover_seconds: float = 60.0  # distillation budget of every point (wall time)
    max_steps: Optional[int] = None  # and a step cap (the tiny preset's)
    heldout: int = 500  # held-out sentences of the accuracy metrics
    calibration: int = 256  # SparseGPT's calibration sentences
    batch: int = 8
    seq: int = 128
    latency_rounds: int = 10  # end to end: interleaved rounds
    layer_rounds: int = 5  # per layer: interleaved rounds
    sparsify_repeats: int = 5  # sparse.sparsify's skip-if-slower timing of each layer
    threads: int = 2
    lr: float = 3e-4
    batch_size: int = 32  # distillation
    max_length: int = 64
    seed: int = 0


PRESETS: Dict[str, Preset] = {
    "quick": Preset(patterns=tuple(PATTERNS), sparsities=(0.5, 0.75, 0.9)),
    # Seconds: every pattern once, two distillation steps, a small held-out set, short sequences (the numbers mean
    # nothing). 50%: layer dropping keeps one layer of a 2-layer test model.
    "tiny": Preset(patterns=tuple(PATTERNS), sparsities=(0.5,), max_steps=2, heldout=24, calibration=16, batch=2,
                   seq=16, latency_rounds=2, layer_rounds=2, sparsify_repeats=2, batch_size=8),
}

# What a point costs besides its recovery (SparseGPT, two embeddings of the held-out text, the timing), and the
# set-up before the first, on all-MiniLM-L6-v2 with the quick preset: what --total-minutes subtracts from its
# budget. The full run of 2026-12-07 (2-core AVX-512 Xeon shared with other workers, load 3-5; 44.8 min): 22-39 s
# per point in its quieter phases, up to 94 s in its busiest.
SETUP_S = 20.0
POINT_S = 30.0


def recovery_for(total_minutes: float, n_points: int) -> float:
    """The recovery seconds per point that make ``n_points`` points fit ``total_minutes`` (an estimate:
    :data:`SETUP_S` and :data:`POINT_S`); ValueError when the budget leaves less than a second per point."""
    if not total_minutes > 0:
        raise ValueError(f"total_minutes must be > 0, got {total_minutes}")
    per = (60.0 * total_minutes - SETUP_S) / n_points - POINT_S
    if per < 1.0:
        need = (SETUP_S + n_points * (POINT_S + 1.0)) / 60.0
        raise ValueError(f"total_minutes={total_minutes:g} is too short for {n_points} points: each needs about "
                         f"{POINT_S:g} s of pruning and measuring before any recovery; give at least {need:.1f} "
                         "minutes, or fewer patterns or sparsities")
    return per


def check_plan(patterns: Sequence[str], sparsities: Sequence[float], n_layers: Optional[int] = None) -> None:
    """ValueError naming the first (pattern, sparsity) the atlas cannot run: an unknown pattern, a sparsity outside
    (0, 1), a balanced sparsity that keeps all or none of a bank, a layer-dropping sparsity that drops no layer or
    every layer of an ``n_layers``-layer encoder (checked when ``n_layers`` is given)."""
    if not patterns:
        raise ValueError(f"no pattern given: expected some of {list(PATTERNS)}")
    if not sparsities:
        raise ValueError("no sparsity given: expected numbers in (0, 1), e.g. 0.5,0.75,0.9")
    for key in patterns:
        if key not in PATTERNS:
            raise ValueError(f"unknown pattern {key!r}: expected some of {list(PATTERNS)}")
    for s in sparsities:
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 < s < 1:
            raise ValueError(f"sparsity {s!r}: expected a number in (0, 1)")
    for key in patterns:
        pat = PATTERNS[key]
        for s in sparsities:
            if pat.kind == "balanced" and not 1 <= _keep(pat, s) < pat.bank:
                raise ValueError(f"pattern {key!r} at sparsity {s:g} keeps {_keep(pat, s)} of every {pat.bank} "
                                 f"weights: expected a sparsity in [{0.5 / pat.bank:.3f}, {1 - 0.5 / pat.bank:.3f}]")
            if pat.kind == "layers" and n_layers is not None and not 1 <= round(s * n_layers) < n_layers:
                raise ValueError(f"pattern 'layers' at sparsity {s:g} drops {round(s * n_layers)} of the encoder's "
                                 f"{n_layers} layers: expected a sparsity that drops at least one and keeps one")


def _keep(pattern: Pattern, sparsity: float) -> int:
    return round(pattern.bank * (1 - sparsity))


# ---- one point ---------------------------------------------------------------------------------------------------
@dataclass
class Setup:
    """What every point shares: the dense model (``base``: students are copied from it and it is their teacher;
    ``timed``: its copy for the end-to-end timing, with the fastest attention implementation for itself;
    ``prepacked``: every Linear through oneDNN, the same), the timing input, the text, the dense model's held-out
    embeddings."""

    base: torch.nn.Module
    timed: torch.nn.Module
    prepacked: torch.nn.Module
    dense_notes: Dict[str, str]  # the attention implementation each of timed / prepacked runs with, and why
    ids: torch.Tensor  # [batch, seq] token ids of the end-to-end timing
    tokenizer: Any
    name: str
    n_layers: int
    stack: str
    train: List[str]
    heldout: List[str]
    reference: torch.Tensor


def _pattern_info(pattern: Pattern, keep: Optional[int]) -> Dict[str, Any]:
    """The format / block columns of the pruned model's rows."""
    if pattern.kind == "unstructured":
        return {"format": "unstructured", "block": "1x1"}
    if pattern.kind == "balanced":
        return {"format": "balanced", "block": f"bank{pattern.bank}/keep{keep}"}
    return {"format": "bsr", "block": f"{pattern.block[0]}x{pattern.block[1]}"}


def _encoder_stack(model: torch.nn.Module) -> Tuple[str, int]:
    from sparse.prune import layer_stacks

    stacks = {k: v for k, v in layer_stacks(model).items() if k.startswith("encoder")}
    if len(stacks) != 1:
        raise ValueError(f"layer dropping needs one encoder layer stack, found {sorted(stacks) or 'none'}")
    (name, stack), = stacks.items()
    return name, len(stack)


def _sparsify(model: torch.nn.Module, pattern: Pattern, sparsity: float, keep: Optional[int],
              masks: Dict[str, torch.Tensor], p: Preset, timed: bool):
    """``sparse.sparsify`` with the pattern's arguments and exactly ``masks``; ``timed``: each layer timed against
    ``F.linear`` and kept dense where slower (what a user gets), else every layer converted, untimed."""
    import sparse

    return sparse.sparsify(model, pattern.kind, None if pattern.kind == "balanced" else sparsity,
                           block=pattern.block, bank=pattern.bank, keep=keep, masks=masks, skip_if_slower=timed,
                           fuse_activations=True, sample_tokens=p.batch * p.seq if timed else 0,
                           repeats=p.sparsify_repeats)


def run_point(s: Setup, pattern: Pattern, sparsity: float, p: Preset, progress: bool) -> Tuple[List[dict], str]:
    """Prunes, recovers, sparsifies and measures one (pattern, sparsity); returns its rows and a one-line log."""
    from sparse import distill, evaluate
    from sparse.prune import drop_layers, teacher_hidden_states

    torch.manual_seed(p.seed)
    student = copy.deepcopy(s.base)
    for prm in student.parameters():  # trainable, as loaded (distillation froze the teacher's, which it copies)
        prm.requires_grad_(True)
    keep = None
    teacher_hidden = None
    t0 = time.monotonic()
    if pattern.kind == "layers":
        dropped = round(sparsity * s.n_layers)
        kept = drop_layers(student, {s.stack: s.n_layers - dropped})[s.stack]
        teacher_hidden = teacher_hidden_states(kept, s.n_layers)
        masks: Dict[str, torch.Tensor] = {}
        info = {"format": "layer_drop", "block": f"keep{len(kept)}of{s.n_layers}", "density": len(kept) / s.n_layers}
        how = f"layers {kept} of {s.n_layers} kept"
    else:
        layers = distill.prunable_linears(student)
        if pattern.kind == "balanced":
            keep = _keep(pattern, sparsity)
        masks = distill.reconstruct(student, s.tokenizer, s.train[:p.calibration], layers, pattern.kind,
                                    sparsity=sparsity, block=pattern.block, bank=pattern.bank, keep=keep,
                                    max_length=p.max_length, progress=progress)
        info = {**_pattern_info(pattern, keep),
                "density": sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())}
        how = f"SparseGPT on {min(p.calibration, len(s.train))} sentences"
    prune_s = time.monotonic() - t0
    one_shot = evaluate.agreement(s.reference, evaluate.embed(student, s.tokenizer, s.heldout))
    rec = distill.distill(student, s.base, s.tokenizer, s.train, masks, seconds=p.recover_seconds,
                          max_steps=p.max_steps, teacher_hidden=teacher_hidden, lr=p.lr, batch_size=p.batch_size,
                          max_length=p.max_length, seed=p.seed, progress=progress)
    for prm in student.parameters():
        prm.requires_grad_(False)
    student.eval()
    t1 = time.monotonic()
    point = f"{pattern.key}|{sparsity:g}"
    rows: List[dict] = []
    report = None
    if pattern.kind != "layers":
        rows += _layer_rows(s, student, pattern, sparsity, keep, masks, point, p)
        report = _sparsify(student, pattern, sparsity, keep, masks, p, timed=True)
    acc = evaluate.agreement(s.reference, evaluate.embed(student, s.tokenizer, s.heldout))
    converted = "" if report is None else f"; {len(report.converted)} of {len(report.layers)} Linear layers sparse"
    notes = (f"{how} ({prune_s:.0f} s); one-shot cosine {one_shot['cosine']:.4f}, top-1 "
             f"{one_shot['top1_agreement']:.3f}; recovery {rec['steps']} steps in {rec['seconds']:.0f} s "
             f"[run: {budget_text(p)}], loss {rec['first_loss']:.4g} -> {rec['last_loss']:.4g}{converted}")

    # End to end, as the CLI's latency comparison: two dense and two pruned contenders, the best of each.
    leftover = copy.deepcopy(student)
    evaluate.prepack_linears(leftover)
    dense_info = {"format": "dense", "block": "", "density": 1.0, "dense_ref": True,
                  "weight_bytes": evaluate.weight_bytes(s.base)}
    pruned = {**info, "weight_bytes": evaluate.weight_bytes(student), "cosine": acc["cosine"],
              "top1_agreement": acc["top1_agreement"]}
    built = "sparse.sparsify(fused gelu)" if report is not None else "drop_layers"
    contenders = [
        Contender("dense_eager", _call(s.timed, s.ids),
                  {**dense_info, "backend": "eager", "notes": s.dense_notes["dense_eager"]}),
        Contender("dense_onednn_prepacked", _call(s.prepacked, s.ids),
                  {**dense_info, "backend": "onednn_prepacked", "notes": s.dense_notes["dense_onednn_prepacked"]}),
        Contender("pruned", _call(student, s.ids),
                  {**pruned, "backend": built, "notes": f"{_pick_attention(student, s.ids)}; {notes}"}),
        Contender("pruned_leftover_dense_prepacked", _call(leftover, s.ids),
                  {**pruned, "backend": f"{built}+onednn_prepacked",
                   "notes": f"{_pick_attention(leftover, s.ids)}; {notes}"})]
    with torch.inference_mode():
        timings = measure(contenders, rounds=p.latency_rounds, min_sample_s=0.0, warmup=2, presample_call=True)
    hidden = int(getattr(s.base.config, "hidden_size", 0))
    common = {"op": "bert_forward", "shape": f"{s.name} seq {p.seq}", "tokens": p.batch * p.seq,
              "threads": p.threads, "weights": "hot", "dtype": "float32", "out_features": hidden,
              "in_features": hidden}
    e2e = make_rows(BENCH, f"{point}|batch{p.batch}|seq{p.seq}|{p.threads}t", common, contenders, timings,
                    "best_dense")
    best = max((r for r in e2e if r["format"] != "dense"), key=lambda r: r["ratio"])
    layer = [r["ratio"] for r in rows if r["format"] != "dense"]
    per_layer = f", per layer {_geomean(layer):.2f}x" if layer else ""
    log = (f"{pattern.label} {sparsity:.0%}: cosine {acc['cosine']:.4f} (one-shot {one_shot['cosine']:.4f}), "
           f"top-1 {acc['top1_agreement']:.3f}, end to end {best['ratio']:.2f}x{per_layer} ({rec['steps']} "
           f"recovery steps; {time.monotonic() - t0:.0f} s, {time.monotonic() - t1:.0f} s of it measuring)")
    return e2e + rows, log


def timed_layers(names: Sequence[str]) -> List[str]:
    """The names of ``names`` (Linear layers, in model order) in the middle Transformer layer (the prefix up to the
    first numeric component, ``encoder.layer.3``; of n layers the (n // 2)-th, from 0). Every layer is pruned to
    the same sparsity and has the same shapes, so one layer's Linears stand for the others' at a sixth of the
    timing (on all-MiniLM-L6-v2)."""
    groups: Dict[str, List[str]] = {}
    for name in names:
        m = re.match(r"^(.*?\.\d+)\.", name)
        groups.setdefault(m.group(1) if m else name, []).append(name)
    ordered = list(groups.values())
    return ordered[len(ordered) // 2] if ordered else []


def _layer_rows(s: Setup, student: torch.nn.Module, pattern: Pattern, sparsity: float, keep: Optional[int],
                masks: Dict[str, torch.Tensor], point: str, p: Preset) -> List[dict]:
    """Three rows for each pruned Linear of the middle Transformer layer (:func:`timed_layers`): the pattern's
    sparse module (from ``student``'s weights and ``masks``, GELU fused where the model has one after the layer)
    against the dense model's layer through ``F.linear`` (then torch's activation) and through oneDNN pre-packed
    (activation fused), on one random ``[batch x seq, in]`` input; the faster dense one is the baseline."""
    from sparse import activations
    from sparse.evaluate import PrepackedLinear

    model = copy.deepcopy(student)
    _sparsify(model, pattern, sparsity, keep, masks, p, timed=False)
    tokens = p.batch * p.seq
    gen = torch.Generator().manual_seed(p.seed)
    rows = []
    with torch.inference_mode():
        for name in timed_layers(list(masks)):
            sp = model.get_submodule(name)
            dense = s.base.get_submodule(name)
            act = sp.activation
            f = activations.get(act).forward
            packed = PrepackedLinear(dense, act)
            x = torch.randn(tokens, dense.in_features, generator=gen)
            info = {"format": "dense", "block": "", "density": 1.0, "dense_ref": True,
                    "weight_bytes": dense.weight.numel() * dense.weight.element_size()}
            suffix = "" if act == "none" else f"+{act}"
            cs = [Contender("F.linear", lambda d=dense, f=f, x=x: f(d(x)), {**info, "backend": f"F.linear{suffix}"}),
                  Contender("onednn", lambda q=packed, x=x: q(x), {**info, "backend": f"onednn_prepacked{suffix}"}),
                  Contender("sparse", lambda q=sp, x=x: q(x),
                            {**_pattern_info(pattern, keep), "density": 1.0 - sp.sparsity, "weight_bytes": sp.nbytes,
                             "backend": f"sparse.sparsify{suffix}", "notes": name})]
            t = measure(cs, rounds=p.layer_rounds, min_sample_s=0.0, warmup=2, presample_call=True)
            common = {"op": "linear", "shape": f"{dense.out_features}x{dense.in_features}",
                      "out_features": dense.out_features, "in_features": dense.in_features, "tokens": tokens,
                      "threads": p.threads, "weights": "hot", "dtype": "float32"}
            rows += make_rows(BENCH, f"{point}|{name}|tokens{tokens}|{p.threads}t", common, cs, t, "best_dense")
    return rows


# ---- the run -----------------------------------------------------------------------------------------------------
def setup(model: Optional[str], p: Preset) -> Setup:
    from sparse import cli, corpus, evaluate

    base, tokenizer, _, name = cli._load_model(model)
    try:
        stack, n_layers = _encoder_stack(base)
    except ValueError:
        stack, n_layers = "", 0
    text = corpus.load(n_heldout=p.heldout)
    timed = copy.deepcopy(base)
    prepacked = copy.deepcopy(base)
    evaluate.prepack_linears(prepacked)
    vocab = int(getattr(base.config, "vocab_size", 1000))
    ids = torch.randint(0, vocab, (p.batch, p.seq), generator=torch.Generator().manual_seed(p.seed))
    with threads(p.threads):
        reference = evaluate.embed(base, tokenizer, text.heldout)
        notes = {"dense_eager": _pick_attention(timed, ids), "dense_onednn_prepacked": _pick_attention(prepacked, ids)}
    return Setup(base, timed, prepacked, notes, ids, tokenizer, name, n_layers, stack, list(text.train),
                 list(text.heldout), reference)


def _call(model: torch.nn.Module, ids: torch.Tensor) -> Callable[[], Any]:
    mask = torch.ones_like(ids)
    return lambda: model(input_ids=ids, attention_mask=mask)


def _pick_attention(model: torch.nn.Module, ids: torch.Tensor) -> str:
    """Leaves ``model`` with its fastest attention implementation on ``ids``; says which and the race's times."""
    from sparse import evaluate

    with torch.inference_mode():
        winner, secs = evaluate.pick_attention(model, _call(model, ids))
    return f"attention {winner} (" + ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in secs.items()) + ")"


def run(p: Preset, out_dir: str, model: Optional[str] = None, progress: bool = True,
        log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr, flush=True),
        ) -> Tuple[List[dict], List[str]]:
    """Every point of the preset; writes ``atlas.csv`` after each (a run cut short keeps what it measured).
    Returns the rows and the points that failed (one line each: a point that fails does not stop the others)."""
    from tqdm.auto import tqdm

    check_plan(p.patterns, p.sparsities)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "atlas.csv")
    s = setup(model, p)
    if "layers" in p.patterns:
        if not s.n_layers:
            raise ValueError(f"pattern 'layers': {s.name} has no single encoder layer stack to drop layers from")
        check_plan(p.patterns, p.sparsities, s.n_layers)
    rows: List[dict] = []
    skipped: List[str] = []
    todo = [(PATTERNS[k], sp) for k in p.patterns for sp in p.sparsities]
    bar = tqdm(todo, desc="atlas", unit="point", disable=not progress, file=sys.stderr)
    with threads(p.threads):
        for pattern, sp in bar:
            bar.set_postfix_str(f"{pattern.label} {sp:.0%}", refresh=False)
            try:
                r, line = run_point(s, pattern, sp, p, progress)
            except Exception as exc:  # a long run keeps its other points; the summary lists this one
                first = (str(exc).splitlines() or [""])[0]
                skipped.append(f"{pattern.label} {sp:.0%}: {type(exc).__name__}: {first}")
                log(f"{pattern.label} {sp:.0%} FAILED: {type(exc).__name__}: {first}")
                continue
            rows += r
            write_csv(path, rows)
            log(line)
    if not rows:
        write_csv(path, rows)
    return rows, skipped


# ---- summary: points, the front, the table -------------------------------------------------------------------------
def _geomean(xs: Sequence[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def points(rows: Sequence[dict]) -> List[Dict[str, Any]]:
    """One entry per (pattern, sparsity) of the rows, in pattern order then sparsity: ``pattern`` (key),
    ``label``, ``nominal`` sparsity, ``sparsity`` (the fraction of the encoder's Linear weights removed),
    ``cosine``, ``top1``, ``speedup`` (the faster pruned contender over the best dense one, end to end),
    ``sparse_ms`` / ``dense_ms`` (batch time), ``layer_speedup`` (geometric mean over the timed layers of the
    best dense time over the sparse time; None for layer dropping) with ``layer_min`` / ``layer_max``,
    ``one_shot`` (cosine before recovery) and ``steps`` (recovery steps), both None if not noted."""
    by_point: Dict[Tuple[str, str], List[dict]] = {}
    for r in rows:
        if r["bench"] != BENCH:
            continue
        key, nominal = str(r["case"]).split("|")[:2]
        by_point.setdefault((key, nominal), []).append(r)
    out = []
    for (key, nominal), rs in by_point.items():
        pruned = [r for r in rs if r["op"] == "bert_forward" and r["format"] != "dense"]
        if not pruned:
            continue
        best = max(pruned, key=lambda r: float(r["ratio"]))
        layer = [float(r["ratio"]) for r in rs if r["op"] == "linear" and r["format"] != "dense"]
        notes = str(best["notes"])
        one = re.search(r"one-shot cosine (-?[\d.]+)", notes)
        steps = re.search(r"recovery (\d+) steps", notes)
        out.append({
            "pattern": key, "label": PATTERNS[key].label if key in PATTERNS else key, "nominal": float(nominal),
            "sparsity": float(best["sparsity"]), "block": best["block"], "cosine": float(best["cosine"]),
            "top1": float(best["top1_agreement"]), "speedup": float(best["ratio"]),
            "sparse_ms": 1e3 * float(best["median_s"]), "dense_ms": 1e3 * float(best["baseline_s"]),
            "baseline": best["baseline"], "layer_speedup": _geomean(layer) if layer else None,
            "layer_min": min(layer) if layer else None, "layer_max": max(layer) if layer else None,
            "one_shot": float(one.group(1)) if one else None, "steps": int(steps.group(1)) if steps else None,
        })
    order = {k: i for i, k in enumerate(PATTERNS)}
    return sorted(out, key=lambda q: (order.get(q["pattern"], len(order)), q["nominal"]))


# The dense model in the front: as fast as the best dense path, its own embeddings.
DENSE_POINT: Dict[str, Any] = {"pattern": "dense", "label": "dense", "nominal": 0.0, "speedup": 1.0, "cosine": 1.0}


def dominates(a: Dict[str, Any], b: Dict[str, Any]) -> bool:
    """``a`` is at least as fast and as accurate as ``b`` and better in one of the two."""
    return (a["speedup"] >= b["speedup"] and a["cosine"] >= b["cosine"]
            and (a["speedup"] > b["speedup"] or a["cosine"] > b["cosine"]))


def pareto_front(pts: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The points of ``pts`` no other point of ``pts`` dominates (end-to-end ``speedup`` and ``cosine``, both
    higher-is-better; equal points are all kept), slowest first. Include :data:`DENSE_POINT` in ``pts`` to drop
    every point that is both slower and less accurate than the dense model."""
    return sorted((q for q in pts if not any(dominates(o, q) for o in pts)), key=lambda q: (q["speedup"], -q["cosine"]))


# The demo rule: `make demo` shows a real gain in speed and keeps as much of the model as a pattern can at that
# speed, so its pattern is the most accurate point at least this much faster than the best dense path end to end.
MIN_SPEEDUP = 1.25


def pick(pts: Sequence[Dict[str, Any]], min_speedup: float = MIN_SPEEDUP,
         patterns: Optional[Sequence[str]] = None) -> Optional[Dict[str, Any]]:
    """The point of highest cosine (ties: the faster) among those at least ``min_speedup`` times faster than the
    best dense path end to end, of ``patterns`` (keys; default all); None if none is that fast. It is always a
    point of the Pareto front: a point that dominated it would be as fast and more accurate."""
    ok = [q for q in pts if q["speedup"] >= min_speedup and (patterns is None or q["pattern"] in patterns)]
    return max(ok, key=lambda q: (q["cosine"], q["speedup"])) if ok else None


def _first_e2e(rows: Sequence[dict]) -> Optional[dict]:
    return next((r for r in rows if r["bench"] == BENCH and r["op"] == "bert_forward"), None)


def _name(q: Dict[str, Any]) -> str:
    return f"{q['label']} {q['nominal']:.0%}" if q["pattern"] != "dense" else "dense"


def budget_text(p: Preset) -> str:
    """The recovery budget of a run, and OMP_WAIT_POLICY where it is set (PASSIVE: OpenMP threads sleep at a
    barrier instead of spinning; on a machine whose cores other processes share, the spinning thread holds the
    core the other needs and 2-thread timings stretch to the scheduler's time slice)."""
    budget = (f"at most {p.max_steps} recovery steps per point" if p.max_steps is not None
              else f"{p.recover_seconds:.0f} s of recovery per point")
    policy = os.environ.get("OMP_WAIT_POLICY")
    return f"{budget}, OMP_WAIT_POLICY={policy}" if policy else budget


def _budget_of(rows: Sequence[dict]) -> str:
    """The run conditions a run's notes state (:func:`budget_text`), "" if none does."""
    for r in rows:
        m = re.search(r"\[run: ([^\]]*)\]", str(r["notes"]))
        if m:
            return m.group(1)
    return ""


def markdown(rows: Sequence[dict], skipped: Sequence[str] = (), budget: str = "") -> str:
    pts = points(rows)
    front = pareto_front(pts + [DENSE_POINT])
    on_front = {id(q) for q in front}
    m = machine_info()
    first = _first_e2e(rows)
    lines = ["# Pattern atlas", ""]
    if first is not None:
        batch = re.search(r"\|batch(\d+)\|", str(first["case"]))
        lines += [f"{first['shape']}, batch {batch.group(1) if batch else '?'}, {first['threads']} threads, fp32"
                  f"{'; ' + budget if budget else ''}; {first['machine']} ({first['isa'] or m['isa']}), torch "
                  f"{first['torch']}, git {first['git_rev']}, {str(first['timestamp'])[:10]}.", ""]
    lines += ["| pattern | sparsity | cosine (one-shot) | top-1 | end to end | pruned / dense ms | per layer: geomean "
              "(range) | recovery steps | front |", "|---|---|---|---|---|---|---|---|---|"]
    for q in pts:
        one = "" if q["one_shot"] is None else f" ({q['one_shot']:.3f})"
        layer = "" if q["layer_speedup"] is None else (
            f"{q['layer_speedup']:.2f}x ({q['layer_min']:.2f}-{q['layer_max']:.2f})")
        sp = f"{q['nominal']:.0%}" + ("" if abs(q["sparsity"] - q["nominal"]) < 5e-3 else f" ({q['sparsity']:.3f})")
        steps = "" if q["steps"] is None else q["steps"]
        lines.append(f"| {q['label']} | {sp} | {q['cosine']:.3f}{one} | {q['top1']:.3f} | {q['speedup']:.2f}x | "
                     f"{q['sparse_ms']:.1f} / {q['dense_ms']:.1f} | {layer} | {steps} "
                     f"| {'**yes**' if id(q) in on_front else ''} |")
    lines += ["", "Sparsity in brackets: the fraction of the encoder's Linear weights actually removed (balanced keeps "
              "round(32 (1 - s)) of 32; layer dropping drops round(s n) of the n layers). Cosine and top-1: "
              "held-out sentence embeddings against the dense model's (one-shot: before recovery). End to end: "
              "the faster of the pruned model as built and with its dense Linear layers pre-packed, over the faster "
              "of the dense model eager and pre-packed (oneDNN). Per layer: the sparse module of each Linear of the "
              "middle Transformer layer (GELU fused) against the faster of F.linear and oneDNN pre-packed, "
              "geometric mean over those layers and the range.", ""]
    if pts:
        lines.append("Pareto front (no other point, the dense model included, both faster and more accurate), "
                     "slowest first: " + ", ".join(f"{_name(q)} ({q['cosine']:.3f}, {q['speedup']:.2f}x)"
                                                   for q in front) + ".")
        for what, pats in (("any pattern", None), ("the patterns `make demo` runs", DEMO_PATTERNS)):
            chosen = pick(pts, MIN_SPEEDUP, pats)
            verdict = "none" if chosen is None else (
                f"**{_name(chosen)}** ({chosen['cosine']:.3f}, {chosen['speedup']:.2f}x)")
            lines += ["", f"Most accurate point at least {MIN_SPEEDUP:g}x faster than dense end to end (the demo "
                          f"rule), {what}: {verdict}."]
    if skipped:
        lines += ["", "Points that could not run:", ""] + [f"- {s}" for s in skipped]
    return "\n".join(lines) + "\n"


def write_outputs(rows: Sequence[dict], out_dir: str, skipped: Sequence[str] = (), budget: str = "") -> List[str]:
    """``atlas.md`` and ``atlas.png`` from the rows; returns the paths written."""
    from .plots import atlas_plot

    paths = []
    md = os.path.join(out_dir, "atlas.md")
    with open(md, "w") as f:
        f.write(markdown(rows, skipped, budget))
    paths.append(md)
    pts = points(rows)
    png = os.path.join(out_dir, "atlas.png")
    if atlas_plot(pts, pareto_front(pts + [DENSE_POINT]), png, _title(rows, budget)):
        paths.append(png)
    return paths


def _title(rows: Sequence[dict], budget: str) -> str:
    first = _first_e2e(rows)
    if first is None:
        return ""
    return f"{first['shape']}, {first['machine']}\n{first['threads']} threads, fp32{', ' + budget if budget else ''}"


# ---- command line --------------------------------------------------------------------------------------------------
def _floats(text: str, what: str) -> List[float]:
    out = []
    for x in text.split(","):
        try:
            out.append(float(x))
        except ValueError:
            raise ValueError(f"{what} {text!r}: {x.strip()!r} is not a number (expected a comma list of numbers "
                             "in (0, 1), e.g. 0.5,0.75,0.9)") from None
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    from sparse.runtime import tune_malloc_from_env

    ap = argparse.ArgumentParser(prog="python -m benchmarks.atlas", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="quick",
                    help="quick: 7 patterns x 50/75/90%% (about 30 min on 2 cores); tiny: seconds, a smoke test")
    ap.add_argument("--smoke", action="store_true", help="= --preset tiny")
    ap.add_argument("--model", default=None, metavar="DIR",
                    help="a Hugging Face BERT-style encoder directory (default: all-MiniLM-L6-v2, offline)")
    budget = ap.add_mutually_exclusive_group()
    budget.add_argument("--recover-seconds", type=float, default=None, metavar="S",
                        help="distillation budget of every point, wall time (default: the preset's, 60 s for quick)")
    budget.add_argument("--total-minutes", type=float, default=None, metavar="M",
                        help=f"choose the recovery budget per point so that the whole run takes about M minutes "
                             f"(estimating {POINT_S:g} s per point and {SETUP_S:g} s of set-up besides recovery)")
    ap.add_argument("--patterns", default=None, help=f"comma list of {list(PATTERNS)} (default: the preset's)")
    ap.add_argument("--sparsities", default=None, help="comma list of numbers in (0, 1) (default: the preset's)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: the preset's, 2)")
    ap.add_argument("--out", default="bench-out", help="output folder (default: bench-out/)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--report", metavar="CSV", help="only write atlas.md and atlas.png again from this atlas.csv")
    args = ap.parse_args(argv)
    if args.report:
        if not os.path.isfile(args.report):
            ap.error(f"--report {args.report!r}: no such file (expected an atlas.csv)")
        rows = read_csv(args.report)
        os.makedirs(args.out, exist_ok=True)
        for path in write_outputs(rows, args.out, budget=_budget_of(rows)):
            print(f"wrote {path}")
        return 0
    p = PRESETS["tiny" if args.smoke else args.preset]
    try:
        if args.patterns is not None:
            p = replace(p, patterns=tuple(x.strip() for x in args.patterns.split(",")))
        if args.sparsities is not None:
            p = replace(p, sparsities=tuple(_floats(args.sparsities, "--sparsities")))
        check_plan(p.patterns, p.sparsities)
        if args.threads is not None:
            if args.threads < 1:
                raise ValueError(f"--threads must be >= 1, got {args.threads}")
            p = replace(p, threads=args.threads)
        if args.recover_seconds is not None:
            if not args.recover_seconds > 0:
                raise ValueError(f"--recover-seconds must be > 0, got {args.recover_seconds:g}")
            p = replace(p, recover_seconds=args.recover_seconds)
        if args.total_minutes is not None:
            p = replace(p, recover_seconds=recovery_for(args.total_minutes, len(p.patterns) * len(p.sparsities)))
    except ValueError as exc:
        ap.error(str(exc))
    tune_malloc_from_env()  # dense and sparse models alike (sparse/runtime.py)
    from sparse.cli import CLIError

    n = len(p.patterns) * len(p.sparsities)
    print(f"atlas: {n} points, {budget_text(p)}; expect about "
          f"{(SETUP_S + n * (POINT_S + p.recover_seconds)) / 60:.0f} min for all-MiniLM-L6-v2 on 2 cores",
          file=sys.stderr, flush=True)
    start = time.monotonic()
    try:
        rows, skipped = run(p, args.out, model=args.model, progress=not args.no_progress)
    except (CLIError, ValueError) as exc:
        ap.error(str(exc))
    minutes = (time.monotonic() - start) / 60
    text = f"{budget_text(p)}, {minutes:.1f} min in all"
    written = [os.path.join(args.out, "atlas.csv")] + write_outputs(rows, args.out, skipped, text)
    print(markdown(rows, skipped, text))
    print("\n".join(f"wrote {x}" for x in written))
    return 1 if skipped else 0


if __name__ == "__main__":
    sys.exit(main())
