"""Typed public functions over the sparse weight formats, and the torch.library registrations (fake kernels,
autograd) of the ops whose schemas live in csrc/ops.cpp.

Data flows one way: nn -> ops -> kernels. Every op takes a 2-D ``x`` [T, features]; ``linear`` accepts any
leading dimensions and reshapes.
"""

from __future__ import annotations

import importlib
from typing import Dict, List, Optional, Union

import torch

from . import _ext, timing
from .activations import ACTIVATIONS, check_native
from .activations import get as _activation
from .formats import BalancedSparseWeight, BlockSparseWeight

__all__ = ["linear", "linear_grad_input", "sddmm", "residual_layer_norm", "attention", "select_backend",
           "fastest_backend", "backend_timings", "backend_status", "not_supported_reasons", "nm24_reasons",
           "ACTIVATIONS", "BACKENDS", "BACKEND_DTYPES"]

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
    def _(
        x,
        values,
        row_offsets,
        col_indices,
        col_offsets,
        row_indices,
        block_perm,
        out_features,
        bias=None,
        activation="none",
    ):
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

    @torch.library.register_fake("sparsekern::bsr_linear_int8")
    def _(x, qvalues, w_scale, w_sum, row_offsets, col_indices, out_features, block_cols, bias=None,
          activation="none", clip=0.0):
        _check_same_device(x=x, qvalues=qvalues, w_scale=w_scale, w_sum=w_sum, row_offsets=row_offsets,
                           col_indices=col_indices, bias=bias)
        torch._check(x.dim() == 2, lambda: f"x must be 2-D, got {x.dim()}-D")
        return x.new_empty(x.shape[0], out_features)

    @torch.library.register_fake("sparsekern::residual_layer_norm")
    def _(x, residual, weight=None, bias=None, eps=1e-5):
        _check_same_device(x=x, residual=residual, weight=weight, bias=bias)
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    # Its autograd: aten's LayerNorm backward at the statistics recomputed from the saved inputs. The modules take
    # aten's own ops whenever a gradient is wanted (sparse/nn.py, ResidualLayerNorm), so this serves direct callers.
    def _rln_setup(ctx, inputs, output):
        x, residual, weight, bias, eps = inputs
        ctx.save_for_backward(x, residual, weight, bias)
        ctx.eps = eps
        ctx.has_residual = residual is not None

    def _rln_backward(ctx, grad):
        x, residual, weight, bias = ctx.saved_tensors
        s = x + residual if ctx.has_residual else x
        n = [s.shape[-1]]
        _, mean, rstd = torch.ops.aten.native_layer_norm(s, n, weight, bias, ctx.eps)
        mask = [ctx.needs_input_grad[0] or ctx.needs_input_grad[1], weight is not None and ctx.needs_input_grad[2],
                bias is not None and ctx.needs_input_grad[3]]
        gs, gw, gb = torch.ops.aten.native_layer_norm_backward(grad, s, n, mean, rstd, weight, bias, mask)
        return (gs if ctx.needs_input_grad[0] else None, gs if ctx.needs_input_grad[1] else None, gw, gb, None)

    torch.library.register_autograd("sparsekern::residual_layer_norm", _rln_backward, setup_context=_rln_setup)
    @torch.library.register_fake("sparsekern::attention")
    def _(q, k, v, mask=None, scale=1.0, causal=False):
        _check_same_device(q=q, k=k, v=v, mask=mask)
        torch._check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4, lambda: "q, k and v must be 4-D")
        return q.new_empty(q.shape[0], q.shape[2], q.shape[1], v.shape[3])

    # Its autograd: the softmax recomputed from the saved inputs in aten ops (training is not its hot path: the
    # attention function of sparse/evaluate.py takes torch's SDPA whenever a gradient is wanted).
    def _attn_setup(ctx, inputs, output):
        q, k, v, mask, scale, causal = inputs
        ctx.save_for_backward(q, k, v, mask)
        ctx.scale, ctx.causal = scale, causal

    def _attn_backward(ctx, grad):
        q, k, v, mask = ctx.saved_tensors
        group = q.shape[1] // k.shape[1]
        kf = k.repeat_interleave(group, 1) if group > 1 else k
        vf = v.repeat_interleave(group, 1) if group > 1 else v
        s = (q @ kf.transpose(-1, -2)).float() * ctx.scale
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.float()
        if ctx.causal:
            keep = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
            s = s.masked_fill(~keep, float("-inf"))
        p = torch.nan_to_num(torch.softmax(s, -1), nan=0.0).to(q.dtype)  # rows with every key masked: 0
        go = grad.transpose(1, 2)  # [B, H, Lq, Dv]
        gv = p.transpose(-1, -2) @ go
        gp = (go @ vf.transpose(-1, -2)).float()
        gs = (p.float() * (gp - (gp * p.float()).sum(-1, keepdim=True))).to(q.dtype) * ctx.scale
        gq = gs @ kf
        gk = gs.transpose(-1, -2) @ q
        if group > 1:
            gk = gk.unflatten(1, (k.shape[1], group)).sum(2)
            gv = gv.unflatten(1, (k.shape[1], group)).sum(2)
        return gq, gk, gv, None, None, None

    torch.library.register_autograd("sparsekern::attention", _attn_backward, setup_context=_attn_setup)

    @torch.library.register_fake("sparsekern::balanced_linear_int8")
    def _(x, qvalues, indices, w_scale, w_sum, out_features, window, bias=None, activation="none", clip=0.0):
        _check_same_device(x=x, qvalues=qvalues, indices=indices, w_scale=w_scale, w_sum=w_sum, bias=bias)
        torch._check(x.dim() == 2, lambda: f"x must be 2-D, got {x.dim()}-D")
        return x.new_empty(x.shape[0], out_features)

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
        raise TypeError(
            f"bias must match the weight ({weight.dtype} on {weight.device}), got {bias.dtype} on {bias.device}"
        )


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


