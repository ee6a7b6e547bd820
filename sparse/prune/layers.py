"""Which layers of a model a pruner takes: its dense Linear-like layers, found and filtered as the patcher finds
and filters them (:mod:`sparse.walk`), less those that cannot be pruned on their own."""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn

from ..nn import dense_weight_of
from ..walk import (
    Filter,
    filter_reason,
    linear_layers,
    name_filter,
    parameter_names,
    tied_elsewhere,
    weight_read_directly,
)

__all__ = ["prunable_layers"]


def prunable_layers(
    model: nn.Module,
    include: Optional[Filter] = None,
    exclude: Optional[Filter] = None,
    *,
    fits: Optional[Callable[[torch.Tensor], object]] = None,
) -> Tuple[Dict[str, nn.Module], Dict[str, str]]:
    """The dense Linear / Conv1D layers of ``model`` to prune, by dotted name, and the layers left out with the
    reason.

    ``include`` / ``exclude`` select by name as in ``sparse.sparsify``; layers they leave out, and the
    ``out_proj`` of ``nn.MultiheadAttention`` (read directly by its parent), are simply not taken. A layer whose
    weight is tied to another module's, or for which ``fits(weight)`` (the dense ``[out, in]`` weight) raises
    ValueError (e.g. a block or bank that does not fit its shape), is left out and listed in the second dict.
    Returns ``(layers, skipped)``; layers in module order."""
    cands = linear_layers(model, dense_only=True)
    read_directly = weight_read_directly(model)
    names = [n for n, _ in cands]
    inc = name_filter(include, "include", names)
    exc = name_filter(exclude, "exclude", names)
    param_names = parameter_names(model)
    layers: Dict[str, nn.Module] = {}
    skipped: Dict[str, str] = {}
    for name, m in cands:
        if id(m) in read_directly or filter_reason(name, m, inc, exc) is not None:
            continue
        tied = tied_elsewhere(model, m, param_names)
        if tied:
            skipped[name] = f"weight is tied to {', '.join(tied)}"
            continue
        if fits is not None:
            try:
                fits(dense_weight_of(m))
            except ValueError as err:
                skipped[name] = str(err)
                continue
        layers[name] = m
    return layers, skipped
