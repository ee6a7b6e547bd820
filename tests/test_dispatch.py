"""Capability dispatch: each backend states every reason it cannot run a (weight, input) pair; the chooser takes
the first backend with none, and its error lists them all. A GPU machine is simulated by letting the environment
checks (ops._refusal: extension, CUDA, triton) pass for the GPU backends on a "cuda" device."""

from __future__ import annotations

import importlib
import sys
from types import SimpleNamespace

import pytest
import torch

from sparse import BalancedSparseWeight, BlockSparseWeight, ops


def _bsr(dtype=torch.float32, shape=(64, 128)):
    dense = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    return BlockSparseWeight.from_dense(dense.to(dtype), block=16, sparsity=0.5)


def _balanced(dtype=torch.float16, shape=(64, 128), bank=4, keep=2):
    dense = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    return BalancedSparseWeight.from_dense(dense.to(dtype), bank=bank, keep=keep)


@pytest.fixture
def gpu_machine(monkeypatch):
    """As on a machine with a GPU, triton and a CUDA build: the GPU backends' environment checks pass on cuda."""
    real = ops._refusal

    def refusal(backend, device):
        if backend in ("triton", "cuda") and torch.device(device).type == "cuda":
            return None
        return real(backend, device)

    monkeypatch.setattr(ops, "_refusal", refusal)
    monkeypatch.setattr(ops, "_ABLE", {})


@pytest.fixture
def no_cache(monkeypatch):
    """select_backend keeps its successes: start with none, so that each test's environment is checked."""
    monkeypatch.setattr(ops, "_ABLE", {})


def _build(monkeypatch, has_cuda: bool) -> None:
    """As if sparse._C loaded, built with (or without) CUDA kernels."""
    monkeypatch.setattr(ops._ext, "available", lambda: True)
    monkeypatch.setattr(ops._ext, "require", lambda: SimpleNamespace(has_cuda=lambda: has_cuda))


def _refused(device, backend=None, weight=None) -> str:
    """The message of the RuntimeError select_backend raises."""
    with pytest.raises(RuntimeError) as info:
        ops.select_backend(device, backend, weight)
    return str(info.value)


def test_float64_goes_to_cuda_cpp_not_triton(gpu_machine):
    """The case that reached kernels/bsr.py as a TypeError: Triton has no float64 kernels, CUDA C++ has."""
    w64, w32 = _bsr(torch.float64), _bsr(torch.float32)
    assert ops.not_supported_reasons("triton", w64, device="cuda") == [
        "has no float64 kernels (it computes in float16, bfloat16, float32)"]
    assert ops.not_supported_reasons("cuda", w64, device="cuda") == []
    assert ops.select_backend("cuda", weight=w64) == "cuda"
    assert ops.select_backend("cuda", weight=w32) == "triton"  # the preference order, per dtype
    assert ops.select_backend("cuda", weight=w64) == "cuda"  # cached per dtype, not per device only


def test_refusal_error_lists_every_reason(gpu_machine):
    w64 = _bsr(torch.float64)
    with pytest.raises(RuntimeError) as info:
        ops.select_backend("cuda", "triton", weight=w64)
    msg = str(info.value)
    assert msg.startswith("no sparse backend can run on cuda (float64 BlockSparseWeight): triton: ")
    assert "has no float64 kernels" in msg
    with pytest.raises(RuntimeError) as info:
        ops.select_backend("meta", weight=w64)
    msg = str(info.value)
    for name in ops.BACKENDS:
        assert f"{name}: runs on" in msg, msg
    assert "cpu: runs on CPU tensors only, got device meta" in msg


