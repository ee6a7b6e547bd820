"""End-to-end: a BERT-base encoder (``transformers.BertModel(BertConfig())``, random weights, no downloads) at
sequence 128, dense vs sparsified, forward (inference) and one training step (forward + backward).

    python -m benchmarks.e2e_bert --preset quick     # batch 8, 90% block-32 and balanced
    python -m benchmarks.e2e_bert --preset full      # batch 1 and 8, 50/75/90%
    python -m benchmarks.e2e_bert --preset block     # the block-32 targets (fp32, int8, bf16) with the peers
    python -m benchmarks.e2e_bert --preset patterns  # 90% balanced and unstructured against DeepSparse

Dense contenders: eager fp32 and bf16; every Linear through oneDNN with a pre-packed weight
(``sparse.evaluate.prepack_linears``, inference only; the fastest dense fp32 path where eager ``F.linear`` takes
MKL's path, as on AMD EPYC); ``torch.compile`` fp32 and bf16 with ``torch._inductor.config.freezing`` (inference
only).
Attention is a third to a half of the sparse model's time: each model (dense and sparse alike) is timed with
``transformers``' ``sdpa`` and ``eager`` attention, with SDPA's CPU backends forced (``sdpa_math``,
``sdpa_flash``) and with our kernel (``sparsekern``: ``sparse.ops.attention``; ``sparse.evaluate.pick_attention``)
and keeps the fastest, as its
user would; the ``notes`` column names the choice and every time. Sparse contenders:
``sparse.sparsify`` on every Linear of the encoder layers (the pooler stays dense), unfused, with the GELU fused
(``:fused``) and, block only, also with each attention's query, key and value as one op (``:fused+qkv``), and
with the residual add and LayerNorm after each output projection as one op besides (``:fused+qkv+ln``). Rows
use the harness schema; ``tokens`` = batch x sequence. ``<out>/e2e_profile.md`` has the time split (Linear layers
vs the rest) from torch.profiler.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

import sparse
from sparse.evaluate import attention_of, pick_attention, prepack_linears
from sparse.runtime import cpu_model, dtype_support, native_dtype, onednn_unsupported

from . import peers
from .harness import Contender, make_rows, measure, threads, write_csv

SEQ = 128
DTYPE = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class Preset:
    batches: List[int]
    train_batches: List[int]
    sparsities: List[float]
    patterns: List[str]  # "block" (32x32) | "balanced" (bank 32) | "unstructured" (1x1 blocks, by magnitude)
    compile: bool
    bf16_sparse: bool  # also a 90% block-32 model in bf16
    train_patterns: List[str]  # patterns also timed for the training step
    rounds: int
    threads: int = 2
    config: Optional[Dict[str, int]] = None  # BertConfig overrides (None: BERT-base)
    peers: bool = True  # other runtimes (benchmarks.peers) as contenders, where configured
    aoti: bool = False  # an AOTInductor package of the fused fp32 block model at the top sparsity (minutes to build)
    int8: bool = True  # the fused block model at the top sparsity quantized to int8 (sparse.quant), and ORT's INT8


PRESETS: Dict[str, Preset] = {
    "quick": Preset(batches=[1, 8], train_batches=[8], sparsities=[0.9], patterns=["block", "balanced", "unstructured"],
                    compile=True, bf16_sparse=True, train_patterns=["block"], rounds=5, aoti=True),
    "full": Preset(batches=[1, 8], train_batches=[8], sparsities=[0.5, 0.75, 0.9],
                   patterns=["block", "balanced", "unstructured"],
                   compile=True, bf16_sparse=True, train_patterns=["block", "balanced"], rounds=5, aoti=True),
    # The block-32 targets of the whole-model and INT8 issues only: BERT-base at 90%, inference, the fused stacks
    # eager, compiled and as AOTInductor packages, int8, bf16 (where native), and the peers (DeepSparse on the same
    # weights, ONNX Runtime fp32 and INT8).
    "block": Preset(batches=[1, 8], train_batches=[], sparsities=[0.9], patterns=["block"], compile=True,
                    bf16_sparse=True, train_patterns=[], rounds=5, aoti=True),
    # The balanced and unstructured targets of the patterns issue: BERT-base at 90%, inference, eager (each model with
    # its fastest attention), DeepSparse on the same weights; no compile, bf16 or int8 contenders.
    "patterns": Preset(batches=[1, 8], train_batches=[], sparsities=[0.9], patterns=["balanced", "unstructured"],
                       compile=False, bf16_sparse=False, train_patterns=[], rounds=5, int8=False),
    # Seconds-long run for the smoke test: a toy 1-layer encoder, no torch.compile (numbers mean nothing).
    "tiny": Preset(batches=[1], train_batches=[1], sparsities=[0.75], patterns=["block", "balanced", "unstructured"],
                   compile=False,
                   bf16_sparse=False, train_patterns=["block", "balanced"], rounds=2,
                   config=dict(hidden_size=128, num_hidden_layers=1, num_attention_heads=2, intermediate_size=256,
                               vocab_size=512), peers=False),
}


def build_model(config: Optional[Dict[str, int]] = None) -> nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return BertModel(BertConfig(**(config or {}))).eval()


def _encoder_linear(name: str, module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and name.startswith("encoder.")


def sparsify(model: nn.Module, pattern: str, sparsity: float, fuse: Union[bool, str] = False) -> nn.Module:
    """A sparsified deep copy: every encoder Linear becomes block-32 (``"block"``), balanced bank-32 with
    ``keep = round(32 (1 - sparsity))`` (``"balanced"``) or unstructured (``"unstructured"``: the largest weights of
    each layer, 1x1 blocks), kept sparse even where a layer measures slower; ``fuse``: the GELU after the
    intermediate Linear runs in the sparse kernel's output stage; ``"qkv"``: that, and each attention's query, key
    and value as one sparse op (``fuse_qkv``, not timed: always fused); ``"ln"``: that, and the residual add and
    LayerNorm after each output projection as one op (``fuse_layernorm``); ``"int8"``: ``"ln"`` with int8 weights."""
    model = copy.deepcopy(model)
    sparse.sparsify(model, pattern=pattern, sparsity=sparsity, block=32, bank=32, include=_encoder_linear,
                    skip_if_slower=False, fuse_activations=bool(fuse), fuse_qkv=fuse in ("qkv", "ln", "int8"),
                    fuse_layernorm=fuse in ("ln", "int8"), quantize="int8" if fuse == "int8" else None)
    return model


def _fused_label(fuse: Union[bool, str]) -> Tuple[str, str]:
    """(contender name suffix, backend suffix) of a sparse model's fusions."""
    if fuse == "qkv":
        return ":fused+qkv", "(fused gelu+qkv)"
    if fuse == "ln":
        return ":fused+qkv+ln", "(fused gelu+qkv+add-layernorm)"
    if fuse == "int8":
        return ":fused+qkv+ln:int8", "(fused gelu+qkv+add-layernorm, int8)"
    return (":fused", "(fused gelu)") if fuse else ("", "")


