"""The one timing harness and CSV schema shared by every benchmark (CPU and GPU).

A *case* is one problem (op, shape, tokens, dtype, threads, hot|cold weights). All contenders of a case (our
kernels and every baseline) are timed in the same call of :func:`measure`, on the same inputs, with their repeats
interleaved: round r times contender A, then B, then C (the order rotates each round), and each timed sample is
preceded by one untimed call of the same contender so every sample is taken in that contender's steady state.
(oneDNN and MKL calls in one process shift each other's timings, by tens of percent on the CPUs measured, see
docs/measurements.md; interleaving spreads that interference over all contenders instead of biasing one.)
The loop itself is :func:`sparse.timing.interleaved`, shared with the library.
Ratios are ``baseline_s / median_s`` from that same measurement, so a row never mixes two runs.

Cold weights: a contender is given a list of weight copies whose total size exceeds the last-level cache several
times; each call takes the next copy, so every call streams its weight from memory.
"""

from __future__ import annotations

import csv
import datetime as _dt
import functools
import importlib.metadata
import itertools
import math
import os
import subprocess
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import torch

from sparse.timing import interleaved, sample

# Every row carries every column, in this order (benchmarks on any device write the same schema).
COLUMNS: List[str] = [
    "bench",  # which benchmark wrote the row: cpu_ops, e2e_bert, gpu_triton, ...
    "case",  # id of the measurement the row belongs to: rows of one case were timed together
    "op",  # linear | grad_input | sddmm | bert_forward | bert_train_step
    "backend",  # who computed it: sparsekern, sparse.linear, F.linear, onednn, torch.sparse, scipy, ...
    "format",  # dense | bsr | balanced | csr | torch_bsr | ...
    "block",  # "32x32" for block formats, "bank32/keep8" for balanced, "" for dense
    "dtype",
    "out_features",
    "in_features",
    "shape",  # "out x in" (or a model description for end-to-end rows)
    "tokens",  # rows of X (batch x sequence for end-to-end rows)
    "sparsity",
    "density",
    "threads",
    "weights",  # hot | cold
    "weight_bytes",  # bytes one call reads for the weight, indices included
    "median_s",
    "p10_s",
    "p90_s",
    "repeats",
    "baseline",  # the reference contender of this row's ratio
    "baseline_s",
    "ratio",  # baseline_s / median_s: > 1 means this row is faster than its baseline
    "ideal_ratio",  # 1 / density
    "machine",  # CPU model or GPU name
    "cpu_features",
    "isa",  # the sparsekern CPU kernel level in use
    "torch",
    "triton",
    "cuda",
    "git_rev",
    "timestamp",
    "notes",  # what else decided the time, e.g. the attention implementation an end-to-end model ran with
    # Accuracy of the model a row ran against the dense model (benchmarks.atlas; empty where not measured):
    "cosine",  # mean cosine similarity of held-out sentence embeddings, in [-1, 1]
    "top1_agreement",  # fraction of held-out sentences with the same nearest neighbour, in [0, 1]
]
# Headers of CSVs written before the newest columns: read back with those columns empty.
_OLDER_SCHEMAS: List[List[str]] = [COLUMNS[:COLUMNS.index("notes")], COLUMNS[:COLUMNS.index("cosine")]]


# ---------------------------------------------------------------------------------------------------------------
# Machine and versions
# ---------------------------------------------------------------------------------------------------------------
def _cpu_model() -> str:
    from sparse.runtime import cpu_model

    return cpu_model()


