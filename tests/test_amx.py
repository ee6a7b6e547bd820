"""The AMX kernels, on a CPU that has them (skipped elsewhere):
- the int8 block-sparse forward (csrc/cpu/int8_avx512.cpp, int8_fwd_amx): every block shape and token count it takes
  gives exactly the integers of the AVX-512 VNNI kernel (so the same outputs, bit for bit) and matches the float64
  reference;
- the bfloat16 block-sparse forward (csrc/cpu/bsr_avx512.cpp, bsr_fwd_bf16_amx): the same products as the AVX-512
  kernel summed in another order, so within bfloat16 rounding of it and of the float64 reference;
- the toggle and its error."""

from __future__ import annotations

import contextlib

import pytest
import torch

import sparse
from sparse import reference
from sparse.formats import BlockSparseWeight
from sparse.quant import QuantizedBlockSparseWeight
from tests.helpers import KERNEL_FLOOR, assert_close_to_ref, make_bsr

pytestmark = pytest.mark.skipif(not sparse._ext.available(), reason="sparse._C not built")
OP = torch.ops.sparsekern.bsr_linear_int8


def _has_amx(kind: str = "int8") -> bool:
    return sparse._ext.available() and sparse._ext.require().cpu_features().get(f"amx_{kind}", False)


needs_amx = pytest.mark.skipif(not _has_amx(), reason="this CPU has no AMX-INT8 (or SPARSEKERN_ISA caps it)")
needs_amx_bf16 = pytest.mark.skipif(not _has_amx("bf16"), reason="this CPU has no AMX-BF16 (or SPARSEKERN_ISA caps it)")


@contextlib.contextmanager
def _amx(on: bool):
    C = sparse._ext.require()
    was = C.amx_enabled()
    C.set_amx(on)
    try:
        yield
    finally:
        C.set_amx(was)


def _run(x, qw, bias=None, act="none", clip=0.0):
    return OP(x, qw.qvalues, qw.w_scale, qw.w_sum, qw.row_offsets, qw.col_indices, qw.shape[0], qw.block[1], bias,
              act, clip)


# (out, in, block): the shapes AMX takes (block rows a multiple of 16 up to 64, block columns 16..64), divisible and
# ragged (the last block row / column cut by the matrix), and a block column count that is not a multiple of 4.
AMX_CASES = [
    (96, 128, (32, 32)),
    (70, 75, (32, 32)),
    (50, 41, (16, 16)),
    (100, 90, (48, 16)),
    (130, 140, (64, 64)),
    (64, 100, (16, 50)),
    (80, 96, (64, 24)),
]


@needs_amx
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("case", AMX_CASES, ids=lambda c: f"{c[0]}x{c[1]}-b{c[2][0]}x{c[2][1]}")
def test_amx_equals_vnni_and_the_reference(dtype, case):
    out, inn, block = case
    w = make_bsr(out, inn, block, sparsity=0.4, seed=out + inn)
    qw = QuantizedBlockSparseWeight.from_float(w)
    for i, T in enumerate((15, 16, 17, 31, 32, 33, 64, 100)):  # below, at and past the 16- and 32-token tiles
        act = ("none", "gelu", "relu", "silu")[i % 4]
        x = (torch.randn(T, inn, generator=torch.Generator().manual_seed(i)) * 2).to(dtype)
        bias = torch.randn(out, generator=torch.Generator().manual_seed(i)).to(dtype) if i % 2 else None
        with _amx(True):
            amx = _run(x, qw, bias, act)
        with _amx(False):
            vnni = _run(x, qw, bias, act)
        assert torch.equal(amx, vnni), f"{case} {dtype} T={T}"
        ref = reference.int8_linear(x, qw, bias, act, 127)
        assert_close_to_ref(amx, ref, ref.to(dtype), f"amx {dtype} T={T} {act}", k=inn, floor=KERNEL_FLOOR)


