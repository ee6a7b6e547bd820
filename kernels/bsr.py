"""Block-sparse (BSR) matmuls in Triton: the forward, the input gradient and the weight gradient (SDDMM).

Maths (``W`` [N=out, K=in] stored as its kept ``(BO, BI)`` blocks, ``X`` [T, K], ``dY`` [T, N]):
    forward      Y  = act(X W^T + b)                          [T, N]
    grad input   dX = dY W                                    [T, K]
    SDDMM        dW = (dY^T X) at the kept blocks only          [nnz, BO, BI]

Layout (from ``sparse.formats.BlockSparseWeight``, built once; the kernels never rebuild it):
    values        [nnz, BO, BI], logical; physically [nnz, BI, BO] (strides (BO*BI, 1, BO)): each block's
                  transpose is row-major, which is exactly the [BI, BO] operand the forward's tl.dot wants.
                  Strides are passed, so any layout works.
    row_offsets   int32 [n_block_rows + 1]; block row r holds blocks row_offsets[r]:row_offsets[r+1].
    col_indices   int32 [nnz]; block column of each block.
    col_offsets, row_indices, block_perm: the same pattern walked by block columns (grad input): the k-th
                  block in column order is values[block_perm[k]], in block row row_indices[k].
Blocks need not be powers of two or divide the shape: tiles are padded to a power of two >= 16 (tl.dot's
minimum) and the edges are masked.

Programs:
    forward      one per (token tile, block row), looping over the row's blocks with tl.dot.
    grad input   one per (token tile, block column), over the transposed metadata.
    SDDMM        one per chunk of up to GROUP consecutive blocks of a block row (grouped: the row's dY^T
                 tile is loaded once for all of them), reducing over all tokens with tl.dot.
fp16/bf16/fp32 inputs, fp32 accumulation; fp32 uses tf32 only when the caller allows it (the launchers pass
``torch.backends.cuda.matmul.allow_tf32``).

Expected speed (estimated from the data flow, not measured). The forward re-reads its X tile from L2 for every
block row, so it does at most BO FLOP per byte of X fetched (64 at block 64, 32 at block 32), against
~170 for cuBLAS's 128x256 tiles. If the L2 delivers about 5-7 TB/s on H100/H200, block 64 runs at roughly
half of cuBLAS's FLOP rate, i.e. about 0.5/d x cuBLAS, short of the 0.8/d target; block 32 lower still.
The grad input has the same ceiling with BI. benchmarks/gpu_triton.py measures all of it against its targets.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl

__all__ = ["bsr_linear", "bsr_linear_grad_input", "bsr_sddmm", "CONFIGS", "ACTIVATION_CODES"]

ACTIVATION_CODES: Dict[str, int] = {"none": 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "silu": 4}
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# ---- autotune configurations ------------------------------------------------------------------------------
# A starting point, chosen from the tile shapes rather than timings, and kept only if they compile without
# spills and within shared memory for both
# targets (tests/test_triton_compile.py checks every one). benchmarks/gpu_triton.py must measure, per arch,
# which config wins for T=4096 at block 32 and 64 and d=0.1..0.5, and the losers be pruned here with the
# numbers. Only BLOCK_T (tokens per program) is tuned: the other tile sides are the weight's block.
# Keyed on T, N, K and the block (BO, BI): the best BLOCK_T depends on how many programs fill the GPU
# (T/BLOCK_T x block rows) and on the K-loop length (blocks per row).
# Sets are per (arch, element bits): fp32 runs the dot on the CUDA cores (ieee) or as tf32 with twice the
# bytes per tile, so it gets smaller tiles; the 16-bit tiles spill there (seen in the compile test).
CONFIGS: Dict[str, Dict[Tuple[int, int], List[triton.Config]]] = {
    "fwd": {
        # sm_80: 108 SMs, 164 KiB smem, mma.sync. 64-128 tokens x a 32/64 block keeps 4-8 warps busy;
        # 3-4 stages hide the indirect (col_indices) loads.
        (80, 16): [
            triton.Config({"BLOCK_T": 64}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_T": 128}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_T": 128}, num_warps=8, num_stages=4),
        ],
        # sm_90: 132 SMs, 227 KiB smem, wgmma wants M >= 64 per warpgroup; 128-256 tokens give one or two
        # warpgroups a full M, and 3-4 stages of a 256x64 bf16 tile fit well inside 227 KiB.
        (90, 16): [
            triton.Config({"BLOCK_T": 128}, num_warps=4, num_stages=4),
            triton.Config({"BLOCK_T": 128}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_T": 256}, num_warps=8, num_stages=3),
        ],
        # fp32 (compile test): 128x64 fp32 at 4 warps spilled 2.4 KB on sm_90; on sm_80 64 tokens
        # on 4 warps and 128 on 8 spilled 90-250 B, 64 tokens on 8 warps uses 80-122 registers.
        (80, 32): [
            triton.Config({"BLOCK_T": 64}, num_warps=8, num_stages=3),
        ],
        # Triton 3.6 spills 232-240 B on sm_90 in the fp32 (ieee) forward at 64 tokens on 4 warps and at 128
        # on 8 (255 registers; Triton 3.9 needs 128): 32 tokens on 4 warps and 64 on 8 stay at 80-92 registers
        # on both (compile test).
        (90, 32): [
            triton.Config({"BLOCK_T": 32}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_T": 64}, num_warps=8, num_stages=3),
        ],
    },
}
# grad input has the forward's shape with the roles of rows and columns swapped: same starting set, but for
# sm_90 fp32, whose forward set above is shaped by its epilogue's registers: 64 tokens on 4 warps and 128 on
# 8 use 128 registers there without spilling on Triton 3.6 and 3.9 (64 on 8 spills 8 B on 3.6).
CONFIGS["grad_input"] = {
    **CONFIGS["fwd"],
    (90, 32): [
        triton.Config({"BLOCK_T": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_T": 128}, num_warps=8, num_stages=3),
    ],
}
# SDDMM reduces over tokens: BLOCK_T is the K of its dot; its output tile is GROUP blocks of one block row
# side by side ([BO, GROUP*BI]). GROUP raises the data reuse: per byte fetched from L2 a 64x64 block does
# 2*64*64*G / (2*(64 + 64*G)) FLOP, 32 at G=1, 43 at G=2, 51 at G=4 (the forward's ceiling is BO = 64).
# 3-4 stages keep loads of dY^T and X in flight; 8 warps hold the [64, 256] fp32 accumulator of G=4 in 64
# registers a thread.
CONFIGS["sddmm"] = {
    (80, 16): [
        triton.Config({"BLOCK_T": 64, "GROUP": 2}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_T": 64, "GROUP": 4}, num_warps=8, num_stages=3),
    ],
    (90, 16): [
        triton.Config({"BLOCK_T": 64, "GROUP": 2}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_T": 64, "GROUP": 4}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_T": 128, "GROUP": 2}, num_warps=8, num_stages=3),
    ],
    # fp32: half the tokens per step (twice the bytes); fp32 at 128 tokens x 4 stages needed 193 KiB of
    # shared memory, over sm_80's 163 KiB (compile test).
    (80, 32): [
        triton.Config({"BLOCK_T": 32, "GROUP": 1}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_T": 32, "GROUP": 2}, num_warps=8, num_stages=3),
    ],
    (90, 32): [
        triton.Config({"BLOCK_T": 32, "GROUP": 1}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_T": 32, "GROUP": 2}, num_warps=8, num_stages=3),
    ],
}
# CPU tensors (TRITON_INTERPRET=1 only) have nothing to tune: one small config keeps the interpreter fast
# (GROUP 2 so that chunks of several blocks, partly past a row's end, are exercised).
_INTERPRET_CONFIG = {"BLOCK_T": 16}
_INTERPRET_SDDMM = {"BLOCK_T": 16, "GROUP": 2}


# ---- kernels ------------------------------------------------------------------------------------------------
@triton.jit
def _activation(z, ACTIVATION: tl.constexpr):
    """act(z) in fp32; codes as ACTIVATION_CODES. tanh is written with exp (no libdevice under the
    interpreter) as sign(u) (1 - e) / (1 + e), e = exp(-2|u|) <= 1, which cannot overflow."""
    if ACTIVATION == 1:
        z = tl.maximum(z, 0.0)
    elif ACTIVATION == 2:
        z = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    elif ACTIVATION == 3:
        u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        e = tl.exp(-2.0 * tl.abs(u))
        th = (1.0 - e) / (1.0 + e)
        z = 0.5 * z * (1.0 + tl.where(u < 0, -th, th))
    elif ACTIVATION == 4:
        z = z * tl.sigmoid(z)
    return z


@triton.jit
def _bsr_linear_kernel(
    x_ptr, values_ptr, row_offsets_ptr, col_indices_ptr, bias_ptr, y_ptr,
    T, N, K,
    stride_xt, stride_xk, stride_vn, stride_vo, stride_vi, stride_yt, stride_yn,
    BO: tl.constexpr, BI: tl.constexpr, BO_P: tl.constexpr, BI_P: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """Y[t, r*BO:(r+1)*BO] for one (token tile, block row r)."""
    pid = tl.program_id(0)
    n_brow = tl.cdiv(N, BO)
    # Block rows vary fastest: programs running together share the same X tile (reused from L2).
    r = pid % n_brow
    tile = pid // n_brow
    offs_t = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_o = tl.arange(0, BO_P)
    offs_i = tl.arange(0, BI_P)
    t_mask = offs_t < T
    out_cols = r * BO + offs_o
    o_mask = (offs_o < BO) & (out_cols < N)
    w_mask = (offs_i < BI)[:, None] & (offs_o < BO)[None, :]
    x_rows = x_ptr + offs_t.to(tl.int64)[:, None] * stride_xt
    w_tile = offs_i[:, None] * stride_vi + offs_o[None, :] * stride_vo
    start = tl.load(row_offsets_ptr + r)
    end = tl.load(row_offsets_ptr + r + 1)
    acc = tl.zeros((BLOCK_T, BO_P), dtype=tl.float32)
    for k in range(start, end):
        c = tl.load(col_indices_ptr + k)
        in_cols = c * BI + offs_i
        i_mask = (offs_i < BI) & (in_cols < K)
        xt = tl.load(x_rows + in_cols[None, :] * stride_xk, mask=t_mask[:, None] & i_mask[None, :], other=0.0)
        wt = tl.load(
            values_ptr + tl.cast(k, tl.int64) * stride_vn + w_tile, mask=w_mask, other=0.0
        )  # W_block^T [BI, BO]
        acc = tl.dot(xt, wt, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + out_cols, mask=o_mask, other=0.0).to(tl.float32)[None, :]
    acc = _activation(acc, ACTIVATION)
    y = y_ptr + offs_t.to(tl.int64)[:, None] * stride_yt + out_cols[None, :] * stride_yn
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=t_mask[:, None] & o_mask[None, :])


@triton.jit
def _bsr_grad_input_kernel(
    g_ptr, values_ptr, col_offsets_ptr, row_indices_ptr, block_perm_ptr, dx_ptr,
    T, N, K,
    stride_gt, stride_gn, stride_vn, stride_vo, stride_vi, stride_dt, stride_dk,
    BO: tl.constexpr, BI: tl.constexpr, BO_P: tl.constexpr, BI_P: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """dX[t, c*BI:(c+1)*BI] for one (token tile, block column c); columns without blocks write zeros."""
    pid = tl.program_id(0)
    n_bcol = tl.cdiv(K, BI)
    c = pid % n_bcol
    tile = pid // n_bcol
    offs_t = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_o = tl.arange(0, BO_P)
    offs_i = tl.arange(0, BI_P)
    t_mask = offs_t < T
    in_cols = c * BI + offs_i
    i_mask = (offs_i < BI) & (in_cols < K)
    w_mask = (offs_o < BO)[:, None] & (offs_i < BI)[None, :]
    g_rows = g_ptr + offs_t.to(tl.int64)[:, None] * stride_gt
    w_tile = offs_o[:, None] * stride_vo + offs_i[None, :] * stride_vi
    start = tl.load(col_offsets_ptr + c)
    end = tl.load(col_offsets_ptr + c + 1)
    acc = tl.zeros((BLOCK_T, BI_P), dtype=tl.float32)
    for k in range(start, end):
        p = tl.load(block_perm_ptr + k)
        r = tl.load(row_indices_ptr + k)
        out_cols = r * BO + offs_o
        o_mask = (offs_o < BO) & (out_cols < N)
        gt = tl.load(g_rows + out_cols[None, :] * stride_gn, mask=t_mask[:, None] & o_mask[None, :], other=0.0)
        wt = tl.load(values_ptr + tl.cast(p, tl.int64) * stride_vn + w_tile, mask=w_mask, other=0.0)  # W_block [BO, BI]
        acc = tl.dot(gt, wt, acc, input_precision=PRECISION)
    dx = dx_ptr + offs_t.to(tl.int64)[:, None] * stride_dt + in_cols[None, :] * stride_dk
    tl.store(dx, acc.to(dx_ptr.dtype.element_ty), mask=t_mask[:, None] & i_mask[None, :])


@triton.jit
def _bsr_sddmm_kernel(
    g_ptr, x_ptr, row_offsets_ptr, col_indices_ptr, dv_ptr,
    T, N, K, n_bcol,
    stride_gt, stride_gn, stride_xt, stride_xk, stride_vn, stride_vo, stride_vi,
    BO: tl.constexpr, BI: tl.constexpr, BO_P: tl.constexpr, BI_P: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, GROUP: tl.constexpr,
):
    """dW of up to GROUP consecutive blocks k..k+GROUP-1 of one block row r, as one dot:
    dY[:, r]^T [X[:, c_k] ... X[:, c_k+GROUP-1]], so each dY^T tile is loaded once per GROUP blocks."""
    pid = tl.program_id(0)
    # Chunks of GROUP blocks per row, sized for a full row (the host cannot know the longest row without
    # reading row_offsets): chunks past the row's end run no iterations and store nothing.
    n_chunks = tl.cdiv(n_bcol, GROUP)
    r = pid // n_chunks
    first = tl.load(row_offsets_ptr + r) + (pid % n_chunks) * GROUP
    count = tl.load(row_offsets_ptr + r + 1) - first
    offs_o = tl.arange(0, BO_P)
    offs_j = tl.arange(0, GROUP * BI_P)
    g = offs_j // BI_P  # which block of the chunk
    i = offs_j % BI_P  # column inside it
    g_mask = g < count
    c = tl.load(col_indices_ptr + first + g, mask=g_mask, other=0)
    out_cols = r * BO + offs_o
    in_cols = c * BI + i
    o_mask = (offs_o < BO) & (out_cols < N)
    j_mask = g_mask & (i < BI) & (in_cols < K)
    acc = tl.zeros((BO_P, GROUP * BI_P), dtype=tl.float32)
    t_end = tl.where(count > 0, T, 0)
    for t0 in range(0, t_end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_mask = offs_t < T
        t64 = offs_t.to(tl.int64)
        gt = tl.load(g_ptr + t64[None, :] * stride_gt + out_cols[:, None] * stride_gn,
                     mask=o_mask[:, None] & t_mask[None, :], other=0.0)  # dY^T [BO, BLOCK_T]
        xt = tl.load(x_ptr + t64[:, None] * stride_xt + in_cols[None, :] * stride_xk,
                     mask=t_mask[:, None] & j_mask[None, :], other=0.0)  # [X_c1 .. X_cG] [BLOCK_T, GROUP*BI]
        acc = tl.dot(gt, xt, acc, input_precision=PRECISION)
    # Positions of an edge block outside the matrix get 0 (their loads were masked), like the reference.
    dv = dv_ptr + (first + g).to(tl.int64)[None, :] * stride_vn + offs_o[:, None] * stride_vo + i[None, :] * stride_vi
    tl.store(dv, acc.to(dv_ptr.dtype.element_ty), mask=(offs_o < BO)[:, None] & (g_mask & (i < BI))[None, :])


def _autotuned(
    kernel, configs: Dict[Tuple[int, int], List[triton.Config]]
) -> Dict[Tuple[int, int], triton.runtime.Autotuner]:
    return {k: triton.autotune(configs=cfgs, key=["T", "N", "K", "BO", "BI"])(kernel) for k, cfgs in configs.items()}


_TUNED = {
    "fwd": _autotuned(_bsr_linear_kernel, CONFIGS["fwd"]),
    "grad_input": _autotuned(_bsr_grad_input_kernel, CONFIGS["grad_input"]),
    "sddmm": _autotuned(_bsr_sddmm_kernel, CONFIGS["sddmm"]),
}


# ---- launchers ----------------------------------------------------------------------------------------------
def _pad(n: int) -> int:
    """Tile side for a block side: a power of two, at least tl.dot's 16."""
    return max(16, triton.next_power_of_2(n))


