"""sparsekern: block-sparse and balanced-sparse Linear layers for PyTorch (import name ``sparse``).

Note: pydata's ``sparse`` package uses the same import name; install one or the other in an environment.
"""

from __future__ import annotations

import importlib.util
import os
import sys


def _map_source_package(name: str) -> None:
    """In a source checkout the Triton kernels and the benchmarks live in ``kernels/`` and ``benchmarks/`` beside
    this package; installed, they are ``sparse/kernels`` and ``sparse/benchmarks``. Map the former to
    ``sparse.<name>`` so both layouts import the same way, without ever creating a top-level ``kernels`` module
    (that name belongs to another PyPI package)."""
    here = os.path.dirname(os.path.abspath(__file__))
    full = f"sparse.{name}"
    if os.path.isdir(os.path.join(here, name)) or full in sys.modules:
        return
    src = os.path.join(os.path.dirname(here), name)
    init = os.path.join(src, "__init__.py")
    if not os.path.isfile(init):
        return
    spec = importlib.util.spec_from_file_location(full, init, submodule_search_locations=[src])
    module = importlib.util.module_from_spec(spec)
    sys.modules[full] = module
    spec.loader.exec_module(module)
    globals()[name] = module


_map_source_package("kernels")
_map_source_package("benchmarks")

from . import _ext, reference  # noqa: E402
from .formats import BalancedSparseWeight, BlockSparseWeight  # noqa: E402
from .ops import linear, linear_grad_input, sddmm  # noqa: E402
from .nn import BalancedSparseLinear, BlockSparseLinear  # noqa: E402
from . import prune, runtime  # noqa: E402
from .patch import FusedActivation, SparsifyReport, sparsify  # noqa: E402
from .io import load, save  # noqa: E402

__all__ = [
    "BlockSparseWeight", "BalancedSparseWeight", "linear", "linear_grad_input", "sddmm",
    "BlockSparseLinear", "BalancedSparseLinear", "sparsify", "SparsifyReport", "FusedActivation", "prune",
    "save", "load", "runtime",
]
__version__ = "0.1.0"
