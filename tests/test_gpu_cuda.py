"""The CUDA kernels (csrc/cuda) against the float64 reference, on a GPU. Skipped without one.

The ops are called through torch.ops.sparsekern: the CUDA implementations are registered for the CUDA dispatch
key, so CUDA tensors reach them directly. Tolerance: tests/helpers.py (<= 2x dense torch's error + a floor).
"""

import pytest
import torch
import torch.nn.functional as F

import sparse  # noqa: F401  (loads the extension and registers fake kernels + autograd)
from sparse import BlockSparseWeight, _ext, reference
from tests import _reliab as R
from tests.helpers import assert_close_to_ref, make_balanced, make_bsr, randn

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or not _ext.available() or not _ext.require().has_cuda(),
        reason="needs a CUDA GPU and sparse._C built with CUDA (SPARSEKERN_CUDA=1)",
    ),
]

ops = torch.ops.sparsekern
DEV = "cuda"


# This file's weights and data (tests/helpers.py) on the GPU; in float64 exact (multiples of 1/256 in [-8, 8]), so
# that every product and partial sum is exact and any reduction order (ours, cuBLAS, the reference) gives the same
# bits: the rule's default floor is otherwise below float64's reduction-order noise at a few hundred features.
def _block(shape, block, sparsity, dtype, seed=0):
    return make_bsr(*shape, block, sparsity=sparsity, dtype=dtype, seed=seed, device=DEV,
                    exact=dtype == torch.float64)


def _balanced(shape, bank, keep, dtype, seed=0):
    return make_balanced(*shape, bank, keep, dtype=dtype, seed=seed, device=DEV, exact=dtype == torch.float64)


def _rand(*shape, dtype, seed=1):
    return randn(shape, dtype, seed, device=DEV, exact=dtype == torch.float64)


def _bsr_fwd(w, x, bias, act):
    return ops.bsr_linear(x, w.values, w.row_offsets, w.col_indices, w.col_offsets, w.row_indices, w.block_perm,
                          w.shape[0], bias, act)


def _check_all(w, x, bias, act, fwd, grad_input, sddmm):
    Wd = w.to_dense()
    y = fwd(w, x, bias, act)
    assert_close_to_ref(y, reference.linear(x, w, bias, act), reference.activation(F.linear(x, Wd, bias), act),
                        f"forward {w} act={act}")
    g = _rand(x.shape[0], w.shape[0], dtype=x.dtype, seed=2)
    assert_close_to_ref(grad_input(g, w), reference.linear_grad_input(g, w), g @ Wd, f"grad_input {w}")
    dw = sddmm(g, x, w)
    assert dw.shape == w.values.shape and dw.stride() == w.values.stride()
    assert_close_to_ref(dw, reference.sddmm(g, x, w), reference.gather(g.t() @ x, w), f"sddmm {w}")


# Tensor-core path (fp16/bf16, blocks multiple of 32, features multiple of 8), ragged edges included, and the
# SIMT fallback (other blocks).
BLOCK_CASES = [((256, 192), 32, 0.5), ((192, 256), 64, 0.5), ((200, 136), 32, 0.4), ((128, 96), (64, 32), 0.5),
               ((96, 64), 16, 0.7), ((70, 45), (32, 1), 0.8), ((136, 200), (32, 64), 0.6)]


@pytest.mark.parametrize("shape,block,sparsity", BLOCK_CASES)
@pytest.mark.parametrize("T", [1, 7, 97, 300])
def test_bsr_ops_match_reference(dtype, shape, block, sparsity, T):
    w = _block(shape, block, sparsity, dtype)
    x = _rand(T, shape[1], dtype=dtype)
    bias = _rand(shape[0], dtype=dtype, seed=3)
    gi = lambda g, w: ops.bsr_linear_grad_input(g, w.values, w.col_offsets, w.row_indices, w.block_perm, w.shape[1])
    sd = lambda g, x, w: ops.bsr_sddmm(g, x, w.values, w.row_offsets, w.col_indices)
    _check_all(w, x, bias, "none", _bsr_fwd, gi, sd)
    _check_all(w, x, None, "gelu", _bsr_fwd, gi, sd)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_bsr_epilogue_every_activation(activation, dtype):
    w = _block((192, 256), 64, 0.5, dtype)
    x, bias = _rand(77, 256, dtype=dtype), _rand(192, dtype=dtype, seed=3)
    y = _bsr_fwd(w, x, bias, activation)
    dense = reference.activation(F.linear(x, w.to_dense(), bias), activation)
    assert_close_to_ref(y, reference.linear(x, w, bias, activation), dense, f"activation={activation}")


