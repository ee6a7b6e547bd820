"""End-to-end: a BERT-base encoder (``transformers.BertModel(BertConfig())``, random weights, no downloads) at
sequence 128, dense vs sparsified, forward (inference) and one training step (forward + backward).

    python -m benchmarks.e2e_bert --preset quick     # batch 8, 90% block-32 and balanced
    python -m benchmarks.e2e_bert --preset full      # batch 1 and 8, 50/75/90%

Dense contenders: eager fp32 and bf16; every Linear through oneDNN with a pre-packed weight
(``sparse.evaluate.prepack_linears``, inference only; the fastest dense fp32 path where eager ``F.linear`` takes
MKL's path, as on AMD EPYC); ``torch.compile`` fp32 and bf16 with ``torch._inductor.config.freezing`` (inference
only).
Attention is not this package's business, but it is a third to a half of the sparse model's time: each model
(dense and sparse alike) is timed with ``transformers``' ``sdpa`` and ``eager`` attention and keeps the faster, as
its user would; the ``notes`` column names the choice and both times. Sparse contenders:
``sparse.sparsify`` on every Linear of the encoder layers (the pooler stays dense). Rows use the harness schema;
``tokens`` = batch x sequence. ``<out>/e2e_profile.md`` has the time split (Linear layers vs the rest) from
torch.profiler.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

import sparse
from sparse.evaluate import pick_attention, prepack_linears
from sparse.runtime import cpu_model, dtype_support, native_dtype, onednn_unsupported

from .harness import Contender, make_rows, measure, threads, write_csv

SEQ = 128
DTYPE = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class Preset:
    batches: List[int]
    train_batches: List[int]
    sparsities: List[float]
    patterns: List[str]  # "block" (32x32) | "balanced" (bank 32)
    compile: bool
    bf16_sparse: bool  # also a 90% block-32 model in bf16
    train_patterns: List[str]  # patterns also timed for the training step
    rounds: int
    threads: int = 2
    config: Optional[Dict[str, int]] = None  # BertConfig overrides (None: BERT-base)


PRESETS: Dict[str, Preset] = {
    "quick": Preset(batches=[8], train_batches=[8], sparsities=[0.9], patterns=["block", "balanced"], compile=True,
                    bf16_sparse=True, train_patterns=["block"], rounds=5),
    "full": Preset(batches=[1, 8], train_batches=[8], sparsities=[0.5, 0.75, 0.9], patterns=["block", "balanced"],
                   compile=True, bf16_sparse=True, train_patterns=["block", "balanced"], rounds=5),
    # Seconds-long run for the smoke test: a toy 1-layer encoder, no torch.compile (numbers mean nothing).
    "tiny": Preset(batches=[1], train_batches=[1], sparsities=[0.75], patterns=["block", "balanced"], compile=False,
                   bf16_sparse=False, train_patterns=["block", "balanced"], rounds=2,
                   config=dict(hidden_size=128, num_hidden_layers=1, num_attention_heads=2, intermediate_size=256,
                               vocab_size=512)),
}


def build_model(config: Optional[Dict[str, int]] = None) -> nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return BertModel(BertConfig(**(config or {}))).eval()


def _encoder_linear(name: str, module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and name.startswith("encoder.")


def sparsify(model: nn.Module, pattern: str, sparsity: float, fuse: bool = False) -> nn.Module:
    """A sparsified deep copy: every encoder Linear becomes block-32 (``"block"``) or balanced bank-32 with
    ``keep = round(32 (1 - sparsity))`` (``"balanced"``), kept sparse even where a layer measures slower;
    ``fuse``: the GELU after the intermediate Linear runs in the sparse kernel's output stage."""
    model = copy.deepcopy(model)
    sparse.sparsify(model, pattern=pattern, sparsity=sparsity, block=32, bank=32, include=_encoder_linear,
                    skip_if_slower=False, fuse_activations=fuse)
    return model


def _pattern_info(pattern: str, sparsity: float) -> Dict[str, object]:
    if pattern == "block":
        return {"format": "bsr", "block": "32x32", "sparsity": sparsity}
    keep = max(1, round(32 * (1 - sparsity)))
    return {"format": "balanced", "block": f"bank32/keep{keep}", "density": keep / 32}


def forward_fn(model: nn.Module, ids: torch.Tensor) -> Callable[[], torch.Tensor]:
    def run():
        with torch.no_grad():
            return model(input_ids=ids).last_hidden_state

    return run


def train_fn(model: nn.Module, ids: torch.Tensor) -> Callable[[], None]:
    """One training step without the optimizer: zero grads, forward, a scalar loss, backward."""

    def run():
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids).last_hidden_state
        out.float().pow(2).mean().backward()

    return run


def compiled_forward(model: nn.Module, ids: torch.Tensor) -> Callable[[], torch.Tensor]:
    """``torch.compile`` with weight freezing (inductor folds the weights and pre-packs them for oneDNN)."""
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    compiled = torch.compile(copy.deepcopy(model))
    return forward_fn(compiled, ids)


