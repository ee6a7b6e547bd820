"""sparsekern: block-sparse and balanced-sparse Linear layers for PyTorch (import name ``sparse``).

Note: pydata's ``sparse`` package uses the same import name; install one or the other in an environment.
"""

from __future__ import annotations

from . import _ext, export, prune, quant, reference, runtime  # noqa: F401  (public submodules; _ext loads the extension)
from .export import densify, export_onnx, export_program
from .formats import BalancedSparseWeight, BlockSparseWeight
from .io import load, save
from .nn import BalancedSparseLinear, BlockSparseLinear, ResidualLayerNorm
from .ops import linear, linear_grad_input, sddmm
from .patch import FusedActivation, SparsifyReport, compile, fuse_layernorm, fuse_qkv, sparsify
from .quant import (
    QuantizedBalancedSparseLinear,
    QuantizedBalancedSparseWeight,
    QuantizedBlockSparseLinear,
    QuantizedBlockSparseWeight,
)

__all__ = [
    "BlockSparseWeight", "BalancedSparseWeight", "linear", "linear_grad_input", "sddmm",
    "BlockSparseLinear", "BalancedSparseLinear", "sparsify", "compile", "SparsifyReport", "FusedActivation", "prune",
    "save", "load", "runtime", "densify", "export_onnx", "export_program", "fuse_qkv", "quant",
    "QuantizedBlockSparseLinear", "QuantizedBlockSparseWeight", "QuantizedBalancedSparseLinear",
    "QuantizedBalancedSparseWeight", "fuse_layernorm", "ResidualLayerNorm",
]
__version__ = "0.1.0"
