"""Krum, Multi-Krum, Bulyan and the coordinate-wise trimmed mean: against their papers' rules written here in NumPy
(ties, T at the minimum allowed, f = 0), against Flower's own strategies on the same replies, through
``fedmerge merge`` on safetensors files, and their refusals."""

from itertools import combinations

import numpy as np
import pytest
import torch
from flwr.serverapp.strategy import Bulyan as FlowerBulyan
from flwr.serverapp.strategy import FedTrimmedAvg as FlowerFedTrimmedAvg
from flwr.serverapp.strategy import Krum as FlowerKrum
from flwr.serverapp.strategy import MultiKrum as FlowerMultiKrum
from flwr.server.strategy.aggregate import aggregate_bulyan, aggregate_krum
from safetensors.torch import load_file, save_file

from fedmerge.cli import main
from fedmerge.errors import FedmergeError
from fedmerge.merging import METHODS, merged_model
from fedmerge.merging.rule import merge
from fedmerge.merging.rules.bulyan import BulyanRule
from fedmerge.merging.rules.krum import KrumRule, MultiKrumRule
from fedmerge.merging.rules.trimmed_mean import TrimmedMeanRule
from fedmerge.strategies import Bulyan, Krum, MultiKrum, TrimmedMean
from replies import arrays_record, reply

SHAPES = {"w": (3, 4), "b": (5,)}


# -- the papers' rules, written independently ----------------------------------------------------------------------
def paper_scores(x: np.ndarray, f: int, neighbours: int | None = None) -> np.ndarray:
    """Blanchard et al.: s(t) = the sum of ‖x_t − x_u‖² over the T − f − 2 u ≠ t nearest x_t (direct differences)."""
    k = len(x) - f - 2 if neighbours is None else neighbours
    scores = []
    for t in range(len(x)):
        others = [float(np.sum((x[t] - x[u]) ** 2)) for u in range(len(x)) if u != t]
        scores.append(sum(sorted(others)[:k]))
    return np.array(scores)


def paper_multi_krum(x: np.ndarray, f: int, m: int, weights=None) -> np.ndarray:
    """The mean (p-weighted) of the m of least score, equal scores taken in the order given."""
    best = sorted(range(len(x)), key=lambda t: (paper_scores(x, f)[t], t))[:m]
    p = np.ones(len(x)) if weights is None else np.asarray(weights, dtype=float)
    return sum(p[t] * x[t] for t in best) / p[best].sum()


def paper_bulyan_selection(x: np.ndarray, f: int) -> list[int]:
    """El Mhamdi et al.: Krum over the updates left, θ = T − 2f times (|R| − f − 2 neighbours, within 1..|R| − 1)."""
    left, chosen = list(range(len(x))), []
    while len(chosen) < len(x) - 2 * f:
        k = min(len(left) - 1, max(1, len(left) - f - 2))
        scores = paper_scores(x[left], f, k)
        best = left[min(range(len(left)), key=lambda i: (scores[i], i))]
        chosen.append(best)
        left.remove(best)
    return chosen


def paper_bulyan(x: np.ndarray, f: int, selected: list[int] | None = None) -> np.ndarray:
    """Per coordinate, the mean of the β = θ − 2f selected values nearest their median: every β-subset minimising
    Σ|x − median| (brute force), their means averaged where several do."""
    chosen = x[paper_bulyan_selection(x, f) if selected is None else selected]
    beta = len(chosen) - 2 * f
    out = []
    for column in chosen.T:
        median = np.median(column)
        costs = {c: sum(abs(column[i] - median) for i in c) for c in combinations(range(len(column)), beta)}
        least = min(costs.values())
        out.append(np.mean([column[list(c)].mean() for c, cost in costs.items() if cost <= least + 1e-12]))
    return np.array(out)


def paper_trimmed_mean(x: np.ndarray, beta: float) -> np.ndarray:
    """Yin et al.: per coordinate, drop the ⌊β·T⌋ largest and smallest, average the rest."""
    b = int(beta * len(x))
    return np.sort(x, axis=0)[b : len(x) - b].mean(axis=0)


# -- fixtures -------------------------------------------------------------------------------------------------------
def task_vectors(x: np.ndarray, dtype=torch.float64) -> list[dict[str, torch.Tensor]]:
    """Each row of x as a task vector of the tensors of SHAPES."""
    out = []
    for row in x:
        tensors, start = {}, 0
        for name, shape in SHAPES.items():
            size = int(np.prod(shape))
            tensors[name] = torch.tensor(row[start : start + size].reshape(shape), dtype=dtype)
            start += size
        out.append(tensors)
    return out


