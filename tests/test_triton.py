"""Triton kernels against the float64 reference: every kernel, fp32/fp16/bf16, square, rectangular and
ragged blocks and banks, unstructured (1x1-block, CSR) weights, odd token counts, every activation, every autotune
tile shape.

Without a GPU they run under TRITON_INTERPRET=1 (set by conftest.py) on CPU tensors; with one, on CUDA.
Tolerance (as flash-attention's tests): error of ours <= 2 x error of dense torch in the same dtype + a tiny
floor, errors measured against float64.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import sparse
from sparse import reference
from sparse.formats import BalancedSparseWeight, BlockSparseWeight
from tests.helpers import KERNEL_FLOOR, TRITON_DTYPES, assert_close_to_ref, make_balanced, make_bsr, randn, slow_except

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from sparse import triton_backend  # noqa: E402,F401  (registers torch.ops.sparsekern.triton_*)
from sparse.kernels import balanced, bsr, csr  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (out, in, block): square, bigger block, rectangular + ragged, ragged square.
BSR_CASES = [(64, 64, 16), (64, 96, 32), (40, 72, (16, 32)), (50, 70, 16)]
# (out, in, bank, keep): ragged last bank (104 = 3*32 + 8), 2:4, the benchmark's bank 64 / keep 16.
BAL_CASES = [(40, 64, 16, 4), (33, 104, 32, 8), (20, 24, 4, 2), (24, 128, 64, 16)]
# The interpreter is slow: the forward sweeps T = 1 and 33 (7 in the activation tests); the gradients take
# one odd T per case, each T in (1, 7, 33) at least once.
GRAD_T = (33, 7, 33, 1)
BSR_GRAD_CASES, BAL_GRAD_CASES = list(zip(BSR_CASES, GRAD_T)), list(zip(BAL_CASES, GRAD_T))
# Unstructured (out, in, sparsity), magnitude-pruned: odd sizes, rows longer than the interpreter's CHUNK (8), a
# last row group the interpreter's ROWS (4) does not fill, wide and tall, 90% (rows of 0-3 nonzeros, some empty).
CSR_CASES = [(37, 53, 0.7), (20, 130, 0.9), (66, 24, 0.5)]
CSR_GRAD_CASES = list(zip(CSR_CASES, GRAD_T))
# make test-fast takes half the cases (the rest are slow): ragged blocks and banks, 2:4, each T at least once.
FAST_BSR, FAST_BAL, FAST_CSR = BSR_CASES[2:], BAL_CASES[1:3], CSR_CASES[:2]
FAST_BSR_GRAD, FAST_BAL_GRAD, FAST_CSR_GRAD = BSR_GRAD_CASES[2:], BAL_GRAD_CASES[1:3], CSR_GRAD_CASES[:2]
ops = torch.ops.sparsekern


@pytest.fixture(autouse=True, scope="module")
def _interpreter_bf16():
    """Two bf16 defects of Triton 3.9's interpreter (compiled code has neither): tl.dot multiplies bf16
    operands as their raw uint16 storage (its create_dot widens only 8-bit floats), and fp32 -> bf16 casts
    truncate instead of rounding to nearest even. Widen bf16 dot operands to fp32 first (exact, as the
    tensor cores do) and round casts with torch. Only under the interpreter; undone after this module."""
    if not INTERPRET:
        yield
        return
    import numpy as np
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    original_dot, original_cast = builder.create_dot, builder.cast_impl

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.scalar == tl.bfloat16:
            a = self.cast_impl(a, tl.float32)
        if b.dtype.scalar == tl.bfloat16:
            b = self.cast_impl(b, tl.float32)
        return original_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16)
            return interpreter.TensorHandle(rounded.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)
        return original_cast(self, src, dst_type)

    builder.create_dot, builder.cast_impl = create_dot, cast_impl
    yield
    builder.create_dot, builder.cast_impl = original_dot, original_cast


# This file's weights and data (tests/helpers.py): weights scaled by 1/sqrt(in), half the blocks kept, on DEVICE.
def _bsr(out: int, inn: int, block, dtype: torch.dtype, seed: int = 0) -> BlockSparseWeight:
    return make_bsr(out, inn, block, sparsity=0.5, dtype=dtype, seed=seed, scale=inn**-0.5, device=DEVICE)


def _csr(out: int, inn: int, sparsity: float, dtype: torch.dtype, seed: int = 0) -> BlockSparseWeight:
    """An unstructured weight: 1x1 blocks, the largest-magnitude entries kept."""
    return make_bsr(out, inn, 1, sparsity=sparsity, dtype=dtype, seed=seed, scale=inn**-0.5, device=DEVICE)


def _bal(out: int, inn: int, bank: int, keep: int, dtype: torch.dtype, seed: int = 0) -> BalancedSparseWeight:
    return make_balanced(out, inn, bank, keep, dtype=dtype, seed=seed, scale=inn**-0.5, device=DEVICE)


def _randn(*shape, dtype, seed=1) -> torch.Tensor:
    return randn(shape, dtype, seed, device=DEVICE)


def _dense_linear(x, w, bias, act):
    """Dense torch in the inputs' dtype: the baseline whose error bounds ours."""
    return reference.activation(F.linear(x, w.to_dense(), bias), act)


