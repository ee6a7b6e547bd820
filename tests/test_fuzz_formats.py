"""Fuzzing of weight construction and of the C++ ops' own input checks.

A valid weight is built, then 1-3 mutations hit its tensors and sizes: an entry set to an out-of-range,
negative, boundary or huge value; two entries swapped (unsorted); an entry copied over another (duplicate);
truncated or extended; another dtype; another rank; a non-contiguous view; the meta device; an empty tensor;
and the scalar sizes (out/in features, bank) off by one, zero, negative or huge. The result goes

* to the Python constructors (``BlockSparseWeight(...)``, ``BalancedSparseWeight(...)``), which must raise
  ValueError/TypeError/RuntimeError, or accept a weight that then validates and computes the reference result;
* straight to ``torch.ops.sparsekern.*`` (no Python validation at all), which must raise
  ValueError/TypeError/RuntimeError, or return exactly what the raw metadata describes (the float64 sum over
  the listed blocks/entries): never a crash, a hang, an out-of-bounds read or uninitialised memory.

Run in the sanitizer build by ``make test-asan``; ``make fuzz`` runs many more examples.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import sparse
from sparse import BalancedSparseWeight, BlockSparseWeight, reference
from sparse._ext import available
from tests import _reliab as R
from tests import helpers as H

pytestmark = pytest.mark.skipif(not available(), reason="sparse._C not built")

CLEAN = (ValueError, TypeError, RuntimeError)
OPS = torch.ops.sparsekern if available() else None
HUGE = [2**31 - 1, 2**31, -(2**31), 2**32 + 1, 2**62, 2**63 - 1, -(2**63)]


def _mutate_tensor(data, t: torch.Tensor, label: str) -> torch.Tensor:
    """One random corruption of ``t``."""
    kinds = ["set", "swap", "duplicate", "truncate", "extend", "dtype", "rank", "strided", "meta", "empty",
             "empty_huge"]
    kind = data.draw(st.sampled_from(kinds), label=f"{label} mutation")
    if t.is_meta and kind in ("set", "swap", "duplicate"):
        return t  # a meta tensor has no values to corrupt (reading one for the bound would fail in the fuzzer)
    t = t.clone()
    flat = t.reshape(-1)
    n = flat.numel()
    if kind == "set" and n:
        i = data.draw(st.integers(0, n - 1), label=f"{label} index")
        if t.is_floating_point():
            v = data.draw(st.sampled_from([float("nan"), float("inf"), -1e30, 0.0]), label=f"{label} value")
        else:
            info = torch.iinfo(t.dtype)
            bound = int(flat.max()) if n else 0
            v = data.draw(st.one_of(st.sampled_from([-1, bound, bound + 1, bound + 2, info.max, info.min]),
                                    st.integers(info.min, info.max)), label=f"{label} value")
            v = max(info.min, min(info.max, v))
        flat[i] = v
        return t
    if kind == "swap" and n >= 2:
        i, j = data.draw(st.integers(0, n - 1)), data.draw(st.integers(0, n - 1))
        flat[i], flat[j] = flat[j].clone(), flat[i].clone()
        return t
    if kind == "duplicate" and n >= 2:
        i, j = data.draw(st.integers(0, n - 1)), data.draw(st.integers(0, n - 1))
        flat[i] = flat[j].clone()
        return t
    if kind == "truncate" and t.dim() and t.shape[0]:
        return t[: data.draw(st.integers(0, t.shape[0] - 1))].clone()
    if kind == "extend" and t.dim():
        if not t.shape[0] and math.prod(t.shape[1:]) > BIG:
            return t  # a row of an empty-huge tensor (2^40 elements) would be a real allocation of the fuzzer's own
        return torch.cat([t, t[-1:] if t.shape[0] else t.new_zeros((1, *t.shape[1:]))])
    if kind == "dtype":
        dt = data.draw(st.sampled_from([torch.int64, torch.int32, torch.int16, torch.uint8, torch.bool,
                                        torch.float32, torch.float64, torch.bfloat16, torch.float16]))
        return t.to(dt)
    if kind == "rank":
        return t.unsqueeze(0) if data.draw(st.booleans()) else t.reshape(-1)
    if kind == "strided" and t.dim():
        return torch.stack([t, t], dim=-1)[..., 0]  # same values, stride 2 in the last dimension
    if kind == "meta":
        return t.to("meta")
    if kind == "empty":
        return t.new_empty((0,) * max(t.dim(), 1))
    if kind == "empty_huge":  # no elements, but huge other dimensions (a block or bank shape)
        dims = [data.draw(st.sampled_from([1, 2, 2**31, 2**40, 2**62, 2**63 - 1])) for _ in range(max(t.dim(), 1) - 1)]
        while dims and math.prod(dims) >= 2**62:  # torch itself refuses shapes whose strides overflow
            dims[dims.index(max(dims))] = 1
        return t.new_empty((0, *dims))
    return t


def _mutate_int(data, v: int, label: str) -> int:
    return data.draw(st.one_of(st.sampled_from([v - 1, v + 1, 0, -1, 1] + HUGE), st.just(v)), label=label)


def _clean_or_result(fn, *args):
    """fn(*args), or None if it raised one of the clean exceptions (with a message)."""
    try:
        return fn(*args)
    except CLEAN as e:
        assert str(e).strip(), f"{type(e).__name__} without a message"
        return None


def _run_ops(calls) -> None:
    """Each (name, op thunk, raw-reference thunk) at every ISA level: the op raises a clean exception at every
    level, or returns the reference at every level (the checks must not depend on the code path)."""
    for name, op, ref in calls:
        outcomes, want = [], None
        for level in R.isa_levels():
            with R.isa(level):
                got = _clean_or_result(op)
            outcomes.append(got is not None)
            if got is not None:
                want = ref() if want is None else want
                _close(got, want, f"{name} [{level}]")
        assert len(set(outcomes)) == 1, f"{name}: accepted at some ISA levels only: {outcomes}"


# Relative error allowed against the float64 reference: the kernels accumulate in float32 (float64 for float64)
# and round once to the result's dtype, so a bf16/fp16 result is off by up to half a unit in its last place.
REL = {torch.float64: 1e-6, torch.float32: 1e-6, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def _close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert got.device.type == "cpu", f"{what}: result on {got.device}"
    tol = REL[got.dtype] * (1 + want.abs().max().item() if want.numel() else 1)
    bad = (got.double() - want).abs() > tol
    same_nan = got.isnan() & want.isnan()
    assert not (bad & ~same_nan).any(), f"{what}: result differs from the raw-metadata reference"


def _base_block(data):
    out, inn = data.draw(st.integers(1, 12), label="out"), data.draw(st.integers(1, 12), label="in")
    bo, bi = data.draw(st.integers(1, out), label="bo"), data.draw(st.integers(1, inn), label="bi")
    density = data.draw(st.sampled_from([0.0, 0.5, 1.0]), label="density")
    return H.make_bsr(out, inn, (bo, bi), density=density, dtype=torch.float64, seed=out * 13 + inn)


def _check_python_weight(w, what: str) -> None:
    """A weight the constructor accepted must be valid and compute the reference result."""
    w.validate()
    x = H.randn((3, w.shape[1]), w.dtype, 4)
    y = sparse.linear(x, w)
    _close(y, reference.linear(x, w), f"{what}: linear of an accepted weight")


# Sizes a caller may legitimately ask for but that cost real memory: a weight of 2^31 columns owns 2^31 column
# offsets, a dX of T x 2^31 is that big. The fuzzer passes such sizes only where the metadata cannot match
# them, so that what it finds are allocations that do not follow from the request.
BIG = 2**24


def _fits(*sizes) -> bool:
    return all(isinstance(s, int) and abs(s) <= BIG for s in sizes)


BSR_FIELDS = ["values", "row_offsets", "col_indices", "col_offsets", "row_indices", "block_perm", "x", "bias",
              "grad_out", "out_features", "in_features", "activation"]


@R.profile(ci_examples=150)
@given(data=st.data())
def test_fuzz_block_sparse(data):
    w = _base_block(data)
    out, inn = w.shape
    T = data.draw(st.integers(0, 3), label="T")
    args = {
        "values": w.values, "row_offsets": w.row_offsets, "col_indices": w.col_indices,
        "col_offsets": w.col_offsets, "row_indices": w.row_indices, "block_perm": w.block_perm,
        "x": H.randn((T, inn), torch.float64, 1), "bias": H.randn((out,), torch.float64, 2),
        "grad_out": H.randn((T, out), torch.float64, 3), "out_features": out, "in_features": inn,
        "activation": "none",
    }
    for field in data.draw(st.lists(st.sampled_from(BSR_FIELDS), min_size=1, max_size=3), label="fields"):
        v = args[field]
        if isinstance(v, torch.Tensor):
            args[field] = _mutate_tensor(data, v, field)
        elif isinstance(v, int):
            args[field] = _mutate_int(data, v, field)
        else:
            args[field] = data.draw(st.sampled_from(["none", "relu", "gelu", "tanh", "", "RELU", "gelu\0"]))
    a = args

    # The Python constructor, with and without the transposed metadata.
    for explicit in (False, True):
        extra = dict(col_offsets=a["col_offsets"], row_indices=a["row_indices"], block_perm=a["block_perm"]) \
            if explicit else {}
        if not _fits(a["in_features"]):
            continue
        wp = _clean_or_result(lambda: BlockSparseWeight(
            a["values"], a["row_offsets"], a["col_indices"], (a["out_features"], a["in_features"]), **extra))
        if wp is not None:
            _check_python_weight(wp, "BlockSparseWeight")

    # The C++ ops directly.
    _run_ops([
        ("bsr_linear",
         lambda: OPS.bsr_linear(a["x"], a["values"], a["row_offsets"], a["col_indices"], a["col_offsets"],
                                a["row_indices"], a["block_perm"], a["out_features"], a["bias"], a["activation"]),
         lambda: reference.activation(R.bsr_forward_raw(a["x"], a["values"], a["row_offsets"], a["col_indices"],
                                                        a["out_features"]) + a["bias"].double(), a["activation"])),
        ("bsr_linear_grad_input",
         lambda: OPS.bsr_linear_grad_input(a["grad_out"], a["values"], a["col_offsets"], a["row_indices"],
                                           a["block_perm"], a["in_features"]) if _fits(a["in_features"]) else None,
         lambda: R.bsr_grad_input_raw(a["grad_out"], a["values"], a["col_offsets"], a["row_indices"],
                                      a["block_perm"], a["in_features"])),
        ("bsr_sddmm",
         lambda: OPS.bsr_sddmm(a["grad_out"], a["x"], a["values"], a["row_offsets"], a["col_indices"]),
         lambda: R.bsr_sddmm_raw(a["grad_out"], a["x"], a["values"], a["row_offsets"], a["col_indices"])),
    ])

BAL_FIELDS = ["values", "indices", "x", "bias", "grad_out", "bank", "in_features", "activation"]


@R.profile(ci_examples=150)
@given(data=st.data())
def test_fuzz_balanced(data):
    out, inn = data.draw(st.integers(1, 10), label="out"), data.draw(st.integers(1, 40), label="in")
    bank = data.draw(st.integers(1, inn), label="bank")
    last = inn - (-(-inn // bank) - 1) * bank
    keep = data.draw(st.integers(1, last), label="keep")
    w = H.make_balanced(out, inn, bank, keep, dtype=torch.float64, seed=out * 7 + inn)
    T = data.draw(st.integers(0, 3), label="T")
    args = {
        "values": w.values, "indices": w.indices, "x": H.randn((T, inn), torch.float64, 1),
        "bias": H.randn((out,), torch.float64, 2), "grad_out": H.randn((T, out), torch.float64, 3),
        "bank": bank, "in_features": inn, "activation": "none",
    }
    if data.draw(st.booleans(), label="int16 indices"):
        args["indices"] = w.indices.to(torch.int16)
    for field in data.draw(st.lists(st.sampled_from(BAL_FIELDS), min_size=1, max_size=3), label="fields"):
        v = args[field]
        if isinstance(v, torch.Tensor):
            args[field] = _mutate_tensor(data, v, field)
        elif isinstance(v, int):
            args[field] = _mutate_int(data, v, field)
        else:
            args[field] = data.draw(st.sampled_from(["none", "silu", "swish", ""]))
    a = args

    wp = _clean_or_result(lambda: BalancedSparseWeight(a["values"], a["indices"], a["bank"], a["in_features"]))
    if wp is not None:
        _check_python_weight(wp, "BalancedSparseWeight")

    _run_ops([
        ("balanced_linear",
         lambda: OPS.balanced_linear(a["x"], a["values"], a["indices"], a["bank"], a["bias"], a["activation"]),
         lambda: reference.activation(R.balanced_forward_raw(a["x"], a["values"], a["indices"], a["bank"])
                                      + a["bias"].double(), a["activation"])),
        ("balanced_linear_grad_input",
         lambda: OPS.balanced_linear_grad_input(a["grad_out"], a["values"], a["indices"], a["bank"],
                                                a["in_features"]) if _fits(a["in_features"]) else None,
         lambda: R.balanced_grad_input_raw(a["grad_out"], a["values"], a["indices"], a["bank"], a["in_features"])),
        ("balanced_sddmm",
         lambda: OPS.balanced_sddmm(a["grad_out"], a["x"], a["indices"], a["bank"]),
         lambda: R.balanced_sddmm_raw(a["grad_out"], a["x"], a["indices"], a["bank"])),
    ])

def test_running_the_expected_build():
    """``make test-asan`` sets SPARSEKERN_EXPECT_BUILD: the session must use that (sanitized) sparse._C, not the
    checkout's own build. Without the variable, any build will do."""
    import sparse._C as c

    want = os.environ.get("SPARSEKERN_EXPECT_BUILD")
    if not want:
        pytest.skip("SPARSEKERN_EXPECT_BUILD not set (only make test-asan sets it)")
    assert os.path.dirname(os.path.dirname(os.path.abspath(c.__file__))) == os.path.abspath(want), c.__file__


