"""Model Breadcrumbs (with and without TIES's sign election) and DELLA against their papers' rules, written out here in
NumPy, exactly; their strategies, `fedmerge merge` and their refusals."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from fedmerge.checkpoints import merge_checkpoints
from fedmerge.cli import main
from fedmerge.errors import FedmergeError
from fedmerge.merging import METHODS, TaskVector, iter_merged_model, merged_model, ties
from fedmerge.merging.rules.breadcrumbs import BreadcrumbsRule, breadcrumbs
from fedmerge.merging.rules.dare import DareRule, random_bits, stream_key
from fedmerge.merging.rules.della import DellaRule, della
from fedmerge.merging.tensors import Term
from fedmerge.strategies import STRATEGIES
from replies import arrays_record, reply

SHAPES = {"w": (23, 11), "conv": (4, 3, 5), "b": (11,), "scale": ()}
WORD = 1 << 32


def setup(num_clients=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    model = lambda: {k: torch.randn(s, generator=gen, dtype=torch.float64) for k, s in SHAPES.items()}
    base = model()
    models = [model() for _ in range(num_clients)]
    return base, models, [TaskVector(m, base) for m in models]


def taus(task_vectors, name) -> np.ndarray:
    return np.stack([tv[name].numpy().reshape(-1) for tv in task_vectors])


def disjoint_mean(values: np.ndarray, p: np.ndarray) -> np.ndarray:
    """TIES: γ = sign(Σ p_t x_t) (+ at 0); the p-weighted mean of the entries of sign γ, 0 where none has it."""
    elected = np.where(p @ values >= 0, 1.0, -1.0)
    agree = (np.sign(values) == elected).astype(float)
    total = p @ agree
    return np.where(total > 0, (p @ (values * agree)) / np.where(total > 0, total, 1.0), 0.0)


def breadcrumbs_mask(tau: np.ndarray, density: float, gamma: float) -> np.ndarray:
    """Davari & Belilovsky's mask of one flat τ: by magnitude, largest first (ties by position), drop the first
    ⌊γ·n⌋ and keep the next ⌊k·n⌋ (≥ 1), dropping fewer outliers when there are not enough entries left."""
    if density >= 1:
        return np.ones(tau.size, bool)
    n = tau.size
    keep = max(1, int(density * n))
    top = min(int(gamma * n), n - keep)
    ranked = sorted(range(n), key=lambda j: (-abs(tau[j]), j))
    mask = np.zeros(n, bool)
    mask[ranked[top : top + keep]] = True
    return mask


@pytest.mark.parametrize("density, gamma", [(0.2, 0.01), (0.3, 0.1), (0.5, 0.0), (0.9, 0.3), (1.0, 0.1), (0.01, 0.0)])
@pytest.mark.parametrize("elect_sign", [False, True])
@pytest.mark.parametrize("weights", [None, [1, 2, 3, 4]])
def test_breadcrumbs_is_the_band_of_magnitudes_then_the_sum_or_ties(density, gamma, elect_sign, weights):
    _, _, tvs = setup()
    p = np.full(4, 0.25) if weights is None else np.array(weights) / 10
    got = breadcrumbs(tvs, density, gamma, elect_sign, weights)
    for name, shape in SHAPES.items():
        values = taus(tvs, name)
        masked = np.stack([v * breadcrumbs_mask(v, density, gamma) for v in values])
        expected = disjoint_mean(masked, p) if elect_sign else p @ masked
        np.testing.assert_allclose(got[name].numpy().reshape(-1), expected, rtol=1e-12, atol=1e-15, err_msg=name)


def test_breadcrumbs_ties_at_either_threshold_are_broken_by_position(monkeypatch):
    monkeypatch.setattr("fedmerge.merging.tensors.CHUNK", 7)  # ties spread over several chunks
    base = {"w": torch.zeros(40, dtype=torch.float64)}
    model = {"w": torch.tensor([1.0, -1.0] * 20, dtype=torch.float64)}  # 40 entries of magnitude 1
    got = breadcrumbs([TaskVector(model, base)], density=0.25, gamma=0.1)["w"]
    assert torch.count_nonzero(got) == 10 and torch.equal(got[4:14], model["w"][4:14])  # the 4 first dropped, 10 kept


def test_breadcrumbs_with_nothing_dropped_is_the_mean_and_its_ties_is_the_untrimmed_disjoint_mean():
    _, _, tvs = setup()
    mean = {k: sum(tv[k] for tv in tvs) / 4 for k in SHAPES}
    got = breadcrumbs(tvs, density=1.0, gamma=0.3)
    assert all(torch.allclose(got[k], mean[k], rtol=1e-12) for k in SHAPES)
    got, want = breadcrumbs(tvs, 1.0, 0.3, elect_sign=True), ties(tvs, 1.0)
    assert all(torch.equal(got[k], want[k]) for k in SHAPES)


def della_paper(
    values: np.ndarray,
    shape: tuple,
    name: str,
    density: float,
    epsilon: float,
    seed: int,
    clients: list[int],
    draw: int = 0,
) -> np.ndarray:
    """MagPrune: in each row (a matrix's row, a higher tensor's leading slices, a vector whole), rank by magnitude
    (0 the smallest, ties by position); keep with q = k − ε + 2ε·r/(n − 1) where DARE's bits at the position are below
    round(q·2³²), rescale by 1/q; then TIES's disjoint mean."""
    n = int(np.prod(shape[1:])) if len(shape) >= 2 else max(1, int(np.prod(shape)))
    dropped = np.zeros_like(values)
    for t, (tau, client) in enumerate(zip(values, clients)):
        rows = np.abs(tau).reshape(-1, n)
        ranks = np.argsort(np.argsort(rows, axis=1, kind="stable"), axis=1, kind="stable")
        q = (np.full(rows.shape, density) if n == 1 else density - epsilon + 2 * epsilon * ranks / (n - 1)).reshape(-1)
        bits = random_bits(stream_key(seed, draw, client, name), slice(0, tau.size), torch.device("cpu")).numpy()
        kept = bits.astype(np.int64) % WORD < np.minimum(np.round(q * WORD), WORD - 1)
        dropped[t] = np.where(kept, tau / q, 0.0)
    return dropped