def flat(delta: dict[str, torch.Tensor]) -> np.ndarray:
    return np.concatenate([delta[name].double().numpy().ravel() for name in SHAPES])


def random_rows(num: int, seed: int = 0, outliers: int = 0) -> np.ndarray:
    """num updates of 17 coordinates; the last ``outliers`` far off."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(num, 17))
    x[num - outliers :] += rng.normal(10.0, 3.0, size=(outliers, 17))
    return x


def rule_delta(rule, x):
    return flat(merge(rule, task_vectors(x)))


# -- against the papers ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num, f", [(3, 0), (7, 2), (9, 1), (10, 0)])
def test_krum_is_the_update_of_least_score(num, f):
    x = random_rows(num, seed=num, outliers=f)
    rule = KrumRule(f)
    np.testing.assert_allclose(rule_delta(rule, x), paper_multi_krum(x, f, 1), rtol=0, atol=1e-12)
    np.testing.assert_allclose(rule.params()["scores"], paper_scores(x, f), rtol=1e-10)
    assert rule.params()["selected"] == [int(np.argmin(paper_scores(x, f)))]


@pytest.mark.parametrize("num, f, m", [(5, 1, 2), (7, 2, 3), (7, 2, 0), (6, 0, 6), (8, 1, 1)])
def test_multi_krum_averages_the_m_of_least_score(num, f, m):
    x = random_rows(num, seed=10 + num, outliers=f)
    expected = paper_multi_krum(x, f, m or num - f)
    np.testing.assert_allclose(rule_delta(MultiKrumRule(f, m), x), expected, rtol=0, atol=1e-12)


def test_multi_krum_weighs_the_selected_by_p():
    x, weights = random_rows(7, seed=3, outliers=1), [5, 1, 2, 8, 3, 1, 4]
    expected = paper_multi_krum(x, 1, 4, weights)
    np.testing.assert_allclose(rule_delta(MultiKrumRule(1, 4, weights), x), expected, rtol=0, atol=1e-12)


def test_multi_krum_of_every_update_is_the_mean():
    x = random_rows(6, seed=4)
    np.testing.assert_allclose(rule_delta(MultiKrumRule(0, 6), x), x.mean(0), rtol=0, atol=1e-12)


PLUS = np.array([[0, 0], [1, 0], [-1, 0], [0, 1], [0, -1]], dtype=float)
"""A plus: its centre nearest everyone, its four arms tied in distances and in score."""


@pytest.mark.parametrize("order", [[0, 1, 2, 3, 4], [3, 1, 4, 0, 2], [2, 4, 3, 1, 0]])
@pytest.mark.parametrize("m", [1, 2, 3])
def test_ties_in_distances_and_scores_go_to_the_client_given_first(order, m):
    x = np.pad(PLUS[order], ((0, 0), (0, 15)))  # integers: every distance and score exact, ties exact
    rule = MultiKrumRule(0, m)
    np.testing.assert_array_equal(rule_delta(rule, x), paper_multi_krum(x, 0, m))
    centre, arms = order.index(0), [i for i in range(5) if order[i] != 0]
    assert rule.params()["selected"] == [centre, *arms[: m - 1]]


def test_two_identical_best_updates_krum_takes_the_first():
    x = np.pad(np.array([[5, 5], [0, 0], [1, 1], [0, 0], [9, 9]], dtype=float), ((0, 0), (0, 15)))
    rule = KrumRule(1)
    rule_delta(rule, x)
    assert rule.params()["selected"] == [1]


@pytest.mark.parametrize("num, f", [(3, 0), (7, 1), (8, 1), (11, 2), (6, 0)])
def test_bulyan_is_the_papers_rule(num, f):
    x = random_rows(num, seed=20 + num, outliers=f)
    rule = BulyanRule(f)
    np.testing.assert_allclose(rule_delta(rule, x), paper_bulyan(x, f), rtol=0, atol=1e-12)
    assert rule.params()["selected"] == paper_bulyan_selection(x, f)


def test_bulyan_without_malicious_clients_is_the_mean():
    x = random_rows(5, seed=5)
    np.testing.assert_allclose(rule_delta(BulyanRule(0), x), x.mean(0), rtol=0, atol=1e-12)


def test_bulyan_values_tied_at_the_last_place_share_it():
    """Columns where values on both sides of the median are equally far at the β-th place: the mean over every
    β-subset the paper allows."""
    columns = np.array(
        [
            [-1, -1, 0, 1, 1, 40, -50],
            [-2, 0, 0, 2, 2, 40, -50],
            [3, 3, 3, 3, 3, 40, -50],
            [-1, 0, 1, 1, 2, 40, -50],
            [0, 1, 1, 1, 3, 40, -50],
        ],
        dtype=float,
    ).T
    common = np.array([[0, 0], [0, 1], [1, 0], [1, 1], [0, 0], [30, 30], [-40, -40]], dtype=float)
    x = np.pad(np.hstack([common, columns]), ((0, 0), (0, 10)))  # T = 7, f = 1: θ = 5 (the first five), β = 3
    rule = BulyanRule(1)
    delta = rule_delta(rule, x)
    assert sorted(rule.params()["selected"]) == [0, 1, 2, 3, 4] == sorted(paper_bulyan_selection(x, 1))
    np.testing.assert_allclose(delta, paper_bulyan(x, 1), rtol=0, atol=1e-12)
    np.testing.assert_allclose(delta[2:7], [0, 2 / 9, 3, 1, 1], rtol=0, atol=1e-12)


def test_bulyan_one_pass_selection_is_krums_least_scores():
    x = random_rows(9, seed=9, outliers=1)
    rule = BulyanRule(1, "multi-krum")
    best = list(np.argsort(paper_scores(x, 1), kind="stable")[:7])
    np.testing.assert_allclose(rule_delta(rule, x), paper_bulyan(x, 1, best), rtol=0, atol=1e-12)
    assert rule.params()["selected"] == best


@pytest.mark.parametrize("num, beta", [(1, 0.4), (5, 0.2), (5, 0.19), (6, 0.34), (10, 0.49), (7, 0.0)])
def test_trimmed_mean_drops_floor_beta_t_at_each_end(num, beta):
    x = random_rows(num, seed=30 + num, outliers=1)
    rule = TrimmedMeanRule(beta)
    np.testing.assert_allclose(rule_delta(rule, x), paper_trimmed_mean(x, beta), rtol=0, atol=1e-12)
    assert rule.params()["trimmed"] == int(beta * num)


def test_trimmed_mean_equals_scipys_trim_mean():
    from scipy.stats import trim_mean

    x = random_rows(9, seed=8, outliers=2)
    np.testing.assert_allclose(rule_delta(TrimmedMeanRule(0.25), x), trim_mean(x, 0.25, axis=0), rtol=0, atol=1e-12)


def test_trimmed_mean_ties_are_harmless():
    x = np.pad(np.array([[1.0], [1.0], [1.0], [2.0], [0.0]]), ((0, 0), (0, 16)))
    np.testing.assert_array_equal(rule_delta(TrimmedMeanRule(0.2), x)[0], 1.0)


def test_coordinate_rules_over_many_chunks_and_threads_equal_flowers_and_scipys_arithmetic():
    from flwr.serverapp.strategy.bulyan import aggregate_n_closest_weights
    from scipy.stats import trim_mean

    rng = np.random.default_rng(6)
    x = rng.normal(size=(7, 600_001)).astype(np.float32)  # three chunks of 2^18 for each worker thread to take
    vectors = [{"big": torch.from_numpy(row)} for row in x]
    rule = BulyanRule(1)
    got = merge(rule, vectors)["big"].numpy()
    chosen = [x[t] for t in rule.params()["selected"]]
    expected = aggregate_n_closest_weights([np.median(chosen, axis=0)], [[row] for row in chosen], 3)[0]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    got = merge(TrimmedMeanRule(0.3), vectors)["big"].numpy()
    np.testing.assert_allclose(got, trim_mean(x, 0.3, axis=0), rtol=0, atol=1e-6)


def test_float32_task_vectors_merge_as_float32():
    x = random_rows(7, seed=1, outliers=1)
    for rule in (KrumRule(1), MultiKrumRule(1, 3), BulyanRule(1), TrimmedMeanRule(0.2)):
        delta = merge(rule, task_vectors(x, torch.float32))
        assert all(value.dtype == torch.float32 for value in delta.values())


# -- refusals -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "rule, num, message",
    [
        (
            KrumRule(2),
            6,
            r"Krum needs T ≥ 2f \+ 3 clients \(models\): with num_malicious_nodes f = 2 that is 7, but 6 were "
            r"given; lower num_malicious_nodes to at most 1 or merge at least 7 clients",
        ),
        (KrumRule(0), 2, r"Krum needs T ≥ 2f \+ 3 .* f = 0 that is 3, but 2 were given; merge at least 3 clients"),
        (MultiKrumRule(1, 2), 4, r"Krum needs T ≥ 2f \+ 3 .* at most 0 or merge at least 5"),
        (
            MultiKrumRule(0, 6),
            5,
            r"Multi-Krum cannot select num_nodes_to_select m = 6 of 5 clients \(models\); give m ≤ 5",
        ),
        (
            BulyanRule(1),
            6,
            r"Bulyan needs T ≥ 4f \+ 3 clients \(models\): with num_malicious_nodes f = 1 that is 7, but 6 "
            r"were given; lower num_malicious_nodes to at most 0 or merge at least 7 clients",
        ),
    ],
)
def test_too_few_clients_for_f_or_m_are_refused_naming_the_fix(rule, num, message):
    with pytest.raises(FedmergeError, match=message):
        merge(rule, task_vectors(random_rows(num)))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: Krum(num_malicious_nodes=-1), "'Krum.num_malicious_nodes' must be an integer ≥ 0"),
        (lambda: MultiKrum(num_nodes_to_select=1.5), "'MultiKrum.num_nodes_to_select' must be an integer ≥ 0"),
        (lambda: Bulyan(num_malicious_nodes=True), "'Bulyan.num_malicious_nodes' must be an integer ≥ 0"),
        (lambda: Bulyan(selection="one-pass"), "'Bulyan.selection' must be one of recursive, multi-krum"),
        (lambda: TrimmedMean(beta=0.5), r"'TrimmedMean.beta' must be a number in \[0, 0.5\)"),
        (lambda: TrimmedMean(beta=-0.1), r"'TrimmedMean.beta' must be a number in \[0, 0.5\)"),
        (lambda: KrumRule(-1), "Krum's num_malicious_nodes f must be an integer ≥ 0, got -1"),
        (lambda: MultiKrumRule(0, 2.5), "Multi-Krum's num_nodes_to_select m must be an integer ≥ 0, got 2.5"),
        (lambda: BulyanRule(0, "median"), "Bulyan's selection must be one of recursive, multi-krum"),
        (lambda: TrimmedMeanRule(0.7), r"'TrimmedMeanRule.beta' must be a number in \[0, 0.5\)"),
    ],
)
def test_bad_parameters_are_refused_naming_them(make, message):
    with pytest.raises(FedmergeError, match=message):
        make()


def test_the_one_shot_grids_stay_within_what_t_allows():
    norms = lambda num: [1.0] * num + [float("nan")]  # a non-finite client does not count
    assert METHODS["krum"].grid(norms(3)) == [0] and METHODS["krum"].grid(norms(9)) == [0, 1, 2, 3]
    assert METHODS["krum"].grid(norms(30)) == [0, 3, 6, 10, 13]
    assert METHODS["multi-krum"].grid(norms(3)) == [1, 2, 3] and METHODS["multi-krum"].grid(norms(9)) == [1, 3, 5, 7, 9]
    assert METHODS["bulyan"].grid(norms(6)) == [0] and METHODS["bulyan"].grid(norms(11)) == [0, 1, 2]
    assert METHODS["trimmed-mean"].grid([1.0] * 3) == [0.0, 0.4] and METHODS["trimmed-mean"].grid([1.0] * 10) == [
        0.0,
        0.1,
        0.2,
        0.3,
        0.4,
    ]
    for name in ("krum", "multi-krum", "bulyan", "trimmed-mean"):
        record = METHODS[name]
        assert record.scale == "mean" and record.no_lambda.startswith("its paper") and not record.linear


# -- against Flower's strategies, on the same replies ---------------------------------------------------------------
def federation(num, seed, outliers=0, examples=None, dtype=np.float64):
    """θ and num replies θ_t = θ + τ_t (the last ``outliers`` far off), as Flower reply Messages."""
    rng = np.random.default_rng(seed)
    base = {name: rng.normal(size=shape).astype(dtype) for name, shape in SHAPES.items()}
    x = random_rows(num, seed, outliers)

    def replies():
        return [
            reply(
                100 + t,
                {name: base[name] + tensor.numpy().astype(dtype) for name, tensor in tau.items()},
                num_examples=(examples or [50] * num)[t],
                client_id=t,
            )
            for t, tau in enumerate(task_vectors(x))
        ]

    return base, replies  # Flower's strategies may consume their replies: each side gets its own


def assert_same_arrays(ours, theirs, tol):
    assert set(ours.keys()) == set(theirs.keys())
    for name in SHAPES:
        np.testing.assert_allclose(ours[name].numpy(), theirs[name].numpy(), rtol=0, atol=tol, err_msg=name)


@pytest.mark.parametrize("num, f", [(3, 0), (7, 2), (10, 1)])
def test_krum_equals_flowers_krum(num, f):
    base, replies = federation(num, seed=num, outliers=f)
    ours, _ = Krum(num_malicious_nodes=f).merge_replies(1, replies(), arrays_record(base))
    theirs, _ = FlowerKrum(num_malicious_nodes=f).aggregate_train(1, replies())
    assert_same_arrays(ours, theirs, 1e-12)


@pytest.mark.parametrize("num, f, m", [(5, 1, 2), (7, 2, 3), (9, 0, 9)])
def test_example_weighted_multi_krum_equals_flowers_multikrum(num, f, m):
    base, replies = federation(num, seed=40 + num, outliers=f, examples=[10 * (t + 1) for t in range(num)])
    ours, _ = MultiKrum(num_malicious_nodes=f, num_nodes_to_select=m, weighting="num-examples").merge_replies(
        1, replies(), arrays_record(base)
    )
    theirs, _ = FlowerMultiKrum(num_malicious_nodes=f, num_nodes_to_select=m).aggregate_train(1, replies())
    assert_same_arrays(ours, theirs, 1e-12)


def test_uniform_multi_krum_equals_flowers_with_equal_examples():
    base, replies = federation(8, seed=2, outliers=1)
    ours, _ = MultiKrum(num_malicious_nodes=1, num_nodes_to_select=4).merge_replies(1, replies(), arrays_record(base))
    theirs, _ = FlowerMultiKrum(num_malicious_nodes=1, num_nodes_to_select=4).aggregate_train(1, replies())
    assert_same_arrays(ours, theirs, 1e-12)


@pytest.mark.parametrize("num, f", [(3, 0), (7, 1), (12, 2)])
def test_one_pass_bulyan_equals_flowers_bulyan_strategy(num, f):
    base, replies = federation(num, seed=50 + num, outliers=f)
    ours, _ = Bulyan(num_malicious_nodes=f, selection="multi-krum").merge_replies(1, replies(), arrays_record(base))
    theirs, _ = FlowerBulyan(num_malicious_nodes=f).aggregate_train(1, replies())
    assert_same_arrays(ours, theirs, 1e-12)


@pytest.mark.parametrize("num, f", [(3, 0), (7, 1), (12, 2)])
def test_recursive_bulyan_equals_flowers_aggregate_bulyan(num, f):
    """Flower's legacy ``aggregate_bulyan`` applies Krum again and again, as the paper does."""
    base, replies = federation(num, seed=60 + num, outliers=f)
    ours, _ = Bulyan(num_malicious_nodes=f).merge_replies(1, replies(), arrays_record(base))
    results = [([r.content["arrays"][name].numpy() for name in SHAPES], 1) for r in replies()]
    theirs = aggregate_bulyan(results, f, aggregate_krum, to_keep=0)
    for name, value in zip(SHAPES, theirs):
        np.testing.assert_allclose(ours[name].numpy(), value, rtol=0, atol=1e-12, err_msg=name)


