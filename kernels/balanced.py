"""Balanced-sparse matmuls in Triton: the forward, the input gradient and the weight gradient (SDDMM).

Maths (``W`` [N=out, K=in], every row cut into banks of BANK consecutive columns, each bank keeping KEEP
values; ``X`` [T, K], ``dY`` [T, N]):
    forward      Y  = act(X W^T + b)                                          [T, N]
    grad input   dX = dY W                                                    [T, K]
    SDDMM        dW[o, b, j] = sum_t dY[t, o] X[t, b*BANK + indices[o, b, j]]   [N, n_banks, KEEP]

Layout (``sparse.formats.BalancedSparseWeight``): values [N, n_banks, KEEP], indices (uint8 or int16) of the
same shape, the column of each value inside its bank, strictly increasing. Strides are passed. The last bank
may be ragged (K not a multiple of BANK); banks are padded to a power of two >= 16 and masked.

Approach: decompress to a tile, then a dense tl.dot. Each program builds, per bank, the dense
[BANK, BLOCK_O] slice of W^T in registers (KEEP compare-and-selects per element) and multiplies it on the
tensor cores. The alternative, gathering KEEP columns of X per output and reducing with FMAs, does d x the
dense FLOPs but all of them on the CUDA cores plus KEEP scattered loads per output; the decompress costs
BLOCK_O x BANK x KEEP selects per BLOCK_T tokens, i.e. BANK/BLOCK_T of the gather's CUDA-core work, so with
BLOCK_T >= 128 it is the cheaper of the two whenever T >= BANK (prefill and training).
Expected speed (estimated from instruction counts, not measured). Per bank and program the dot costs
BLOCK_T x BLOCK_O x BANK tensor-core FMAs (~2048 per clock per SM on H100/H200, bf16) and the decompress
2 x KEEP x BLOCK_O x BANK CUDA-core operations (128 lanes per clock per SM): the decompress takes
KEEP x 32 / BLOCK_T times the dot's time, 2x at KEEP 16 and BLOCK_T 256, and the dot itself runs at dense
FLOPs. So bank 64 / keep 16 should land near a third of cuBLAS's speed, far from the 1.5x target of
benchmarks/gpu_triton.py; balanced sparsity needs a different instruction mix (sparse tensor cores for 2:4, or
weights reordered so outputs share columns) to beat dense at large T. A gather kernel would win for
decode-size T < BANK (not built).
The input gradient decompresses the same tiles (dX needs W column slices, a natural dense dot); the SDDMM
computes the dense [BLOCK_O, BANK] tile of dY^T X on the tensor cores and gathers the KEEP kept entries.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl

from .bsr import _DTYPES, ACTIVATION_CODES, _activation, _launch, _precision

__all__ = ["balanced_linear", "balanced_linear_grad_input", "balanced_sddmm", "CONFIGS"]

# ---- autotune configurations ------------------------------------------------------------------------------
# A starting point, chosen from tile shapes rather than timings, and kept only if each compiles on sm_80 and
# sm_90 without spills and inside shared memory (checked
# by tests/test_triton_compile.py). benchmarks/gpu_triton.py must measure, per arch, bank 64 / keep 16 at
# T=4096 on the three Llama shapes, which config wins, and the rest be pruned here with the numbers.
# Keyed on T, N, K and (BANK, keep). Sets per (arch, element bits) as in bsr.py: fp32 gets smaller tiles.
CONFIGS: Dict[str, Dict[Tuple[int, int], List[triton.Config]]] = {
    # Forward: BLOCK_T tokens x BLOCK_O outputs per program. The decompress is paid once per BLOCK_T tokens
    # (see the docstring), so BLOCK_T is as large as registers allow: 512 tokens spilled 80-184 B on 8 and
    # 16 warps (sm_90, compile test); BLOCK_O 64 keeps the decompressed tile at 32 registers a thread.
    "fwd": {
        (80, 16): [
            triton.Config({"BLOCK_T": 128, "BLOCK_O": 64}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_T": 256, "BLOCK_O": 64}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_T": 128, "BLOCK_O": 128}, num_warps=8, num_stages=3),
        ],
        (90, 16): [
            triton.Config({"BLOCK_T": 128, "BLOCK_O": 64}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_T": 256, "BLOCK_O": 64}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_T": 128, "BLOCK_O": 128}, num_warps=8, num_stages=3),
        ],
        # fp32: the 16-bit tiles spilled 0.2-6 KB (compile test, sm_90); on sm_80 64x32 on 4 warps spilled
        # 1.5 KB, on 8 warps it uses 64 registers.
        (80, 32): [triton.Config({"BLOCK_T": 64, "BLOCK_O": 32}, num_warps=8, num_stages=2)],
        (90, 32): [triton.Config({"BLOCK_T": 64, "BLOCK_O": 32}, num_warps=4, num_stages=2)],
    },
    # Input gradient: BLOCK_T tokens x one bank per program, looping over BLOCK_O outputs (the dot's K). Same
    # decompress-per-BLOCK_T trade-off; here 512 tokens on 8 warps compile clean on sm_90 (252 registers).
    "grad_input": {
        (80, 16): [
            triton.Config({"BLOCK_T": 128, "BLOCK_O": 32}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_T": 128, "BLOCK_O": 64}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_T": 256, "BLOCK_O": 64}, num_warps=8, num_stages=3),
        ],
        (90, 16): [
            triton.Config({"BLOCK_T": 128, "BLOCK_O": 64}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_T": 256, "BLOCK_O": 64}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_T": 512, "BLOCK_O": 64}, num_warps=8, num_stages=2),
        ],
        (80, 32): [triton.Config({"BLOCK_T": 64, "BLOCK_O": 32}, num_warps=4, num_stages=2)],
        (90, 32): [triton.Config({"BLOCK_T": 64, "BLOCK_O": 32}, num_warps=4, num_stages=2)],
    },
    # SDDMM: BLOCK_O outputs x one bank per program, looping over BLOCK_T tokens (the dot's K).
    "sddmm": {
        (80, 16): [
            triton.Config({"BLOCK_O": 64, "BLOCK_T": 64}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_O": 128, "BLOCK_T": 32}, num_warps=4, num_stages=3),
        ],
        (90, 16): [
            triton.Config({"BLOCK_O": 64, "BLOCK_T": 64}, num_warps=4, num_stages=4),
            triton.Config({"BLOCK_O": 128, "BLOCK_T": 64}, num_warps=8, num_stages=3),
        ],
        (80, 32): [triton.Config({"BLOCK_O": 64, "BLOCK_T": 32}, num_warps=4, num_stages=3)],
        (90, 32): [triton.Config({"BLOCK_O": 64, "BLOCK_T": 32}, num_warps=4, num_stages=3)],
    },
}
# CPU tensors (TRITON_INTERPRET=1 only): one small config keeps the interpreter fast.
_INTERPRET_CONFIG = {"BLOCK_T": 16, "BLOCK_O": 16}


# ---- kernels ------------------------------------------------------------------------------------------------
@triton.jit
def _decompress(values_ptr, indices_ptr, offs_o, o_mask, b, offs_c,
                stride_vo, stride_vb, stride_vj, stride_io, stride_ib, stride_ij, keep):
    """The dense [BANK_P, BLOCK_O] slice of W^T for outputs offs_o and bank b (zeros off the pattern).
    Outputs lie along the tile's fast axis so each thread holds few of them: the per-output value and index
    vectors (and their 64-bit addresses) then cost a few registers, not one per row of the tile. (Built as
    [BLOCK_O, BANK_P] the bf16 forward used 255 registers and spilled 576 B on sm_90; this way, 185 and none, in
    the compile test.)"""
    v_row = values_ptr + offs_o.to(tl.int64) * stride_vo + b * stride_vb
    i_row = indices_ptr + offs_o.to(tl.int64) * stride_io + b * stride_ib
    w = tl.zeros((offs_c.shape[0], offs_o.shape[0]), dtype=values_ptr.dtype.element_ty)
    for j in range(keep):
        v = tl.load(v_row + j * stride_vj, mask=o_mask, other=0.0)
        idx = tl.load(i_row + j * stride_ij, mask=o_mask, other=0).to(tl.int32)
        w = tl.where(offs_c[:, None] == idx[None, :], v[None, :], w)
    return w


@triton.jit
def _balanced_linear_kernel(
    x_ptr, values_ptr, indices_ptr, bias_ptr, y_ptr,
    T, N, K, n_banks, keep,
    stride_xt, stride_xk, stride_vo, stride_vb, stride_vj, stride_io, stride_ib, stride_ij, stride_yt, stride_yn,
    BANK: tl.constexpr, BANK_P: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr,
):
    """Y[t tile, o tile], looping over the banks."""
    pid = tl.program_id(0)
    n_otiles = tl.cdiv(N, BLOCK_O)
    # Output tiles vary fastest: programs running together share the same X tile (reused from L2).
    offs_o = (pid % n_otiles) * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_t = (pid // n_otiles) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_c = tl.arange(0, BANK_P)
    t_mask = offs_t < T
    o_mask = offs_o < N
    x_rows = x_ptr + offs_t.to(tl.int64)[:, None] * stride_xt
    acc = tl.zeros((BLOCK_T, BLOCK_O), dtype=tl.float32)
    for b in range(n_banks):
        cols = b * BANK + offs_c
        c_mask = (offs_c < BANK) & (cols < K)
        xt = tl.load(x_rows + cols[None, :] * stride_xk, mask=t_mask[:, None] & c_mask[None, :], other=0.0)
        w = _decompress(values_ptr, indices_ptr, offs_o, o_mask, b, offs_c,
                        stride_vo, stride_vb, stride_vj, stride_io, stride_ib, stride_ij, keep)
        acc = tl.dot(xt, w, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_o, mask=o_mask, other=0.0).to(tl.float32)[None, :]
    acc = _activation(acc, ACTIVATION)
    y = y_ptr + offs_t.to(tl.int64)[:, None] * stride_yt + offs_o[None, :] * stride_yn
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=t_mask[:, None] & o_mask[None, :])


@triton.jit
def _balanced_grad_input_kernel(
    g_ptr, values_ptr, indices_ptr, dx_ptr,
    T, N, K, n_banks, keep,
    stride_gt, stride_gn, stride_vo, stride_vb, stride_vj, stride_io, stride_ib, stride_ij, stride_dt, stride_dk,
    BANK: tl.constexpr, BANK_P: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr,
):
    """dX[t tile, bank b], looping over output tiles."""
    pid = tl.program_id(0)
    b = pid % n_banks
    offs_t = (pid // n_banks) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_c = tl.arange(0, BANK_P)
    t_mask = offs_t < T
    cols = b * BANK + offs_c
    c_mask = (offs_c < BANK) & (cols < K)
    g_rows = g_ptr + offs_t.to(tl.int64)[:, None] * stride_gt
    acc = tl.zeros((BLOCK_T, BANK_P), dtype=tl.float32)
    for o0 in range(0, N, BLOCK_O):
        offs_o = o0 + tl.arange(0, BLOCK_O)
        o_mask = offs_o < N
        gt = tl.load(g_rows + offs_o[None, :] * stride_gn, mask=t_mask[:, None] & o_mask[None, :], other=0.0)
        w = _decompress(values_ptr, indices_ptr, offs_o, o_mask, b, offs_c,
                        stride_vo, stride_vb, stride_vj, stride_io, stride_ib, stride_ij, keep)
        acc = tl.dot(gt, tl.trans(w), acc, input_precision=PRECISION)
    dx = dx_ptr + offs_t.to(tl.int64)[:, None] * stride_dt + cols[None, :] * stride_dk
    tl.store(dx, acc.to(dx_ptr.dtype.element_ty), mask=t_mask[:, None] & c_mask[None, :])


@triton.jit
def _balanced_sddmm_kernel(
    g_ptr, x_ptr, indices_ptr, dv_ptr,
    T, N, K, n_banks, keep,
    stride_gt, stride_gn, stride_xt, stride_xk, stride_io, stride_ib, stride_ij, stride_vo, stride_vb, stride_vj,
    BANK: tl.constexpr, BANK_P: tl.constexpr, KEEP_P: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """dW[o tile, bank b, :]: the dense tile of dY^T X over all tokens, then its KEEP kept entries per row."""
    pid = tl.program_id(0)
    b = pid % n_banks
    offs_o = (pid // n_banks) * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_c = tl.arange(0, BANK_P)
    o_mask = offs_o < N
    cols = b * BANK + offs_c
    c_mask = (offs_c < BANK) & (cols < K)
    acc = tl.zeros((BLOCK_O, BANK_P), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_mask = offs_t < T
        t64 = offs_t.to(tl.int64)
        gt = tl.load(g_ptr + t64[None, :] * stride_gt + offs_o[:, None] * stride_gn,
                     mask=o_mask[:, None] & t_mask[None, :], other=0.0)  # dY^T [BLOCK_O, BLOCK_T]
        xt = tl.load(x_ptr + t64[:, None] * stride_xt + cols[None, :] * stride_xk,
                     mask=t_mask[:, None] & c_mask[None, :], other=0.0)  # X [BLOCK_T, BANK_P]
        acc = tl.dot(gt, xt, acc, input_precision=PRECISION)
    offs_j = tl.arange(0, KEEP_P)
    keep_mask = o_mask[:, None] & (offs_j < keep)[None, :]
    o64 = offs_o.to(tl.int64)[:, None]
    idx = tl.load(indices_ptr + o64 * stride_io + b * stride_ib + offs_j[None, :] * stride_ij,
                  mask=keep_mask, other=0).to(tl.int32)
    kept = tl.gather(acc, idx, axis=1)
    dv = dv_ptr + o64 * stride_vo + b * stride_vb + offs_j[None, :] * stride_vj
    tl.store(dv, kept.to(dv_ptr.dtype.element_ty), mask=keep_mask)


def _autotuned(
    kernel, configs: Dict[Tuple[int, int], List[triton.Config]]
) -> Dict[Tuple[int, int], triton.runtime.Autotuner]:
    return {
        k: triton.autotune(configs=cfgs, key=["T", "N", "K", "BANK", "keep"])(kernel) for k, cfgs in configs.items()
    }


_TUNED = {
    "fwd": _autotuned(_balanced_linear_kernel, CONFIGS["fwd"]),
    "grad_input": _autotuned(_balanced_grad_input_kernel, CONFIGS["grad_input"]),
    "sddmm": _autotuned(_balanced_sddmm_kernel, CONFIGS["sddmm"]),
}


# ---- launchers ----------------------------------------------------------------------------------------------
def _pad(n: int) -> int:
    """Bank tile side: a power of two, at least tl.dot's 16."""
    return max(16, triton.next_power_of_2(n))