def test_bsr_strided_rows_empty_rows_and_empty_input():
    w = _block((256, 128), 32, 0.9, torch.bfloat16)  # most block rows empty: bias-only outputs
    wide = _rand(50, 200, dtype=torch.bfloat16)
    x = wide[:, 8:136]  # row stride 200, features contiguous
    bias = _rand(256, dtype=torch.bfloat16, seed=3)
    y = _bsr_fwd(w, x, bias, "relu")
    assert_close_to_ref(y, reference.linear(x, w, bias, "relu"), F.relu(F.linear(x, w.to_dense(), bias)), "strided")
    assert _bsr_fwd(w, x[:0], bias, "none").shape == (0, 256)
    empty = BlockSparseWeight.from_dense(torch.randn(64, 64), block=32, mask=torch.zeros(2, 2, dtype=torch.bool))
    empty = empty.to(device=DEV, dtype=torch.float16)
    xe = _rand(9, 64, dtype=torch.float16)
    torch.testing.assert_close(_bsr_fwd(empty, xe, None, "none"), torch.zeros(9, 64, device=DEV, dtype=torch.float16))


# Unstructured sparsity: 1x1 blocks, which the bsr ops send to csr.cu. SPARSEKERN_CUDA_CSR forces each of its
# kernels in turn ("off": bsr.cu's SIMT fallback, the path before csr.cu); T = 1 and 3 take the decode kernel
# under "auto", 37 and 300 the token-major ones (several token tiles, ragged).
CSR_KERNELS = ["auto", "gemv", "narrow", "wide", "off"]
CSR_CASES = [((64, 96), 0.5), ((70, 45), 0.7), ((257, 129), 0.95), ((33, 200), 0.99), ((128, 512), 0.9)]


def _csr_gi(g, w):
    return ops.bsr_linear_grad_input(g, w.values, w.col_offsets, w.row_indices, w.block_perm, w.shape[1])


def _csr_sd(g, x, w):
    return ops.bsr_sddmm(g, x, w.values, w.row_offsets, w.col_indices)


@pytest.mark.parametrize("kernel", CSR_KERNELS)
@pytest.mark.parametrize("shape,sparsity", CSR_CASES)
@pytest.mark.parametrize("T", [1, 3, 37, 300])
def test_csr_ops_match_reference(dtype, shape, sparsity, T, kernel, monkeypatch):
    monkeypatch.setenv("SPARSEKERN_CUDA_CSR", kernel)
    w = _block(shape, 1, sparsity, dtype)
    assert w.block == (1, 1)
    x = _rand(T, shape[1], dtype=dtype)
    bias = _rand(shape[0], dtype=dtype, seed=3)
    _check_all(w, x, bias, "none", _bsr_fwd, _csr_gi, _csr_sd)
    _check_all(w, x, None, "gelu", _bsr_fwd, _csr_gi, _csr_sd)


