"""Process-wide settings that decide CPU inference speed as much as the kernels do.

glibc's ``malloc`` serves blocks above its *mmap threshold* with fresh ``mmap`` pages and gives free memory at
the top of its heap back to the kernel above its *trim threshold*. Both thresholds adapt at run time, and a
Transformer's forward allocates and frees activation buffers of several MB per layer (BERT-base at batch 8,
sequence 128: 3 MB per Linear output, 12.6 MB for the intermediate one). Depending on the order in which earlier
code happened to allocate, the thresholds can settle where every one of those buffers is faulted in again on
every call: tens of thousands of page faults per BERT-base forward, and a forward time that changes from one
process to the next (docs/measurements.md). That is why PyTorch's CPU tuning guide recommends preloading jemalloc
or tcmalloc. :func:`tune_malloc` gives glibc fixed thresholds instead, with no preload.

It is process-global, so the library never calls it on import: applications opt in. ``python -m sparse`` and the
benchmarks call it at start-up, before any model exists, so dense and sparse models alike run with it
(``SPARSEKERN_TUNE_MALLOC=0`` in the environment turns that off).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform
import warnings
from typing import Dict, Optional

import torch

M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20  # glibc refuses more on 64-bit (HEAP_MAX_SIZE / 2)

_applied: Optional[dict] = None


def tune_malloc(mmap_threshold: int = MMAP_THRESHOLD_MAX, trim_threshold: int = 1 << 30) -> bool:
    """Fixes glibc malloc's mmap threshold (blocks up to it come from the reusable heap; default 32 MiB, the most
    glibc allows) and trim threshold (free heap memory kept before any is returned to the kernel; default 1 GiB).
    Returns True when applied, False where the C library is not glibc (nothing is changed there).

    Raises ``ValueError`` for a threshold out of range, and ``OSError`` if glibc refuses a value."""
    global _applied
    if not 0 < int(mmap_threshold) <= MMAP_THRESHOLD_MAX:
        raise ValueError(f"mmap_threshold={mmap_threshold}: expected 1 .. {MMAP_THRESHOLD_MAX} bytes (glibc's maximum)")
    if not 0 <= int(trim_threshold) < 1 << 31:
        raise ValueError(f"trim_threshold={trim_threshold}: expected 0 .. {(1 << 31) - 1} bytes (an int for mallopt)")
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    for name, param, value in (("M_MMAP_THRESHOLD", M_MMAP_THRESHOLD, mmap_threshold),
                               ("M_TRIM_THRESHOLD", M_TRIM_THRESHOLD, trim_threshold)):
        if libc.mallopt(ctypes.c_int(param), ctypes.c_int(int(value))) != 1:
            raise OSError(f"glibc mallopt({name}, {value}) refused the value")
    _applied = {"mmap_threshold": int(mmap_threshold), "trim_threshold": int(trim_threshold)}
    return True


def malloc_tuning() -> Optional[dict]:
    """The thresholds :func:`tune_malloc` set in this process, or None if it has not run (or could not)."""
    return None if _applied is None else dict(_applied)


def tune_malloc_from_env() -> bool:
    """:func:`tune_malloc` unless ``SPARSEKERN_TUNE_MALLOC=0``; what the CLI and the benchmarks call at start-up."""
    if os.environ.get("SPARSEKERN_TUNE_MALLOC", "1").strip() in ("0", "false", "no", "off"):
        return False
    return tune_malloc()


# ---- dtypes this CPU computes natively ------------------------------------------------------------------------
# Without native bf16 (AVX512_BF16 or AMX) or fp16 (AVX512_FP16 or AMX-FP16) arithmetic, torch's CPU kernels for
# those dtypes convert element by element and run several times slower than in fp32, so on such CPUs float32 is
# the fast dtype. _MEASURED is the measurement the warning quotes (docs/measurements.md has where and when).
_MEASURED = ("measured on an AVX2-only CPU: BERT-base with 90% block-32 Linears ran a batch-8 forward in 2.5-2.9 s "
             "in bfloat16 against 0.40 s in float32")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what ``platform`` knows."""
    info: Dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "cpu family", "model") and key not in info:
                    info[key] = value.strip()
                if not line.strip() and info:
                    break
    except OSError:
        pass
    if "model name" not in info:
        return platform.processor() or platform.machine()
    # A VM may show a generic name ("AMD EPYC"): family and model tell the generation apart.
    extra = f" (family {info['cpu family']}, model {info['model']})" if "cpu family" in info and "model" in info else ""
    return info["model name"] + extra


