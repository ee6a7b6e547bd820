"""INT8 block-sparse forward in Triton (GPU inference): activations quantized per token, int8 x int8 -> int32
``tl.dot`` over the kept blocks, dequantized in the output stage.

Maths (``W`` [N=out, K=in] as ``sparse.quant.QuantizedBlockSparseWeight``: ``W[o, k] ~ w_scale[o] q[o, k]``,
``|q| <= 127``; ``X`` [T, K] float):
    quantize     c[t] = max_k |X[t, k]| (or one static clip c),  xq[t, k] = round(clamp(X[t, k] * 127 / c[t]))
                 (half to even, in [-127, 127]),  x_scale[t] = c[t] / 127
    forward      Y[t, o] = act(x_scale[t] w_scale[o] sum_k xq[t, k] q[o, k] + b[o])               [T, N]
The activations are SIGNED int8 with no zero point (tl.dot's s8 x s8 -> s32 is native: mma.sync on sm_80, wgmma
on sm_90), unlike the C++ kernels' unsigned bytes offset by qmax + 1 (what ``vpdpbusd`` multiplies); the integers,
scales and sums are the same, so ``sparse.reference.int8_linear(..., qmax=127)`` is the reference of both.
Special values as the C++ op (sparse/quant.py): a token with NaN (or, per token, +-Inf) gets xq = 0 and a NaN
scale (NaN outputs); a token whose max |x| is 0 or so small that 127 / c overflows gets xq = 0, scale 0 (the bias);
with a static clip, +-Inf saturates to +-127. The int32 sum cannot overflow while K <= (2^31 - 1) // 127^2
(``MAX_K`` = 133144); the launcher refuses larger K.

Layout: the kernels read ``QuantizedBlockSparseWeight``'s own tensors; no second copy of the weight is built.
    qvalues      int8 [nnz, ceil(bi/4), bo, 4], contiguous: block p's entry (o, k) at [p, k // 4, o, k % 4], the
                 padding zero. Read as the [BI_P, BO_P] tile W_block^T that the forward's dot wants: four
                 consecutive input features of one output are one aligned 32-bit word, so the tile is loaded
                 (and cp.async-copied) in 4-byte pieces along K, i.e. K-major as int8 wgmma wants its B operand.
                 A transposed copy ([nnz, bi, bo] row-major) would allow 16-byte copies; whether that matters is
                 for a GPU measurement to say.
    w_scale      float32 [out]; row_offsets int32 [n_block_rows + 1]; col_indices int32 [nnz] (as BlockSparseWeight).
    xq           int8 [T, K] with its row stride rounded up to 16 bytes (aligned 16-byte loads of X tiles).
Blocks of any shape: tiles are padded to powers of two of at least tl.dot's int8 minimum (16 outputs, 32 inputs)
and the edges masked; a 1x1 (unstructured) weight is correct but wastes a 16x32 tile per element.

Programs:
    quantize     one per BLOCK_T tokens: a pass over K for max |x| (and NaN), a second writing the integers.
    forward      one per (token tile, block row), block rows fastest (concurrent programs share the X tile in
                 L2), looping over the row's blocks with int8 tl.dot into an int32 accumulator.

Expected speed (estimated from the data flow, NOT measured: no GPU has run this kernel). As kernels/bsr.py's
forward, each program re-reads its X tile from L2 for every block row; the tile is half the bytes of fp16's, so
the FLOP per byte of X fetched doubles (2 BO: 128 at block 64), while the int8 tensor-core rate is also 2x fp16's
(A100: 624 vs 312 TOPS; H100 SXM: 1979 vs 989 dense). The bound relative to the tensor cores is therefore the same
as bsr.py's fp16 forward (about 0.5/d x dense cuBLAS fp16 at block 64 if L2 delivers 5-7 TB/s), i.e. about twice
the fp16 kernel's speed at best, plus the quantize pass (one read of X, one write of T x K bytes).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl

from .bsr import ACTIVATION_CODES, _activation, _pad

__all__ = ["quantize_activations", "bsr_linear_int8", "CONFIGS", "MAX_K", "QMAX"]

QMAX = 127
# The int32 accumulator of one output sums at most K products of magnitude <= 127 * 127.
MAX_K = (2**31 - 1) // (QMAX * QMAX)
_OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# ---- configurations -----------------------------------------------------------------------------------------
# Chosen from the tile shapes, not from timings (no GPU has run these); each compiles for its arch without spills
# and within shared memory (tests/test_triton_int8.py). A GPU benchmark must pick the winners and prune the rest
# here with its numbers. Only BLOCK_T is tuned: the other tile sides are the weight's block.
# int8 tiles are half the bytes of fp16's, so the fp16 forward's sets (kernels/bsr.py) fit with room to spare:
# sm_80 mma.sync m16n8k32, 64-128 tokens on 4-8 warps, 3-4 stages; sm_90 wgmma wants M >= 64 per warpgroup.
CONFIGS: Dict[str, Dict[int, List[triton.Config]]] = {
    "fwd": {
        80: [
            triton.Config({"BLOCK_T": 64}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_T": 128}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_T": 128}, num_warps=8, num_stages=4),
        ],
        90: [
            triton.Config({"BLOCK_T": 128}, num_warps=4, num_stages=4),
            triton.Config({"BLOCK_T": 128}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_T": 256}, num_warps=8, num_stages=3),
        ],
    },
    # Memory-bound: a few tokens per program, 1024 features per step; no autotuning (one config per arch).
    "quantize": {
        80: [triton.Config({"BLOCK_T": 4, "BLOCK_K": 1024}, num_warps=4)],
        90: [triton.Config({"BLOCK_T": 4, "BLOCK_K": 1024}, num_warps=4)],
    },
}
# CPU tensors (TRITON_INTERPRET=1 only): small tiles keep the interpreter fast and exercise several K steps.
_INTERPRET = {"fwd": {"BLOCK_T": 16}, "quantize": {"BLOCK_T": 4, "BLOCK_K": 32}}


# ---- kernels ------------------------------------------------------------------------------------------------
@triton.jit
def _quantize_kernel(
    x_ptr, xq_ptr, scale_ptr, clip,
    T, K, stride_xt, stride_xk, stride_qt,
    STATIC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """xq[t, :] and scale[t] for BLOCK_T tokens (the module docstring's quantize)."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = offs_t < T
    x_rows = x_ptr + offs_t.to(tl.int64)[:, None] * stride_xt
    amax = tl.zeros((BLOCK_T,), dtype=tl.float32)
    nan = tl.zeros((BLOCK_T,), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=t_mask[:, None] & (offs_k < K)[None, :],
                    other=0.0).to(tl.float32)
        nan = tl.maximum(nan, tl.max((x != x).to(tl.int32), axis=1))
        if not STATIC:
            amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
    if STATIC:
        c = tl.zeros((BLOCK_T,), dtype=tl.float32) + clip
        bad = nan > 0
    else:
        c = amax
        bad = (nan > 0) | (amax == float("inf"))
    inv = tl.math.div_rn(tl.full((BLOCK_T,), 127.0, tl.float32), c)  # IEEE division, as the reference's
    tiny = ~(inv <= 3.0e38)  # c == 0 or subnormal: 127 / c overflows
    zero = bad | tiny
    scale = tl.math.div_rn(c, tl.full((BLOCK_T,), 127.0, tl.float32))
    scale = tl.where(bad, float("nan"), tl.where(tiny, 0.0, scale))
    tl.store(scale_ptr + offs_t, scale, mask=t_mask)
    inv = tl.where(zero, 0.0, inv)
    q_rows = xq_ptr + offs_t.to(tl.int64)[:, None] * stride_qt
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = t_mask[:, None] & (offs_k < K)[None, :]
        x = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=mask, other=0.0).to(tl.float32)
        v = tl.minimum(tl.maximum(x * inv[:, None], -127.0), 127.0)
        # Round half to even: adding 1.5 * 2^23 leaves no fraction bits (|v| <= 127); the clamp between the
        # product and the sum keeps them from being fused into one fma.
        v = (v + 12582912.0) - 12582912.0
        v = tl.where(zero[:, None] | (x != x), 0.0, v)
        tl.store(q_rows + offs_k[None, :], v.to(tl.int8), mask=mask)


