"""Pruning masks: which weights of one layer (or of several together) to keep.

A mask is bool, True = keep, shaped like the logical weight ``[out, in]``: unstructured magnitude, per layer
(:func:`magnitude_mask`) or with one threshold across layers (:func:`global_magnitude_masks`); block magnitude
(:func:`block_mask`, L1 or L2 norm per block); balanced / N:M (:func:`balanced_mask`, top-k per bank); any of them
from movement scores (:func:`movement_scores`; Sanh et al., 2020, "Movement Pruning") instead of magnitudes.
Ties between equal scores are broken by position (the earlier entry is kept), as in ``sparse.formats``.
"""

from __future__ import annotations

import math
from typing import Dict, Mapping, Optional, Sequence, Union

import torch

from ..formats import BalancedSparseWeight, BlockSparseWeight, _check_sparsity

__all__ = ["topk_mask", "magnitude_mask", "global_magnitude_masks", "block_mask", "balanced_mask", "movement_scores"]


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
