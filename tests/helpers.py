"""Shared test utilities: the tolerance rule of the whole suite.

Ours is compared with the float64 reference, and allowed at most twice the error that dense torch makes in the
same dtype on the same data, plus a floor of a few units in the last place (flash-attention's rule)."""

from __future__ import annotations

import torch

_ULP = {torch.float64: 2.0**-52, torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def assert_close_to_ref(ours: torch.Tensor, ref: torch.Tensor, dense: torch.Tensor, what: str = "", k: int = 4096) -> None:
    """ours, dense: results in the working dtype; ref: float64 reference of the same computation; k: the
    length of the reductions (an upper bound is fine).

    In float64 dense torch *is* the reference (its error is 0), so the floor alone must cover the reordering of
    a k-term sum: ~sqrt(k) ulp. In the other dtypes dense torch's own rounding dominates and the floor only
    guards against a zero dense error."""
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != reference {tuple(ref.shape)}"
    assert ours.dtype == dense.dtype, f"{what}: dtype {ours.dtype} != {dense.dtype}"
    ref = ref.double()
    err = (ours.double() - ref).abs().max().item() if ref.numel() else 0.0
    err_dense = (dense.double() - ref).abs().max().item() if ref.numel() else 0.0
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    floor = 4 * _ULP[ours.dtype] * scale * (k**0.5 if ours.dtype == torch.float64 else 1.0)
    assert err <= 2 * err_dense + floor, (
        f"{what}: max error {err:.3g} > 2 x dense torch error {err_dense:.3g} + floor {floor:.3g}"
    )