# ---- block-sparse ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("T", [1, 33])
@pytest.mark.parametrize("case", slow_except(BSR_CASES, FAST_BSR), ids=str)
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
def test_bsr_forward(dtype, case, T):
    out, inn, block = case
    w = _bsr(out, inn, block, dtype)
    x, bias = _randn(T, inn, dtype=dtype), _randn(out, dtype=dtype, seed=2)
    y = bsr.bsr_linear(x, w.values, w.row_offsets, w.col_indices, out, bias, "none")
    assert_close_to_ref(y, reference.linear(x, w, bias), _dense_linear(x, w, bias, "none"), floor=KERNEL_FLOOR)


@pytest.mark.parametrize("case", slow_except(BSR_GRAD_CASES, FAST_BSR_GRAD), ids=str)
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
def test_bsr_grad_input_and_sddmm(dtype, case):
    (out, inn, block), T = case
    w = _bsr(out, inn, block, dtype)
    x, g = _randn(T, inn, dtype=dtype), _randn(T, out, dtype=dtype, seed=3)
    dx = bsr.bsr_linear_grad_input(g, w.values, w.col_offsets, w.row_indices, w.block_perm, inn)
    assert_close_to_ref(dx, reference.linear_grad_input(g, w), g @ w.to_dense(), floor=KERNEL_FLOOR)
    dv = bsr.bsr_sddmm(g, x, w.values, w.row_offsets, w.col_indices)
    assert dv.stride() == w.values.stride()
    assert_close_to_ref(dv, reference.sddmm(g, x, w), reference.gather(g.t() @ x, w), floor=KERNEL_FLOOR)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bsr_activations(dtype, activation):
    w = _bsr(40, 72, (16, 32), dtype)
    x, bias = _randn(7, 72, dtype=dtype) * 3, _randn(40, dtype=dtype, seed=2)  # reach the non-linear parts
    # The op: the kernel fuses the activations it has code for (bsr.ACTIVATION_CODES), the op applies the others.
    y = torch.ops.sparsekern.triton_bsr_linear(x, w.values, w.row_offsets, w.col_indices, w.col_offsets, w.row_indices,
                                               w.block_perm, 40, bias, activation)
    assert_close_to_ref(y, reference.linear(x, w, bias, activation), _dense_linear(x, w, bias, activation),
                        floor=KERNEL_FLOOR)


def test_bsr_empty_rows_columns_and_weight():
    """A block row and a block column with no blocks (outputs = act(bias), inputs get zero gradient), and a
    weight with no blocks at all."""
    keep = torch.ones(4, 3, dtype=torch.bool)
    keep[1, :] = False
    keep[:, 2] = False
    W = torch.randn(64, 48)
    for mask in (keep, torch.zeros(4, 3, dtype=torch.bool)):
        w = BlockSparseWeight.from_dense(W, 16, mask=mask).to(DEVICE)
        x, g, bias = (
            _randn(5, 48, dtype=torch.float32),
            _randn(5, 64, dtype=torch.float32),
            _randn(64, dtype=torch.float32),
        )
        y = bsr.bsr_linear(x, w.values, w.row_offsets, w.col_indices, 64, bias, "relu")
        assert_close_to_ref(y, reference.linear(x, w, bias, "relu"), _dense_linear(x, w, bias, "relu"),
                            floor=KERNEL_FLOOR)
        dx = bsr.bsr_linear_grad_input(g, w.values, w.col_offsets, w.row_indices, w.block_perm, 48)
        assert_close_to_ref(dx, reference.linear_grad_input(g, w), g @ w.to_dense(), floor=KERNEL_FLOOR)
        dv = bsr.bsr_sddmm(g, x, w.values, w.row_offsets, w.col_indices)
        assert dv.shape == w.values.shape
        if w.nnz_blocks:
            ref = reference.sddmm(g, x, w)
            assert_close_to_ref(dv, ref, reference.gather(g.t() @ x, w), floor=KERNEL_FLOOR)


