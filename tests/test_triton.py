"""Triton kernels against the float64 reference: every kernel, fp32/fp16/bf16, square, rectangular and
ragged blocks and banks, odd token counts, every activation, every autotune tile shape.

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
from sparse.kernels import balanced, bsr  # noqa: E402

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
# make test-fast takes half the cases (the rest are slow): ragged blocks and banks, 2:4, each T at least once.
FAST_BSR, FAST_BAL = BSR_CASES[2:], BAL_CASES[1:3]
FAST_BSR_GRAD, FAST_BAL_GRAD = BSR_GRAD_CASES[2:], BAL_GRAD_CASES[1:3]
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
def test_triton_bsr_op_autograd(act):
    w = _bsr(40, 72, (16, 32), torch.float32)
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
    b = _bal(32, 64, 16, 4, torch.float32)
    with pytest.raises(ValueError, match="values has 4 banks but 64 inputs in banks of 32 need 2"):
        balanced.balanced_linear(x, b.values, b.indices, 32)
    with pytest.raises(TypeError, match="indices must be a uint8 or int16"):
        balanced.balanced_linear(x, b.values, b.indices.int(), 16)
    with pytest.raises(ValueError, match="grad_out must be 2-D"):
        balanced.balanced_sddmm(_randn(3, 31, dtype=torch.float32), x, b.indices, 16)
