"""Measuring a (pruned) sentence encoder: embedding agreement with the dense model, size, and latency.

Embeddings are computed as sentence-transformers does for all-MiniLM-L6-v2: the last hidden state mean-pooled
over the attention mask, then L2-normalised.
"""

from __future__ import annotations

import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import _ext, timing, walk

__all__ = [
    "mean_pool",
    "embed",
    "agreement",
    "count_parameters",
    "weight_bytes",
    "PrepackedLinear",
    "prepack_linears",
    "time_forward",
    "ATTENTION_IMPLEMENTATIONS",
    "SDPA_BACKENDS",
    "set_attention",
    "attention_of",
    "attention_candidates",
    "pick_attention",
]

# transformers' attention implementations that run on any CPU, torch SDPA with one of its CPU backends forced
# (``sdpa`` lets torch pick: its flash kernel where the case allows, else math), and ours (``sparsekern``:
# sparse.ops.attention, where it applies; SDPA otherwise); which is fastest depends on the model's head size,
# sequence length, batch, dtype and mask, so it is measured, not assumed
ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager", "sdpa_math", "sdpa_flash", "sparsekern")
# Ours -> torch.nn.attention.SDPBackend member, for the implementations that force one.
SDPA_BACKENDS = {"sdpa_math": "MATH", "sdpa_flash": "FLASH_ATTENTION"}
# The implementations that go through transformers' AttentionInterface (a function of ours registered there).
_FUNCTION_IMPLEMENTATIONS = (*SDPA_BACKENDS, "sparsekern")
# The names they are registered under in transformers' AttentionInterface: "flash" in a name would make
# transformers look for the flash-attn package, and the prefix keeps clear of its own names.
_REGISTERED = {"sdpa_math": "sparse_sdpa_math", "sdpa_flash": "sparse_sdpa_fused", "sparsekern": "sparsekern"}


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` [B, S, H] over the positions where ``attention_mask`` [B, S] is 1: [B, H] (float32)."""
    m = attention_mask.unsqueeze(-1).to(torch.float32)
    return (hidden.float() * m).sum(1) / m.sum(1).clamp_min(1e-9)


@torch.inference_mode()
def embed(
    model: nn.Module,
    tokenizer,
    sentences: Sequence[str],
    *,
    batch_size: int = 64,
    max_length: int = 128,
) -> torch.Tensor:
    """Normalised sentence embeddings [N, H] (float32) of ``sentences``, in their order.

    Sentences are batched by length so that little time goes to padding."""
    if len(sentences) == 0:
        raise ValueError("sentences is empty")
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
    out: List[Optional[torch.Tensor]] = [None] * len(sentences)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            enc = tokenizer([sentences[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt")
            hidden = model(**enc).last_hidden_state
            pooled = F.normalize(mean_pool(hidden, enc["attention_mask"]), dim=-1)
            for j, i in enumerate(idx):
                out[i] = pooled[j]
    finally:
        model.train(was_training)
    return torch.stack(out)


def agreement(reference: torch.Tensor, candidate: torch.Tensor) -> Dict[str, float]:
    """How closely ``candidate`` embeddings [N, H] follow ``reference`` [N, H] (both L2-normalised).

    Returns ``cosine``: the mean cosine similarity of each sentence's two embeddings, in [-1, 1]; and
    ``top1_agreement``: the fraction of sentences whose nearest neighbour among the other N - 1 is the same
    under both, in [0, 1]."""
    if reference.shape != candidate.shape or reference.dim() != 2 or reference.shape[0] < 2:
        raise ValueError(f"need two [N >= 2, H] embeddings of one shape, got {tuple(reference.shape)} and "
                         f"{tuple(candidate.shape)}")

    def nearest(e: torch.Tensor) -> torch.Tensor:
        sim = e @ e.t()
        sim.fill_diagonal_(float("-inf"))
        return sim.argmax(dim=1)

    reference, candidate = reference.double(), candidate.double()
    cosine = F.cosine_similarity(reference, candidate, dim=1).mean().clamp(-1.0, 1.0).item()
    top1 = (nearest(reference) == nearest(candidate)).double().mean().item()
    return {"cosine": cosine, "top1_agreement": top1}


def count_parameters(model: nn.Module) -> int:
    """Stored parameter values: for sparse layers, the kept values only (their metadata is counted in bytes)."""
    return sum(p.numel() for p in model.parameters())


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (sparse layers: values plus index metadata), each tensor once."""
    seen = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


class PrepackedLinear(nn.Module):
    """``nn.Linear`` (optionally followed by an activation) through oneDNN with the weight reordered once into
    oneDNN's blocked layout, so no call reorders it. On CPUs where ``F.linear`` takes MKL's path (AMD EPYC, for
    one) this is the fastest dense fp32 Linear, the baseline a careful user would pick (docs/measurements.md).
    Inference only."""

    def __init__(self, linear: nn.Linear, activation: str = "none") -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.activation = activation
        w = linear.weight.detach()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
        self.bias = None if linear.bias is None else linear.bias.detach().clone()
        self._nbytes = w.numel() * w.element_size() + (
            0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(
            x, self.packed, self.bias, self.activation, [], "none" if self.activation == "gelu" else ""
        )

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, activation={self.activation}"


def _gelu_module(m: nn.Module) -> bool:
    """An exact-erf GELU (transformers' GELUActivation or nn.GELU('none'))."""
    if isinstance(m, nn.GELU):
        return m.approximate == "none"
    return type(m).__name__ == "GELUActivation"


def prepack_linears(model: nn.Module) -> int:
    """Replaces every ``nn.Linear`` of ``model`` (in place) by a :class:`PrepackedLinear`; in BERT-style
    intermediate blocks (``dense`` then ``intermediate_act_fn`` GELU) the GELU is fused into oneDNN's output
    stage, as the sparse patcher fuses it into the sparse kernel. Returns the number of layers replaced."""
    replacements, fused = {}, []
    for name, child in walk.linear_layers(model):
        if type(child) is not nn.Linear:
            continue
        parent_name, _, key = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        act = getattr(parent, "intermediate_act_fn", None)
        fuse = key == "dense" and act is not None and _gelu_module(act)
        replacements[id(child)] = PrepackedLinear(child, "gelu" if fuse else "none")
        if fuse:
            fused.append(parent)
    walk.replace_modules(model, replacements)
    for parent in fused:
        parent.intermediate_act_fn = nn.Identity()
    return len(replacements)


def time_forward(
    contenders: Dict[str, Callable[[], object]],
    *,
    rounds: int = 10,
    warmup: int = 2,
    progress: Optional[Callable[[], None]] = None,
) -> Dict[str, float]:
    """Median wall time in seconds of each zero-argument callable.

    The contenders take turns, one call each per round, so that a slow phase of a shared machine hits all of
    them alike; ``warmup`` untimed rounds come first. ``progress`` is called after each round."""
    with torch.inference_mode():
        samples = timing.interleaved(contenders, repeats=rounds, warmup=warmup, progress=progress)
    return {name: s.median for name, s in samples.items()}


def _sdpa_with_backend(backend_name: str) -> Callable:
    """transformers' SDPA attention function run under ``torch.nn.attention.sdpa_kernel([backend])``: inside the
    model's forward, so that it applies wherever the model is called (torch.compile traces the context too)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    backend = getattr(SDPBackend, backend_name)

    def attention(module, query, key, value, attention_mask, **kwargs):
        with sdpa_kernel([backend]):
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    attention.__name__ = f"sdpa_{backend_name.lower()}_attention_forward"
    return attention


def _sparsekern_attention() -> Callable:
    """transformers' attention function for ``sparsekern``: :func:`sparse.ops.attention` (our CPU kernel, written
    straight in the [B, L, H, D] layout the output projection reads) where it applies, i.e. CPU float32 / bfloat16
    inference without dropout, softcap or attention weights asked for; transformers' SDPA function otherwise
    (training, other devices and dtypes), so that the model computes what ``sdpa`` computes in every case."""
    from transformers.integrations.sdpa_attention import create_position_bias_mask, repeat_kv, sdpa_attention_forward

    from . import ops

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                  position_bias=None, **kwargs):
        wants_grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
        if (query.device.type != "cpu" or query.dtype not in (torch.float32, torch.bfloat16) or wants_grad
                or (dropout and module.training) or kwargs.get("softcap") is not None
                or kwargs.get("output_attentions", False) or key.shape[-1] != query.shape[-1]
                or query.shape[1] % key.shape[1] != 0):
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, is_causal=is_causal, position_bias=position_bias, **kwargs)
        q_length = query.shape[2]
        is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        is_causal = bool(q_length > 1 and attention_mask is None and is_causal)
        if position_bias is not None:
            if query.shape[1] != key.shape[1]:
                group = query.shape[1] // key.shape[1]
                key, value = repeat_kv(key, group), repeat_kv(value, group)
            attention_mask = create_position_bias_mask(position_bias, attention_mask, is_causal, query, key)
            is_causal = False
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return ops.attention(query, key, value, attention_mask, scale, is_causal), None

    attention.__name__ = "sparsekern_attention_forward"
    return attention


def _register(impl: str) -> str:
    """Registers ``impl`` (one of :data:`_FUNCTION_IMPLEMENTATIONS`) with transformers, once; returns its
    registered name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    name = _REGISTERED[impl]
    if name not in AttentionInterface._global_mapping:
        fn = _sparsekern_attention() if impl == "sparsekern" else _sdpa_with_backend(SDPA_BACKENDS[impl])
        AttentionInterface.register(name, fn)
        AttentionMaskInterface.register(name, sdpa_mask)  # the masks torch SDPA takes, as for "sdpa"
    return name


def set_attention(model: nn.Module, impl: str) -> bool:
    """Switches a ``transformers`` model to attention implementation ``impl`` (one of
    :data:`ATTENTION_IMPLEMENTATIONS`; ``sparsekern``: :func:`sparse.ops.attention` where it applies, SDPA
    elsewhere; ``sdpa_math`` / ``sdpa_flash``: SDPA with that CPU backend forced, inside
    the model's forward). Returns False, changing nothing, for a model without ``set_attn_implementation`` (not a
    ``transformers`` model). Raises ValueError for a model that cannot take ``impl`` (:func:`attention_candidates`)."""
    if impl not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {impl!r}: expected one of {ATTENTION_IMPLEMENTATIONS}")
    if not hasattr(model, "set_attn_implementation"):
        return False
    if impl in _FUNCTION_IMPLEMENTATIONS:
        if impl not in attention_candidates(model):
            raise ValueError(f"{type(model).__name__} does not run transformers' attention functions (needs "
                             f"_supports_sdpa and _supports_attention_backend): cannot run {impl!r}")
        model.set_attn_implementation(_register(impl))
    else:
        model.set_attn_implementation(impl)
    return True


def attention_of(model: nn.Module) -> Optional[str]:
    """The implementation ``model`` runs (a name of :data:`ATTENTION_IMPLEMENTATIONS`, or transformers' own name
    for any other), None for a model without transformers' attention switch."""
    config = getattr(model, "config", None)
    if not hasattr(model, "set_attn_implementation") or config is None:
        return None
    name = getattr(config, "_attn_implementation", None)
    return next((k for k, v in _REGISTERED.items() if v == name), name)


def attention_candidates(model: nn.Module) -> Tuple[str, ...]:
    """The implementations :func:`pick_attention` races on ``model``: ``sdpa`` and ``eager`` for any
    ``transformers`` model, plus the forced SDPA backends and ours (``sparsekern``, where the extension is built)
    where its attention goes through transformers' attention functions (``AttentionInterface``); () for any other
    model."""
    if not hasattr(model, "set_attn_implementation"):
        return ()
    forced = getattr(model, "_supports_sdpa", False) and getattr(model, "_supports_attention_backend", False)
    try:
        from transformers import AttentionInterface  # noqa: F401  (transformers >= 4.48)
    except ImportError:
        forced = False
    ours = _ext.available()  # sparsekern needs the extension's op
    return tuple(i for i in ATTENTION_IMPLEMENTATIONS
                 if (forced or i not in _FUNCTION_IMPLEMENTATIONS) and (ours or i != "sparsekern"))


def pick_attention(
    model: nn.Module, run: Callable[[], object], calls: int = 2
) -> Tuple[Optional[str], Dict[str, float]]:
    """Races :func:`attention_candidates` on ``model`` (transformers' ``sdpa`` and ``eager``, SDPA with its
    ``math`` and ``flash`` CPU backends forced, and our kernel, ``sparsekern``): ``run()`` (a call of ``model``)
    once to warm up, then the best of ``calls`` timed calls, for each. ``model`` is left with the fastest. Returns
    it and the seconds per implementation; an implementation that cannot run this case (e.g. SDPA's CPU flash
    kernel with dropout, in a training step) is left out of them. ``(None, {})`` for a model that cannot switch
    (see :func:`set_attention`)."""
    if calls < 1:
        raise ValueError(f"calls={calls}: expected >= 1")
    seconds: Dict[str, float] = {}
    candidates = attention_candidates(model)
    if not candidates:
        return None, {}
    for impl in candidates:
        try:
            set_attention(model, impl)
            with warnings.catch_warnings():
                # torch says why a forced backend does not fit the case, then raises: that is the answer here
                warnings.filterwarnings("ignore", message=r".*(kernel not used|do not support)", category=UserWarning)
                seconds[impl] = timing.sample(run, repeats=calls, warmup=1).min
        except RuntimeError:  # torch: "No available kernel" for a forced backend that does not fit the case
            if impl not in _FUNCTION_IMPLEMENTATIONS:
                raise
    winner = min(seconds, key=seconds.get)
    set_attention(model, winner)
    return winner, seconds
