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
