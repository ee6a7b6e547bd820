"""Unstructured (CSR, 1x1-block) sparse matmuls in Triton: the forward, the input gradient and the SDDMM.

Maths (``W`` [N=out, K=in] stored as its nonzeros, ``X`` [T, K], ``dY`` [T, N]):
    forward      Y[t, r]  = act(sum_{j in row r} X[t, c_j] v_j + b[r])        [T, N]
    grad input   dX[t, c] = sum_{k in column c} dY[t, r_k] v_{perm_k}          [T, K]
    SDDMM        dW[j]    = sum_t dY[t, r_j] X[t, c_j]     for every nonzero j   [nnz, 1, 1]

Layout (``sparse.formats.BlockSparseWeight`` with block (1, 1), built once; the kernels never rebuild it):
    values        [nnz, 1, 1] (any strides; only stride(0) matters).
    row_offsets   int32 [N + 1]; row r holds nonzeros row_offsets[r]:row_offsets[r+1].
    col_indices   int32 [nnz]; column of each nonzero, strictly increasing within a row.
    col_offsets, row_indices, block_perm: the transposed walk (grad input): the k-th nonzero in column order is
                  values[block_perm[k]], in row row_indices[k].
The forward and the grad input are one kernel: it walks "rows" of a CSR pattern (rows of W, or its columns
through col_offsets / row_indices / block_perm) and gathers the matching columns of its dense operand.

Data layout of the dense operand. Every multiply-add needs its own element X[t, c_j] (a gather): nothing but
the rows that share a column reuse it. Gathering from row-major X [T, K] puts a warp's lanes on different
columns of one token row, CHUNK consecutive nonzeros spanning ~CHUNK/d columns: at d = 0.1 a 32-byte sector
serves ~1.6 useful fp16 elements of 16. So the launchers first copy X (dY) token-major, X^T [K, TP] with TP =
T rounded up to 16 and the pad zeroed: a gather of column c is then BLOCK_T contiguous tokens, whole sectors,
16-byte vector loads (TP divides by 16), and the loads need no token mask narrower than 16. The copy reads and
writes T*K elements once, against the T*nnz the kernel gathers: 2/(d*N) of the traffic (the grad input copies
dY, the SDDMM both dY and X).

Programs (no tl.dot: see "why CUDA cores" below):
    forward /    one per (group of ROWS consecutive rows, token tile of BLOCK_T), a 2-D grid whose row groups
    grad input   vary fastest, so the programs running together gather from the same X^T slab [K, BLOCK_T]
                 (kept in L2, partly in L1). Rows one after another: the row's nonzeros in chunks of CHUNK, a
                 [CHUNK, BLOCK_T] fp32 tile of products accumulated elementwise, summed over CHUNK at the row's
                 end into column r - r0 of a [BLOCK_T, ROWS] output tile; bias and activation (bsr.py's
                 _activation and codes) on that tile, one store coalesced along the rows.
    SDDMM        one per chunk of CHUNK consecutive nonzeros in row order (rows found by a binary search of
                 row_offsets: the op's schema passes no row index per nonzero), reducing over all tokens in
                 BLOCK_T steps: dY^T[r_j, tile] (mostly one row per chunk: loaded once, broadcast) times the
                 gathered X^T[c_j, tile], [CHUNK, BLOCK_T] fp32, summed over tokens at the end.
fp16/bf16/fp32 inputs, products and sums in fp32 (never tf32: there is no dot). Only stored nonzeros are ever
multiplied, so NaN/Inf in X reach exactly the outputs whose row stores that column (tests/test_numerics.py's
rule), and ragged T, empty rows and columns and T = 1 need no special case.

Why CUDA cores, not tl.dot. A dot could do the per-row reduction (a [CHUNK, ROWS] matrix holding each nonzero's
value in its row's column, times the gathered [CHUNK, BLOCK_T] tile), but it multiplies every gathered X by
the zeros of the other rows: NaN/Inf in X would leak into rows that do not store that column, fp32 would run
ROWS-fold redundant FMAs (ieee dot is on the CUDA cores), and it buys nothing where the gather is the bound.

What bounds it (estimated from the data flow, not measured; no GPU here). One gathered element per
multiply-add, so the kernel is bound by the bandwidth that feeds the gathers, not by arithmetic: fp32 FMA and
the int/convert work per element are ~10x below it. From L2 (~5.5-7 TB/s on H100/H200) that is ~3 T fp16
elements/s against cuBLAS's ~700 TFLOP/s = 350 T MAC/s: time ~ d*T*N*K / 3e12 against T*N*K / 3.5e14, so ours
is about 120*d x cuBLAS's time (break-even d ~ 0.8%, fp16/bf16; fp32 against exact-fp32 cuBLAS ~ 20*d). L1 hits
raise it: a slab X^T[:, tile] of K*BLOCK_T elements is reused by the ~d*ROWS*(programs per SM) rows that run on
an SM at once if it fits in L1 (256 KiB with the shared memory): BLOCK_T 16 at K = 4096 fp16 is 128 KiB. With
every gather an L1 hit (~30 TB/s) the bound becomes ~20*d x cuBLAS (break-even d ~ 5%). The row metadata
(4 B index + value per nonzero) is re-read once per token tile: 6/(2*BLOCK_T) of the gather traffic in 16-bit,
19% at BLOCK_T 16, 5% at 64: hence the BLOCK_T choices. So on a GPU these kernels beat dense only at very high
sparsity; what they fix is the 256x padded work of 1x1 blocks in bsr.py's 16x16 tl.dot tiles. Beating dense at
d = 0.1 needs reuse a plain CSR walk cannot give: rows grouped so that they share columns (a panel format with
a dense [rows, union of columns] value tile for the tensor cores), which is a different weight layout.
Decode (T = 1) pads the token tile to 16 and so uses 1 lane in 16 of each gather: a GEMV kernel with lanes
along the nonzeros would serve it better (not built).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl

from .bsr import _DTYPES, ACTIVATION_CODES, _activation, _check, _check_index, _launch

__all__ = ["csr_linear", "csr_linear_grad_input", "csr_sddmm", "CONFIGS", "is_csr"]

# ---- autotune configurations ------------------------------------------------------------------------------
# A starting point, chosen from the data flow (module docstring) rather than timings, and kept only if each
# compiles on sm_80 and sm_90 without spills and within shared memory (tests/test_triton_compile.py).
# benchmarks/gpu_triton.py must measure, per arch, which wins at T = 4096 and d = 0.01..0.1 and prune the rest.
# Keyed on T, M (rows walked), F (gathered features) and nnz: the density sets the row lengths (CHUNK wants to
# be about a row's nonzeros or less, or its lanes idle at the row's end), K the L1 slab of a token tile.
# No tensor cores, so one set serves both arches and all dtypes (fp32 gathers twice the bytes: its tiles are
# the same element counts, which the compile test shows fit in registers).
# BLOCK_T 16 keeps a K = 4096 slab within L1 (16-bit); 32 and 64 halve / quarter the re-read row metadata and
# suit smaller K. CHUNK x BLOCK_T = 1024-2048 fp32 accumulators over 128 threads: 8-16 registers each.
_ROWS_CONFIGS = [
    triton.Config({"BLOCK_T": 16, "CHUNK": 64, "ROWS": 16}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_T": 32, "CHUNK": 32, "ROWS": 16}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_T": 64, "CHUNK": 32, "ROWS": 32}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_T": 32, "CHUNK": 16, "ROWS": 32}, num_warps=2, num_stages=1),
]
# SDDMM: CHUNK nonzeros x all tokens per program; BLOCK_T tokens per step. Larger token steps amortise the loop
# and the (mostly broadcast) dY^T row; 128 threads hold [CHUNK, BLOCK_T] in 16-32 registers each.
_SDDMM_CONFIGS = [
    triton.Config({"BLOCK_T": 64, "CHUNK": 32}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_T": 128, "CHUNK": 32}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_T": 64, "CHUNK": 64}, num_warps=8, num_stages=1),
]
_ARCH_KEYS = [(80, 16), (90, 16), (80, 32), (90, 32)]
CONFIGS: Dict[str, Dict[Tuple[int, int], List[triton.Config]]] = {
    "fwd": {key: _ROWS_CONFIGS for key in _ARCH_KEYS},
    "grad_input": {key: _ROWS_CONFIGS for key in _ARCH_KEYS},
    "sddmm": {key: _SDDMM_CONFIGS for key in _ARCH_KEYS},
}
# CPU tensors (TRITON_INTERPRET=1 only): small tiles keep the interpreter fast, and a CHUNK and ROWS small
# enough that the tests' rows span several chunks and the last row group is partial.
_INTERPRET_CONFIG = {"BLOCK_T": 16, "CHUNK": 8, "ROWS": 4}
_INTERPRET_SDDMM = {"BLOCK_T": 16, "CHUNK": 8}
# Token pitch of the token-major copies: a multiple of 16, so gathers are whole 16-byte vectors (module docstring).
_PITCH = 16
# Token tiles run on grid axis 1 (at most 65535 programs; a 1-D grid's pid // n_groups made ptxas keep values on
# the stack, sm_80 compile test), with BLOCK_T >= 16 in every config: longer inputs are cut into launches of this
# many tokens.
_MAX_TOKENS = 65535 * 16


# ---- kernels ------------------------------------------------------------------------------------------------
@triton.jit
def _csr_rows_kernel(
    xt_ptr, values_ptr, offsets_ptr, indices_ptr, perm_ptr, bias_ptr, y_ptr,
    T, TP, M, F, nnz,
    stride_xf, stride_xt, stride_v, stride_yt, stride_ym,
    HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
    BLOCK_T: tl.constexpr, CHUNK: tl.constexpr, ROWS: tl.constexpr,
):
    """Y[t tile, rows r0:r0+ROWS] = act(sum over each row's nonzeros j of X^T[idx_j, t] v_j + b): the forward
    (offsets = row_offsets, indices = col_indices) and the grad input (offsets = col_offsets, indices =
    row_indices, values through perm = block_perm). xt is token-major ([F, TP], zero past T); M rows, F
    features gathered. Rows without nonzeros give act(b) (0 for the grad input)."""
    # Row groups on grid axis 0, which varies fastest: the programs running together gather from the same
    # X^T slab (L2/L1 reuse).
    r0 = tl.program_id(0) * ROWS
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_j = tl.arange(0, CHUNK)
    offs_r = tl.arange(0, ROWS)
    ld_mask = offs_t < TP  # constant over 16 tokens: the gathers stay vectorised; the pad past T is zero
    x_cols = xt_ptr + offs_t[None, :] * stride_xt
    out = tl.zeros((BLOCK_T, ROWS), dtype=tl.float32)
    for i in range(ROWS):
        r = r0 + i
        start = tl.load(offsets_ptr + r, mask=r < M, other=0)
        end = tl.load(offsets_ptr + r + 1, mask=r < M, other=0)
        acc = tl.zeros((CHUNK, BLOCK_T), dtype=tl.float32)
        for k0 in range(start, end, CHUNK):
            k = k0 + offs_j
            k_mask = k < end
            idx = tl.load(indices_ptr + k, mask=k_mask, other=0)
            if HAS_PERM:
                p = tl.load(perm_ptr + k, mask=k_mask, other=0)
            else:
                p = k
            v = tl.load(values_ptr + p.to(tl.int64) * stride_v, mask=k_mask, other=0.0).to(tl.float32)
            xg = tl.load(x_cols + idx.to(tl.int64)[:, None] * stride_xf, mask=k_mask[:, None] & ld_mask[None, :],
                         other=0.0)  # X^T[idx_j, t]: [CHUNK, BLOCK_T], each row BLOCK_T contiguous tokens
            acc += xg.to(tl.float32) * v[:, None]
        out = tl.where(offs_r[None, :] == i, tl.sum(acc, axis=0)[:, None], out)
    rows = r0 + offs_r
    r_mask = rows < M
    if HAS_BIAS:
        out += tl.load(bias_ptr + rows, mask=r_mask, other=0.0).to(tl.float32)[None, :]
    out = _activation(out, ACTIVATION)
    y = y_ptr + offs_t.to(tl.int64)[:, None] * stride_yt + rows[None, :] * stride_ym
    tl.store(y, out.to(y_ptr.dtype.element_ty), mask=(offs_t < T)[:, None] & r_mask[None, :])


@triton.jit
def _csr_sddmm_kernel(
    gt_ptr, xt_ptr, row_offsets_ptr, col_indices_ptr, dv_ptr,
    TP, N, nnz, n_steps,
    stride_gn, stride_gt, stride_xk, stride_xt, stride_v,
    BLOCK_T: tl.constexpr, CHUNK: tl.constexpr,
):
    """dW[j] = sum_t dY^T[r_j, t] X^T[c_j, t] for the CHUNK nonzeros j = pid*CHUNK + (0..CHUNK-1); gt, xt are
    token-major ([N, TP], [K, TP], zero past T)."""
    pid = tl.program_id(0)
    j = pid * CHUNK + tl.arange(0, CHUNK)
    j_mask = j < nnz
    # Row of each nonzero: the r with row_offsets[r] <= j < row_offsets[r+1] (empty rows never qualify), by a
    # binary search keeping row_offsets[lo] <= j < row_offsets[hi]; n_steps >= log2(N) + 1 halvings.
    lo = tl.zeros((CHUNK,), dtype=tl.int32)
    hi = tl.zeros((CHUNK,), dtype=tl.int32) + N
    for _ in range(n_steps):
        mid = (lo + hi) // 2
        below = tl.load(row_offsets_ptr + mid, mask=j_mask, other=0) <= j
        lo = tl.where(below, mid, lo)
        hi = tl.where(below, hi, mid)
    c = tl.load(col_indices_ptr + j, mask=j_mask, other=0)
    g_rows = gt_ptr + lo.to(tl.int64)[:, None] * stride_gn
    x_rows = xt_ptr + c.to(tl.int64)[:, None] * stride_xk
    acc = tl.zeros((CHUNK, BLOCK_T), dtype=tl.float32)
    for t0 in range(0, TP, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask = j_mask[:, None] & (offs_t < TP)[None, :]
        g = tl.load(g_rows + offs_t[None, :] * stride_gt, mask=mask, other=0.0)  # mostly one row, broadcast
        x = tl.load(x_rows + offs_t[None, :] * stride_xt, mask=mask, other=0.0)  # gathered columns of X
        acc += g.to(tl.float32) * x.to(tl.float32)
    dv = tl.sum(acc, axis=1)
    tl.store(dv_ptr + j.to(tl.int64) * stride_v, dv.to(dv_ptr.dtype.element_ty), mask=j_mask)


def _autotuned(kernel, configs: Dict[Tuple[int, int], List[triton.Config]], key: List[str]):
    return {k: triton.autotune(configs=cfgs, key=key)(kernel) for k, cfgs in configs.items()}


_TUNED = {
    "fwd": _autotuned(_csr_rows_kernel, CONFIGS["fwd"], ["T", "M", "F", "nnz"]),
    "grad_input": _autotuned(_csr_rows_kernel, CONFIGS["grad_input"], ["T", "M", "F", "nnz"]),
    "sddmm": _autotuned(_csr_sddmm_kernel, CONFIGS["sddmm"], ["TP", "N", "nnz"]),
}


# ---- launchers ----------------------------------------------------------------------------------------------
def is_csr(values: torch.Tensor) -> bool:
    """Whether a BlockSparseWeight's values hold 1x1 blocks (the weights these kernels serve)."""
    return values.dim() == 3 and values.shape[1] == 1 and values.shape[2] == 1


def _check_values(values: torch.Tensor) -> None:
    if not isinstance(values, torch.Tensor) or not is_csr(values):
        raise ValueError(f"values must be a [nnz, 1, 1] tensor (1x1 blocks), got {getattr(values, 'shape', values)}")
    if values.dtype not in _DTYPES:
        raise TypeError(f"the Triton kernels take float16, bfloat16 or float32, got {values.dtype}")


def _check_offsets(name: str, offsets: torch.Tensor, n: int, what: str) -> None:
    if offsets.numel() != n + 1:
        raise ValueError(f"{name} must have {n + 1} entries for {n} {what}, got {offsets.numel()}")


def _token_major(t: torch.Tensor) -> torch.Tensor:
    """t [T, F] copied to [F, TP], TP = T rounded up to _PITCH, the pad zeroed (module docstring)."""
    T, F = t.shape
    tp = -(-T // _PITCH) * _PITCH
    out = t.new_empty(F, tp)
    out[:, :T].copy_(t.t())
    out[:, T:].zero_()
    return out


def _rows(dense: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor, indices: torch.Tensor,
          perm: Optional[torch.Tensor], bias: Optional[torch.Tensor], activation: str, m: int, op: str,
          config: Optional[triton.Config]) -> torch.Tensor:
    """The forward (op "fwd") or the grad input (op "grad_input", through perm): dense [T, F] -> [T, m]."""
    T, F = dense.shape
    if T > _MAX_TOKENS:
        return torch.cat([_rows(dense[t0:t0 + _MAX_TOKENS], values, offsets, indices, perm, bias, activation, m, op,
                                config) for t0 in range(0, T, _MAX_TOKENS)])
    y = dense.new_empty(T, m)
    if T == 0:
        return y
    xt = _token_major(dense)
    nnz = values.shape[0]
    grid = lambda meta: (triton.cdiv(m, meta["ROWS"]), triton.cdiv(T, meta["BLOCK_T"]))  # noqa: E731
    args = (xt, values, offsets, indices, perm if perm is not None else offsets, bias if bias is not None else y, y,
            T, xt.shape[1], m, F, nnz, xt.stride(0), xt.stride(1), values.stride(0), y.stride(0), y.stride(1))
    _launch(_csr_rows_kernel, _TUNED[op], _INTERPRET_CONFIG, dense.device, dense.dtype, grid, args, config,
            HAS_PERM=perm is not None, HAS_BIAS=bias is not None, ACTIVATION=ACTIVATION_CODES[activation])
    return y


def csr_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    row_offsets: torch.Tensor,
    col_indices: torch.Tensor,
    out_features: int,
    bias: Optional[torch.Tensor] = None,
    activation: str = "none",
    config: Optional[triton.Config] = None,
) -> torch.Tensor:
    """``act(x W^T + bias)``: x [T, in], values [nnz, 1, 1], bias [out] or None -> [T, out].

    ``config`` forces one configuration instead of autotuning (benchmarks, tests)."""
    _check_values(values)
    _check("x", x, 2, values)
    _check_index("row_offsets", row_offsets, values)
    _check_index("col_indices", col_indices, values)
    if activation not in ACTIVATION_CODES:
        raise ValueError(f"activation must be one of {tuple(ACTIVATION_CODES)}, got {activation!r}")
    _check_offsets("row_offsets", row_offsets, out_features, "outputs")
    if bias is not None:
        _check("bias", bias, 1, values)
        if bias.shape[0] != out_features:
            raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
    return _rows(x, values, row_offsets, col_indices, None, bias, activation, out_features, "fwd", config)


def csr_linear_grad_input(
    grad_out: torch.Tensor,
    values: torch.Tensor,
    col_offsets: torch.Tensor,
    row_indices: torch.Tensor,
    block_perm: torch.Tensor,
    in_features: int,
    config: Optional[triton.Config] = None,
) -> torch.Tensor:
    """``grad_out W``: grad_out [T, out] -> [T, in], walking the nonzeros by column."""
    _check_values(values)
    _check("grad_out", grad_out, 2, values)
    for name, t in (("col_offsets", col_offsets), ("row_indices", row_indices), ("block_perm", block_perm)):
        _check_index(name, t, values)
    _check_offsets("col_offsets", col_offsets, in_features, "inputs")
    return _rows(grad_out, values, col_offsets, row_indices, block_perm, None, "none", in_features, "grad_input",
                 config)


def csr_sddmm(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    values: torch.Tensor,
    row_offsets: torch.Tensor,
    col_indices: torch.Tensor,
    config: Optional[triton.Config] = None,
) -> torch.Tensor:
    """``(grad_out^T x)`` at the nonzeros: grad_out [T, out], x [T, in] -> like ``values`` [nnz, 1, 1] (same
    strides). ``values`` supplies the layout only; its data is not read."""
    _check_values(values)
    _check("grad_out", grad_out, 2, values)
    _check("x", x, 2, values)
    _check_index("row_offsets", row_offsets, values)
    _check_index("col_indices", col_indices, values)
    if grad_out.shape[0] != x.shape[0]:
        raise ValueError(f"grad_out {tuple(grad_out.shape)} and x {tuple(x.shape)} must have the same number of tokens")
    T, N = grad_out.shape
    _check_offsets("row_offsets", row_offsets, N, "outputs")
    nnz = values.shape[0]
    dv = torch.empty_like(values)
    if nnz == 0:
        return dv
    if T == 0:
        return dv.zero_()
    gt, xt = _token_major(grad_out), _token_major(x)
    # Halvings of the row search: log2(N) + 1 suffice; 32 covers any int32 row count (N symbolic under
    # torch.compile's dynamic shapes).
    n_steps = N.bit_length() + 1 if isinstance(N, int) else 32
    grid = lambda meta: (triton.cdiv(nnz, meta["CHUNK"]),)  # noqa: E731
    args = (gt, xt, row_offsets, col_indices, dv, gt.shape[1], N, nnz, n_steps,
            gt.stride(0), gt.stride(1), xt.stride(0), xt.stride(1), dv.stride(0))
    _launch(_csr_sddmm_kernel, _TUNED["sddmm"], _INTERPRET_SDDMM, x.device, x.dtype, grid, args, config)
    return dv
