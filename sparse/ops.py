"""Typed public functions over the sparse weight formats, and the torch.library registrations (fake kernels,
autograd) of the ops whose schemas live in csrc/ops.cpp.

Data flows one way: nn -> ops -> kernels. Every op takes a 2-D ``x`` [T, features]; ``linear`` accepts any
leading dimensions and reshapes.
"""

from __future__ import annotations

import importlib
import statistics
import time
from typing import Dict, Optional, Union

import torch

from . import _ext
from .activations import ACTIVATIONS, check_native
from .activations import get as _activation
from .formats import BalancedSparseWeight, BlockSparseWeight

__all__ = ["linear", "linear_grad_input", "sddmm", "select_backend", "fastest_backend", "backend_timings", "backend_status",
           "ACTIVATIONS", "BACKENDS"]

SparseWeight = Union[BlockSparseWeight, BalancedSparseWeight]
# In order of preference when a backend is forced by device only (select_backend); modules built without a
# backend request take the one that measures fastest for their weight (fastest_backend).
BACKENDS = ("cpu", "triton", "cuda")
# Every backend implements the C++ schemas of csrc/ops.cpp; its ops are torch.ops.sparsekern.<prefix><op>.
# "cpu" and "cuda" share the op names: the dispatcher picks the kernel by the tensors' device.
_OP_PREFIX = {"cpu": "", "triton": "triton_", "cuda": ""}


def _check_same_device(**tensors: Optional[torch.Tensor]) -> None:
    """One meta tensor among CPU ones sends the whole call to the fake kernel, which would hand back
    uninitialised memory as the result: refuse mixed devices there."""
    named = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}: all on one device")


def _register() -> None:
    @torch.library.register_fake("sparsekern::bsr_linear")
    def _(x, values, row_offsets, col_indices, col_offsets, row_indices, block_perm, out_features, bias=None, activation="none"):
        _check_same_device(x=x, values=values, row_offsets=row_offsets, col_indices=col_indices,
                           col_offsets=col_offsets, row_indices=row_indices, block_perm=block_perm, bias=bias)
        torch._check(x.dim() == 2, lambda: f"x must be 2-D, got {x.dim()}-D")
        return x.new_empty(x.shape[0], out_features)

    @torch.library.register_fake("sparsekern::bsr_linear_grad_input")
    def _(grad_out, values, col_offsets, row_indices, block_perm, in_features):
        _check_same_device(grad_out=grad_out, values=values, col_offsets=col_offsets, row_indices=row_indices,
                           block_perm=block_perm)
        return grad_out.new_empty(grad_out.shape[0], in_features)

    @torch.library.register_fake("sparsekern::bsr_sddmm")
    def _(grad_out, x, values, row_offsets, col_indices):
        _check_same_device(grad_out=grad_out, x=x, values=values, row_offsets=row_offsets, col_indices=col_indices)
        return torch.empty_like(values)

    @torch.library.register_fake("sparsekern::balanced_linear")
    def _(x, values, indices, bank, bias=None, activation="none"):
        _check_same_device(x=x, values=values, indices=indices, bias=bias)
        return x.new_empty(x.shape[0], values.shape[0])

    @torch.library.register_fake("sparsekern::balanced_linear_grad_input")
    def _(grad_out, values, indices, bank, in_features):
        _check_same_device(grad_out=grad_out, values=values, indices=indices)
        return grad_out.new_empty(grad_out.shape[0], in_features)

    @torch.library.register_fake("sparsekern::balanced_sddmm")
    def _(grad_out, x, indices, bank):
        _check_same_device(grad_out=grad_out, x=x, indices=indices)
        return x.new_empty(indices.shape)

    # The activation backward of every forward op's autograd (csrc/autograd.cpp): the activation table's, as aten
    # ops on any device, and decomposed into them under torch.compile.
    @torch.library.impl("sparsekern::act_backward", "CompositeImplicitAutograd")
    def _(grad, z, activation):
        return _activation(activation).backward(grad, z)

    # The autograd of sparsekern::bsr_linear / balanced_linear is registered in C++ (csrc/autograd.cpp): a Python
    # autograd kernel would cost microseconds on every grad-mode call, even when nothing requires a gradient.


if _ext.available():
    check_native(_ext.require().activation_names())
    _register()


