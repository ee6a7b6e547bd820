"""Attention-head pruning for BERT-style Hugging Face models (Michel et al., 2019, "Are Sixteen Heads Really
Better than One?"): :func:`head_importance` scores heads by the gradient of the loss with respect to a per-head
gate; :func:`prune_heads` removes heads and shrinks the Q/K/V and output projections. (Voita et al., 2019 learn the
gates with an L0 penalty instead; the shrinking step is the same.)
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

__all__ = ["head_importance", "prune_heads", "recorded_pruned_heads"]


def _attention_blocks(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """BERT-style attention blocks: ``.self`` with ``query``/``key``/``value`` Linears and ``.output.dense``."""
    found = []
    for name, m in model.named_modules():
        s, o = getattr(m, "self", None), getattr(m, "output", None)
        if (
            isinstance(s, nn.Module) and isinstance(o, nn.Module)
            and all(hasattr(s, a) for a in ("query", "key", "value", "num_attention_heads", "attention_head_size"))
            and hasattr(o, "dense")
        ):
            found.append((name, m))
    return found


def _require_blocks(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    blocks = _attention_blocks(model)
    if not blocks:
        raise ValueError(
            f"{type(model).__name__} has no BERT-style attention (a module with .self.query/.key/.value and "
            ".output.dense); head pruning supports BERT-style Hugging Face models"
        )
    return blocks


def head_importance(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    loss_fn: Optional[Callable[[Any, Any], torch.Tensor]] = None,
    normalize: bool = True,
) -> torch.Tensor:
    """Head importance of Michel et al. (2019): ``I_h = sum over batches |dL / d gate_h|`` for a gate
    multiplying each head's output (all gates 1, so the model computes what it always does).

    Args:
        model: a BERT-style Hugging Face model (dropout is switched off while scoring).
        batches: an iterable of dicts of model keyword inputs (or of tensors, passed positionally).
        loss_fn: ``(outputs, batch) -> scalar``; default: ``outputs.loss`` (the batches then carry labels).
        normalize: divide each layer's scores by their L2 norm, as Michel et al. do.
    Returns:
        float32 ``[n_layers, n_heads]`` over the original heads; already pruned heads are NaN.
    """
    blocks = _require_blocks(model)
    n_orig = [b.self.num_attention_heads + len(getattr(b.self, "pruned_heads", ())) for _, b in blocks]
    gates = [
        torch.ones(b.self.num_attention_heads, requires_grad=True, device=next(b.output.dense.parameters()).device)
        for _, b in blocks
    ]
    totals = [torch.zeros(g.shape[0]) for g in gates]

    def hook_for(gate: torch.Tensor, d: int):
        def hook(module, args):
            x = args[0]
            return (x * gate.to(x.dtype).repeat_interleave(d),) + tuple(args[1:])
        return hook

    handles = [
        b.output.dense.register_forward_pre_hook(hook_for(g, b.self.attention_head_size))
        for (_, b), g in zip(blocks, gates)
    ]
    was_training = model.training
    model.eval()
    try:
        n_batches = 0
        for batch in batches:
            out = (
                model(**batch)
                if isinstance(batch, Mapping)
                else model(*(batch if isinstance(batch, (tuple, list)) else (batch,)))
            )
            if loss_fn is not None:
                loss = loss_fn(out, batch)
            else:
                loss = getattr(out, "loss", None)
                if loss is None:
                    raise ValueError(
                        "the model returned no .loss: give batches with labels, or loss_fn=(outputs, batch) -> loss"
                    )
            grads = torch.autograd.grad(loss, gates, allow_unused=True)
            for t, g in zip(totals, grads):
                if g is not None:
                    t += g.detach().abs().float().cpu()
            n_batches += 1
        if n_batches == 0:
            raise ValueError("batches is empty")
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    result = torch.full((len(blocks), max(n_orig)), float("nan"))
    for i, ((_, b), t) in enumerate(zip(blocks, totals)):
        if normalize:
            t = t / t.norm().clamp_min(1e-20)
        pruned = getattr(b.self, "pruned_heads", set())
        remaining = [h for h in range(n_orig[i]) if h not in pruned]
        result[i, remaining] = t
    return result


def _shrink_linear(lin: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    """A copy of ``lin`` keeping the output rows (dim 0) or input columns (dim 1) in ``index``."""
    W = lin.weight.detach().index_select(dim, index.to(lin.weight.device)).clone()
    out, inn = W.shape
    new = nn.Linear(inn, out, bias=lin.bias is not None, device=W.device, dtype=W.dtype)
    with torch.no_grad():
        new.weight.copy_(W)
        if lin.bias is not None:
            new.bias.copy_(lin.bias if dim == 1 else lin.bias.index_select(0, index.to(lin.bias.device)))
    new.train(lin.training)
    new.weight.requires_grad_(lin.weight.requires_grad)
    return new


def prune_heads(
    model: nn.Module,
    heads: Union[Mapping[Union[int, str], Sequence[int]], float],
    *,
    importance: Optional[torch.Tensor] = None,
) -> Dict[int, List[int]]:
    """Removes attention heads of a BERT-style model and shrinks the projections: the rows of Q, K and V and the
    columns of the attention output's dense layer that belong to those heads. Works on transformers 5
    (which dropped ``model.prune_heads``); the attention reshapes by ``-1`` heads, so no other change is needed.

    Args:
        model: BERT-style model whose Q/K/V/output projections are still dense ``nn.Linear`` (prune heads
            before ``sparsify``).
        heads: ``{layer index: [head, ...]}`` with heads numbered as in the original model, or a fraction in
            (0, 1) of all heads to remove by lowest ``importance`` (global ranking; each layer keeps one head).
        importance: ``[n_layers, n_heads]`` from ``head_importance``, needed with a fraction.
    Returns:
        ``{layer index: [heads removed now]}``.
    """
    blocks = _require_blocks(model)
    if isinstance(heads, float):
        if not 0.0 < heads < 1.0:
            raise ValueError(f"a fraction of heads must be in (0, 1), got {heads}")
        if importance is None:
            raise ValueError("pruning a fraction of heads needs importance= (see head_importance)")
        if importance.dim() != 2 or importance.shape[0] != len(blocks):
            raise ValueError(f"importance must be [n_layers={len(blocks)}, n_heads], got {tuple(importance.shape)}")
        alive = ~torch.isnan(importance)
        n_prune = int(round(heads * int(alive.sum())))
        order = sorted(((float(importance[layer, h]), layer, h) for layer, h in alive.nonzero().tolist()))
        left = alive.sum(1).tolist()
        plan: Dict[int, List[int]] = {}
        for _, layer, h in order:
            if n_prune == 0:
                break
            if left[layer] > 1:
                plan.setdefault(layer, []).append(h)
                left[layer] -= 1
                n_prune -= 1
        heads = plan
    if not isinstance(heads, Mapping):
        raise TypeError(f"heads must be a {{layer: [heads]}} mapping or a float fraction, got {type(heads).__name__}")
    done: Dict[int, List[int]] = {}
    for key, hs in heads.items():
        layer = int(key)
        if not 0 <= layer < len(blocks):
            raise ValueError(f"layer index {key!r} out of range: the model has {len(blocks)} attention layers")
        name, block = blocks[layer]
        s, o = block.self, block.output
        for lin in (s.query, s.key, s.value, o.dense):
            if not isinstance(lin, nn.Linear):
                raise TypeError(
                    f"{name}: head pruning needs dense nn.Linear projections, found {type(lin).__name__}; prune "
                    "heads before sparsify"
                )
        pruned = set(getattr(s, "pruned_heads", set()))
        n_orig = s.num_attention_heads + len(pruned)
        bad = [h for h in hs if not 0 <= int(h) < n_orig]
        if bad:
            raise ValueError(f"layer {layer} has heads 0..{n_orig - 1}, got {bad}")
        new = sorted({int(h) for h in hs} - pruned)
        remaining = [h for h in range(n_orig) if h not in pruned]
        keep_pos = [i for i, h in enumerate(remaining) if h not in new]
        if not keep_pos:
            raise ValueError(f"cannot prune every head of layer {layer}")
        if not new:
            continue
        d = s.attention_head_size
        index = torch.cat([torch.arange(p * d, (p + 1) * d) for p in keep_pos])
        s.query = _shrink_linear(s.query, index, 0)
        s.key = _shrink_linear(s.key, index, 0)
        s.value = _shrink_linear(s.value, index, 0)
        o.dense = _shrink_linear(o.dense, index, 1)
        s.num_attention_heads = len(keep_pos)
        s.all_head_size = len(keep_pos) * d
        s.pruned_heads = pruned | set(new)
        done[layer] = new
    return done


def recorded_pruned_heads(model: nn.Module) -> Dict[str, List[int]]:
    """``{layer index (as str): sorted pruned heads}`` of the BERT-style attention blocks (for ``sparse.save``)."""
    return {
        str(i): sorted(b.self.pruned_heads)
        for i, (_, b) in enumerate(_attention_blocks(model))
        if getattr(b.self, "pruned_heads", None)
    }
