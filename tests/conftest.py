"""Test-session set-up. Triton kernels run under the interpreter on CPU tensors unless a GPU is present; the
variable must be set before anything imports triton (torch.compile may), hence here."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