@pytest.mark.parametrize("density, epsilon", [(0.2, 0.15), (0.5, 0.3), (0.3, 0.0), (1.0, 0.5)])
@pytest.mark.parametrize("weights", [None, [4, 3, 2, 1]])
def test_della_is_magnitude_ranked_drops_rescaled_then_the_disjoint_mean(density, epsilon, weights, monkeypatch):
    monkeypatch.setattr("fedmerge.merging.tensors.CHUNK", 13)  # rows cut by chunks: each is ranked whole
    _, _, tvs = setup()
    p = np.full(4, 0.25) if weights is None else np.array(weights) / 10
    got = della(tvs, density, epsilon, seed=7, weights=weights)
    for name, shape in SHAPES.items():
        values = taus(tvs, name)
        dropped = values if density >= 1 else della_paper(values, shape, name, density, epsilon, 7, [0, 1, 2, 3])
        np.testing.assert_allclose(
            got[name].numpy().reshape(-1), disjoint_mean(dropped, p), rtol=1e-12, atol=1e-15, err_msg=name
        )


def test_della_keeps_a_share_k_the_largest_most_often_and_is_unbiased_before_the_election():
    """Over many seeds: a row keeps k of its entries on average, its largest entry with probability k + ε, its
    smallest with k − ε; and the rescaled drops average to τ (one client: the election keeps every entry)."""
    base = {"w": torch.zeros(1, 50, dtype=torch.float64)}
    model = {"w": torch.linspace(-1, 1, 50, dtype=torch.float64).roll(7).view(1, 50)}
    runs = torch.stack([della([TaskVector(model, base)], 0.4, 0.3, seed)["w"].view(-1) for seed in range(2000)])
    kept = (runs != 0).double().mean(0)
    order = model["w"].view(-1).abs().argsort()
    assert abs(float(kept.mean()) - 0.4) < 0.01
    assert abs(float(kept[order[-1]]) - 0.7) < 0.04 and abs(float(kept[order[0]]) - 0.1) < 0.03
    scale = float(model["w"].abs().max())
    assert float((runs.mean(0) - model["w"].view(-1)).abs().max()) < 0.2 * scale


