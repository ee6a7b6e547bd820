"""The patcher: replaces a model's dense Linear layers by sparse ones, in place, and reports what it did.

``sparsify`` handles ``nn.Linear`` (and subclasses that keep its forward) and transformers' ``Conv1D`` (GPT-2;
weight stored ``[in, out]``). With ``skip_if_slower`` each layer's dense and sparse forward are timed on a sample
input in the layer's dtype and device, and a layer whose sparse version measures slower stays dense. With
``fuse_activations`` a Linear directly followed by a supported activation (BERT's ``intermediate.dense`` +
``intermediate_act_fn``, GPT-2's ``mlp.c_fc`` + ``act``, Llama-style ``gate_proj`` + ``act_fn``, and
``nn.Sequential`` neighbours) gets the activation inside the sparse kernel, and the activation's slot is taken
by a ``FusedActivation`` (an identity that records the move). With ``fuse_qkv`` the query, key and value
projections of a BERT-style self-attention run as one sparse op over their concatenated weight (see
:func:`fuse_qkv`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import ops, timing
from .formats import BlockSparseWeight, _check_sparsity
from .nn import BalancedSparseLinear, BlockSparseLinear, SparseLinear, _is_conv1d, dense_nbytes, dense_weight_of
from .walk import (
    Filter,
    filter_reason,
    linear_layers,
    module_name,
    name_filter,
    parameter_names,
    replace_modules,
    tied_elsewhere,
    weight_read_directly,
)

__all__ = [
    "sparsify", "compile", "SparsifyReport", "LayerReport", "Fusion", "FusedActivation", "activation_name", "Filter",
    "QKVFusion", "QKVSlice", "fuse_qkv", "FUSED_QKV", "LayerNormFusion", "fuse_layernorm",
]

PATTERNS = ("block", "balanced", "unstructured", "auto")

# The exact formats pattern="auto" tries on a layer's existing zeros, fastest kernels first: square blocks, then
# balanced banks (keep = the most nonzeros of any bank), then column and row vectors, then unstructured (1x1
# blocks: CSR, which holds any zeros).
AUTO_CANDIDATES: Tuple[Tuple[str, Dict[str, Any]], ...] = (
    ("block", {"block": 32}),
    ("block", {"block": 16}),
    ("balanced", {"bank": 32}),
    ("balanced", {"bank": 16}),
    ("block", {"block": (8, 1)}),
    ("block", {"block": (4, 1)}),
    ("block", {"block": (1, 4)}),
    ("unstructured", {"block": (1, 1)}),
)
# A candidate storing more than this fraction of the weight's dense bytes (``weight_format.nbytes``: values and
# every index, the backward's transposed metadata included) saves too little to be worth timing. Unstructured
# stores 3 int32 indices per kept weight besides it (column, and for the backward row and position) plus the
# offsets: 16 bytes per kept fp32 weight, 14 per bf16 one, so it passes below a density of about 0.85 / 4 = 21%
# in fp32 and 0.85 / 7 = 12% in bf16 / fp16.
AUTO_MAX_DENSITY = 0.85

CONVERTED = "converted"
KEPT_DENSE = "kept-dense-because-slower"
SKIPPED = "skipped"


class FusedActivation(nn.Identity):
    """Takes the place of an activation that now runs inside the output stage of the sparse layer ``fused_into``."""

    def __init__(self, fused_into: str, activation: str) -> None:
        super().__init__()
        self.fused_into = fused_into
        self.activation = activation

    def extra_repr(self) -> str:
        return f"{self.activation} runs inside {self.fused_into!r}"


class QKVSlice(nn.Module):
    """Takes the place of the ``query``, ``key`` or ``value`` Linear of a self-attention whose three projections
    run as one sparse op (:func:`fuse_qkv`): the attention module's forward pre-hook hands its forward the fused
    output ``[..., q + k + v]`` in place of the hidden states, and each projection's call returns its own columns
    (a view, no copy). Holds no parameter; the weights are the fused module's."""

    def __init__(self, fused_into: str, start: int, out_features: int, in_features: int, total: int) -> None:
        super().__init__()
        self.fused_into = fused_into
        self.start, self.out_features, self.in_features, self.total = start, out_features, in_features, total

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_tracing() and x.shape[-1] != self.total:  # (a traced check would be a constant)
            raise ValueError(
                f"a projection fused into {self.fused_into!r} takes that module's output [..., {self.total}], got "
                f"[..., {x.shape[-1]}]: call the attention module (its forward pre-hook computes the fused "
                "projection), not its query/key/value directly")
        return x.narrow(-1, self.start, self.out_features)

    def extra_repr(self) -> str:
        return (f"columns {self.start}:{self.start + self.out_features} of the output of {self.fused_into} "
                f"(in_features={self.in_features})")


# The child a fused attention's sparse QKV module is registered as, and the projections it replaces, in order.
FUSED_QKV = "fused_qkv"
QKV_NAMES = ("query", "key", "value")