def test_bsr_non_contiguous_inputs_and_no_tokens():
    w = _bsr(64, 96, 32, torch.float32)
    x = _randn(96, 7, dtype=torch.float32).t()  # strides (1, 7)
    g = _randn(64, 7, dtype=torch.float32, seed=3).t()
    y = bsr.bsr_linear(x, w.values, w.row_offsets, w.col_indices, 64)
    assert_close_to_ref(y, reference.linear(x, w), F.linear(x, w.to_dense()), floor=KERNEL_FLOOR)
    dx = bsr.bsr_linear_grad_input(g, w.values, w.col_offsets, w.row_indices, w.block_perm, 96)
    assert_close_to_ref(dx, reference.linear_grad_input(g, w), g @ w.to_dense(), floor=KERNEL_FLOOR)
    dv = bsr.bsr_sddmm(g, x, w.values, w.row_offsets, w.col_indices)
    assert_close_to_ref(dv, reference.sddmm(g, x, w), reference.gather(g.t() @ x, w), floor=KERNEL_FLOOR)
    empty = x[:0]
    assert bsr.bsr_linear(empty, w.values, w.row_offsets, w.col_indices, 64).shape == (0, 64)
    assert torch.equal(bsr.bsr_sddmm(g[:0], empty, w.values, w.row_offsets, w.col_indices), torch.zeros_like(w.values))


# ---- unstructured (CSR: 1x1 blocks) ---------------------------------------------------------------------
@pytest.mark.parametrize("T", [1, 33])
@pytest.mark.parametrize("case", slow_except(CSR_CASES, FAST_CSR), ids=str)
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
def test_csr_forward(dtype, case, T):
    out, inn, sparsity = case
    w = _csr(out, inn, sparsity, dtype)
    x, bias = _randn(T, inn, dtype=dtype), _randn(out, dtype=dtype, seed=2)
    for b in (bias, None):
        y = csr.csr_linear(x, w.values, w.row_offsets, w.col_indices, out, b, "none")
        assert_close_to_ref(y, reference.linear(x, w, b), _dense_linear(x, w, b, "none"), floor=KERNEL_FLOOR)


@pytest.mark.parametrize("case", slow_except(CSR_GRAD_CASES, FAST_CSR_GRAD), ids=str)
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
def test_csr_grad_input_and_sddmm(dtype, case):
    (out, inn, sparsity), T = case
    w = _csr(out, inn, sparsity, dtype)
    x, g = _randn(T, inn, dtype=dtype), _randn(T, out, dtype=dtype, seed=3)
    dx = csr.csr_linear_grad_input(g, w.values, w.col_offsets, w.row_indices, w.block_perm, inn)
    assert_close_to_ref(dx, reference.linear_grad_input(g, w), g @ w.to_dense(), floor=KERNEL_FLOOR)
    dv = csr.csr_sddmm(g, x, w.values, w.row_offsets, w.col_indices)
    assert dv.stride() == w.values.stride()
    assert_close_to_ref(dv, reference.sddmm(g, x, w), reference.gather(g.t() @ x, w), floor=KERNEL_FLOOR)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_csr_activations(dtype, activation):
    """Through the op, which sends 1x1 blocks to the CSR kernels; those fuse the activations they have code for
    (bsr.ACTIVATION_CODES) and the op applies the others."""
    w = _csr(37, 53, 0.7, dtype)
    x, bias = _randn(7, 53, dtype=dtype) * 3, _randn(37, dtype=dtype, seed=2)  # reach the non-linear parts
    y = ops.triton_bsr_linear(x, w.values, w.row_offsets, w.col_indices, w.col_offsets, w.row_indices, w.block_perm,
                              37, bias, activation)
    assert_close_to_ref(y, reference.linear(x, w, bias, activation), _dense_linear(x, w, bias, activation),
                        floor=KERNEL_FLOOR)