def test_the_two_bulyan_selections_differ_and_flowers_strategy_is_the_one_pass():
    base, replies = federation(9, seed=0)  # no outlier: the two ways choose different updates
    recursive, one_pass = Bulyan(num_malicious_nodes=1), Bulyan(num_malicious_nodes=1, selection="multi-krum")
    by_recursion, _ = recursive.merge_replies(1, replies(), arrays_record(base))
    in_one_pass, _ = one_pass.merge_replies(1, replies(), arrays_record(base))
    theirs, _ = FlowerBulyan(num_malicious_nodes=1).aggregate_train(1, replies())
    assert sorted(recursive.rounds[0].rule["selected"]) == [0, 1, 2, 3, 4, 5, 7]
    assert sorted(one_pass.rounds[0].rule["selected"]) == [0, 1, 3, 5, 6, 7, 8]
    assert not np.allclose(by_recursion["w"].numpy(), in_one_pass["w"].numpy())
    assert_same_arrays(in_one_pass, theirs, 1e-12)


@pytest.mark.parametrize("num, beta", [(5, 0.2), (6, 0.34), (10, 0.1), (4, 0.0), (7, 0.49)])
def test_trimmed_mean_equals_flowers_fedtrimmedavg(num, beta):
    base, replies = federation(num, seed=70 + num, outliers=1, dtype=np.float32)
    ours, _ = TrimmedMean(beta=beta).merge_replies(1, replies(), arrays_record(base))
    theirs, _ = FlowerFedTrimmedAvg(beta=beta).aggregate_train(1, replies())
    assert_same_arrays(ours, theirs, 1e-6)


