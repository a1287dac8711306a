"""The verdict rules of the findings page on synthetic per-seed numbers, boundaries included."""

import math

import numpy as np
import pytest
from scipy import stats

from fedmerge.report import verdicts
from fedmerge.report.stats import interval, t_test, tost
from fedmerge.report.verdicts import (
    BETTER,
    CONTRADICTED,
    INCONCLUSIVE,
    ON_PAR,
    REPRODUCES,
    UNRESOLVED,
    WORSE,
    Part,
    classify,
    combine,
    default_normaliser,
    greater,
    harmless,
    holm,
    less,
    negligible,
    resolvable,
    somewhere,
    within,
)

DIFFS = (0.05, 0.07, 0.06, 0.08, 0.04)  # mean 0.06, clearly above zero with 5 seeds


def shifted(diffs, by):
    return tuple(d + by for d in diffs)


def test_greater_and_less_decide_from_the_95_interval_and_an_interval_touching_the_threshold_decides_nothing():
    mean, low, high = interval(DIFFS)
    assert low > 0 and greater(DIFFS) == REPRODUCES and less(DIFFS) == CONTRADICTED
    assert greater(shifted(DIFFS, -0.12)) == CONTRADICTED and less(shifted(DIFFS, -0.12)) == REPRODUCES
    assert greater(shifted(DIFFS, -mean)) == INCONCLUSIVE == less(shifted(DIFFS, -mean))  # holds zero
    assert greater(DIFFS, low) == INCONCLUSIVE and greater(DIFFS, low - 1e-12) == REPRODUCES  # touching: no verdict
    assert less(DIFFS, high) == INCONCLUSIVE and less(DIFFS, high + 1e-12) == REPRODUCES
    assert greater(DIFFS, high) == INCONCLUSIVE and greater(DIFFS, high + 1e-12) == CONTRADICTED
    assert greater((0.3,)) == INCONCLUSIVE  # one seed: no interval, no verdict


def test_the_issues_example_fednova_significantly_below_ta_contradicts_and_a_zero_holding_interval_is_inconclusive():
    # claim 2 today: FedNova − TA at 16x = −0.221 [−0.343, −0.099] was read as "partly"
    nova_minus_ta = (-0.12, -0.33, -0.17, -0.25, -0.235)
    assert interval(nova_minus_ta)[2] < 0 and greater(nova_minus_ta) == CONTRADICTED
    drop = (0.02, 0.11, 0.07, 0.13, 0.05)
    assert combine([greater(drop), greater(nova_minus_ta)]) == CONTRADICTED
    gap = (0.06, -0.03, 0.05, 0.0, 0.04)  # claim 3 today: +0.024 [−0.030, +0.078], read as "partly"
    assert interval(gap)[1] < 0 < interval(gap)[2] and greater(gap) == INCONCLUSIVE


def test_within_is_tost_on_the_90_interval_with_the_bound_edges_deciding_nothing():
    diffs = (0.01, -0.005, 0.0, 0.012, -0.002)
    _, low90, high90 = interval(diffs, 0.90)
    _, low, high = interval(diffs, 0.95)
    edge = max(-low90, high90)
    assert within(diffs, edge + 1e-9) == REPRODUCES
    assert within(diffs, edge) == INCONCLUSIVE  # the 90% interval touches the bound
    assert tost(diffs, edge + 1e-9) < 0.05 <= tost(diffs, edge)
    # a bound inside the 90% interval's reach but holding its mean: neither equivalent nor shown to differ
    assert -edge / 2 < interval(diffs)[0] < edge / 2 and within(diffs, edge / 2) == INCONCLUSIVE
    far = shifted(diffs, -0.2)  # a damage far beyond the bound
    assert within(far, 0.05) == CONTRADICTED and within(far, -interval(far)[2]) == INCONCLUSIVE  # touching: no verdict
    assert within((0.0, 0.0, 0.0), 0.01) == REPRODUCES  # identical merges: no spread, inside any bound


@pytest.mark.parametrize("seed", range(20))
def test_the_p_values_agree_with_the_intervals(seed):
    rng = np.random.default_rng(seed)
    diffs = tuple(rng.normal(rng.normal(0, 0.03), 0.03, 5))
    _, low, high = interval(diffs)
    assert (t_test(diffs) < 0.05) == (low > 0 or high < 0)
    assert t_test(diffs) == pytest.approx(stats.ttest_1samp(diffs, 0).pvalue)
    bound = abs(rng.normal(0, 0.04))
    _, low90, high90 = interval(diffs, 0.90)
    assert (tost(diffs, bound) < 0.05) == (-bound < low90 and high90 < bound)


def test_identical_differences_give_p_values_without_dividing_by_zero():
    assert t_test((0.0, 0.0, 0.0)) == 1.0 and t_test((0.1, 0.1)) == 0.0 and math.isnan(t_test((0.1,)))
    assert tost((0.01, 0.01), 0.02) == 0.0 and tost((0.03, 0.03), 0.02) == 1.0


def test_combine_needs_every_part_and_any_contradiction_wins():
    assert combine([REPRODUCES, REPRODUCES]) == REPRODUCES
    assert combine([REPRODUCES, INCONCLUSIVE]) == INCONCLUSIVE
    assert combine([REPRODUCES, CONTRADICTED]) == CONTRADICTED == combine([INCONCLUSIVE, CONTRADICTED])
    assert combine([]) == INCONCLUSIVE