@triton.jit
def _bsr_linear_int8_kernel(
    xq_ptr, x_scale_ptr, q_ptr, w_scale_ptr, row_offsets_ptr, col_indices_ptr, bias_ptr, y_ptr,
    T, N, K, stride_xt, stride_yt, stride_yn,
    BO: tl.constexpr, BI: tl.constexpr, BO_P: tl.constexpr, BI_P: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Y[t, r*BO:(r+1)*BO] for one (token tile, block row r)."""
    pid = tl.program_id(0)
    n_brow = tl.cdiv(N, BO)
    r = pid % n_brow
    tile = pid // n_brow
    offs_t = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_o = tl.arange(0, BO_P)
    offs_i = tl.arange(0, BI_P)
    t_mask = offs_t < T
    out_cols = r * BO + offs_o
    o_mask = (offs_o < BO) & (out_cols < N)
    # W_block^T [BI_P, BO_P] in the [ceil(BI/4), BO, 4] layout of qvalues.
    w_tile = (offs_i // 4)[:, None] * (BO * 4) + offs_o[None, :] * 4 + (offs_i % 4)[:, None]
    w_mask = (offs_i < BI)[:, None] & (offs_o < BO)[None, :]
    block_bytes = ((BI + 3) // 4) * BO * 4
    x_rows = xq_ptr + offs_t.to(tl.int64)[:, None] * stride_xt
    start = tl.load(row_offsets_ptr + r)
    end = tl.load(row_offsets_ptr + r + 1)
    acc = tl.zeros((BLOCK_T, BO_P), dtype=tl.int32)
    for k in range(start, end):
        c = tl.load(col_indices_ptr + k)
        in_cols = c * BI + offs_i
        i_mask = (offs_i < BI) & (in_cols < K)
        xt = tl.load(x_rows + in_cols[None, :], mask=t_mask[:, None] & i_mask[None, :], other=0)
        wt = tl.load(q_ptr + tl.cast(k, tl.int64) * block_bytes + w_tile, mask=w_mask, other=0)
        acc = tl.dot(xt, wt, acc)
    xs = tl.load(x_scale_ptr + offs_t, mask=t_mask, other=0.0)
    ws = tl.load(w_scale_ptr + out_cols, mask=o_mask, other=0.0)
    z = acc.to(tl.float32) * (xs[:, None] * ws[None, :])
    if HAS_BIAS:
        z += tl.load(bias_ptr + out_cols, mask=o_mask, other=0.0).to(tl.float32)[None, :]
    z = _activation(z, ACTIVATION)
    y = y_ptr + offs_t.to(tl.int64)[:, None] * stride_yt + out_cols[None, :] * stride_yn
    tl.store(y, z.to(y_ptr.dtype.element_ty), mask=t_mask[:, None] & o_mask[None, :])


_TUNED = {
    arch: triton.autotune(configs=cfgs, key=["T", "N", "K", "BO", "BI"])(_bsr_linear_int8_kernel)
    for arch, cfgs in CONFIGS["fwd"].items()
}


# ---- launchers ----------------------------------------------------------------------------------------------
def _arch(device: torch.device) -> int:
    major, _ = torch.cuda.get_device_capability(device)
    return 90 if major >= 9 else 80


def _launch(kernel, op: str, device: torch.device, grid, args: tuple, config: Optional[triton.Config],
            **meta) -> None:
    """``config`` if given; else on CUDA the arch's autotuned forward / single quantize config; else (CPU tensors,
    TRITON_INTERPRET=1 only) the interpreter's meta-parameters."""
    if config is None and device.type == "cuda":
        if op == "fwd":
            kernel = _TUNED[_arch(device)]
        else:
            config = CONFIGS[op][_arch(device)][0]
    if config is not None:
        meta = {**meta, **config.all_kwargs()}
    elif device.type != "cuda":
        meta = {**meta, **_INTERPRET[op]}
    torch.library.wrap_triton(kernel)[grid](*args, **meta)


