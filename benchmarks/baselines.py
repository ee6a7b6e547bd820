"""Contenders for the CPU op benchmark: our ops and every baseline a careful user could pick, built from one
dense weight so that all of them compute the same product on the same inputs.

Each builder returns :class:`Contender` objects whose ``fn()`` runs one call. With ``copies > 1`` (cold weights)
the builder makes that many independent copies of the weight and ``fn`` cycles through them.
"""

from __future__ import annotations

import warnings
from typing import Callable, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

import sparse
from sparse import BalancedSparseWeight, BlockSparseWeight, activations, reference
from sparse.runtime import onednn_unsupported

from .harness import Contender, cycling

SparseWeight = Union[BlockSparseWeight, BalancedSparseWeight]


def dense_bytes(W: torch.Tensor) -> int:
    return W.numel() * W.element_size()


def clone_weight(w: SparseWeight) -> SparseWeight:
    """An independent copy (new storage for values and every index tensor), without re-validating."""
    if isinstance(w, BlockSparseWeight):
        return BlockSparseWeight(
            w.values.clone(), w.row_offsets.clone(), w.col_indices.clone(), w.shape,
            col_offsets=w.col_offsets.clone(), row_indices=w.row_indices.clone(), block_perm=w.block_perm.clone(),
            validate=False,
        )
    return BalancedSparseWeight(w.values.clone(), w.indices.clone(), w.bank, w.shape[1], validate=False)


def _copies(first, copies: int, clone: Callable) -> list:
    return [first] + [clone(first) for _ in range(copies - 1)]


def describe(w: SparseWeight) -> dict:
    """Row columns for a sparse weight."""
    if isinstance(w, BlockSparseWeight):
        fmt, block = "bsr", f"{w.block[0]}x{w.block[1]}"
    else:
        fmt, block = "balanced", f"bank{w.bank}/keep{w.keep}"
    return {"format": fmt, "block": block, "density": w.density, "weight_bytes": w.nbytes}


# ---------------------------------------------------------------------------------------------------------------
# Forward: Y = X W^T
# ---------------------------------------------------------------------------------------------------------------
def dense_linear(W: torch.Tensor, X: torch.Tensor, copies: int = 1) -> List[Contender]:
    """``F.linear`` and oneDNN with a pre-packed weight, both in X's dtype; both are dense references."""
    W = W.to(X.dtype)
    Ws = _copies(W, copies, torch.clone)
    info = {"format": "dense", "block": "", "density": 1.0, "weight_bytes": dense_bytes(W), "dense_ref": True}
    ref = F.linear(X.double(), W.double())
    out = [Contender("F.linear", cycling(Ws, lambda w: F.linear(X, w)), {**info, "backend": "F.linear"}, ref)]
    reason = onednn_unsupported(X.dtype)
    if reason is not None:  # the harness records the contender as skipped, with the reason
        out.append(Contender("onednn", _refuse(reason), {**info, "backend": "onednn_prepacked"}, ref))
        return out
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, None) for w in Ws]
    out.append(
        Contender(
            "onednn", cycling(packed, lambda p: torch.ops.mkldnn._linear_pointwise(X, p, None, "none", [], "")),
            {**info, "backend": "onednn_prepacked"}, ref,
        )
    )
    return out


def _refuse(reason: str) -> Callable[[], torch.Tensor]:
    """A contender body for a path this CPU cannot run: the first call raises, naming why."""
    def run() -> torch.Tensor:
        raise RuntimeError(f"not run on this CPU: {reason}")
    return run


