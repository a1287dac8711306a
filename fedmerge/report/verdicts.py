"""Verdicts decided from paired intervals alone: pure rules over per-seed paired differences.

A claim is split into *parts*, each a statement about the mean of one per-seed paired difference (the same
clients and replies within a seed). A part is decided by one rule:

* :func:`greater` / :func:`less`: the mean lies above / below a threshold (0 unless stated);
* :func:`within`: the mean lies inside ±bound (equivalence, TOST), for "no damage" and "on par" statements.

A part *reproduces*, is *contradicted* (significantly the other way) or stays *inconclusive*; :func:`combine`
decides a claim from its parts. A family of comparisons (every remedy in every setting) is decided together,
with Holm's correction (:func:`classify`). :func:`negligible` derives an equivalence bound from the test set
the numbers are computed on; :func:`resolvable` is the smallest effect the seeds can resolve.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

from scipy import stats as scipy_stats

from fedmerge.report.stats import interval, t_test, tost

REPRODUCES, CONTRADICTED, INCONCLUSIVE = "reproduces", "contradicted", "inconclusive"
LEVEL, EQUIVALENCE_LEVEL, ALPHA = 0.95, 0.90, 0.05
BETTER, WORSE, ON_PAR, UNRESOLVED = "better", "worse", "on par", "unresolved"


def greater(diffs: Sequence[float], threshold: float = 0.0) -> str:
    """Reproduces when the 95% interval lies above ``threshold``, contradicted when below it, else inconclusive
    (an interval that touches the threshold, or fewer than two seeds)."""
    _, low, high = interval(diffs, LEVEL)
    return REPRODUCES if low > threshold else CONTRADICTED if high < threshold else INCONCLUSIVE


def less(diffs: Sequence[float], threshold: float = 0.0) -> str:
    """Reproduces when the 95% interval lies below ``threshold``, contradicted when above it, else inconclusive."""
    return greater([-d for d in diffs], -threshold)


def within(diffs: Sequence[float], bound: float) -> str:
    """Equivalence (TOST): reproduces when the 90% interval lies inside (−bound, +bound); contradicted when the 95%
    interval lies wholly outside [−bound, +bound] (a difference larger than the bound); else inconclusive."""
    _, low90, high90 = interval(diffs, EQUIVALENCE_LEVEL)
    _, low, high = interval(diffs, LEVEL)
    if -bound < low90 and high90 < bound:
        return REPRODUCES
    return CONTRADICTED if low > bound or high < -bound else INCONCLUSIVE


RULES = {"greater": greater, "less": less, "within": within}


def rule_text(test: str, threshold: float = 0.0) -> str:
    """The rule of ``test`` in words, with its threshold or bound."""
    at = f"{threshold:+.3f}" if threshold else "0"
    return {
        "greater": f"reproduces if the 95% interval lies above {at}, contradicted if below, else inconclusive",
        "less": f"reproduces if the 95% interval lies below {at}, contradicted if above, else inconclusive",
        "within": f"reproduces if the 90% interval lies inside ±{threshold:.3f} (TOST), contradicted if the 95% "
        f"interval lies outside ±{threshold:.3f}, else inconclusive",
    }[test]


def combine(verdicts: Sequence[str]) -> str:
    """A claim's verdict from its parts': reproduces when every part does, contradicted when any part is, else
    inconclusive (no parts: inconclusive)."""
    if CONTRADICTED in verdicts:
        return CONTRADICTED
    return REPRODUCES if verdicts and all(v == REPRODUCES for v in verdicts) else INCONCLUSIVE


COMBINE_TEXT = "the claim reproduces when every part reproduces, is contradicted when any part is, else inconclusive"


@dataclass(frozen=True)
class Part:
    """One testable statement of a claim: the per-seed paired differences it is about and the rule deciding it."""

    statement: str
    quantity: str
    diffs: tuple[float, ...]
    test: str
    threshold: float = 0.0

    @property
    def verdict(self) -> str:
        return RULES[self.test](self.diffs, self.threshold)

    @property
    def rule(self) -> str:
        return rule_text(self.test, self.threshold)


# -- families of comparisons ------------------------------------------------------------------------------
def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input's order: the i-th smallest p (i = 1..m) becomes
    max over j ≤ i of min(1, (m − j + 1)·p_(j)). A NaN p-value counts as 1."""
    m = len(p_values)
    p = [1.0 if math.isnan(v) else float(v) for v in p_values]
    adjusted, running = [0.0] * m, 0.0
    for rank, index in enumerate(sorted(range(m), key=lambda i: p[i])):
        running = max(running, min(1.0, (m - rank) * p[index]))
        adjusted[index] = running
    return adjusted