@pytest.mark.parametrize("kernel", ["gemv", "narrow", "wide"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_csr_epilogue_every_activation(activation, dtype, kernel, monkeypatch):
    monkeypatch.setenv("SPARSEKERN_CUDA_CSR", kernel)
    w = _block((192, 256), 1, 0.9, dtype)
    x, bias = _rand(77, 256, dtype=dtype), _rand(192, dtype=dtype, seed=3)
    y = _bsr_fwd(w, x, bias, activation)
    dense = reference.activation(F.linear(x, w.to_dense(), bias), activation)
    assert_close_to_ref(y, reference.linear(x, w, bias, activation), dense, f"csr {kernel} activation={activation}")


@pytest.mark.parametrize("kernel", CSR_KERNELS)
def test_csr_empty_rows_columns_strided_inputs_and_no_tokens(kernel, monkeypatch):
    """Every other row and every third column without a nonzero (bias-only outputs, zero input gradients), x and
    grad_out rows strided and misaligned, T = 0, and a weight with no nonzero at all."""
    monkeypatch.setenv("SPARSEKERN_CUDA_CSR", kernel)
    out, inn = 90, 75
    mask = torch.rand(out, inn, generator=torch.Generator().manual_seed(5)) < 0.3
    mask[::2] = False
    mask[:, ::3] = False
    W = randn((out, inn), torch.float16, 0, exact=False)
    w = BlockSparseWeight.from_dense(W, 1, mask=mask).to(DEV)
    for T in (1, 6, 130):
        xw, gw = _rand(T, inn + 5, dtype=torch.float16), _rand(T, out + 3, dtype=torch.float16, seed=2)
        x, g = xw[:, 3:3 + inn], gw[:, 1:1 + out]  # row strides inn + 5 / out + 3, odd element offsets
        bias = _rand(out, dtype=torch.float16, seed=3)
        Wd = w.to_dense()
        y = _bsr_fwd(w, x, bias, "silu")
        assert_close_to_ref(y, reference.linear(x, w, bias, "silu"), F.silu(F.linear(x, Wd, bias)), f"T={T}")
        empty_rows = F.silu(bias[::2].float()).half().expand(T, -1)  # act(bias)
        torch.testing.assert_close(y[:, ::2], empty_rows, rtol=1e-3, atol=1e-3)
        dx = _csr_gi(g, w)
        assert_close_to_ref(dx, reference.linear_grad_input(g, w), g @ Wd, f"grad_input T={T}")
        assert not dx[:, ::3].any()  # empty columns: exactly zero
        assert_close_to_ref(_csr_sd(g, x, w), reference.sddmm(g, x, w), reference.gather(g.t() @ x, w), f"T={T}")
    x0 = _rand(0, inn, dtype=torch.float16)
    assert _bsr_fwd(w, x0, None, "none").shape == (0, out)
    assert _csr_gi(_rand(0, out, dtype=torch.float16), w).shape == (0, inn)
    dw0 = _csr_sd(_rand(0, out, dtype=torch.float16), x0, w)
    assert dw0.shape == w.values.shape and not dw0.any()  # empty sums
    none = BlockSparseWeight.from_dense(W, 1, mask=torch.zeros(out, inn, dtype=torch.bool)).to(DEV)
    assert none.nnz_blocks == 0
    x = _rand(9, inn, dtype=torch.float16)
    bias = _rand(out, dtype=torch.float16, seed=3)
    assert torch.equal(_bsr_fwd(none, x, bias, "none"), bias.expand(9, -1))
    assert not _csr_gi(_rand(9, out, dtype=torch.float16), none).any()


@pytest.mark.parametrize("kernel", CSR_KERNELS)
@pytest.mark.parametrize("T", [1, 3, 37])
def test_csr_nan_in_inputs_reaches_only_rows_storing_its_column(kernel, T, monkeypatch):
    monkeypatch.setenv("SPARSEKERN_CUDA_CSR", kernel)
    w = _block((48, 64), 1, 0.8, torch.float32)
    mask = R.structural_mask(w)  # positions stored (explicit zeros included)
    per_col, per_row = mask.sum(0), mask.sum(1)
    c0 = int(((per_col > 0) & (per_col < 48)).nonzero()[0])  # a column some rows store and others do not
    r0 = int(((per_row > 0) & (per_row < 64)).nonzero()[0])
    t0 = T - 1
    x, g = _rand(T, 64, dtype=torch.float32), _rand(T, 48, dtype=torch.float32, seed=2)
    x[t0, c0] = float("nan")
    want = torch.zeros(T, 48, dtype=torch.bool, device=DEV)
    want[t0] = mask[:, c0]
    assert torch.equal(_bsr_fwd(w, x, None, "gelu").isnan(), want), "forward"
    gn = g.clone()
    gn[t0, r0] = float("nan")
    want = torch.zeros(T, 64, dtype=torch.bool, device=DEV)
    want[t0] = mask[r0]
    assert torch.equal(_csr_gi(gn, w).isnan(), want), "grad_input"
    rows, cols = w._block_rows(), w.col_indices.long()
    assert torch.equal(_csr_sd(g, x, w).flatten().isnan(), cols == c0), "sddmm, NaN in x"
    assert torch.equal(_csr_sd(gn, x.nan_to_num(0.0), w).flatten().isnan(), rows == r0), "sddmm, NaN in grad_out"


@pytest.mark.parametrize("kernel", ["auto", "gemv", "narrow"])
def test_csr_more_token_tiles_than_grid_rows(kernel, monkeypatch):
    """Past 65535 token tiles (narrow fp32: 16 tokens a tile) or token groups (gemv: 4), and 65535 x 32 tokens of
    the token-major copy, the kernels loop over the grid's y axis."""
    monkeypatch.setenv("SPARSEKERN_CUDA_CSR", kernel)
    w = _block((24, 16), 1, 0.5, torch.float32)
    T = 65535 * 16 + 1000
    x, g = _rand(T, 16, dtype=torch.float32), _rand(T, 24, dtype=torch.float32, seed=2)
    y = _bsr_fwd(w, x, None, "none")
    assert_close_to_ref(y, reference.linear(x, w), F.linear(x, w.to_dense()), "forward")
    assert_close_to_ref(_csr_gi(g, w), reference.linear_grad_input(g, w), g @ w.to_dense(), "grad_input")
    # A million-term sum per output: the floor scales with sqrt(T) and the sums of |terms| (cuBLAS may split K,
    # which a lane summing its tokens in order does not).
    sd, terms = _csr_sd(g, x, w), reference.sddmm(g.abs(), x.abs(), w)
    assert_close_to_ref(sd, reference.sddmm(g, x, w), reference.gather(g.t() @ x, w), "sddmm", k=T, terms=terms)


def test_csr_autograd_and_bad_kernel_name(monkeypatch):
    w = _block((24, 20), 1, 0.6, torch.float64)
    for kernel, T in (("auto", 2), ("auto", 9), ("wide", 9), ("off", 2)):
        monkeypatch.setenv("SPARSEKERN_CUDA_CSR", kernel)
        x = _rand(T, 20, dtype=torch.float64).requires_grad_()
        v = w.values.detach().clone().requires_grad_()
        bias = _rand(24, dtype=torch.float64, seed=3).requires_grad_()
        f = lambda x, v, b: ops.bsr_linear(x, v, w.row_offsets, w.col_indices, w.col_offsets, w.row_indices,
                                           w.block_perm, 24, b, "gelu")
        assert torch.autograd.gradcheck(f, (x, v, bias)), kernel
    monkeypatch.setenv("SPARSEKERN_CUDA_CSR", "fast")
    with pytest.raises(RuntimeError, match="SPARSEKERN_CUDA_CSR must be"):
        _bsr_fwd(w, _rand(3, 20, dtype=torch.float64), None, "none")


BALANCED_CASES = [((48, 64), 32, 16), ((33, 70), 32, 4), ((64, 128), 4, 2), ((17, 128), 64, 16), ((9, 21), 8, 3),
                  ((16, 700), 300, 7)]  # the last: int16 indices, ragged last bank


@pytest.mark.parametrize("shape,bank,keep", BALANCED_CASES)
@pytest.mark.parametrize("T", [1, 7, 97])
def test_balanced_ops_match_reference(dtype, shape, bank, keep, T):
    w = _balanced(shape, bank, keep, dtype)
    x = _rand(T, shape[1], dtype=dtype)
    bias = _rand(shape[0], dtype=dtype, seed=3)
    fwd = lambda w, x, b, a: ops.balanced_linear(x, w.values, w.indices, w.bank, b, a)
    gi = lambda g, w: ops.balanced_linear_grad_input(g, w.values, w.indices, w.bank, w.shape[1])
    sd = lambda g, x, w: ops.balanced_sddmm(g, x, w.indices, w.bank)
    _check_all(w, x, bias, "none", fwd, gi, sd)
    _check_all(w, x, None, "silu", fwd, gi, sd)


# 2:4 on sparse tensor cores: packed once, then used.
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("out,inn", [(16, 64), (64, 128), (48, 192), (256, 512)])
@pytest.mark.parametrize("T", [1, 7, 97, 300])
def test_nm24_linear_matches_reference(dtype, out, inn, T):
    w = _balanced((out, inn), 4, 2, dtype)
    pv, pm = ops.nm24_pack(w.values, w.indices)
    assert pv.shape == (out // 16, inn // 32, 32, 8) and pm.shape == (out // 16, inn // 64, 32)
    x, bias = _rand(T, inn, dtype=dtype), _rand(out, dtype=dtype, seed=3)
    for b, act in ((None, "none"), (bias, "gelu_tanh"), (bias, "relu")):
        y = ops.nm24_linear(x, pv, pm, b, act)
        dense = reference.activation(F.linear(x, w.to_dense(), b), act)
        assert_close_to_ref(y, reference.linear(x, w, b, act), dense, f"nm24 {out}x{inn} T={T} act={act}")


def test_nm24_strided_input_and_bad_shapes():
    w = _balanced((64, 128), 4, 2, torch.bfloat16)
    pv, pm = ops.nm24_pack(w.values, w.indices)
    wide = _rand(33, 136, dtype=torch.bfloat16)
    x = wide[:, 3:131]  # misaligned rows: the launcher copies them
    y = ops.nm24_linear(x, pv, pm, None, "none")
    assert_close_to_ref(y, reference.linear(x, w), F.linear(x, w.to_dense()), "strided")
    odd = _balanced((24, 128), 4, 2, torch.bfloat16)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        ops.nm24_pack(odd.values, odd.indices)
    with pytest.raises(RuntimeError, match="float16 or bfloat16"):
        ops.nm24_pack(w.values.float(), w.indices)
    with pytest.raises(RuntimeError, match="features"):
        ops.nm24_linear(_rand(4, 64, dtype=torch.bfloat16), pv, pm, None, "none")


def test_cuda_ops_pass_opcheck():
    w = _block((64, 96), 32, 0.5, torch.float32)
    x = _rand(5, 96, dtype=torch.float32)
    g = _rand(5, 64, dtype=torch.float32, seed=2)
    torch.library.opcheck(ops.bsr_linear, (x, w.values, w.row_offsets, w.col_indices, w.col_offsets, w.row_indices,
                                           w.block_perm, 64, None, "relu"))
    torch.library.opcheck(ops.bsr_linear_grad_input, (g, w.values, w.col_offsets, w.row_indices, w.block_perm, 96))
    torch.library.opcheck(ops.bsr_sddmm, (g, x, w.values, w.row_offsets, w.col_indices))
    b = _balanced((64, 96), 32, 8, torch.float32)
    torch.library.opcheck(ops.balanced_linear, (x, b.values, b.indices, 32, None, "silu"))
    torch.library.opcheck(ops.balanced_linear_grad_input, (g, b.values, b.indices, 32, 96))
    torch.library.opcheck(ops.balanced_sddmm, (g, x, b.indices, 32))


def test_nm24_ops_pass_opcheck_and_compile():
    w = _balanced((64, 128), 4, 2, torch.bfloat16)
    x = _rand(9, 128, dtype=torch.bfloat16)
    utils = ("test_schema", "test_faketensor")  # inference-only ops: no autograd registered
    torch.library.opcheck(ops.nm24_pack, (w.values, w.indices), test_utils=utils)
    pv, pm = ops.nm24_pack(w.values, w.indices)
    torch.library.opcheck(ops.nm24_linear, (x, pv, pm, None, "relu"), test_utils=utils)
    compiled = torch.compile(lambda x: ops.nm24_linear(x, pv, pm, None, "relu"), fullgraph=True)
    torch.testing.assert_close(compiled(x), ops.nm24_linear(x, pv, pm, None, "relu"), rtol=0, atol=0)


def test_cuda_autograd_gradcheck_float64():
    w = _block((24, 20), (8, 4), 0.4, torch.float64)
    x = _rand(3, 20, dtype=torch.float64).requires_grad_()
    v = w.values.detach().clone().requires_grad_()
    bias = _rand(24, dtype=torch.float64, seed=3).requires_grad_()
    f = lambda x, v, b: ops.bsr_linear(x, v, w.row_offsets, w.col_indices, w.col_offsets, w.row_indices,
                                       w.block_perm, 24, b, "gelu")
    assert torch.autograd.gradcheck(f, (x, v, bias))
    bw = _balanced((10, 24), 8, 3, torch.float64)
    xb = _rand(3, 24, dtype=torch.float64).requires_grad_()
    bv = bw.values.detach().clone().requires_grad_()
    bb = _rand(10, dtype=torch.float64, seed=3).requires_grad_()
    fb = lambda x, v, b: ops.balanced_linear(x, v, bw.indices, 8, b, "silu")
    assert torch.autograd.gradcheck(fb, (xb, bv, bb))


def test_bad_input_is_reported():
    w = _block((64, 64), 32, 0.5, torch.float16)
    with pytest.raises(RuntimeError, match="activation"):
        _bsr_fwd(w, _rand(3, 64, dtype=torch.float16), None, "tanh")
    with pytest.raises(RuntimeError, match="same dtype"):
        _bsr_fwd(w, _rand(3, 64, dtype=torch.float32), None, "none")
    with pytest.raises(RuntimeError, match=r"bias must have shape \[64\]"):
        _bsr_fwd(w, _rand(3, 64, dtype=torch.float16), _rand(63, dtype=torch.float16), "none")
    b = _balanced((16, 64), 32, 8, torch.float16)
    with pytest.raises(RuntimeError, match="banks"):  # 100 features need 4 banks of 32, the weight has 2
        ops.balanced_linear(_rand(3, 100, dtype=torch.float16), b.values, b.indices, 32, None, "none")


@pytest.mark.parametrize("fmt", ["block", "balanced"])
def test_module_on_gpu_takes_a_measured_backend(fmt):
    """A module moved to the GPU without a backend request takes the faster of Triton and CUDA C++ (both able
    here), and its forward and backward match the dense layer."""
    from sparse.nn import BalancedSparseLinear, BlockSparseLinear

    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 128)
    if fmt == "block":
        m = BlockSparseLinear.from_linear(lin, block=32, sparsity=0.5, activation="gelu")
    else:
        m = BalancedSparseLinear.from_linear(lin, bank=32, keep=8, activation="gelu")
    m = m.to(DEV, torch.bfloat16)
    timings = [t for k, t in sparse.ops.backend_timings().items() if k[1] == (128, 256) and k[4] == torch.bfloat16]
    assert timings and m.backend in timings[-1] and isinstance(timings[-1][m.backend], float)
    dense = torch.nn.Linear(256, 128).to(DEV, torch.bfloat16)
    with torch.no_grad():
        dense.weight.copy_(m.weight_format.to_dense())
        dense.bias.copy_(m.bias)
    x = torch.randn(64, 256, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    y = m(x)
    ref = F.gelu(F.linear(x.double(), dense.weight.double(), dense.bias.double()))
    assert_close_to_ref(y, ref, F.gelu(dense(x)), f"module {fmt} on {m.backend}")
    y.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad.float()).all()


def test_two_four_module_runs_on_sparse_tensor_cores_and_follows_updates():
    """A 2:4 BalancedSparseLinear with backend="cuda" runs nm24_linear (mma.sp) without grad, the general balanced
    kernel with grad, and both agree with the dense layer; an in-place change of the values is picked up."""
    from sparse.nn import BalancedSparseLinear

    torch.manual_seed(0)
    m = BalancedSparseLinear.from_linear(torch.nn.Linear(256, 128), bank=4, keep=2, backend="cuda").to(
        DEV, torch.bfloat16
    )
    x = torch.randn(96, 256, device=DEV, dtype=torch.bfloat16)

    def dense_ref():
        W = m.weight_format.to_dense().double()
        return F.linear(x.double(), W, m.bias.double()), F.linear(x, m.weight_format.to_dense(), m.bias)

    with torch.no_grad():
        y_fast = m(x)
        assert getattr(m._format, "_nm24", None) is not None  # the packed weight was built and used
        before = dense_ref()
        assert_close_to_ref(y_fast, *before, "2:4 nm24 path")
        assert_close_to_ref(sparse.linear(x, m.weight_format, m.bias), *before, "general balanced path")
        m.values.mul_(-2.0)
        assert_close_to_ref(m(x), *dense_ref(), "2:4 nm24 path after an in-place update")
    y_grad = m(x.requires_grad_())
    assert_close_to_ref(y_grad, *dense_ref(), "2:4 with grad (general balanced kernel)")
    y_grad.float().sum().backward()
    assert x.grad is not None