def test_della_with_epsilon_zero_is_dare_ties_with_the_same_draws():
    base, models, _ = setup()
    got = merged_model(DellaRule(0.3, 0.0, seed=5), base, models)
    want = merged_model(DareRule(0.3, 5, elect_sign=True), base, models)
    assert all(torch.equal(got[k], want[k]) for k in SHAPES)


def test_della_draws_are_seeded_and_independent_of_chunking_and_threads(monkeypatch):
    _, _, tvs = setup()
    monkeypatch.setattr("fedmerge.merging.rule.available_cores", lambda: 1)
    whole = della(tvs, 0.4, 0.2, seed=5)
    monkeypatch.setattr("fedmerge.merging.tensors.CHUNK", 3)
    chunked = della(tvs, 0.4, 0.2, seed=5)
    monkeypatch.setattr("fedmerge.merging.rule.available_cores", lambda: 4)
    threaded = della(tvs, 0.4, 0.2, seed=5)
    other = della(tvs, 0.4, 0.2, seed=6)
    assert all(torch.equal(whole[k], chunked[k]) and torch.equal(whole[k], threaded[k]) for k in SHAPES)
    assert not torch.equal(whole["w"], other["w"])


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: BreadcrumbsRule(0), r"'Breadcrumbs density' must be a number in \(0, 1\], got 0"),
        (lambda: BreadcrumbsRule(0.2, gamma=1.0), r"'Breadcrumbs gamma' must be a number in \[0, 1\), got 1.0"),
        (lambda: BreadcrumbsRule(0.2, gamma=-0.1), r"'Breadcrumbs gamma' must be a number in \[0, 1\), got -0.1"),
        (
            lambda: DellaRule(0.2, 0.2),
            r"DELLA keeps entries with probabilities k ± ε, which must lie in \(0, 1\): density "
            r"k = 0.2 needs epsilon ε < 0.2, got 0.2",
        ),
        (lambda: DellaRule(0.9, 0.15), r"density k = 0.9 needs epsilon ε < 0.1, got 0.15"),
        (lambda: DellaRule(0.5, -0.1), r"'DELLA epsilon' must be a number ≥ 0, got -0.1"),
        (lambda: DellaRule(0.5, 0.1, seed=-1), "'DELLA seed' must be an integer ≥ 0, got -1"),
    ],
)
def test_bad_parameters_are_refused(make, message):
    with pytest.raises(FedmergeError, match=message):
        make()


def test_the_records_and_their_one_shot_grids():
    assert [p.name for p in METHODS["breadcrumbs"].params] == ["density", "gamma"]
    assert (METHODS["breadcrumbs"].scale, METHODS["breadcrumbs-ties"].scale, METHODS["della"].scale) == (
        "sum",
        "mean",
        "mean",
    )
    for name in ("breadcrumbs", "breadcrumbs-ties", "della"):
        method = METHODS[name]
        assert method.tuned == "density" and not method.no_lambda
        for density in method.grid([1.0]):  # every candidate is a valid rule with the default other parameters
            method.build(None, **{**method.resolve({}, "merge"), "density": density})
    assert METHODS["della"].grid([]) == [0.2, 0.3, 0.5, 0.7]
    assert {p.name: p.option.default for p in METHODS["della"].params} == {"density": 0.2, "epsilon": 0.15, "seed": 0}