def _check_tensor(name: str, t, dtype: torch.dtype, dim: int, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype != dtype or t.dim() != dim or t.device != device:
        raise TypeError(f"{name} must be a {dim}-D {dtype} tensor on {device}, got a {t.dim()}-D {t.dtype} tensor "
                        f"on {t.device}")


def quantize_activations(x: torch.Tensor, clip: float = 0.0,
                         config: Optional[triton.Config] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``x`` [T, K] float16/bfloat16/float32 -> (xq int8 [T, K], x_scale float32 [T]) as the module docstring's
    quantize: per token (``clip`` 0) or with the static ``clip`` > 0. ``xq``'s row stride is K rounded up to 16."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a 2-D tensor [T, in], got {getattr(x, 'shape', x)}")
    if x.dtype not in _OUT_DTYPES:
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not (0 <= float(clip) < float("inf")):
        raise ValueError(f"clip must be a finite float >= 0 (0: per-token scales), got {clip!r}")
    T, K = x.shape
    xq = torch.empty(T, -(-K // 16) * 16, dtype=torch.int8, device=x.device)[:, :K]
    scale = torch.empty(T, dtype=torch.float32, device=x.device)
    if T == 0:
        return xq, scale
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_T"]),)  # noqa: E731
    args = (x, xq, scale, float(clip), T, K, x.stride(0), x.stride(1), xq.stride(0))
    _launch(_quantize_kernel, "quantize", x.device, grid, args, config, STATIC=float(clip) > 0)
    return xq, scale


def bsr_linear_int8(
    x: torch.Tensor,
    qvalues: torch.Tensor,
    w_scale: torch.Tensor,
    row_offsets: torch.Tensor,
    col_indices: torch.Tensor,
    out_features: int,
    in_block: int,
    bias: Optional[torch.Tensor] = None,
    activation: str = "none",
    clip: float = 0.0,
    config: Optional[triton.Config] = None,
) -> torch.Tensor:
    """``act(x W^T + bias)`` with W as int8 (``QuantizedBlockSparseWeight``'s qvalues [nnz, ceil(bi/4), bo, 4],
    w_scale [out], row_offsets, col_indices; ``in_block`` = bi) and x [T, in] quantized per token (``clip`` 0) or
    with a static clip: -> [T, out] in x's dtype (float16, bfloat16 or float32; bias the same dtype).

    ``config`` forces one forward configuration instead of autotuning (benchmarks, tests)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a 2-D tensor [T, in], got {getattr(x, 'shape', x)}")
    if x.dtype not in _OUT_DTYPES:
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if not isinstance(qvalues, torch.Tensor) or qvalues.dtype != torch.int8 or qvalues.dim() != 4 \
            or qvalues.shape[3] != 4 or qvalues.device != x.device:
        raise TypeError(f"qvalues must be a 4-D int8 tensor [nnz, ceil(bi/4), bo, 4] on {x.device}, got "
                        f"{getattr(qvalues, 'dtype', type(qvalues).__name__)} {tuple(getattr(qvalues, 'shape', ()))} "
                        f"on {getattr(qvalues, 'device', None)}")
    if not qvalues.is_contiguous():
        raise ValueError("qvalues must be contiguous (the kernel computes its offsets from the block shape)")
    nnz, bi4, bo = qvalues.shape[:3]
    if isinstance(in_block, bool) or not isinstance(in_block, int) or -(-in_block // 4) != bi4 or in_block < 1:
        raise ValueError(f"in_block must be the weight's block width bi, with ceil(bi / 4) = {bi4} (qvalues "
                         f"{tuple(qvalues.shape)}), got {in_block!r}")
    T, K = x.shape
    if K > MAX_K:
        raise ValueError(f"x has {K} input features: the int32 accumulator holds at most {MAX_K} products of "
                         f"127 x 127 (K <= {MAX_K})")
    n_brow = -(-out_features // bo)
    _check_tensor("w_scale", w_scale, torch.float32, 1, x.device)
    _check_tensor("row_offsets", row_offsets, torch.int32, 1, x.device)
    _check_tensor("col_indices", col_indices, torch.int32, 1, x.device)
    if w_scale.shape[0] != out_features or row_offsets.shape[0] != n_brow + 1 or col_indices.shape[0] != nnz:
        raise ValueError(f"for {out_features} outputs in blocks of {bo} and {nnz} blocks, w_scale must have "
                         f"{out_features} entries, row_offsets {n_brow + 1}, col_indices {nnz}; got "
                         f"{w_scale.shape[0]}, {row_offsets.shape[0]}, {col_indices.shape[0]}")
    if bias is not None:
        _check_tensor("bias", bias, x.dtype, 1, x.device)
        if bias.shape[0] != out_features:
            raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
    if activation not in ACTIVATION_CODES:
        raise ValueError(f"activation must be one of {tuple(ACTIVATION_CODES)}, got {activation!r}")
    xq, x_scale = quantize_activations(x, clip)
    y = x.new_empty(T, out_features)
    if T == 0:
        return y
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_T"]) * n_brow,)  # noqa: E731
    args = (xq, x_scale, qvalues, w_scale, row_offsets, col_indices, bias if bias is not None else y, y,
            T, out_features, K, xq.stride(0), y.stride(0), y.stride(1))
    _launch(_bsr_linear_int8_kernel, "fwd", x.device, grid, args, config, BO=bo, BI=in_block, BO_P=_pad(bo),
            BI_P=max(32, triton.next_power_of_2(in_block)), HAS_BIAS=bias is not None,
            ACTIVATION=ACTIVATION_CODES[activation])
    return y