@dataclass(frozen=True)
class Comparison:
    """One comparison of a family, after Holm's correction over the family."""

    diffs: tuple[float, ...]
    bound: float
    p: float  # Holm-adjusted p of the paired t-test (difference ≠ 0)
    p_equivalence: float  # Holm-adjusted p of TOST (|difference| < bound)

    @property
    def outcome(self) -> str:
        """better / worse (adjusted p < 0.05), else on par (adjusted TOST p < 0.05), else unresolved."""
        mean = interval(self.diffs)[0]
        if self.p < ALPHA:
            return BETTER if mean > 0 else WORSE
        return ON_PAR if self.p_equivalence < ALPHA else UNRESOLVED


FAMILY_TEXT = (
    "each comparison is better or worse when its paired t-test's p-value, Holm-adjusted over the {m} "
    "comparisons of the family, is below 0.05; on par when its TOST p-value (|difference| < its bound), "
    "Holm-adjusted likewise, is below 0.05; else unresolved"
)


def classify(diffs: Mapping[Hashable, Sequence[float]], bounds: Mapping[Hashable, float]) -> dict[Hashable, Comparison]:
    """Every comparison of a family (key → per-seed paired differences, and its equivalence bound), with the
    paired t-tests and the equivalence tests each Holm-corrected over the family."""
    keys = list(diffs)
    p = holm([t_test(diffs[k]) for k in keys])
    p_eq = holm([tost(diffs[k], bounds[k]) for k in keys])
    return {k: Comparison(tuple(diffs[k]), bounds[k], p[i], p_eq[i]) for i, k in enumerate(keys)}


def somewhere(outcomes: Sequence[str], wanted: str) -> str:
    """ "``wanted`` (better or worse) in some comparison": reproduces when one is; contradicted when every comparison
    is on par or the opposite (none can be ``wanted`` by more than its bound); else inconclusive."""
    opposite = WORSE if wanted == BETTER else BETTER
    if wanted in outcomes:
        return REPRODUCES
    return CONTRADICTED if outcomes and all(o in (ON_PAR, opposite) for o in outcomes) else INCONCLUSIVE


def resolvable(diffs: Sequence[Sequence[float]], comparisons: int = 1) -> float:
    """The smallest mean paired difference the seeds can tell from zero: t·s/√n, with s the pooled standard
    deviation of the comparisons' differences, n their seeds, and t the two-sided 5% point divided over
    ``comparisons`` (Holm's first step; 1: uncorrected). NaN with fewer than two seeds."""
    groups = [[float(v) for v in group] for group in diffs if len(group) >= 2]
    if not groups:
        return math.nan
    n = min(len(g) for g in groups)
    variance = sum(_variance(g) for g in groups) / len(groups)
    t = float(scipy_stats.t.ppf(1 - ALPHA / (2 * comparisons), n - 1))
    return t * math.sqrt(variance / n)


def _variance(values: Sequence[float]) -> float:
    mean = sum(values) / len(values)
    return sum((v - mean) ** 2 for v in values) / (len(values) - 1)


def negligible(accuracy: float, examples: int, scale: float = 1.0) -> float:
    """An equivalence bound from the test set: the 95% sampling half-width 1.96·√(a(1 − a)/n) of an accuracy ``a``
    measured on ``n`` test examples, divided by ``scale`` (the own fine-tunes' accuracy, for normalized accuracy).
    A difference inside it is one a test set of that size cannot resolve."""
    z = float(scipy_stats.norm.ppf(0.5 + LEVEL / 2))
    return z * math.sqrt(accuracy * (1 - accuracy) / examples) / scale


# -- FedNova's default normaliser ---------------------------------------------------------------------------
def harmless(diffs: Sequence[Sequence[float]]) -> bool:
    """No comparison's 95% interval lies below zero (uncorrected: a screen for harm, which a multiplicity correction
    would make easier to pass; an interval that cannot be computed shows no harm)."""
    return not any(interval(d, LEVEL)[2] < 0 for d in diffs)


def default_normaliser(diffs: Mapping[str, Sequence[Sequence[float]]], order: Sequence[str]) -> str:
    """The first normaliser of ``order`` whose paired differences to FedAvg (one sequence per held-out recipe and
    mode) are all :func:`harmless`; ``order[0]`` when none is."""
    return next((name for name in order if harmless(diffs[name])), order[0])
