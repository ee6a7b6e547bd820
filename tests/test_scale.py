"""Index and offset arithmetic beyond 2^31 elements, built cheaply, at every ISA level.

Tested:
* logical weights of more than 2^32 entries (70001 x 70003 BSR with a handful of blocks, including the ragged
  last one; a 36000 x 60000 balanced weight, bank 1000): every op and autograd against float64 references computed from
  the stored blocks only (a dense copy would need 20 GB);
* activations and gradients whose row stride exceeds 2^31 elements (two rows 8 GiB apart in a sparse file
  mapped into memory: only the touched pages cost anything), so ``t * ld`` must be 64-bit; and BSR values whose
  block stride exceeds 2^31 elements (``p * block_stride``), passed straight to the op;
* the sizes that are not supported end in a clear error: over 2^31-1 blocks (int32 offsets; C++ and Python),
  a block grid of over 2^31-1 block rows/columns (Python), bank > 32768 (int16 indices).

Not tested for lack of memory: outputs of over 2^31 elements (T * out_features, e.g. 4 GiB in bf16). Their
offsets, ``(t0 + t) * out + o``, are computed in int64 in every kernel (reviewed).
"""

from __future__ import annotations

import os

import pytest
import torch

import sparse
from sparse import BalancedSparseWeight, BlockSparseWeight, reference
from sparse._ext import available
from tests import _reliab as R
from tests import helpers as H

pytestmark = pytest.mark.skipif(not available(), reason="sparse._C not built")

OPS = torch.ops.sparsekern if available() else None
BIG_STRIDE = 2**31 + 64  # elements between two rows (or two blocks)