def ours_linear(
    w: SparseWeight, X: torch.Tensor, copies: int = 1, *, via_api: bool = True, suffix: str = ""
) -> List[Contender]:
    """Our kernel called as the raw op through its direct entry point (``sparse._C.bsr_linear_call`` /
    ``balanced_linear_call``: the typed dispatcher call, the same as ``torch.ops.sparsekern.*`` without its generic
    argument parsing, which is a large part of a small call's cost) and, if ``via_api``, through ``sparse.linear``
    (argument checks + backend choice + the same entry point)."""
    from sparse._ext import _C

    ws = _copies(w, copies, clone_weight)
    info = describe(w)
    name = f"{info['format']}:{info['block']}:{info['density']:.4f}{suffix}"
    if isinstance(w, BlockSparseWeight):
        op = _C.bsr_linear_call
        raw = lambda v: op(
            X,
            v.values,
            v.row_offsets,
            v.col_indices,
            v.col_offsets,
            v.row_indices,
            v.block_perm,
            v.shape[0],
            None,
            "none",
        )
    else:
        op = _C.balanced_linear_call
        raw = lambda v: op(X, v.values, v.indices, v.bank, None, "none")
    ref = reference.linear(X, w)
    out = [Contender(name, cycling(ws, raw), {**info, "backend": "sparsekern"}, ref)]
    if via_api:
        out.append(
            Contender(
                name + ":api", cycling(ws, lambda v: sparse.linear(X, v)), {**info, "backend": "sparse.linear"}, ref
            )
        )
    return out


def _clone_qweight(q):
    from sparse.quant import QuantizedBlockSparseWeight

    return QuantizedBlockSparseWeight(q.qvalues.clone(), q.w_scale.clone(), q.w_sum.clone(), q.row_offsets.clone(),
                                      q.col_indices.clone(), q.shape, q.block, validate=False)


def ours_int8_linear(w: BlockSparseWeight, X: torch.Tensor, copies: int = 1) -> List[Contender]:
    """Our int8 kernel (``sparsekern::bsr_linear_int8`` through its direct entry point) on the float weight ``w``
    quantized per output channel, activations quantized per token inside the op. Checked against the float64
    reference of the same integers."""
    from sparse._ext import _C
    from sparse.quant import QuantizedBlockSparseWeight, activation_qmax

    q = QuantizedBlockSparseWeight.from_float(w.to(dtype=torch.float32))
    qs = _copies(q, copies, _clone_qweight)
    info = {**describe(w), "format": "bsr-int8", "weight_bytes": q.nbytes, "backend": "sparsekern-int8"}
    name = f"int8:{info['block']}:{info['density']:.4f}"
    call = _C.bsr_linear_int8_call
    raw = lambda v: call(X, v.qvalues, v.w_scale, v.w_sum, v.row_offsets, v.col_indices, v.shape[0], v.block[1],
                         None, "none", 0.0)
    ref = reference.int8_linear(X, q, None, "none", activation_qmax())
    return [Contender(name, cycling(qs, raw), info, ref)]


def dense_int8_linear(W: torch.Tensor, X: torch.Tensor, copies: int = 1) -> List[Contender]:
    """PyTorch's own dense INT8: dynamic quantization (``torch.ao.quantization.quantize_dynamic``: int8 weights
    per tensor, activations quantized per call; fbgemm / oneDNN kernels of the ``x86`` engine), float32 in and out.
    Not a float reference: its result is only checked to be within 5% of the float one."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        mods = []
        for _ in range(copies):
            lin = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
            lin.weight.data.copy_(W.float())
            mods.append(quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8)[0])
    Xf = X.float()
    ref = F.linear(Xf.double(), W.double())
    err = float((mods[0](Xf).double() - ref).abs().max() / ref.abs().max())
    info = {"format": "dense-int8", "block": "", "density": 1.0, "weight_bytes": W.numel() + 8,
            "backend": "torch.ao.dynamic_int8"}
    if not err <= 0.05:
        return [Contender("torch.dynamic_int8", _refuse(f"error {err:.3f} of max |reference|"), info)]
    return [Contender("torch.dynamic_int8", cycling(mods, lambda m: m(Xf)), info)]


def dense_linear_act(W: torch.Tensor, X: torch.Tensor, bias: torch.Tensor, act: str) -> List[Contender]:
    """A dense Linear with ``bias`` followed by torch's ``act``, through ``F.linear`` and through oneDNN with a
    pre-packed weight, in X's dtype; both are dense references."""
    f = activations.get(act).forward  # torch's act, as a model runs it after a Linear
    W, bias = W.to(X.dtype), bias.to(X.dtype)
    info = {"format": "dense", "block": "", "density": 1.0, "weight_bytes": dense_bytes(W), "dense_ref": True,
            "notes": f"then torch's {act}"}
    ref = reference.activation(F.linear(X.double(), W.double(), bias.double()), act)
    out = [Contender(f"F.linear+{act}", lambda: f(F.linear(X, W, bias)), {**info, "backend": "F.linear"}, ref)]
    reason = onednn_unsupported(X.dtype)
    if reason is not None:  # the harness records the contender as skipped, with the reason
        out.append(Contender(f"onednn+{act}", _refuse(reason), {**info, "backend": "onednn_prepacked"}, ref))
        return out
    packed = torch.ops.mkldnn._reorder_linear_weight(W, None)
    out.append(
        Contender(
            f"onednn+{act}",
            lambda: f(torch.ops.mkldnn._linear_pointwise(X, packed, bias, "none", [], "")),
            {**info, "backend": "onednn_prepacked"},
            ref,
        )
    )
    return out


