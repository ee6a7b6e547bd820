"""BlockSparseLinear / BalancedSparseLinear: forward and backward against the float64 reference, training
touches only kept weights, layout and state survive .to(), deepcopy, pickling and load_state_dict."""

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparse
from sparse import reference
from sparse.nn import BalancedSparseLinear, BlockSparseLinear
from tests.helpers import assert_close_to_ref


def make(kind: str, inn: int, out: int, **kw) -> nn.Module:
    if kind == "block":
        return BlockSparseLinear(inn, out, block=kw.pop("block", 16), sparsity=kw.pop("sparsity", 0.5), **kw)
    return BalancedSparseLinear(inn, out, bank=kw.pop("bank", 16), keep=kw.pop("keep", 4), **kw)


def is_kernel_layout(m: nn.Module) -> bool:
    if isinstance(m, BalancedSparseLinear):
        return m.values.is_contiguous()
    nnz, bo, bi = m.values.shape
    return m.values.stride() == (bo * bi, 1, bo)


@pytest.mark.parametrize("kind", ["block", "balanced"])
def test_forward_matches_reference(kind, dtype, activation):
    torch.manual_seed(0)
    m = make(kind, 100, 72, activation=activation, dtype=dtype)  # 100 = ragged last block / bank
    assert m.values.dtype == dtype and is_kernel_layout(m)
    x = torch.randn(3, 7, 100, dtype=dtype)
    y = m(x)
    assert y.shape == (3, 7, 72) and y.dtype == dtype
    W = m.weight_format.to_dense()
    ref = reference.linear(x, m.weight_format, m.bias, activation)
    dense = reference.activation(F.linear(x, W, m.bias), activation) if dtype != torch.float16 else \
        reference.activation(F.linear(x.float(), W.float(), m.bias.float()), activation).half()
    assert_close_to_ref(y, ref, dense)


@pytest.mark.parametrize("kind", ["block", "balanced"])
def test_t1_and_no_bias_and_noncontiguous(kind):
    torch.manual_seed(1)
    m = make(kind, 64, 48, bias=False)
    assert m.bias is None
    x = torch.randn(64, 5).t()  # [5, 64], not contiguous
    ref = reference.linear(x, m.weight_format)
    assert_close_to_ref(m(x), ref, F.linear(x, m.weight_format.to_dense()))
    x1 = torch.randn(1, 64)
    assert_close_to_ref(m(x1), reference.linear(x1, m.weight_format), F.linear(x1, m.weight_format.to_dense()))


@pytest.mark.parametrize("kind", ["block", "balanced"])
@pytest.mark.parametrize("activation", ["none", "gelu"])
def test_backward_matches_reference(kind, activation):
    torch.manual_seed(2)
    m = make(kind, 48, 40, activation=activation, dtype=torch.float64)
    x = torch.randn(2, 5, 48, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 5, 40, dtype=torch.float64)
    m(x).backward(g)
    # The same computation on a dense copy: its gradient at the kept positions is the values' gradient.
    W = m.weight_format.to_dense().detach().requires_grad_(True)
    b = m.bias.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    reference.activation(F.linear(x2, W, b), activation).backward(g)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(m.bias.grad, b.grad)
    expect = reference.gather(W.grad, m.weight_format)  # the dense weight gradient at the kept positions
    torch.testing.assert_close(m.values.grad, expect)


@pytest.mark.parametrize("kind", ["block", "balanced"])
def test_from_linear_and_to_linear(kind):
    torch.manual_seed(3)
    lin = nn.Linear(96, 64)
    if kind == "block":
        m = BlockSparseLinear.from_linear(lin, block=32, sparsity=0.5, activation="relu")
        expect = sparse.BlockSparseWeight.from_dense(lin.weight, 32, sparsity=0.5).to_dense()
    else:
        m = BalancedSparseLinear.from_linear(lin, bank=32, keep=8, activation="relu")
        expect = sparse.BalancedSparseWeight.from_dense(lin.weight, 32, 8).to_dense()
    assert is_kernel_layout(m)
    kept = expect != 0
    assert torch.equal(expect[kept], lin.weight.detach()[kept])  # the kept weights are copied exactly
    assert torch.equal(m.weight_format.to_dense(), expect)
    assert torch.equal(m.bias.detach(), lin.bias.detach()) and m.bias.data_ptr() != lin.bias.data_ptr()
    back = m.to_linear()
    assert type(back) is nn.Linear and torch.equal(back.weight, expect) and torch.equal(back.bias, lin.bias)
    x = torch.randn(9, 96)
    assert_close_to_ref(m(x), reference.linear(x, m.weight_format, m.bias, "relu"), F.relu(back(x)))
    assert abs(m.sparsity - (0.5 if kind == "block" else 0.75)) < 1e-9
    assert m.nbytes == m.weight_format.nbytes + 64 * 4 < 96 * 64 * 4


