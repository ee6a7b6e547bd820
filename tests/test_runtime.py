"""sparse.runtime.tune_malloc: fixed glibc malloc thresholds, so activation-sized buffers are reused, not refaulted."""

import platform
import subprocess
import sys
import textwrap

import pytest

from sparse import runtime

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# Mallocs three 30 MiB buffers, writes them and frees them, as a forward pass does with its activations (through
# libc directly, so no other allocation lands between them), and prints the minor page faults of the last 20 of 30
# rounds. glibc's adaptive thresholds settle at the freed size (mmap 30 MiB, trim 60 MiB), so the memory freed at
# the top of the heap goes back to the kernel each round and is faulted in again.
_PROBE = textwrap.dedent("""
    import ctypes, resource, sys
    from sparse import runtime
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    if sys.argv[1] == "tuned":
        assert runtime.tune_malloc() is True
    N = 30 << 20
    def round_():
        ps = [libc.malloc(N) for _ in range(3)]
        for p in ps:
            libc.memset(p, 1, N)
        for p in reversed(ps):
            libc.free(p)
    for _ in range(10):
        round_()
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        round_()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
""")
def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # two fresh interpreters faulting in 2 x 1.8 GB
@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_tuned_malloc_reuses_large_buffers():
    # 20 rounds touch 20 * 90 MiB = 460,800 pages of 4 KiB
    default, tuned = _faults("default"), _faults("tuned")
    assert default > 100_000, f"the probe no longer shows the problem it guards against ({default} faults untuned)"
    assert tuned < 1_000, f"{tuned} minor faults in 20 rounds with fixed thresholds ({default} untuned)"


def test_tune_malloc_rejects_out_of_range():
    with pytest.raises(ValueError, match="mmap_threshold=0"):
        runtime.tune_malloc(mmap_threshold=0)
    with pytest.raises(ValueError, match=r"mmap_threshold=67108864: expected 1 \.\. 33554432"):
        runtime.tune_malloc(mmap_threshold=64 << 20)
    with pytest.raises(ValueError, match="trim_threshold=-1"):
        runtime.tune_malloc(trim_threshold=-1)


def test_env_opt_out(monkeypatch):
    monkeypatch.setenv("SPARSEKERN_TUNE_MALLOC", "0")
    assert runtime.tune_malloc_from_env() is False


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_tune_malloc_records_thresholds():
    assert runtime.tune_malloc(mmap_threshold=32 << 20, trim_threshold=1 << 30) is True
    assert runtime.malloc_tuning() == {"mmap_threshold": 32 << 20, "trim_threshold": 1 << 30}


# ---- dtypes this CPU computes natively, and the warning where it does not ----------------------------------------
import os  # noqa: E402
import warnings  # noqa: E402

import torch  # noqa: E402

import sparse  # noqa: E402
from sparse._ext import available  # noqa: E402

needs_ext = pytest.mark.skipif(not available(), reason="sparse._C not built")


@needs_ext
def test_dtype_support_follows_the_cpu_features():
    sup = runtime.dtype_support()
    assert set(sup) == {"float32", "float64", "bfloat16", "float16"}
    assert sup["float32"]["native"] and sup["float64"]["native"]
    feats = sparse._ext._C.cpu_features()
    assert sup["bfloat16"]["native"] == bool(feats["avx512bf16"])
    assert runtime.native_dtype(torch.float32) and not runtime.native_dtype(torch.int8)
    line = runtime.cpu_summary()
    assert (
        line.startswith("cpu: ")
        and f"code path {sparse._ext._C.get_isa()}" in line
        and "native dtypes: float32" in line
    )


@pytest.mark.slow  # two fresh interpreters
@needs_ext
def test_capped_cpu_reports_bf16_emulated():
    """Under SPARSEKERN_ISA=avx2 the package answers as an AVX2-only CPU: bf16 is not native, and `sparse info`
    says so."""
    env = {**os.environ, "SPARSEKERN_ISA": "avx2"}
    probe = "import sparse; s = sparse.runtime.dtype_support(); print(s['bfloat16']['native'], s['float32']['native'])"
    r = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "True"]
    r = subprocess.run([sys.executable, "-m", "sparse", "info"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "bfloat16 emulated, slow (no AVX512_BF16" in r.stdout and "SPARSEKERN_ISA=avx2" in r.stdout, r.stdout


def _pretend_no_bf16(monkeypatch):
    sup = {k: dict(v) for k, v in runtime.dtype_support().items()}
    sup["bfloat16"] = {"native": False, "why": "no AVX512_BF16: converted in software"}
    monkeypatch.setattr(runtime, "dtype_support", lambda: sup)
    monkeypatch.setattr(runtime, "CHECKED_DTYPES", set())


@needs_ext
def test_bf16_on_a_cpu_without_it_warns_once_naming_float32(monkeypatch):
    _pretend_no_bf16(monkeypatch)
    m = sparse.BlockSparseLinear.from_linear(torch.nn.Linear(64, 32), block=16, sparsity=0.5).to(torch.bfloat16)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    with pytest.warns(RuntimeWarning, match=r"bfloat16 on this CPU .* is slow.*Use float32") as rec:
        y = m(x)
    assert len([w for w in rec if issubclass(w.category, RuntimeWarning)]) == 1
    assert "BlockSparseLinear" in str(rec[0].message) and "0.40 s in float32" in str(rec[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(m(x), y)  # once per process and dtype
        m.float()(x.float())  # float32 never warns


@needs_ext
def test_sparsify_warns_for_bf16_without_native_support(monkeypatch):
    _pretend_no_bf16(monkeypatch)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64)).to(torch.bfloat16)
    with pytest.warns(RuntimeWarning, match="sparse.sparsify: bfloat16 on this CPU"):
        sparse.sparsify(model, "block", 0.5, block=16, skip_if_slower=False)


@needs_ext
def test_no_warning_where_bf16_is_native(monkeypatch):
    sup = {k: dict(v) for k, v in runtime.dtype_support().items()}
    sup["bfloat16"] = {"native": True, "why": "AVX512_BF16"}
    monkeypatch.setattr(runtime, "dtype_support", lambda: sup)
    monkeypatch.setattr(runtime, "CHECKED_DTYPES", set())
    m = sparse.BlockSparseLinear.from_linear(torch.nn.Linear(64, 32), block=16, sparsity=0.5).to(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m(torch.randn(2, 64, dtype=torch.bfloat16))


def test_onednn_refusal_is_reported_not_raised():
    assert runtime.onednn_unsupported(torch.float32) is None
    reason = runtime.onednn_unsupported(torch.int32)  # oneDNN has no int32 linear
    assert reason is not None and "torch.int32" in reason