def test_bsr_ops_send_1x1_blocks_to_the_csr_kernels(monkeypatch):
    """The bsr ops run 1x1 blocks on kernels/csr.py and every other block on kernels/bsr.py."""
    called = []
    for name in ("csr_linear", "csr_linear_grad_input", "csr_sddmm"):
        monkeypatch.setattr(csr, name, lambda *a, _f=getattr(csr, name), _n=name, **k: called.append(_n) or _f(*a, **k))
    for name in ("bsr_linear", "bsr_linear_grad_input", "bsr_sddmm"):
        monkeypatch.setattr(bsr, name, lambda *a, _f=getattr(bsr, name), _n=name, **k: called.append(_n) or _f(*a, **k))
    for w, want in ((_csr(20, 24, 0.5, torch.float32), "csr"), (_bsr(32, 32, (1, 2), torch.float32), "bsr")):
        called.clear()
        x, g = _randn(3, w.shape[1], dtype=torch.float32), _randn(3, w.shape[0], dtype=torch.float32, seed=3)
        ops.triton_bsr_linear(x, w.values, w.row_offsets, w.col_indices, w.col_offsets, w.row_indices, w.block_perm,
                              w.shape[0])
        ops.triton_bsr_linear_grad_input(g, w.values, w.col_offsets, w.row_indices, w.block_perm, w.shape[1])
        ops.triton_bsr_sddmm(g, x, w.values, w.row_offsets, w.col_indices)
        assert called == [f"{want}_linear", f"{want}_linear_grad_input", f"{want}_sddmm"]


def test_csr_empty_rows_columns_and_weight():
    """Rows and columns with no nonzeros (outputs = act(bias), inputs get zero gradient, among rows that span
    several chunks), and a weight with no nonzeros at all."""
    W = randn((23, 30), torch.float32, 4)
    keep = torch.rand(23, 30, generator=torch.Generator().manual_seed(5)) < 0.6
    keep[[0, 4, 5, 6, 22], :] = False  # empty rows: the first, a run of three, the last
    keep[:, [0, 13, 29]] = False
    for mask in (keep, torch.zeros(23, 30, dtype=torch.bool)):
        w = BlockSparseWeight.from_dense(W, 1, mask=mask).to(DEVICE)
        x, g, bias = (
            _randn(5, 30, dtype=torch.float32),
            _randn(5, 23, dtype=torch.float32, seed=3),
            _randn(23, dtype=torch.float32),
        )
        y = csr.csr_linear(x, w.values, w.row_offsets, w.col_indices, 23, bias, "relu")
        assert_close_to_ref(y, reference.linear(x, w, bias, "relu"), _dense_linear(x, w, bias, "relu"),
                            floor=KERNEL_FLOOR)
        dx = csr.csr_linear_grad_input(g, w.values, w.col_offsets, w.row_indices, w.block_perm, 30)
        assert_close_to_ref(dx, reference.linear_grad_input(g, w), g @ w.to_dense(), floor=KERNEL_FLOOR)
        assert torch.equal(dx[:, [0, 13, 29]], torch.zeros(5, 3, device=DEVICE))
        dv = csr.csr_sddmm(g, x, w.values, w.row_offsets, w.col_indices)
        assert dv.shape == w.values.shape
        if w.nnz_blocks:
            assert_close_to_ref(dv, reference.sddmm(g, x, w), reference.gather(g.t() @ x, w), floor=KERNEL_FLOOR)


def test_csr_non_finite_inputs_reach_only_the_rows_that_store_them():
    """tests/test_numerics.py's rule: Inf/NaN in x reach the outputs whose row stores that column, not the rows
    that pruned it (a kernel multiplying pruned zeros, as a dense dot would, turns those into NaN)."""
    W = randn((6, 9), torch.float32, 4)
    mask = torch.zeros(6, 9, dtype=torch.bool)
    mask[0, [1, 4]] = mask[2, [4, 8]] = mask[3, [0, 2, 3, 5, 6, 7]] = mask[5, 1] = True
    w = BlockSparseWeight.from_dense(W, 1, mask=mask).to(DEVICE)
    x = _randn(3, 9, dtype=torch.float32)
    x[0, 4], x[1, 1], x[2, 8] = float("inf"), float("nan"), float("-inf")
    y = csr.csr_linear(x, w.values, w.row_offsets, w.col_indices, 6)
    finite = torch.ones(3, 6, dtype=torch.bool)
    finite[0, [0, 2]] = finite[1, [0, 5]] = finite[2, 2] = False
    assert torch.equal(torch.isfinite(y).cpu(), finite)