def test_the_round_record_names_the_selected_clients():
    base, replies = federation(7, seed=3, outliers=2)
    strategy = MultiKrum(num_malicious_nodes=2, num_nodes_to_select=3)
    strategy.merge_replies(4, replies(), arrays_record(base))
    rule = strategy.record_for(4).rule
    assert rule["rule"] == "multi-krum" and len(rule["selected"]) == 3 and not {5, 6} & set(rule["selected"])
    scores = rule["scores"]
    assert len(scores) == 7 and min(scores[t] for t in (5, 6)) > max(scores[t] for t in rule["selected"])


# -- through `fedmerge merge` on safetensors files ------------------------------------------------------------------
def checkpoint_files(tmp_path, num, outliers):
    """θ and num fine-tunes (float32, one integer buffer) saved as safetensors; the task vectors as float64 rows."""
    g = torch.Generator().manual_seed(num)
    base = {"w": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g), "steps": torch.tensor(7)}
    models = []
    for t in range(num):
        shift = 10.0 if t >= num - outliers else 0.0
        models.append(
            {
                "w": base["w"] + shift + torch.randn(3, 4, generator=g),
                "b": base["b"] + shift + torch.randn(5, generator=g),
                "steps": torch.tensor(7 + t),
            }
        )
    save_file(base, tmp_path / "base.safetensors")
    paths = []
    for t, model in enumerate(models):
        paths.append(str(tmp_path / f"model{t}.safetensors"))
        save_file(model, paths[-1])
    rows = np.stack([np.concatenate([(m[n] - base[n]).double().numpy().ravel() for n in SHAPES]) for m in models])
    return base, models, str(tmp_path / "base.safetensors"), paths, rows