def test_each_reason_of_a_pair():
    w = _bsr(torch.float32)
    assert ops.not_supported_reasons("cpu", w) == []
    assert ops.not_supported_reasons("cpu", w, torch.randn(3, 128)) == []
    bad_dtype = ops.not_supported_reasons("cpu", w, torch.randn(3, 128, dtype=torch.float64))
    assert bad_dtype == ["x has dtype torch.float64 but the weight has torch.float32"]
    bad_shape = ops.not_supported_reasons("cpu", w, torch.randn(3, 127))
    assert bad_shape == ["x must end in 128 features, got shape (3, 127)"]
    bad_device = ops.not_supported_reasons("cpu", w, torch.randn(3, 128, device="meta"))
    assert bad_device == ["x is on meta but the weight is on cpu"]
    gpu = ops.not_supported_reasons("cuda", w)
    assert gpu and gpu[0].startswith("runs on CUDA tensors only, got device cpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.not_supported_reasons("tpu", w)
    with pytest.raises(ValueError, match="needs a weight, an input or a device"):
        ops.not_supported_reasons("cpu")


def test_backend_status_with_a_weight(gpu_machine):
    status = ops.backend_status("cuda", _bsr(torch.float64))
    assert status["cuda"] is None
    assert status["triton"] == "has no float64 kernels (it computes in float16, bfloat16, float32)"
    assert status["cpu"].startswith("runs on CPU tensors only")
    assert ops.backend_status("cpu")["cpu"] is None


def test_backend_dtypes_match_the_triton_kernels():
    pytest.importorskip("triton")
    from sparse.kernels import bsr

    assert set(ops.BACKEND_DTYPES["triton"]) == set(bsr._DTYPES)


def test_nm24_reasons():
    """The 2:4 tensor-core path's rule, reason by reason (on this CPU machine the device reason always remains)."""
    ok = _balanced(torch.float16)
    device_only = ops.nm24_reasons(ok)
    assert len(device_only) == 1 and "CUDA C++" in device_only[0]
    reasons = ops.nm24_reasons(_balanced(torch.float32, bank=8, keep=2, shape=(40, 96)))
    assert "the weight is not 2:4 balanced (bank 4, keep 2)" in reasons
    assert "dtype torch.float32 is not float16 or bfloat16" in reasons
    assert "shape (40, 96) is not a multiple of (16, 64)" in reasons
    assert "the weight is not 2:4 balanced (bank 4, keep 2)" in ops.nm24_reasons(_bsr(torch.float16))
    x = torch.randn(2, 128, dtype=torch.float16, requires_grad=True)
    assert "a gradient is required (nm24_linear has no autograd)" in ops.nm24_reasons(ok, x)
    with torch.no_grad():
        assert not any("gradient" in r for r in ops.nm24_reasons(ok, x))


def test_module_on_a_gpu_takes_cuda_for_float64(gpu_machine, monkeypatch):
    """nn modules choose with the weight: a float64 layer is not given to Triton."""
    monkeypatch.setattr(ops, "_TIMINGS", {})
    w = _bsr(torch.float64)
    assert ops.fastest_backend(w) == "cpu"  # on the CPU only the CPU backend is able: nothing measured
    able = [n for n in ops.BACKENDS if not ops.not_supported_reasons(n, w, device="cuda")]
    assert able == ["cuda"]


# ---- each environment reason of ops._refusal, as select_backend's error reports it

def test_refusal_extension_did_not_load(monkeypatch, no_cache):
    monkeypatch.setattr(ops._ext, "available", lambda: False)
    monkeypatch.setattr(ops._ext, "_IMPORT_ERROR", ImportError("_C.so: cannot open shared object file"))
    reason = "the sparse._C extension did not load (_C.so: cannot open shared object file)"
    assert f"cpu: {reason} | triton: " in _refused("cpu", weight=_bsr())
    assert _refused("cpu", "cpu") == f"no sparse backend can run on cpu: cpu: {reason}"
    assert _refused("cuda", "cuda", _bsr()) == (
        f"no sparse backend can run on cuda (float32 BlockSparseWeight): cuda: {reason}")


def test_refusal_no_cuda_device(monkeypatch, no_cache):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    reason = "no CUDA device is available (torch.cuda.is_available() is False)"
    assert _refused("cuda", "triton", _bsr()) == (
        f"no sparse backend can run on cuda (float32 BlockSparseWeight): triton: {reason}")


def test_refusal_triton_not_importable(monkeypatch, no_cache):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "sparse.triton_backend", None)  # makes the import raise ImportError
    with pytest.raises(ImportError) as exc:
        importlib.import_module("sparse.triton_backend")
    reason = f"triton is not importable ({exc.value}); pip install triton"
    assert _refused("cuda", "triton", _bsr()) == (
        f"no sparse backend can run on cuda (float32 BlockSparseWeight): triton: {reason}")


def test_refusal_build_without_cuda_kernels(monkeypatch, no_cache):
    _build(monkeypatch, has_cuda=False)
    reason = "this build of sparse._C has no CUDA kernels (reinstall with a CUDA torch and CUDA_HOME set)"
    assert _refused("cuda", "cuda", _bsr()) == (
        f"no sparse backend can run on cuda (float32 BlockSparseWeight): cuda: {reason}")
    assert _refused("cuda", weight=_bsr(torch.float64)).endswith(f" | cuda: {reason}")  # Triton: no float64


# ---- the environment reasons of nm24_reasons (the 2:4 path has no error: linear takes the general op instead)

def test_nm24_reasons_build_without_cuda_kernels(monkeypatch):
    w = _balanced(torch.float16)
    monkeypatch.setattr(BalancedSparseWeight, "device", property(lambda self: torch.device("cuda")))
    _build(monkeypatch, has_cuda=True)
    assert ops.nm24_reasons(w) == []
    _build(monkeypatch, has_cuda=False)
    assert ops.nm24_reasons(w) == ["this build of sparse._C has no CUDA kernels"]
    monkeypatch.setattr(ops._ext, "available", lambda: False)
    assert ops.nm24_reasons(w) == ["this build of sparse._C has no CUDA kernels"]


def test_nm24_reasons_while_compiling(monkeypatch):
    w = _balanced(torch.float16)
    monkeypatch.setattr(BalancedSparseWeight, "device", property(lambda self: torch.device("cuda")))
    _build(monkeypatch, has_cuda=True)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert ops.nm24_reasons(w) == ["torch.compile traces the general balanced op"]
