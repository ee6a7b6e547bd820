"""Every op against the float64 reference; opcheck, gradcheck, torch.compile; clear errors on bad input."""

import pytest
import torch
import torch.nn.functional as F

import sparse
from sparse import BalancedSparseWeight, BlockSparseWeight, reference
from tests.helpers import NONLINEAR, assert_close_to_ref, make_balanced, make_bsr, slow_except

ops = torch.ops.sparsekern


def _check_forward(w, x, bias, act):
    y = sparse.linear(x, w, bias, act)
    ref = reference.linear(x, w, bias, act)
    dense = reference.activation(F.linear(x, w.to_dense(), bias), act)
    assert_close_to_ref(y, ref, dense, f"forward {w} act={act}")


def _check_backward_ops(w, x):
    g = torch.randn(*x.shape[:-1], w.shape[0]).to(x.dtype)
    dx = sparse.linear_grad_input(g, w)
    dense_w = w.to_dense()
    assert_close_to_ref(dx, reference.linear_grad_input(g, w), g @ dense_w, f"grad_input {w}")
    dw = sparse.sddmm(g, x, w)
    assert dw.shape == w.values.shape and dw.stride() == w.values.stride()
    # the dense path in the working dtype: the full product, then the reference's gather
    dense_dw = reference.gather(g.reshape(-1, w.shape[0]).t() @ x.reshape(-1, w.shape[1]), w)
    assert_close_to_ref(dw, reference.sddmm(g, x, w), dense_dw, f"sddmm {w}")


BLOCK_CASES = [((64, 96), 32, 0.5), ((96, 64), 16, 0.7), ((40, 56), 8, 0.5), ((128, 64), 64, 0.5),
               ((70, 45), (32, 1), 0.8), ((37, 70), (1, 32), 0.6), ((30, 22), 4, 0.5), ((50, 45), (16, 8), 0.3)]


@pytest.mark.parametrize("shape,block,sparsity", BLOCK_CASES)
@pytest.mark.parametrize("T", slow_except([1, 7, 97], [1, 7]))  # more tokens: the 3-D test
def test_block_ops_match_reference(dtype, shape, block, sparsity, T):
    w = make_bsr(*shape, block, sparsity=sparsity, dtype=dtype)
    x = torch.randn(T, shape[1]).to(dtype)
    bias = torch.randn(shape[0]).to(dtype)
    _check_forward(w, x, bias, "none")
    _check_forward(w, x, None, "none")
    _check_backward_ops(w, x)


BALANCED_CASES = [((48, 64), 32, 16), ((33, 70), 32, 4), ((20, 16), 4, 2), ((17, 128), 64, 16), ((9, 21), 8, 3),
                  ((6, 610), 300, 7)]


@pytest.mark.parametrize("shape,bank,keep", BALANCED_CASES)
@pytest.mark.parametrize("T", slow_except([1, 7, 97], [1, 7]))  # more tokens: the 3-D test
def test_balanced_ops_match_reference(dtype, shape, bank, keep, T):
    w = make_balanced(*shape, bank, keep, dtype=dtype)
    x = torch.randn(T, shape[1]).to(dtype)
    bias = torch.randn(shape[0]).to(dtype)
    _check_forward(w, x, bias, "none")
    _check_forward(w, x, None, "none")
    _check_backward_ops(w, x)


@pytest.mark.parametrize("act", NONLINEAR)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_activations(act, dtype):
    x = torch.randn(13, 64).to(dtype)
    bias = torch.randn(48).to(dtype)
    _check_forward(make_bsr(48, 64, 16, sparsity=0.5, dtype=dtype), x, bias, act)
    _check_forward(make_balanced(48, 64, 16, 4, dtype=dtype), x, bias, act)


@pytest.mark.parametrize("make", [lambda: make_bsr(48, 64, 16, sparsity=0.5),
                                  lambda: make_balanced(48, 64, 16, 8)])
def test_3d_and_noncontiguous_inputs(make):
    w = make()
    x3 = torch.randn(3, 5, 64)
    _check_forward(w, x3, None, "none")
    xt = torch.randn(64, 11).t()  # features strided
    assert not xt.is_contiguous()
    _check_forward(w, xt, None, "none")
    xs = torch.randn(11, 128)[:, ::2]  # every other feature
    _check_forward(w, xs, None, "none")
    xr = torch.randn(22, 64)[::2]  # row-strided
    _check_forward(w, xr, None, "none")
    _check_backward_ops(w, x3)


