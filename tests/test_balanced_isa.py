"""The balanced-sparse CPU ops on every code path this CPU can run (AVX-512, AVX2, portable), against the float64
reference: error of ours <= 2 x the error of dense torch in the same dtype + a small floor."""

from __future__ import annotations

import pytest
import torch

import sparse
from sparse import reference
from sparse.formats import BalancedSparseWeight
from tests.helpers import KERNEL_FLOOR, VECTOR_DTYPES, assert_close_to_ref, make_balanced, slow_except

_C = sparse._ext._C

# (bank, keep, in_features): exact banks, ragged last banks, 2:4, wide banks with int16 indices.
PATTERNS = [(32, 16, 96), (32, 4, 80), (4, 2, 22), (64, 16, 150), (8, 3, 45), (300, 7, 610)]
TOKENS = [1, 7, 97]
# make test-fast: the decode path and a partial token tile (several tiles: test_forward_strided_input_and_many_rows).
FAST_TOKENS = slow_except(TOKENS, [1, 7])


def _weight(out: int, inn: int, bank: int, keep: int, dtype: torch.dtype, gen: torch.Generator) -> BalancedSparseWeight:
    """helpers.make_balanced, drawing from the test's generator, with the index dtype checked."""
    w = make_balanced(out, inn, bank, keep, dtype=dtype, seed=gen)
    assert w.indices.dtype == (torch.uint8 if bank <= 256 else torch.int16)
    return w


@pytest.mark.parametrize("dtype", VECTOR_DTYPES)
@pytest.mark.parametrize("bank,keep,inn", PATTERNS)
@pytest.mark.parametrize("T", FAST_TOKENS)
def test_forward(isa: str, dtype: torch.dtype, bank: int, keep: int, inn: int, T: int) -> None:
    gen = torch.Generator().manual_seed(T * 1000 + bank * 10 + keep)
    out = 37
    w = _weight(out, inn, bank, keep, dtype, gen)
    x = torch.randn(T, inn, generator=gen).to(dtype)
    for act, with_bias in (("none", False), ("relu", True), ("gelu", True), ("gelu_tanh", False), ("silu", True)):
        b = torch.randn(out, generator=gen).to(dtype) if with_bias else None
        ours = torch.ops.sparsekern.balanced_linear(x, w.values, w.indices, bank, b, act)
        ref = reference.linear(x, w, b, act)
        dense = reference.activation(torch.nn.functional.linear(x, w.to_dense().to(dtype), b), act)
        assert_close_to_ref(ours, ref, dense, floor=KERNEL_FLOOR)


@pytest.mark.parametrize("dtype", VECTOR_DTYPES)
@pytest.mark.parametrize("bank,keep,inn", PATTERNS)
@pytest.mark.parametrize("T", FAST_TOKENS)
def test_grad_input(isa: str, dtype: torch.dtype, bank: int, keep: int, inn: int, T: int) -> None:
    gen = torch.Generator().manual_seed(T * 1000 + bank * 10 + keep + 1)
    out = 41
    w = _weight(out, inn, bank, keep, dtype, gen)
    dy = torch.randn(T, out, generator=gen).to(dtype)
    ours = torch.ops.sparsekern.balanced_linear_grad_input(dy, w.values, w.indices, bank, inn)
    assert_close_to_ref(ours, reference.linear_grad_input(dy, w), dy @ w.to_dense().to(dtype), floor=KERNEL_FLOOR)


@pytest.mark.parametrize("dtype", VECTOR_DTYPES)
@pytest.mark.parametrize("bank,keep,inn", PATTERNS)
@pytest.mark.parametrize("T", FAST_TOKENS)
def test_sddmm(isa: str, dtype: torch.dtype, bank: int, keep: int, inn: int, T: int) -> None:
    gen = torch.Generator().manual_seed(T * 1000 + bank * 10 + keep + 2)
    out = 19
    w = _weight(out, inn, bank, keep, dtype, gen)
    dy = torch.randn(T, out, generator=gen).to(dtype)
    x = torch.randn(T, inn, generator=gen).to(dtype)
    ours = torch.ops.sparsekern.balanced_sddmm(dy, x, w.indices, bank)
    ref = reference.sddmm(dy, x, w)
    full = dy.t() @ x
    padded = torch.nn.functional.pad(full, (0, w.n_banks * bank - inn)).reshape(out, w.n_banks, bank)
    assert_close_to_ref(ours, ref, torch.gather(padded, -1, w.indices.long()), floor=KERNEL_FLOOR)