MERGES = {
    "krum": (["--num-malicious-nodes", "2"], KrumRule(2), lambda x: paper_multi_krum(x, 2, 1)),
    "multi-krum": (
        ["--num-malicious-nodes", "1", "--num-nodes-to-select", "4"],
        MultiKrumRule(1, 4),
        lambda x: paper_multi_krum(x, 1, 4),
    ),
    "bulyan": (["--num-malicious-nodes", "1"], BulyanRule(1), lambda x: paper_bulyan(x, 1)),
    "trimmed-mean": (["--beta", "0.3"], TrimmedMeanRule(0.3), lambda x: paper_trimmed_mean(x, 0.3)),
}


@pytest.mark.parametrize("method", MERGES)
def test_fedmerge_merge_writes_the_papers_merge(tmp_path, capsys, method):
    flags, rule, paper = MERGES[method]
    base, models, base_path, paths, rows = checkpoint_files(tmp_path, 7, outliers=2)
    out = tmp_path / "merged.safetensors"
    assert main(["merge", "--base", base_path, "--models", *paths, "--method", method, *flags, "--out", str(out)]) == 0
    assert f"fedmerge: {method}: β = 1" in capsys.readouterr().err
    merged = load_file(out)
    assert all(torch.equal(merged[name], value) for name, value in merged_model(rule, base, models).items())
    expected = np.concatenate([base[n].double().numpy().ravel() for n in SHAPES]) + paper(rows)
    np.testing.assert_allclose(
        np.concatenate([merged[n].double().numpy().ravel() for n in SHAPES]), expected, rtol=0, atol=1e-5
    )