def test_empty_rows_zero_and_dense_weights():
    W = torch.randn(48, 64)
    grid = torch.ones(3, 4, dtype=torch.bool)
    grid[1] = False
    x = torch.randn(9, 64)
    bias = torch.randn(48)
    for mask in (grid, torch.zeros(3, 4, dtype=torch.bool), torch.ones(3, 4, dtype=torch.bool)):
        w = BlockSparseWeight.from_dense(W, block=16, mask=mask)
        _check_forward(w, x, bias, "relu")
        _check_backward_ops(w, x)
    y = sparse.linear(x, BlockSparseWeight.from_dense(W, block=16, mask=torch.zeros(3, 4, dtype=torch.bool)), bias)
    assert torch.equal(y, bias.expand(9, 48))


def test_empty_token_batch():
    w = make_bsr(48, 64, 16, sparsity=0.5)
    assert sparse.linear(torch.randn(0, 64), w).shape == (0, 48)
    b = make_balanced(48, 64, 16, 8)
    assert sparse.linear(torch.randn(2, 0, 64), b).shape == (2, 0, 48)


def _block_args(w, x, bias=None, act="none"):
    return (
        x,
        w.values,
        w.row_offsets,
        w.col_indices,
        w.col_offsets,
        w.row_indices,
        w.block_perm,
        w.shape[0],
        bias,
        act,
    )


@pytest.mark.parametrize("with_bias", [False, True])
def test_opcheck_block(with_bias):
    w = make_bsr(40, 48, 16, sparsity=0.5)
    x = torch.randn(5, 48, requires_grad=True)
    w.values.requires_grad_()
    bias = torch.randn(40, requires_grad=True) if with_bias else None
    torch.library.opcheck(ops.bsr_linear, _block_args(w, x, bias, "gelu"))
    g = torch.randn(5, 40)
    torch.library.opcheck(
        ops.bsr_linear_grad_input, (g, w.values.detach(), w.col_offsets, w.row_indices, w.block_perm, 48)
    )
    torch.library.opcheck(ops.bsr_sddmm, (g, x.detach(), w.values.detach(), w.row_offsets, w.col_indices))


@pytest.mark.parametrize("with_bias", [False, True])
def test_opcheck_balanced(with_bias):
    w = make_balanced(40, 48, 16, 4)
    x = torch.randn(5, 48, requires_grad=True)
    values = w.values.clone().requires_grad_()
    bias = torch.randn(40, requires_grad=True) if with_bias else None
    torch.library.opcheck(ops.balanced_linear, (x, values, w.indices, 16, bias, "silu"))
    g = torch.randn(5, 40)
    torch.library.opcheck(ops.balanced_linear_grad_input, (g, w.values, w.indices, 16, 48))
    torch.library.opcheck(ops.balanced_sddmm, (g, x.detach(), w.indices, 16))


# The autograd of the forward ops is C++ (csrc/autograd.cpp): its gradient slots are indexed by the tensor inputs
# only, so every subset of {x, values, bias} that requires a gradient is checked against dense autograd.
@pytest.mark.parametrize("fmt", ["block", "balanced"])
@pytest.mark.parametrize("wants", ["x", "values", "bias", "x+bias", "values+bias", "x+values+bias"])
def test_autograd_each_subset_of_inputs(fmt, wants):
    w = make_bsr(40, 48, 16, sparsity=0.5, dtype=torch.float64) if fmt == "block" else \
        make_balanced(40, 48, 16, 4, dtype=torch.float64)
    x = torch.randn(5, 48, dtype=torch.float64, requires_grad="x" in wants)
    values = w.values.detach().clone().requires_grad_("values" in wants)
    bias = torch.randn(40, dtype=torch.float64, requires_grad="bias" in wants)
    if fmt == "block":
        args = list(_block_args(w, x, bias, "gelu"))
        args[1] = values
        y = ops.bsr_linear(*args)
    else:
        y = ops.balanced_linear(x, values, w.indices, 16, bias, "gelu")
    g = torch.randn_like(y)
    y.backward(g)
    dense_values = w.to_dense().detach().clone().requires_grad_("values" in wants)
    xd, bd = x.detach().clone().requires_grad_("x" in wants), bias.detach().clone().requires_grad_("bias" in wants)
    F.gelu(F.linear(xd, dense_values, bd)).backward(g)
    if "x" in wants:
        torch.testing.assert_close(x.grad, xd.grad)
    if "bias" in wants:
        torch.testing.assert_close(bias.grad, bd.grad)
    if "values" in wants:
        torch.testing.assert_close(values.grad, reference.gather(dense_values.grad, w))
    for t, name in ((x, "x"), (values, "values"), (bias, "bias")):
        assert (t.grad is not None) == (name in wants), name


