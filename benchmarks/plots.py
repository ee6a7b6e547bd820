"""PNG plots from harness rows: speedup against sparsity (per block size and dtype, with the ideal 1/density line)
and the break-even map (lowest sparsity at which each format beats the best dense path, per shape and tokens)."""

from __future__ import annotations

import math
import os
from collections import defaultdict
from typing import Dict, List, Tuple

import numpy as np

Row = Dict[str, object]


def _geomean(xs: List[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def _fwd_rows(rows: List[Row]) -> List[Row]:
    return [
        r for r in rows
        if r["bench"] == "cpu_ops" and r["op"] == "linear" and r["backend"] == "sparsekern" and r["weights"] == "hot"
        and r["threads"] == max(int(x["threads"]) for x in rows if x["bench"] == "cpu_ops")
    ]


def _label(r: Row) -> str:
    if r["format"] == "balanced":
        return f"balanced {str(r['block']).split('/')[0]}"
    return f"{r['format']} {r['block']}"


def speedup_plot(rows: List[Row], path: str) -> bool:
    """One panel per (dtype, tokens); one line per format/block: geometric mean over shapes of the ratio against
    the best dense path of the same case, against sparsity; dashed: the ideal 1/density."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fwd = _fwd_rows(rows)
    if not fwd:
        return False
    dtypes = sorted({str(r["dtype"]) for r in fwd})
    tokens = sorted({int(r["tokens"]) for r in fwd})
    fig, axes = plt.subplots(len(dtypes), len(tokens), figsize=(4.2 * len(tokens), 3.6 * len(dtypes)), squeeze=False)
    for i, dt in enumerate(dtypes):
        for j, t in enumerate(tokens):
            ax = axes[i][j]
            series: Dict[str, Dict[float, List[float]]] = defaultdict(lambda: defaultdict(list))
            for r in fwd:
                if r["dtype"] == dt and int(r["tokens"]) == t:
                    series[_label(r)][round(float(r["sparsity"]), 3)].append(float(r["ratio"]))
            s_all = sorted({s for pts in series.values() for s in pts})
            if s_all:
                xs = [x / 1000 for x in range(0, int(max(s_all) * 1000) + 1, 5)]
                ax.plot(xs, [1 / (1 - x) for x in xs], "k--", lw=1, label="ideal 1/density")
            ax.axhline(1.0, color="grey", lw=0.8)
            for name in sorted(series):
                pts = sorted(series[name].items())
                ax.plot([p[0] for p in pts], [_geomean(p[1]) for p in pts], "o-", ms=4, label=name)
            ax.set_yscale("log")
            ax.set_title(f"{dt}, T={t}")
            ax.set_xlabel("sparsity")
            ax.set_ylabel("speedup vs best dense")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    machine = fwd[0]["machine"]
    fig.suptitle(
        f"sparsekern forward vs best dense (geomean over shapes), {machine}, {fwd[0]['threads']} threads", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def break_even_plot(rows: List[Row], path: str) -> bool:
    """A grid per (format/block, dtype): rows = shapes, columns = tokens, cell = lowest sparsity tested at which
    the format beats the best dense path (ratio > 1); 'none' if it never does in this run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fwd = _fwd_rows(rows)
    if not fwd:
        return False
    panels: Dict[Tuple[str, str], Dict[Tuple[str, int], List[Tuple[float, float]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for r in fwd:
        panels[(_label(r), str(r["dtype"]))][(str(r["shape"]), int(r["tokens"]))].append(
            (float(r["sparsity"]), float(r["ratio"]))
        )
    keys = sorted(panels)
    ncol = min(3, len(keys))
    nrow = -(-len(keys) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.6 * ncol, 3.2 * nrow), squeeze=False)
    cmap = plt.get_cmap("viridis").with_extremes(bad="lightgrey")
    for k, key in enumerate(keys):
        ax = axes[k // ncol][k % ncol]
        cells = panels[key]
        shapes = sorted({s for s, _ in cells}, key=lambda s: tuple(int(v) for v in s.split("x")))
        toks = sorted({t for _, t in cells})
        grid = [[float("nan")] * len(toks) for _ in shapes]
        for a, s in enumerate(shapes):
            for b, t in enumerate(toks):
                wins = [sp for sp, ratio in cells.get((s, t), []) if ratio > 1.0]
                tested = cells.get((s, t), [])
                val = min(wins) if wins else float("nan")  # never beats dense (or untested): grey
                grid[a][b] = val
                text = "-" if not tested else (f"{val:.2f}" if wins else "none")
                ax.text(b, a, text, ha="center", va="center", fontsize=8, color="w" if wins and val < 0.6 else "k")
        ax.imshow(np.ma.masked_invalid(np.array(grid)), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_xticks(range(len(toks)), [str(t) for t in toks])
        ax.set_yticks(range(len(shapes)), shapes)
        ax.set_xlabel("tokens")
        ax.set_title(f"{key[0]}, {key[1]}", fontsize=9)
    for k in range(len(keys), nrow * ncol):
        axes[k // ncol][k % ncol].axis("off")
    fig.suptitle("break-even: lowest sparsity tested that beats the best dense path", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_plots(rows: List[Row], out_dir: str) -> List[str]:
    paths = []
    for name, fn in (("speedup_vs_sparsity.png", speedup_plot), ("break_even.png", break_even_plot)):
        path = os.path.join(out_dir, name)
        if fn(rows, path):
            paths.append(path)
    return paths


ATLAS_MARKERS = "osv^DPXh*<>"


def atlas_plot(points: List[Row], front: List[Row], path: str, title: str = "") -> bool:
    """The pattern atlas (``benchmarks.atlas.points``): held-out cosine against end-to-end speedup over the best
    dense path, one marker per pattern, each point labelled with its sparsity; the Pareto front (``front``, slowest
    first) circled and joined by a dashed staircase: above each speedup, the best cosine any point at least that
    fast reaches; the dense model at (1, 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not points:
        return False
    fig, ax = plt.subplots(figsize=(7.6, 5.2))
    labels = list(dict.fromkeys(str(q["label"]) for q in points))
    colors = plt.get_cmap("tab10")
    for i, label in enumerate(labels):
        pts = [q for q in points if q["label"] == label]
        ax.plot([float(q["speedup"]) for q in pts], [float(q["cosine"]) for q in pts], ATLAS_MARKERS[i % 11],
                color=colors(i % 10), ms=7, ls=":", lw=0.8, label=label)
        for q in pts:
            ax.annotate(f"{float(q['nominal']):.0%}", (float(q["speedup"]), float(q["cosine"])), fontsize=7,
                        xytext=(4, 3), textcoords="offset points", color=colors(i % 10))
    if front:
        xs = [float(q["speedup"]) for q in front]
        ys = [float(q["cosine"]) for q in front]
        ax.step(xs, ys, where="pre", color="k", ls="--", lw=1, label="Pareto front", zorder=0)
        ax.plot(xs, ys, "o", mfc="none", mec="k", ms=12, zorder=0)
    ax.plot([1.0], [1.0], "k*", ms=11, label="dense (best path)")
    ax.axvline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x" if v in (0.5, 2, 3, 5) else ""))
    ax.set_xlabel("end-to-end speedup over the best dense path (batch 8, seq 128)")
    ax.set_ylabel("held-out cosine to the dense model's embeddings")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
