"""Process-wide settings that decide CPU inference speed as much as the kernels do.

glibc's ``malloc`` serves blocks above its *mmap threshold* with fresh ``mmap`` pages and gives free memory at
the top of its heap back to the kernel above its *trim threshold*. Both thresholds adapt at run time, and a
Transformer's forward allocates and frees activation buffers of several MB per layer (BERT-base at batch 8,
sequence 128: 3 MB per Linear output, 12.6 MB for the intermediate one). Depending on the order in which earlier
code happened to allocate, the thresholds settle where every one of those buffers is faulted in again on every
call: measured here, 46,000-68,000 minor page faults (180-270 MB) per BERT-base forward, and the 90% sparse model
at 190 ms instead of 140 ms, from one process to the next. That is why PyTorch's CPU tuning guide recommends
preloading jemalloc or tcmalloc. :func:`tune_malloc` gives glibc fixed thresholds instead, with no preload.

It is process-global, so the library never calls it on import: applications opt in. ``python -m sparse`` and the
benchmarks call it at start-up, before any model exists, so dense and sparse models alike run with it
(``SPARSEKERN_TUNE_MALLOC=0`` in the environment turns that off).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
from typing import Optional

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
