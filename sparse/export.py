"""Handing a sparsified model to other runtimes.

- :func:`densify`: a copy whose sparse layers are equal dense ``nn.Linear`` layers (pruned weights as zeros, a
  fused activation applied after the layer, a fused residual LayerNorm as aten's add and LayerNorm), for code
  that only knows ``nn.Linear``.
- :func:`export_onnx`: that copy written as an ONNX model, the sparse layers as dense initializers with zeros,
  which is how ONNX runtimes (DeepSparse among them) read a pruned model. Needs the ``onnx`` package (torch's
  exporter does); ONNX Runtime, to run the file, is optional.

- :func:`export_program`: ``torch.export.export``, which keeps the sparse ops in the graph (AOTInductor then
  compiles them; see the README, "Deploy"), with a clear error naming the layer whose op cannot be traced.
"""

from __future__ import annotations

import copy
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from . import walk
from .nn import ResidualLayerNorm, SparseLinear
from .reference import activation as _activation

__all__ = ["densify", "export_onnx", "export_program"]


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
    for m in model.modules():
        if isinstance(m, ResidualLayerNorm):
            m.fused_op = False  # the add and the LayerNorm as the aten ops every runtime knows
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


def export_program(model: nn.Module, args: Union[torch.Tensor, Tuple[Any, ...]],
                   kwargs: Optional[Dict[str, Any]] = None, **export_kwargs: Any) -> "torch.export.ExportedProgram":
    """``torch.export.export(model, args, kwargs, **export_kwargs)`` (``args`` may be a single tensor), with one
    difference: where tracing fails because an op has no fake (meta) kernel, which export needs to trace it,
    the error is a ``ValueError`` that names the op and the layers of ``model`` that call it (found by running
    ``model`` once eagerly on the same inputs), instead of torch's message about the op alone. Any other failure
    is torch's own."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(args, torch.Tensor):
        args = (args,)
    try:
        return torch.export.export(model, args, kwargs, **export_kwargs)
    except Exception as exc:  # re-raised as it is unless an op lacks a fake kernel
        op = _op_without_fake_kernel(exc)
        if op is None:
            raise
        callers = _modules_calling(model, op, args, kwargs or {})
        if callers:
            where = ", ".join(f"{name!r} ({type(model.get_submodule(name)).__name__})" if name else
                              f"the model itself ({type(model).__name__})" for name in callers[:4])
            raise ValueError(f"cannot export: layer {where} calls the op {op}, which has no fake (meta) kernel; "
                             f"register one (torch.library.register_fake({op!r})) or keep that layer out of the "
                             "exported model") from exc
        raise ValueError(f"cannot export: the op {op} has no fake (meta) kernel (no layer of the model called it "
                         f"when run eagerly on these inputs); register one with torch.library.register_fake({op!r})"
                         ) from exc


_NO_FAKE = re.compile(r"no fake impl registered for <CustomOpDef\((\w+::\w+)\)>")
_OP_NAME = re.compile(r"\b(\w+)::(\w+)\b")


def _op_without_fake_kernel(exc: BaseException) -> Optional[str]:
    """The ``namespace::name`` of the op whose missing fake / meta kernel ``exc`` (or its cause) reports."""
    from torch._subclasses.fake_tensor import UnsupportedOperatorException

    seen = 0
    while exc is not None and seen < 8:
        func = getattr(exc, "func", None)
        if isinstance(exc, UnsupportedOperatorException) and hasattr(func, "_schema"):
            return func._schema.name
        text = str(exc)
        found = _NO_FAKE.search(text)
        if found:
            return found.group(1)
        lowered = text.lower()
        if (("fake" in lowered or "meta" in lowered) and "kernel" in lowered) or "fake impl" in lowered:
            found = _OP_NAME.search(text)
            if found and found.group(1) not in ("torch", "c10", "at", "std"):
                return found.group(0)
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


def _modules_calling(model: nn.Module, op: str, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> List[str]:
    """Names of the innermost modules of ``model`` that call ``op`` (``namespace::name``) in one eager forward on
    ``args``/``kwargs``, in call order; what was found before an eager failure, if it fails."""
    stack: List[str] = []
    callers: List[str] = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if getattr(getattr(func, "_schema", None), "name", None) == op:
                name = stack[-1] if stack else ""
                if name not in callers:
                    callers.append(name)
            return func(*args, **(kwargs or {}))

    def enter(name: str):
        def hook(module, inputs) -> None:
            stack.append(name)
        return hook

    def leave(module, inputs, output) -> None:  # returns None: the output stays the module's
        stack.pop()

    handles = []
    for name, m in model.named_modules():
        handles.append(m.register_forward_pre_hook(enter(name)))
        handles.append(m.register_forward_hook(leave))
    try:
        with torch.no_grad(), Record():
            model(*args, **kwargs)
    except Exception:  # the callers found so far are still the answer
        pass
    finally:
        for h in handles:
            h.remove()
    return callers
