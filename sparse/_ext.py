"""Loads the compiled extension. Importing `sparse` never fails because of it; using a kernel does, loudly."""

from __future__ import annotations

from typing import Optional

import torch  # noqa: F401  (loads libc10/libtorch, which _C links against)

try:
    from . import _C  # registers the sparsekern:: ops and their CPU (and CUDA) kernels
except ImportError as exc:  # pragma: no cover - exercised only in a broken install
    _C = None
    _IMPORT_ERROR: Optional[ImportError] = exc
else:
    _IMPORT_ERROR = None
    # A misspelt cap would otherwise leave every kernel on the best path while the user believes it capped.
    _cap_error = _C.isa_env()[1]
    if _cap_error:
        raise ValueError(_cap_error)


def available() -> bool:
    return _C is not None


def require():
    """Returns the extension module, or raises with the way to build it."""
    if _C is None:
        raise RuntimeError(
            f"the sparse._C extension is not built or failed to load ({_IMPORT_ERROR}). From a checkout run "
            "`make build` (or `pip install --no-build-isolation -e .` with torch==2.13.0 installed)."
        )
    return _C