def test_constructors_reject_non_tensors():
    """Arbitrary Python objects in place of tensors and sizes."""
    w = H.make_bsr(6, 6, (2, 3), density=0.5, dtype=torch.float32, seed=0)
    for bad in (None, 3, "x", [0, 1], 2.5):
        with pytest.raises(CLEAN):
            BlockSparseWeight(bad, w.row_offsets, w.col_indices, w.shape)
        with pytest.raises(CLEAN):
            BlockSparseWeight(w.values, bad, w.col_indices, w.shape)
        with pytest.raises(CLEAN):
            BlockSparseWeight(w.values, w.row_offsets, bad, w.shape)
        with pytest.raises(CLEAN):
            BlockSparseWeight(w.values, w.row_offsets, w.col_indices, bad)
    b = H.make_balanced(4, 8, 4, 2, dtype=torch.float32, seed=0)
    for bad in (None, "x", [0, 1], 2.5, True):
        with pytest.raises(CLEAN):
            BalancedSparseWeight(b.values, bad, b.bank, 8)
        with pytest.raises(CLEAN):
            BalancedSparseWeight(b.values, b.indices, bad, 8)
        with pytest.raises(CLEAN):
            BalancedSparseWeight(b.values, b.indices, b.bank, bad)


BSR_META = ["values", "row_offsets", "col_indices", "col_offsets", "row_indices", "block_perm", "bias"]