def ours_linear_act(w: SparseWeight, X: torch.Tensor, bias: torch.Tensor, act: str) -> List[Contender]:
    """Our kernel (direct entry point, as :func:`ours_linear`) with ``bias``: with ``act`` fused into its output
    stage (backend ``sparsekern``), followed by torch's ``act`` instead (``sparsekern+torch``: the unfused pair),
    and alone, without activation (``sparsekern:no_act``: what the activation costs on top)."""
    from sparse._ext import _C

    f = activations.get(act).forward  # torch's act, as a model runs it after a Linear
    bias = bias.to(w.dtype)
    info = describe(w)
    name = f"{info['format']}:{info['block']}:{info['density']:.4f}"
    if isinstance(w, BlockSparseWeight):
        raw = lambda a: _C.bsr_linear_call(X, w.values, w.row_offsets, w.col_indices, w.col_offsets, w.row_indices,
                                           w.block_perm, w.shape[0], bias, a)
    else:
        raw = lambda a: _C.balanced_linear_call(X, w.values, w.indices, w.bank, bias, a)
    ref = reference.linear(X, w, bias, act)
    return [
        Contender(f"{name}:fused", lambda: raw(act), {**info, "backend": "sparsekern", "notes": f"{act} fused"}, ref),
        Contender(
            f"{name}:unfused",
            lambda: f(raw("none")),
            {**info, "backend": "sparsekern+torch", "notes": f"then torch's {act}"},
            ref,
        ),
        Contender(
            f"{name}:no_act",
            lambda: raw("none"),
            {**info, "backend": "sparsekern:no_act", "notes": "no activation"},
            reference.linear(X, w, bias),
        ),
    ]


def with_threads(c: Contender, n: int) -> Contender:
    """The same contender run with ``torch.set_num_threads(n)`` (restored after each call), so that thread
    scaling is measured inside one interleaved measurement."""
    fn = c.fn

    def run():
        prev = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            return fn()
        finally:
            torch.set_num_threads(prev)

    return Contender(f"{c.name}@{n}t", run, {**c.info, "threads": n}, c.expected, c.as_result)


def torch_sparse_linear(
    Wd: torch.Tensor, X: torch.Tensor, block: Optional[int], tag: str, copies: int = 1, *, user_form: bool = False
) -> List[Contender]:
    """``torch.sparse`` CSR (``block=None``) or BSR weights holding exactly ``Wd``'s nonzeros, in the fastest
    call form ``torch.mm(Ws, X^T)^T`` and, if ``user_form``, the ``F.linear(X, Ws)`` form. fp32 only on the CPU
    (bf16 CSR/BSR raise NotImplementedError in torch 2.13)."""
    with warnings.catch_warnings():  # torch.sparse's "beta state" notice is not news to a benchmark's reader
        warnings.filterwarnings("ignore", message="Sparse (CSR|BSR) tensor support is in beta")
        Ws0 = Wd.to_sparse_csr() if block is None else Wd.to_sparse_bsr((block, block))
    fmt = "csr" if block is None else "torch_bsr"
    nbytes = sum(t.numel() * t.element_size() for t in (Ws0.values(), Ws0.crow_indices(), Ws0.col_indices()))
    Ws = _copies(Ws0, copies, torch.clone)
    info = {
        "format": fmt,
        "block": "" if block is None else f"{block}x{block}",
        "weight_bytes": nbytes,
        "backend": "torch.sparse",
    }
    ref = F.linear(X.double(), Wd.double())
    out = [Contender(f"{fmt}:{tag}", cycling(Ws, lambda w: torch.mm(w, X.t().contiguous()).t()), info, ref)]
    if user_form:
        out.append(Contender(f"{fmt}:{tag}:F.linear", cycling(Ws, lambda w: F.linear(X, w)),
                             {**info, "backend": "torch.sparse:F.linear"}, ref))
    return out


