"""Handing a sparsified model to other runtimes.

- :func:`densify`: a copy whose sparse layers are equal dense ``nn.Linear`` layers (pruned weights as zeros, a
  fused activation applied after the layer), for code that only knows ``nn.Linear``.
- :func:`export_onnx`: that copy written as an ONNX model, the sparse layers as dense initializers with zeros,
  which is how ONNX runtimes (DeepSparse among them) read a pruned model. Needs the ``onnx`` package (torch's
  exporter does); ONNX Runtime, to run the file, is optional.

``torch.export`` and AOTInductor need none of this: they keep the sparse ops (see the README, "Deploy").
"""

from __future__ import annotations

import copy
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from . import walk
from .nn import SparseLinear
from .reference import activation as _activation

__all__ = ["densify", "export_onnx"]


class _Activation(nn.Module):
    """One of the package's activations as a module (what a fused activation becomes after densify)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _activation(x, self.name)

    def extra_repr(self) -> str:
        return self.name


def densify(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` in which every sparse layer is an equal dense ``nn.Linear`` (same dtype and
    device; pruned weights are zeros); a layer with a fused activation becomes ``nn.Sequential(linear,
    activation)``, so the copy computes what ``model`` computes. ``model`` itself is not changed."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, SparseLinear):
        return _dense_layer(model)
    model = copy.deepcopy(model)
    replacements = {id(m): _dense_layer(m) for _, m in walk.linear_layers(model) if isinstance(m, SparseLinear)}
    walk.replace_modules(model, replacements)
    return model


def _dense_layer(m: SparseLinear) -> nn.Module:
    lin = m.to_linear()
    return lin if m.activation == "none" else nn.Sequential(lin, _Activation(m.activation))


def export_onnx(
    model: nn.Module,
    path: str,
    example_inputs: Union[torch.Tensor, Tuple[torch.Tensor, ...]],
    *,
    input_names: Optional[Sequence[str]] = None,
    output_names: Optional[Sequence[str]] = None,
    dynamic_axes: Optional[Dict[str, Dict[int, str]]] = None,
    opset_version: int = 17,
    ir_version: Optional[int] = None,
) -> str:
    """Writes ``model`` (sparse layers densified, :func:`densify`) to ``path`` as ONNX and returns ``path``.

    ``example_inputs``: the positional inputs ``model(*example_inputs)`` is traced with (a model that takes
    keyword inputs, such as a Hugging Face model's ``input_ids=``, goes in a small wrapper module).
    ``input_names``, ``output_names``, ``dynamic_axes``, ``opset_version``: as ``torch.onnx.export`` (its
    TorchScript exporter). ``ir_version``: written into the file when given (e.g. 8 for runtimes whose onnx is
    older, such as DeepSparse 1.8's).
    """
    try:
        import onnx
    except ImportError as exc:
        raise ImportError("sparse.export_onnx needs the onnx package (pip install onnx)") from exc
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, tuple) or not all(isinstance(t, torch.Tensor) for t in example_inputs):
        raise TypeError("example_inputs must be a tensor or a tuple of tensors, got "
                        f"{type(example_inputs).__name__}")
    dense = densify(model).eval()
    with torch.no_grad():
        torch.onnx.export(dense, example_inputs, path, input_names=list(input_names) if input_names else None,
                          output_names=list(output_names) if output_names else None, dynamic_axes=dynamic_axes,
                          opset_version=opset_version, dynamo=False)
    if ir_version is not None:
        proto = onnx.load(path)
        proto.ir_version = int(ir_version)
        onnx.save(proto, path)
    return path
