"""Fits the rational approximation of the normal CDF used by the vectorised exact GELU of the CPU kernels
(csrc/cpu/act_avx512.h, act_avx2.h) and prints its coefficients and float64 error:

    Phi(x) - 1/2 ~= x P(x^2) / Q(x^2),   P degree 6, Q degree 4 with Q(0) = 1,   |x| <= 5.4

minimising the absolute error, by Loeb's iteration (the linearised problem x P - g Q weighted by 1 / Q of the
previous step) with Lawson's reweighting towards minimax inside each step.

  python scripts/fit_gelu.py            # the constants in the headers (rounded to float32 there)
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy.special import ndtr


def fit(c: float, m: int, k: int, loeb: int = 60, lawson: int = 30, lawson_last: int = 200) -> tuple:
    """(P [m + 1], Q [k + 1], max abs error in float64) of x P(x^2) / Q(x^2) ~= Phi(x) - 1/2 on [0, c]."""
    s = np.linspace(1e-4, c, 6000)
    g = ndtr(s) - 0.5
    v = (s / c) ** 2  # fitted in v = (x / c)^2 in [0, 1] for conditioning, rescaled to x^2 at the end
    A = np.hstack([s[:, None] * v[:, None] ** np.arange(m + 1), -g[:, None] * v[:, None] ** np.arange(1, k + 1)])
    q = np.ones_like(s)
    w = np.full_like(s, 1.0 / len(s))
    for it in range(loeb):
        B, y = A / q[:, None], g / q
        for _ in range(lawson_last if it == loeb - 1 else lawson):
            coef, *_ = np.linalg.lstsq(B * np.sqrt(w)[:, None], y * np.sqrt(w), rcond=None)
            w = w * np.abs(B @ coef - y) + 1e-300
            w /= w.sum()
        qv = np.concatenate([[1.0], coef[m + 1:]])
        q = np.polynomial.polynomial.polyval(v, qv)
    P = coef[: m + 1] / (c * c) ** np.arange(m + 1)
    Q = qv / (c * c) ** np.arange(k + 1)
    return P, Q, _err(P, Q, c)


def _err(P: np.ndarray, Q: np.ndarray, c: float) -> float:
    s = np.linspace(0.0, c, 200001)
    approx = s * np.polynomial.polynomial.polyval(s * s, P) / np.polynomial.polynomial.polyval(s * s, Q)
    return float(np.abs(approx - (ndtr(s) - 0.5)).max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--c", type=float, default=5.4)
    ap.add_argument("--m", type=int, default=6)
    ap.add_argument("--k", type=int, default=4)
    args = ap.parse_args()
    P, Q, err = fit(args.c, args.m, args.k)
    P32, Q32 = P.astype(np.float32), Q.astype(np.float32)
    print(f"|x| <= {args.c}: max abs error {err:.3g} (float64 coefficients), "
          f"{_err(P32.astype(np.float64), Q32.astype(np.float64), args.c):.3g} (rounded to float32)")
    print("P (x^0 first):", ", ".join(f"{p:.9e}f" for p in P32.tolist()))
    print("Q (x^0 first):", ", ".join(f"{q:.9e}f" for q in Q32.tolist()))


if __name__ == "__main__":
    main()