@pytest.mark.parametrize("field", BSR_META)
def test_meta_metadata_is_named(field):
    """One tensor of a CPU call on the meta device: a ValueError that names the field and the device, from the
    constructor and from every op that takes it (never a result of uninitialised memory)."""
    w = H.make_bsr(6, 6, (2, 3), density=0.5, dtype=torch.float32, seed=0)
    x, g = H.randn((3, 6), torch.float32, 1), H.randn((3, 6), torch.float32, 2)
    a = {"values": w.values, "row_offsets": w.row_offsets, "col_indices": w.col_indices, "col_offsets": w.col_offsets,
         "row_indices": w.row_indices, "block_perm": w.block_perm, "bias": H.randn((6,), torch.float32, 3)}
    a[field] = a[field].to("meta")
    match = rf"{field} is on meta|values are on meta"
    calls = [lambda: OPS.bsr_linear(x, a["values"], a["row_offsets"], a["col_indices"], a["col_offsets"],
                                    a["row_indices"], a["block_perm"], 6, a["bias"], "none")]
    if field in ("values", "col_offsets", "row_indices", "block_perm"):
        calls.append(lambda: OPS.bsr_linear_grad_input(g, a["values"], a["col_offsets"], a["row_indices"],
                                                       a["block_perm"], 6))
    if field in ("values", "row_offsets", "col_indices"):
        calls.append(lambda: OPS.bsr_sddmm(g, x, a["values"], a["row_offsets"], a["col_indices"]))
    if field != "bias":
        calls.append(lambda: BlockSparseWeight(a["values"], a["row_offsets"], a["col_indices"], (6, 6),
                                               col_offsets=a["col_offsets"], row_indices=a["row_indices"],
                                               block_perm=a["block_perm"]))
    for call in calls:
        with pytest.raises(ValueError, match=match):
            call()


@pytest.mark.parametrize("field", ["values", "indices", "bias"])
def test_meta_balanced_metadata_is_named(field):
    w = H.make_balanced(4, 16, 8, 2, dtype=torch.float32, seed=0)
    x, g = H.randn((3, 16), torch.float32, 1), H.randn((3, 4), torch.float32, 2)
    a = {"values": w.values, "indices": w.indices, "bias": H.randn((4,), torch.float32, 3)}
    a[field] = a[field].to("meta")
    match = rf"{field} is on meta|values are on meta|indices are on meta"
    calls = [lambda: OPS.balanced_linear(x, a["values"], a["indices"], 8, a["bias"], "none")]
    if field != "bias":
        calls += [lambda: OPS.balanced_linear_grad_input(g, a["values"], a["indices"], 8, 16),
                  lambda: BalancedSparseWeight(a["values"], a["indices"], 8, 16)]
    if field == "indices":
        calls.append(lambda: OPS.balanced_sddmm(g, x, a["indices"], 8))
    for call in calls:
        with pytest.raises(ValueError, match=match):
            call()
