"""Our attention kernel (sparsekern::attention, sparse.ops.attention) against a float64 reference on every ISA
path: shapes, grouped-query heads, masks, causal, dtypes, strides, special values, threads, autograd,
torch.compile, and bad input. Its use inside transformers models: tests/test_attention.py."""

import pytest
import torch
import torch.nn.functional as F

import sparse
from sparse import ops

pytestmark = pytest.mark.skipif(not sparse._ext.available(), reason="sparse._C not built")

OP = torch.ops.sparsekern.attention
# float32: the kernel's exp is ~1 ulp and its sums run in another order than the reference's; bfloat16: the
# output's 8 bits (the arithmetic is float32 on the bfloat16 inputs).
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
       torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float16: dict(rtol=2e-3, atol=2e-3)}


def _ref(q, k, v, mask=None, scale=1.0, causal=False):
    """float64 softmax(q k^T scale + mask) v as [B, Lq, H, Dv]; rows with every key masked out give 0."""
    group = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    s = q.double() @ k.transpose(-1, -2) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.double()
    if causal:
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool).tril(), float("-inf"))
    p = torch.nan_to_num(torch.softmax(s, -1), nan=0.0)
    return (p @ v).transpose(1, 2)


def _qkv(B, H, Hkv, Lq, Lk, D, Dv, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Lq, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, Lk, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Lk, Dv, generator=g).to(dtype)
    return q, k, v


# (B, H, Hkv, Lq, Lk, D, Dv): BERT's head, MiniLM's, odd sizes on every tile edge, decode, grouped-query heads
SHAPES = [(2, 3, 3, 37, 53, 64, 64), (1, 4, 4, 130, 130, 32, 32), (2, 4, 2, 13, 29, 16, 16), (1, 2, 1, 1, 7, 8, 8),
          (1, 1, 1, 25, 1, 80, 48), (2, 2, 2, 12, 33, 24, 72), (1, 3, 3, 3, 200, 128, 128)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["none", "causal", "bool", "float"])
def test_op_matches_reference_on_every_isa(isa, shape, dt, mode):
    B, H, Hkv, Lq, Lk, D, Dv = shape
    q, k, v = _qkv(*shape, dt)
    g = torch.Generator().manual_seed(1)
    mask = None
    if mode == "bool":  # a padding-style mask with some rows fully masked out
        mask = torch.rand(B, 1, Lq, Lk, generator=g) > 0.3
        mask[0, 0, 0] = False
    elif mode == "float":
        mask = torch.randn(B, H, 1, Lk, generator=g)
    scale = D**-0.5
    got = OP(q, k, v, mask, scale, mode == "causal")
    assert got.shape == (B, Lq, H, Dv) and got.dtype == dt and got.is_contiguous()
    want = _ref(q, k, v, mask, scale, mode == "causal")
    torch.testing.assert_close(got.double(), want, **TOL[dt], msg=f"{isa} {shape} {dt} {mode}")
    if mode == "bool":
        assert (got[0, 0] == 0).all()  # the row with every key masked out