@pytest.mark.parametrize("T", [3, 5, 64, 200])
def test_forward_strided_input_and_many_rows(isa: str, T: int) -> None:
    """Row-strided x (a column slice), enough rows for several row groups plus a tail, several token tiles, and
    the multi-token decode path (T = 3)."""
    gen = torch.Generator().manual_seed(T)
    w = _weight(70, 256, 32, 8, torch.float32, gen)
    x = torch.randn(T, 300, generator=gen)[:, 20:276]
    b = torch.randn(70, generator=gen)
    ours = torch.ops.sparsekern.balanced_linear(x, w.values, w.indices, 32, b, "relu")
    assert_close_to_ref(ours, reference.linear(x, w, b, "relu"),
                        torch.relu(torch.nn.functional.linear(x, w.to_dense(), b)), floor=KERNEL_FLOOR)


@pytest.mark.parametrize("dtype", VECTOR_DTYPES)
@pytest.mark.parametrize("T", [16, 40])
def test_forward_int16_indices_keep_multiple_of_4(isa: str, dtype: torch.dtype, T: int) -> None:
    """Wide banks (int16 indices) with keep a multiple of 4: the AVX-512 forward reads 4 indices per load there."""
    gen = torch.Generator().manual_seed(T + 7)
    w = _weight(21, 610, 300, 8, dtype, gen)
    x = torch.randn(T, 610, generator=gen).to(dtype)
    b = torch.randn(21, generator=gen).to(dtype)
    ours = torch.ops.sparsekern.balanced_linear(x, w.values, w.indices, 300, b, "none")
    assert_close_to_ref(ours, reference.linear(x, w, b), torch.nn.functional.linear(x, w.to_dense().to(dtype), b),
                        floor=KERNEL_FLOOR)


# Bank 32 with keep 16 / 8 / 4 at T <= 3 takes the AVX-512 decode path that checks indices as it reads them: whole
# 16-entry vectors, a tail vector (odd bank counts, ragged last banks), several 16-row output blocks plus a partial one.
DECODE_INS = {16: [256, 224, 250], 8: [256, 224, 250, 40], 4: [256, 224, 250, 70, 36]}


@pytest.mark.parametrize("dtype", VECTOR_DTYPES)
@pytest.mark.parametrize("idx_dtype", [torch.uint8, torch.int16])
@pytest.mark.parametrize("keep,inn", [(k, i) for k, ins in DECODE_INS.items() for i in ins])
@pytest.mark.parametrize("T", [1, 2, 3])
def test_forward_decode_bank32(
    isa: str, dtype: torch.dtype, idx_dtype: torch.dtype, keep: int, inn: int, T: int
) -> None:
    gen = torch.Generator().manual_seed(T * 100 + keep + inn)
    out = 37
    w = _weight(out, inn, 32, keep, dtype, gen)
    x = torch.randn(T, inn, generator=gen).to(dtype)
    idx = w.indices.to(idx_dtype)
    for act, with_bias in (("none", False), ("gelu", True)):
        b = torch.randn(out, generator=gen).to(dtype) if with_bias else None
        ours = torch.ops.sparsekern.balanced_linear(x, w.values, idx, 32, b, act)
        ref = reference.linear(x, w, b, act)
        dense = reference.activation(torch.nn.functional.linear(x, w.to_dense().to(dtype), b), act)
        assert_close_to_ref(ours, ref, dense, floor=KERNEL_FLOOR)


_BAD = [(16, (20, 2, 5), 32), (8, (33, 6, 7), 255), (4, (3, 7, 0), 26), (8, (36, 7, 1), 26)]


@pytest.mark.parametrize("T", [1, 3, 4])
@pytest.mark.parametrize("idx_dtype,keep,where,bad", [(d, *case) for d in (torch.uint8, torch.int16) for case in _BAD]
                         + [(torch.int16, 4, (0, 0, 3), -1)])  # -1 only as int16: uint8 cannot hold it
def test_forward_bad_index_named(isa: str, idx_dtype: torch.dtype, T: int, keep: int, where: tuple, bad: int) -> None:
    """An out-of-range index is named whichever path reads it: a whole vector, the tail vector, or beyond the
    ragged last bank (in = 250: bank 7 is 26 wide)."""
    gen = torch.Generator().manual_seed(keep)
    w = _weight(37, 250, 32, keep, torch.float32, gen)
    idx = w.indices.to(idx_dtype)
    idx[where] = bad
    x = torch.randn(T, 250, generator=gen)
    o, bk, k = where
    width = 26 if bk == 7 else 32
    with pytest.raises(RuntimeError, match=rf"indices\[{o}, {bk}, {k}\] = {bad} is out of range \[0, {width}\)"):
        torch.ops.sparsekern.balanced_linear(x, w.values, idx, 32, None, "none")


def test_isa_restored() -> None:
    assert _C.get_isa() == _C.best_isa()
