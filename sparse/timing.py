"""The timing loop of the library and the benchmarks: wall-clock samples of calls, after warm-up calls, with the
device synchronised around each sample when the work runs on CUDA (or, with ``cuda_events=True``, the GPU's own
time between two CUDA events).

- :func:`median_seconds`: median seconds of ``repeats`` calls of ``fn`` after ``warmup`` calls.
- :func:`sample`: the same samples of one function, as :class:`Samples` (median, minimum, maximum, quantiles).
- :func:`interleaved`: several functions timed in turns, one sample each per round, so that load from other
  processes on a shared machine hits all of them alike.

None of them changes the autograd mode: wrap the call in ``torch.no_grad()`` / ``torch.inference_mode()`` when
the timed calls should run without autograd.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

import torch

__all__ = ["Samples", "Device", "synchronizer", "median_seconds", "sample", "interleaved"]

# Where the timed work runs: a device, its name, a tensor on it, or None (no synchronisation).
Device = Union[torch.device, str, torch.Tensor, None]


@dataclass(frozen=True)
class Samples:
    """Seconds per call of each timed sample, in the order taken."""

    seconds: Tuple[float, ...]

    def __len__(self) -> int:
        return len(self.seconds)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def min(self) -> float:
        return min(self.seconds)

    @property
    def max(self) -> float:
        return max(self.seconds)

    def quantile(self, q: float) -> float:
        """The ``q`` quantile (0 <= q <= 1), linearly interpolated between the sorted samples."""
        xs = sorted(self.seconds)
        pos = q * (len(xs) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _on_cuda(device: Device) -> bool:
    if isinstance(device, torch.Tensor):
        device = device.device
    return device is not None and torch.device(device).type == "cuda"


def synchronizer(device: Device) -> Callable[[], None]:
    """``torch.cuda.synchronize`` for a CUDA device (or a tensor on one), else a function that does nothing.
    Kernels on a GPU run asynchronously: without it a sample would time the launch, not the work."""
    if _on_cuda(device):
        return torch.cuda.synchronize
    return lambda: None


def interleaved(
    fns: Mapping[str, Callable[[], Any]],
    *,
    repeats: int,
    warmup: int = 0,
    device: Device = None,
    calls: Union[int, Mapping[str, int]] = 1,
    rotate: bool = False,
    presample: bool = False,
    progress: Optional[Callable[[], None]] = None,
    cuda_events: bool = False,
) -> Dict[str, Samples]:
    """Times every function of ``fns`` (zero-argument callables, by name) in turns: ``warmup`` untimed rounds,
    then ``repeats`` timed rounds, each calling every function once (in the order of ``fns``; with ``rotate``,
    timed round r starts at the r-th function, A B C, B C A, ...). One sample is ``calls`` calls in a row (an int,
    or one per name; more calls per sample for calls too short for the timer), reported per call.

    ``presample``: one untimed call of the same function right before each sample, so that every sample is taken
    in that function's steady state rather than right after another's. ``device``: where the work runs; on CUDA the
    device is synchronised before and after each sample. ``cuda_events``: a sample is instead the time between two
    CUDA events recorded on the current stream around its calls (the GPU's time, without the host's launch of the
    first call when the GPU is still busy, e.g. with the presample); needs a CUDA ``device``, which is
    synchronised once after the warm-up. ``progress()`` is called after every round, warm-up rounds included.
    Returns ``{name: Samples}`` with ``repeats`` samples each."""
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    names = list(fns)
    per_sample = {n: (calls if isinstance(calls, int) else calls[n]) for n in names}
    bad = {n: c for n, c in per_sample.items() if isinstance(c, bool) or not isinstance(c, int) or c < 1}
    if bad:
        raise ValueError(f"calls per sample must be ints >= 1, got {bad}")
    sync = synchronizer(device)
    if cuda_events:
        if not _on_cuda(device):
            raise ValueError(f"cuda_events=True needs a CUDA device, got {device!r}")
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples: Dict[str, list] = {n: [] for n in names}
    for _ in range(warmup):
        for n in names:
            fns[n]()
        if progress is not None:
            progress()
    if cuda_events:
        sync()
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)] if rotate and names else names
        for n in order:
            fn, k = fns[n], per_sample[n]
            if presample:
                fn()
            if cuda_events:
                start.record()
                for _ in range(k):
                    fn()
                end.record()
                end.synchronize()
                seconds = start.elapsed_time(end) / 1e3  # elapsed_time: milliseconds
            else:
                sync()
                t0 = time.perf_counter()
                for _ in range(k):
                    fn()
                sync()
                seconds = time.perf_counter() - t0
            samples[n].append(seconds / k)
        if progress is not None:
            progress()
    return {n: Samples(tuple(s)) for n, s in samples.items()}


def sample(fn: Callable[[], Any], *, repeats: int, warmup: int = 2, device: Device = None, calls: int = 1,
           cuda_events: bool = False) -> Samples:
    """``repeats`` timed samples of ``fn()`` (each ``calls`` calls, reported per call) after ``warmup`` untimed
    calls; on CUDA (``device``) synchronised before and after each sample, or timed by CUDA events
    (``cuda_events``, as in :func:`interleaved`)."""
    return interleaved({"fn": fn}, repeats=repeats, warmup=warmup, device=device, calls=calls,
                       cuda_events=cuda_events)["fn"]


def median_seconds(fn: Callable[[], Any], repeats: int = 5, warmup: int = 2, device: Device = None) -> float:
    """Median seconds of ``repeats`` calls of ``fn()`` after ``warmup`` calls (which also compile, autotune and
    allocate outside the timing), synchronising CUDA around each timed call when ``device`` (a device, its name,
    or a tensor on it) is a CUDA device."""
    return sample(fn, repeats=repeats, warmup=warmup, device=device).median
