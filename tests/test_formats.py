"""The weight formats: construction, round trips, pattern choice and validation of malformed data."""

import pytest
import torch

from sparse import BalancedSparseWeight, BlockSparseWeight
from tests.helpers import make_bsr

torch.manual_seed(0)


def _expected_block_mask(W, bo, bi, n_keep):
    """The n_keep blocks of largest L2 norm (ties by position), computed independently of the format."""
    out, inn = W.shape
    n_brow, n_bcol = -(-out // bo), -(-inn // bi)
    norms = []
    for r in range(n_brow):
        for c in range(n_bcol):
            norms.append((-W[r * bo:(r + 1) * bo, c * bi:(c + 1) * bi].double().pow(2).sum().item(), r, c))
    kept = sorted(norms)[:n_keep]
    mask = torch.zeros(out, inn, dtype=torch.bool)
    for _, r, c in kept:
        mask[r * bo:(r + 1) * bo, c * bi:(c + 1) * bi] = True
    return mask


@pytest.mark.parametrize("shape,block", [((64, 96), 32), ((100, 70), 16), ((30, 45), (8, 4)), ((33, 17), (32, 1)),
                                         ((17, 40), (1, 32)), ((9, 9), 9)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
def test_block_from_dense_keeps_largest_blocks(shape, block, sparsity):
    W = torch.randn(*shape)
    w = BlockSparseWeight.from_dense(W, block=block, sparsity=sparsity)
    bo, bi = (block, block) if isinstance(block, int) else block
    n_blocks = (-(-shape[0] // bo)) * (-(-shape[1] // bi))
    n_keep = n_blocks - int(sparsity * n_blocks + 1e-9)
    assert w.nnz_blocks == n_keep
    mask = _expected_block_mask(W, bo, bi, n_keep)
    torch.testing.assert_close(w.to_dense(), W * mask, rtol=0, atol=0)
    assert w.values.transpose(1, 2).is_contiguous()
    w.validate()


def test_block_ties_are_deterministic():
    W = torch.ones(64, 64)
    a = BlockSparseWeight.from_dense(W, block=16, sparsity=0.5)
    b = BlockSparseWeight.from_dense(W.clone(), block=16, sparsity=0.5)
    assert torch.equal(a.col_indices, b.col_indices) and torch.equal(a.row_offsets, b.row_offsets)
    # the first blocks in row-major order win ties
    assert a.to_dense()[:32].eq(1).all() and a.to_dense()[32:].eq(0).all()


def test_block_masks_element_and_grid():
    W = torch.randn(40, 48)
    grid = torch.zeros(3, 3, dtype=torch.bool)
    grid[0, 1] = grid[2, 2] = True
    w = BlockSparseWeight.from_dense(W, block=16, mask=grid)
    expect = torch.zeros_like(W)
    expect[0:16, 16:32] = W[0:16, 16:32]
    expect[32:40, 32:48] = W[32:40, 32:48]
    assert torch.equal(w.to_dense(), expect)
    elem = torch.rand(40, 48) > 0.7
    w2 = BlockSparseWeight.from_dense(W, block=8, mask=elem)
    assert torch.equal(w2.to_dense(), W * elem)


def test_block_transposed_metadata():
    W = torch.randn(96, 80)
    w = BlockSparseWeight.from_dense(W, block=16, sparsity=0.6)
    dense_blocks = w.to_dense().reshape(6, 16, 5, 16).permute(2, 0, 1, 3)  # [col, row, bo, bi]
    for c in range(5):
        for q in range(w.col_offsets[c], w.col_offsets[c + 1]):
            r = w.row_indices[q].item()
            assert torch.equal(w.values[w.block_perm[q]], dense_blocks[c, r])
        rows = w.row_indices[w.col_offsets[c]:w.col_offsets[c + 1]]
        assert (rows[1:] > rows[:-1]).all()


def test_block_all_zero_and_dense_and_empty_rows():
    W = torch.randn(48, 64)
    none = BlockSparseWeight.from_dense(W, block=16, mask=torch.zeros(3, 4, dtype=torch.bool))
    assert none.nnz_blocks == 0 and none.to_dense().eq(0).all() and none.sparsity == 1.0
    full = BlockSparseWeight.from_dense(W, block=16, sparsity=0.0)
    assert torch.equal(full.to_dense(), W) and full.sparsity == 0.0
    grid = torch.ones(3, 4, dtype=torch.bool)
    grid[1] = False
    rows = BlockSparseWeight.from_dense(W, block=16, mask=grid)
    assert rows.row_offsets.tolist() == [0, 4, 4, 8]


def test_block_sparse_bsr_round_trip():
    W = torch.randn(64, 96)
    w = BlockSparseWeight.from_dense(W, block=32, sparsity=0.5)
    t = w.to_sparse_bsr()
    assert t.layout == torch.sparse_bsr
    torch.testing.assert_close(t.to_dense(), w.to_dense(), rtol=0, atol=0)
    back = BlockSparseWeight.from_sparse_bsr(t)
    assert torch.equal(back.to_dense(), w.to_dense())
    ragged = BlockSparseWeight.from_dense(torch.randn(70, 96), block=32, sparsity=0.5)
    with pytest.raises(ValueError, match="divide"):
        ragged.to_sparse_bsr()


def test_block_to_dtype_keeps_kernel_layout_and_properties():
    w = BlockSparseWeight.from_dense(torch.randn(64, 64), block=16, sparsity=0.75)
    b = w.to(dtype=torch.bfloat16)
    assert b.dtype == torch.bfloat16 and b.values.stride() == w.values.stride()
    assert w.nbytes == w.values.numel() * 4 + 4 * sum(
        t.numel() for t in (w.row_offsets, w.col_indices, w.col_offsets, w.row_indices, w.block_perm))
    assert "block=(16, 16)" in repr(w) and "sparsity=0.750" in repr(w)
    assert w.shape == (64, 64) and w.sparsity == 0.75


@pytest.mark.parametrize("bank,keep,inn", [(4, 2, 16), (32, 16, 96), (32, 4, 70), (8, 3, 21), (300, 7, 610)])
def test_balanced_from_dense_keeps_top_k_per_bank(bank, keep, inn):
    W = torch.randn(12, inn)
    w = BalancedSparseWeight.from_dense(W, bank=bank, keep=keep)
    assert w.indices.dtype == (torch.uint8 if bank <= 256 else torch.int16)
    dense = w.to_dense()
    mask = w.mask()
    assert torch.equal(dense, W * mask)
    for b in range(w.n_banks):
        cols = slice(b * bank, min((b + 1) * bank, inn))
        assert (mask[:, cols].sum(1) == keep).all()
        kth = W[:, cols].abs().topk(keep, dim=1).values[:, -1:]
        kept_min = torch.where(mask[:, cols], W[:, cols].abs(), torch.inf).min(1, keepdim=True).values
        assert (kept_min >= kth).all()
    w.validate()


def test_balanced_mask_argument():
    W = torch.randn(8, 16)
    m = torch.zeros(8, 16, dtype=torch.bool)
    m[:, 0::2] = True
    w = BalancedSparseWeight.from_dense(W, bank=4, keep=2, mask=m)
    assert torch.equal(w.to_dense(), W * m)
    m[0, 0] = False
    with pytest.raises(ValueError, match="row 0, bank 0 keeps 1"):
        BalancedSparseWeight.from_dense(W, bank=4, keep=2, mask=m)


@pytest.mark.parametrize(
    "field,mutate,match",
    [
        ("col_indices", lambda t: t.fill_(7), "out of range"),
        ("col_indices", lambda t: t.__setitem__(0, -1), "out of range"),
        (
            "col_indices",
            lambda t: t.__setitem__(slice(0, 2), torch.tensor([1, 0], dtype=torch.int32)),
            "strictly increasing",
        ),
        (
            "col_indices",
            lambda t: t.__setitem__(slice(0, 2), torch.tensor([1, 1], dtype=torch.int32)),
            "strictly increasing",
        ),
        ("row_offsets", lambda t: t[:-1], "entries"),
        ("row_offsets", lambda t: t.__setitem__(-1, 99), "end at nnz_blocks"),
        ("row_offsets", lambda t: t.__setitem__(1, 9), "non-decreasing"),
        ("row_offsets", lambda t: t.long(), "int32"),
    ],
)
def test_block_validate_rejects_malformed(field, mutate, match):
    w = make_bsr(64, 64, 16, sparsity=0.5)
    ro, ci = w.row_offsets.clone(), w.col_indices.clone()
    # make row 0 hold at least two blocks for the ordering cases
    ro = torch.tensor([0, 2, 4, 6, 8], dtype=torch.int32)
    ci = torch.tensor([0, 1, 0, 1, 2, 3, 2, 3], dtype=torch.int32)
    values = torch.randn(8, 16, 16)
    tensors = {"row_offsets": ro, "col_indices": ci}
    res = mutate(tensors[field])
    if res is not None:
        tensors[field] = res
    with pytest.raises((ValueError, TypeError), match=match):
        BlockSparseWeight(values, tensors["row_offsets"], tensors["col_indices"], (64, 64))


def test_block_validate_rejects_inconsistent_transposed_metadata():
    w = make_bsr(64, 64, 16, sparsity=0.5)
    with pytest.raises(ValueError, match="block_perm does not match"):
        BlockSparseWeight(w.values, w.row_offsets, w.col_indices, w.shape, col_offsets=w.col_offsets,
                          row_indices=w.row_indices, block_perm=w.block_perm.flip(0))


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(block=16, sparsity=1.0), ValueError, r"sparsity must be in \[0, 1\)"),
    (dict(block=16, sparsity=-0.1), ValueError, r"sparsity must be in \[0, 1\)"),
    (dict(block=128, sparsity=0.5), ValueError, "larger than the matrix"),
    (dict(block=(0, 4), sparsity=0.5), ValueError, "positive"),
    (dict(block=16), ValueError, "exactly one of"),
    (dict(block="16", sparsity=0.5), TypeError, "block must be"),
    (dict(block=16, mask=torch.ones(3, 3, dtype=torch.bool)), ValueError, "mask must have"),
])
def test_block_from_dense_bad_arguments(kwargs, err, match):
    with pytest.raises(err, match=match):
        BlockSparseWeight.from_dense(torch.randn(64, 64), **kwargs)


def test_from_dense_bad_matrix():
    with pytest.raises(ValueError, match="2-D"):
        BlockSparseWeight.from_dense(torch.randn(4, 4, 4), block=2, sparsity=0.5)
    with pytest.raises(TypeError, match="float32"):
        BalancedSparseWeight.from_dense(torch.ones(4, 8, dtype=torch.int64), bank=4, keep=2)


@pytest.mark.parametrize("kwargs,match", [
    (dict(bank=6, keep=7), r"keep must be in \[1, 6\]"),
    (dict(bank=0, keep=1), "bank must be in"),
    (dict(bank=8, keep=3), r"keep must be in \[1, 2\]"),  # 18 columns: last bank is 2 wide
    (dict(bank=40000, keep=1), "bank must be in"),
])
def test_balanced_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BalancedSparseWeight.from_dense(torch.randn(4, 18), **kwargs)


@pytest.mark.parametrize("mutate,match", [
    (lambda i: i.__setitem__((0, 0, 0), 200), "out of range"),
    (lambda i: i.__setitem__((0, 0, slice(None)), torch.tensor([3, 1], dtype=torch.uint8)), "strictly increasing"),
    (lambda i: i.__setitem__((0, 0, slice(None)), torch.tensor([2, 2], dtype=torch.uint8)), "strictly increasing"),
])
def test_balanced_validate_rejects_malformed(mutate, match):
    w = BalancedSparseWeight.from_dense(torch.randn(4, 16), bank=4, keep=2)
    idx = w.indices.clone()
    mutate(idx)
    with pytest.raises(ValueError, match=match):
        BalancedSparseWeight(w.values, idx, 4, 16)
    with pytest.raises(TypeError, match="uint8"):
        BalancedSparseWeight(w.values, w.indices.to(torch.int16), 4, 16)
    with pytest.raises(ValueError, match="banks"):
        BalancedSparseWeight(w.values, w.indices, 4, 24)