def _pattern_info(pattern: str, sparsity: float) -> Dict[str, object]:
    if pattern == "block":
        return {"format": "bsr", "block": "32x32", "sparsity": sparsity}
    if pattern == "unstructured":
        return {"format": "unstructured", "block": "1x1", "sparsity": sparsity}
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
    """``sparse.compile`` of a copy of ``model``: ``torch.compile`` with weight freezing (Inductor folds the dense
    weights and pre-packs them for oneDNN, and fuses what lies between the sparse ops).

    Every model compiled here runs the same ``forward`` code of transformers, and dynamo keeps at most
    ``recompile_limit`` (8) compiled versions of one code object before it silently runs it eagerly: one run
    compiles more models than that (4 per batch), so the limit is raised for the benchmark's process."""
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
    return forward_fn(sparse.compile(copy.deepcopy(model)), ids)


def aoti_forward(model: nn.Module, ids: torch.Tensor, tmp: str) -> Callable[[], torch.Tensor]:
    """``model`` through ``torch.export`` and ``torch._inductor.aoti_compile_and_package`` (built for ``ids``'s
    shape), loaded back as a serving process would load it."""
    with torch.no_grad():
        program = torch.export.export(peers.LastHidden(model).eval(), (ids,))
        path = torch._inductor.aoti_compile_and_package(
            program, package_path=os.path.join(tmp, f"aoti_{id(model)}_{ids.shape[0]}.pt2"))
    run = torch._inductor.aoti_load_package(path)

    def call():
        with torch.no_grad():
            return run(ids)

    return call


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]}"