def test_holm_steps_down_in_order_of_the_p_values():
    p = [0.01, 0.04, 0.03, 0.005]
    adjusted = holm(p)
    assert adjusted == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # step-down: 0.04 × 1 < 0.05, but Holm stops at the first p it cannot reject (0.03 × 2)
    assert [a < 0.05 for a in adjusted] == [True, False, False, True]
    assert all(a >= raw for a, raw in zip(adjusted, p))  # never below the raw p
    assert holm([0.5, 0.9]) == [1.0, 1.0]  # capped at 1
    assert holm([float("nan"), 0.01]) == pytest.approx([1.0, 0.02])  # NaN counts as 1 and as a comparison
    assert holm([0.02]) == [0.02]


def test_a_family_is_corrected_for_multiplicity():
    rng = np.random.default_rng(1)
    strong = tuple(0.1 + rng.normal(0, 0.01, 5))
    weak = (0.02, 0.035, 0.005, 0.03, 0.01)
    tiny = tuple(rng.normal(0, 0.002, 5))
    noisy = tuple(rng.normal(0, 0.2, 5))
    assert 0.005 < t_test(weak) < 0.05  # alone it would be "better"
    alone = classify({"weak": weak}, {"weak": 0.001})
    assert alone["weak"].outcome == BETTER
    keys = {
        "strong": strong,
        "down": tuple(-d for d in strong),
        "weak": weak,
        "tiny": tiny,
        "noisy": noisy,
        **{f"null{i}": tuple(rng.normal(0, 0.05, 5)) for i in range(5)},
    }
    family = classify(keys, {k: 0.02 for k in keys})
    assert family["strong"].outcome == BETTER and family["down"].outcome == WORSE
    assert family["weak"].outcome != BETTER and family["weak"].p > t_test(weak)  # Holm over 10 comparisons
    assert family["tiny"].outcome == ON_PAR and family["noisy"].outcome == UNRESOLVED


def test_somewhere_reproduces_on_one_outcome_and_is_contradicted_only_when_none_could_be():
    assert somewhere([UNRESOLVED, BETTER], BETTER) == REPRODUCES
    assert somewhere([ON_PAR, WORSE], BETTER) == CONTRADICTED
    assert somewhere([ON_PAR, UNRESOLVED], BETTER) == INCONCLUSIVE
    assert somewhere([ON_PAR, BETTER], WORSE) == CONTRADICTED and somewhere([], WORSE) == INCONCLUSIVE


def test_the_resolvable_effect_is_where_an_interval_just_clears_zero():
    diffs = [(0.01, 0.03, -0.02, 0.0, 0.02), (0.05, 0.01, 0.02, 0.04, 0.03)]
    effect = resolvable(diffs)
    sd = math.sqrt(np.mean([np.var(d, ddof=1) for d in diffs]))
    assert effect == pytest.approx(stats.t.ppf(0.975, 4) * sd / math.sqrt(5))
    at_edge = tuple(np.array(diffs[0]) - np.mean(diffs[0]) + resolvable([diffs[0]]))
    assert interval(at_edge)[1] == pytest.approx(0, abs=1e-12)  # a mean of exactly that size touches zero
    assert resolvable(diffs, 10) == pytest.approx(stats.t.ppf(1 - 0.05 / 20, 4) * sd / math.sqrt(5))
    assert resolvable(diffs, 10) > effect and math.isnan(resolvable([(0.1,)]))


def test_the_negligible_bound_is_the_test_sets_sampling_half_width():
    assert negligible(0.5, 400) == pytest.approx(1.959964 * 0.5 / 20)
    assert negligible(0.8, 1000, scale=0.9) == pytest.approx(1.959964 * math.sqrt(0.16 / 1000) / 0.9)
    assert negligible(0.8, 4000) == pytest.approx(negligible(0.8, 1000) / 2)  # 4× the examples: half the bound


def test_fednovas_default_is_the_first_normaliser_never_significantly_worse_than_fedavg():
    fine, harmful = (0.01, -0.02, 0.03, 0.0, 0.01), (-0.1, -0.12, -0.08, -0.11, -0.09)
    order = ("steps", "lr-sum")
    assert default_normaliser({"steps": [fine, fine], "lr-sum": [fine, harmful]}, order) == "steps"
    assert default_normaliser({"steps": [fine, harmful], "lr-sum": [fine, fine]}, order) == "lr-sum"
    assert default_normaliser({"steps": [harmful], "lr-sum": [harmful]}, order) == "steps"  # neither: FedNova's own
    touching = shifted(harmful, -interval(harmful)[2])  # the 95% interval ends exactly at zero
    assert harmless([touching]) and not harmless([shifted(touching, -1e-9)])
    assert harmless([(0.3,)])  # one seed: no interval, no shown harm


def test_a_part_prints_the_rule_it_is_decided_by():
    part = Part("FedAvg breaks", "damage", (-0.2, -0.25, -0.22), "less", -0.04)
    assert part.verdict == REPRODUCES and "below -0.040" in part.rule
    equivalence = Part("Median holds", "damage", (-0.2, -0.25, -0.22), "within", 0.04)
    assert equivalence.verdict == CONTRADICTED and "90% interval lies inside ±0.040" in equivalence.rule
    assert set(verdicts.RULES) == {"greater", "less", "within"}
