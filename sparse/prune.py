"""Pruning: which weights to keep.

- Masks (bool, True = keep, shaped like the logical weight ``[out, in]``): unstructured magnitude, per layer or
  global across layers; block magnitude (L1 or L2 norm per block); balanced / N:M (top-k per bank); any of them
  from movement scores (Sanh et al., 2020, "Movement Pruning") instead of magnitudes.
- Gradual pruning during fine-tuning (Zhu & Gupta, 2017, "To prune, or not to prune"): ``GradualPruner``
  raises the sparsity of dense weights along a cubic schedule, re-masking every ``frequency`` steps, and
  ``compact`` finally swaps the pruned layers for the sparse modules.
- Attention-head pruning for BERT-style Hugging Face models (Michel et al., 2019, "Are Sixteen Heads Really
  Better than One?"): ``head_importance`` scores heads by the gradient of the loss with respect to a per-head
  gate; ``prune_heads`` removes heads and shrinks the Q/K/V and output projections. (Voita et al., 2019 learn
  the gates with an L0 penalty instead; the shrinking step is the same.)

Ties between equal scores are broken by position (the earlier entry is kept), as in ``sparse.formats``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .formats import BalancedSparseWeight, BlockSparseWeight, _check_sparsity
from .nn import _is_conv1d, dense_weight_of
from .walk import filter_reason, linear_layers, name_filter, parameter_names, tied_elsewhere, weight_read_directly

__all__ = [
    "topk_mask", "magnitude_mask", "global_magnitude_masks", "block_mask", "balanced_mask", "movement_scores",
    "cubic_sparsity", "GradualPruner", "head_importance", "prune_heads", "recorded_pruned_heads",
]


# ---- masks ---------------------------------------------------------------------------------------------------------
def _n_drop(n: int, sparsity: float) -> int:
    # The same count as BlockSparseWeight.from_dense, so block masks and the format agree exactly.
    return int(math.floor(_check_sparsity(sparsity) * n + 1e-9))


def topk_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keeps the ``n - floor(sparsity * n)`` highest scores (ties: earlier positions first).

    Args: scores: any shape; sparsity in [0, 1). Returns: bool, the shape of ``scores``."""
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
    flat = scores.detach().flatten()
    n_drop = _n_drop(flat.numel(), sparsity)
    if n_drop == 0:
        return torch.ones_like(scores, dtype=torch.bool)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    # kthvalue finds the threshold in O(n); the entries equal to it are then taken in position order.
    thr = torch.kthvalue(flat, n_drop).values
    mask = flat > thr
    missing = flat.numel() - n_drop - int(mask.sum())
    if missing > 0:
        mask[(flat == thr).nonzero().squeeze(1)[:missing]] = True
    return mask.reshape(scores.shape)


