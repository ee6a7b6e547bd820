"""Triton kernels of the sparse package, installed as ``sparse.kernels``.

Kept import-light: a kernel module imports triton only when it is used, so ``import sparse`` works without
Triton or a GPU."""