@pytest.mark.parametrize("fmt", ["block", "balanced"])
def test_no_graph_when_nothing_requires_grad(fmt):
    """With grad mode on but no input requiring a gradient, the op records no autograd node (the fast path)."""
    w = make_bsr(40, 48, 16, sparsity=0.5) if fmt == "block" else make_balanced(40, 48, 16, 4)
    x = torch.randn(5, 48)
    y = sparse.linear(x, w, torch.randn(40), "relu")
    assert y.grad_fn is None and not y.requires_grad
    x.requires_grad_()
    assert sparse.linear(x, w).grad_fn is not None


@pytest.mark.parametrize("act", ["none", "gelu", "relu"])
def test_gradcheck_block(act):
    w = make_bsr(20, 24, (8, 4), sparsity=0.4, dtype=torch.float64)
    x = torch.randn(3, 24, dtype=torch.float64, requires_grad=True)
    # keep pre-activations away from ReLU's kink, where finite differences are not the derivative
    bias = (torch.randn(20, dtype=torch.float64) + 0.1).requires_grad_()
    values = w.values.detach().clone().requires_grad_()
    f = lambda x_, v_, b_: ops.bsr_linear(x_, v_, w.row_offsets, w.col_indices, w.col_offsets, w.row_indices,
                                          w.block_perm, 20, b_, act)
    assert torch.autograd.gradcheck(f, (x, values, bias))


