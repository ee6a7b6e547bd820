"""Plain-PyTorch references of every op, computed in float64 on the densified weight. Tests and benchmarks
compare the kernels against these."""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

from . import activations as _activations
from .formats import BalancedSparseWeight, BlockSparseWeight

SparseWeight = Union[BlockSparseWeight, BalancedSparseWeight]


def activation(z: torch.Tensor, name: str) -> torch.Tensor:
    """The activations of the forward ops, as torch.nn.functional defines them (sparse/activations.py)."""
    return _activations.get(name).forward(z)


def linear(
    x: torch.Tensor, weight: SparseWeight, bias: Optional[torch.Tensor] = None, act: str = "none"
) -> torch.Tensor:
    """act(x W^T + b) in float64. x [..., in] -> [..., out]."""
    W = weight.to_dense().double()
    b = None if bias is None else bias.double()
    return activation(F.linear(x.double(), W, b), act)


def linear_grad_input(grad_out: torch.Tensor, weight: SparseWeight) -> torch.Tensor:
    """grad_out W in float64. [..., out] -> [..., in]."""
    return grad_out.double() @ weight.to_dense().double()


def gather(full: torch.Tensor, weight: SparseWeight) -> torch.Tensor:
    """The entries of a dense [out, in] matrix at the weight's stored positions, shaped like weight.values."""
    if isinstance(weight, BalancedSparseWeight):
        out, inn = weight.shape
        padded = F.pad(full, (0, weight.n_banks * weight.bank - inn)).reshape(out, weight.n_banks, weight.bank)
        return torch.gather(padded, -1, weight.indices.long())
    blocks = BlockSparseWeight._blocked(full, *weight.block)
    return blocks[weight._block_rows(), weight.col_indices.long()]


def sddmm(grad_out: torch.Tensor, x: torch.Tensor, weight: SparseWeight) -> torch.Tensor:
    """(grad_out^T x) at the stored positions, shaped like weight.values, in float64."""
    full = grad_out.reshape(-1, weight.shape[0]).double().t() @ x.reshape(-1, weight.shape[1]).double()
    return gather(full, weight)