def scipy_linear(Wd: torch.Tensor, X: torch.Tensor, tag: str, copies: int = 1) -> List[Contender]:
    """scipy.sparse CSR: ``W @ X^T`` (single-threaded), fp32."""
    import scipy.sparse

    W0 = scipy.sparse.csr_matrix(Wd.float().numpy())
    Ws = [W0] + [W0.copy() for _ in range(copies - 1)]
    Xt = np.ascontiguousarray(X.float().numpy().T)
    nbytes = W0.data.nbytes + W0.indices.nbytes + W0.indptr.nbytes
    info = {"format": "csr", "block": "", "weight_bytes": nbytes, "backend": "scipy"}
    ref = F.linear(X.double(), Wd.double())
    return [Contender(f"scipy:{tag}", cycling(Ws, lambda w: w @ Xt), info, ref, lambda y: torch.from_numpy(y).t())]


# ---------------------------------------------------------------------------------------------------------------
# Input gradient: dX = dY W, and weight gradient on the pattern: (dY^T X)[pattern]
# ---------------------------------------------------------------------------------------------------------------
def dense_grad_input(W: torch.Tensor, dY: torch.Tensor) -> List[Contender]:
    """``dY @ W`` with torch.mm and with oneDNN (W^T pre-packed as a linear weight)."""
    W = W.to(dY.dtype)
    info = {"format": "dense", "block": "", "density": 1.0, "weight_bytes": dense_bytes(W), "dense_ref": True}
    ref = dY.double() @ W.double()
    mm = Contender("mm", lambda: torch.mm(dY, W), {**info, "backend": "torch.mm"}, ref)
    reason = onednn_unsupported(dY.dtype)
    if reason is not None:
        return [mm, Contender("onednn", _refuse(reason), {**info, "backend": "onednn_prepacked"}, ref)]
    Wt_packed = torch.ops.mkldnn._reorder_linear_weight(W.t().contiguous(), None)
    return [
        mm,
        Contender(
            "onednn", lambda: torch.ops.mkldnn._linear_pointwise(dY, Wt_packed, None, "none", [], ""),
            {**info, "backend": "onednn_prepacked"}, ref,
        ),
    ]


def ours_grad_input(w: SparseWeight, dY: torch.Tensor) -> List[Contender]:
    info = describe(w)
    name = f"{info['format']}:{info['block']}:{info['density']:.4f}"
    if isinstance(w, BlockSparseWeight):
        op = torch.ops.sparsekern.bsr_linear_grad_input.default
        fn = lambda: op(dY, w.values, w.col_offsets, w.row_indices, w.block_perm, w.shape[1])
    else:
        op = torch.ops.sparsekern.balanced_linear_grad_input.default
        fn = lambda: op(dY, w.values, w.indices, w.bank, w.shape[1])
    return [Contender(name, fn, {**info, "backend": "sparsekern"}, reference.linear_grad_input(dY, w))]


def dense_sddmm(W: torch.Tensor, dY: torch.Tensor, X: torch.Tensor) -> List[Contender]:
    """The dense weight gradient ``dY^T @ X`` [out, in]."""
    info = {
        "format": "dense",
        "block": "",
        "density": 1.0,
        "weight_bytes": dense_bytes(W.to(X.dtype)),
        "dense_ref": True,
    }
    return [Contender("mm", lambda: torch.mm(dY.t(), X), {**info, "backend": "torch.mm"}, dY.double().t() @ X.double())]


def ours_sddmm(w: SparseWeight, dY: torch.Tensor, X: torch.Tensor) -> List[Contender]:
    info = describe(w)
    name = f"{info['format']}:{info['block']}:{info['density']:.4f}"
    if isinstance(w, BlockSparseWeight):
        op = torch.ops.sparsekern.bsr_sddmm.default
        fn = lambda: op(dY, X, w.values, w.row_offsets, w.col_indices)
    else:
        op = torch.ops.sparsekern.balanced_sddmm.default
        fn = lambda: op(dY, X, w.indices, w.bank)
    return [Contender(name, fn, {**info, "backend": "sparsekern"}, reference.sddmm(dY, X, w))]