def test_csr_non_contiguous_inputs_and_no_tokens():
    w = _csr(37, 53, 0.7, torch.float32)
    x = _randn(53, 7, dtype=torch.float32).t()  # strides (1, 7)
    g = _randn(37, 7, dtype=torch.float32, seed=3).t()
    y = csr.csr_linear(x, w.values, w.row_offsets, w.col_indices, 37)
    assert_close_to_ref(y, reference.linear(x, w), F.linear(x, w.to_dense()), floor=KERNEL_FLOOR)
    dx = csr.csr_linear_grad_input(g, w.values, w.col_offsets, w.row_indices, w.block_perm, 53)
    assert_close_to_ref(dx, reference.linear_grad_input(g, w), g @ w.to_dense(), floor=KERNEL_FLOOR)
    dv = csr.csr_sddmm(g, x, w.values, w.row_offsets, w.col_indices)
    assert_close_to_ref(dv, reference.sddmm(g, x, w), reference.gather(g.t() @ x, w), floor=KERNEL_FLOOR)
    empty = x[:0]
    assert csr.csr_linear(empty, w.values, w.row_offsets, w.col_indices, 37).shape == (0, 37)
    assert csr.csr_linear_grad_input(g[:0], w.values, w.col_offsets, w.row_indices, w.block_perm, 53).shape == (0, 53)
    assert torch.equal(csr.csr_sddmm(g[:0], empty, w.values, w.row_offsets, w.col_indices), torch.zeros_like(w.values))


def test_csr_inputs_longer_than_one_launch(monkeypatch):
    """Token tiles are grid axis 1 (at most 65535 of them): longer inputs run in several launches."""
    monkeypatch.setattr(csr, "_MAX_TOKENS", 16)
    w = _csr(20, 30, 0.5, torch.float32)
    x, g = _randn(37, 30, dtype=torch.float32), _randn(37, 20, dtype=torch.float32, seed=3)
    bias = _randn(20, dtype=torch.float32, seed=2)
    y = csr.csr_linear(x, w.values, w.row_offsets, w.col_indices, 20, bias, "silu")
    assert_close_to_ref(y, reference.linear(x, w, bias, "silu"), _dense_linear(x, w, bias, "silu"), floor=KERNEL_FLOOR)
    dx = csr.csr_linear_grad_input(g, w.values, w.col_offsets, w.row_indices, w.block_perm, 30)
    assert_close_to_ref(dx, reference.linear_grad_input(g, w), g @ w.to_dense(), floor=KERNEL_FLOOR)


# ---- balanced -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T", [1, 33])
@pytest.mark.parametrize("case", slow_except(BAL_CASES, FAST_BAL), ids=str)
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
def test_balanced_forward(dtype, case, T):
    out, inn, bank, keep = case
    w = _bal(out, inn, bank, keep, dtype)
    x, bias = _randn(T, inn, dtype=dtype), _randn(out, dtype=dtype, seed=2)
    y = balanced.balanced_linear(x, w.values, w.indices, bank, bias, "none")
    assert_close_to_ref(y, reference.linear(x, w, bias), _dense_linear(x, w, bias, "none"), floor=KERNEL_FLOOR)


@pytest.mark.parametrize("case", slow_except(BAL_GRAD_CASES, FAST_BAL_GRAD), ids=str)
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
def test_balanced_grad_input_and_sddmm(dtype, case):
    (out, inn, bank, keep), T = case
    w = _bal(out, inn, bank, keep, dtype)
    x, g = _randn(T, inn, dtype=dtype), _randn(T, out, dtype=dtype, seed=3)
    dx = balanced.balanced_linear_grad_input(g, w.values, w.indices, bank, inn)
    assert_close_to_ref(dx, reference.linear_grad_input(g, w), g @ w.to_dense(), floor=KERNEL_FLOOR)
    dv = balanced.balanced_sddmm(g, x, w.indices, bank)
    assert_close_to_ref(dv, reference.sddmm(g, x, w), reference.gather(g.t() @ x, w), floor=KERNEL_FLOOR)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_balanced_activations(dtype, activation):
    w = _bal(33, 104, 32, 8, dtype)
    x, bias = _randn(7, 104, dtype=dtype) * 3, _randn(33, dtype=dtype, seed=2)
    y = torch.ops.sparsekern.triton_balanced_linear(x, w.values, w.indices, 32, bias, activation)
    assert_close_to_ref(y, reference.linear(x, w, bias, activation), _dense_linear(x, w, bias, activation),
                        floor=KERNEL_FLOOR)


