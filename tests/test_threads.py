"""Thread count, determinism and concurrent use of the CPU kernels.

Deterministic mode. For a fixed intra-op thread count (``torch.set_num_threads(n)``) and a fixed code path
(``sparse._ext.require().set_isa("avx512" | "avx2" | "portable")``), every op returns bitwise-identical results
on every call: the work split depends only on the weight, the thread count and the token count (static,
cost-balanced ranges, ``csrc/cpu/parallel.h``; the block-sparse forward splits the tokens for small weights,
``csrc/cpu/bsr.cpp``), each output element is computed by exactly one thread in a fixed order, and no
kernel uses atomics or dynamic scheduling. Nothing else needs to be set. Different thread counts may round
differently, within the reference tolerance (tested below). Autograd through ``sparse.linear`` inherits this,
except the bias gradient, which is torch's own ``sum``.

Concurrency. The kernels keep no global mutable state (the ISA cap is an atomic read once per call), so one
weight or module may be used from several Python threads at once; each call's result is the same as alone.
"""

from __future__ import annotations

import threading

import pytest
import torch

import sparse
from sparse import reference
from sparse._ext import available
from tests import _reliab as R
from tests import helpers as H

pytestmark = pytest.mark.skipif(not available(), reason="sparse._C not built")


def _weights(dtype: torch.dtype):
    """Several block rows/columns and banks, so that 2 and 3 threads really split the work."""
    return [
        H.make_bsr(96, 80, (8, 16), density=0.5, dtype=dtype, seed=1),
        H.make_bsr(67, 45, (32, 32), density=0.7, dtype=dtype, seed=2),
        H.make_balanced(50, 96, 32, 8, dtype=dtype, seed=3),
    ]


def _all_ops(weight, x, g, bias):
    """Every op, and the autograd grads of sparse.linear (x, values; bias via torch's sum)."""
    out = {
        "forward": sparse.linear(x, weight, bias, "gelu"),
        "grad_input": sparse.linear_grad_input(g, weight),
        "sddmm": sparse.sddmm(g, x, weight),
    }
    v = weight.values.detach().clone(memory_format=torch.preserve_format).requires_grad_(True)
    w = R.with_values(weight, v)
    xa = x.detach().requires_grad_(True)
    sparse.linear(xa, w, bias, "silu").backward(g)
    out["autograd x"], out["autograd values"] = xa.grad, v.grad
    return out


def test_bitwise_deterministic_per_thread_count(dtype):
    for weight in _weights(dtype):
        out, inn = weight.shape
        x, g = H.randn((37, inn), dtype, 1), H.randn((37, out), dtype, 2)
        bias = H.randn((out,), dtype, 3)
        for level in R.isa_levels():
            for n in (1, 2, 3):
                with R.isa(level), R.num_threads(n):
                    first, second = _all_ops(weight, x, g, bias), _all_ops(weight, x, g, bias)
                for name in first:
                    assert torch.equal(first[name], second[name]), (
                        f"{name} [{level}, {n} threads, {dtype}, {weight!r}]: two calls differ bitwise")


def test_thread_count_changes_nothing_beyond_tolerance(dtype):
    for weight in _weights(dtype):
        out, inn = weight.shape
        x, g = H.randn((37, inn), dtype, 4), H.randn((37, out), dtype, 5)
        W = R.dense(weight)
        W64 = W.double()
        refs = {
            "forward": (reference.linear(x, weight), x @ W.t(), x.double().abs() @ W64.abs().t(), inn),
            "grad_input": (reference.linear_grad_input(g, weight), g @ W, g.double().abs() @ W64.abs(), out),
            "sddmm": (reference.sddmm(g, x, weight), R.gather_pattern(weight, g.t() @ x),
                      R.gather_pattern(weight, g.double().abs().t() @ x.double().abs()), 37),
        }
        for level in R.isa_levels():
            results = {}
            for n in (1, 2, 3):
                with R.isa(level), R.num_threads(n):
                    results[n] = {
                        "forward": sparse.linear(x, weight),
                        "grad_input": sparse.linear_grad_input(g, weight),
                        "sddmm": sparse.sddmm(g, x, weight),
                    }
            for name, (ref, dense, terms, k) in refs.items():
                for n in (1, 2, 3):
                    H.assert_close_to_ref(results[n][name], ref, dense, f"{name} [{level}, {n} threads]", k=k,
                                          terms=terms)
                # The thread counts against each other: as close as either is to the reference.
                H.assert_close_to_ref(results[2][name], results[1][name].double(), dense,
                                      f"{name} [{level}] 2 threads vs 1", k=k, terms=terms)


@pytest.mark.parametrize("dtype", H.VECTOR_DTYPES, ids=str)
def test_same_weight_from_many_python_threads(dtype):
    """8 Python threads share each weight, each running forward + backward on its own input, at once."""
    weights = _weights(dtype)
    n_threads, rounds = 8, 6
    results, errors = {}, []
    barrier = threading.Barrier(n_threads)

    def work(i: int) -> None:
        try:
            barrier.wait()
            for r in range(rounds):
                w = weights[(i + r) % len(weights)]
                x = H.randn((9 + i, w.shape[1]), dtype, 100 * i + r)
                g = H.randn((9 + i, w.shape[0]), dtype, 7 * i + r)
                results[(i, r)] = (w, x, g, _all_ops(w, x, g, None))
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, f"a thread raised: {errors[0]!r}"
    assert len(results) == n_threads * rounds
    # Each concurrent result equals the same call made alone with the thread count those workers saw: the
    # calls did not disturb each other. (Python threads start with torch's default intra-op thread count.)
    workers_threads = _threads_seen_by_a_new_thread()
    for (i, r), (w, x, g, got) in results.items():
        with R.num_threads(workers_threads):
            alone = _all_ops(w, x, g, None)
        for name in alone:
            assert torch.equal(got[name], alone[name]), f"{name}: thread {i} round {r} differs from a lone call"


def _threads_seen_by_a_new_thread() -> int:
    seen = []
    t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    t.start()
    t.join()
    return seen[0]