def build_weight(W: torch.Tensor, spec: Sequence, dtype: torch.dtype) -> SparseWeight:
    """``spec`` is ("bsr", block, sparsity) or ("balanced", bank, keep); built from fp32 ``W``, then cast."""
    kind = spec[0]
    if kind == "bsr":
        _, block, sparsity = spec
        w = BlockSparseWeight.from_dense(W, block, sparsity=sparsity)
    elif kind == "balanced":
        _, bank, keep = spec
        w = BalancedSparseWeight.from_dense(W, bank, keep)
    else:
        raise ValueError(f"unknown weight spec {spec!r}: expected ('bsr', block, sparsity) or ('balanced', bank, keep)")
    return w if dtype == W.dtype else w.to(dtype=dtype)


# ---------------------------------------------------------------------------------------------------------------
# GPU baselines (for benchmarks/gpu_*.py; time them with harness.measure(..., device="cuda"))
# ---------------------------------------------------------------------------------------------------------------
def gpu_linear_baselines(
    W: torch.Tensor, X: torch.Tensor, Wd: Optional[torch.Tensor] = None, block: int = 32,
    skipped: Optional[List[str]] = None,
) -> List[Contender]:
    """Dense and sparse torch baselines on a CUDA device, all computing ``X @ W^T`` in X's dtype.

    - ``cublas``: ``F.linear`` (dense reference, ``dense_ref=True``).
    - ``torch_bsr``: ``F.linear(X, Wd as sparse_bsr)``; for fp16/bf16 torch runs its Triton BSR kernels.
    - ``semi_structured_2:4``: ``torch.sparse.to_sparse_semi_structured`` of ``W`` pruned 2:4 by magnitude (fp16/
      bf16, shapes the CUTLASS/cuSPARSELt kernels accept; left out otherwise).
    ``Wd`` is the pruned dense weight of the sparse contender being compared (default: no BSR baseline). Why a
    baseline could not be built is appended to ``skipped``. (Written for the GPU benchmarks; not run on a GPU yet.)
    """
    W = W.to(device=X.device, dtype=X.dtype)
    info = {"format": "dense", "block": "", "density": 1.0, "weight_bytes": dense_bytes(W)}
    out = [Contender("cublas", lambda: F.linear(X, W), {**info, "backend": "cublas", "dense_ref": True})]
    if Wd is not None:
        Wb = Wd.to(device=X.device, dtype=X.dtype).to_sparse_bsr((block, block))
        density = Wb.values().numel() / W.numel()
        out.append(
            Contender(
                "torch_bsr",
                lambda: F.linear(X, Wb),
                {
                    "format": "torch_bsr",
                    "block": f"{block}x{block}",
                    "density": density,
                    "backend": "torch.sparse(triton)",
                    "weight_bytes": Wb.values().numel() * Wb.element_size()
                    + (Wb.col_indices().numel() + Wb.crow_indices().numel()) * 8,
                },
            )
        )
    if X.dtype in (torch.float16, torch.bfloat16):
        try:
            groups = W.abs().reshape(W.shape[0], -1, 4)
            keep = groups.topk(2, dim=-1).indices
            mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True).reshape(W.shape)
            W24 = torch.sparse.to_sparse_semi_structured(W * mask)
            F.linear(X, W24)
            out.append(
                Contender(
                    "semi_structured",
                    lambda: F.linear(X, W24),
                    {
                        "format": "semi_structured_2:4",
                        "block": "2:4",
                        "density": 0.5,
                        "backend": "torch.sparse.semi_structured",
                        "weight_bytes": dense_bytes(W) // 2 + dense_bytes(W) // 16,  # values + ~2 bits of metadata each
                    },
                )
            )
        except (RuntimeError, ValueError, NotImplementedError) as exc:  # shape or GPU the 2:4 kernels refuse
            if skipped is not None:
                skipped.append(
                    f"semi_structured 2:4 {tuple(W.shape)} {X.dtype}: {type(exc).__name__}: {str(exc)[:160]}"
                )
    return out