def test_matches_torch_sdpa_on_a_packed_qkv_projection(isa):
    """q, k and v as transformers makes them: views of one [B, L, 3 * H * D] projection, rows H * D apart."""
    B, L, H, D = 2, 45, 6, 64
    x = torch.randn(B, L, 3 * H * D)
    q, k, v = (t.view(B, L, H, D).transpose(1, 2) for t in x.split(H * D, -1))
    assert not q.is_contiguous()
    got = ops.attention(q, k, v)
    want = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    # a non-contiguous head dimension is copied, not misread (bitwise the same in our kernel; aten's SDPA on the
    # portable path may sum in another order for other strides)
    qt = q.transpose(-1, -2).contiguous().transpose(-1, -2)
    exact = dict(rtol=0, atol=0) if isa != "portable" else dict(rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(ops.attention(qt, k, v), got, **exact)


@pytest.mark.parametrize("mshape", [(45,), (1, 45), (2, 1, 1, 45), (2, 6, 45, 45), (45, 45), (6, 1, 45)])
@pytest.mark.parametrize("mdtype", [torch.bool, torch.float32, torch.bfloat16, torch.float64])
def test_masks_broadcast_like_sdpa(isa, mshape, mdtype):
    q, k, v = _qkv(2, 6, 6, 45, 45, 32, 32, torch.float32)
    g = torch.Generator().manual_seed(2)
    mask = (torch.rand(mshape, generator=g) > 0.2) if mdtype == torch.bool else torch.randn(mshape, generator=g)
    mask = mask.to(mdtype)
    got = OP(q, k, v, mask, 0.2, False)
    torch.testing.assert_close(got.double(), _ref(q, k, v, mask.double() if mdtype != torch.bool else mask, 0.2),
                               rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dt", [torch.float64, torch.float16])
def test_other_dtypes_compute_the_same(dt):
    q, k, v = _qkv(2, 4, 2, 19, 23, 16, 16, dt)
    mask = torch.randn(2, 1, 19, 23).to(dt)
    torch.testing.assert_close(OP(q, k, v, mask, 0.25, False).double(), _ref(q, k, v, mask, 0.25), **TOL[dt])


def test_special_values(isa):
    q, k, v = _qkv(1, 2, 2, 20, 30, 16, 16, torch.float32)
    q[0, 0, 3, 5] = float("nan")  # one query row: only that row of that head is NaN
    v[0, 1, 7, 2] = float("nan")  # one value: the feature 2 of every row of head 1 that weighs key 7 (all)
    got = OP(q, k, v, None, 0.25, False)
    nan = got.isnan()
    assert nan[0, 3, 0].all() and nan[0, :, 0].sum() == 16
    assert nan[0, :, 1, 2].all() and nan[0, :, 1].sum() == 20
    # -inf scores are masked keys, and so are the most negative finite ones (transformers' float masks)
    q, k, v = _qkv(1, 1, 1, 8, 8, 8, 8, torch.float32, seed=3)
    alone = OP(q, k[:, :, 4:], v[:, :, 4:], None, 1.0, False)
    for fill in (float("-inf"), torch.finfo(torch.float32).min):
        mask = torch.zeros(8, 8)
        mask[:, :4] = fill
        torch.testing.assert_close(OP(q, k, v, mask, 1.0, False), alone)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_threads_give_bitwise_equal_results(threads):
    q, k, v = _qkv(1, 3, 3, 100, 77, 64, 64, torch.float32)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = OP(q, k, v, None, 0.125, True)
        torch.set_num_threads(threads)
        many = OP(q, k, v, None, 0.125, True)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, many)


def test_autograd_matches_sdpa():
    q, k, v = (t.requires_grad_() for t in _qkv(2, 4, 2, 11, 13, 16, 8, torch.float64))
    mask = torch.rand(2, 1, 11, 13, generator=torch.Generator().manual_seed(4)) > 0.3
    assert torch.autograd.gradcheck(lambda q, k, v: ops.attention(q, k, v, mask, 0.3), (q, k, v))
    assert torch.autograd.gradcheck(lambda q, k, v: ops.attention(q, k, v, None, 0.3, causal=True), (q, k, v))
    # float32 through our kernel, against SDPA's own backward
    q, k, v = (t.float().detach().requires_grad_() for t in (q, k, v))
    gy = torch.randn(2, 11, 4, 8)
    grads = torch.autograd.grad((ops.attention(q, k, v, None, 0.3) * gy).sum(), (q, k, v))
    ref = torch.autograd.grad((F.scaled_dot_product_attention(q, k, v, scale=0.3, enable_gqa=True).transpose(1, 2)
                               * gy).sum(), (q, k, v))
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def test_opcheck():
    q, k, v = _qkv(1, 2, 2, 9, 10, 16, 16, torch.float32)
    mask = torch.rand(1, 1, 9, 10, generator=torch.Generator().manual_seed(5)) > 0.2
    for args in [(q, k, v, None, 0.25, False), (q, k, v, mask, 0.25, False), (q, k, v, None, 0.25, True)]:
        torch.library.opcheck(OP.default, args, test_utils=("test_schema", "test_faketensor",
                                                            "test_aot_dispatch_dynamic"))


@pytest.mark.slow  # Inductor compiles (~10 s)
def test_torch_compile_fullgraph():
    q, k, v = _qkv(2, 4, 4, 33, 33, 32, 32, torch.float32)

    def f(q, k, v):
        return ops.attention(q * 2, k, v, None, 0.1).sum(-1)

    torch.testing.assert_close(torch.compile(f, fullgraph=True)(q, k, v), f(q, k, v))


def test_bad_input_names_the_value():
    q, k, v = _qkv(1, 4, 2, 5, 6, 8, 8, torch.float32)
    with pytest.raises(RuntimeError, match="4-D"):
        OP(q[0], k, v, None, 1.0, False)
    with pytest.raises(RuntimeError, match="same dtype"):
        OP(q, k.double(), v, None, 1.0, False)
    with pytest.raises(RuntimeError, match=r"multiple of k's heads \(3\)"):
        OP(q, k[:, :1].expand(1, 3, 6, 8), v[:, :1].expand(1, 3, 6, 8), None, 1.0, False)
    with pytest.raises(RuntimeError, match="head_dim 8, got 4"):
        OP(q, k[..., :4], v, None, 1.0, False)
    with pytest.raises(RuntimeError, match=r"does not broadcast to \[batch, heads, Lq, Lk\] = \[1, 4, 5, 6\]"):
        OP(q, k, v, torch.ones(5, 5, dtype=torch.bool), 1.0, False)
    with pytest.raises(RuntimeError, match="either a mask or causal"):
        OP(q, k, v, torch.ones(5, 6, dtype=torch.bool), 1.0, True)
    with pytest.raises(RuntimeError, match="mask must be bool"):
        OP(q, k, v, torch.ones(5, 6, dtype=torch.int32), 1.0, False)
    with pytest.raises(RuntimeError, match="scale must be finite"):
        OP(q, k, v, None, float("inf"), False)
    with pytest.raises(ValueError, match="CPU tensors, got q on meta"):
        ops.attention(q.to("meta"), k, v)
    with pytest.raises(TypeError, match="v must be a torch.Tensor"):
        ops.attention(q, k, None)
