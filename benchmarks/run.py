"""``python -m benchmarks`` / ``python -m sparse bench`` / ``make bench``: the CPU op benchmark and the end-to-end
BERT benchmark, one summary over both.

    python -m benchmarks                                  # --preset quick --suite ops,e2e --out bench-out
    python -m benchmarks --preset full --suite ops        # the long op grid only
    python -m benchmarks --preset act                     # one kernel's part of the op grid: bsr, balanced, decode, act
    python -m benchmarks --report bench-out/*.csv         # summary and plots again from CSVs
    python -m benchmarks --suite e2e --compare old-out    # ... and compare.md: each e2e row against an earlier run
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional, Sequence

SUITES = ("ops", "e2e")


def main(argv: Optional[Sequence[str]] = None) -> int:
    from . import cpu_ops, e2e_bert

    # Each suite has its own presets; quick, full and tiny are in both, the focused ones in one of them.
    presets = {"ops": cpu_ops.PRESETS, "e2e": e2e_bert.PRESETS}
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--preset",
        choices=sorted(set(cpu_ops.PRESETS) | set(e2e_bert.PRESETS)),
        default="quick",
        help="quick: the CPU kernel target grid on BERT-base shapes (~3-5 min on 2 cores) + BERT batch 8 at "
        "90%%; full: every shape preset, op, format and thread count; tiny: seconds, for smoke tests; "
        "op benchmark only: bsr (block 32), balanced (bank 32), decode (T = 1, cold weights), act (activation "
        "fused vs not); e2e benchmark only: block (BERT-base 90%% block 32: the fused stacks eager and compiled, "
        "int8, the peers); see benchmarks/README.md",
    )
    ap.add_argument("--suite", help=f"comma list of {SUITES} (default: every suite that has the preset)")
    ap.add_argument("--out", default="bench-out", help="output folder (default: bench-out/)")
    ap.add_argument("--no-compile", action="store_true", help="e2e: leave out torch.compile")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--report", nargs="+", metavar="CSV", help="only rebuild summary.md and plots from these CSVs")
    ap.add_argument("--compare", metavar="OLD_DIR", help="an earlier run's output folder (or CSV): print and write "
                    "compare.md, each end-to-end row in both runs new/old, flagged where its ratio to its own run's "
                    "eager fp32 baseline dropped by more than the 10%% noise margin")
    args = ap.parse_args(argv)

    from sparse.runtime import tune_malloc_from_env

    from .report import read_run, write_comparison, write_report

    tune_malloc_from_env()  # before anything allocates: dense and sparse contenders alike (sparse/runtime.py)
    old = None
    if args.compare:  # read now: the run may write over it (the same --out)
        try:
            old = read_run(args.compare)
        except (OSError, ValueError) as exc:
            ap.error(f"--compare {args.compare}: {exc}")

    if args.report:
        from .harness import read_csv

        rows = []
        for path in args.report:
            try:
                rows += read_csv(path)
            except ValueError as exc:  # e.g. a GPU benchmark with its own columns: summarise the others
                print(f"left out of the summary: {exc}", file=sys.stderr)
        written = write_report(rows, args.out)
        if old is not None:
            written.append(write_comparison(rows, old, args.out, args.compare)[0])
        for path in written:
            print(f"wrote {path}")
        return 0
    default_suites = ",".join(s for s in SUITES if args.preset in presets[s])
    suites = [s.strip() for s in (args.suite or default_suites).split(",") if s.strip()]
    bad = [s for s in suites if s not in SUITES]
    if bad or not suites:
        ap.error(f"--suite: {bad or suites} not in {SUITES}")
    lacking = [s for s in suites if args.preset not in presets[s]]
    if lacking:
        ap.error(f"--preset {args.preset} is not a preset of --suite {','.join(lacking)}; it belongs to "
                 f"--suite {default_suites} (the default for it)")
    os.makedirs(args.out, exist_ok=True)
    rows: List[dict] = []
    skipped: List[str] = []
    written = []
    if "ops" in suites:
        r, s = cpu_ops.run(cpu_ops.PRESETS[args.preset], args.out, progress=not args.no_progress)
        rows, skipped, written = rows + r, skipped + s, written + [os.path.join(args.out, "cpu_ops.csv")]
    if "e2e" in suites:
        from dataclasses import replace

        p = e2e_bert.PRESETS[args.preset]
        r, s = e2e_bert.run(
            replace(p, compile=False) if args.no_compile else p, args.out, progress=not args.no_progress
        )
        rows, skipped = rows + r, skipped + s
        written += [os.path.join(args.out, "e2e_bert.csv"), os.path.join(args.out, "e2e_profile.md")]
    written += write_report(rows, args.out, skipped=skipped)
    if old is not None:
        written.append(write_comparison(rows, old, args.out, args.compare)[0])
    print("\n".join(f"wrote {p}" for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