def _git_rev() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(
            ["git", "-C", here, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (rev + ("+dirty" if dirty else "")) if rev else "unknown"


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return ""


@functools.lru_cache(maxsize=None)
def machine_info(device: str = "cpu") -> Dict[str, str]:
    """The machine/version columns of every row. ``device`` "cuda" reports the GPU's name as the machine."""
    from sparse import _ext

    features, isa = "", ""
    if _ext.available():
        feats = _ext._C.cpu_features()
        features = ",".join(k for k, v in feats.items() if v)
        isa = _ext._C.get_isa()
    machine = _cpu_model()
    if device.startswith("cuda") and torch.cuda.is_available():
        machine = torch.cuda.get_device_name()
    return {
        "machine": machine,
        "cpu_features": features,
        "isa": isa,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda or "",
        "git_rev": _git_rev(),
    }


def last_level_cache_bytes() -> int:
    """Size of the largest CPU cache (sysfs), 32 MiB if it cannot be read."""
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in os.listdir(base):
            try:
                with open(os.path.join(base, entry, "size")) as f:
                    text = f.read().strip()
            except OSError:
                continue
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            best = max(best, int(text.rstrip("KMG")) * mult)
    except (OSError, ValueError):
        pass
    return best or 32 << 20


def physical_memory_bytes() -> int:
    """The machine's RAM (sysconf), 8 GiB if it cannot be read."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError):
        return 8 << 30


# The cold copies of one contender may take at most this share of RAM: a case holds several contenders' copies at
# once, and some VMs report a host's whole last-level cache (480 MiB seen), which at factor 2 would have each
# contender allocate ~1 GiB and a case more RAM than the machine has.
COLD_RAM_SHARE = 1 / 32


def cold_bytes(factor: float = 2.0) -> int:
    """Total bytes of one contender's cold copies: ``factor`` times the last-level cache, capped at
    ``COLD_RAM_SHARE`` of RAM (still above the cache itself on every machine with RAM >= 32x its cache)."""
    return int(min(factor * last_level_cache_bytes(), COLD_RAM_SHARE * physical_memory_bytes()))


def cold_copies(weight_bytes: int, factor: float = 2.0) -> int:
    """How many copies of a weight of ``weight_bytes`` to cycle through so that their total is ``cold_bytes``
    (``factor`` times the last-level cache unless RAM caps it): every call then misses the cache for its weight."""
    return max(2, math.ceil(cold_bytes(factor) / max(1, weight_bytes)))


# ---------------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Contender:
    """One way of computing a case. ``fn()`` runs one call; cold contenders cycle their weight copies inside
    ``fn`` (see :func:`cycling`; the first call uses the first copy). ``info`` holds the row columns that describe
    it (backend, format, block, sparsity, density, weight_bytes, ...)."""

    name: str
    fn: Callable[[], Any]
    info: Dict[str, Any] = field(default_factory=dict)
    expected: Optional[torch.Tensor] = None  # what fn() must return (e.g. the float64 reference), checked once
    as_result: Optional[Callable[[Any], torch.Tensor]] = None  # reads fn()'s output in ``expected``'s layout


def result_error(c: Contender, out: Any) -> Optional[float]:
    """max |out - expected| / max |expected| for a contender with ``expected``, else None."""
    if c.expected is None:
        return None
    got = (c.as_result(out) if c.as_result is not None else out).double().cpu()
    ref = c.expected.double().cpu()
    if got.shape != ref.shape:
        return float("inf")
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


@dataclass
class Timing:
    median_s: float
    p10_s: float
    p90_s: float
    repeats: int


def cycling(items: Sequence[Any], call: Callable[[Any], Any]) -> Callable[[], Any]:
    """``fn()`` that calls ``call`` on the next item of ``items`` each time (round robin)."""
    it = itertools.cycle(items)
    return lambda: call(next(it))


def measure(
    contenders: Sequence[Contender],
    *,
    rounds: int = 7,
    min_sample_s: float = 0.01,
    warmup: int = 2,
    presample_call: bool = True,
    device: str = "cpu",
) -> Dict[str, Timing]:
    """Times every contender, interleaved, and returns its per-call median and p10/p90 over ``rounds`` samples.

    Each contender first runs ``warmup`` calls, then one calibration call fixes how many calls one sample holds
    (enough for ``min_sample_s``, so timer resolution does not matter; ``min_sample_s=0``: one call, no
    calibration). In each round the contenders take turns, in an order rotated by one per round; each sample
    is preceded by one untimed call of the same contender (``presample_call``; worth leaving out
    only for calls long enough to be their own steady state).
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    names = [c.name for c in contenders]
    if len(set(names)) != len(names):
        raise ValueError(f"contender names must be unique, got {names}")
    inner: Dict[str, int] = {}
    for c in contenders:
        if min_sample_s <= 0:  # one call per sample: no calibration needed
            for _ in range(warmup):
                c.fn()
            inner[c.name] = 1
            continue
        one = max(sample(c.fn, repeats=1, warmup=warmup, device=device).median, 1e-7)
        inner[c.name] = max(1, min(1000, math.ceil(min_sample_s / one)))
    # steady state: with presample_call, each sample follows an untimed call of the same contender, not another's
    samples = interleaved({c.name: c.fn for c in contenders}, repeats=rounds, device=device, calls=inner, rotate=True,
                          presample=presample_call)
    return {name: Timing(s.median, s.quantile(0.1), s.quantile(0.9), len(s)) for name, s in samples.items()}


# ---------------------------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------------------------
def make_rows(
    bench: str,
    case: str,
    common: Dict[str, Any],
    contenders: Sequence[Contender],
    timings: Dict[str, Timing],
    baseline: str,
    *,
    device: str = "cpu",
) -> List[Dict[str, Any]]:
    """One row per contender of one case. ``baseline`` names the reference: either a contender's name, or
    ``"best_dense"``: the fastest contender whose info has ``dense_ref=True`` (e.g. F.linear and oneDNN in the
    case's dtype). The ``baseline`` column names the reference by its ``backend`` (``best_dense(onednn_prepacked)``).
    The baseline's time and every ratio come from ``timings`` (this one measurement)."""
    if baseline == "best_dense":
        refs = [c.name for c in contenders if c.info.get("dense_ref")]
        if not refs:
            raise ValueError(f"case {case}: baseline 'best_dense' needs a contender with dense_ref=True")
        base_name = min(refs, key=lambda n: timings[n].median_s)
    else:
        if baseline not in timings:
            raise ValueError(f"case {case}: baseline {baseline!r} is not one of the contenders {list(timings)}")
        base_name = baseline
    backend = next(c.info.get("backend", c.name) for c in contenders if c.name == base_name)
    base_label = f"best_dense({backend})" if baseline == "best_dense" else backend
    base_s = timings[base_name].median_s
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    rows = []
    for c in contenders:
        t = timings[c.name]
        row: Dict[str, Any] = {k: "" for k in COLUMNS}
        row.update(machine_info(device))
        row.update(common)
        row.update({k: v for k, v in c.info.items() if k in COLUMNS})
        density = row.get("density")
        if density in ("", None):
            density = 1.0 - float(row.get("sparsity") or 0.0)
        row.update(
            bench=bench,
            case=case,
            density=round(float(density), 6),
            sparsity=round(1.0 - float(density), 6),
            median_s=t.median_s,
            p10_s=t.p10_s,
            p90_s=t.p90_s,
            repeats=t.repeats,
            baseline=base_label,
            baseline_s=base_s,
            ratio=base_s / t.median_s,
            ideal_ratio=1.0 / float(density) if float(density) > 0 else float("inf"),
            timestamp=now,
        )
        rows.append(row)
    return rows


def write_csv(path: str, rows: Iterable[Dict[str, Any]]) -> None:
    """Writes rows with exactly :data:`COLUMNS` (unknown keys are an error: one schema for every benchmark)."""
    rows = list(rows)
    for row in rows:
        extra = set(row) - set(COLUMNS)
        if extra:
            raise ValueError(f"row has columns outside the schema: {sorted(extra)}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for row in rows:
            w.writerow({k: row.get(k, "") for k in COLUMNS})


_NUMERIC = {
    "out_features": int, "in_features": int, "tokens": int, "threads": int, "weight_bytes": int, "repeats": int,
    "sparsity": float, "density": float, "median_s": float, "p10_s": float, "p90_s": float, "baseline_s": float,
    "ratio": float, "ideal_ratio": float, "cosine": float, "top1_agreement": float,
}


def read_csv(path: str) -> List[Dict[str, Any]]:
    """Reads a harness CSV back with numeric columns converted (empty cells stay "")."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames != COLUMNS and reader.fieldnames not in _OLDER_SCHEMAS:
            raise ValueError(f"{path}: columns {reader.fieldnames} are not the harness schema {COLUMNS}")
        rows = []
        for row in reader:
            for k in COLUMNS[len(reader.fieldnames):]:
                row[k] = ""
            for k, conv in _NUMERIC.items():
                if row[k] != "":
                    row[k] = conv(float(row[k])) if conv is int else conv(row[k])
            rows.append(row)
    return rows


class threads:
    """Context manager: ``torch.set_num_threads(n)`` inside, the previous value restored after."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __enter__(self) -> "threads":
        self.prev = torch.get_num_threads()
        torch.set_num_threads(self.n)
        return self

    def __exit__(self, *exc: Any) -> None:
        torch.set_num_threads(self.prev)
