"""The Triton backend: the kernels of ``sparse.kernels`` registered as ``torch.library.triton_op`` operators
(``torch.ops.sparsekern.triton_*``) with autograd, so ``torch.compile(fullgraph=True)`` traces into them.

Each op has the schema of the C++ op of the same name without the ``triton_`` prefix (csrc/ops.cpp), so
``sparse.ops`` dispatches to either by name. They run on CUDA tensors, and on CPU tensors only under
``TRITON_INTERPRET=1`` (tests). Importing this module imports triton; ``sparse.ops`` does so only when the
Triton backend is used.

The bsr ops serve every ``BlockSparseWeight``: unstructured weights (1x1 blocks) go to the CSR kernels
(kernels/csr.py), which gather single elements, instead of bsr.py's, which would pad every 1x1 block to a 16x16
tl.dot tile. The choice is made inside the op from the values' shape, so the fake kernel (traced through the same
function) and the autograd below serve both.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.library import triton_op

from .activations import get as _activation
from .kernels import balanced, bsr, bsr_int8, csr

__all__ = [
    "triton_bsr_linear", "triton_bsr_linear_grad_input", "triton_bsr_sddmm",
    "triton_balanced_linear", "triton_balanced_linear_grad_input", "triton_balanced_sddmm",
    "triton_bsr_linear_int8",
]


def _split_activation(activation: str):
    """(the activation the kernel applies in its output stage, the function applied to the kernel's result): the
    kernels fuse the activations they have code for (bsr.ACTIVATION_CODES); any other row of the activation table
    runs after the kernel, from its torch definition."""
    act = _activation(activation)
    if act.name in bsr.ACTIVATION_CODES:
        return act.name, lambda y: y
    return "none", act.forward


@triton_op("sparsekern::triton_bsr_linear", mutates_args=())
def triton_bsr_linear(
    x: torch.Tensor, values: torch.Tensor, row_offsets: torch.Tensor, col_indices: torch.Tensor,
    col_offsets: torch.Tensor, row_indices: torch.Tensor, block_perm: torch.Tensor, out_features: int,
    bias: Optional[torch.Tensor] = None, activation: str = "none",
) -> torch.Tensor:
    """act(x W^T + bias): x [T, in] -> [T, out]. The column-order metadata is used by the backward only."""
    fused, after = _split_activation(activation)
    kernel = csr.csr_linear if csr.is_csr(values) else bsr.bsr_linear
    return after(kernel(x, values, row_offsets, col_indices, out_features, bias, fused))


@triton_op("sparsekern::triton_bsr_linear_grad_input", mutates_args=())
def triton_bsr_linear_grad_input(
    grad_out: torch.Tensor, values: torch.Tensor, col_offsets: torch.Tensor, row_indices: torch.Tensor,
    block_perm: torch.Tensor, in_features: int,
) -> torch.Tensor:
    """grad_out W: [T, out] -> [T, in]."""
    kernel = csr.csr_linear_grad_input if csr.is_csr(values) else bsr.bsr_linear_grad_input
    return kernel(grad_out, values, col_offsets, row_indices, block_perm, in_features)


@triton_op("sparsekern::triton_bsr_sddmm", mutates_args=())
def triton_bsr_sddmm(
    grad_out: torch.Tensor, x: torch.Tensor, values: torch.Tensor, row_offsets: torch.Tensor, col_indices: torch.Tensor,
) -> torch.Tensor:
    """(grad_out^T x) at the kept blocks: -> like values [nnz, bo, bi]."""
    kernel = csr.csr_sddmm if csr.is_csr(values) else bsr.bsr_sddmm
    return kernel(grad_out, x, values, row_offsets, col_indices)


@triton_op("sparsekern::triton_balanced_linear", mutates_args=())
def triton_balanced_linear(
    x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, bank: int,
    bias: Optional[torch.Tensor] = None, activation: str = "none",
) -> torch.Tensor:
    """act(x W^T + bias): x [T, in] -> [T, out]."""
    fused, after = _split_activation(activation)
    return after(balanced.balanced_linear(x, values, indices, bank, bias, fused))


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


@triton_op("sparsekern::triton_bsr_linear_int8", mutates_args=())
def triton_bsr_linear_int8(
    x: torch.Tensor, qvalues: torch.Tensor, w_scale: torch.Tensor, w_sum: torch.Tensor, row_offsets: torch.Tensor,
    col_indices: torch.Tensor, out_features: int, in_block: int, bias: Optional[torch.Tensor] = None,
    activation: str = "none", clip: float = 0.0,
) -> torch.Tensor:
    """The int8 forward (inference only, no autograd): x [T, in] quantized per token (``clip`` 0) or with a static
    clip, as signed int8 with qmax 127 on every GPU. ``w_sum`` is unused (the GPU's activations have no zero
    point); it keeps the C++ op's schema (sparse.quant passes both the same arguments)."""
    fused, after = _split_activation(activation)
    return after(bsr_int8.bsr_linear_int8(x, qvalues, w_scale, row_offsets, col_indices, out_features, in_block,
                                          bias, fused, clip))


# ---- autograd: gradients for x, values and bias; the backward calls only ops, so it traces too ----------
# The same backward as the C++ autograd of the CPU/CUDA ops (csrc/autograd.cpp): the pre-activation is recomputed
# rather than kept alive, then dX = grad_input op, dW = SDDMM op, db = sum.


def _setup_common(ctx, x: torch.Tensor, bias: Optional[torch.Tensor], activation: str) -> None:
    ctx.activation = activation
    ctx.in_features = x.shape[1]
    ctx.has_bias = bias is not None


def _bsr_setup(ctx, inputs, output):
    x, values, row_offsets, col_indices, col_offsets, row_indices, block_perm, out_features, bias, activation = inputs
    _setup_common(ctx, x, bias, activation)
    ctx.out_features = out_features
    ctx.save_for_backward(x, values, row_offsets, col_indices, col_offsets, row_indices, block_perm, bias)


def _bsr_backward(ctx, grad):
    ops = torch.ops.sparsekern
    x, values, row_offsets, col_indices, col_offsets, row_indices, block_perm, bias = ctx.saved_tensors
    if ctx.activation != "none":
        z = ops.triton_bsr_linear(x, values, row_offsets, col_indices, col_offsets, row_indices, block_perm,
                                  ctx.out_features, bias, "none")
        grad = _activation(ctx.activation).backward(grad, z)
    grad = grad.contiguous()
    gx = gv = gb = None
    if ctx.needs_input_grad[0]:
        gx = ops.triton_bsr_linear_grad_input(grad, values, col_offsets, row_indices, block_perm, ctx.in_features)
    if ctx.needs_input_grad[1]:
        gv = ops.triton_bsr_sddmm(grad, x, values, row_offsets, col_indices)
    if ctx.has_bias and ctx.needs_input_grad[8]:
        gb = grad.sum(0)
    return gx, gv, None, None, None, None, None, None, gb, None


def _balanced_setup(ctx, inputs, output):
    x, values, indices, bank, bias, activation = inputs
    _setup_common(ctx, x, bias, activation)
    ctx.bank = bank
    ctx.save_for_backward(x, values, indices, bias)


def _balanced_backward(ctx, grad):
    ops = torch.ops.sparsekern
    x, values, indices, bias = ctx.saved_tensors
    if ctx.activation != "none":
        z = ops.triton_balanced_linear(x, values, indices, ctx.bank, bias, "none")
        grad = _activation(ctx.activation).backward(grad, z)
    grad = grad.contiguous()
    gx = gv = gb = None
    if ctx.needs_input_grad[0]:
        gx = ops.triton_balanced_linear_grad_input(grad, values, indices, ctx.bank, ctx.in_features)
    if ctx.needs_input_grad[1]:
        gv = ops.triton_balanced_sddmm(grad, x, indices, ctx.bank)
    if ctx.has_bias and ctx.needs_input_grad[4]:
        gb = grad.sum(0)
    return gx, gv, None, None, gb, None


triton_bsr_linear.register_autograd(_bsr_backward, setup_context=_bsr_setup)
triton_balanced_linear.register_autograd(_balanced_backward, setup_context=_balanced_setup)