def _precision(dtype: torch.dtype) -> str:
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def config_key(device: torch.device, dtype: torch.dtype) -> Tuple[int, int]:
    """The CONFIGS entry for a CUDA device and dtype: (90 from major 9 up else 80, element bits)."""
    major, _ = torch.cuda.get_device_capability(device)
    return (90 if major >= 9 else 80, 32 if dtype == torch.float32 else 16)


def _launch(kernel, tuned: Dict[Tuple[int, int], object], interpret: Dict[str, int], device: torch.device,
            dtype: torch.dtype, grid, args: tuple, config: Optional[triton.Config], **meta) -> None:
    """Launches ``kernel`` with ``config`` if given (a fixed choice, e.g. for benchmarks); else on CUDA its
    autotuned version for the arch and dtype; else (CPU tensors, only under TRITON_INTERPRET=1) with the
    ``interpret`` meta-parameters."""
    if config is not None:
        meta = {**meta, **config.all_kwargs()}
    elif device.type == "cuda":
        kernel = tuned[config_key(device, dtype)]
    else:
        meta = {**meta, **interpret}
    torch.library.wrap_triton(kernel)[grid](*args, **meta)


def _check(name: str, t: torch.Tensor, dim: int, like: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    if t.dtype != like.dtype or t.device != like.device:
        raise TypeError(f"{name} must be {like.dtype} on {like.device}, got {t.dtype} on {t.device}")


def _check_values(values: torch.Tensor) -> None:
    if not isinstance(values, torch.Tensor) or values.dim() != 3:
        raise ValueError(
            f"values must be a 3-D tensor [nnz, block_rows, block_cols], got {getattr(values, 'shape', values)}"
        )
    if values.dtype not in _DTYPES:
        raise TypeError(f"the Triton kernels take float16, bfloat16 or float32, got {values.dtype}")


def _check_index(name: str, t: torch.Tensor, values: torch.Tensor) -> None:
    if t.dtype != torch.int32 or t.dim() != 1 or t.device != values.device:
        raise TypeError(
            f"{name} must be a 1-D int32 tensor on {values.device}, got {t.dtype} {tuple(t.shape)} on {t.device}"
        )


def bsr_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    row_offsets: torch.Tensor,
    col_indices: torch.Tensor,
    out_features: int,
    bias: Optional[torch.Tensor] = None,
    activation: str = "none",
    config: Optional[triton.Config] = None,
) -> torch.Tensor:
    """``act(x W^T + bias)``: x [T, in], values [nnz, bo, bi], bias [out] or None -> [T, out].

    ``config`` forces one configuration instead of autotuning (benchmarks, tests)."""
    _check_values(values)
    _check("x", x, 2, values)
    _check_index("row_offsets", row_offsets, values)
    _check_index("col_indices", col_indices, values)
    if activation not in ACTIVATION_CODES:
        raise ValueError(f"activation must be one of {tuple(ACTIVATION_CODES)}, got {activation!r}")
    T, K = x.shape
    bo, bi = values.shape[1], values.shape[2]
    n_brow = -(-out_features // bo)
    if row_offsets.numel() != n_brow + 1:
        raise ValueError(
            f"row_offsets must have {n_brow + 1} entries for {out_features} outputs in blocks of {bo}, got "
            f"{row_offsets.numel()}"
        )
    if bias is not None:
        _check("bias", bias, 1, values)
        if bias.shape[0] != out_features:
            raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
    y = x.new_empty(T, out_features)
    if T == 0:
        return y
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_T"]) * n_brow,)  # noqa: E731
    args = (x, values, row_offsets, col_indices, bias if bias is not None else y, y, T, out_features, K,
            x.stride(0), x.stride(1), values.stride(0), values.stride(1), values.stride(2), y.stride(0), y.stride(1))
    _launch(
        _bsr_linear_kernel,
        _TUNED["fwd"],
        _INTERPRET_CONFIG,
        x.device,
        x.dtype,
        grid,
        args,
        config,
        BO=bo,
        BI=bi,
        BO_P=_pad(bo),
        BI_P=_pad(bi),
        HAS_BIAS=bias is not None,
        ACTIVATION=ACTIVATION_CODES[activation],
        PRECISION=_precision(x.dtype),
    )
    return y


def bsr_linear_grad_input(
    grad_out: torch.Tensor,
    values: torch.Tensor,
    col_offsets: torch.Tensor,
    row_indices: torch.Tensor,
    block_perm: torch.Tensor,
    in_features: int,
    config: Optional[triton.Config] = None,
) -> torch.Tensor:
    """``grad_out W``: grad_out [T, out] -> [T, in], walking the blocks by column."""
    _check_values(values)
    _check("grad_out", grad_out, 2, values)
    for name, t in (("col_offsets", col_offsets), ("row_indices", row_indices), ("block_perm", block_perm)):
        _check_index(name, t, values)
    T, N = grad_out.shape
    bo, bi = values.shape[1], values.shape[2]
    n_bcol = -(-in_features // bi)
    if col_offsets.numel() != n_bcol + 1:
        raise ValueError(
            f"col_offsets must have {n_bcol + 1} entries for {in_features} inputs in blocks of {bi}, got "
            f"{col_offsets.numel()}"
        )
    dx = grad_out.new_empty(T, in_features)
    if T == 0:
        return dx
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_T"]) * n_bcol,)  # noqa: E731
    args = (grad_out, values, col_offsets, row_indices, block_perm, dx, T, N, in_features,
            grad_out.stride(0), grad_out.stride(1), values.stride(0), values.stride(1), values.stride(2),
            dx.stride(0), dx.stride(1))
    _launch(
        _bsr_grad_input_kernel,
        _TUNED["grad_input"],
        _INTERPRET_CONFIG,
        grad_out.device,
        grad_out.dtype,
        grid,
        args,
        config,
        BO=bo,
        BI=bi,
        BO_P=_pad(bo),
        BI_P=_pad(bi),
        PRECISION=_precision(grad_out.dtype),
    )
    return dx


def bsr_sddmm(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    values: torch.Tensor,
    row_offsets: torch.Tensor,
    col_indices: torch.Tensor,
    config: Optional[triton.Config] = None,
) -> torch.Tensor:
    """``(grad_out^T x)`` at the kept blocks: grad_out [T, out], x [T, in] -> like ``values`` [nnz, bo, bi]
    (same strides). ``values`` supplies the block shape and layout only; its data is not read."""
    _check_values(values)
    _check("grad_out", grad_out, 2, values)
    _check("x", x, 2, values)
    _check_index("row_offsets", row_offsets, values)
    _check_index("col_indices", col_indices, values)
    if grad_out.shape[0] != x.shape[0]:
        raise ValueError(f"grad_out {tuple(grad_out.shape)} and x {tuple(x.shape)} must have the same number of tokens")
    T, N = grad_out.shape
    K = x.shape[1]
    nnz, bo, bi = values.shape
    n_brow = -(-N // bo)
    if row_offsets.numel() != n_brow + 1:
        raise ValueError(
            f"row_offsets must have {n_brow + 1} entries for {N} outputs in blocks of {bo}, got {row_offsets.numel()}"
        )
    dv = torch.empty_like(values)
    if nnz == 0:
        return dv
    n_bcol = -(-K // bi)
    grid = lambda meta: (n_brow * triton.cdiv(n_bcol, meta["GROUP"]),)  # noqa: E731
    args = (grad_out, x, row_offsets, col_indices, dv, T, N, K, n_bcol,
            grad_out.stride(0), grad_out.stride(1), x.stride(0), x.stride(1), dv.stride(0), dv.stride(1), dv.stride(2))
    _launch(_bsr_sddmm_kernel, _TUNED["sddmm"], _INTERPRET_SDDMM, x.device, x.dtype, grid, args, config,
            BO=bo, BI=bi, BO_P=_pad(bo), BI_P=_pad(bi), PRECISION=_precision(x.dtype))
    return dv
