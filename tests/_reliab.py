"""Shared helpers of the reliability tests (property, fuzz, numerics, threads, scale, memory): ISA levels and
thread counts, hypothesis profiles, references from raw metadata, memory layouts.

The tolerance rule, the random weights and data and the dtype / activation grids are tests/helpers.py's (these
tests use its rule with ``terms=``: a floor relative to the sums of absolute terms)."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, List

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, settings

from sparse import BalancedSparseWeight, BlockSparseWeight, reference
from sparse import activations as _activations
from sparse._ext import available, require
from tests.helpers import ACTS

# sup |act''(z)|: how far a rounding of z moves act'(z) (gelu: 2 phi(0) = 0.798; silu: 1/2; relu: 0 off zero),
# from the activation table.
ACT_CURVATURE = {a.name: a.curvature for a in _activations.TABLE}
assert set(ACT_CURVATURE) == set(ACTS), "ACT_CURVATURE must name every activation of sparse.ops.ACTIVATIONS"

# "ci" is the bounded profile of `make test`; "long" (HYPOTHESIS_PROFILE=long, `make fuzz`) runs
# SPARSEKERN_FUZZ_EXAMPLES examples per test with fresh randomness each run.
settings.register_profile(
    "ci", deadline=None, derandomize=True, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
settings.register_profile(
    "long", deadline=None, print_blob=True, max_examples=int(os.environ.get("SPARSEKERN_FUZZ_EXAMPLES", "2000")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
LONG = os.environ.get("HYPOTHESIS_PROFILE") == "long"


def profile(ci_examples: int) -> settings:
    """Settings for one property test: ``ci_examples`` examples under the ci profile, the long profile's count
    under ``make fuzz``. Applied per test so that other test files keep their own hypothesis settings."""
    if LONG:
        return settings(settings.get_profile("long"))
    return settings(settings.get_profile("ci"), max_examples=ci_examples)


def isa_levels() -> List[str]:
    """Every CPU code path this machine (capped by SPARSEKERN_ISA, if set) can run, slowest first; none without
    the extension."""
    if not available():
        return []
    order = ["portable", "avx2", "avx512"]
    best = require().best_isa()
    return order[: order.index(best) + 1]


@contextlib.contextmanager
def isa(level: str) -> Iterator[None]:
    """Caps the CPU kernels at ``level`` for the duration of the block."""
    c = require()
    c.set_isa(level)
    try:
        yield
    finally:
        c.set_isa("auto")


@contextlib.contextmanager
def num_threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def dense(weight) -> torch.Tensor:
    return weight.to_dense().detach()


def structural_mask(weight) -> torch.Tensor:
    """Bool [out, in]: the positions the sparse product reads (every entry of a kept block, zeros included)."""
    if isinstance(weight, BalancedSparseWeight):
        return weight.mask()
    ones = torch.ones_like(weight.values, dtype=torch.float64)
    w = BlockSparseWeight(ones, weight.row_offsets, weight.col_indices, weight.shape,
                          col_offsets=weight.col_offsets, row_indices=weight.row_indices,
                          block_perm=weight.block_perm, validate=False)
    return w.to_dense() != 0


def masked_matmul(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """float64 sum_k a[t, k] b[o, k] over the k where mask[o, k]; exact IEEE NaN/Inf semantics (no BLAS, which
    may skip zeros): [T, K] x [O, K] -> [T, O]."""
    prod = a.double()[:, None, :] * b.double()[None, :, :]
    return torch.where(mask[None], prod, torch.zeros((), dtype=torch.float64)).sum(-1)


# ---- references from raw metadata (no canonical form assumed: unsorted or duplicated entries add up) ----------

def bsr_forward_raw(x, values, row_offsets, col_indices, out: int) -> torch.Tensor:
    """y = x W^T for W given as a list of (block row, block col, block) triples, float64, ragged edges cut."""
    x = x.double()
    T, inn = x.shape
    _, bo, bi = values.shape
    y = torch.zeros(T, out, dtype=torch.float64)
    ro = row_offsets.tolist()
    for r in range(len(ro) - 1):
        o0, o1 = r * bo, min(r * bo + bo, out)
        for p in range(ro[r], ro[r + 1]):
            i0 = int(col_indices[p]) * bi
            i1 = min(i0 + bi, inn)
            y[:, o0:o1] += x[:, i0:i1] @ values[p].double()[: o1 - o0, : i1 - i0].t()
    return y


def bsr_grad_input_raw(dy, values, col_offsets, row_indices, block_perm, inn: int) -> torch.Tensor:
    dy = dy.double()
    T, out = dy.shape
    _, bo, bi = values.shape
    dx = torch.zeros(T, inn, dtype=torch.float64)
    co = col_offsets.tolist()
    for c in range(len(co) - 1):
        i0, i1 = c * bi, min(c * bi + bi, inn)
        for q in range(co[c], co[c + 1]):
            o0 = int(row_indices[q]) * bo
            o1 = min(o0 + bo, out)
            dx[:, i0:i1] += dy[:, o0:o1] @ values[int(block_perm[q])].double()[: o1 - o0, : i1 - i0]
    return dx


def bsr_sddmm_raw(dy, x, values, row_offsets, col_indices) -> torch.Tensor:
    dy, x = dy.double(), x.double()
    out, inn = dy.shape[1], x.shape[1]
    _, bo, bi = values.shape
    dw = torch.zeros(values.shape, dtype=torch.float64)
    ro = row_offsets.tolist()
    for r in range(len(ro) - 1):
        o0, o1 = r * bo, min(r * bo + bo, out)
        for p in range(ro[r], ro[r + 1]):
            i0 = int(col_indices[p]) * bi
            i1 = min(i0 + bi, inn)
            dw[p, : o1 - o0, : i1 - i0] = dy[:, o0:o1].t() @ x[:, i0:i1]
    return dw


def _balanced_columns(indices: torch.Tensor, bank: int) -> torch.Tensor:
    out, n_banks, keep = indices.shape
    base = (torch.arange(n_banks) * bank)[None, :, None]
    return (base + indices.long()).reshape(out, n_banks * keep)


def balanced_forward_raw(x, values, indices, bank: int) -> torch.Tensor:
    cols = _balanced_columns(indices, bank)
    out = values.shape[0]
    return (x.double()[:, cols] * values.double().reshape(out, -1)[None]).sum(-1)


def balanced_grad_input_raw(dy, values, indices, bank: int, inn: int) -> torch.Tensor:
    cols = _balanced_columns(indices, bank)
    T, out = dy.shape
    contrib = dy.double()[:, :, None] * values.double().reshape(out, -1)[None]
    return torch.zeros(T, inn, dtype=torch.float64).index_add_(1, cols.flatten(), contrib.reshape(T, cols.numel()))


def balanced_sddmm_raw(dy, x, indices, bank: int) -> torch.Tensor:
    cols = _balanced_columns(indices, bank)
    dw = torch.einsum("to,toj->oj", dy.double(), x.double()[:, cols])
    return dw.reshape(indices.shape)


def gather_pattern(weight, full: torch.Tensor) -> torch.Tensor:
    """The entries of a dense [out, in] matrix at the weight's stored positions, shaped like weight.values
    (entries of ragged edge blocks outside the matrix are zero)."""
    if isinstance(weight, BalancedSparseWeight):
        out, inn = weight.shape
        padded = F.pad(full, (0, weight.n_banks * weight.bank - inn)).reshape(out, weight.n_banks, weight.bank)
        return torch.gather(padded, -1, weight.indices.long())
    bo, bi = weight.block
    blocks = BlockSparseWeight._blocked(full, bo, bi)
    return blocks[weight._block_rows(), weight.col_indices.long()]


def with_values(weight, values: torch.Tensor):
    """The same pattern holding other values (no copy when BSR values already have the kernel layout, so a leaf
    that requires grad stays the weight's values)."""
    if isinstance(weight, BalancedSparseWeight):
        return BalancedSparseWeight(values, weight.indices, weight.bank, weight.shape[1], validate=False)
    return BlockSparseWeight(values, weight.row_offsets, weight.col_indices, weight.shape,
                             col_offsets=weight.col_offsets, row_indices=weight.row_indices,
                             block_perm=weight.block_perm, validate=False)


def layout(t: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values as ``t`` in another memory layout: 'contiguous', 'row_strided' (a column slice of a
    wider buffer: rows padded, features contiguous), 'feature_strided' (every other element) or 'transposed'."""
    if kind == "contiguous":
        return t.contiguous()
    if kind == "row_strided":
        wide = torch.full((*t.shape[:-1], t.shape[-1] + 3), float("nan"), dtype=t.dtype)
        wide[..., : t.shape[-1]] = t
        return wide[..., : t.shape[-1]]
    if kind == "feature_strided":
        wide = torch.full((*t.shape[:-1], 2 * t.shape[-1]), float("nan"), dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    if kind == "transposed":
        if t.dim() < 2:
            return t
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    raise ValueError(kind)


LAYOUTS = ("contiguous", "row_strided", "feature_strided", "transposed")


def act_grad(grad: torch.Tensor, z: torch.Tensor, act: str) -> torch.Tensor:
    """d act(z)/dz * grad in grad's dtype, through torch autograd."""
    z = z.detach().requires_grad_(True)
    (out,) = torch.autograd.grad(reference.activation(z, act), z, grad)
    return out