def _peer_models(base: nn.Module, sparse_models: Dict[tuple, nn.Module], top: float, skipped: List[str],
                 tmp: str) -> Dict[str, Tuple[str, Dict[str, object]]]:
    """The ONNX files the peers run: {label: (path, row info)}: the dense model and the unfused fp32 sparse models
    at the top sparsity, their pruned weights as zeros. Empty (and a line in ``skipped``) without ``onnx``."""
    files: Dict[str, Tuple[str, Dict[str, object]]] = {}
    todo = [("dense", base, {"format": "dense", "block": "", "density": 1.0})]
    for pattern in ("block", "balanced", "unstructured"):
        m = sparse_models.get((pattern, top, "float32", False))
        if m is not None:
            todo.append((f"{pattern}:{top}", sparse.densify(m), _pattern_info(pattern, top)))
    for label, model, info in todo:
        try:
            path = os.path.join(tmp, label.replace(":", "_") + ".onnx")
            files[label] = (peers.export_bert(model, 1, SEQ, path), info)
        except ImportError as exc:
            skipped.append(f"peers: not run: exporting the model to ONNX needs the onnx package here ({exc})")
            return {}
        except Exception as exc:  # one model that does not export must not lose the others
            skipped.append(f"peers: export of the {label} model failed: {_first_line(exc)}")
    return files


# Which of the exported models each runtime runs: ONNX Runtime and OpenVINO take no advantage of zeros (their
# dense time is their time on any pruned weights); DeepSparse's point is sparsity.
PEER_MODELS = {"onnxruntime": ("dense",), "openvino": ("dense",),
               "deepsparse": ("dense", "block:", "balanced:", "unstructured:")}


def _start_peers(pythons: Dict[str, str], files: Dict[str, Tuple[str, Dict[str, object]]], batch: int,
                 vocab: int, p: Preset, hidden: Tuple[int, int], skipped: List[str]):
    """One :class:`peers.Peer` per (runtime, model) for this batch, with its row info: [(name, peer, info)]."""
    out = []
    for runtime, python in pythons.items():
        for label, (path, info) in files.items():
            if not any(label == m or (m.endswith(":") and label.startswith(m)) for m in PEER_MODELS[runtime]):
                continue
            extra = ["--bert-fusions", "--num-heads", str(hidden[1]), "--hidden-size", str(hidden[0])] if (
                runtime == "onnxruntime") else []
            # ONNX Runtime's dense INT8 (its dynamic quantization) beside the int8 sparse model
            variants = [("", extra, info)]
            if runtime == "onnxruntime" and label == "dense" and p.int8:
                variants.append((":int8", extra + ["--quantize-int8"], {**info, "format": "dense-int8"}))
            for tag, args, row in variants:
                try:
                    peer = peers.Peer(runtime, python, path, batch=batch, seq=SEQ, vocab=vocab, threads=p.threads,
                                      extra=args)
                except Exception as exc:  # a peer that cannot start is reported, not fatal
                    skipped.append(f"{runtime} {label}{tag} batch {batch}: not run: {_first_line(exc)}")
                    continue
                notes = ", ".join(f"{k} {v}" for k, v in peer.info.items() if k not in ("runtime", "version"))
                out.append((f"{runtime}:{label}{tag}", peer, {**row, "backend": f"{runtime} {peer.info['version']}",
                                                              "dtype": "float32", "notes": notes}))
    return out


