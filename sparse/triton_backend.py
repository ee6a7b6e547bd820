"""The Triton backend: the kernels of ``sparse.kernels`` registered as ``torch.library.triton_op`` operators
(``torch.ops.sparsekern.triton_*``) with autograd, so ``torch.compile(fullgraph=True)`` traces into them.

Each op has the schema of the C++ op of the same name without the ``triton_`` prefix (csrc/ops.cpp), so
``sparse.ops`` dispatches to either by name. They run on CUDA tensors, and on CPU tensors only under
``TRITON_INTERPRET=1`` (tests). Importing this module imports triton; ``sparse.ops`` does so only when the
Triton backend is used.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.library import triton_op

from .kernels import balanced, bsr
from .ops import balanced_autograd, bsr_autograd

__all__ = [
    "triton_bsr_linear", "triton_bsr_linear_grad_input", "triton_bsr_sddmm",
    "triton_balanced_linear", "triton_balanced_linear_grad_input", "triton_balanced_sddmm",
]


@triton_op("sparsekern::triton_bsr_linear", mutates_args=())
def triton_bsr_linear(
    x: torch.Tensor, values: torch.Tensor, row_offsets: torch.Tensor, col_indices: torch.Tensor,
    col_offsets: torch.Tensor, row_indices: torch.Tensor, block_perm: torch.Tensor, out_features: int,
    bias: Optional[torch.Tensor] = None, activation: str = "none",
) -> torch.Tensor:
    """act(x W^T + bias): x [T, in] -> [T, out]. The column-order metadata is used by the backward only."""
    return bsr.bsr_linear(x, values, row_offsets, col_indices, out_features, bias, activation)


@triton_op("sparsekern::triton_bsr_linear_grad_input", mutates_args=())
def triton_bsr_linear_grad_input(
    grad_out: torch.Tensor, values: torch.Tensor, col_offsets: torch.Tensor, row_indices: torch.Tensor,
    block_perm: torch.Tensor, in_features: int,
) -> torch.Tensor:
    """grad_out W: [T, out] -> [T, in]."""
    return bsr.bsr_linear_grad_input(grad_out, values, col_offsets, row_indices, block_perm, in_features)


@triton_op("sparsekern::triton_bsr_sddmm", mutates_args=())
def triton_bsr_sddmm(
    grad_out: torch.Tensor, x: torch.Tensor, values: torch.Tensor, row_offsets: torch.Tensor, col_indices: torch.Tensor,
) -> torch.Tensor:
    """(grad_out^T x) at the kept blocks: -> like values [nnz, bo, bi]."""
    return bsr.bsr_sddmm(grad_out, x, values, row_offsets, col_indices)


@triton_op("sparsekern::triton_balanced_linear", mutates_args=())
def triton_balanced_linear(
    x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, bank: int,
    bias: Optional[torch.Tensor] = None, activation: str = "none",
) -> torch.Tensor:
    """act(x W^T + bias): x [T, in] -> [T, out]."""
    return balanced.balanced_linear(x, values, indices, bank, bias, activation)


@triton_op("sparsekern::triton_balanced_linear_grad_input", mutates_args=())
def triton_balanced_linear_grad_input(
    grad_out: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, bank: int, in_features: int,
) -> torch.Tensor:
    """grad_out W: [T, out] -> [T, in]."""
    return balanced.balanced_linear_grad_input(grad_out, values, indices, bank, in_features)


@triton_op("sparsekern::triton_balanced_sddmm", mutates_args=())
def triton_balanced_sddmm(grad_out: torch.Tensor, x: torch.Tensor, indices: torch.Tensor, bank: int) -> torch.Tensor:
    """(grad_out^T x) at the kept positions: -> [out, n_banks, keep]."""
    return balanced.balanced_sddmm(grad_out, x, indices, bank)


# ---- autograd: gradients for x, values and bias; the backward calls only ops, so it traces too ----------
_bsr_backward, _bsr_setup = bsr_autograd("triton_")
triton_bsr_linear.register_autograd(_bsr_backward, setup_context=_bsr_setup)
_balanced_backward, _balanced_setup = balanced_autograd("triton_")
triton_balanced_linear.register_autograd(_balanced_backward, setup_context=_balanced_setup)