@needs_amx
def test_amx_empty_rows_static_clip_and_threads():
    w = make_bsr(96, 128, 32, sparsity=0.7, seed=9)
    qw = QuantizedBlockSparseWeight.from_float(w)
    bias = torch.randn(96)
    x = torch.randn(70, 128) * 3
    x[4, 2] = 40.0  # saturates under the static clip
    with _amx(True):
        got = _run(x, qw, bias, "gelu", clip=2.0)
        old = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            one = _run(x, qw, bias, "gelu", clip=2.0)
        finally:
            torch.set_num_threads(old)
    with _amx(False):
        assert torch.equal(got, _run(x, qw, bias, "gelu", clip=2.0))
    assert torch.equal(one, got)
    ref = reference.int8_linear(x, qw, bias, "gelu", 127, clip=2.0)
    assert_close_to_ref(got, ref, ref.float(), "amx static clip", k=128, floor=KERNEL_FLOOR)
    keep = torch.zeros(2, 2, dtype=torch.bool)
    keep[1, 0] = True  # block row 0 empty: exactly the bias there
    qe = QuantizedBlockSparseWeight.from_float(BlockSparseWeight.from_dense(torch.randn(64, 64), 32, mask=keep))
    b = torch.randn(64)
    with _amx(True):
        y = _run(torch.randn(40, 64), qe, b)
    torch.testing.assert_close(y[:, :32], b[:32].expand(40, 32), rtol=0, atol=0)
    assert (y[:, 32:] != b[32:]).any()


# (out, in, block) the bf16 AMX kernel takes (rows a multiple of 16 up to 64; 16, 32 or 64 columns dividing in),
# the last block row cut by the matrix in some.
BF16_CASES = [(96, 128, (32, 32)), (70, 64, (32, 32)), (50, 48, (16, 16)), (100, 128, (48, 64)), (130, 192, (64, 32)),
              (64, 96, (16, 32))]


@needs_amx_bf16
@pytest.mark.parametrize("case", BF16_CASES, ids=lambda c: f"{c[0]}x{c[1]}-b{c[2][0]}x{c[2][1]}")
def test_amx_bf16_matches_the_avx512_kernel_and_the_reference(case):
    out, inn, block = case
    w = make_bsr(out, inn, block, sparsity=0.4, seed=out + inn, dtype=torch.bfloat16)
    for i, T in enumerate((15, 16, 17, 31, 32, 33, 64, 100)):
        act = ("none", "gelu", "relu", "silu")[i % 4]
        g = torch.Generator().manual_seed(i)
        base = torch.randn(T, inn + 8, generator=g).bfloat16()
        x = base[:, 4: 4 + inn] if i % 3 == 0 else base[:, :inn].contiguous()  # rows strided in some
        bias = torch.randn(out, generator=g).bfloat16() if i % 2 else None
        with _amx(True):
            amx = sparse.linear(x, w, bias, activation=act)
        with _amx(False):
            avx = sparse.linear(x, w, bias, activation=act)
        ref = reference.linear(x, w, bias, act)
        # the same bf16 products in fp32, another order: a few bf16 ulps of the output apart at most
        torch.testing.assert_close(amx.float(), avx.float(), rtol=2e-2, atol=2e-2, msg=f"{case} T={T} {act}")
        assert_close_to_ref(amx, ref, avx, f"amx bf16 T={T} {act}", k=inn, floor=KERNEL_FLOOR)


@needs_amx_bf16
def test_amx_bf16_threads_and_token_split():
    w = make_bsr(768, 768, 32, sparsity=0.9, seed=3, dtype=torch.bfloat16)  # small W: the forward splits tokens
    x = torch.randn(200, 768).bfloat16()
    old = torch.get_num_threads()
    try:
        with _amx(True):
            torch.set_num_threads(1)
            one = sparse.linear(x, w, None, activation="gelu")
            torch.set_num_threads(2)
            two = sparse.linear(x, w, None, activation="gelu")
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, two)  # each token row's sums are the same whichever thread runs them
    with _amx(False):
        torch.testing.assert_close(one.float(), sparse.linear(x, w, None, activation="gelu").float(), rtol=2e-2,
                                   atol=2e-2)


def test_set_amx_refuses_a_cpu_without_it():
    C = sparse._ext.require()
    if _has_amx() or _has_amx("bf16"):
        with _amx(False):
            assert C.amx_enabled() is False
        return
    assert C.amx_enabled() is False
    with pytest.raises(ValueError, match=r"AMX \(AMX-INT8, AMX-BF16\) is not available on this CPU"):
        C.set_amx(True)
    C.set_amx(False)  # turning it off is always allowed
