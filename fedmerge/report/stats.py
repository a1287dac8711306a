"""Means with Student-t intervals over seeds, paired differences, and the p-values of the paired t-test and of
the equivalence test (TOST)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from scipy import stats


def _finite(values: Sequence[float]) -> list[float]:
    return [float(v) for v in values if v is not None and not math.isnan(float(v))]


def _sd(values: Sequence[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, int]:
    """(mean, half-width of the t-based confidence interval, n); the half-width is NaN when n < 2."""
    values = _finite(values)
    n = len(values)
    if n == 0:
        return math.nan, math.nan, 0
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan, n
    return mean, float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * _sd(values) / math.sqrt(n), n


def interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, lower end, upper end) of the t interval; the ends are NaN when n < 2."""
    mean, half, _ = mean_ci(values, confidence)
    return mean, mean - half, mean + half


def seed_differences(values: Mapping, reference: Mapping) -> dict:
    """key → ``values[k] − reference[k]`` for every key both hold (seeds, in sorted order)."""
    return {
        k: values[k] - reference[k]
        for k in sorted(values)
        if k in reference and values[k] is not None and reference[k] is not None
    }


def differences(values: Mapping, reference: Mapping) -> list[float]:
    """The per-seed paired differences ``values[k] − reference[k]`` (see :func:`seed_differences`)."""
    return list(seed_differences(values, reference).values())


def paired(values: dict, reference: dict, confidence: float = 0.95) -> tuple[float, float, int]:
    """Mean and t-interval of the paired differences ``values[k] − reference[k]`` over the keys both share (seeds),
    each difference taken within one seed (same clients, same replies)."""
    return mean_ci(differences(values, reference), confidence)


def t_test(values: Sequence[float]) -> float:
    """Two-sided p-value of the one-sample t-test of mean 0 (the paired t-test on differences); NaN when n < 2.
    Identical differences give 1 when they are all 0, else 0."""
    values = _finite(values)
    if len(values) < 2:
        return math.nan
    mean, sd = sum(values) / len(values), _sd(values)
    if sd == 0:
        return 1.0 if mean == 0 else 0.0
    return float(2 * stats.t.sf(abs(mean) / (sd / math.sqrt(len(values))), len(values) - 1))


def tost(values: Sequence[float], bound: float) -> float:
    """p-value of the two one-sided t-tests of equivalence (TOST): the larger of the p-values of H0: mean ≤ −bound
    and H0: mean ≥ +bound. Below 0.05 exactly when the 90% interval lies inside (−bound, +bound); NaN when n < 2."""
    values = _finite(values)
    if len(values) < 2:
        return math.nan
    n, mean, sd = len(values), sum(values) / len(values), _sd(values)
    if sd == 0:
        return 0.0 if -bound < mean < bound else 1.0
    se = sd / math.sqrt(n)
    return float(max(stats.t.sf((mean + bound) / se, n - 1), stats.t.cdf((mean - bound) / se, n - 1)))


def format_ci(mean: float, half: float, digits: int = 3) -> str:
    if math.isnan(mean):
        return "–"
    if math.isnan(half):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {half:.{digits}f}"


def format_interval(values: Sequence[float], confidence: float = 0.95, digits: int = 3) -> str:
    """``+0.012 [+0.004, +0.020]``: the mean and the ends of its t interval (the mean alone when n < 2)."""
    mean, low, high = interval(values, confidence)
    if math.isnan(mean):
        return "–"
    if math.isnan(low):
        return f"{mean:+.{digits}f}"
    return f"{mean:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]"


def sign(stat: tuple[float, float, int]) -> int:
    """+1 when the interval lies above zero, −1 below, 0 when it holds or touches zero (or cannot be computed)."""
    mean, half, _ = stat
    if math.isnan(mean) or math.isnan(half):
        return 0
    return 1 if mean - half > 0 else -1 if mean + half < 0 else 0


def format_paired(stat: tuple[float, float, int], digits: int = 3) -> str:
    """``+0.012 ± 0.005`` with a marker: ▲ the interval above zero, ▼ below, nothing when it holds zero."""
    mean, half, _ = stat
    if math.isnan(mean):
        return "–"
    mark = {1: " ▲", -1: " ▼", 0: ""}[sign(stat)]
    return (f"{mean:+.{digits}f}" if math.isnan(half) else f"{mean:+.{digits}f} ± {half:.{digits}f}") + mark
