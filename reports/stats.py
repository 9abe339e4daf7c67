"""Intervals and verdicts over seeds: Student t intervals, Welch differences, slopes, correlation limits.

A report compares models from a handful of seeds, so every comparison it states carries the
interval that says how far the data can be trusted; this module is the one place those intervals
are computed. Pure Python (no SciPy), so the report needs nothing beyond its plotting stack.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

LEVEL = 0.95  # two-sided confidence level of every interval in the report


@dataclass(frozen=True)
class Interval:
    """An estimate with its two-sided interval and the degrees of freedom of its t quantile."""

    estimate: float
    lo: float
    hi: float
    df: float


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        step = d * c
        h *= step
        if abs(step - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    ln_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(ln_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(ln_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` (possibly fractional) degrees of freedom."""
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t (bisection on the CDF; exact to ~1e-12)."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def _mean_var(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else float("nan")
    return mean, var


def clip(value: float, bounds: tuple[float, float] | None) -> float:
    """``value`` limited to the metric's possible range (accuracy lies in [0, 1])."""
    if bounds is None:
        return value
    return min(max(value, bounds[0]), bounds[1])


def mean_interval(
    values: Sequence[float], level: float = LEVEL, bounds: tuple[float, float] | None = None
) -> Interval | None:
    """Student t interval of the mean over seeds, cut at ``bounds``; None with fewer than two seeds."""
    n = len(values)
    if n < 2:
        return None
    mean, var = _mean_var(values)
    half = t_quantile(0.5 + level / 2.0, n - 1) * math.sqrt(var / n)
    return Interval(mean, clip(mean - half, bounds), clip(mean + half, bounds), float(n - 1))


def welch_interval(
    a: Sequence[float], b: Sequence[float], level: float = LEVEL, sign: float = 1.0
) -> Interval | None:
    """Welch t interval of ``sign * (mean(a) - mean(b))``; None unless both sides have two seeds.

    Welch's form does not assume equal variances; its degrees of freedom come from the
    Welch-Satterthwaite equation (both sides with zero spread: n_a + n_b - 2).
    """
    na, nb = len(a), len(b)
    if na < 2 or nb < 2:
        return None
    ma, va = _mean_var(a)
    mb, vb = _mean_var(b)
    diff = sign * (ma - mb)
    qa, qb = va / na, vb / nb
    se = math.sqrt(qa + qb)
    if se == 0.0:
        return Interval(diff, diff, diff, float(na + nb - 2))
    df = (qa + qb) ** 2 / ((qa**2 / (na - 1) if qa else 0.0) + (qb**2 / (nb - 1) if qb else 0.0))
    half = t_quantile(0.5 + level / 2.0, df) * se
    return Interval(diff, diff - half, diff + half, df)


def verdict(interval: Interval | None) -> str:
    """``better`` / ``worse`` when the interval of the difference excludes zero, else ``cannot tell``."""
    if interval is None:
        return "cannot tell"
    if interval.lo > 0:
        return "better"
    if interval.hi < 0:
        return "worse"
    return "cannot tell"


def ols_slope(xs: Sequence[float], ys: Sequence[float], level: float = LEVEL) -> Interval | None:
    """Least-squares slope of ``ys`` on ``xs`` with its t interval (n - 2 df); None below three points."""
    n = len(xs)
    if n != len(ys) or n < 3:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx <= 0:
        return None
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    resid = sum((y - my - slope * (x - mx)) ** 2 for x, y in zip(xs, ys, strict=True))
    half = t_quantile(0.5 + level / 2.0, n - 2) * math.sqrt(resid / (n - 2) / sxx)
    return Interval(slope, slope - half, slope + half, float(n - 2))


def r_critical(n: int, level: float = LEVEL) -> float | None:
    """Smallest |Pearson r| that differs from zero at ``level`` with ``n`` points (t test, n - 2 df)."""
    if n < 3:
        return None
    t = t_quantile(0.5 + level / 2.0, n - 2)
    return t / math.sqrt(n - 2 + t * t)
