"""Means with 95% confidence intervals over seeds (Student's t)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from scipy import stats


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, int]:
    """(mean, half-width of the t-based confidence interval, n); the half-width is NaN when n < 2."""
    values = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    n = len(values)
    if n == 0:
        return math.nan, math.nan, 0
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan, n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n), n


def format_ci(mean: float, half: float, digits: int = 3) -> str:
    if math.isnan(mean):
        return "–"
    if math.isnan(half):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {half:.{digits}f}"


def paired(values: dict, reference: dict, confidence: float = 0.95) -> tuple[float, float, int]:
    """Mean and t-interval over the keys both share (seeds) of ``values[k] − reference[k]``: a paired comparison,
    each difference taken within one seed (same clients, same replies)."""
    return mean_ci([values[k] - reference[k] for k in values if k in reference
                    and values[k] is not None and reference[k] is not None], confidence)


def sign(stat: tuple[float, float, int]) -> int:
    """+1 when the interval lies above zero, −1 below, 0 when it holds zero (or cannot be computed)."""
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