def numpy(tensors):
    return {k: v.numpy() for k, v in tensors.items()}


@pytest.mark.parametrize(
    "name, rule",
    [
        ("breadcrumbs", BreadcrumbsRule(0.3, 0.05)),
        ("breadcrumbs-ties", BreadcrumbsRule(0.3, 0.05, elect_sign=True)),
        ("della", DellaRule(0.3, 0.1, 2, clients=[1, 2, 3, 4], draw=1)),  # drops by client id and round
    ],
)
def test_each_is_a_flower_strategy_that_merges_like_its_rule(name, rule):
    base, models, _ = setup()
    options = {"density": 0.3, **({"epsilon": 0.1, "seed": 2} if name == "della" else {"gamma": 0.05})}
    strategy = STRATEGIES[name](server_lr=1.5, **options)
    replies = [reply(i + 1, numpy(m), num_examples=10) for i, m in enumerate(models)]
    arrays, _ = strategy.merge_replies(1, replies, arrays_record(numpy(base)))
    expected = merged_model(rule, base, models, 1.5)
    for key in SHAPES:
        np.testing.assert_allclose(arrays[key].numpy(), expected[key].numpy(), rtol=1e-12)
    assert strategy.rounds[0].rule == {"rule": name, **options}


def test_della_strategy_drops_anew_each_round_whatever_the_order_replies_arrive_in():
    base, models, _ = setup()
    replies = [reply(i + 1, numpy(m), num_examples=10) for i, m in enumerate(models)]
    merge = lambda r, order: STRATEGIES["della"](density=0.5).merge_replies(r, order, arrays_record(numpy(base)))[0]
    first, again, reordered, second = merge(1, replies), merge(1, replies), merge(1, replies[::-1]), merge(2, replies)
    assert np.array_equal(first["w"].numpy(), again["w"].numpy())
    np.testing.assert_allclose(first["w"].numpy(), reordered["w"].numpy(), rtol=1e-12)
    assert not np.array_equal(first["w"].numpy(), second["w"].numpy())


def checkpoints(tmp_path, num_models=3):
    """A float32/bfloat16 base with an integer buffer and its fine-tunes, as safetensors files."""
    gen = torch.Generator().manual_seed(3)
    base = {
        "a.weight": torch.randn(12, 8, generator=gen),
        "b.weight": torch.randn(6, 8, generator=gen).to(torch.bfloat16),
        "c.bias": torch.randn(9, generator=gen),
        "steps": torch.tensor(4),
    }
    models = [
        {
            k: (v.float() + 0.1 * (t + 1) * torch.randn(v.shape, generator=gen)).to(v.dtype)
            if v.is_floating_point()
            else v + t
            for k, v in base.items()
        }
        for t in range(num_models)
    ]
    save_file(base, tmp_path / "base.safetensors")
    for t, m in enumerate(models):
        save_file(m, tmp_path / f"m{t}.safetensors")
    return (
        base,
        models,
        str(tmp_path / "base.safetensors"),
        [str(tmp_path / f"m{t}.safetensors") for t in range(num_models)],
    )


@pytest.mark.parametrize(
    "options, rule, server_lr",
    [
        (dict(method="breadcrumbs", density=0.4, gamma=0.05, scaling=0.5), BreadcrumbsRule(0.4, 0.05), 1.5),  # β = λ·T
        (
            dict(method="breadcrumbs-ties", weights=[1, 1, 2], scaling=0.8),
            BreadcrumbsRule(0.2, 0.01, True, [1, 1, 2]),
            0.8,
        ),
        (dict(method="della", density=0.5, epsilon=0.2, seed=3, scaling=1.0), DellaRule(0.5, 0.2, 3), 1.0),  # β = λ
    ],
)
def test_fedmerge_merge_equals_the_in_memory_rule(tmp_path, options, rule, server_lr):
    base, models, base_path, paths = checkpoints(tmp_path)
    out = merge_checkpoints(base_path, paths, tmp_path / "merged.safetensors", **options)
    merged, expected = load_file(out), merged_model(rule, base, models, server_lr)
    assert merged.keys() == expected.keys()
    assert all(merged[k].dtype == expected[k].dtype and torch.equal(merged[k], expected[k]) for k in expected)