def test_from_linear_mask_and_block_pair():
    torch.manual_seed(4)
    lin = nn.Linear(64, 32)
    grid = torch.tensor([[True, False, False, True], [False, True, False, False]])
    m = BlockSparseLinear.from_linear(lin, block=(16, 16), mask=grid)
    assert m.values.shape == (3, 16, 16) and m.block == (16, 16)
    dense = m.weight_format.to_dense()
    assert torch.equal(dense[:16, :16], lin.weight.detach()[:16, :16]) and not dense[:16, 16:48].any()
    m2 = BlockSparseLinear.from_linear(lin, block=(8, 32), sparsity=0.75)
    assert m2.values.shape == (2, 8, 32) and is_kernel_layout(m2)


@pytest.mark.parametrize("kind", ["block", "balanced"])
def test_optimizer_updates_only_kept_weights(kind):
    torch.manual_seed(5)
    m = make(kind, 64, 48)
    assert [n for n, _ in m.named_parameters()] == ["values", "bias"]
    pattern = {n: b.clone() for n, b in m.named_buffers()}
    before = m.weight_format.to_dense().detach().clone()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        m(torch.randn(8, 64)).pow(2).mean().backward()
        opt.step()
    after = m.weight_format.to_dense().detach()
    kept = before != 0
    assert not after[~kept].any()  # pruned weights stay zero: they are not stored at all
    assert (after[kept] != before[kept]).float().mean() > 0.99
    assert all(torch.equal(b, pattern[n]) for n, b in m.named_buffers())
    assert is_kernel_layout(m)


@pytest.mark.parametrize("kind", ["block", "balanced"])
def test_layout_survives_conversions_and_copies(kind):
    torch.manual_seed(6)
    m = make(kind, 64, 48)
    x = torch.randn(4, 64)
    y = m(x)
    for other in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert is_kernel_layout(other) and torch.equal(other(x), y)
        assert other.values.data_ptr() != m.values.data_ptr()
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert is_kernel_layout(loaded) and torch.equal(loaded(x), y)
    bf = copy.deepcopy(m).to(torch.bfloat16)
    assert bf.values.dtype == torch.bfloat16 and bf.bias.dtype == torch.bfloat16 and is_kernel_layout(bf)
    assert bf.pattern_info.dtype == torch.int64 and all(not b.is_floating_point() for b in bf.buffers())
    xb = x.bfloat16()
    assert_close_to_ref(bf(xb), reference.linear(xb, bf.weight_format, bf.bias),
                        F.linear(xb, bf.weight_format.to_dense(), bf.bias))
    half = copy.deepcopy(m).half()
    assert half.values.dtype == torch.float16 and is_kernel_layout(half) and half.backend == "cpu"
    dbl = copy.deepcopy(m).double()
    assert is_kernel_layout(dbl) and torch.equal(dbl.weight_format.to_dense(), m.weight_format.to_dense().double())
    assert m.train() is m and m.training and not m.eval().training


@pytest.mark.parametrize("kind", ["block", "balanced"])
def test_state_dict_round_trip(kind):
    torch.manual_seed(7)
    m = make(kind, 64, 48, activation="silu")
    sd = m.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    assert sd["pattern_info"].tolist()[:2] == [48, 64]
    torch.manual_seed(8)
    fresh = make(kind, 64, 48, activation="silu")  # same configuration, different random weights and pattern
    assert not torch.equal(fresh.weight_format.to_dense(), m.weight_format.to_dense())
    fresh.load_state_dict(sd)
    assert is_kernel_layout(fresh)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, sd[k]), k
    x = torch.randn(5, 64)
    assert torch.equal(fresh(x), m(x))
    # assign=True installs the stored tensors themselves; saved files hold values in the logical layout.
    plain = {k: v.contiguous() for k, v in sd.items()}
    assigned = make(kind, 64, 48, activation="silu")
    assigned.load_state_dict(plain, assign=True)
    assert is_kernel_layout(assigned) and isinstance(assigned.values, nn.Parameter)
    assert torch.equal(assigned(x), m(x))


def test_load_state_dict_rejects_other_configurations_and_corrupt_patterns():
    torch.manual_seed(9)
    m = BlockSparseLinear(64, 64, block=16, sparsity=0.5)
    with pytest.raises(RuntimeError, match=r"pattern_info.*\(16, 16\) blocks.*\(32, 32\) blocks"):
        BlockSparseLinear(64, 64, block=32, sparsity=0.5).load_state_dict(m.state_dict())
    bad = m.state_dict()
    bad["col_indices"] = bad["col_indices"].clone()
    bad["col_indices"][0] = 99
    target = BlockSparseLinear(64, 64, block=16, sparsity=0.5)
    before = target.values.detach().clone()
    with pytest.raises(RuntimeError, match="invalid.*col_indices"):
        target.load_state_dict(bad)
    assert torch.equal(target.values, before)  # nothing copied
    b = BalancedSparseLinear(64, 32, bank=16, keep=4)
    bad = b.state_dict()
    bad["indices"] = bad["indices"].flip(-1).contiguous()
    with pytest.raises(RuntimeError, match="strictly increasing"):
        BalancedSparseLinear(64, 32, bank=16, keep=4).load_state_dict(bad)