def _close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """|got - want| <= 1e-5 (1 + max |want|), want being float64. Not helpers.assert_close_to_ref: its bound is
    relative to dense torch's error on the same data, and these weights have no dense copy (one would need 20 GB)."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    tol = 1e-5 * (1 + want.abs().max().item())
    err = (got.double() - want).abs().max().item() if want.numel() else 0.0
    assert err <= tol, f"{what}: error {err:.3e} > {tol:.3e}"


def test_block_sparse_weight_of_five_billion_entries():
    out, inn, (bo, bi) = 70001, 70003, (7, 5)
    n_brow, n_bcol = -(-out // bo), -(-inn // bi)
    assert out * inn > 2**32
    # (block row, block col): the corners (the last ones ragged in both directions) and the middle
    coords = [(0, 0), (0, n_bcol - 1), (5000, 7000), (n_brow - 1, 0), (n_brow - 1, n_bcol - 1)]
    rows = torch.tensor([r for r, _ in coords])
    row_offsets = torch.zeros(n_brow + 1, dtype=torch.int32)
    row_offsets[1:] = torch.cumsum(torch.bincount(rows, minlength=n_brow), 0)
    col_indices = torch.tensor([c for _, c in coords], dtype=torch.int32)
    values = H.randn((len(coords), bo, bi), torch.float32, 1)
    w = BlockSparseWeight(values, row_offsets, col_indices, (out, inn))
    x, g = H.randn((3, inn), torch.float32, 2), H.randn((3, out), torch.float32, 3)
    y_ref = R.bsr_forward_raw(x, w.values, w.row_offsets, w.col_indices, out)
    gi_ref = R.bsr_grad_input_raw(g, w.values, w.col_offsets, w.row_indices, w.block_perm, inn)
    sd_ref = R.bsr_sddmm_raw(g, x, w.values, w.row_offsets, w.col_indices)
    assert y_ref[:, -1].abs().sum() > 0 and gi_ref[:, -1].abs().sum() > 0  # the ragged corner is really used
    for level in R.isa_levels():
        with R.isa(level):
            _close(sparse.linear(x, w), y_ref, f"forward [{level}]")
            _close(sparse.linear_grad_input(g, w), gi_ref, f"grad_input [{level}]")
            _close(sparse.sddmm(g, x, w), sd_ref, f"sddmm [{level}]")
            v = w.values.detach().clone(memory_format=torch.preserve_format).requires_grad_(True)
            xa = x.clone().requires_grad_(True)
            sparse.linear(xa, R.with_values(w, v)).backward(g)
            _close(xa.grad, gi_ref, f"autograd x [{level}]")
            _close(v.grad, sd_ref, f"autograd values [{level}]")


def test_balanced_weight_of_two_billion_entries():
    out, inn, bank, keep = 36000, 60000, 1000, 1  # int16 indices, ragged last bank of 0.6k
    assert out * inn > 2**31
    n_banks = -(-inn // bank)
    g_ = torch.Generator().manual_seed(4)
    values = torch.randn(out, n_banks, keep, generator=g_)
    width = torch.full((n_banks,), bank)
    width[-1] = inn - (n_banks - 1) * bank
    indices = (torch.rand(out, n_banks, keep, generator=g_) * width[None, :, None]).to(torch.int16)
    w = BalancedSparseWeight(values, indices, bank, inn)
    x, g = H.randn((2, inn), torch.float32, 5), H.randn((2, out), torch.float32, 6)
    y_ref = R.balanced_forward_raw(x, values, indices, bank)
    gi_ref = R.balanced_grad_input_raw(g, values, indices, bank, inn)
    sd_ref = R.balanced_sddmm_raw(g, x, indices, bank)
    for level in R.isa_levels():
        with R.isa(level):
            _close(sparse.linear(x, w), y_ref, f"forward [{level}]")
            _close(sparse.linear_grad_input(g, w), gi_ref, f"grad_input [{level}]")
            _close(sparse.sddmm(g, x, w), sd_ref, f"sddmm [{level}]")


def _far_apart_rows(tmp_path, rows: torch.Tensor, stride: int) -> torch.Tensor:
    """``rows`` [n, k] as a view whose rows lie ``stride`` elements apart, backed by a sparse file."""
    n, k = rows.shape
    numel = (n - 1) * stride + k
    path = os.path.join(tmp_path, f"far-{n}-{k}-{rows.dtype}.bin")
    with open(path, "wb") as f:
        f.truncate(numel * rows.element_size())
    storage = torch.from_file(path, shared=True, size=numel, dtype=rows.dtype)
    os.remove(path)  # the mapping keeps the pages; nothing is left on disk
    view = storage.as_strided((n, k), (stride, 1))
    view.copy_(rows)
    return view


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_row_stride_beyond_2_to_31(tmp_path, dtype):
    """x and grad_out rows 2^31+64 elements apart give exactly the results of their contiguous copies."""
    weights = [H.make_bsr(48, 40, (16, 8), density=0.6, dtype=dtype, seed=7),
               H.make_balanced(24, 40, 8, 3, dtype=dtype, seed=8)]
    for w in weights:
        out, inn = w.shape
        x, g = H.randn((2, inn), dtype, 9), H.randn((2, out), dtype, 10)
        xf, gf = _far_apart_rows(tmp_path, x, BIG_STRIDE), _far_apart_rows(tmp_path, g, BIG_STRIDE)
        assert xf.stride(0) > 2**31 and torch.equal(xf, x)
        for level in R.isa_levels():
            with R.isa(level):
                for act in ("none", "gelu"):
                    assert torch.equal(sparse.linear(xf, w, None, act), sparse.linear(x, w, None, act)), level
                assert torch.equal(sparse.linear_grad_input(gf, w), sparse.linear_grad_input(g, w)), level
                assert torch.equal(sparse.sddmm(gf, xf, w), sparse.sddmm(g, x, w)), level
                if dtype == torch.float32:  # (the contiguous path itself is held to the reference elsewhere)
                    _close(sparse.linear(xf, w), reference.linear(x, w), f"forward [{level}]")


def test_block_stride_beyond_2_to_31(tmp_path):
    """BSR values whose blocks lie 2^31+64 elements apart, passed to the ops directly."""
    w = H.make_bsr(24, 24, (8, 8), density=0.5, dtype=torch.float32, seed=11)
    assert w.nnz_blocks >= 2
    nnz, bo, bi = w.values.shape
    flat = w.values.transpose(1, 2).reshape(nnz, bo * bi)  # each block input-major, as the kernels store it
    far = _far_apart_rows(tmp_path, flat, BIG_STRIDE).as_strided((nnz, bo, bi), (BIG_STRIDE, 1, bo))
    assert torch.equal(far, w.values)
    x, g = H.randn((5, 24), torch.float32, 12), H.randn((5, 24), torch.float32, 13)
    meta = (w.row_offsets, w.col_indices, w.col_offsets, w.row_indices, w.block_perm)
    for level in R.isa_levels():
        with R.isa(level):
            _close(OPS.bsr_linear(x, far, *meta, 24, None, "none"), reference.linear(x, w), f"forward [{level}]")
            _close(OPS.bsr_linear_grad_input(g, far, w.col_offsets, w.row_indices, w.block_perm, 24),
                   reference.linear_grad_input(g, w), f"grad_input [{level}]")
            _close(OPS.bsr_sddmm(g, x, far, w.row_offsets, w.col_indices), reference.sddmm(g, x, w),
                   f"sddmm [{level}]")


def test_unsupported_sizes_are_clear_errors():
    one = torch.ones(1, 1, 1)
    many = one.expand(2**31, 1, 1)  # 2^31 blocks, no memory
    ro, ci = torch.tensor([0, 1], dtype=torch.int32), torch.tensor([0], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="2\\^31-1 blocks"):
        OPS.bsr_linear(torch.ones(1, 1), many, ro, ci, ro, ci, ci, 1, None, "none")
    with pytest.raises(ValueError, match="blocks are supported"):
        BlockSparseWeight(many, ro, ci, (1, 1))
    with pytest.raises(ValueError, match="int32 indices"):
        BlockSparseWeight(one, ro, ci, (1, 2**31 + 5))
    with pytest.raises(ValueError, match="bank must be <= 32768"):
        BalancedSparseWeight.from_dense(torch.ones(1, 40000), bank=40000, keep=1)