def run(p: Preset, out_dir: str, progress: bool = True) -> Tuple[List[dict], List[str]]:
    from tqdm.auto import tqdm

    skipped: List[str] = []
    rows: List[dict] = []
    path = os.path.join(out_dir, "e2e_bert.csv")
    base = build_model(p.config)
    shape = f"BERT-base seq {SEQ}" if p.config is None else f"BERT {p.config} seq {SEQ}"
    jobs = [("bert_forward", b) for b in p.batches] + [("bert_train_step", b) for b in p.train_batches]
    # (pattern, sparsity, dtype, fusions: False, True (GELU in the sparse kernel's output stage) or "qkv" (that,
    # and query, key and value as one op: block only, where it measured faster at 1 and 2 threads;
    # docs/measurements.md))
    wanted = [(pattern, s, "float32", False) for pattern in p.patterns for s in p.sparsities]
    top = max(p.sparsities)
    # Without native bf16 arithmetic every bf16 model runs torch's emulated bf16 ops, several times slower than
    # fp32: the bf16 contenders would take most of the run and compare nothing a user of this CPU should pick.
    bf16_ok = native_dtype(torch.bfloat16)
    if not bf16_ok:
        skipped.append(f"bfloat16 contenders: not run: {dtype_support()['bfloat16']['why']} on this CPU "
                       f"({cpu_model()}); float32 is the fast dtype here")
    for pattern in p.patterns:
        wanted.append((pattern, top, "float32", True))
    if "block" in p.patterns:
        wanted.append(("block", top, "float32", "qkv"))
        wanted.append(("block", top, "float32", "ln"))
    if "block" in p.patterns and p.int8:
        wanted.append(("block", top, "float32", "int8"))
    if "block" in p.patterns and p.bf16_sparse and bf16_ok:
        wanted.append(("block", top, "bfloat16", True))
    sparse_models: Dict[Tuple[str, float, str, Union[bool, str]], nn.Module] = {}
    for key in wanted:
        try:
            sparse_models[key] = sparsify(base, key[0], key[1], fuse=key[3]).to(DTYPE[key[2]])
        except Exception as exc:  # one pattern that cannot be built must not lose the others
            skipped.append(f"sparsify {key}: {_first_line(exc)}")
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
    pythons: Dict[str, str] = {}
    if p.peers:
        try:
            pythons = peers.configured()
        except ValueError as exc:
            skipped.append(f"peers: not run: SPARSEKERN_PEERS: {exc}")
        skipped += peers.missing(pythons)
    tmp = tempfile.mkdtemp(prefix="e2e-onnx-")
    peer_files = _peer_models(base, sparse_models, top, skipped, tmp) if pythons else {}
    hidden = (base.config.hidden_size, base.config.num_attention_heads)
    profile_lines: List[str] = []
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
                if training and (dt != "float32" or pattern not in p.train_patterns or (fuse and pattern != "block")
                                 or fuse == "int8"):  # int8 layers are inference only
                    continue
                m.train(training)
                suffix, how = _fused_label(fuse)
                info = {**_pattern_info(pattern, s), "backend": "sparse.sparsify" + how, "dtype": dt}
                if fuse == "int8":
                    info["format"] = "bsr-int8"
                entries.append((f"{pattern}:{s}:{dt}{suffix}", m, info))
            # Each model gets the fastest attention implementation for itself (transformers' sdpa and eager, SDPA
            # with its math or flash CPU backend forced), as its user would pick (a compiled model keeps the one of
            # the eager model it was compiled from).
            cs: List[Contender] = []
            attention: Dict[int, str] = {}
            for name, m, info in entries:
                try:
                    winner, secs = pick_attention(m, make(m, ids))
                except Exception as exc:  # a contender that fails is reported, not fatal
                    skipped.append(f"{op} batch {batch} {name}: {_first_line(exc)}")
                    continue
                attention[id(m)] = winner
                times = ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in secs.items())
                cs.append(Contender(name, make(m, ids), {**info, "notes": f"attention {winner} ({times})"}))
            compiled: Dict[str, Callable[[], torch.Tensor]] = {}
            if not training and p.compile:
                # torch.compile (freezing) of the dense models and of the fused fp32 sparse ones at the top
                # sparsity: Inductor fuses the remainder around the sparse ops.
                todo = [(f"compile_{dt}", dense, {**dense_info, "backend": "torch.compile(freezing)", "dtype": dt})
                        for dt, dense in dense_models]
                todo += [(f"compile_{pattern}:{s}:{dt}:fused", m,
                          {**_pattern_info(pattern, s), "backend": "sparse.compile(fused gelu)", "dtype": dt})
                         for (pattern, s, dt, fuse), m in sparse_models.items()
                         if fuse is True and s == top and dt == "float32"]
                todo += [(f"compile_{pattern}:{s}:{dt}:fused+qkv+ln" + (":int8" if fuse == "int8" else ""), m,
                          {**_pattern_info(pattern, s), "dtype": dt,
                           **({"backend": "sparse.compile(fused gelu+qkv+add-layernorm, int8)", "format": "bsr-int8"}
                              if fuse == "int8" else {"backend": "sparse.compile(fused gelu+qkv+add-layernorm)"})})
                         for (pattern, s, dt, fuse), m in sparse_models.items()
                         if fuse in ("ln", "int8") and s == top and dt == "float32"]
                for name, m, info in todo:
                    try:
                        compiled[name] = compiled_forward(m, ids)
                        notes = f"attention {attention.get(id(m), '?')} (of the eager model)"
                        cs.append(Contender(name, compiled[name], {**info, "notes": notes}))
                    except Exception as exc:  # an inductor failure must not lose the rest of the run
                        skipped.append(f"{op} batch {batch} torch.compile {name}: {_first_line(exc)}")
            if not training and p.aoti:
                # The fused block models as AOTInductor packages (no Python, no guards on a call): GELU fused, and
                # GELU + QKV + add-LayerNorm fused in fp32 and int8 (their backends name the fusions, as the
                # sparse.compile rows do, so that the int8 table finds the fp32 twin run the same way).
                for fuse, suffix, extra in ((True, "fused", {"backend": "AOTInductor package"}),
                                            ("ln", "fused+qkv+ln", {
                                                "backend": "AOTInductor package(fused gelu+qkv+add-layernorm)"}),
                                            ("int8", "fused+qkv+ln:int8", {
                                                "backend": "AOTInductor package(fused gelu+qkv+add-layernorm, int8)",
                                                "format": "bsr-int8"})):
                    key = ("block", top, "float32", fuse)
                    if key not in sparse_models:
                        continue
                    name = f"aoti_block:{top}:float32:{suffix}"
                    try:
                        cs.append(Contender(name, aoti_forward(sparse_models[key], ids, tmp),
                                            {**_pattern_info("block", top), "dtype": "float32", **extra,
                                             "notes": f"torch.export + aoti_compile_and_package; attention "
                                                      f"{attention.get(id(sparse_models[key]), '?')}"}))
                    except Exception as exc:  # reported, not fatal
                        skipped.append(f"{op} batch {batch} AOTInductor {name}: {_first_line(exc)}")
            running = [] if training else _start_peers(pythons, peer_files, batch, base.config.vocab_size, p,
                                                       hidden, skipped)
            cs += [Contender(name, peer, info) for name, peer, info in running]
            try:
                ok = []
                for c in cs:  # the warm-up call (it compiles too); a contender that fails is reported, not fatal
                    try:
                        c.fn()
                        ok.append(c)
                    except Exception as exc:
                        skipped.append(f"{op} batch {batch} {c.name}: {_first_line(exc)}")
                # Each sample follows an untimed call of the same model, as in every other benchmark: a sparse
                # model's weights about fill the last-level cache that a dense contender's flush, so a sample
                # taken right after another contender measures the refill and varies from run to run
                # (docs/measurements.md).
                timings = measure(ok, rounds=p.rounds, min_sample_s=0.0, warmup=0, presample_call=True)
                base.eval()
                common = {"op": op, "shape": shape, "tokens": batch * SEQ, "threads": p.threads, "weights": "hot",
                          "out_features": base.config.hidden_size, "in_features": base.config.hidden_size}
                case = f"{op}|batch{batch}|seq{SEQ}|{p.threads}t"
                rows += make_rows("e2e_bert", case, common, ok, timings, "eager_fp32")
                if not training:
                    by_name = {c.name: c for c in ok}
                    split = _profile_case(p, batch, ids, entries, compiled, running, by_name, top, skipped)
                    profile_lines += _profile_markdown(split, batch, p)
                    rows += _remainder_rows(split, common, f"{op}_remainder|batch{batch}|seq{SEQ}|{p.threads}t")
            finally:
                for _, peer, _ in running:
                    peer.close()
            write_csv(path, rows)
    _write_profile(profile_lines, p, out_dir)
    return rows, skipped