@functools.lru_cache(maxsize=None)
def dtype_support() -> Dict[str, Dict[str, object]]:
    """Per dtype: ``{"native": bool, "why": str}``, whether this CPU computes the dtype in hardware. The features
    are the extension's, so ``SPARSEKERN_ISA=avx2`` answers as an AVX2-only CPU would."""
    from . import _ext

    feats = dict(_ext._C.cpu_features()) if _ext.available() else {}
    avx512 = bool(feats.get("avx512f"))
    bf16 = bool(feats.get("avx512bf16"))
    # torch's own test (oneDNN's avx512_core_fp16 / AMX-FP16 / AVX-NE-CONVERT), within the extension's cap.
    fp16 = avx512 and bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    return {
        "float32": {"native": True, "why": "FMA" if feats.get("fma") else "scalar/SSE"},
        "float64": {"native": True, "why": "FMA at half the float32 rate" if feats.get("fma") else "scalar/SSE"},
        "bfloat16": {"native": bf16, "why": "AVX512_BF16" if bf16 else "no AVX512_BF16: converted in software"},
        "float16": {
            "native": fp16,
            "why": "AVX512_FP16 / AMX-FP16" if fp16 else "no AVX512_FP16: converted in software",
        },
    }


def native_dtype(dtype: torch.dtype) -> bool:
    """Whether this CPU computes ``dtype`` natively (see :func:`dtype_support`); False for non-float dtypes."""
    entry = dtype_support().get(str(dtype).replace("torch.", ""))
    return bool(entry and entry["native"])


# dtypes already checked in this process: a forward tests membership inline and calls warn_if_slow_dtype only
# the first time it sees a dtype.
CHECKED_DTYPES: set = set()


def warn_if_slow_dtype(dtype: torch.dtype, where: str = "") -> bool:
    """Warns once per process and dtype when ``dtype`` (bf16 or fp16) runs on a CPU that has no native arithmetic
    for it, naming the measured alternative. Returns True if this call warned."""
    if dtype in CHECKED_DTYPES:
        return False
    CHECKED_DTYPES.add(dtype)
    if dtype not in (torch.bfloat16, torch.float16) or native_dtype(dtype):
        return False
    name = str(dtype).replace("torch.", "")
    why = dtype_support()[name]["why"]
    warnings.warn(
        f"{where + ': ' if where else ''}{name} on this CPU ({cpu_model()}) is slow: {why}, so torch's dense "
        f"{name} ops (attention, LayerNorm, the layers left dense) are emulated ({_MEASURED}). "
        "Use float32 here (model.float(); the CLI's --dtype float32).",
        RuntimeWarning, stacklevel=3,
    )
    return True


@functools.lru_cache(maxsize=None)
def onednn_unsupported(dtype: torch.dtype) -> Optional[str]:
    """Why oneDNN's pre-packed linear (``torch.ops.mkldnn._reorder_linear_weight``) cannot run in ``dtype`` on this
    CPU, or None if it can: torch refuses bf16 there without AVX512BW/VL/DQ or AVX-NE-CONVERT, for example."""
    try:
        w = torch.ops.mkldnn._reorder_linear_weight(torch.zeros(8, 8, dtype=dtype), None)
        torch.ops.mkldnn._linear_pointwise(torch.zeros(2, 8, dtype=dtype), w, None, "none", [], "")
    except (RuntimeError, NotImplementedError) as exc:
        return f"oneDNN pre-packed linear in {dtype}: {str(exc).splitlines()[0][:200]}"
    return None


def cpu_summary() -> str:
    """One line naming this CPU, the code path of the kernels and the dtypes it computes natively: the first line of
    ``python -m sparse info`` and of every benchmark summary, so that a measurement says where it came from."""
    from . import _ext

    isa = "extension not loaded"
    if _ext.available():
        c = _ext._C
        cap = c.isa_env()[0]
        isa = f"code path {c.get_isa()} (best {c.best_isa()}{', SPARSEKERN_ISA=' + cap if cap else ''})"
    sup = dtype_support()
    native = ", ".join(k for k, v in sup.items() if v["native"])
    slow = ", ".join(k for k, v in sup.items() if not v["native"])
    return (f"cpu: {cpu_model()}, {os.cpu_count()} logical cores; {isa}; native dtypes: {native}"
            + (f"; emulated (slow): {slow}" if slow else ""))