def test_fedmerge_merge_flags(tmp_path, capsys):
    _, _, base_path, paths = checkpoints(tmp_path)
    out = str(tmp_path / "m.safetensors")
    assert (
        main(
            [
                "merge",
                "--base",
                base_path,
                "--models",
                *paths,
                "--method",
                "breadcrumbs",
                "--density",
                "0.3",
                "--gamma",
                "0.02",
                "--scaling",
                "0.3",
                "--out",
                out,
                "--quiet",
            ]
        )
        == 0
    )
    assert (
        "breadcrumbs: λ = 0.3 (θ + λ·Σ_t τ_t, Task Arithmetic's convention) → β = λ·T = 0.9 (T = 3)"
        in capsys.readouterr().err
    )
    assert (
        main(
            [
                "merge",
                "--base",
                base_path,
                "--models",
                *paths,
                "--method",
                "della",
                "--epsilon",
                "0.25",
                "--out",
                out,
                "--force",
                "--quiet",
            ]
        )
        == 2
    )
    assert (
        "fedmerge: error: DELLA keeps entries with probabilities k ± ε, which must lie in (0, 1): density k = 0.2 "
        "needs epsilon ε < 0.2, got 0.25"
    ) in capsys.readouterr().err
    assert (
        main(
            [
                "merge",
                "--base",
                base_path,
                "--models",
                *paths,
                "--method",
                "ties",
                "--gamma",
                "0.1",
                "--out",
                out,
                "--force",
                "--quiet",
            ]
        )
        == 2
    )
    assert "--gamma is only used by methods 'breadcrumbs' or 'breadcrumbs-ties', not 'ties'" in capsys.readouterr().err


class OpDevices(TorchDispatchMode):
    """Records the device of every tensor that a torch operation returns."""

    def __init__(self):
        super().__init__()
        self.devices = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.devices |= {t.device.type for t in tree_leaves(out) if isinstance(t, torch.Tensor)}
        return out


def test_della_ranks_and_draws_on_the_merges_device():
    """meta (a device that holds no values) stands in for a GPU: no operation of the ranking, the draws or the election
    runs elsewhere."""
    rule = DellaRule(0.3, 0.1, 1)
    rule.present_clients(3)
    rule.prepare([{}] * 3, [], torch.device("meta"))
    rule.prepare_tensor("w", [Term(torch.empty(50, 20, device="meta"))] * 3, torch.float32, torch.device("meta"), None)
    values, out = torch.empty(3, 130, device="meta"), torch.empty(130, device="meta")
    with OpDevices() as ops:
        rule.merge_chunk("w", slice(30, 160), values, out)  # cuts rows 1 and 7: read the rest of them
    assert ops.devices == {"meta"}


@pytest.mark.cuda
@pytest.mark.parametrize(
    "make",
    [lambda: BreadcrumbsRule(0.3, 0.05), lambda: BreadcrumbsRule(0.3, 0.05, True), lambda: DellaRule(0.3, 0.1, 4)],
)
def test_on_cuda_as_on_the_cpu(make):
    base, models, _ = setup()
    on_cpu = merged_model(make(), base, models, 0.8)
    on_gpu = dict(iter_merged_model(make(), base, models, 0.8, device="cuda"))
    for name in SHAPES:
        assert on_gpu[name].device.type == "cuda"
        torch.testing.assert_close(on_gpu[name].cpu(), on_cpu[name], rtol=1e-12, atol=1e-12)