@pytest.mark.parametrize(
    "method, flags, message",
    [
        (
            "krum",
            ["--num-malicious-nodes", "3"],
            "Krum needs T ≥ 2f + 3 clients (models): with num_malicious_nodes f = 3",
        ),
        (
            "bulyan",
            ["--num-malicious-nodes", "2"],
            "Bulyan needs T ≥ 4f + 3 clients (models): with num_malicious_nodes",
        ),
        (
            "multi-krum",
            ["--num-nodes-to-select", "8"],
            "Multi-Krum cannot select num_nodes_to_select m = 8 of 7 clients",
        ),
        ("trimmed-mean", ["--beta", "0.5"], "--beta' must be a number in [0, 0.5)"),
        ("krum", ["--num-malicious-nodes", "-1"], "--num-malicious-nodes' must be an integer ≥ 0"),
        ("krum", ["--scaling", "1"], "--scaling: method 'krum' has no λ of its own: its paper (Blanchard et al. 2017)"),
        ("trimmed-mean", ["--num-malicious-nodes", "1"], "--num-malicious-nodes is only used by methods"),
    ],
)
def test_fedmerge_merge_refuses_bad_options_naming_them(tmp_path, capsys, method, flags, message):
    _, _, base_path, paths, _ = checkpoint_files(tmp_path, 7, outliers=0)
    out = tmp_path / "merged.safetensors"
    assert (
        main(
            ["merge", "--base", base_path, "--models", *paths, "--method", method, *flags, "--out", str(out), "--quiet"]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not out.exists()


def test_where_flowers_strategies_go_on_outside_the_papers_rules_these_refuse_or_define():
    base, replies = federation(5, seed=1)
    flowers, _ = FlowerKrum(num_malicious_nodes=2).aggregate_train(1, replies())  # scores by one neighbour
    assert set(flowers.keys()) == set(SHAPES)
    with pytest.raises(FedmergeError, match="Krum needs T ≥ 2f \\+ 3 clients"):
        Krum(num_malicious_nodes=2).merge_replies(1, replies(), arrays_record(base))
    empty, _ = FlowerMultiKrum(num_nodes_to_select=0).aggregate_train(1, replies())
    assert len(empty.keys()) == 0  # Flower's m = 0: no model at all
    ours, _ = MultiKrum(num_malicious_nodes=1).merge_replies(1, replies(), arrays_record(base))  # m = 0: T − f = 4
    four, _ = FlowerMultiKrum(num_malicious_nodes=1, num_nodes_to_select=4).aggregate_train(1, replies())
    assert_same_arrays(ours, four, 1e-12)


# -- in the one-shot search -----------------------------------------------------------------------------------------
@pytest.fixture
def server_app(monkeypatch):
    """Flower's task identity, which a running ServerApp has and server messages need."""
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


@pytest.mark.slow
def test_the_one_shot_search_covers_the_robust_methods_parameters(server_app):
    """Krum's f and the trimmed mean's β (the other grids are checked above), each beside β over the paper's grid."""
    from flwr.app import ArrayRecord, ConfigRecord

    from fedmerge.clients.app import client_app
    from fedmerge.simulations.experiment import Experiment
    from fedmerge.simulations.spec import Spec
    from fedmerge.tasks import load_suite
    from replies import InProcessGrid

    names, clients = ["krum", "trimmed-mean"], 7
    spec = Spec.from_dict(
        {"name": "robust", "suite": "digits", "clients": clients, "strategies": names, "training": {"steps": 5}}
    )
    fed = load_suite(spec.suite, clients, spec.suite_options, spec.seed)
    base = ArrayRecord({name: fed.pretrained[name] for name in fed.trained_names})
    grid = InProcessGrid(client_app(spec.to_flat()), clients)
    sender = spec.build_strategy("fedavg", private=fed.private_names, statistics=fed.statistics_names)
    replies = grid.send_and_receive(sender.configure_train(1, base, ConfigRecord({"num-rounds": 1}), grid))
    replies = sorted(replies, key=lambda r: r.content["metrics"]["client-id"])
    runs = {run["strategy"]: run for run in Experiment(spec, None).merge_one_shot(fed, base, replies)["runs"]}
    searched = {"krum": [0, 1, 2], "trimmed-mean": [0.0, 0.2, 0.3]}
    for name in names:
        method = METHODS[name]
        assert runs[name]["searched"][method.tuned] == searched[name], name
        assert runs[name]["selected"][method.tuned] in searched[name] and runs[name]["selected"]["scaling"] is None
        assert len(runs[name]["selection"]) == len(searched[name]) * 40, name  # and β over the paper's grid
    load_suite.cache_clear()
