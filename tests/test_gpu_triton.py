"""The Triton backend on real CUDA tensors: correctness against the float64 reference through the public
``sparse.linear`` (forward and backward), the fp32/tf32 switch, ``torch.library.opcheck`` (fake tensors
included) and ``torch.compile(fullgraph=True)`` equal to eager. Skipped without a CUDA device."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sparse
from sparse import reference
from tests.helpers import KERNEL_FLOOR, TRITON_DTYPES, assert_close_to_ref, make_balanced, make_bsr

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
pytest.importorskip("sparse.triton_backend")  # registers torch.ops.sparsekern.triton_*

ops = torch.ops.sparsekern


def _weights(dtype: torch.dtype):
    """Four formats of the same random 320 x 200 matrix (one seed), scaled by 1/sqrt(in)."""
    kw = dict(dtype=dtype, seed=0, scale=200**-0.5, device="cuda")
    return [
        make_bsr(320, 200, 32, sparsity=0.5, **kw),
        make_bsr(320, 200, (16, 64), sparsity=0.75, **kw),  # rectangular, ragged
        make_balanced(320, 200, 64, 16, **kw),  # ragged last bank (200 = 3*64 + 8)
        make_bsr(320, 200, 1, sparsity=0.9, **kw),  # unstructured: the CSR kernels (kernels/csr.py)
    ]


def test_triton_is_the_default_on_cuda():
    assert sparse.ops.select_backend("cuda") == "triton"


@pytest.mark.parametrize("act", ["none", "gelu"])
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
def test_linear_forward_and_backward(dtype, act, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    for w in _weights(dtype):
        x = torch.randn(2, 97, 200, device="cuda", dtype=dtype, requires_grad=True)  # 3-D, odd T
        bias = torch.randn(320, device="cuda", dtype=dtype, requires_grad=True)
        values = w.values.detach().requires_grad_()
        w.values = values
        y = sparse.linear(x, w, bias, act)
        dense = reference.activation(F.linear(x, w.to_dense(), bias), act)
        assert_close_to_ref(y, reference.linear(x, w, bias, act), dense, floor=KERNEL_FLOOR)
        grad = torch.randn_like(y)
        gx, gv, gb = torch.autograd.grad(y, (x, values, bias), grad)
        dgx, dgv, dgb = torch.autograd.grad(dense, (x, values, bias), grad)
        # float64 gradients through the densified weight
        xd, vd, bd = (t.detach().double().requires_grad_() for t in (x, values, bias))
        w64 = w.to(dtype=torch.float64)
        w64.values = vd
        ref = reference.activation(F.linear(xd, w64.to_dense(), bd), act)
        rgx, rgv, rgb = torch.autograd.grad(ref, (xd, vd, bd), grad.double())
        assert_close_to_ref(gx, rgx, dgx, floor=KERNEL_FLOOR)
        assert_close_to_ref(gv, rgv, dgv, floor=KERNEL_FLOOR)
        assert_close_to_ref(gb, rgb, dgb, floor=KERNEL_FLOOR)


def test_fp32_uses_tf32_only_when_allowed(monkeypatch):
    w = _weights(torch.float32)[0]
    x = torch.randn(512, 200, device="cuda")
    ref = reference.linear(x, w)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    exact = sparse.linear(x, w)
    assert (exact.double() - ref).abs().max().item() < 1e-4
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    tf32 = sparse.linear(x, w)
    assert (tf32.double() - ref).abs().max().item() > (exact.double() - ref).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(dtype):
    bw, _, aw, cw = _weights(dtype)
    x = torch.randn(33, 200, device="cuda", dtype=dtype, requires_grad=True)
    bias = torch.randn(320, device="cuda", dtype=dtype, requires_grad=True)
    g = torch.randn(33, 320, device="cuda", dtype=dtype)
    bv, av = bw.values.detach().requires_grad_(), aw.values.detach().requires_grad_()
    torch.library.opcheck(ops.triton_bsr_linear, (x, bv, bw.row_offsets, bw.col_indices, bw.col_offsets,
                                                  bw.row_indices, bw.block_perm, 320, bias, "silu"))
    torch.library.opcheck(
        ops.triton_bsr_linear_grad_input, (g, bw.values, bw.col_offsets, bw.row_indices, bw.block_perm, 200)
    )
    torch.library.opcheck(ops.triton_bsr_sddmm, (g, x.detach(), bw.values, bw.row_offsets, bw.col_indices))
    cv = cw.values.detach().requires_grad_()
    torch.library.opcheck(ops.triton_bsr_linear, (x, cv, cw.row_offsets, cw.col_indices, cw.col_offsets,
                                                  cw.row_indices, cw.block_perm, 320, bias, "gelu"))
    torch.library.opcheck(
        ops.triton_bsr_linear_grad_input, (g, cw.values, cw.col_offsets, cw.row_indices, cw.block_perm, 200)
    )
    torch.library.opcheck(ops.triton_bsr_sddmm, (g, x.detach(), cw.values, cw.row_offsets, cw.col_indices))
    torch.library.opcheck(ops.triton_balanced_linear, (x, av, aw.indices, 64, bias, "gelu_tanh"))
    torch.library.opcheck(ops.triton_balanced_linear_grad_input, (g, aw.values, aw.indices, 64, 200))
    torch.library.opcheck(ops.triton_balanced_sddmm, (g, x.detach(), aw.indices, 64))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_compile_fullgraph_equals_eager(dtype):
    """The forward compiled with fullgraph=True (the Triton ops traced, not a graph break) and the backward
    AOTAutograd derives from their autograd formulas, against eager."""
    for w in _weights(dtype):
        bias = torch.randn(320, device="cuda", dtype=dtype)
        x = torch.randn(65, 200, device="cuda", dtype=dtype, requires_grad=True)
        w.values = w.values.detach().requires_grad_()
        grad = torch.randn(65, 320, device="cuda", dtype=dtype)

        def forward(x):
            return sparse.linear(x, w, bias, "gelu", backend="triton")

        results = []
        for fn in (forward, torch.compile(forward, fullgraph=True)):
            y = fn(x)
            gx, gv = torch.autograd.grad(y, (x, w.values), grad)
            results.append((y, gx, gv))
        torch._dynamo.reset()
        # Inductor may fuse the gelu backward around the kernels (bits may move); the dtype's default
        # tolerances of assert_close still catch a wrong kernel, layout or gradient.
        for compiled, eager in zip(results[1], results[0]):
            torch.testing.assert_close(compiled, eager)