def test_extra_repr_and_properties():
    m = BlockSparseLinear(96, 64, block=32, sparsity=0.5, activation="gelu")
    r = repr(m)
    for part in (
        "in_features=96",
        "out_features=64",
        "block=(32, 32)",
        "sparsity=0.500",
        "activation=gelu",
        "backend=cpu",
    ):
        assert part in r
    b = BalancedSparseLinear(96, 64, bank=32, keep=8, bias=False)
    assert "bank=32, keep=8" in repr(b) and "sparsity=0.750" in repr(b) and "bias=False" in repr(b)
    assert b.weight_format.values is b.values  # the format is a view of the module's own tensors
    assert m.weight_format.values.data_ptr() == m.values.data_ptr()


def test_replaced_parameter_is_used():
    torch.manual_seed(10)
    m = BlockSparseLinear(64, 32, block=16, bias=False)
    x = torch.randn(3, 64)
    m.values = nn.Parameter(2 * m.values.detach())
    torch.testing.assert_close(m(x), x @ m.weight_format.to_dense().t())


def test_meta_device_defers_the_backend_error():
    m = BlockSparseLinear(64, 64, block=16, device="meta")
    assert m.values.is_meta and m.backend is None
    with pytest.raises(RuntimeError, match="no sparse backend can run on meta"):
        m(torch.randn(2, 64, device="meta"))


def test_bad_arguments():
    with pytest.raises(ValueError, match="block .* is larger than the matrix"):
        BlockSparseLinear(10, 10, block=32)
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        BlockSparseLinear(64, 64, sparsity=1.0)
    with pytest.raises(ValueError, match="activation must be one of"):
        BlockSparseLinear(64, 64, activation="tanh")
    with pytest.raises(ValueError, match="keep must be in"):
        BalancedSparseLinear(64, 64, bank=16, keep=17)
    with pytest.raises(ValueError, match="bank must be in"):
        BalancedSparseLinear(8, 64, bank=16, keep=4)
    with pytest.raises(ValueError, match="in_features must be >= 1"):
        BalancedSparseLinear(0, 64)
    with pytest.raises(ValueError, match="backend must be one of"):
        BlockSparseLinear(64, 64, backend="tpu")
    with pytest.raises(TypeError, match="expected an nn.Linear or transformers Conv1D"):
        BlockSparseLinear.from_linear(nn.Conv2d(3, 3, 1), sparsity=0.5)
    with pytest.raises(ValueError, match="exactly one of sparsity= or mask="):
        BlockSparseLinear.from_linear(nn.Linear(64, 64))
    m = BlockSparseLinear(64, 64, block=16)
    with pytest.raises(TypeError, match="x has dtype torch.float64 but the weight has torch.float32"):
        m(torch.randn(2, 64, dtype=torch.float64))
    with pytest.raises(ValueError, match="x must end in 64 features"):
        m(torch.randn(2, 63))


def test_module_takes_the_backend_that_measures_fastest(monkeypatch):
    """With several able backends (as on a GPU: triton and cuda), a module built without a backend request takes
    the fastest one for its weight, measured once per weight configuration; a backend that fails is left out."""
    from sparse import ops

    able = {"cpu": None, "triton": None, "cuda": None}
    monkeypatch.setattr(ops, "_refusal", lambda name, device: able[name])
    monkeypatch.setattr(ops, "_TIMINGS", {})
    calls = []

    def fake_time(name, x, weight, repeats):
        calls.append((name, tuple(x.shape)))
        if name == "cuda":
            raise RuntimeError("no kernel for this shape")
        return {"cpu": 3e-3, "triton": 1e-3}[name]

    monkeypatch.setattr(ops, "_time_backend", fake_time)
    a = BlockSparseLinear(64, 32, block=16, sparsity=0.5)
    b = BlockSparseLinear(64, 32, block=16, sparsity=0.5)  # same configuration: measured once
    assert a.backend == b.backend == "triton"
    assert sorted(calls) == [("cpu", (512, 64)), ("cuda", (512, 64)), ("triton", (512, 64))]
    (timings,) = ops.backend_timings().values()
    assert timings["triton"] == 1e-3 and "no kernel for this shape" in timings["cuda"]
    assert BlockSparseLinear(64, 32, block=16, sparsity=0.5, backend="cpu").backend == "cpu"  # a request is kept
    assert len(calls) == 3
    BalancedSparseLinear(64, 32, bank=16, keep=4)  # another configuration: measured again
    assert len(calls) == 6


def test_one_able_backend_measures_nothing(monkeypatch):
    from sparse import ops

    monkeypatch.setattr(ops, "_time_backend", lambda *a: pytest.fail("measured with a single able backend"))
    assert BlockSparseLinear(64, 32, block=16, sparsity=0.5).backend == "cpu"
