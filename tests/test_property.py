"""Property tests: every op, at every CPU code path this machine has (portable, AVX2, AVX-512), on random weights
and inputs, against the float64 reference.

Drawn at random: matrix sizes (1, primes, powers of two, anything up to 130), block shapes (square,
rectangular, larger than a ragged edge), bank/keep (ragged last bank), block density from 0 (empty weight)
to 1, dtypes fp32/fp64/bf16/fp16, leading dimensions (none, several, zero-sized), memory layouts of the
activations (contiguous, padded rows, strided features, transposed), bias or not, every activation.
Checked for each: forward, grad_input, sddmm and autograd through ``sparse.linear`` (grads of x, values,
bias), each with the tolerance rule of ``_reliab.check_rule``.

Bounded profile "ci" (derandomized) in ``make test``; ``make fuzz`` runs the "long" profile.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import sparse
from sparse import reference
from sparse._ext import available
from tests import _reliab as R
from tests import helpers as H

pytestmark = pytest.mark.skipif(not available(), reason="sparse._C not built")

SIZES = st.one_of(st.sampled_from([1, 2, 3, 5, 7, 13, 16, 17, 31, 32, 61, 64, 97]), st.integers(1, 130))
LEADS = st.one_of(
    st.lists(st.integers(1, 6), max_size=3).map(tuple),
    st.sampled_from([(0,), (3, 0), (9,), (16,), (33,), (97,)]),
)
DENSITY = st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0))


def check_every_op(weight, lead, x_layout: str, g_layout: str, with_bias: bool, act: str, seed: int) -> None:
    """All ops of ``weight`` at every ISA level against the float64 reference."""
    dtype = weight.dtype
    out, inn = weight.shape
    x = H.randn((*lead, inn), dtype, seed)
    g = H.randn((*lead, out), dtype, seed + 1)
    bias = H.randn((out,), dtype, seed + 2) if with_bias else None
    W = R.dense(weight)
    W64, x64, g64 = W.double(), x.double().reshape(-1, inn), g.double().reshape(-1, out)
    T = x64.shape[0]
    b64 = bias.double() if bias is not None else None

    # forward
    y_ref = reference.linear(x, weight, bias, act)
    y_dense = reference.activation(F.linear(x, W, bias), act)
    y_terms = x64.abs() @ W64.abs().t() + (b64.abs() if b64 is not None else 0)
    # grad_input and sddmm
    gi_ref = reference.linear_grad_input(g, weight)
    gi_dense = g @ W
    gi_terms = g64.abs() @ W64.abs()
    sd_ref = reference.sddmm(g, x, weight)
    sd_dense = R.gather_pattern(weight, g.reshape(-1, out).t() @ x.reshape(-1, inn))
    sd_terms = R.gather_pattern(weight, g64.abs().t() @ x64.abs())
    # autograd through sparse.linear: grads of x, values and bias for the loss sum(y * g)
    z64 = F.linear(x64, W64, b64)
    gz64 = R.act_grad(g64, z64, act)
    ag_ref = (gz64 @ W64, R.gather_pattern(weight, gz64.t() @ x64), gz64.sum(0))
    # The backward evaluates act'(z) at the forward's rounded z: that rounding (eps * y_terms) reaches the
    # grads through |act''| <= ACT_CURVATURE[act], on top of the rounding of the backward's own sums.
    gz_scale = gz64.abs() + R.ACT_CURVATURE[act] * g64.abs() * y_terms
    ag_terms = (gz_scale @ W64.abs(), R.gather_pattern(weight, gz_scale.t() @ x64.abs()), gz_scale.sum(0))
    xd = x.detach().requires_grad_(True)
    Wd = W.detach().requires_grad_(True)
    bd = bias.detach().requires_grad_(True) if bias is not None else None
    reference.activation(F.linear(xd, Wd, bd), act).backward(g)
    ag_dense = (xd.grad.reshape(-1, inn), R.gather_pattern(weight, Wd.grad), bd.grad if bd is not None else None)

    xl, gl = R.layout(x, x_layout), R.layout(g, g_layout)
    for level in R.isa_levels():
        with R.isa(level):
            tag = f"[{level} {dtype} {weight!r} lead={lead} x:{x_layout} g:{g_layout} act={act} bias={with_bias}]"
            y = sparse.linear(xl, weight, bias, act)
            H.assert_close_to_ref(y, y_ref, y_dense, f"forward {tag}", k=inn, terms=y_terms.reshape(y_ref.shape))
            gi = sparse.linear_grad_input(gl, weight)
            H.assert_close_to_ref(gi, gi_ref, gi_dense, f"grad_input {tag}", k=out,
                                  terms=gi_terms.reshape(gi_ref.shape))
            sd = sparse.sddmm(gl, xl, weight)
            H.assert_close_to_ref(sd, sd_ref, sd_dense, f"sddmm {tag}", k=T, terms=sd_terms)

            v = weight.values.detach().clone(memory_format=torch.preserve_format).requires_grad_(True)
            wg = R.with_values(weight, v)
            xa = xl.detach().requires_grad_(True)
            ba = bias.detach().requires_grad_(True) if bias is not None else None
            sparse.linear(xa, wg, ba, act).backward(gl)
            H.assert_close_to_ref(xa.grad.reshape(-1, inn), ag_ref[0], ag_dense[0], f"autograd x {tag}", k=out,
                                  terms=ag_terms[0])
            H.assert_close_to_ref(v.grad, ag_ref[1], ag_dense[1], f"autograd values {tag}", k=T, terms=ag_terms[1])
            if ba is not None:
                H.assert_close_to_ref(ba.grad, ag_ref[2], ag_dense[2], f"autograd bias {tag}", k=T, terms=ag_terms[2])


@st.composite
def block_shape(draw, out: int, inn: int):
    choices = (1, 2, 3, 4, 5, 8, 16, 32, 64)
    bo = draw(st.sampled_from([b for b in choices if b <= out]))
    bi = draw(st.one_of(st.just(bo), st.sampled_from(choices)).filter(lambda b: b <= inn) | st.just(1))
    return bo, bi


@R.profile(ci_examples=40)
@given(
    data=st.data(), out=SIZES, inn=SIZES, density=DENSITY, dtype=st.sampled_from(H.DTYPES), lead=LEADS,
    x_layout=st.sampled_from(R.LAYOUTS), g_layout=st.sampled_from(R.LAYOUTS), with_bias=st.booleans(),
    act=st.sampled_from(H.ACTS), seed=st.integers(0, 2**31 - 1),
)
def test_block_sparse_every_op(data, out, inn, density, dtype, lead, x_layout, g_layout, with_bias, act, seed):
    block = data.draw(block_shape(out, inn), label="block")
    weight = H.make_bsr(out, inn, block, density=density, dtype=dtype, seed=seed)
    check_every_op(weight, lead, x_layout, g_layout, with_bias, act, seed)


@st.composite
def bank_keep(draw, inn: int):
    bank = draw(st.one_of(st.sampled_from([1, 2, 3, 4, 5, 8, 16, 32, 64, 128]), st.integers(1, 300)).filter(
        lambda b: b <= inn) | st.just(inn))
    last = inn - (math.ceil(inn / bank) - 1) * bank
    keep = draw(st.one_of(st.integers(1, last), st.sampled_from([1, last, max(1, bank // 2)]).filter(
        lambda k: k <= last)))
    return bank, keep


@R.profile(ci_examples=40)
@given(
    data=st.data(), out=SIZES, inn=st.one_of(SIZES, st.sampled_from([257, 300])), dtype=st.sampled_from(H.DTYPES),
    lead=LEADS, x_layout=st.sampled_from(R.LAYOUTS), g_layout=st.sampled_from(R.LAYOUTS),
    with_bias=st.booleans(), act=st.sampled_from(H.ACTS), seed=st.integers(0, 2**31 - 1),
)
def test_balanced_every_op(data, out, inn, dtype, lead, x_layout, g_layout, with_bias, act, seed):
    bank, keep = data.draw(bank_keep(inn), label="bank, keep")
    weight = H.make_balanced(out, inn, bank, keep, dtype=dtype, seed=seed)
    check_every_op(weight, lead, x_layout, g_layout, with_bias, act, seed)


@pytest.mark.parametrize(
    "kind, out, inn, arg",
    [
        ("block", 97, 67, (32, 32)),   # ragged in both directions, larger than one tile of tokens
        ("block", 64, 64, (16, 16)),
        ("block", 61, 130, (1, 32)),
        ("block", 130, 61, (32, 1)),
        ("balanced", 33, 300, (32, 8)),  # ragged last bank of 12
        ("balanced", 17, 64, (4, 2)),  # 2:4
        ("balanced", 5, 520, (260, 7)),  # int16 indices
    ],
)
def test_fixed_cases_every_op(kind, out, inn, arg, dtype):
    """Shapes the fast paths specialise on, at T below, at and above their token tiles, with every activation."""
    if kind == "block":
        weight = H.make_bsr(out, inn, arg, density=0.5, dtype=dtype, seed=out * inn)
    else:
        weight = H.make_balanced(out, inn, arg[0], arg[1], dtype=dtype, seed=out * inn)
    for i, (T, act) in enumerate(zip((1, 8, 33, 64, 7), H.ACTS)):
        check_every_op(weight, (T,), R.LAYOUTS[i % 4], "contiguous", i % 2 == 0, act, seed=i)