def _fused_qkv_pre_hook(module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook of a fused self-attention: its hidden states become the fused projection's output, once
    per call (its query/key/value are :class:`QKVSlice` views of it). Stateless, so torch.compile and
    torch.export trace it like the rest of the forward."""
    fused = module._modules[FUSED_QKV]
    if args:
        return (fused(args[0]),) + tuple(args[1:]), kwargs
    kwargs = dict(kwargs)
    kwargs["hidden_states"] = fused(kwargs["hidden_states"])
    return args, kwargs


@dataclass
class QKVFusion:
    """A self-attention considered by ``sparsify(..., fuse_qkv=True)``: whether its query, key and value now run
    as one sparse op (``applied``), why (``reason``), and the timing that decided it (ms; None when not timed)."""

    attention: str
    fused_ms: Optional[float] = None
    separate_ms: Optional[float] = None
    applied: bool = False
    reason: str = ""


@dataclass
class LayerReport:
    """One Linear-like layer of the model and what the patcher did with it. Shapes are ``(out, in)``; latencies
    in milliseconds (median of the timed repeats), None when not measured."""

    name: str
    kind: str
    shape: Tuple[int, int]
    dtype: str
    status: str
    reason: str = ""
    pattern: Optional[str] = None
    sparsity: Optional[float] = None
    bytes_before: int = 0
    bytes_after: Optional[int] = None
    dense_ms: Optional[float] = None
    sparse_ms: Optional[float] = None
    activation: str = "none"
    quantized: Optional[str] = None  # "int8" when sparsify(quantize=...) converted it (bytes_after are then int8's)

    @property
    def speedup(self) -> Optional[float]:
        if self.dense_ms is None or not self.sparse_ms:
            return None
        return self.dense_ms / self.sparse_ms


@dataclass
class Fusion:
    """An activation moved into a sparse layer's output stage: ``replaced`` now holds a FusedActivation."""

    linear: str
    replaced: str
    activation: str


@dataclass
class SparsifyReport:
    """What ``sparsify`` did: one LayerReport per Linear-like layer of the model (in module order), the
    activations it fused, and its settings, including how latency was measured (``settings["timing"]``)."""

    layers: List[LayerReport] = field(default_factory=list)
    fusions: List[Fusion] = field(default_factory=list)
    settings: Dict[str, Any] = field(default_factory=dict)
    qkv_fusions: List[QKVFusion] = field(default_factory=list)
    layernorm_fusions: List["LayerNormFusion"] = field(default_factory=list)

    @property
    def converted(self) -> List[LayerReport]:
        return [layer for layer in self.layers if layer.status == CONVERTED]

    @property
    def bytes_before(self) -> int:
        return sum(layer.bytes_before for layer in self.layers)

    @property
    def bytes_after(self) -> int:
        """Bytes of all listed layers after patching (dense size for those left dense)."""
        return sum(layer.bytes_after if layer.status == CONVERTED else layer.bytes_before for layer in self.layers)

    def layer(self, name: str) -> LayerReport:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer named {name!r} in the report")

    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON-serialisable data."""
        return {
            "settings": dict(self.settings),
            "layers": [dict(asdict(layer), shape=list(layer.shape), speedup=layer.speedup) for layer in self.layers],
            "fusions": [asdict(f) for f in self.fusions],
            "qkv_fusions": [asdict(f) for f in self.qkv_fusions],
            "layernorm_fusions": [asdict(f) for f in self.layernorm_fusions],
            "summary": {
                "layers": len(self.layers),
                "converted": len(self.converted),
                "kept_dense_because_slower": sum(layer.status == KEPT_DENSE for layer in self.layers),
                "skipped": sum(layer.status == SKIPPED for layer in self.layers),
                "bytes_before": self.bytes_before,
                "bytes_after": self.bytes_after,
            },
        }

    def to_markdown(self) -> str:
        """A summary line, the timing method, one table row per layer, then the fusions."""

        def ms(v: Optional[float]) -> str:
            return "" if v is None else f"{v:.3f}"

        s = self.settings
        lines = [
            f"Sparsified {len(self.converted)} of {len(self.layers)} Linear layers "
            f"({s.get('pattern')}, {s.get('pattern_args')}): {self.bytes_before / 2**20:.2f} MiB -> "
            f"{self.bytes_after / 2**20:.2f} MiB.",
        ]
        if s.get("timing"):
            lines.append(f"Latency: {s['timing']}.")
        if s.get("quantize"):
            lines.append(f"Quantized to {s['quantize']} (sparse.quant): the block-sparse layers; latencies are the "
                         "float sparse layers'.")
        lines += [
            "",
            "| layer | kind | shape (out, in) | dtype | pattern | sparsity | KiB before | KiB after "
            "| dense ms | sparse ms | speedup | activation | status |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in self.layers:
            status = r.status + (f": {r.reason}" if r.reason else "")
            after = "" if r.bytes_after is None else f"{r.bytes_after / 1024:.1f}"
            sparsity = "" if r.sparsity is None else f"{r.sparsity:.3f}"
            speed = "" if r.speedup is None else f"{r.speedup:.2f}x"
            lines.append(
                f"| {r.name} | {r.kind} | {r.shape[0]}x{r.shape[1]} | {r.dtype} | {r.pattern or ''}"
                f"{', ' + r.quantized if r.quantized else ''} | {sparsity} | "
                f"{r.bytes_before / 1024:.1f} | {after} | {ms(r.dense_ms)} | {ms(r.sparse_ms)} | {speed} | "
                f"{r.activation} | {status} |"
            )
        if self.fusions:
            lines += ["", "Fused activations:", ""]
            lines += [f"- `{f.replaced}` ({f.activation}) into `{f.linear}`" for f in self.fusions]
        if self.qkv_fusions:
            lines += ["", "Query, key and value as one sparse op (fuse_qkv):", ""]
            for f in self.qkv_fusions:
                timed = "" if f.fused_ms is None else (
                    f" (fused {f.fused_ms:.3f} ms, separate {f.separate_ms:.3f} ms)")
                lines.append(f"- `{f.attention}`: {'fused' if f.applied else 'not fused'}{timed}"
                             + (f": {f.reason}" if f.reason else ""))
        if self.layernorm_fusions:
            lines += ["", "Residual add and LayerNorm as one op (fuse_layernorm):", ""]
            lines += [f"- `{f.block}`: {'fused' if f.applied else 'not fused'}" + (f": {f.reason}" if f.reason else "")
                      for f in self.layernorm_fusions]
        return "\n".join(lines) + "\n"

    def __str__(self) -> str:
        return self.to_markdown()


# ---- activations ------------------------------------------------------------------------------------------------
# transformers' activation classes, by name so that sparse does not import transformers.
_HF_ACTIVATIONS = {
    "GELUActivation": "gelu",
    "NewGELUActivation": "gelu_tanh",
    "GELUTanh": "gelu_tanh",
    "PytorchGELUTanh": "gelu_tanh",
    "FastGELUActivation": "gelu_tanh",
    "SiLUActivation": "silu",
}


def activation_name(act: Any) -> Optional[str]:
    """The kernel activation (a name from ``sparse.activations.ACTIVATIONS``) equal to ``act`` (a module or
    function), or None when it has no fused equivalent."""
    if isinstance(act, nn.ReLU):
        return "relu"
    if isinstance(act, nn.GELU):
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    if isinstance(act, nn.SiLU):
        return "silu"
    if isinstance(act, nn.Module):
        cls = type(act)
        if cls.__module__.startswith("transformers.") and cls.__name__ in _HF_ACTIVATIONS:
            # Their pure-Python variants (use_gelu_python, ...) compute the same functions.
            return _HF_ACTIVATIONS[cls.__name__]
        return None
    if act in (F.relu, torch.relu):
        return "relu"
    if act is F.gelu:
        return "gelu"
    if act is F.silu:
        return "silu"
    return None


# (class-name suffix of the parent, Linear attribute, activation attribute): the parent's forward applies the
# activation to the Linear's output and uses that output nowhere else.
_FUSABLE_PAIRS = (
    ("Intermediate", "dense", "intermediate_act_fn"),  # BERT, RoBERTa, ... : act(dense(x))
    ("MLP", "c_fc", "act"),  # GPT-2: c_proj(act(c_fc(x)))
    ("MLP", "gate_proj", "act_fn"),  # Llama-style gated MLP: down_proj(act_fn(gate_proj(x)) * up_proj(x))
)


def _find_fusions(model: nn.Module, selected: Dict[int, str]) -> Dict[str, Tuple[str, nn.Module, str]]:
    """For each selected Linear (by name) whose output feeds only a fusable activation:
    name -> (activation, parent of the activation slot, slot attribute)."""
    found: Dict[str, Tuple[str, nn.Module, str]] = {}
    uses: Dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        uses[id(m)] = uses.get(id(m), 0) + 1
    # A Linear registered at several places may feed other layers too: the activation would reach them.
    selected = {i: n for i, n in selected.items() if uses.get(i, 0) == 1}
    for parent in model.modules():
        if isinstance(parent, nn.Sequential):
            children = list(parent._modules.items())
            for (_, a), (key, b) in zip(children, children[1:]):
                if a is not None and id(a) in selected and activation_name(b) is not None:
                    found[selected[id(a)]] = (activation_name(b), parent, key)
            continue
        cls = type(parent).__name__
        for suffix, lin_attr, act_attr in _FUSABLE_PAIRS:
            lin = parent._modules.get(lin_attr)
            if not cls.endswith(suffix) or lin is None or id(lin) not in selected:
                continue
            act = getattr(parent, act_attr, None)
            if activation_name(act) is not None:
                found[selected[id(lin)]] = (activation_name(act), parent, act_attr)
    return found


# ---- timing --------------------------------------------------------------------------------------------------------
def _time_pair(dense_fn: Callable[[torch.Tensor], torch.Tensor], sparse_fn: Callable[[torch.Tensor], torch.Tensor],
               x: torch.Tensor, repeats: int) -> Tuple[float, float]:
    """Median wall times (ms) of ``dense_fn(x)`` and ``sparse_fn(x)`` after two warm-up calls each. The two are
    timed alternately, so that load from other processes hits both alike."""
    with torch.no_grad():
        t = timing.interleaved({"dense": lambda: dense_fn(x), "sparse": lambda: sparse_fn(x)}, repeats=repeats,
                               warmup=2, device=x)
    return t["dense"].median * 1e3, t["sparse"].median * 1e3


# ---- query, key and value as one sparse op ------------------------------------------------------------------------
def _block_grid(w: BlockSparseWeight) -> torch.Tensor:
    """The bool [n_block_rows, n_block_cols] grid of the blocks ``w`` stores."""
    keep = torch.zeros(w.n_block_rows, w.n_block_cols, dtype=torch.bool, device=w.values.device)
    keep[w._block_rows(), w.col_indices.long()] = True
    return keep


def _qkv_mismatch(parts: Sequence[nn.Module]) -> Optional[str]:
    """Why query, key and value cannot be one sparse op over their concatenated weight (None: they can)."""
    if not all(isinstance(p, SparseLinear) for p in parts):
        return "not all of query, key and value are sparse: " + ", ".join(type(p).__name__ for p in parts)
    first = parts[0]
    if len({type(p) for p in parts}) > 1:
        return "query, key and value have different sparse formats"
    if isinstance(first, BlockSparseLinear):
        if len({p.block for p in parts}) > 1:
            return "query, key and value have different blocks: " + ", ".join(str(p.block) for p in parts)
        if any(p.out_features % first.block[0] for p in parts[:-1]):
            return f"an out_features not divisible by the block rows {first.block[0]}: a block would span two"
    elif len({(p.bank, p.keep) for p in parts}) > 1:
        return "query, key and value have different banks or keeps"
    checks = (
        ("in_features", lambda p: p.in_features), ("activation", lambda p: p.activation),
        ("dtype", lambda p: p.values.dtype), ("device", lambda p: p.values.device),
        ("bias", lambda p: p.bias is None), ("backend", lambda p: p._backend_request),
        ("requires_grad", lambda p: p.values.requires_grad),
    )
    for what, key in checks:
        if len({key(p) for p in parts}) > 1:
            return f"query, key and value differ in {what}"
    if first.activation != "none":
        return f"an activation ({first.activation}) in the projections"
    return None


def _concat_sparse(parts: Sequence[SparseLinear]) -> SparseLinear:
    """One sparse module over the rows of ``parts`` stacked ([sum of out, in]): exactly their kept weights (each
    block or bank stays inside its part) and biases."""
    W = torch.cat([p.weight_format.to_dense().detach() for p in parts])
    bias = None if parts[0].bias is None else torch.cat([p.bias.detach() for p in parts])
    first = parts[0]
    if isinstance(first, BlockSparseLinear):
        grid = torch.cat([_block_grid(p.weight_format) for p in parts])
        weight = BlockSparseWeight.from_dense(W, first.block, mask=grid)
    else:
        from .formats import BalancedSparseWeight

        mask = torch.cat([p.weight_format.mask() for p in parts])
        weight = BalancedSparseWeight.from_dense(W, first.bank, first.keep, mask=mask)
    fused = type(first).from_weight(weight, bias, activation=first.activation, backend=first._backend_request)
    fused.train(first.training)
    fused.values.requires_grad_(first.values.requires_grad)
    if fused.bias is not None:
        fused.bias.requires_grad_(first.bias.requires_grad)
    return fused


def _install_qkv(attention: nn.Module, fused: nn.Module, name: str, spans: Sequence[Tuple[int, int, int]]):
    """Makes ``attention`` compute its projections with ``fused``: registered as its ``FUSED_QKV`` child, its
    query/key/value replaced by :class:`QKVSlice` views (``spans``: (start, out, in) each), and the forward
    pre-hook. Returns the hook's handle."""
    total = sum(out for _, out, _ in spans)
    fused_name = f"{name}.{FUSED_QKV}" if name else FUSED_QKV
    attention.add_module(FUSED_QKV, fused)
    for key, (start, out, inn) in zip(QKV_NAMES, spans):
        attention._modules[key] = QKVSlice(fused_name, start, out, inn, total)
    return attention.register_forward_pre_hook(_fused_qkv_pre_hook, with_kwargs=True)


def _attention_output(attention: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = attention(x)
    return out[0] if isinstance(out, (tuple, list)) else out


def _qkv_tolerance(dtype: torch.dtype) -> Dict[str, float]:
    return {"rtol": 1e-4, "atol": 1e-5} if dtype in (torch.float32, torch.float64) else {"rtol": 2e-2, "atol": 2e-2}


def fuse_qkv(model: nn.Module, *, only: Optional[Sequence[str]] = None, sample_tokens: int = 128, repeats: int = 5,
             only_if_faster: bool = True) -> List[QKVFusion]:
    """Runs the query, key and value projections of each BERT-style self-attention of ``model`` (a module whose
    class name ends in ``SelfAttention`` with sparse ``query``, ``key`` and ``value`` children of one format and
    pattern, equal ``in_features``, no activation) as one sparse op over their concatenated ``[q + k + v, in]``
    weight, in place.

    The attention's own forward is kept: a forward pre-hook replaces its hidden states by the fused output, and
    ``query``/``key``/``value`` become :class:`QKVSlice` views of it, so the three calls of transformers'
    ``BertSelfAttention.forward`` cost one kernel call, with no state kept between calls (torch.compile and
    torch.export trace it). Each fusion is checked on a sample input (the attention's output, fused against
    separate, within the dtype's tolerance) and undone if it differs or the module needs more inputs.

    Args:
        only: names of the attention modules to consider (default: all).
        sample_tokens: rows of the timing input (0: no timing); repeats: timed calls, interleaved.
        only_if_faster: keep a fusion only where the fused op measured faster than the three separate ones
            (needs ``sample_tokens`` >= 1).
    Returns:
        One :class:`QKVFusion` per self-attention considered, with the timing and the reason.
    """
    if only_if_faster and not sample_tokens:
        raise ValueError("only_if_faster=True needs a timing input: sample_tokens must be >= 1")
    uses: Dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        uses[id(m)] = uses.get(id(m), 0) + 1
    found: List[QKVFusion] = []
    for name, attention in list(model.named_modules()):
        if not type(attention).__name__.endswith("SelfAttention") or (only is not None and name not in only):
            continue
        parts = [attention._modules.get(k) for k in QKV_NAMES]
        if isinstance(attention._modules.get(FUSED_QKV), SparseLinear) or any(p is None for p in parts):
            continue  # already fused, or not the query/key/value kind of attention
        rep = QKVFusion(name or type(attention).__name__)
        found.append(rep)
        why = _qkv_mismatch(parts)
        if why is None and hasattr(attention, FUSED_QKV):
            why = f"the module already has an attribute {FUSED_QKV!r}"
        if why is None and any(uses.get(id(p), 0) > 1 for p in parts + [attention]):
            why = "a projection or the attention is registered at several places in the model"
        if why is not None:
            rep.reason = why
            continue
        fused = _concat_sparse(parts)
        if sample_tokens:
            gen = torch.Generator(parts[0].values.device).manual_seed(0)
            x = torch.randn(sample_tokens, parts[0].in_features, dtype=parts[0].values.dtype,
                            device=parts[0].values.device, generator=gen)
            with torch.no_grad():
                t = timing.interleaved({"separate": lambda: [p(x) for p in parts], "fused": lambda: fused(x)},
                                       repeats=repeats, warmup=2, device=x)
            rep.fused_ms, rep.separate_ms = t["fused"].median * 1e3, t["separate"].median * 1e3
            if only_if_faster and rep.fused_ms >= rep.separate_ms:
                rep.reason = "the fused op measured no faster than the three separate ones"
                continue
        # Checked on the attention's own forward: the fused one must compute what the separate projections do.
        training = {m: m.training for m in attention.modules()}
        attention.eval()
        gen = torch.Generator(parts[0].values.device).manual_seed(1)
        x = torch.randn(1, 5, parts[0].in_features, dtype=parts[0].values.dtype, device=parts[0].values.device,
                        generator=gen)
        spans, start = [], 0
        for p in parts:
            spans.append((start, p.out_features, p.in_features))
            start += p.out_features
        handle = None
        try:
            with torch.no_grad():
                ref = _attention_output(attention, x)
                handle = _install_qkv(attention, fused, name, spans)
                got = _attention_output(attention, x)
            torch.testing.assert_close(got, ref, **_qkv_tolerance(x.dtype))
        except Exception as exc:  # the module's forward does more with its hidden states: leave it as it was
            if handle is not None:
                handle.remove()
            attention._modules.pop(FUSED_QKV, None)
            for key, p in zip(QKV_NAMES, parts):
                attention._modules[key] = p
            rep.reason = f"the fused attention did not reproduce the separate one on a sample input " \
                         f"({type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:120]})"
            continue
        finally:
            for m, was in training.items():
                m.training = was
        rep.applied = True
    return found


_fuse_qkv = fuse_qkv  # sparsify's argument of the same name hides it there


# ---- residual add + LayerNorm ----------------------------------------------------------------------------------------
# (class-name suffix, projection, LayerNorm, dropout): blocks whose forward(hidden_states, input_tensor) is
# LayerNorm(dropout(projection(hidden_states)) + input_tensor). BERT's BertSelfOutput and BertOutput, and the same
# blocks of RoBERTa, ELECTRA, XLM-R, MiniLM, ... Each candidate is still checked on a sample input before it is kept.
_RESIDUAL_LN_BLOCKS = (("Output", "dense", "LayerNorm", "dropout"),)


@dataclass
class LayerNormFusion:
    """A block considered by ``sparsify(..., fuse_layernorm=True)``: whether its residual add and LayerNorm now
    run as one op after its projection (``applied``; the block became a :class:`sparse.nn.ResidualLayerNorm`), and
    why not (``reason``)."""

    block: str
    applied: bool = False
    reason: str = ""


def fuse_layernorm(model: nn.Module, *, only: Optional[Sequence[str]] = None) -> List[LayerNormFusion]:
    """Replaces each BERT-style output block of ``model`` (a module whose class name ends in ``Output`` with a
    ``dense`` projection, an ``nn.LayerNorm`` over its features called ``LayerNorm`` and an optional ``nn.Dropout``
    called ``dropout``, computing ``LayerNorm(dropout(dense(x)) + residual)``) by a
    :class:`sparse.nn.ResidualLayerNorm` holding the same children, in place: in CPU inference the residual add
    and the LayerNorm then run as one op (:func:`sparse.ops.residual_layer_norm`) after the projection. Each
    replacement is checked on a sample input (the block's output, within its dtype's tolerance) and undone if it
    differs or the block's forward takes other arguments.

    Args:
        only: names of the blocks to consider (default: all).
    Returns:
        One :class:`LayerNormFusion` per block considered.
    """
    from .nn import ResidualLayerNorm

    uses: Dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        uses[id(m)] = uses.get(id(m), 0) + 1
    found: List[LayerNormFusion] = []
    replacements: Dict[int, nn.Module] = {}
    for name, block in list(model.named_modules()):
        if isinstance(block, ResidualLayerNorm) or (only is not None and name not in only):
            continue
        for suffix, dense_attr, ln_attr, drop_attr in _RESIDUAL_LN_BLOCKS:
            dense, ln = block._modules.get(dense_attr), block._modules.get(ln_attr)
            if not type(block).__name__.endswith(suffix) or dense is None or ln is None:
                continue
            rep = LayerNormFusion(name or type(block).__name__)
            found.append(rep)
            drop = block._modules.get(drop_attr)
            extra = set(block._modules) - {dense_attr, ln_attr, drop_attr}
            if not isinstance(ln, nn.LayerNorm) or len(ln.normalized_shape) != 1:
                rep.reason = f"{ln_attr} is {type(ln).__name__}, not an nn.LayerNorm over the last dimension"
            elif drop is not None and not isinstance(drop, (nn.Dropout, nn.Identity)):
                rep.reason = f"{drop_attr} is {type(drop).__name__}, not nn.Dropout"
            elif extra:
                rep.reason = f"the block has other children ({', '.join(sorted(extra))}) its forward may use"
            elif uses.get(id(block), 0) > 1:
                rep.reason = "the block is registered at several places in the model"
            else:
                fused = ResidualLayerNorm(dense, ln, drop, names=(dense_attr, ln_attr, drop_attr),
                                          replaces=type(block).__name__)
                rep.reason = _check_residual_ln(block, fused, ln)
                if not rep.reason:
                    fused.train(block.training)
                    replacements[id(block)] = fused
                    rep.applied = True
            break
    replace_modules(model, replacements)
    return found


_fuse_layernorm = fuse_layernorm  # sparsify's argument of the same name hides it there


def _check_residual_ln(block: nn.Module, fused: nn.Module, ln: nn.LayerNorm) -> str:
    """'' if ``fused`` computes what ``block`` does on a sample input (both in eval mode, no gradient, through the
    fused op), else why not."""
    like = next((p for p in ln.parameters()), None)
    dense = fused._modules[fused._names[0]]
    in_features = getattr(dense, "in_features", None)
    if like is None or in_features is None:
        return "the LayerNorm has no weight or the projection no in_features to build a sample input from"
    training = {m: m.training for m in block.modules()}
    block.eval()
    try:
        gen = torch.Generator(like.device).manual_seed(2)
        x = torch.randn(2, 5, in_features, dtype=like.dtype, device=like.device, generator=gen)
        r = torch.randn(2, 5, ln.normalized_shape[0], dtype=like.dtype, device=like.device, generator=gen)
        with torch.no_grad():
            ref, got = block(x, r), fused(x, r)
        torch.testing.assert_close(got, ref, **_qkv_tolerance(like.dtype))
    except Exception as exc:
        return (f"the fused block did not reproduce the block on a sample input "
                f"({type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:120]})")
    finally:
        for m, was in training.items():
            m.training = was
    return ""


# ---- the patcher ---------------------------------------------------------------------------------------------------
def _resolve_pattern_args(
    pattern: str, sparsity: Optional[float], block, bank: int, keep: Optional[int]
) -> Dict[str, Any]:
    if pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")
    if pattern == "auto":
        if sparsity is not None or keep is not None:
            raise ValueError("pattern='auto' keeps the zeros each layer already has; sparsity= and keep= are for "
                             "pruning by magnitude with pattern='block', 'balanced' or 'unstructured'")
        return {"formats": "the exact one of blocks 32/16, balanced banks 32/16, vectors 8x1/4x1/1x4, unstructured"}
    if pattern == "unstructured":
        if keep is not None:
            raise ValueError(f"keep={keep!r} is for pattern='balanced'; pattern='unstructured' takes sparsity= (the "
                             "fraction of each layer's weights dropped)")
        return {"sparsity": _check_sparsity(0.5 if sparsity is None else sparsity)}
    if pattern == "block":
        sparsity = _check_sparsity(0.5 if sparsity is None else sparsity)
        BlockSparseWeight._parse_block(block, (1 << 30, 1 << 30))  # type/positivity only; fit is per layer
        return {"block": block if isinstance(block, int) else tuple(block), "sparsity": sparsity}
    if isinstance(bank, bool) or not isinstance(bank, int) or bank < 1:
        raise ValueError(f"bank must be a positive int, got {bank!r}")
    if keep is None:
        sparsity = _check_sparsity(0.5 if sparsity is None else sparsity)
        keep = round(bank * (1 - sparsity))
        if keep < 1:
            raise ValueError(f"sparsity={sparsity} keeps round({bank} * (1 - {sparsity})) = 0 of each bank of {bank}")
    else:
        if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= bank:
            raise ValueError(f"keep must be an int in [1, bank={bank}], got {keep!r}")
        if sparsity is not None and abs(_check_sparsity(sparsity) - (1 - keep / bank)) > 0.5 / bank:
            raise ValueError(
                f"sparsity={sparsity} disagrees with keep={keep} of bank={bank} (sparsity "
                f"{1 - keep / bank:.4f}); give one"
            )
    return {"bank": bank, "keep": keep}


def layer_mask(layer: nn.Module) -> Tuple[torch.Tensor, str]:
    """The ``[out, in]`` bool mask of the weights a dense layer keeps, and where it came from: the mask of
    ``torch.nn.utils.prune`` (``weight_mask``), of a ``torch.nn.utils.parametrize`` parametrization holding a
    ``mask`` of the weight's shape, or else the weight's nonzeros."""
    W = dense_weight_of(layer)
    shape = tuple(W.shape)
    transposed = _is_conv1d(layer)  # Conv1D stores [in, out]; its masks too
    mask = getattr(layer, "weight_mask", None)
    source = "torch.nn.utils.prune mask"
    if not isinstance(mask, torch.Tensor):
        mask, source = None, ""
        for p in getattr(getattr(layer, "parametrizations", None), "weight", ()):
            m = getattr(p, "mask", None)
            if isinstance(m, torch.Tensor) and tuple(m.t().shape if transposed else m.shape) == shape:
                mask, source = m, f"{type(p).__name__} parametrization mask"
                break
    if mask is None:
        return W.detach() != 0, "nonzeros"
    mask = (mask.t() if transposed else mask).detach().to(device=W.device)
    if tuple(mask.shape) != shape:
        raise ValueError(f"{source} has shape {tuple(mask.shape)}, expected the weight's {shape}")
    # where the mask keeps a weight that is zero anyway, the weight decides nothing; the mask's zeros must be zeros
    return mask.bool() | (W.detach() != 0), source


def _auto_candidates(layer: nn.Module, mask: torch.Tensor, activation: str) -> List[Tuple[str, SparseLinear]]:
    """Every format of AUTO_CANDIDATES that represents ``layer`` exactly (its weight equal to the dense one) and
    stores at most AUTO_MAX_DENSITY of it: [(label, module)]."""
    W = dense_weight_of(layer).detach()
    limit = AUTO_MAX_DENSITY * W.numel() * W.element_size()
    out = []
    for fmt, kw in AUTO_CANDIDATES:
        try:
            if fmt == "unstructured":
                # its bytes are known before it is built (value and 3 int32 indices per kept weight, 2 offset arrays)
                if int(mask.sum()) * (W.element_size() + 12) + 4 * (sum(W.shape) + 2) >= limit:
                    continue
                sp = BlockSparseLinear.from_linear(layer, block=kw["block"], mask=mask, activation=activation)
                label = "unstructured"
            elif fmt == "block":
                sp = BlockSparseLinear.from_linear(layer, block=kw["block"], mask=mask, activation=activation)
                bo, bi = sp.block
                label = f"block {bo}x{bi}"
            else:
                bank = kw["bank"]
                n_banks = -(-W.shape[1] // bank)
                padded = torch.zeros(W.shape[0], n_banks * bank, dtype=torch.bool, device=mask.device)
                padded[:, : W.shape[1]] = mask
                keep = max(1, int(padded.view(W.shape[0], n_banks, bank).sum(-1).max()))
                sp = BalancedSparseLinear.from_linear(layer, bank=bank, keep=keep, activation=activation)
                label = f"balanced bank {bank} keep {keep}"
        except (ValueError, TypeError):
            continue  # this format does not fit the layer's shape
        if sp.weight_format.nbytes >= limit:
            continue
        if not torch.equal(sp.weight_format.to_dense(), W):
            continue  # not exact (cannot happen by construction; never change the model's function)
        out.append((label, sp))
    return out


def _choose_auto(name: str, layer: nn.Module, rep: LayerReport, mask: Optional[torch.Tensor], activation: str,
                 dense_fn: Optional[Callable[[torch.Tensor], torch.Tensor]], x: Optional[torch.Tensor], repeats: int,
                 no_zeros: List[str]) -> Optional[SparseLinear]:
    """pattern="auto" for one layer: the fastest exact format for its zeros (timed against the dense layer when
    ``x`` is given; else the one that stores the fewest bytes), or None with ``rep.reason`` saying why not."""
    W = dense_weight_of(layer)
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != tuple(W.shape):
            raise ValueError(f"layer {name!r}: pattern='auto' needs a bool mask of the weight's shape "
                             f"{tuple(W.shape)}, got {getattr(mask, 'dtype', type(mask).__name__)} "
                             f"{tuple(getattr(mask, 'shape', ()))}")
        if (W.detach()[~mask.to(W.device)] != 0).any():
            raise ValueError(f"layer {name!r}: the mask drops nonzero weights; pattern='auto' never changes the "
                             "layer's function (use pattern='block'/'balanced' with masks= to prune)")
        source = "masks="
        mask = mask.to(W.device) | (W.detach() != 0)
    else:
        try:
            mask, source = layer_mask(layer)
        except ValueError as err:
            raise ValueError(f"layer {name!r}: {err}") from err
    zeros = 1.0 - float(mask.float().mean())
    if zeros == 0.0:
        rep.reason = f"no zero weight ({source}): nothing for pattern='auto' to keep out"
        no_zeros.append(name)
        return None
    cands = _auto_candidates(layer, mask, activation)
    if not cands:
        rep.reason = (f"{100 * zeros:.1f}% zeros ({source}), but no exact format stores them in under "
                      f"{AUTO_MAX_DENSITY:.0%} of the dense bytes")
        return None
    if x is None:
        label, sp = min(cands, key=lambda c: c[1].nbytes)
        rep.reason = f"{100 * zeros:.1f}% zeros ({source}); the exact format with the fewest bytes (not timed)"
    else:
        fns = {"dense": (lambda: dense_fn(x))}
        fns.update({lbl: (lambda s=s: s(x)) for lbl, s in cands})
        with torch.no_grad():
            t = timing.interleaved(fns, repeats=repeats, warmup=2, device=x)
        ms = {k: v.median * 1e3 for k, v in t.items()}
        label, sp = min(cands, key=lambda c: ms[c[0]])
        rep.dense_ms, rep.sparse_ms = ms["dense"], ms[label]
        rep.reason = f"{100 * zeros:.1f}% zeros ({source}); fastest exact format of " + ", ".join(
            f"{lbl} {ms[lbl]:.3f} ms" for lbl, _ in cands)
    rep.pattern = label
    return sp


def _build(
    pattern: str, layer: nn.Module, args: Dict[str, Any], mask: Optional[torch.Tensor], activation: str
) -> SparseLinear:
    if pattern == "unstructured":
        W = dense_weight_of(layer).detach()
        shape = tuple(W.shape)
        if mask is None:
            # The largest |w| of the layer, n - floor(sparsity * n) of its n weights (the count of block pruning),
            # ties broken by position (the earlier weight is kept).
            from .prune.masks import magnitude_mask  # here: sparse.prune imports this module

            mask = magnitude_mask(W, args["sparsity"])
        elif not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != shape:
            raise ValueError(f"pattern='unstructured' needs a bool mask of the weight's shape (out, in) = {shape}, got "
                             f"{getattr(mask, 'dtype', type(mask).__name__)} {tuple(getattr(mask, 'shape', ()))}")
        return BlockSparseLinear.from_linear(layer, block=1, mask=mask, activation=activation)
    if pattern == "block":
        if mask is not None:
            return BlockSparseLinear.from_linear(layer, block=args["block"], mask=mask, activation=activation)
        return BlockSparseLinear.from_linear(
            layer, block=args["block"], sparsity=args["sparsity"], activation=activation
        )
    return BalancedSparseLinear.from_linear(
        layer, bank=args["bank"], keep=args["keep"], mask=mask, activation=activation
    )


def sparsify(
    model: nn.Module,
    pattern: str = "block",
    sparsity: Optional[float] = None,
    *,
    block: Union[int, Sequence[int]] = 32,
    bank: int = 32,
    keep: Optional[int] = None,
    include: Optional[Filter] = None,
    exclude: Optional[Filter] = None,
    skip_if_slower: bool = True,
    fuse_activations: bool = False,
    fuse_qkv: bool = False,
    fuse_layernorm: bool = False,
    sample_tokens: int = 128,
    repeats: int = 5,
    masks: Optional[Dict[str, torch.Tensor]] = None,
    quantize: Optional[str] = None,
) -> SparsifyReport:
    """Replaces the model's matching ``nn.Linear`` / ``Conv1D`` layers by sparse ones, in place.

    Args:
        model: any ``nn.Module`` (Hugging Face Transformers models, ``nn.Sequential`` MLPs, ...).
        pattern: ``"block"`` (BlockSparseLinear: the blocks of largest L2 norm are kept), ``"balanced"``
            (BalancedSparseLinear: the ``keep`` largest-magnitude weights of each bank), ``"unstructured"``
            (BlockSparseLinear with 1x1 blocks, i.e. CSR: the largest-magnitude weights of each layer, anywhere;
            the report calls it "unstructured") or ``"auto"``: no pruning; each layer's existing zeros (those of a
            pruned checkpoint, a ``torch.nn.utils.prune`` ``weight_mask``, a ``parametrize`` mask, or ``masks``)
            go into the fastest format that holds them exactly (timed against the dense layer; without timing,
            the fewest bytes). A layer without zeros, or whose zeros no format stores in under 85% of the dense
            bytes, stays dense; the report says why.
        sparsity: fraction dropped, in [0, 1); default 0.5. For ``"balanced"`` it sets
            ``keep = round(bank * (1 - sparsity))`` unless ``keep`` is given. For ``"unstructured"`` each layer
            keeps its ``n - floor(sparsity * n)`` weights of largest ``|w|`` (ties: the earlier position), as
            ``sparse.prune.magnitude_mask``. Unstructured stores an int32 column index per kept weight and, for
            the backward, two more (16 bytes per kept fp32 weight): smaller than the dense layer only above 75%
            sparsity in fp32 (86% in bf16 / fp16).
        block: block size (int or ``(rows, cols)``); bank, keep: balanced parameters.
        include, exclude: which layers (by dotted module name): a glob, a list of globs (each must match some
            layer, see ``sparse.walk.pattern_matches``), or a predicate ``(name, module) -> bool``. Default: all layers.
        skip_if_slower: time each layer dense and sparse on a sample input ``[sample_tokens, in]`` in its
            dtype (median of ``repeats`` runs after two warm-ups) and keep it dense when sparse measures slower.
        fuse_activations: move a Linear's following activation into the sparse kernel (see the module doc).
        fuse_qkv: run the query, key and value projections of each BERT-style self-attention whose three this
            call converts (one format and pattern; for blocks, out_features divisible by the block rows) as one
            sparse op over their concatenated weight (:func:`fuse_qkv`); with ``skip_if_slower`` only where that
            measures faster than the three separate ops on the timing input. ``report.qkv_fusions`` says where
            and why.
        fuse_layernorm: run the residual add and LayerNorm of each BERT-style output block whose projection this
            call converts (``LayerNorm(dropout(dense(x)) + residual)``) as one op after the sparse projection
            (:func:`fuse_layernorm`; CPU inference). ``report.layernorm_fusions`` says where and why.
        sample_tokens: rows of the timing input; 0 disables timing (then ``skip_if_slower`` must be False).
        masks: optional ``{layer name: bool mask}`` (``[out, in]``, or the block grid for ``"block"``; per
            weight for ``"unstructured"``); those layers are built from their mask instead of by magnitude, and
            only they are converted.
        quantize: ``"int8"`` to convert every sparse layer this call builds (block, unstructured and balanced
            patterns, including a fused QKV op) to int8 weights with per-token activation scales
            (``sparse.quant``: CPU inference only, float32 or bfloat16 models). The
            report's ``bytes_after`` are then the int8 bytes and ``quantized`` says which layers. Latencies (and
            ``skip_if_slower``) are measured before quantization, on the float sparse layers.
    Returns:
        A SparsifyReport listing every Linear-like layer with its status: converted, kept dense because slower,
        or skipped with the reason.
    Raises:
        ValueError for an unknown pattern, sparsity out of range, a filter that matches nothing, a block/bank
        that fits none of the selected layers, or a mask that does not fit its layer (naming the layer).
    """
    args = _resolve_pattern_args(pattern, sparsity, block, bank, keep)
    if quantize is not None:
        from .quant import MODES

        if quantize not in MODES:
            raise ValueError(f"quantize must be None or one of {MODES}, got {quantize!r}")
    if isinstance(sample_tokens, bool) or not isinstance(sample_tokens, int) or sample_tokens < 0:
        raise ValueError(f"sample_tokens must be an int >= 0, got {sample_tokens!r}")
    if skip_if_slower and sample_tokens == 0:
        raise ValueError("skip_if_slower=True needs a timing input: sample_tokens must be >= 1")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, nn.Linear) or _is_conv1d(model):
        raise TypeError("sparsify patches the layers inside a model; for a single layer use "
                        "BlockSparseLinear.from_linear (block=1 for unstructured) or BalancedSparseLinear.from_linear")

    candidates = linear_layers(model)
    names = [n for n, _ in candidates]
    if not candidates:
        raise ValueError(f"{type(model).__name__} has no nn.Linear or Conv1D layer to sparsify")
    inc = name_filter(include, "include", names)
    exc = name_filter(exclude, "exclude", names)
    if masks is not None:
        unknown = sorted(set(masks) - set(names))
        if unknown:
            raise ValueError(f"masks name layers that are not Linear layers of the model: {unknown}")
    read_directly = weight_read_directly(model)
    param_names = parameter_names(model)

    layers: List[LayerReport] = []
    selected: Dict[int, str] = {}
    by_name: Dict[str, Tuple[nn.Module, LayerReport]] = {}
    for name, m in candidates:
        W = m.values if isinstance(m, SparseLinear) else dense_weight_of(m)
        shape = (m.out_features, m.in_features) if isinstance(m, SparseLinear) else (int(W.shape[0]), int(W.shape[1]))
        kind = type(m).__name__
        rep = LayerReport(name=name, kind=kind, shape=shape, dtype=str(W.dtype).replace("torch.", ""), status=SKIPPED,
                          bytes_before=m.nbytes if isinstance(m, SparseLinear) else dense_nbytes(m))
        layers.append(rep)
        if isinstance(m, SparseLinear):
            rep.reason = "already sparse"
        elif isinstance(m, nn.Linear) and type(m).forward is not nn.Linear.forward:
            rep.reason = f"{type(m).__name__} overrides nn.Linear.forward; a sparse layer would drop that behaviour"
        elif id(m) in read_directly:
            rep.reason = "nn.MultiheadAttention reads out_proj.weight directly instead of calling it"
        elif filter_reason(name, m, inc, exc) is not None:
            rep.reason = filter_reason(name, m, inc, exc)
        elif tied_elsewhere(model, m, param_names):
            rep.reason = (f"weight is tied to {', '.join(tied_elsewhere(model, m, param_names))} "
                          "(pruning it would change those too)")
        elif masks is not None and name not in masks:
            rep.reason = "no mask given"
        elif W.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            rep.reason = f"dtype {W.dtype} is not a floating type the kernels support"
        else:
            status = ops.backend_status(W.device)
            if all(v is not None for v in status.values()):
                rep.reason = "no backend: " + "; ".join(f"{k}: {v}" for k, v in status.items())
            else:
                selected[id(m)] = name
                by_name[name] = (m, rep)
    if not selected:
        if inc is not None or masks is not None:
            raise ValueError("the include filter / masks select no convertible layer: "
                             + "; ".join(f"{r.name}: {r.reason}" for r in layers[:8]))
        raise ValueError("no layer can be converted: " + "; ".join(f"{r.name}: {r.reason}" for r in layers[:8]))

    from . import runtime

    for m, _ in by_name.values():
        W = m.values if isinstance(m, SparseLinear) else dense_weight_of(m)
        if W.device.type == "cpu":
            runtime.warn_if_slow_dtype(W.dtype, "sparse.sparsify")

    fusions = _find_fusions(model, selected) if fuse_activations else {}
    replacements: Dict[int, nn.Module] = {}
    fit_errors: List[str] = []
    applied: List[Fusion] = []
    pending: List[Tuple[nn.Module, str, FusedActivation]] = []  # applied with the replacements, after every check
    no_zeros: List[str] = []  # pattern="auto": layers without a zero
    for name, (m, rep) in by_name.items():
        act, act_parent, act_attr = fusions.get(name, ("none", None, None))
        mask = masks.get(name) if masks is not None else None
        x = dense_fn = None
        if sample_tokens:
            W = dense_weight_of(m)
            # A private generator: timing must not move the caller's random stream.
            gen = torch.Generator(W.device).manual_seed(0)
            x = torch.randn(sample_tokens, rep.shape[1], dtype=W.dtype, device=W.device, generator=gen)
            if act_parent is not None:
                dense_fn = (lambda t, m=m, a=getattr(act_parent, act_attr): a(m(t)))
            else:
                dense_fn = m
        if pattern == "auto":
            sp = _choose_auto(name, m, rep, mask, act, dense_fn, x, repeats, no_zeros)
            if sp is None:
                continue
        else:
            try:
                sp = _build(pattern, m, args, mask, act)
            except ValueError as err:
                if mask is not None:
                    raise ValueError(f"layer {name!r}: {err}") from err
                rep.reason = str(err)
                fit_errors.append(f"{name} {rep.shape[0]}x{rep.shape[1]}: {err}")
                continue
            rep.pattern = pattern
            if sample_tokens:
                rep.dense_ms, rep.sparse_ms = _time_pair(dense_fn, sp, x, repeats)
        rep.sparsity = sp.sparsity
        rep.bytes_after = sp.nbytes
        if skip_if_slower and rep.sparse_ms > rep.dense_ms:
            rep.status = KEPT_DENSE
            rep.reason = f"sparse {rep.sparse_ms:.3f} ms > dense {rep.dense_ms:.3f} ms"
            continue
        sp.train(m.training)
        sp.values.requires_grad_(m.weight.requires_grad)  # a frozen layer stays frozen
        if sp.bias is not None:
            sp.bias.requires_grad_(m.bias.requires_grad)
        rep.status = CONVERTED
        rep.activation = act
        replacements[id(m)] = sp
        if act_parent is not None:
            prefix = module_name(model, act_parent)
            replaced = f"{prefix}.{act_attr}" if prefix else act_attr
            applied.append(Fusion(linear=name, replaced=replaced, activation=act))
            pending.append((act_parent, act_attr, FusedActivation(name, act)))
    if pattern == "auto" and no_zeros and len(no_zeros) == len(by_name):
        raise ValueError(f"pattern='auto' found no zero weight in any selected layer ({', '.join(no_zeros[:4])}"
                         f"{', ...' if len(no_zeros) > 4 else ''}): it converts the zeros a pruned checkpoint has; "
                         "prune first (sparse.prune), or give pattern='block'/'balanced' and a sparsity")
    if fit_errors and not replacements and not any(r.status == KEPT_DENSE for r in layers):
        raise ValueError(f"the {pattern} pattern {args} fits none of the selected layers: " + "; ".join(fit_errors[:4]))
    replace_modules(model, replacements)
    for parent, attr, fused in pending:
        setattr(parent, attr, fused)
    qkv: List[QKVFusion] = []
    if fuse_qkv:
        converted = {id(sp) for sp in replacements.values()}
        only = [n for n, m in model.named_modules()
                if all(id(m._modules.get(k)) in converted for k in QKV_NAMES)]
        qkv = _fuse_qkv(model, only=only, sample_tokens=sample_tokens, repeats=repeats,
                        only_if_faster=skip_if_slower)
        for f in qkv:
            if f.applied:
                for key in QKV_NAMES:
                    rep = next(r for r in layers if r.name == f"{f.attention}.{key}")
                    rep.reason = f"runs in {f.attention}.{FUSED_QKV} (query, key and value as one op)"

    if quantize is not None:
        _quantize_converted(model, layers, replacements, quantize)
    ln_fusions: List[LayerNormFusion] = []
    if fuse_layernorm:
        converted = {r.name for r in layers if r.status == CONVERTED}
        only = [n for n, m in model.named_modules()
                if any(f"{n}.{dense}" in converted if n else dense in converted
                       for _, dense, _, _ in _RESIDUAL_LN_BLOCKS)]
        ln_fusions = _fuse_layernorm(model, only=only)

    threads = torch.get_num_threads()
    timing = (
        (
            f"median of {repeats} forward calls (dense and sparse alternating) after 2 warm-ups on a random "
            f"[{sample_tokens}, in] input in "
            f"the layer's dtype, {threads} threads; dense = the original layer"
            + (" followed by its activation when fused" if fuse_activations else "")
        )
        if sample_tokens
        else ""
    )
    settings = {
        "pattern": pattern,
        "pattern_args": args,
        "skip_if_slower": skip_if_slower,
        "fuse_activations": fuse_activations,
        "fuse_qkv": fuse_qkv,
        "fuse_layernorm": fuse_layernorm,
        "sample_tokens": sample_tokens,
        "repeats": repeats,
        "timing": timing,
        "torch": torch.__version__,
        "threads": threads,
        "quantize": quantize,
    }
    return SparsifyReport(layers=layers, fusions=applied, settings=settings, qkv_fusions=qkv,
                          layernorm_fusions=ln_fusions)


def _quantize_converted(model: nn.Module, layers: List[LayerReport], replacements: Dict[int, nn.Module],
                        mode: str) -> None:
    """sparsify(quantize=mode): the sparse layers this call built (and fused QKV ops over them) -> int8."""
    from .quant import convert_layer

    built = {id(sp) for sp in replacements.values()}
    reports = {r.name: r for r in layers}
    targets = []
    for name, m in model.named_modules():
        if not isinstance(m, (BlockSparseLinear, BalancedSparseLinear)):
            continue
        fused = name.endswith("." + FUSED_QKV) or name == FUSED_QKV
        if id(m) in built or fused:
            targets.append((name, m, fused))
    swaps = {id(m): convert_layer(name, m, mode) for name, m, _ in targets}
    replace_modules(model, swaps)
    for name, m, fused in targets:
        q = swaps[id(m)]
        if fused:  # the three projections' reports share the fused op
            prefix = name[: -len(FUSED_QKV)]
            for key in QKV_NAMES:
                rep = reports.get(prefix + key)
                if rep is not None:
                    rep.quantized = mode
        elif name in reports:
            reports[name].quantized = mode
            reports[name].bytes_after = q.nbytes


def compile(model: nn.Module, *, freezing: bool = True, **kwargs: Any) -> nn.Module:
    """``torch.compile(model)`` set up for a sparsified model's inference: Inductor fuses the dense remainder
    around the sparse ops (attention glue, LayerNorm, residual adds, copies), which it traces as opaque ops
    without graph breaks, and with ``freezing`` (the default) it folds the remaining dense weights as constants
    and pre-packs them. Freezing applies to calls under ``torch.no_grad()`` / ``torch.inference_mode()``; a
    training call compiles without it. ``kwargs`` go to ``torch.compile`` (``fullgraph=True``, ``dynamic``,
    ``mode``; ``options`` are merged with ``freezing``). The one-liner it stands for::

        model = torch.compile(model, options={"freezing": True})
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    options = dict(kwargs.pop("options", None) or {})
    options.setdefault("freezing", bool(freezing))
    return torch.compile(model, options=options, **kwargs)
