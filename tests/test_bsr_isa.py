"""Block-sparse CPU ops on every code path this CPU can run (AVX-512, AVX2, portable), forced in turn, against the
float64 reference. Tolerance as in flash-attention: the error of ours is at most twice the error of dense torch
in the same dtype (F.linear / matmul on the densified weight), plus a tiny floor (tests/helpers.py KERNEL_FLOOR)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparse import reference
from sparse._ext import _C
from sparse.formats import BlockSparseWeight
from tests.helpers import ACTS, KERNEL_FLOOR, VECTOR_DTYPES, assert_close_to_ref, slow_except

# (out, in, block): shapes the block divides and ragged ones, the common square blocks, thin and odd blocks,
# blocks of 3 vectors; all at most 64 a side, so the vectorised kernels take every one of them.
CASES = [
    (96, 128, (32, 32)),
    (70, 75, (32, 32)),
    (50, 41, (16, 16)),
    (40, 36, (8, 8)),
    (130, 140, (64, 64)),
    (70, 33, (32, 1)),
    (9, 70, (1, 32)),
    (13, 11, (4, 4)),
    (45, 39, (5, 7)),
    (100, 50, (48, 16)),
    (40, 100, (16, 48)),
    (70, 300, (1, 1)),  # unstructured: the 1x1-block (CSR) kernels, X^T over several panels
    # vector blocks, the kernels of vec_avx512.cpp / vec_avx2.cpp: column vectors (V, 1) and row vectors (1, V)
    (70, 45, (4, 1)),
    (75, 40, (8, 1)),
    (45, 66, (16, 1)),
    (64, 37, (1, 4)),
    (37, 83, (1, 8)),
    (20, 90, (1, 16)),
]
TOKENS = (1, 7, 97)
# The forward's cases in make test-fast (the forward sweep is the slowest of this file on a busy machine): a ragged
# square block, a thin one, an odd one and a rectangular one.
FAST_FORWARD_CASES = [(70, 75, (32, 32)), (70, 33, (32, 1)), (45, 39, (5, 7)), (40, 100, (16, 48)), (70, 300, (1, 1)),
                      (75, 40, (8, 1)), (37, 83, (1, 8))]


def _tokens(T: int, n: int, dtype: torch.dtype, seed: int, strided: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if strided:  # rows further apart than their length: the kernels take X in place with its row stride
        return torch.randn(T, n + 5, generator=g).to(dtype)[:, 2 : n + 2]
    return torch.randn(T, n, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", VECTOR_DTYPES, ids=str)
@pytest.mark.parametrize("case", slow_except(CASES, FAST_FORWARD_CASES),
                         ids=lambda c: f"{c[0]}x{c[1]}-b{c[2][0]}x{c[2][1]}")
def test_forward(isa, dtype, case, make_bsr):
    out, inn, block = case
    w = make_bsr(out, inn, block, sparsity=0.4, dtype=dtype, seed=out * 7 + inn)
    Wd = w.to_dense()
    for i, T in enumerate(TOKENS):
        x = _tokens(T, inn, dtype, seed=T, strided=T == 7)
        for j, act in enumerate(ACTS):
            bias = torch.randn(out).to(dtype) if (i + j) % 2 == 0 else None
            y = torch.ops.sparsekern.bsr_linear(
                x, w.values, w.row_offsets, w.col_indices, w.col_offsets, w.row_indices, w.block_perm, out, bias, act
            )
            dense = reference.activation(F.linear(x, Wd, bias), act)
            assert_close_to_ref(y, reference.linear(x, w, bias, act), dense,
                                f"{isa} forward T={T} act={act} bias={bias is not None}", floor=KERNEL_FLOOR)


@pytest.mark.parametrize("dtype", VECTOR_DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}-b{c[2][0]}x{c[2][1]}")
def test_grad_input(isa, dtype, case, make_bsr):
    out, inn, block = case
    w = make_bsr(out, inn, block, sparsity=0.4, dtype=dtype, seed=out + inn)
    Wd = w.to_dense()
    for T in TOKENS:
        dy = _tokens(T, out, dtype, seed=100 + T, strided=T == 7)
        dx = torch.ops.sparsekern.bsr_linear_grad_input(dy, w.values, w.col_offsets, w.row_indices, w.block_perm, inn)
        assert_close_to_ref(dx, reference.linear_grad_input(dy, w), dy @ Wd, f"{isa} grad_input T={T}",
                            floor=KERNEL_FLOOR)


@pytest.mark.parametrize("dtype", VECTOR_DTYPES, ids=str)
@pytest.mark.parametrize("block", [(32, 32), (16, 16), (20, 48)], ids=lambda b: f"b{b[0]}x{b[1]}")
def test_grad_input_column_groups(isa, dtype, block, make_bsr):
    """dx is written a group of block columns at a time, over chunks of 512 tokens: many groups, empty columns
    inside a group, a ragged last column, more tokens than one chunk, and every thread count giving the same bits."""
    out, inn = 72, 1000
    w = make_bsr(out, inn, block, sparsity=0.7, dtype=dtype, seed=7)
    counts = (w.col_offsets[1:] - w.col_offsets[:-1]).tolist()
    assert 0 in counts[:-1] and max(counts) > 0, "the case needs empty and non-empty columns"
    dy = _tokens(600, out, dtype, seed=11, strided=True)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            runs.append(torch.ops.sparsekern.bsr_linear_grad_input(dy, w.values, w.col_offsets, w.row_indices,
                                                                   w.block_perm, inn))
    finally:
        torch.set_num_threads(threads)
    assert_close_to_ref(runs[0], reference.linear_grad_input(dy, w), dy @ w.to_dense(), f"{isa} grad_input {block}",
                        floor=KERNEL_FLOOR)
    assert all(torch.equal(r, runs[0]) for r in runs[1:]), "every thread count must give the same bits"


@pytest.mark.parametrize("dtype", VECTOR_DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}-b{c[2][0]}x{c[2][1]}")
def test_sddmm(isa, dtype, case, make_bsr):
    out, inn, block = case
    w = make_bsr(out, inn, block, sparsity=0.4, dtype=dtype, seed=3 * out + inn)
    bo, bi = block
    rows, cols = w._block_rows(), w.col_indices.long()
    inside = BlockSparseWeight._blocked(torch.ones(out, inn, dtype=torch.bool), bo, bi)[rows, cols]
    for T in TOKENS:
        dy = _tokens(T, out, dtype, seed=200 + T, strided=T == 7)
        x = _tokens(T, inn, dtype, seed=300 + T, strided=False)
        dw = torch.ops.sparsekern.bsr_sddmm(dy, x, w.values, w.row_offsets, w.col_indices)
        assert dw.stride() == w.values.stride(), "the gradient must come in the parameter's own layout"
        dense = BlockSparseWeight._blocked(dy.t() @ x, bo, bi)[rows, cols]
        assert_close_to_ref(dw, reference.sddmm(dy, x, w), dense, f"{isa} sddmm T={T}", floor=KERNEL_FLOOR)
        # Entries of ragged edge blocks outside the matrix: exactly zero, not merely small.
        assert torch.all(dw[~inside] == 0), f"{isa} sddmm T={T}: nonzero gradient outside the matrix"


@pytest.mark.parametrize("dtype", VECTOR_DTYPES, ids=str)
def test_other_layout_and_empty_rows(isa, dtype, make_bsr):
    """values in the logical (contiguous) layout take the portable kernels; rows and columns without any kept
    block still get the bias (forward) and zeros (grad_input)."""
    out, inn, block = 96, 96, (32, 32)
    mask = torch.tensor([[True, False, True], [False, False, False], [False, True, False]])
    w = make_bsr(out, inn, block, mask=mask, dtype=dtype)
    bias = torch.randn(out).to(dtype)
    x = torch.randn(7, inn).to(dtype)
    for values in (w.values, w.values.contiguous()):
        y = torch.ops.sparsekern.bsr_linear(
            x, values, w.row_offsets, w.col_indices, w.col_offsets, w.row_indices, w.block_perm, out, bias, "relu"
        )
        assert_close_to_ref(y, reference.linear(x, w, bias, "relu"), F.relu(F.linear(x, w.to_dense(), bias)),
                            f"{isa} forward", floor=KERNEL_FLOOR)
        dy = torch.randn(7, out).to(dtype)
        dx = torch.ops.sparsekern.bsr_linear_grad_input(dy, values, w.col_offsets, w.row_indices, w.block_perm, inn)
        assert_close_to_ref(dx, reference.linear_grad_input(dy, w), dy @ w.to_dense(), f"{isa} grad_input",
                            floor=KERNEL_FLOOR)


@pytest.mark.parametrize("dtype", VECTOR_DTYPES, ids=str)
def test_forward_never_reads_outside_the_matrix(isa, dtype, make_bsr):
    """The parts of ragged edge blocks outside the matrix may hold anything (here NaN): no kernel reads them into
    a result."""
    for out, inn, block in [(50, 41, (16, 16)), (70, 75, (32, 32)), (45, 39, (5, 7)), (70, 33, (32, 1)),
                            (9, 70, (1, 32)), (70, 45, (4, 1)), (75, 40, (8, 1)), (64, 37, (1, 4)), (37, 83, (1, 8)),
                            (45, 66, (16, 1))]:
        w = make_bsr(out, inn, block, sparsity=0.4, dtype=dtype, seed=out + 3 * inn)
        bo, bi = block
        rows, cols = w._block_rows(), w.col_indices.long()
        inside = BlockSparseWeight._blocked(torch.ones(out, inn, dtype=torch.bool), bo, bi)[rows, cols]
        ref = reference.linear(_tokens(19, inn, dtype, seed=5, strided=False), w, None, "none")
        w.values[~inside] = float("nan")
        x = _tokens(19, inn, dtype, seed=5, strided=False)
        y = torch.ops.sparsekern.bsr_linear(
            x, w.values, w.row_offsets, w.col_indices, w.col_offsets, w.row_indices, w.block_perm, out, None, "none"
        )
        w.values[~inside] = 0
        assert_close_to_ref(y, ref, F.linear(x, w.to_dense()),
                            f"{isa} forward {out}x{inn} block {block} with NaN outside", floor=KERNEL_FLOOR)


@pytest.mark.parametrize("dtype", VECTOR_DTYPES, ids=str)
def test_forward_high_sparsity_empty_rows_every_activation(isa, dtype, make_bsr):
    """95%-sparse 32x32 blocks: rows of 0, 1 and 2 blocks, the first and last block rows empty, a ragged last
    row and column. Empty rows give act(bias); the kernels start the accumulators from the bias. A weight without
    any block takes the same kernels (forward: act(bias); grad_input: zeros)."""
    out, inn = 300, 330  # 10 x 11 block rows/columns, both edges ragged
    mask = torch.zeros(10, 11, dtype=torch.bool)
    mask[1, 3] = mask[2, 0] = mask[2, 10] = mask[4, 7] = mask[5, 5] = mask[5, 6] = mask[8, 10] = True
    g = torch.Generator().manual_seed(11)
    w = make_bsr(out, inn, (32, 32), mask=mask, dtype=dtype, seed=g)
    empty = BlockSparseWeight.from_dense(w.to_dense(), (32, 32), mask=torch.zeros_like(mask))
    for T in (1, 13, 16):
        x = _tokens(T, inn, dtype, seed=40 + T, strided=T == 13)
        bias = torch.randn(out, generator=g).to(dtype)
        y = torch.ops.sparsekern.bsr_linear(
            x, empty.values, empty.row_offsets, empty.col_indices, empty.col_offsets, empty.row_indices,
            empty.block_perm, out, bias, "gelu"
        )
        ref = reference.activation(bias.double(), "gelu").expand(T, out)
        assert_close_to_ref(y, ref, reference.activation(bias, "gelu").expand(T, out), f"{isa} T={T} no blocks at all",
                            floor=KERNEL_FLOOR)
        dy = _tokens(T, out, dtype, seed=50 + T, strided=False)
        dx = torch.ops.sparsekern.bsr_linear_grad_input(dy, empty.values, empty.col_offsets, empty.row_indices,
                                                        empty.block_perm, inn)
        assert torch.equal(dx, torch.zeros(T, inn, dtype=dtype)), f"{isa} T={T} grad_input without blocks"
    Wd = w.to_dense()
    for T in (1, 13, 16):
        x = _tokens(T, inn, dtype, seed=40 + T, strided=T == 13)
        for act in ACTS:
            for bias in (torch.randn(out, generator=g).to(dtype), None):
                y = torch.ops.sparsekern.bsr_linear(
                    x, w.values, w.row_offsets, w.col_indices, w.col_offsets, w.row_indices, w.block_perm, out, bias,
                    act
                )
                dense = reference.activation(F.linear(x, Wd, bias), act)
                assert_close_to_ref(y, reference.linear(x, w, bias, act), dense,
                                    f"{isa} T={T} act={act} bias={bias is not None}", floor=KERNEL_FLOOR)


@pytest.mark.parametrize("dtype", VECTOR_DTYPES, ids=str)
def test_forward_panels_and_thread_splits(isa, dtype, make_bsr):
    """32x32 blocks over more than one 512 KiB panel of W, token tiles with a ragged last one; and a weight small
    enough for the threads to split the tokens instead of the block rows (T >= 32 per thread): every split gives
    bitwise the result of one thread (each output element is computed the same way by whichever thread)."""
    threads = torch.get_num_threads()
    # 33 x 33 blocks, 60% kept: over 1 MiB in either dtype
    big = make_bsr(1056, 1040, (32, 32), sparsity=0.4, dtype=dtype, seed=9)
    assert big.values.numel() * big.values.element_size() > 2 * 512 * 1024
    small = make_bsr(768, 768, (32, 32), sparsity=0.95, dtype=dtype, seed=1)
    try:
        for w, T in ((big, 37), (small, 37), (small, 133)):
            out, inn = w.shape
            x = _tokens(T, inn, dtype, seed=T, strided=True)
            bias = torch.randn(out).to(dtype)
            args = (x, w.values, w.row_offsets, w.col_indices, w.col_offsets, w.row_indices, w.block_perm, out, bias)
            torch.set_num_threads(1)
            y1 = torch.ops.sparsekern.bsr_linear(*args, "silu")
            for n in (2, 3):
                torch.set_num_threads(n)
                yn = torch.ops.sparsekern.bsr_linear(*args, "silu")
                assert torch.equal(yn, y1), f"{isa} {out}x{inn} T={T}: {n} threads differ from one"
            dense = reference.activation(F.linear(x, w.to_dense(), bias), "silu")
            assert_close_to_ref(y1, reference.linear(x, w, bias, "silu"), dense, f"{isa} {out}x{inn} T={T}",
                                floor=KERNEL_FLOOR)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.skipif(_C.best_isa() != "avx512", reason="the 16x16 float32 kernel is AVX-512 code")
@pytest.mark.parametrize("T", [37, 1000])
def test_forward_16x16_tiles_and_panels(T, make_bsr):
    """The AVX-512 float32 16x16 kernel: 16-token tiles and a ragged last tile, W slices of more than one panel
    (512 KiB of blocks), ragged edges. T = 37 packs X once per call, T = 1000 (over 2 MiB packed) per (panel,
    tile)."""
    out, inn = 1040, 520
    w = make_bsr(out, inn, (16, 16), sparsity=0.4, dtype=torch.float32, seed=T)
    assert w.values.shape[0] * 16 * 16 * 4 > 2 * 512 * 1024, "the weight must span more than one panel per thread"
    x = _tokens(T, inn, torch.float32, seed=T, strided=True)
    bias = torch.randn(out)
    _C.set_isa("avx512")
    try:
        y = torch.ops.sparsekern.bsr_linear(
            x, w.values, w.row_offsets, w.col_indices, w.col_offsets, w.row_indices, w.block_perm, out, bias, "gelu"
        )
    finally:
        _C.set_isa("auto")
    dense = reference.activation(F.linear(x, w.to_dense(), bias), "gelu")
    assert_close_to_ref(y, reference.linear(x, w, bias, "gelu"), dense, f"16x16 forward T={T}", floor=KERNEL_FLOOR)


@pytest.mark.parametrize("dtype", VECTOR_DTYPES, ids=str)
def test_unstructured_tiles_panels_and_threads(isa, dtype, make_bsr):
    """1x1 blocks (CSR): every token-tile width (1-8 vectors and the ragged ones), the gather path of T <= 4,
    more than one 64-token tile, rows without entries and rows of one entry, the three ops, and every thread
    count giving the same bits."""
    out, inn = 61, 700
    g = torch.Generator().manual_seed(5)
    mask = torch.rand(out, inn, generator=g) < 0.15
    mask[3] = False
    mask[7] = False
    mask[7, 650] = True
    w = make_bsr(out, inn, (1, 1), mask=mask, dtype=dtype, seed=6)
    Wd = w.to_dense()
    threads = torch.get_num_threads()
    try:
        for T in (1, 2, 4, 5, 9, 24, 57, 64, 65, 200):
            x = _tokens(T, inn, dtype, seed=T, strided=T % 2 == 1)
            dy = _tokens(T, out, dtype, seed=T + 1, strided=False)
            bias = torch.randn(out, generator=g).to(dtype)
            runs = []
            for n in (1, 2, 3):
                torch.set_num_threads(n)
                runs.append((
                    torch.ops.sparsekern.bsr_linear(x, w.values, w.row_offsets, w.col_indices, w.col_offsets,
                                                    w.row_indices, w.block_perm, out, bias, "gelu"),
                    torch.ops.sparsekern.bsr_linear_grad_input(dy, w.values, w.col_offsets, w.row_indices,
                                                               w.block_perm, inn),
                    torch.ops.sparsekern.bsr_sddmm(dy, x, w.values, w.row_offsets, w.col_indices)))
            for r in runs[1:]:
                assert all(torch.equal(a, b) for a, b in zip(r, runs[0])), f"{isa} T={T}: thread counts differ"
            y, dx, dw = runs[0]
            assert_close_to_ref(y, reference.linear(x, w, bias, "gelu"),
                                reference.activation(F.linear(x, Wd, bias), "gelu"), f"{isa} forward T={T}",
                                floor=KERNEL_FLOOR)
            assert_close_to_ref(dx, reference.linear_grad_input(dy, w), dy @ Wd, f"{isa} grad_input T={T}",
                                floor=KERNEL_FLOOR)
            dense = (dy.t() @ x)[mask].reshape(-1, 1, 1)
            assert_close_to_ref(dw, reference.sddmm(dy, x, w), dense, f"{isa} sddmm T={T}", floor=KERNEL_FLOOR)
    finally:
        torch.set_num_threads(threads)


VECTOR_BLOCKS = [(4, 1), (8, 1), (16, 1), (32, 1), (1, 4), (1, 8), (1, 16), (1, 32)]


@pytest.mark.parametrize("dtype", VECTOR_DTYPES, ids=str)
@pytest.mark.parametrize("block", VECTOR_BLOCKS, ids=lambda b: f"b{b[0]}x{b[1]}")
def test_vector_blocks_tiles_ragged_edges_and_threads(isa, dtype, block, make_bsr):
    """Column and row vectors: every token-tile width and a ragged last tile, more than one tile, more than one
    group of rows, both edges ragged (out and in not multiples of the block) with NaN in the parts of the edge
    blocks outside the matrix, empty rows, the forward (bias, activation) and the input gradient against the
    float64 reference, and every thread count giving the same bits (the forward may split tokens or rows)."""
    out, inn = 150, 141
    bo, bi = block
    g = torch.Generator().manual_seed(bo * 10 + bi)
    mask = torch.rand(-(-out // bo), -(-inn // bi), generator=g) < 0.3
    mask[2] = False
    w = make_bsr(out, inn, block, mask=mask, dtype=dtype, seed=bo + 3 * bi)
    rows, cols = w._block_rows(), w.col_indices.long()
    inside = BlockSparseWeight._blocked(torch.ones(out, inn, dtype=torch.bool), bo, bi)[rows, cols]
    assert not inside.all(), "the case needs ragged edge blocks"
    Wd = w.to_dense()
    values = w.values.clone()
    values[~inside] = float("nan")
    threads = torch.get_num_threads()
    try:
        for T in (1, 5, 16, 33, 48, 64, 100, 131):
            x = _tokens(T, inn, dtype, seed=T, strided=T % 2 == 1)
            dy = _tokens(T, out, dtype, seed=T + 1, strided=T % 2 == 0)
            bias = torch.randn(out, generator=g).to(dtype)
            runs = []
            for n in (1, 2, 3):
                torch.set_num_threads(n)
                runs.append((
                    torch.ops.sparsekern.bsr_linear(x, values, w.row_offsets, w.col_indices, w.col_offsets,
                                                    w.row_indices, w.block_perm, out, bias, "silu"),
                    torch.ops.sparsekern.bsr_linear_grad_input(dy, values, w.col_offsets, w.row_indices, w.block_perm,
                                                               inn)))
            for r in runs[1:]:
                assert all(torch.equal(a, b) for a, b in zip(r, runs[0])), f"{isa} {block} T={T}: thread counts differ"
            y, dx = runs[0]
            assert_close_to_ref(y, reference.linear(x, w, bias, "silu"),
                                reference.activation(F.linear(x, Wd, bias), "silu"), f"{isa} {block} forward T={T}",
                                floor=KERNEL_FLOOR)
            assert_close_to_ref(dx, reference.linear_grad_input(dy, w), dy @ Wd, f"{isa} {block} grad_input T={T}",
                                floor=KERNEL_FLOOR)
    finally:
        torch.set_num_threads(threads)



@pytest.mark.parametrize("dtype", VECTOR_DTYPES, ids=str)
@pytest.mark.parametrize("block", VECTOR_BLOCKS, ids=lambda b: f"b{b[0]}x{b[1]}")
def test_vector_blocks_sddmm_tiles_ragged_edges_and_threads(isa, dtype, block, make_bsr):
    """The weight gradient of column and row vectors (vec_avx512.cpp / vec_avx2.cpp sddmm): no tokens, one, odd
    counts, every token-tile width, a ragged last tile and more than one tile (64 tokens for column vectors, 256 for
    row vectors), strided rows of dY and X, more than one chunk of rows (1024 rows for column vectors, 512 for row
    vectors, whose entries each thread sorts by column per chunk), rows and columns without entries, lines of fewer
    and of more entries than one register block (8), both edges ragged, against the float64 reference; the parts of
    ragged edge vectors outside the matrix exactly zero even where X holds Inf (0 * Inf would be NaN); and every
    thread count giving the same bits."""
    bo, bi = block
    threads = torch.get_num_threads()
    # (150, 141): both edges ragged for every V; (70, 600) at a higher density: rows of more than 8 row vectors;
    # (1100, 70): several chunks of rows
    tokens = (0, 1, 5, 16, 33, 64, 100, 131, 200, 300)
    for out, inn, rate, many, Ts in ((150, 141, 0.3, False, tokens), (70, 600, 0.6, True, tokens),
                                     (1100, 70, 0.3, False, (1, 37, 300))):
        g = torch.Generator().manual_seed(bo * 10 + bi + inn)
        mask = torch.rand(-(-out // bo), -(-inn // bi), generator=g) < rate
        mask[1] = False
        w = make_bsr(out, inn, block, mask=mask, dtype=dtype, seed=bo + 3 * bi + out)
        counts = (w.row_offsets[1:] - w.row_offsets[:-1]).tolist()
        assert 0 in counts and (max(counts) > 8 or not many), "the case needs empty rows and rows of over 8 vectors"
        rows, cols = w._block_rows(), w.col_indices.long()
        inside = BlockSparseWeight._blocked(torch.ones(out, inn, dtype=torch.bool), bo, bi)[rows, cols]
        try:
            for T in Ts:
                x = _tokens(T, inn, dtype, seed=T + inn, strided=T % 2 == 1)
                dy = _tokens(T, out, dtype, seed=T + out, strided=T % 2 == 0)
                runs = []
                for n in (1, 2, 3):
                    torch.set_num_threads(n)
                    runs.append(torch.ops.sparsekern.bsr_sddmm(dy, x, w.values, w.row_offsets, w.col_indices))
                assert all(torch.equal(r, runs[0]) for r in runs[1:]), f"{isa} {block} T={T}: thread counts differ"
                dw = runs[0]
                assert dw.stride() == w.values.stride(), "the gradient must come in the parameter's own layout"
                dense = BlockSparseWeight._blocked(dy.t() @ x, bo, bi)[rows, cols]
                assert_close_to_ref(dw, reference.sddmm(dy, x, w), dense, f"{isa} {block} {out}x{inn} sddmm T={T}",
                                    floor=KERNEL_FLOOR)
                assert torch.all(dw[~inside] == 0), f"{isa} {block} T={T}: nonzero gradient outside the matrix"
                if T == 0:
                    assert torch.equal(dw, torch.zeros_like(dw)), f"{isa} {block}: no tokens, nonzero gradient"
                if T in (5, 64):  # Inf in every column of X: the padded outputs must still be exact zeros
                    xi = x.clone()
                    xi[T // 2] = float("inf")
                    dwi = torch.ops.sparsekern.bsr_sddmm(dy, xi, w.values, w.row_offsets, w.col_indices)
                    assert torch.all(dwi[~inside] == 0), f"{isa} {block} T={T}: Inf in X leaks outside the matrix"
        finally:
            torch.set_num_threads(threads)

def test_unstructured_refuses_unsorted_indices(make_bsr):
    """The 1x1-block kernels walk each row's entries in column order: metadata whose columns are not strictly
    increasing within a row is refused with the position, not silently misread."""
    w = make_bsr(8, 40, (1, 1), density=0.5, seed=2)
    ci = w.col_indices.clone()
    r0, r1 = int(w.row_offsets[0]), int(w.row_offsets[1])
    assert r1 - r0 >= 2
    ci[r0], ci[r0 + 1] = ci[r0 + 1].clone(), ci[r0].clone()
    x = torch.randn(16, 40)
    with pytest.raises(RuntimeError, match="strictly increasing"):
        torch.ops.sparsekern.bsr_linear(x, w.values, w.row_offsets, ci, w.col_offsets, w.row_indices, w.block_perm,
                                        8, None, "none")


def test_set_isa_rejects_unknown_level():
    before = _C.get_isa()
    with pytest.raises((ValueError, RuntimeError), match="avx512"):
        _C.set_isa("sse9")
    assert _C.get_isa() == before