def run(p: Preset, out_dir: str, progress: bool = True) -> Tuple[List[dict], List[str]]:
    from tqdm.auto import tqdm

    skipped: List[str] = []
    rows: List[dict] = []
    path = os.path.join(out_dir, "e2e_bert.csv")
    base = build_model(p.config)
    shape = f"BERT-base seq {SEQ}" if p.config is None else f"BERT {p.config} seq {SEQ}"
    jobs = [("bert_forward", b) for b in p.batches] + [("bert_train_step", b) for b in p.train_batches]
    # (pattern, sparsity, dtype, GELU fused into the sparse kernel's output stage)
    wanted = [(pattern, s, "float32", False) for pattern in p.patterns for s in p.sparsities]
    top = max(p.sparsities)
    # Without native bf16 arithmetic every bf16 model runs torch's emulated bf16 ops, several times slower than
    # fp32: the bf16 contenders would take most of the run and compare nothing a user of this CPU should pick.
    bf16_ok = native_dtype(torch.bfloat16)
    if not bf16_ok:
        skipped.append(f"bfloat16 contenders: not run: {dtype_support()['bfloat16']['why']} on this CPU "
                       f"({cpu_model()}); float32 is the fast dtype here")
    if "block" in p.patterns:
        wanted.append(("block", top, "float32", True))
        if p.bf16_sparse and bf16_ok:
            wanted.append(("block", top, "bfloat16", True))
    sparse_models: Dict[Tuple[str, float, str, bool], nn.Module] = {}
    for key in wanted:
        try:
            sparse_models[key] = sparsify(base, key[0], key[1], fuse=key[3]).to(DTYPE[key[2]])
        except Exception as exc:  # one pattern that cannot be built must not lose the others
            skipped.append(f"sparsify {key}: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
    bf16 = copy.deepcopy(base).to(torch.bfloat16) if bf16_ok else None
    dense_models = [("float32", base)] + ([("bfloat16", bf16)] if bf16_ok else [])
    # oneDNN with pre-packed weights (GELU in its output stage): the best dense fp32 path where F.linear takes
    # MKL's path (AMD EPYC, for one)
    prepacked: Dict[str, nn.Module] = {}
    for dt, dense in dense_models:
        reason = onednn_unsupported(DTYPE[dt])
        if reason is not None:  # e.g. bf16 on a CPU without AVX512BW/VL/DQ: skipped, said in summary.md
            skipped.append(f"dense oneDNN pre-packed {dt}: not run on this CPU: {reason}")
            continue
        prepacked[dt] = copy.deepcopy(dense)
        prepack_linears(prepacked[dt])
    bar = tqdm(jobs, desc="e2e_bert", unit="case", disable=not progress, file=sys.stderr)
    with threads(p.threads):
        for op, batch in bar:
            bar.set_postfix_str(f"{op} batch {batch}", refresh=False)
            ids = torch.randint(0, base.config.vocab_size, (batch, SEQ), generator=torch.Generator().manual_seed(batch))
            training = op == "bert_train_step"
            make = train_fn if training else forward_fn
            base.train(training)
            dense_info = {"format": "dense", "block": "", "density": 1.0, "dense_ref": True}
            # (contender, the model it runs, info)
            entries: List[Tuple[str, nn.Module, Dict[str, object]]] = [
                ("eager_fp32", base, {**dense_info, "backend": "eager_fp32", "dtype": "float32"})]
            if not training:
                if bf16 is not None:
                    entries.append(("eager_bf16", bf16, {**dense_info, "backend": "eager_bf16", "dtype": "bfloat16"}))
                for dt, m in prepacked.items():
                    entries.append((f"onednn_{dt}", m, {**dense_info, "backend": "onednn_prepacked", "dtype": dt}))
            for (pattern, s, dt, fuse), m in sparse_models.items():
                if training and (dt != "float32" or pattern not in p.train_patterns):
                    continue
                m.train(training)
                info = {**_pattern_info(pattern, s), "backend": "sparse.sparsify" + ("(fused gelu)" if fuse else ""),
                        "dtype": dt}
                entries.append((f"{pattern}:{s}:{dt}" + (":fused" if fuse else ""), m, info))
            # Each model gets the faster of transformers' attention implementations for itself, as its user would
            # pick (a compiled model keeps the one of the eager model it was compiled from).
            cs: List[Contender] = []
            attention: Dict[int, str] = {}
            for name, m, info in entries:
                try:
                    winner, secs = pick_attention(m, make(m, ids))
                except Exception as exc:  # a contender that fails is reported, not fatal
                    skipped.append(f"{op} batch {batch} {name}: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
                    continue
                attention[id(m)] = winner
                times = ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in secs.items())
                cs.append(Contender(name, make(m, ids), {**info, "notes": f"attention {winner} ({times})"}))
            if not training:
                for dt, dense in dense_models if p.compile else ():
                    try:
                        cs.append(
                            Contender(
                                f"compile_{dt}",
                                compiled_forward(dense, ids),
                                {
                                    **dense_info,
                                    "backend": "torch.compile(freezing)",
                                    "dtype": dt,
                                    "notes": f"attention {attention.get(id(dense), '?')} (of the eager model)",
                                },
                            )
                        )
                    except Exception as exc:  # an inductor failure must not lose the rest of the run
                        skipped.append(f"{op} batch {batch} torch.compile {dt}: {type(exc).__name__}: {str(exc)[:160]}")
            ok = []
            for c in cs:  # the warm-up call (it compiles too); a contender that fails is reported, not fatal
                try:
                    c.fn()
                    ok.append(c)
                except Exception as exc:
                    skipped.append(
                        f"{op} batch {batch} {c.name}: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                    )
            # Each sample follows an untimed call of the same model, as in every other benchmark: a sparse model's
            # weights about fill the last-level cache that a dense contender's flush, so a sample taken right after
            # another contender measures the refill and varies from run to run (docs/measurements.md).
            timings = measure(ok, rounds=p.rounds, min_sample_s=0.0, warmup=0, presample_call=True)
            base.eval()
            common = {"op": op, "shape": shape, "tokens": batch * SEQ, "threads": p.threads, "weights": "hot",
                      "out_features": base.config.hidden_size, "in_features": base.config.hidden_size}
            rows += make_rows("e2e_bert", f"{op}|batch{batch}|seq{SEQ}|{p.threads}t", common, ok, timings, "eager_fp32")
            write_csv(path, rows)
    profiled = [("dense eager fp32", base)] + [
        (f"dense oneDNN pre-packed {'fp32' if dt == 'float32' else 'bf16'}", m) for dt, m in prepacked.items()]
    for (pattern, s, dt, fuse), m in sorted(sparse_models.items(), key=lambda kv: (kv[0][2] != "float32", kv[0][3])):
        if pattern == "block" and s == top:
            profiled.append((f"block-32 {100 * s:.0f}% {'fp32' if dt == 'float32' else 'bf16'}"
                             + (", GELU fused" if fuse else ", GELU separate"), m))
    profile_split(profiled, p, out_dir)
    return rows, skipped


def _linear_share(model: nn.Module, ids: torch.Tensor) -> Tuple[float, float, List[Tuple[str, float]]]:
    """(Linear-layer self time, total self time, top ops) of one forward, from torch.profiler (ms)."""
    from torch.profiler import ProfilerActivity, profile

    fn = forward_fn(model, ids)
    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = [(e.key, e.self_cpu_time_total / 1e3) for e in prof.key_averages()]
    linear_keys = ("aten::addmm", "aten::mm", "mkldnn::_linear_pointwise")
    lin = sum(t for k, t in events if k in linear_keys or k.startswith("sparsekern::"))
    total = sum(t for _, t in events)
    return lin, total, sorted(events, key=lambda e: -e[1])[:8]


def profile_split(models: Sequence[Tuple[str, nn.Module]], p: Preset, out_dir: str) -> str:
    """Writes ``e2e_profile.md``: where one forward's time goes (Linear layers, with a fused GELU, vs the rest) in
    each of ``models`` (name, model), each with the attention implementation it was last timed with."""
    batch = max(p.batches)
    vocab = models[0][1].config.vocab_size
    ids = torch.randint(0, vocab, (batch, SEQ), generator=torch.Generator().manual_seed(0))
    lines = [f"# BERT-base forward time split (torch.profiler, batch {batch}, seq {SEQ}, {p.threads} threads)", ""]
    with threads(p.threads):
        for name, m in models:
            lin, total, top = _linear_share(m.eval(), ids)
            attn = getattr(m.config, "_attn_implementation", None) or "?"
            lines += [
                f"## {name} ({attn} attention)",
                "",
                f"Linear layers: {lin:.1f} ms of {total:.1f} ms self time ({100 * lin / total:.0f}%); "
                f"the rest: {total - lin:.1f} ms.",
                "",
                "| op | self ms |",
                "|---|---|",
            ]
            lines += [f"| {k} | {t:.1f} |" for k, t in top] + [""]
    path = os.path.join(out_dir, "e2e_profile.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--no-compile", action="store_true", help="leave out the torch.compile contender")
    ap.add_argument("--no-progress", action="store_true")


def preset_from_args(args: argparse.Namespace) -> Preset:
    p = PRESETS[args.preset]
    return replace(p, compile=False) if args.no_compile else p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from sparse.runtime import tune_malloc_from_env

    from .report import write_report

    tune_malloc_from_env()  # dense and sparse models alike: see sparse/runtime.py
    ap = argparse.ArgumentParser(prog="benchmarks.e2e_bert", description=__doc__.split("\n\n")[0])
    add_arguments(ap)
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    rows, skipped = run(preset_from_args(args), args.out, progress=not args.no_progress)
    for path in [os.path.join(args.out, "e2e_bert.csv")] + write_report(rows, args.out, skipped=skipped, plots=False):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