# The dtypes each backend's kernels compute in. Triton's are those of kernels/bsr.py (_DTYPES; a test keeps the two
# equal): tl.dot has no float64 on the tensor cores, while the CUDA C++ kernels have an fp64 path.
BACKEND_DTYPES: Dict[str, tuple] = {
    "cpu": (torch.float32, torch.float64, torch.bfloat16, torch.float16),
    "triton": (torch.float16, torch.bfloat16, torch.float32),
    "cuda": (torch.float32, torch.float64, torch.bfloat16, torch.float16),
}


def not_supported_reasons(backend: str, weight: Optional[SparseWeight] = None,
                          x: Optional[torch.Tensor] = None,
                          device: Optional[Union[str, torch.device]] = None) -> List[str]:
    """Every reason ``backend`` cannot run ``weight`` (with input ``x``): the device and what it needs installed,
    the dtype, the shapes. Empty when it can. ``device`` alone (no weight) checks the device and installation
    only."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if device is None:
        device = weight.device if weight is not None else x.device if x is not None else None
    if device is None:
        raise ValueError("not_supported_reasons needs a weight, an input or a device")
    device = torch.device(device)
    reasons = []
    why = _refusal(backend, device)
    if why is not None:
        reasons.append(why)
    if weight is not None and weight.dtype not in BACKEND_DTYPES[backend]:
        names = ", ".join(str(d).replace("torch.", "") for d in BACKEND_DTYPES[backend])
        reasons.append(f"has no {str(weight.dtype).replace('torch.', '')} kernels (it computes in {names})")
    if x is not None and weight is not None:
        if x.device != weight.device:
            reasons.append(f"x is on {x.device} but the weight is on {weight.device}")
        if x.dtype != weight.dtype:
            reasons.append(f"x has dtype {x.dtype} but the weight has {weight.dtype}")
        if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
            reasons.append(f"x must end in {weight.shape[1]} features, got shape {tuple(x.shape)}")
    return reasons


def backend_status(device: Union[str, torch.device], weight: Optional[SparseWeight] = None) -> Dict[str, Optional[str]]:
    """For each backend, None if it can run on ``device`` (and run ``weight``, if given), else why it cannot."""
    out = {}
    for name in BACKENDS:
        reasons = not_supported_reasons(name, weight, device=device)
        out[name] = "; ".join(reasons) if reasons else None
    return out


def nm24_reasons(weight: SparseWeight, x: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                 backend: str = "cuda") -> List[str]:
    """Why ``linear`` does not run ``weight`` on the 2:4 sparse tensor cores (``sparsekern::nm24_linear``); empty
    when it does. The path needs a 2:4 balanced weight (bank 4, keep 2) in float16/bfloat16 with out % 16 == 0 and
    in % 64 == 0, the CUDA C++ backend in a build with CUDA kernels, no gradient to compute (the op has no
    autograd) and eager mode (torch.compile traces the general balanced op)."""
    reasons = []
    if not isinstance(weight, BalancedSparseWeight) or (weight.bank, weight.keep) != (4, 2):
        reasons.append("the weight is not 2:4 balanced (bank 4, keep 2)")
    if weight.dtype not in (torch.float16, torch.bfloat16):
        reasons.append(f"dtype {weight.dtype} is not float16 or bfloat16")
    if weight.shape[0] % 16 or weight.shape[1] % 64:
        reasons.append(f"shape {tuple(weight.shape)} is not a multiple of (16, 64)")
    if backend != "cuda" or weight.device.type != "cuda":
        reasons.append(f"the 2:4 kernels are CUDA C++ ones (backend {backend!r} on {weight.device})")
    elif not _ext.available() or not _ext.require().has_cuda():
        reasons.append("this build of sparse._C has no CUDA kernels")
    if x is not None and _wants_grad(x, weight, bias):
        reasons.append("a gradient is required (nm24_linear has no autograd)")
    if torch.compiler.is_compiling():
        reasons.append("torch.compile traces the general balanced op")
    return reasons


_OPS: Dict[tuple, object] = {}


def _op(backend: str, name: str):
    """The op ``name`` (e.g. "bsr_linear") of ``backend``, as its OpOverload (looked up once: the attribute walk
    and the overload resolution of the packet are a noticeable part of a small call; numbers: docs/measurements.md,
    "The ops' direct entry points")."""
    key = (backend, name)
    op = _OPS.get(key)
    if op is None:
        op = _OPS[key] = getattr(torch.ops.sparsekern, _OP_PREFIX[backend] + name).default
    return op


# The C++ entry points that call the CPU forward ops without torch.ops' generic argument handling, a large part of
# what an empty call costs (csrc/python_calls.cpp; numbers: docs/measurements.md, "The ops' direct entry points").
# They return None when a __torch_function__ override is in play, and torch.compile traces torch.ops instead.
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


# (device, requested backend, dtype) -> the backend select_backend chose. Only successes are kept: what makes a
# backend able (the extension loaded, CUDA present, triton importable, its dtypes) does not change within a
# process, while a refusal is rechecked so that its error names the current reason. The key holds every property
# of the weight that not_supported_reasons looks at without an input.
_ABLE: Dict[tuple, str] = {}


def select_backend(device: Union[str, torch.device], backend: Optional[str] = None,
                   weight: Optional[SparseWeight] = None) -> str:
    """The backend to use on ``device`` (for ``weight``, if given): ``backend`` if given and able, else the first
    able one in BACKENDS. Raises one RuntimeError that lists every backend and all of its reasons
    (``not_supported_reasons``)."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    device = torch.device(device)
    key = (device, backend, None if weight is None else weight.dtype)
    chosen = _ABLE.get(key)
    if chosen is not None:
        return chosen
    candidates = [backend] if backend is not None else list(BACKENDS)
    refused = []
    for name in candidates:  # stops at the first able backend: only that one's checks run
        reasons = not_supported_reasons(name, weight, device=device)
        if not reasons:
            _ABLE[key] = name
            return name
        refused.append(f"{name}: {'; '.join(reasons)}")
    what = "" if weight is None else f" ({str(weight.dtype).replace('torch.', '')} {type(weight).__name__})"
    raise RuntimeError(f"no sparse backend can run on {device}{what}: {' | '.join(refused)}")