def _check_input(name: str, t: torch.Tensor, features: int, weight: SparseWeight) -> None:
    """t must be a tensor [..., features] in the weight's dtype and on its device."""
    if not isinstance(weight, (BlockSparseWeight, BalancedSparseWeight)):
        raise TypeError(f"weight must be a BlockSparseWeight or BalancedSparseWeight, got {type(weight).__name__}")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() < 1 or t.shape[-1] != features:
        raise ValueError(f"{name} must end in {features} features, got shape {tuple(t.shape)}")
    if t.dtype != weight.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but the weight has {weight.dtype}; cast one of them")
    if t.device != weight.device:
        raise ValueError(f"{name} is on {t.device} but the weight is on {weight.device}")


def _check_bias(bias: Optional[torch.Tensor], weight: SparseWeight) -> None:
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if bias.dtype != weight.dtype or bias.device != weight.device:
        raise TypeError(f"bias must match the weight ({weight.dtype} on {weight.device}), got {bias.dtype} on {bias.device}")


@torch.compiler.assume_constant_result  # torch.compile evaluates it once instead of tracing the import
def _triton_import_error() -> Optional[str]:
    """None if the Triton backend's ops are registered (importing them on first use), else why not."""
    try:
        importlib.import_module(".triton_backend", __package__)
    except ImportError as exc:
        return f"triton is not importable ({exc}); pip install triton"
    return None


def _refusal(backend: str, device: torch.device) -> Optional[str]:
    """None if ``backend`` can run on ``device``, else the reason it cannot."""
    if backend == "cpu":
        if not _ext.available():
            return f"the sparse._C extension did not load ({_ext._IMPORT_ERROR})"
        return None if device.type == "cpu" else f"runs on CPU tensors only, got device {device}"
    if device.type != "cuda":
        return f"runs on CUDA tensors only, got device {device}"
    if backend == "triton":
        if not torch.cuda.is_available():
            return "no CUDA device is available (torch.cuda.is_available() is False)"
        return _triton_import_error()
    if not _ext.available():
        return f"the sparse._C extension did not load ({_ext._IMPORT_ERROR})"
    if not _ext.require().has_cuda():
        return "this build of sparse._C has no CUDA kernels (reinstall with a CUDA torch and CUDA_HOME set)"
    return None


def backend_status(device: Union[str, torch.device]) -> Dict[str, Optional[str]]:
    """For each backend, None if it can run on ``device``, else the reason it cannot."""
    device = torch.device(device)
    return {name: _refusal(name, device) for name in BACKENDS}


_OPS: Dict[tuple, object] = {}


def _op(backend: str, name: str):
    """The op ``name`` (e.g. "bsr_linear") of ``backend``, as its OpOverload (looked up once: the attribute walk
    and the overload resolution of the packet cost about a microsecond per call)."""
    key = (backend, name)
    op = _OPS.get(key)
    if op is None:
        op = _OPS[key] = getattr(torch.ops.sparsekern, _OP_PREFIX[backend] + name).default
    return op


# The C++ entry points that call the CPU forward ops without torch.ops' generic argument handling (about 1.3 us
# of the 2.8 us an empty call costs; csrc/python_calls.cpp). They return None when a __torch_function__
# override is in play, and torch.compile traces torch.ops instead.
_DIRECT: Dict[str, object] = {}
if _ext.available() and hasattr(_ext._C, "register_plain_tensor_type"):
    _ext._C.register_plain_tensor_type(torch.nn.Parameter)
    _DIRECT = {"bsr_linear": _ext._C.bsr_linear_call, "balanced_linear": _ext._C.balanced_linear_call}


def _call(backend: str, name: str, args: tuple) -> torch.Tensor:
    """``_op(backend, name)(*args)``; on the CPU outside torch.compile, through the direct entry point."""
    direct = _DIRECT.get(name) if backend == "cpu" else None
    if direct is not None and not torch.compiler.is_compiling():
        y = direct(*args)
        if y is not None:
            return y
    return _op(backend, name)(*args)


# (device, requested backend) -> the backend select_backend chose. Only successes are kept: what makes a backend
# able (the extension loaded, CUDA present, triton importable) does not change within a process, while a refusal
# is rechecked so that its error names the current reason.
_ABLE: Dict[tuple, str] = {}


