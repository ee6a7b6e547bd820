"""sparsekern benchmarks: one harness (``harness``), the CPU op microbenchmark (``cpu_ops``), end-to-end BERT
(``e2e_bert``), the summary (``report``) and plots (``plots``). Importable as ``benchmarks`` from a checkout and as
``sparse.benchmarks`` from an installed package; ``python -m sparse bench`` calls :func:`main`.
"""

from __future__ import annotations

from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``make bench`` / ``python -m sparse bench``; see ``python -m benchmarks --help``."""
    from .run import main as _main

    return _main(argv)
