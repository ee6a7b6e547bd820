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


def quantize_activations(x: torch.Tensor, qmax: int, clip: float = 0.0):
    """The int8 op's activation quantization (sparse/quant.py), in plain PyTorch: ``x`` [T, in] float32 or
    bfloat16 -> (integers [T, in] as float64 in [-qmax, qmax], per-token scales [T] float32)."""
    xf = x.float()
    if clip > 0:
        c = torch.full((xf.shape[0],), clip, dtype=torch.float32)
        bad = torch.isnan(xf).any(dim=1)
    else:
        c = xf.abs().amax(dim=1) if xf.shape[1] else torch.zeros(xf.shape[0])
        bad = ~torch.isfinite(c)
    inv = torch.tensor(float(qmax), dtype=torch.float32) / c
    tiny = ~(inv <= 3.0e38)
    q = torch.clamp(xf * inv[:, None], -qmax, qmax).round()
    zero = bad | tiny
    q = torch.where(zero[:, None], torch.zeros((), dtype=q.dtype), q).double()
    scale = c / torch.tensor(float(qmax), dtype=torch.float32)
    scale = torch.where(bad, torch.full((), float("nan")), torch.where(tiny, torch.zeros(()), scale))
    return q, scale


def int8_linear(x: torch.Tensor, weight, bias: Optional[torch.Tensor] = None, act: str = "none", qmax: int = 127,
                clip: float = 0.0) -> torch.Tensor:
    """What ``sparsekern::bsr_linear_int8`` computes, in float64 from the same integers: ``x`` [T, in] quantized as
    :func:`quantize_activations`, times the weight's integers (``QuantizedBlockSparseWeight``), scaled, + bias,
    activation."""
    q, s = quantize_activations(x, qmax, clip)
    out, inn = weight.shape
    qw = weight.to_dense().double() / torch.where(weight.w_scale > 0, weight.w_scale, torch.ones(())).double()[:, None]
    acc = q @ qw.round().t()
    y = acc * s.double()[:, None] * weight.w_scale.double()[None, :]
    if bias is not None:
        y = y + bias.double()
    return activation(y, act)