@pytest.mark.parametrize("act", ["none", "silu", "gelu_tanh"])
def test_gradcheck_balanced(act):
    w = make_balanced(10, 22, 8, 3, dtype=torch.float64)
    x = torch.randn(4, 22, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(10, dtype=torch.float64, requires_grad=True)
    values = w.values.detach().clone().requires_grad_()
    f = lambda x_, v_, b_: ops.balanced_linear(x_, v_, w.indices, 8, b_, act)
    assert torch.autograd.gradcheck(f, (x, values, bias))


def test_autograd_through_linear_matches_dense():
    w = make_bsr(48, 64, 16, sparsity=0.5)
    w.values.requires_grad_()
    x = torch.randn(2, 7, 64, requires_grad=True)
    bias = torch.randn(48, requires_grad=True)
    y = sparse.linear(x, w, bias, "gelu")
    g = torch.randn_like(y)
    y.backward(g)
    xd, Wd, bd = (
        x.detach().double().requires_grad_(),
        w.to_dense().detach().double().requires_grad_(),
        bias.detach().double().requires_grad_(),
    )
    F.gelu(F.linear(xd, Wd, bd)).backward(g.double())
    torch.testing.assert_close(x.grad, xd.grad.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bias.grad, bd.grad.float(), rtol=1e-4, atol=1e-5)
    expect = reference.sddmm(_gelu_grad(xd, Wd, bd, g), x.detach(), w)
    torch.testing.assert_close(w.values.grad, expect.float(), rtol=1e-4, atol=1e-4)


def _gelu_grad(xd, Wd, bd, g):
    """dL/dz for L = <g, gelu(z)>, z = x W^T + b, as [T, out] (float64)."""
    z = F.linear(xd.detach(), Wd.detach(), bd.detach()).requires_grad_()
    F.gelu(z).backward(g.double())
    return z.grad.reshape(-1, z.shape[-1])


@pytest.mark.slow  # torch.compile: ~10 s, mostly Inductor's first compile
@pytest.mark.parametrize("make", [lambda: make_bsr(48, 64, 16, sparsity=0.5),
                                  lambda: make_balanced(48, 64, 16, 8)])
def test_torch_compile_fullgraph_matches_eager(make):
    torch._dynamo.reset()
    w = make()
    bias = torch.randn(48)

    def step(x, values):
        w.values = values
        return sparse.linear(x, w, bias, "gelu").square().sum()

    x = torch.randn(2, 5, 64, requires_grad=True)
    v = w.values.detach().clone().requires_grad_()
    loss = step(x, v)
    gx, gv = torch.autograd.grad(loss, (x, v))
    compiled = torch.compile(step, fullgraph=True)
    loss_c = compiled(x, v)
    gx_c, gv_c = torch.autograd.grad(loss_c, (x, v))
    torch.testing.assert_close(loss_c, loss)
    torch.testing.assert_close(gx_c, gx)
    torch.testing.assert_close(gv_c, gv)


# ---- bad input ----------------------------------------------------------------------------------------------

def test_linear_rejects_bad_arguments():
    w = make_bsr(48, 64, 16, sparsity=0.5)
    with pytest.raises(ValueError, match="must end in 64 features"):
        sparse.linear(torch.randn(3, 63), w)
    with pytest.raises(TypeError, match="dtype torch.float64 but the weight has torch.float32"):
        sparse.linear(torch.randn(3, 64, dtype=torch.float64), w)
    with pytest.raises(ValueError, match="is on meta but the weight is on cpu"):
        sparse.linear(torch.randn(3, 64, device="meta"), w)
    with pytest.raises(ValueError, match=r"bias must have shape \(48,\)"):
        sparse.linear(torch.randn(3, 64), w, torch.randn(47))
    with pytest.raises(ValueError, match="activation must be one of"):
        sparse.linear(torch.randn(3, 64), w, None, "tanh")
    with pytest.raises(TypeError, match="weight must be a BlockSparseWeight"):
        sparse.linear(torch.randn(3, 64), torch.randn(48, 64))
    with pytest.raises(ValueError, match="backend must be one of"):
        sparse.linear(torch.randn(3, 64), w, backend="opencl")
    with pytest.raises(ValueError, match="share their leading dimensions"):
        sparse.sddmm(torch.randn(4, 48), torch.randn(3, 64), w)


def test_ops_reject_malformed_metadata_without_crashing():
    """The C++ ops check what keeps memory safe, even when called directly with hand-built metadata."""
    w = make_bsr(48, 64, 16, sparsity=0.5)
    x = torch.randn(3, 64)
    base = list(_block_args(w, x))

    def call(**changes):
        args = list(base)
        names = ["x", "values", "row_offsets", "col_indices", "col_offsets", "row_indices", "block_perm", "out"]
        for k, v in changes.items():
            args[names.index(k)] = v
        return ops.bsr_linear(*args)

    bad_ci = w.col_indices.clone()

    bad_ci[0] = 4
    with pytest.raises(RuntimeError, match=r"col_indices\[0\] = 4 is out of range \[0, 4\)"):
        call(col_indices=bad_ci)
    neg = w.col_indices.clone()
    neg[1] = -3
    with pytest.raises(RuntimeError, match="out of range"):
        call(col_indices=neg)
    with pytest.raises(RuntimeError, match="row_offsets must have shape"):
        call(row_offsets=w.row_offsets[:-1])
    big = w.row_offsets.clone()
    big[-1] = 1000
    with pytest.raises(RuntimeError, match="must equal the number of stored blocks"):
        call(row_offsets=big)
    dec = w.row_offsets.clone()
    dec[1] = dec[2] + 1
    with pytest.raises(RuntimeError, match="non-decreasing"):
        call(row_offsets=dec)
    with pytest.raises(RuntimeError, match="must be int32"):
        call(row_offsets=w.row_offsets.long())
    with pytest.raises(RuntimeError, match="same dtype"):
        call(x=x.double())
    with pytest.raises(RuntimeError, match="out of range"):  # x too narrow for the pattern's block columns
        call(x=torch.randn(3, 16))
    g = torch.randn(3, 48)
    bad_perm = w.block_perm.clone()
    bad_perm[0] = 10**6
    with pytest.raises(RuntimeError, match="block_perm"):
        ops.bsr_linear_grad_input(g, w.values, w.col_offsets, w.row_indices, bad_perm, 64)
    bad_rows = w.row_indices.clone()
    bad_rows[-1] = 3
    with pytest.raises(RuntimeError, match="row_indices"):
        ops.bsr_linear_grad_input(g, w.values, w.col_offsets, bad_rows, w.block_perm, 64)

    b = make_balanced(48, 64, 16, 4)
    idx = b.indices.clone()
    idx[5, 3, 1] = 16
    with pytest.raises(RuntimeError, match=r"indices\[5, 3, 1\] = 16 is out of range \[0, 16\)"):
        ops.balanced_linear(x, b.values, idx, 16)
    with pytest.raises(RuntimeError, match="banks"):
        ops.balanced_linear(torch.randn(3, 80), b.values, b.indices, 16)
    with pytest.raises(RuntimeError, match="uint8 or int16"):
        ops.balanced_linear(x, b.values, b.indices.int(), 16)
    with pytest.raises(RuntimeError, match="out of range"):
        ops.balanced_sddmm(g, x, idx, 16)
    with pytest.raises(RuntimeError, match="activation must be one of"):
        ops.balanced_linear(x, b.values, b.indices, 16, None, "tanh")


def _direct_cases():
    g = torch.Generator().manual_seed(5)
    w = BlockSparseWeight.from_dense(torch.randn(96, 64, generator=g), block=32, sparsity=0.5)
    bw = BalancedSparseWeight.from_dense(torch.randn(96, 64, generator=g), bank=32, keep=8)
    x, b = torch.randn(7, 64, generator=g), torch.randn(96, generator=g)
    return [
        ("bsr_linear", w, (x, w.values, w.row_offsets, w.col_indices, w.col_offsets, w.row_indices, w.block_perm, 96, b,
                           "gelu")),
        ("balanced_linear", bw, (x, bw.values, bw.indices, 32, b, "silu")),
    ]


@pytest.mark.parametrize("name", ["bsr_linear", "balanced_linear"])
def test_direct_entry_point_is_the_op(name):
    """sparse.linear reaches the CPU forward through sparse._C.<op>_call (no torch.ops argument parsing): the same
    bits as torch.ops, nn.Parameter values accepted, and the same error for bad input."""
    from sparse._ext import _C

    _, w, args = next(c for c in _direct_cases() if c[0] == name)
    direct = getattr(_C, name + "_call")
    ref = getattr(torch.ops.sparsekern, name)(*args)
    assert torch.equal(direct(*args), ref)
    with_param = (args[0], torch.nn.Parameter(args[1].clone()), *args[2:])  # what the modules pass
    y = direct(*with_param)
    assert y is not None and torch.equal(y, ref)
    assert torch.equal(sparse.linear(args[0], w, args[-2], args[-1]), ref)
    bad = (*args[:-1], "bogus")
    with pytest.raises(RuntimeError, match="activation must be one of .* got 'bogus'"):
        direct(*bad)
    with pytest.raises(RuntimeError, match="activation must be one of .* got 'bogus'"):
        getattr(torch.ops.sparsekern, name)(*bad)
    with pytest.raises(TypeError):
        direct(*args[:-1])  # an argument short


@pytest.mark.parametrize("name", ["bsr_linear", "balanced_linear"])
def test_direct_entry_point_leaves_torch_function_overrides_to_torch_ops(name):
    """A tensor subclass with its own __torch_function__, or an active TorchFunctionMode, must see the op: the
    direct entry point declines (None) and sparse.linear goes through torch.ops."""
    from torch.overrides import TorchFunctionMode

    from sparse._ext import _C

    _, w, args = next(c for c in _direct_cases() if c[0] == name)
    direct = getattr(_C, name + "_call")
    seen = []

    class Logged(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return super().__torch_function__(func, types, args, kwargs or {})

    xs = args[0].as_subclass(Logged)
    assert direct(xs, *args[1:]) is None
    sparse.linear(xs, w, args[-2], args[-1])
    assert any(name in f for f in seen), seen

    class Mode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append("mode:" + str(func))
            return func(*args, **(kwargs or {}))

    seen.clear()
    with Mode():
        assert direct(*args) is None
        y = sparse.linear(args[0], w, args[-2], args[-1])
    assert any(f.startswith("mode:") and name in f for f in seen), seen
    assert torch.equal(y, getattr(torch.ops.sparsekern, name)(*args))


def test_direct_entry_point_keeps_autograd():
    """The direct call goes through the dispatcher, so the C++ autograd still records the graph."""
    _, w, args = _direct_cases()[0]
    x = args[0].clone().requires_grad_(True)
    values = w.values.detach().clone().requires_grad_(True)
    from sparse._ext import _C

    y = torch.ops.sparsekern.bsr_linear(x, values, *args[2:])
    y2 = _C.bsr_linear_call(x, values, *args[2:])
    assert y2.grad_fn is not None and torch.equal(y2, y)
    g = torch.randn_like(y)
    gx, gv = torch.autograd.grad(y, (x, values), g)
    gx2, gv2 = torch.autograd.grad(y2, (x, values), g)
    assert torch.equal(gx, gx2) and torch.equal(gv, gv2)