# Self-time buckets of torch.profiler's op names: our sparse ops, dense Linear kernels, attention, the rest.
DENSE_LINEAR_OPS = ("aten::addmm", "aten::mm", "mkldnn::_linear_pointwise", "mkl::_mkl_linear", "aten::linear")
ATTENTION_OPS = ("aten::_scaled_dot_product", "aten::bmm", "aten::baddbmm", "aten::_softmax", "aten::softmax",
                 "aten::_safe_softmax", "aten::matmul", "sparsekern::attention")
# ONNX Runtime op types that are a Linear or a matmul (the ones the remainder target leaves out). The profile
# (benchmarks/peer_runner.py) names a MatMul between two activations (Q K^T, P V) "MatMul:attention": attention,
# as torch's bmm / matmul / SDPA are on our side.
ORT_MATMUL_OPS = ("MatMul", "Gemm", "FusedMatMul", "MatMulInteger", "DynamicQuantizeMatMul")
# ONNX Runtime's attention: its fused contrib ops (BERT fusions), else the softmax and the attention matmuls.
ORT_FUSED_ATTENTION_OPS = ("Attention", "MultiHeadAttention")
ORT_ATTENTION_OPS = ORT_FUSED_ATTENTION_OPS + ("Softmax",)


def ort_attention_ms(ops: Dict[str, float]) -> float:
    """ONNX Runtime's attention time (ms) from its profile: fused attention ops, softmax, attention matmuls."""
    return sum(v for k, v in ops.items() if k in ORT_ATTENTION_OPS or k.endswith(":attention"))