def _check_pattern(values: torch.Tensor, indices: torch.Tensor, bank: int, in_features: int) -> int:
    """Checks values/indices/bank against in_features; returns n_banks."""
    if not isinstance(values, torch.Tensor) or values.dim() != 3:
        raise ValueError(f"values must be a 3-D tensor [out, n_banks, keep], got {getattr(values, 'shape', values)}")
    if values.dtype not in _DTYPES:
        raise TypeError(f"the Triton kernels take float16, bfloat16 or float32, got {values.dtype}")
    if not isinstance(indices, torch.Tensor) or indices.dtype not in (torch.uint8, torch.int16):
        raise TypeError(
            f"indices must be a uint8 or int16 tensor, got {getattr(indices, 'dtype', type(indices).__name__)}"
        )
    if indices.shape != values.shape or indices.device != values.device:
        raise ValueError(
            f"indices must match values {tuple(values.shape)} on {values.device}, got {tuple(indices.shape)} on "
            f"{indices.device}"
        )
    n_banks = -(-in_features // bank) if bank >= 1 else 0
    if bank < 1 or values.shape[1] != n_banks:
        raise ValueError(
            f"values has {values.shape[1]} banks but {in_features} inputs in banks of {bank} need {n_banks}"
        )
    return n_banks


def _check(name: str, t: torch.Tensor, shape1: int, values: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[1] != shape1:
        raise ValueError(f"{name} must be 2-D [T, {shape1}], got {getattr(t, 'shape', t)}")
    if t.dtype != values.dtype or t.device != values.device:
        raise TypeError(f"{name} must be {values.dtype} on {values.device}, got {t.dtype} on {t.device}")


def balanced_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    bank: int,
    bias: Optional[torch.Tensor] = None,
    activation: str = "none",
    config: Optional[triton.Config] = None,
) -> torch.Tensor:
    """``act(x W^T + bias)``: x [T, in], values/indices [out, n_banks, keep], bias [out] -> [T, out].

    ``config`` forces one configuration instead of autotuning (benchmarks, tests)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    n_banks = _check_pattern(values, indices, bank, x.shape[-1])
    _check("x", x, x.shape[-1], values)
    if activation not in ACTIVATION_CODES:
        raise ValueError(f"activation must be one of {tuple(ACTIVATION_CODES)}, got {activation!r}")
    T, K = x.shape
    N, _, keep = values.shape
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (N,):
            raise ValueError(f"bias must have shape ({N},), got {getattr(bias, 'shape', bias)}")
        if bias.dtype != values.dtype or bias.device != values.device:
            raise TypeError(f"bias must be {values.dtype} on {values.device}, got {bias.dtype} on {bias.device}")
    y = x.new_empty(T, N)
    if T == 0:
        return y
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_T"]) * triton.cdiv(N, meta["BLOCK_O"]),)  # noqa: E731
    args = (x, values, indices, bias if bias is not None else y, y, T, N, K, n_banks, keep,
            x.stride(0), x.stride(1), *values.stride(), *indices.stride(), y.stride(0), y.stride(1))
    _launch(_balanced_linear_kernel, _TUNED["fwd"], _INTERPRET_CONFIG, x.device, x.dtype, grid, args, config,
            BANK=bank, BANK_P=_pad(bank), HAS_BIAS=bias is not None,
            ACTIVATION=ACTIVATION_CODES[activation], PRECISION=_precision(x.dtype))
    return y


def balanced_linear_grad_input(
    grad_out: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    bank: int,
    in_features: int,
    config: Optional[triton.Config] = None,
) -> torch.Tensor:
    """``grad_out W``: grad_out [T, out] -> [T, in]."""
    n_banks = _check_pattern(values, indices, bank, in_features)
    N, _, keep = values.shape
    _check("grad_out", grad_out, N, values)
    T = grad_out.shape[0]
    dx = grad_out.new_empty(T, in_features)
    if T == 0:
        return dx
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_T"]) * n_banks,)  # noqa: E731
    args = (grad_out, values, indices, dx, T, N, in_features, n_banks, keep,
            grad_out.stride(0), grad_out.stride(1), *values.stride(), *indices.stride(), dx.stride(0), dx.stride(1))
    _launch(
        _balanced_grad_input_kernel,
        _TUNED["grad_input"],
        _INTERPRET_CONFIG,
        grad_out.device,
        grad_out.dtype,
        grid,
        args,
        config,
        BANK=bank,
        BANK_P=_pad(bank),
        PRECISION=_precision(grad_out.dtype),
    )
    return dx


def balanced_sddmm(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    indices: torch.Tensor,
    bank: int,
    config: Optional[triton.Config] = None,
) -> torch.Tensor:
    """``(grad_out^T x)`` at the kept positions: grad_out [T, out], x [T, in] -> [out, n_banks, keep] in x's
    dtype (contiguous)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a 2-D tensor [T, in], got {getattr(x, 'shape', type(x).__name__)}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"the Triton kernels take float16, bfloat16 or float32, got {x.dtype}")
    if not isinstance(indices, torch.Tensor) or indices.dim() != 3:
        raise ValueError(
            "indices must be a 3-D tensor [out, n_banks, keep], got "
            f"{getattr(indices, 'shape', type(indices).__name__)}"
        )
    dv = torch.empty(indices.shape, dtype=x.dtype, device=x.device)
    n_banks = _check_pattern(dv, indices, bank, x.shape[1])
    N, _, keep = indices.shape
    _check("grad_out", grad_out, N, dv)
    if grad_out.shape[0] != x.shape[0]:
        raise ValueError(f"grad_out {tuple(grad_out.shape)} and x {tuple(x.shape)} must have the same number of tokens")
    T, K = x.shape
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_O"]) * n_banks,)  # noqa: E731
    args = (grad_out, x, indices, dv, T, N, K, n_banks, keep,
            grad_out.stride(0), grad_out.stride(1), x.stride(0), x.stride(1), *indices.stride(), *dv.stride())
    _launch(_balanced_sddmm_kernel, _TUNED["sddmm"], _INTERPRET_CONFIG, x.device, x.dtype, grid, args, config,
            BANK=bank, BANK_P=_pad(bank), KEEP_P=triton.next_power_of_2(keep),
            PRECISION=_precision(x.dtype))
    return dv