def test_balanced_int16_indices():
    """bank > 256 stores int16 indices."""
    w = _bal(16, 600, 300, 3, torch.float32)
    assert w.indices.dtype == torch.int16
    x, g = _randn(5, 600, dtype=torch.float32), _randn(5, 16, dtype=torch.float32, seed=3)
    assert_close_to_ref(balanced.balanced_linear(x, w.values, w.indices, 300), reference.linear(x, w),
                        F.linear(x, w.to_dense()), floor=KERNEL_FLOOR)
    assert_close_to_ref(balanced.balanced_linear_grad_input(g, w.values, w.indices, 300, 600),
                        reference.linear_grad_input(g, w), g @ w.to_dense(), floor=KERNEL_FLOOR)
    assert_close_to_ref(balanced.balanced_sddmm(g, x, w.indices, 300), reference.sddmm(g, x, w),
                        reference.gather(g.t() @ x, w), floor=KERNEL_FLOOR)


# ---- every autotune tile shape (the interpreter ignores warps and stages, not the tiles) ------------------
def _tiles(*config_sets):
    """The distinct tile shapes of the given CONFIGS entries, one Config each."""
    seen = {}
    for configs in config_sets:
        for cfgs in configs.values():
            for c in cfgs:
                seen.setdefault(tuple(sorted(c.kwargs.items())), c)
    return list(seen.values())


def _tile_id(config) -> str:
    return ",".join(f"{k}={v}" for k, v in config.kwargs.items())


@pytest.mark.parametrize("config", _tiles(bsr.CONFIGS["fwd"], bsr.CONFIGS["grad_input"]), ids=_tile_id)
def test_bsr_every_tile_shape(config):
    w = _bsr(40, 72, (16, 32), torch.float16)
    x, g = _randn(33, 72, dtype=torch.float16), _randn(33, 40, dtype=torch.float16, seed=3)
    y = bsr.bsr_linear(x, w.values, w.row_offsets, w.col_indices, 40, config=config)
    assert_close_to_ref(y, reference.linear(x, w), F.linear(x, w.to_dense()), floor=KERNEL_FLOOR)
    dx = bsr.bsr_linear_grad_input(g, w.values, w.col_offsets, w.row_indices, w.block_perm, 72, config=config)
    assert_close_to_ref(dx, reference.linear_grad_input(g, w), g @ w.to_dense(), floor=KERNEL_FLOOR)


@pytest.mark.parametrize("config", _tiles(bsr.CONFIGS["sddmm"]), ids=_tile_id)
def test_bsr_sddmm_every_tile_shape(config):
    """Includes chunks of GROUP blocks that run past their row's end (rows here hold 0 to 3 blocks)."""
    w = _bsr(40, 72, (16, 32), torch.float16)
    x, g = _randn(33, 72, dtype=torch.float16), _randn(33, 40, dtype=torch.float16, seed=3)
    dv = bsr.bsr_sddmm(g, x, w.values, w.row_offsets, w.col_indices, config=config)
    assert_close_to_ref(dv, reference.sddmm(g, x, w), reference.gather(g.t() @ x, w), floor=KERNEL_FLOOR)


@pytest.mark.parametrize("config", _tiles(csr.CONFIGS["fwd"], csr.CONFIGS["grad_input"]), ids=_tile_id)
def test_csr_every_tile_shape(config):
    """Rows longer than CHUNK and shorter, a last row group that ROWS does not fill, T not a multiple of
    BLOCK_T."""
    w = _csr(37, 150, 0.6, torch.float16)
    x, g = _randn(33, 150, dtype=torch.float16), _randn(33, 37, dtype=torch.float16, seed=3)
    y = csr.csr_linear(x, w.values, w.row_offsets, w.col_indices, 37, config=config)
    assert_close_to_ref(y, reference.linear(x, w), F.linear(x, w.to_dense()), floor=KERNEL_FLOOR)
    dx = csr.csr_linear_grad_input(g, w.values, w.col_offsets, w.row_indices, w.block_perm, 150, config=config)
    assert_close_to_ref(dx, reference.linear_grad_input(g, w), g @ w.to_dense(), floor=KERNEL_FLOOR)