@dataclass
class Split:
    """Where one forward's time goes (ms): ``total`` and buckets; ``top`` the largest ops."""

    name: str
    total: float
    linear: float  # our sparse ops plus dense Linear kernels (ORT: MatMul/Gemm)
    ours: float
    attention: float
    top: List[Tuple[str, float]]
    attn_impl: str = ""
    info: Dict[str, object] = field(default_factory=dict)  # the row columns of the model (format, block, ...)

    @property
    def remainder(self) -> float:
        return self.total - self.linear


def _torch_split(name: str, fn: Callable[[], object], attn_impl: str, info: Dict[str, object]) -> Split:
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = [(e.key, e.self_cpu_time_total / 1e3) for e in prof.key_averages()]
    # our Linear ops; sparsekern::residual_layer_norm (the fused add + LayerNorm) is remainder work, as aten's are
    ours = sum(t for k, t in events if k.startswith("sparsekern::") and "linear" in k)
    dense = sum(t for k, t in events if k in DENSE_LINEAR_OPS)
    attn = sum(t for k, t in events if k.startswith(ATTENTION_OPS))
    total = sum(t for _, t in events)
    return Split(name, total, ours + dense, ours, attn, sorted(events, key=lambda e: -e[1])[:8], attn_impl, info)


def _profile_case(p: Preset, batch: int, ids: torch.Tensor, entries, compiled, running, by_name, top: float,
                  skipped: List[str]) -> List[Split]:
    """The time split of the dense fp32 models, the fp32 sparse models at the top sparsity (eager and compiled)
    and ONNX Runtime (from its own profiler), for one batch."""
    out: List[Split] = []
    for name, m, info in entries:
        if name not in by_name or info["dtype"] != "float32":
            continue
        if info["format"] != "dense" and float(info.get("sparsity") or 1 - float(info["density"])) < top - 1e-9:
            continue
        out.append(_torch_split(name, forward_fn(m, ids), attention_of(m) or "?", info))
    for name, fn in compiled.items():
        if name in by_name and "float32" in name:
            out.append(_torch_split(name, fn, "compiled", by_name[name].info))
    for name, peer, info in running:
        if peer.runtime != "onnxruntime" or name not in by_name:
            continue
        try:
            ops = peer.profile(3)
        except Exception as exc:  # only the profile is lost
            skipped.append(f"{name} batch {batch}: profile failed: {_first_line(exc)}")
            continue
        mm = sum(v for k, v in ops.items() if k in ORT_MATMUL_OPS)
        fused = any(k in ORT_FUSED_ATTENTION_OPS for k in ops)
        out.append(Split(name, sum(ops.values()), mm, 0.0, ort_attention_ms(ops),
                         sorted(ops.items(), key=lambda e: -e[1])[:8],
                         "ORT fusions: " + ("fused Attention" if fused else "attention unfused"), info))
    return out


