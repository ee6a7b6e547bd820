"""The activations the forward ops apply in their output stage, after the bias: one table for the whole package.

Each row names the activation as the ops spell it, its definition in torch (the float64 reference of the tests,
and what the Triton backend applies when its kernels have no code for it), and its backward (``grad * act'(z)``
in aten ops, so it traces under torch.compile). The C++ and CUDA kernels have the same list, in the same order,
in ``csrc/activations.h``; ``check_native`` compares the two when the extension loads.

Adding an activation: a row here and a row in ``csrc/activations.h``. Nothing else is required: the kernels
without vector code for it run its scalar formula, the tests take every row of this table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = ["Activation", "TABLE", "ACTIVATIONS", "get", "check_native"]


@dataclass(frozen=True)
class Activation:
    """name: as the ops take it; forward: act(z); backward: (grad, z) -> grad * act'(z); curvature: an upper bound
    of sup |act''(z)|, how far a rounding of z moves act'(z) (the error bound of the gradient tests)."""

    name: str
    forward: Callable[[torch.Tensor], torch.Tensor]
    backward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    curvature: float


_aten = torch.ops.aten


def _quick_gelu_backward(g: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """d/dz z sigmoid(1.702 z) = s (1 + 1.702 z (1 - s))."""
    s = torch.sigmoid(1.702 * z)
    return g * (s * (1 + 1.702 * z * (1 - s)))

TABLE: Tuple[Activation, ...] = (
    Activation("none", lambda z: z, lambda g, z: g, 0.0),
    Activation("relu", F.relu, lambda g, z: _aten.threshold_backward(g, z, 0), 0.0),
    Activation("gelu", F.gelu, lambda g, z: _aten.gelu_backward(g, z, approximate="none"), 0.8),
    Activation("gelu_tanh", lambda z: F.gelu(z, approximate="tanh"),
               lambda g, z: _aten.gelu_backward(g, z, approximate="tanh"), 0.8),
    Activation("silu", F.silu, lambda g, z: _aten.silu_backward(g, z), 0.5),
    Activation("quick_gelu", lambda z: z * torch.sigmoid(1.702 * z), lambda g, z: _quick_gelu_backward(g, z),
               0.86)  # 1.702 x silu's 0.5,
)

ACTIVATIONS: Tuple[str, ...] = tuple(a.name for a in TABLE)
_BY_NAME: Dict[str, Activation] = {a.name: a for a in TABLE}


def get(name: str) -> Activation:
    """The table row of ``name``; a ValueError naming the valid names otherwise."""
    act = _BY_NAME.get(name) if isinstance(name, str) else None
    if act is None:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")
    return act


def check_native(native: Sequence[str]) -> None:
    """Raise if the compiled kernels' activation list (``sparse._C.activation_names()``) differs from TABLE: a
    kernel would apply another activation than the one asked for."""
    if tuple(native) != ACTIVATIONS:
        raise ImportError(
            f"sparse._C implements the activations {tuple(native)} but sparse/activations.py lists {ACTIVATIONS}: "
            "csrc/activations.h and sparse/activations.py must list the same names in the same order (rebuild the "
            "extension after changing either)")