@pytest.mark.parametrize("config", _tiles(csr.CONFIGS["sddmm"]), ids=_tile_id)
def test_csr_sddmm_every_tile_shape(config):
    """A last chunk of nonzeros that CHUNK does not fill, chunks spanning several rows (and empty ones), T not a
    multiple of BLOCK_T."""
    w = _csr(37, 53, 0.7, torch.float16)
    x, g = _randn(33, 53, dtype=torch.float16), _randn(33, 37, dtype=torch.float16, seed=3)
    dv = csr.csr_sddmm(g, x, w.values, w.row_offsets, w.col_indices, config=config)
    assert_close_to_ref(dv, reference.sddmm(g, x, w), reference.gather(g.t() @ x, w), floor=KERNEL_FLOOR)


@pytest.mark.parametrize(
    "config", _tiles(balanced.CONFIGS["fwd"], balanced.CONFIGS["grad_input"], balanced.CONFIGS["sddmm"]), ids=_tile_id
)
def test_balanced_every_tile_shape(config):
    w = _bal(33, 104, 32, 8, torch.float16)
    x, g = _randn(33, 104, dtype=torch.float16), _randn(33, 33, dtype=torch.float16, seed=3)
    assert_close_to_ref(balanced.balanced_linear(x, w.values, w.indices, 32, config=config), reference.linear(x, w),
                        F.linear(x, w.to_dense()), floor=KERNEL_FLOOR)
    dx = balanced.balanced_linear_grad_input(g, w.values, w.indices, 32, 104, config=config)
    assert_close_to_ref(dx, reference.linear_grad_input(g, w), g @ w.to_dense(), floor=KERNEL_FLOOR)
    dv = balanced.balanced_sddmm(g, x, w.indices, 32, config=config)
    assert_close_to_ref(dv, reference.sddmm(g, x, w), reference.gather(g.t() @ x, w), floor=KERNEL_FLOOR)


# ---- the registered ops: autograd, schema ---------------------------------------------------------------
def _autograd_reference(x, W, bias, act, grad):
    """Gradients of act(x W^T + b) in float64 for x, W (dense) and b."""
    xd, Wd, bd = (t.detach().double().requires_grad_() for t in (x, W, bias))
    reference.activation(F.linear(xd, Wd, bd), act).backward(grad.double())
    return xd.grad, Wd.grad, bd.grad


@pytest.mark.parametrize("act", ["none", "gelu_tanh"])
@pytest.mark.parametrize("kind", ["bsr", "csr"])
def test_triton_bsr_op_autograd(act, kind):
    w = _bsr(40, 72, (16, 32), torch.float32) if kind == "bsr" else _csr(40, 72, 0.7, torch.float32)
    x = _randn(7, 72, dtype=torch.float32).requires_grad_()
    bias = _randn(40, dtype=torch.float32, seed=2).requires_grad_()
    values = w.values.detach().requires_grad_()
    y = ops.triton_bsr_linear(
        x, values, w.row_offsets, w.col_indices, w.col_offsets, w.row_indices, w.block_perm, 40, bias, act
    )
    grad = _randn(7, 40, dtype=torch.float32, seed=4)
    y.backward(grad)
    gx, gW, gb = _autograd_reference(x, w.to_dense(), bias, act, grad)
    gv = reference.gather(gW, w)
    tol = dict(rtol=1e-4, atol=1e-5)  # fp32 kernels vs float64 autograd
    torch.testing.assert_close(x.grad.double(), gx, **tol)
    torch.testing.assert_close(values.grad.double(), gv, **tol)
    torch.testing.assert_close(bias.grad.double(), gb, **tol)


@pytest.mark.parametrize("act", ["none", "silu"])
def test_triton_balanced_op_autograd(act):
    w = _bal(33, 104, 32, 8, torch.float32)
    x = _randn(7, 104, dtype=torch.float32).requires_grad_()
    bias = _randn(33, dtype=torch.float32, seed=2).requires_grad_()
    values = w.values.detach().requires_grad_()
    y = ops.triton_balanced_linear(x, values, w.indices, 32, bias, act)
    grad = _randn(7, 33, dtype=torch.float32, seed=4)
    y.backward(grad)
    gx, gW, gb = _autograd_reference(x, w.to_dense(), bias, act, grad)
    gv = reference.gather(gW, w)
    tol = dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), gx, **tol)
    torch.testing.assert_close(values.grad.double(), gv, **tol)
    torch.testing.assert_close(bias.grad.double(), gb, **tol)


