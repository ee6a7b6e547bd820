"""NaN and Inf propagation, at every CPU ISA level and for every dtype.

What "as in the dense reference" means for a sparse product: the float64 dense product in which every
position the weight does not store contributes nothing (rather than 0 * x). A stored entry, including an
explicit zero inside a kept block, does take part: 0 * Inf is NaN there, as in dense torch. So NaN/Inf in the
weight reach exactly the outputs dense torch would reach; NaN/Inf in the input reach the outputs whose row
stores that input's column (dense torch would spread them over the whole row through the pruned zeros, which a
sparse kernel never reads: the same rule as torch.sparse).

Checked: forward (with a bias that may itself hold NaN/Inf, and every activation), grad_input and sddmm:
identical NaN positions, identical +Inf/-Inf positions, and the finite entries close to the reference.
"""

from __future__ import annotations

import math

import pytest
import torch

import sparse
from sparse import reference
from sparse._ext import available
from tests import _reliab as R
from tests import helpers as H

pytestmark = pytest.mark.skipif(not available(), reason="sparse._C not built")

SPECIALS = (float("nan"), float("inf"), float("-inf"))


def _sprinkle(t: torch.Tensor, seed: int, frac: float = 0.08) -> torch.Tensor:
    """t with a fraction of its entries replaced by NaN, +Inf and -Inf."""
    g = torch.Generator().manual_seed(seed)
    t = t.clone()
    flat = t.view(-1)
    n = max(1, int(frac * flat.numel()))
    pos = torch.randperm(flat.numel(), generator=g)[:n]
    for j, p in enumerate(pos.tolist()):
        flat[p] = SPECIALS[j % 3]
    return t


def _assert_same_specials(got: torch.Tensor, want: torch.Tensor, reduce_len: int, scale: float, what: str) -> None:
    got64 = got.double()
    assert torch.equal(got64.isnan(), want.isnan()), (
        f"{what}: NaN at {(got64.isnan() != want.isnan()).nonzero()[:5].tolist()} differs from the reference")
    assert torch.equal(got64.isposinf(), want.isposinf()), f"{what}: +Inf positions differ from the reference"
    assert torch.equal(got64.isneginf(), want.isneginf()), f"{what}: -Inf positions differ from the reference"
    finite = want.isfinite()
    acc = torch.float64 if got.dtype == torch.float64 else torch.float32
    tol = 4 * (torch.finfo(got.dtype).eps + torch.finfo(acc).eps * math.sqrt(reduce_len)) * scale
    err = (got64[finite] - want[finite]).abs().max().item() if finite.any() else 0.0
    assert err <= tol, f"{what}: finite entries off by {err:.3e} > {tol:.3e}"


def _weights(dtype: torch.dtype):
    yield H.make_bsr(23, 37, (4, 8), density=0.6, dtype=dtype, seed=1)  # ragged edges, explicit zeros kept in blocks
    yield H.make_bsr(64, 32, (16, 16), density=0.5, dtype=dtype, seed=2)
    yield H.make_balanced(19, 70, 16, 5, dtype=dtype, seed=3)  # ragged last bank of 6


@pytest.mark.parametrize("where", ["input", "weight", "both"])
def test_nan_inf_propagate_like_the_reference(dtype, where):
    for wi, clean in enumerate(_weights(dtype)):
        out, inn = clean.shape
        mask = R.structural_mask(clean)
        weight = clean
        if where != "input":
            weight = R.with_values(clean, _sprinkle(clean.values.contiguous(), seed=wi))
        W = R.dense(weight)
        T = 11
        x = H.randn((T, inn), dtype, seed=10 + wi)
        g = H.randn((T, out), dtype, seed=20 + wi)
        if where != "weight":
            x, g = _sprinkle(x, seed=30 + wi), _sprinkle(g, seed=40 + wi)
        bias = _sprinkle(H.randn((out,), dtype, seed=50 + wi), seed=60 + wi, frac=0.1)
        z_ref = R.masked_matmul(x, W, mask) + bias.double()
        gi_ref = R.masked_matmul(g, W.t(), mask.t())
        sd_ref = R.gather_pattern(weight, R.masked_matmul(g.t(), x.t(), torch.ones(inn, T, dtype=torch.bool)))
        fin = lambda t: t.double().nan_to_num(0.0, 0.0, 0.0).abs()  # noqa: E731
        scale = max((fin(x) @ fin(W).t()).max().item() + fin(bias).max().item(), (fin(g) @ fin(W)).max().item(),
                    (fin(g).t() @ fin(x)).max().item(), 1.0)
        for level in R.isa_levels():
            with R.isa(level):
                tag = f"[{level} {dtype} {weight!r} NaN/Inf in {where}]"
                for act in H.ACTS:
                    y = sparse.linear(x, weight, bias, act)
                    _assert_same_specials(y, reference.activation(z_ref, act), inn, scale, f"forward {act} {tag}")
                _assert_same_specials(sparse.linear_grad_input(g, weight), gi_ref, out, scale, f"grad_input {tag}")
                _assert_same_specials(sparse.sddmm(g, x, weight), sd_ref, T, scale, f"sddmm {tag}")


def test_empty_weight_reads_nothing(dtype):
    """With no stored block, NaN/Inf in x reach nothing: forward gives act(bias), grad_input exact zeros."""
    weight = H.make_bsr(16, 16, (4, 4), density=0.0, dtype=dtype, seed=0)
    assert weight.nnz_blocks == 0
    x = _sprinkle(H.randn((5, 16), dtype, seed=1), seed=2, frac=0.5)
    bias = H.randn((16,), dtype, seed=3)
    for level in R.isa_levels():
        with R.isa(level):
            assert torch.equal(sparse.linear(x, weight, bias), bias.expand(5, 16)), f"[{level} {dtype}]"
            for act in H.ACTS:
                y = sparse.linear(x, weight, bias, act)
                _assert_same_specials(y, reference.activation(bias.double(), act).expand(5, 16), 1, 1.0,
                                      f"[{level} {dtype} {act}] empty weight")
            assert torch.equal(sparse.linear_grad_input(x, weight), torch.zeros(5, 16, dtype=dtype))