# (format, shape, pattern, dtype, device, tokens) -> {backend: median seconds or the error it raised}; one
# measurement serves every layer of the same configuration (a Transformer's twelve identical layers).
_TIMINGS: Dict[tuple, Dict[str, Union[float, str]]] = {}


def _weight_key(weight: SparseWeight) -> tuple:
    pattern = weight.block if isinstance(weight, BlockSparseWeight) else (weight.bank, weight.keep, "balanced")
    return (type(weight).__name__, tuple(weight.shape), pattern, weight.values.shape[0], weight.dtype)


def _time_backend(backend: str, x: torch.Tensor, weight: SparseWeight, repeats: int) -> float:
    """Median seconds of one forward call of ``backend`` (after two warm-up calls, which also compile and
    autotune a Triton kernel)."""
    with torch.no_grad():
        return timing.median_seconds(lambda: linear(x, weight, backend=backend), repeats=repeats, warmup=2, device=x)


def fastest_backend(weight: SparseWeight, tokens: int = 512, repeats: int = 5) -> str:
    """The backend that runs ``weight``'s forward fastest on its device, measured once per weight configuration
    (format, shape, pattern, dtype, device) with ``tokens`` rows of input. With one able backend (every CPU) this
    is ``select_backend`` and measures nothing. A backend that fails while measured is left out and its error kept
    in ``backend_timings``. Meant for module construction, not per call."""
    device = weight.device
    able = [name for name in BACKENDS if not not_supported_reasons(name, weight)]
    if len(able) <= 1:
        return select_backend(device, weight=weight)
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
        activation: a name from ``sparse.activations.ACTIVATIONS`` (defined there as in ``torch.nn.functional``),
            applied in the kernel's output stage.
        backend: one of ``BACKENDS``, or None to take the first that can run on ``x.device``.
    Returns:
        ``[..., out]``. Differentiable with respect to ``x``, ``weight.values`` and ``bias``.
    """
    _check_input("x", x, weight.shape[1], weight)
    _check_bias(bias, weight)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    backend = select_backend(x.device, backend, weight)
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])  # the ops take [T, in]
    if isinstance(weight, BlockSparseWeight):
        y = _call(backend, "bsr_linear", (
            x2, weight.values, weight.row_offsets, weight.col_indices, weight.col_offsets, weight.row_indices,
            weight.block_perm, weight.shape[0], bias, activation,
        ))
    else:
        packed = _nm24_packed(weight) if backend == "cuda" and not nm24_reasons(weight, x, bias, backend) else None
        if packed is not None:  # 2:4 on the sparse tensor cores (mma.sp); no autograd, hence only without grad
            y = torch.ops.sparsekern.nm24_linear.default(x2, packed[0], packed[1], bias, activation)
        else:
            y = _call(backend, "balanced_linear", (x2, weight.values, weight.indices, weight.bank, bias, activation))
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], weight.shape[0])


def residual_layer_norm(x: torch.Tensor, residual: Optional[torch.Tensor], weight: Optional[torch.Tensor] = None,
                        bias: Optional[torch.Tensor] = None, eps: float = 1e-5) -> torch.Tensor:
    """``F.layer_norm(x + residual, x.shape[-1:], weight, bias, eps)`` as one pass over the rows on the CPU
    (``sparsekern::residual_layer_norm``: the add, the statistics in float32 and the affine map per row, where
    eager runs the add and the LayerNorm as two passes through memory). ``residual`` None normalises ``x`` alone.
    x, residual, weight and bias share one dtype; float32 and bfloat16 take the fused kernel, float64 and float16
    compute the same in aten. Differentiable; CPU tensors only (elsewhere call the two aten ops)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.device.type != "cpu":
        raise ValueError(f"residual_layer_norm runs on CPU tensors, got x on {x.device}")
    args = (x, residual, weight, bias, float(eps))
    if not torch.compiler.is_compiling():
        y = _ext.require().residual_layer_norm_call(*args)
        if y is not None:
            return y
    return torch.ops.sparsekern.residual_layer_norm(*args)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None,
              scale: Optional[float] = None, causal: bool = False) -> torch.Tensor:
    """``softmax(q k^T * scale + mask) v`` per batch and head, returned as ``[B, Lq, H, Dv]`` (the layout an
    output projection reads; ``F.scaled_dot_product_attention(...).transpose(1, 2)`` computes the same values).

    q ``[B, H, Lq, D]``, k ``[B, Hkv, Lk, D]``, v ``[B, Hkv, Lk, Dv]`` (H a multiple of Hkv: grouped-query heads
    share k and v), any strides with the last dimension contiguous. ``mask``: bool (True: attend) or floating
    (added to the scores), broadcastable to ``[B, H, Lq, Lk]``; ``causal``: query i sees keys j <= i, as torch's
    ``is_causal``; not both. ``scale`` defaults to ``D ** -0.5``. Rows whose every key is masked give 0.
    ``sparsekern::attention``: float32 and bfloat16 on AVX-512 / AVX2 CPUs run our kernel (S = q k^T for a tile of
    query rows stays in cache, the softmax in place, then P v); other dtypes and CPUs compute the same with torch's
    SDPA. Differentiable (the backward recomputes the softmax in aten ops). CPU tensors only."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device.type != "cpu":
            raise ValueError(f"attention runs on CPU tensors, got {name} on {t.device}")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return torch.ops.sparsekern.attention(q, k, v, mask, float(scale), bool(causal))


def _wants_grad(x: torch.Tensor, weight: SparseWeight, bias: Optional[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and (
        x.requires_grad or weight.values.requires_grad or (bias is not None and bias.requires_grad)
    )


def _nm24_packed(weight: BalancedSparseWeight):
    """(packed_values, packed_meta) of a 2:4 weight for the sparse tensor cores (``sparsekern::nm24_pack``), for a
    weight nm24_reasons accepts. Packed once per weight object and packed again when its values were changed in
    place (an optimizer step bumps the tensor's version)."""
    values = weight.values
    cached = getattr(weight, "_nm24", None)
    if cached is None or cached[0] is not values or cached[1] != values._version:
        pv, pm = torch.ops.sparsekern.nm24_pack(values.detach(), weight.indices)
        cached = weight._nm24 = (values, values._version, pv, pm)
    return cached[2], cached[3]


def linear_grad_input(grad_out: torch.Tensor, weight: SparseWeight, backend: Optional[str] = None) -> torch.Tensor:
    """``grad_out @ W``: ``[..., out] -> [..., in]``."""
    _check_input("grad_out", grad_out, weight.shape[0], weight)
    backend = select_backend(grad_out.device, backend, weight)
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
    backend = select_backend(x.device, backend, weight)
    g2 = grad_out.reshape(-1, weight.shape[0])
    x2 = x.reshape(-1, weight.shape[1])
    if isinstance(weight, BlockSparseWeight):
        return _op(backend, "bsr_sddmm")(g2, x2, weight.values, weight.row_offsets, weight.col_indices)
    return _op(backend, "balanced_sddmm")(g2, x2, weight.indices, weight.bank)
