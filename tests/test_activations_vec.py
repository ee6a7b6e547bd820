"""The fused activations of the balanced and block-sparse forwards on every ISA this CPU runs (the AVX-512 / AVX2
paths evaluate GELU, tanh-GELU and SiLU with their own vectorised erf/exp), against the float64 reference with the
suite's rule, including pre-activations in the tails, exact zeros, and NaN / Inf exactly as torch.nn.functional
treats them."""

from __future__ import annotations

import pytest
import torch

from sparse import reference
from sparse.formats import BalancedSparseWeight, BlockSparseWeight
from tests.helpers import NONLINEAR, VECTOR_DTYPES, assert_close_to_ref, slow_except

# T = 1 takes the decode (gather) path, 7 and 97 the token tiles (one partial 16-token vector, several).
TOKENS = [1, 7, 97]



def _selected(fmt: str, z: torch.Tensor, T: int, act: str) -> torch.Tensor:
    """The forward of a layer whose pre-activations are exactly z: W[o] = (1, 0, 0, 0), bias = z, x = 0 (0 * 1 + z
    is exact, also for Inf and NaN in the bias). z [out] -> act(z) broadcast to [T, out], in z's dtype."""
    W = torch.zeros(z.numel(), 4, dtype=z.dtype)
    W[:, 0] = 1.0
    x = torch.zeros(T, 4, dtype=z.dtype)
    if fmt == "balanced":
        w = BalancedSparseWeight.from_dense(W.float(), bank=4, keep=1).to(dtype=z.dtype)
        return torch.ops.sparsekern.balanced_linear(x, w.values, w.indices, 4, z, act)
    b = BlockSparseWeight.from_dense(W, (16, 4), sparsity=0.0)
    return torch.ops.sparsekern.bsr_linear(x, b.values, b.row_offsets, b.col_indices, b.col_offsets, b.row_indices,
                                           b.block_perm, z.numel(), z, act)


def _tail_values() -> torch.Tensor:
    """Every region of the activations: a dense grid over [-30, 30] (GELU's switch to exactly x / -0 near |x| = 5.5,
    SiLU's and tanh-GELU's exp near under/overflow), exact zeros of both signs, tiny and huge magnitudes."""
    grid = torch.linspace(-30.0, 30.0, 6001, dtype=torch.float64)
    extra = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e-7, -1e-7, 0.5, -0.5, 88.5, -88.5, 89.5, -89.5, 150.0, -150.0,
                          1e20, -1e20], dtype=torch.float64)
    return torch.cat([grid, extra])


@pytest.mark.parametrize("fmt", ["balanced", "bsr"])
@pytest.mark.parametrize("dtype", VECTOR_DTYPES)
@pytest.mark.parametrize("T", slow_except(TOKENS, [1, 7]))  # make test-fast: the decode path and a partial tile
@pytest.mark.parametrize("act", NONLINEAR)
def test_tails_and_zeros(isa: str, act: str, T: int, dtype: torch.dtype, fmt: str) -> None:
    """Pre-activations set exactly (through the bias) across the tails: ours vs act(float64 z)."""
    z = _tail_values().to(dtype)
    ours = _selected(fmt, z, T, act)
    ref = reference.activation(z.double(), act).expand(T, -1)
    dense = reference.activation(z, act).expand(T, -1)
    # The rule scales its floor by the largest |ref|: check each magnitude range on its own, so that the small
    # values of the tails are held to their own scale rather than to 1e20's.
    for lo, hi in ((0.0, 1.0), (1.0, 30.0), (30.0, float("inf"))):
        sel = (z.double().abs() >= lo) & (z.double().abs() <= hi)
        what = f"{fmt} {isa} {act} {dtype} T={T} |z| in [{lo}, {hi}]"
        assert_close_to_ref(ours[:, sel], ref[:, sel], dense[:, sel], what, k=1)
    # Exact zeros stay zeros (no spurious ulps from the polynomial).
    zero = z == 0
    assert (ours[:, zero] == 0).all(), f"{fmt} {isa} {act}: act(0) != 0"


@pytest.mark.parametrize("fmt", ["balanced", "bsr"])
@pytest.mark.parametrize("dtype", VECTOR_DTYPES)
@pytest.mark.parametrize("T", [1, 7, 20])
@pytest.mark.parametrize("act", NONLINEAR)
def test_nan_inf_like_torch(isa: str, act: str, T: int, dtype: torch.dtype, fmt: str) -> None:
    """NaN and +-Inf pre-activations give exactly what torch.nn.functional gives on the float64 dense result
    (gelu(+inf) = inf, gelu(-inf) = nan, silu(-inf) = nan, relu(nan) = nan, ...); finite neighbours unaffected."""
    specials = torch.tensor([float("inf"), float("-inf"), float("nan"), 1.0, -1.0, 0.0] * 3, dtype=torch.float64)
    ours = _selected(fmt, specials.to(dtype), T, act).double()
    ref = reference.activation(specials, act).to(dtype).double().expand(T, -1)
    assert torch.equal(torch.isnan(ours), torch.isnan(ref)), f"{fmt} {isa} {act}: NaN pattern {ours[0]} vs {ref[0]}"
    inf = torch.isinf(ref)
    assert torch.equal(ours[inf], ref[inf]) and torch.equal(torch.isinf(ours), inf), f"{fmt} {isa} {act}: {ours[0]}"


@pytest.mark.parametrize("dtype", VECTOR_DTYPES)
@pytest.mark.parametrize("T", TOKENS)
def test_random_layer(isa: str, T: int, dtype: torch.dtype, make_balanced) -> None:
    """A real layer (3 rows of registers wide and a ragged tail: out = 53) with large pre-activations (|z| up to
    ~30) for every activation, with and without bias."""
    gen = torch.Generator().manual_seed(1000 + T)
    out, inn, bank, keep = 53, 96, 32, 8
    w = make_balanced(out, inn, bank, keep, dtype=dtype, seed=gen)
    x = (4 * torch.randn(T, inn, generator=gen)).to(dtype)
    Wd = w.to_dense().to(dtype)
    for act in NONLINEAR:
        for bias in (None, (10 * torch.randn(out, generator=gen)).to(dtype)):
            ours = torch.ops.sparsekern.balanced_linear(x, w.values, w.indices, bank, bias, act)
            ref = reference.linear(x, w, bias, act)
            dense = reference.activation(torch.nn.functional.linear(x, Wd, bias), act)
            assert_close_to_ref(ours, ref, dense, f"{isa} {act} {dtype} T={T} bias={bias is not None}", k=inn)