def _profile_markdown(split: Sequence[Split], batch: int, p: Preset) -> List[str]:
    lines = [f"## Batch {batch}, seq {SEQ}, {p.threads} threads", "",
             "| model | attention | total ms | our sparse ops | all Linear/MatMul | attention | the rest | remainder "
             "(total - Linear/MatMul) |", "|---|---|---|---|---|---|---|---|"]
    for s in split:
        rest = s.total - s.linear - s.attention
        lines.append(f"| {s.name} | {s.attn_impl} | {s.total:.1f} | {s.ours:.1f} | {s.linear:.1f} | "
                     f"{s.attention:.1f} | {rest:.1f} | {s.remainder:.1f} |")
    lines.append("")
    lines += attention_gap(split, batch)
    for s in split:
        lines.append(f"- {s.name}, largest self times: " + ", ".join(f"{k} {t:.1f}" for k, t in s.top[:6]))
    return lines + [""]


def attention_gap(split: Sequence[Split], batch: int) -> List[str]:
    """The distance of our attention from ONNX Runtime's, stated: its attention ms, and each of our profiled
    models' attention ms and ratio to it (> 1: ours slower)."""
    ort = next((s for s in split if s.name.startswith("onnxruntime:")), None)
    if ort is None:
        return [f"**Attention against ONNX Runtime, batch {batch}**: not measured (ONNX Runtime did not run in this "
                "case: not installed, peers off in this preset, or its start failed; see summary.md).", ""]
    if ort.attention <= 0:
        return [f"**Attention against ONNX Runtime, batch {batch}**: its profile shows no attention op "
                f"(ops: {', '.join(k for k, _ in ort.top)}).", ""]
    how = ("its fused Attention op" if "fused Attention" in ort.attn_impl else
           "softmax and attention MatMuls: its BERT optimizer left this export's attention unfused")
    lines = [f"**Attention against ONNX Runtime, batch {batch}**: {ort.name} {ort.attention:.1f} ms ({how}); "
             "ours / theirs (> 1: ours slower):", ""]
    for s in split:
        if s is ort or s.name.startswith(("onnxruntime:", "deepsparse:", "openvino:")):
            continue
        note = " (compiled: attention partly inside Inductor's fused kernels, counted in the rest)" if (
            s.attn_impl == "compiled") else ""
        lines.append(f"- {s.name} (`{s.attn_impl}`): {s.attention:.1f} ms, **{s.attention / ort.attention:.2f}x** "
                     f"ONNX Runtime's{note}")
    return lines + [""]