def test_triton_ops_schema_and_autograd_registration():
    """opcheck's eager checks; its fake-tensor checks need a GPU (the interpreter would launch on fake
    tensors) and run in tests/test_gpu_triton.py."""
    w = _bsr(40, 72, (16, 32), torch.float32)
    x = _randn(5, 72, dtype=torch.float32).requires_grad_()
    values = w.values.detach().requires_grad_()
    checks = ("test_schema", "test_autograd_registration")
    torch.library.opcheck(ops.triton_bsr_linear, (x, values, w.row_offsets, w.col_indices, w.col_offsets,
                                                  w.row_indices, w.block_perm, 40, None, "relu"), test_utils=checks)
    c = _csr(40, 72, 0.7, torch.float32)
    cvalues = c.values.detach().requires_grad_()
    torch.library.opcheck(ops.triton_bsr_linear, (x, cvalues, c.row_offsets, c.col_indices, c.col_offsets,
                                                  c.row_indices, c.block_perm, 40, None, "gelu"), test_utils=checks)
    b = _bal(33, 104, 32, 8, torch.float32)
    bvalues = b.values.detach().requires_grad_()
    bx = _randn(5, 104, dtype=torch.float32).requires_grad_()
    torch.library.opcheck(ops.triton_balanced_linear, (bx, bvalues, b.indices, 32, None, "none"), test_utils=checks)


# ---- dispatch and argument checks -------------------------------------------------------------------------
def test_backend_status_names_why_triton_cannot_run():
    status = sparse.ops.backend_status("cpu")
    assert "triton" in sparse.ops.BACKENDS
    assert "CUDA tensors only" in status["triton"]
    if not torch.cuda.is_available():
        assert "no CUDA device" in sparse.ops.backend_status("cuda")["triton"]
        w = _bsr(64, 64, 16, torch.float32)
        with pytest.raises(RuntimeError, match="triton: runs on CUDA tensors only"):
            sparse.linear(torch.randn(3, 64), w, backend="triton")


def test_launchers_reject_bad_arguments():
    w = _bsr(64, 64, 16, torch.float32)
    x = _randn(3, 64, dtype=torch.float32)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        bsr.bsr_linear(x.double(), w.values.double(), w.row_offsets, w.col_indices, 64)
    with pytest.raises(TypeError, match="x must be torch.float32"):
        bsr.bsr_linear(x.half(), w.values, w.row_offsets, w.col_indices, 64)
    with pytest.raises(ValueError, match="row_offsets must have 6 entries"):
        bsr.bsr_linear(x, w.values, w.row_offsets, w.col_indices, 80)
    with pytest.raises(ValueError, match="activation must be one of"):
        bsr.bsr_linear(x, w.values, w.row_offsets, w.col_indices, 64, activation="tanh")
    with pytest.raises(TypeError, match="col_indices must be a 1-D int32"):
        bsr.bsr_linear(x, w.values, w.row_offsets, w.col_indices.long(), 64)
    with pytest.raises(ValueError, match=r"values must be a \[nnz, 1, 1\] tensor"):
        csr.csr_linear(x, w.values, w.row_offsets, w.col_indices, 64)
    c = _csr(20, 64, 0.5, torch.float32)
    with pytest.raises(ValueError, match="row_offsets must have 25 entries for 24 outputs, got 21"):
        csr.csr_linear(x, c.values, c.row_offsets, c.col_indices, 24)
    with pytest.raises(ValueError, match="col_offsets must have 61 entries for 60 inputs, got 65"):
        csr.csr_linear_grad_input(_randn(3, 20, dtype=torch.float32), c.values, c.col_offsets, c.row_indices,
                                  c.block_perm, 60)
    with pytest.raises(TypeError, match="x must be torch.float32"):
        csr.csr_sddmm(_randn(3, 20, dtype=torch.float32), x.half(), c.values, c.row_offsets, c.col_indices)
    b = _bal(32, 64, 16, 4, torch.float32)
    with pytest.raises(ValueError, match="values has 4 banks but 64 inputs in banks of 32 need 2"):
        balanced.balanced_linear(x, b.values, b.indices, 32)
    with pytest.raises(TypeError, match="indices must be a uint8 or int16"):
        balanced.balanced_linear(x, b.values, b.indices.int(), 16)
    with pytest.raises(ValueError, match="grad_out must be 2-D"):
        balanced.balanced_sddmm(_randn(3, 31, dtype=torch.float32), x, b.indices, 16)
