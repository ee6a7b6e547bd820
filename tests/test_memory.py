"""10,000 forward/backward calls leave the resident set flat (no leak in the extension or its autograd glue).

RSS is read from /proc/self/statm after a warm-up (allocator pools, lazily loaded code), in a fresh interpreter.
The same measurement is then shown to see a leak of the size a per-call leak of one output would make, so the
check cannot pass vacuously. One intra-op thread: the kernels allocate the same per chunk whatever the thread
count, and with two threads on a busy 2-core machine each tiny call costs ~10x more in OpenMP hand-offs.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from typing import Tuple

import pytest
import torch

import sparse
from sparse._ext import available
from tests import _reliab as R
from tests import helpers as H

pytestmark = [
    pytest.mark.skipif(not available(), reason="sparse._C not built"),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm"),
]

CALLS = 10_000
ALLOWED_GROWTH = 2 * 2**20  # bytes: allocator noise; one leaked output per call would be ~20 MiB


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _steps():
    """One forward + backward per weight format: all six ops run (gelu makes the backward recompute z)."""
    ws = [H.make_bsr(64, 64, (8, 8), density=0.5, dtype=torch.float32, seed=1),
          H.make_balanced(64, 64, 16, 4, dtype=torch.float32, seed=2)]
    params = []
    for w in ws:
        v = w.values.detach().clone(memory_format=torch.preserve_format).requires_grad_(True)
        params.append((R.with_values(w, v), v, torch.zeros(64, requires_grad=True)))
    x = H.randn((8, 64), torch.float32, 3).requires_grad_(True)

    def step(i: int) -> None:
        w, v, b = params[i % 2]
        sparse.linear(x, w, b, "gelu").sum().backward()
        x.grad = v.grad = b.grad = None

    return step


def _measure() -> Tuple[int, int]:
    """(RSS growth over CALLS forward/backward calls, RSS growth from a deliberate leak of as many outputs)."""
    with R.num_threads(1):
        step = _steps()
        for i in range(500):
            step(i)
        gc.collect()
        before = _rss()
        for i in range(CALLS):
            step(i)
        gc.collect()
        grown = _rss() - before
    kept = []
    before = _rss()
    for _ in range(CALLS):
        kept.append(torch.empty(8, 64).fill_(1.0))
    return grown, _rss() - before


def test_forward_backward_calls_leave_rss_flat():
    # A fresh interpreter: memory freed by earlier tests would otherwise absorb (and hide) a leak.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    run = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    grown, control = json.loads(run.stdout.strip().splitlines()[-1])
    assert grown <= ALLOWED_GROWTH, f"RSS grew by {grown / 2**20:.2f} MiB over {CALLS} forward/backward calls"
    # The same measurement sees a leak of one [8, 64] output per call (20 MiB).
    assert control > 2 * ALLOWED_GROWTH, f"RSS measurement missed a deliberate leak ({control / 2**20:.2f} MiB)"


if __name__ == "__main__":
    print(json.dumps(_measure()))