def _remainder_rows(split: Sequence[Split], common: Dict[str, object], case: str) -> List[dict]:
    """Rows (op ``bert_forward_remainder``) holding each profiled model's remainder (its time outside Linear and
    MatMul kernels) as ``median_s``, against ONNX Runtime's remainder where it ran (else the first model's)."""
    from .harness import Timing

    if not split:
        return []
    base = next((s for s in split if s.name.startswith("onnxruntime:")), split[0])
    contenders = [Contender(s.name, lambda: None, {**s.info, "backend": s.name, "dtype": "float32",
                                                   "notes": f"profiled: total {s.total:.1f} ms, Linear/MatMul "
                                                            f"{s.linear:.1f} ms"}) for s in split]
    timings = {s.name: Timing(s.remainder / 1e3, s.remainder / 1e3, s.remainder / 1e3, 1) for s in split}
    return make_rows("e2e_bert", case, {**common, "op": f"{common['op']}_remainder"}, contenders, timings, base.name)


def _write_profile(lines: List[str], p: Preset, out_dir: str) -> str:
    head = [f"# BERT forward time split (torch.profiler; ONNX Runtime: its own profiler), {p.threads} threads", "",
            "Self times of one profiled forward per model, in ms. *Our sparse ops*: `sparsekern::*linear*` (the "
            "fused add + LayerNorm, `sparsekern::residual_layer_norm`, counts in the rest); *all "
            "Linear/MatMul*: those plus dense Linear kernels (ONNX Runtime: MatMul, Gemm, FusedMatMul); "
            "*attention*: SDPA, bmm, softmax (ONNX Runtime: Attention / MultiHeadAttention, Softmax and the MatMuls "
            "between two activations, which leave its Linear/MatMul column); a compiled model's fused "
            "Inductor kernels count in *the rest*. Under each table: our attention against ONNX Runtime's.", ""]
    path = os.path.join(out_dir, "e2e_profile.md")
    with open(path, "w") as f:
        f.write("\n".join(head + lines))
    return path


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--no-compile", action="store_true", help="leave out the torch.compile contender")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--compare", metavar="OLD_DIR", help="an earlier run's output folder (or e2e_bert.csv): "
                    "compare.md, each row new/old, flagged where its ratio to eager fp32 dropped by more than 10%%")


def preset_from_args(args: argparse.Namespace) -> Preset:
    p = PRESETS[args.preset]
    return replace(p, compile=False) if args.no_compile else p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from sparse.runtime import tune_malloc_from_env

    from .report import read_run, write_comparison, write_report

    tune_malloc_from_env()  # dense and sparse models alike: see sparse/runtime.py
    ap = argparse.ArgumentParser(prog="benchmarks.e2e_bert", description=__doc__.split("\n\n")[0])
    add_arguments(ap)
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    old = None
    if args.compare:  # read now: the run may write over it (the same --out)
        try:
            old = read_run(args.compare)
        except (OSError, ValueError) as exc:
            ap.error(f"--compare {args.compare}: {exc}")
    rows, skipped = run(preset_from_args(args), args.out, progress=not args.no_progress)
    written = [os.path.join(args.out, "e2e_bert.csv")] + write_report(rows, args.out, skipped=skipped, plots=False)
    if old is not None:
        written.append(write_comparison(rows, old, args.out, args.compare)[0])
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