def select_backend(device: Union[str, torch.device], backend: Optional[str] = None) -> str:
    """The backend to use on ``device``: ``backend`` if given and able, else the first able one in BACKENDS.
    Raises one RuntimeError that lists every backend and why it refused. Call it once (e.g. when a module is
    built), not per forward."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    device = torch.device(device)
    chosen = _ABLE.get((device, backend))
    if chosen is not None:
        return chosen
    candidates = [backend] if backend is not None else list(BACKENDS)
    reasons = []
    for name in candidates:  # stops at the first able backend: only that one's checks run
        reason = _refusal(name, device)
        if reason is None:
            _ABLE[(device, backend)] = name
            return name
        reasons.append(f"{name}: {reason}")
    reasons = "; ".join(reasons)
    raise RuntimeError(f"no sparse backend can run on {device}: {reasons}")


# (format, shape, pattern, dtype, device, tokens) -> {backend: median seconds or the error it raised}; one
# measurement serves every layer of the same configuration (a Transformer's twelve identical layers).
_TIMINGS: Dict[tuple, Dict[str, Union[float, str]]] = {}


def _weight_key(weight: SparseWeight) -> tuple:
    pattern = weight.block if isinstance(weight, BlockSparseWeight) else (weight.bank, weight.keep, "balanced")
    return (type(weight).__name__, tuple(weight.shape), pattern, weight.values.shape[0], weight.dtype)


def _time_backend(backend: str, x: torch.Tensor, weight: SparseWeight, repeats: int) -> float:
    """Median seconds of one forward call of ``backend`` (after two warm-up calls, which also compile and
    autotune a Triton kernel)."""
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    times = []
    with torch.no_grad():
        for i in range(repeats + 2):
            sync()
            t0 = time.perf_counter()
            linear(x, weight, backend=backend)
            sync()
            if i >= 2:
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


def fastest_backend(weight: SparseWeight, tokens: int = 512, repeats: int = 5) -> str:
    """The backend that runs ``weight``'s forward fastest on its device, measured once per weight configuration
    (format, shape, pattern, dtype, device) with ``tokens`` rows of input. With one able backend (every CPU) this
    is ``select_backend`` and measures nothing. A backend that fails while measured is left out and its error kept
    in ``backend_timings``. Meant for module construction, not per call."""
    device = weight.device
    able = [name for name in BACKENDS if _refusal(name, device) is None]
    if len(able) <= 1:
        return select_backend(device)
    key = (*_weight_key(weight), device, tokens)
    timings = _TIMINGS.get(key)
    if timings is None:
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(tokens, weight.shape[1], generator=g, device=device).to(weight.dtype)
        timings = {}
        for name in able:
            try:
                timings[name] = _time_backend(name, x, weight, repeats)
            except Exception as exc:  # a backend that cannot run this weight simply does not win
                timings[name] = f"{type(exc).__name__}: {exc}"
        _TIMINGS[key] = timings
    measured = {name: t for name, t in timings.items() if isinstance(t, float)}
    if not measured:
        raise RuntimeError(f"every backend failed on this weight on {device}: {timings}")
    return min(measured, key=measured.get)


def backend_timings() -> Dict[tuple, Dict[str, Union[float, str]]]:
    """What fastest_backend measured so far: {(format, shape, pattern, nnz, dtype, device, tokens): {backend:
    median seconds, or the error that backend raised}}."""
    return {k: dict(v) for k, v in _TIMINGS.items()}


def linear(
    x: torch.Tensor,
    weight: SparseWeight,
    bias: Optional[torch.Tensor] = None,
    activation: str = "none",
    backend: Optional[str] = None,
) -> torch.Tensor:
    """``act(x @ W^T + bias)`` for a sparse ``W`` [out, in].

    Args:
        x: ``[..., in]`` in the weight's dtype and on its device.
        weight: a BlockSparseWeight or BalancedSparseWeight.
        bias: optional ``[out]``.
        activation: one of ``"none", "relu", "gelu", "gelu_tanh", "silu"`` (as ``torch.nn.functional``),
            applied in the kernel's output stage.
        backend: one of ``BACKENDS``, or None to take the first that can run on ``x.device``.
    Returns:
        ``[..., out]``. Differentiable with respect to ``x``, ``weight.values`` and ``bias``.
    """
    _check_input("x", x, weight.shape[1], weight)
    _check_bias(bias, weight)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    backend = select_backend(x.device, backend)
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])  # the ops take [T, in]
    if isinstance(weight, BlockSparseWeight):
        y = _call(backend, "bsr_linear", (
            x2, weight.values, weight.row_offsets, weight.col_indices, weight.col_offsets, weight.row_indices,
            weight.block_perm, weight.shape[0], bias, activation,
        ))
    else:
        packed = _nm24_packed(weight) if backend == "cuda" and not _wants_grad(x, weight, bias) else None
        if packed is not None:  # 2:4 on the sparse tensor cores (mma.sp); no autograd, hence only without grad
            y = torch.ops.sparsekern.nm24_linear.default(x2, packed[0], packed[1], bias, activation)
        else:
            y = _call(backend, "balanced_linear", (x2, weight.values, weight.indices, weight.bank, bias, activation))
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], weight.shape[0])


def _wants_grad(x: torch.Tensor, weight: SparseWeight, bias: Optional[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and (
        x.requires_grad or weight.values.requires_grad or (bias is not None and bias.requires_grad)
    )


def _nm24_packed(weight: BalancedSparseWeight):
    """(packed_values, packed_meta) of a 2:4 weight for the sparse tensor cores (``sparsekern::nm24_pack``), or
    None when the weight does not qualify (bank 4 keep 2, fp16/bf16, out % 16 == 0, in % 64 == 0, a CUDA build)
    or when tracing for torch.compile (which takes the general balanced op). Packed once per weight object and
    packed again when its values were changed in place (an optimizer step bumps the tensor's version)."""
    if (
        weight.bank != 4 or weight.keep != 2 or weight.dtype not in (torch.float16, torch.bfloat16)
        or weight.shape[0] % 16 or weight.shape[1] % 64 or torch.compiler.is_compiling()
        or not _ext.require().has_cuda()
    ):
        return None
    values = weight.values
    cached = getattr(weight, "_nm24", None)
    if cached is None or cached[0] is not values or cached[1] != values._version:
        pv, pm = torch.ops.sparsekern.nm24_pack(values.detach(), weight.indices)
        cached = weight._nm24 = (values, values._version, pv, pm)
    return cached[2], cached[3]


def linear_grad_input(grad_out: torch.Tensor, weight: SparseWeight, backend: Optional[str] = None) -> torch.Tensor:
    """``grad_out @ W``: ``[..., out] -> [..., in]``."""
    _check_input("grad_out", grad_out, weight.shape[0], weight)
    backend = select_backend(grad_out.device, backend)
    lead = grad_out.shape[:-1]
    g2 = grad_out.reshape(-1, weight.shape[0])
    if isinstance(weight, BlockSparseWeight):
        dx = _op(backend, "bsr_linear_grad_input")(
            g2, weight.values, weight.col_offsets, weight.row_indices, weight.block_perm, weight.shape[1]
        )
    else:
        dx = _op(backend, "balanced_linear_grad_input")(g2, weight.values, weight.indices, weight.bank, weight.shape[1])
    return dx.reshape(*lead, weight.shape[1])


def sddmm(grad_out: torch.Tensor, x: torch.Tensor, weight: SparseWeight, backend: Optional[str] = None) -> torch.Tensor:
    """The weight gradient on the kept pattern: ``(grad_out^T @ x)`` at the stored positions, shaped like
    ``weight.values``. ``grad_out`` [..., out], ``x`` [..., in] with the same leading dimensions."""
    _check_input("x", x, weight.shape[1], weight)
    _check_input("grad_out", grad_out, weight.shape[0], weight)
    if grad_out.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"grad_out {tuple(grad_out.shape)} and x {tuple(x.shape)} must share their leading dimensions")
    backend = select_backend(x.device, backend)
    g2 = grad_out.reshape(-1, weight.shape[0])
    x2 = x.reshape(-1, weight.shape[1])
    if isinstance(weight, BlockSparseWeight):
        return _op(backend, "bsr_sddmm")(g2, x2, weight.values, weight.row_offsets, weight.col_indices)
    return _op(backend, "balanced_sddmm")(g2, x2, weight.indices, weight.bank)