def magnitude_mask(W: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Unstructured magnitude pruning of one weight: keeps the largest ``|W|``. ``W`` [out, in] -> bool [out, in]."""
    return topk_mask(W.abs(), sparsity)


def global_magnitude_masks(weights: Mapping[str, torch.Tensor], sparsity: float,
                           scores: Optional[Mapping[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
    """Magnitude pruning with one threshold across all the given weights (layers end at different sparsities).

    Args:
        weights: ``{name: W}``; sparsity: overall fraction dropped, in [0, 1).
        scores: optional ``{name: S}`` ranked instead of ``|W|`` (e.g. movement scores).
    Returns: ``{name: bool mask shaped like W}``."""
    if not weights:
        raise ValueError("weights is empty: give at least one {name: tensor}")
    names = list(weights)
    ranked = [(scores[n] if scores is not None else weights[n].abs()).detach().flatten().float() for n in names]
    flat = topk_mask(torch.cat([r.to(ranked[0].device) for r in ranked]), sparsity)
    out, start = {}, 0
    for n, r in zip(names, ranked):
        out[n] = flat[start:start + r.numel()].reshape(weights[n].shape).to(weights[n].device)
        start += r.numel()
    return out


def block_mask(W: torch.Tensor, block: Union[int, Sequence[int]], sparsity: float, norm: str = "l2",
               scores: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Block magnitude pruning: keeps the blocks with the largest norm.

    Args:
        W: ``[out, in]``; block: int or ``(rows, cols)`` (edge blocks may be ragged); sparsity: fraction of the
        block grid dropped, in [0, 1); norm: ``"l2"`` or ``"l1"`` of each block's weights.
        scores: optional ``[out, in]`` scores summed per block instead of the norm (movement block pruning).
    Returns: bool ``[out, in]``, constant over each block. With ``norm="l2"`` it keeps the same blocks as
    ``BlockSparseWeight.from_dense(W, block, sparsity=sparsity)``."""
    if norm not in ("l1", "l2"):
        raise ValueError(f"norm must be 'l1' or 'l2', got {norm!r}")
    if not isinstance(W, torch.Tensor) or W.dim() != 2:
        raise ValueError(f"W must be a 2-D tensor [out, in], got {getattr(W, 'shape', type(W).__name__)}")
    shape = (int(W.shape[0]), int(W.shape[1]))
    bo, bi = BlockSparseWeight._parse_block(block, shape)
    if scores is not None:
        if scores.shape != W.shape:
            raise ValueError(f"scores must have W's shape {tuple(W.shape)}, got {tuple(scores.shape)}")
        per_block = BlockSparseWeight._blocked(scores.detach().float(), bo, bi).sum(dim=(2, 3))
    elif norm == "l2":
        per_block = BlockSparseWeight._blocked(W.detach().float(), bo, bi).pow(2).sum(dim=(2, 3))
    else:
        per_block = BlockSparseWeight._blocked(W.detach().float(), bo, bi).abs().sum(dim=(2, 3))
    grid = topk_mask(per_block, sparsity)
    return grid.repeat_interleave(bo, 0).repeat_interleave(bi, 1)[: shape[0], : shape[1]]


def balanced_mask(W: torch.Tensor, bank: int, keep: int, scores: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Balanced (N:M) pruning: in every row, keeps the ``keep`` largest ``|W|`` (or ``scores``) of each bank of
    ``bank`` consecutive columns. ``W`` [out, in] -> bool [out, in]; the same entries as
    ``BalancedSparseWeight.from_dense(W, bank, keep)``."""
    if scores is not None and scores.shape != W.shape:
        raise ValueError(f"scores must have W's shape {tuple(W.shape)}, got {tuple(scores.shape)}")
    if scores is None:
        return BalancedSparseWeight.from_dense(W.detach(), bank, keep).mask()
    # Shift scores to be positive so that from_dense's |.| ranking is the score ranking.
    s = scores.detach().float()
    return BalancedSparseWeight.from_dense(s - s.min() + 1.0, bank, keep).mask()


def movement_scores(W: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """One step's movement score ``-W * dL/dW`` (Sanh et al., 2020): positive when the step moves the weight
    away from zero. Accumulate it over steps (``S += movement_scores(W, W.grad)``) and keep the highest.
    Shapes: ``W`` and ``grad`` alike; returns float32 of that shape."""
    if W.shape != grad.shape:
        raise ValueError(f"W {tuple(W.shape)} and grad {tuple(grad.shape)} must have the same shape")
    return -(W.detach().float() * grad.detach().float())


def cubic_sparsity(step: int, initial: float, final: float, start: int, end: int) -> float:
    """Zhu & Gupta's schedule: ``final + (initial - final) * (1 - (step - start) / (end - start))**3`` between
    ``start`` and ``end``, ``initial`` before, ``final`` after."""
    _check_sparsity(initial)
    _check_sparsity(final)
    if end <= start:
        raise ValueError(f"end must be > start, got start={start}, end={end}")
    if step <= start:
        return float(initial)
    if step >= end:
        return float(final)
    return float(final + (initial - final) * (1.0 - (step - start) / (end - start)) ** 3)


# ---- gradual pruning -----------------------------------------------------------------------------------------------
PRUNE_PATTERNS = ("unstructured", "block", "balanced")


class GradualPruner:
    """Gradual pruning of a model's dense Linear / Conv1D weights during training (Zhu & Gupta, 2017).

    Call ``step()`` after every optimizer step. Every ``frequency`` steps from ``start_step`` to ``end_step`` it
    recomputes the masks at ``cubic_sparsity(step, initial_sparsity, final_sparsity, start_step, end_step)``
    from the current weights (``method="magnitude"``) or from the accumulated movement scores
    (``method="movement"``; ``step()`` must then see the gradients, i.e. come before ``zero_grad``); every step
    it re-applies the masks, so pruned weights stay zero whatever the optimizer does. ``compact(model)`` then
    swaps the pruned layers for sparse modules with exactly those masks.

    Args:
        model: the model to prune. final_sparsity: in [0, 1). pattern: ``"unstructured"``, ``"block"`` or
        ``"balanced"`` (the latter two can be compacted). block / norm: as ``block_mask``. bank: as
        ``balanced_mask``; the kept count is ``round(bank * (1 - sparsity))``. scope: ``"layer"`` or (unstructured
        only) ``"global"``. include / exclude: as ``sparse.sparsify``.
    """

    def __init__(
        self,
        model: nn.Module,
        final_sparsity: float,
        *,
        end_step: int,
        start_step: int = 0,
        frequency: int = 100,
        initial_sparsity: float = 0.0,
        pattern: str = "unstructured",
        block: Union[int, Sequence[int]] = 32,
        norm: str = "l2",
        bank: int = 32,
        method: str = "magnitude",
        scope: str = "layer",
        include: Any = None,
        exclude: Any = None,
    ) -> None:
        if pattern not in PRUNE_PATTERNS:
            raise ValueError(f"pattern must be one of {PRUNE_PATTERNS}, got {pattern!r}")
        if method not in ("magnitude", "movement"):
            raise ValueError(f"method must be 'magnitude' or 'movement', got {method!r}")
        if scope not in ("layer", "global") or (scope == "global" and pattern != "unstructured"):
            raise ValueError(f"scope must be 'layer', or 'global' with pattern='unstructured'; got scope={scope!r}, pattern={pattern!r}")
        if isinstance(frequency, bool) or not isinstance(frequency, int) or frequency < 1:
            raise ValueError(f"frequency must be an int >= 1, got {frequency!r}")
        cubic_sparsity(start_step, initial_sparsity, final_sparsity, start_step, end_step)  # validates
        if pattern == "balanced" and round(bank * (1 - final_sparsity)) < 1:
            raise ValueError(f"final_sparsity={final_sparsity} keeps nothing of a bank of {bank}")
        self.final_sparsity, self.initial_sparsity = float(final_sparsity), float(initial_sparsity)
        self.start_step, self.end_step, self.frequency = start_step, end_step, frequency
        self.pattern, self.block, self.norm, self.bank, self.method, self.scope = pattern, block, norm, bank, method, scope

        cands = linear_layers(model, dense_only=True)
        read_directly = weight_read_directly(model)
        names = [n for n, _ in cands]
        inc = name_filter(include, "include", names)
        exc = name_filter(exclude, "exclude", names)
        param_names = parameter_names(model)
        self.layers: Dict[str, nn.Module] = {}
        self.skipped: Dict[str, str] = {}
        for name, m in cands:
            if id(m) in read_directly or filter_reason(name, m, inc, exc) is not None:
                continue
            tied = tied_elsewhere(model, m, param_names)
            if tied:
                self.skipped[name] = f"weight is tied to {', '.join(tied)}"
                continue
            try:  # a layer the final pattern does not fit stays dense
                self._mask_for(dense_weight_of(m), None, self.final_sparsity)
            except ValueError as err:
                self.skipped[name] = str(err)
                continue
            self.layers[name] = m
        if not self.layers:
            raise ValueError(f"no layer to prune: {self.skipped or 'the filters select no Linear layer'}")
        self.masks: Dict[str, torch.Tensor] = {
            n: torch.ones(dense_weight_of(m).shape, dtype=torch.bool, device=m.weight.device) for n, m in self.layers.items()
        }
        self.scores: Dict[str, torch.Tensor] = {}
        if method == "movement":
            self.scores = {n: torch.zeros(dense_weight_of(m).shape, device=m.weight.device) for n, m in self.layers.items()}
        self.step_count = 0
        self.sparsity = 0.0
        if self.initial_sparsity > 0 and self.start_step <= 0:
            self.update_masks()

    def _mask_for(self, W: torch.Tensor, scores: Optional[torch.Tensor], sparsity: float) -> torch.Tensor:
        if self.pattern == "unstructured":
            return topk_mask(scores, sparsity) if scores is not None else magnitude_mask(W, sparsity)
        if self.pattern == "block":
            return block_mask(W, self.block, sparsity, self.norm, scores=scores)
        return balanced_mask(W, self.bank, self.keep_at(sparsity), scores=scores)

    def keep_at(self, sparsity: float) -> int:
        """The balanced kept count per bank at ``sparsity`` (at least 1)."""
        return max(1, round(self.bank * (1 - sparsity)))

    def update_masks(self) -> None:
        """Recomputes every mask at the schedule's current sparsity and applies it."""
        self.sparsity = cubic_sparsity(self.step_count, self.initial_sparsity, self.final_sparsity, self.start_step, self.end_step)
        weights = {n: dense_weight_of(m) for n, m in self.layers.items()}
        scores = self.scores if self.method == "movement" else None
        if self.scope == "global":
            self.masks = global_magnitude_masks(weights, self.sparsity, scores)
        else:
            self.masks = {n: self._mask_for(W, None if scores is None else scores[n], self.sparsity) for n, W in weights.items()}
        self.apply_masks()

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zeroes the pruned weights (in place)."""
        for n, m in self.layers.items():
            dense_weight_of(m).mul_(self.masks[n].to(m.weight.dtype))

    def step(self) -> None:
        """One training step done: accumulate movement scores, update the masks when due, re-apply them."""
        if self.method == "movement":
            for n, m in self.layers.items():
                g = m.weight.grad
                if g is not None:
                    self.scores[n] += movement_scores(dense_weight_of(m), g.t() if _is_conv1d(m) else g)
        self.step_count += 1
        due = self.start_step <= self.step_count <= self.end_step and (self.step_count - self.start_step) % self.frequency == 0
        if due or (self.step_count == self.end_step):
            self.update_masks()
        else:
            self.apply_masks()

    def compact(self, model: nn.Module, **sparsify_kwargs: Any):
        """Swaps the pruned layers of ``model`` (the model given at construction) for sparse modules built from
        exactly the current masks. Keyword arguments go to ``sparse.sparsify`` (e.g. ``skip_if_slower``,
        ``fuse_activations``). Returns its SparsifyReport."""
        from .patch import sparsify

        if self.pattern == "unstructured":
            raise ValueError("unstructured masks have no sparse module; prune with pattern='block' or 'balanced' to compact")
        for n, m in self.layers.items():
            try:
                found = model.get_submodule(n)
            except AttributeError:
                found = None
            if found is not m:
                raise ValueError(f"compact(model) needs the model this pruner was built on; its layer {n!r} differs")
        if self.pattern == "block":
            return sparsify(model, "block", block=self.block, masks=dict(self.masks), **sparsify_kwargs)
        return sparsify(model, "balanced", bank=self.bank, keep=self.keep_at(self.sparsity), masks=dict(self.masks),
                        **sparsify_kwargs)


# ---- attention heads -----------------------------------------------------------------------------------------------
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
    gates = [torch.ones(b.self.num_attention_heads, requires_grad=True, device=next(b.output.dense.parameters()).device) for _, b in blocks]
    totals = [torch.zeros(g.shape[0]) for g in gates]

    def hook_for(gate: torch.Tensor, d: int):
        def hook(module, args):
            x = args[0]
            return (x * gate.to(x.dtype).repeat_interleave(d),) + tuple(args[1:])
        return hook

    handles = [b.output.dense.register_forward_pre_hook(hook_for(g, b.self.attention_head_size)) for (_, b), g in zip(blocks, gates)]
    was_training = model.training
    model.eval()
    try:
        n_batches = 0
        for batch in batches:
            out = model(**batch) if isinstance(batch, Mapping) else model(*(batch if isinstance(batch, (tuple, list)) else (batch,)))
            if loss_fn is not None:
                loss = loss_fn(out, batch)
            else:
                loss = getattr(out, "loss", None)
                if loss is None:
                    raise ValueError("the model returned no .loss: give batches with labels, or loss_fn=(outputs, batch) -> loss")
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
        order = sorted(((float(importance[l, h]), l, h) for l, h in alive.nonzero().tolist()))
        left = alive.sum(1).tolist()
        plan: Dict[int, List[int]] = {}
        for _, l, h in order:
            if n_prune == 0:
                break
            if left[l] > 1:
                plan.setdefault(l, []).append(h)
                left[l] -= 1
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
                raise TypeError(f"{name}: head pruning needs dense nn.Linear projections, found {type(lin).__name__}; prune heads before sparsify")
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
