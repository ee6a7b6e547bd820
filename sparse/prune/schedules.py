"""Gradual pruning during fine-tuning (Zhu & Gupta, 2017, "To prune, or not to prune"): the cubic sparsity
schedule (:func:`cubic_sparsity`) and :class:`GradualPruner`, which raises the sparsity of a model's dense weights
along it, re-masking every ``frequency`` steps, and whose ``compact`` finally swaps the pruned layers for the
sparse modules.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Union

import torch
from torch import nn

from ..distributed import broadcast_from_first_rank_, mean_across_ranks_
from ..formats import _check_sparsity
from ..nn import _is_conv1d, dense_weight_of
from ..patch import sparsify
from ..walk import Filter
from .layers import prunable_layers
from .masks import balanced_mask, block_mask, global_magnitude_masks, magnitude_mask, movement_scores, topk_mask

__all__ = ["cubic_sparsity", "PRUNE_PATTERNS", "GradualPruner"]


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
        model: the model to prune. final_sparsity: in [0, 1). pattern: ``"unstructured"`` (compacted into 1x1
        blocks, ``sparsify``'s ``"unstructured"``), ``"block"`` or ``"balanced"``. block / norm: as ``block_mask``.
        bank: as ``balanced_mask``; the kept count is ``round(bank * (1 - sparsity))``. scope: ``"layer"`` or
        (unstructured only) ``"global"``. include / exclude: as ``sparse.sparsify``. The layers taken and those left
        out (with the reason) are ``layers`` and ``skipped``; see :func:`sparse.prune.layers.prunable_layers`.
        group: the ``torch.distributed`` process group whose ranks prune together (default: the world).

    Across processes (``torch.distributed`` initialised, more than one rank in ``group``), every mask update is a
    collective, so every rank must call ``step()`` equally often: movement scores are first averaged over the ranks
    (the masks then come from the whole global batch, even where the ranks' gradients differ, e.g. accumulated
    under DDP's ``no_sync`` or without DDP), and the masks chosen are then broadcast from the group's first rank, so
    no rank can end with other masks (magnitudes included, where the ranks' weights differ). In one process nothing
    of this happens.
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
        include: Optional[Filter] = None,
        exclude: Optional[Filter] = None,
        group: Optional[Any] = None,
    ) -> None:
        if pattern not in PRUNE_PATTERNS:
            raise ValueError(f"pattern must be one of {PRUNE_PATTERNS}, got {pattern!r}")
        if method not in ("magnitude", "movement"):
            raise ValueError(f"method must be 'magnitude' or 'movement', got {method!r}")
        if scope not in ("layer", "global") or (scope == "global" and pattern != "unstructured"):
            raise ValueError(
                f"scope must be 'layer', or 'global' with pattern='unstructured'; got scope={scope!r}, "
                f"pattern={pattern!r}"
            )
        if isinstance(frequency, bool) or not isinstance(frequency, int) or frequency < 1:
            raise ValueError(f"frequency must be an int >= 1, got {frequency!r}")
        cubic_sparsity(start_step, initial_sparsity, final_sparsity, start_step, end_step)  # validates
        if pattern == "balanced" and round(bank * (1 - final_sparsity)) < 1:
            raise ValueError(f"final_sparsity={final_sparsity} keeps nothing of a bank of {bank}")
        self.final_sparsity, self.initial_sparsity = float(final_sparsity), float(initial_sparsity)
        self.start_step, self.end_step, self.frequency = start_step, end_step, frequency
        self.pattern, self.block, self.norm, self.bank, self.method, self.scope = (
            pattern,
            block,
            norm,
            bank,
            method,
            scope,
        )

        # A layer the final pattern does not fit stays dense.
        self.layers, self.skipped = prunable_layers(
            model, include, exclude, fits=lambda W: self._mask_for(W, None, self.final_sparsity))
        if not self.layers:
            raise ValueError(f"no layer to prune: {self.skipped or 'the filters select no Linear layer'}")
        self.masks: Dict[str, torch.Tensor] = {
            n: torch.ones(dense_weight_of(m).shape, dtype=torch.bool, device=m.weight.device)
            for n, m in self.layers.items()
        }
        self.scores: Dict[str, torch.Tensor] = {}
        if method == "movement":
            self.scores = {
                n: torch.zeros(dense_weight_of(m).shape, device=m.weight.device) for n, m in self.layers.items()
            }
        self.group = group
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
        self.sparsity = cubic_sparsity(
            self.step_count, self.initial_sparsity, self.final_sparsity, self.start_step, self.end_step
        )
        weights = {n: dense_weight_of(m) for n, m in self.layers.items()}
        scores = self.scores if self.method == "movement" else None
        if scores is not None:  # across ranks: every rank ranks the same, global, scores
            mean_across_ranks_(scores.values(), self.group)
        if self.scope == "global":
            self.masks = global_magnitude_masks(weights, self.sparsity, scores)
        else:
            self.masks = {
                n: self._mask_for(W, None if scores is None else scores[n], self.sparsity) for n, W in weights.items()
            }
        broadcast_from_first_rank_(self.masks.values(), self.group)  # and the first rank's masks are final
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
        due = (
            self.start_step <= self.step_count <= self.end_step
            and (self.step_count - self.start_step) % self.frequency == 0
        )
        if due or (self.step_count == self.end_step):
            self.update_masks()
        else:
            self.apply_masks()

    def compact(self, model: nn.Module, **sparsify_kwargs: Any):
        """Swaps the pruned layers of ``model`` (the model given at construction) for sparse modules built from
        exactly the current masks. Keyword arguments go to ``sparse.sparsify`` (e.g. ``skip_if_slower``,
        ``fuse_activations``). Returns its SparsifyReport."""
        for n, m in self.layers.items():
            try:
                found = model.get_submodule(n)
            except AttributeError:
                found = None
            if found is not m:
                raise ValueError(f"compact(model) needs the model this pruner was built on; its layer {n!r} differs")
        if self.pattern == "unstructured":  # 1x1 blocks (CSR), layer and global scope alike
            return sparsify(model, "unstructured", masks=dict(self.masks), **sparsify_kwargs)
        if self.pattern == "block":
            return sparsify(model, "block", block=self.block, masks=dict(self.masks), **sparsify_kwargs)
        return sparsify(model, "balanced", bank=self.bank, keep=self.keep_at(self.sparsity), masks=dict(self.masks),
                        **sparsify_kwargs)
