"""TIES and DARE against their papers' rules, written out here in NumPy, exactly."""

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from fedmerge import FedmergeError
from fedmerge.merging import DareRule, TaskVector, TiesRule, dare, fedavg, iter_merged_model, merged_model, ties
from fedmerge.merging.rules.dare import keep_mask, random_bits, stream_key
from fedmerge.strategies import STRATEGIES
from replies import arrays_record, reply

SHAPES = {"w": (23, 11), "b": (11,), "scale": ()}


def setup(num_clients=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    model = lambda: {k: torch.randn(s, generator=gen, dtype=torch.float64) for k, s in SHAPES.items()}
    base = model()
    models = [model() for _ in range(num_clients)]
    return base, models, [TaskVector(m, base) for m in models]


def trimmed(tau: np.ndarray, density: float) -> np.ndarray:
    """τ̂: the ⌊k·n⌋ (≥ 1) entries largest in magnitude, ties broken by position (lowest first)."""
    flat = tau.reshape(-1)
    keep = max(1, int(density * flat.size))
    order = sorted(range(flat.size), key=lambda j: (-abs(flat[j]), j))[:keep]
    out = np.zeros_like(flat)
    out[order] = flat[order]
    return out.reshape(tau.shape)


def disjoint_mean(taus: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Elect γ = sign(Σ p_t τ_t) (+ at 0); average, p-weighted, only the entries whose sign is γ."""
    elected = np.where(np.tensordot(p, taus, 1) >= 0, 1.0, -1.0)
    agree = np.sign(taus) == elected
    total = np.tensordot(p, agree.astype(float), 1)
    summed = np.tensordot(p, np.where(agree, taus, 0.0), 1)
    return np.where(total > 0, summed / np.where(total > 0, total, 1), 0.0)


def taus(task_vectors, name):
    return np.stack([tv[name].numpy() for tv in task_vectors])


@pytest.mark.parametrize("density", [0.1, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("weights", [None, [1, 2, 3, 4]])
def test_ties_is_trim_elect_disjoint_mean(density, weights):
    _, _, tvs = setup()
    p = np.full(4, 0.25) if weights is None else np.array(weights) / 10
    got = ties(tvs, density, weights)
    for name in SHAPES:
        expected = disjoint_mean(np.stack([trimmed(t, density) for t in taus(tvs, name)]), p)
        np.testing.assert_allclose(got[name].numpy(), expected, rtol=1e-12, atol=1e-15)


def test_ties_keeps_exactly_k_entries_when_magnitudes_tie(monkeypatch):
    monkeypatch.setattr("fedmerge.merging.tensors.CHUNK", 7)  # ties spread over several chunks
    base = {"w": torch.zeros(40, dtype=torch.float64)}
    model = {"w": torch.tensor([1.0, -1.0] * 20, dtype=torch.float64)}  # 40 entries of magnitude 1
    got = ties([TaskVector(model, base)], density=0.25)["w"]
    assert torch.count_nonzero(got) == 10 and torch.equal(got[:10], model["w"][:10])  # the first 10 by position


def test_ties_zeroes_coordinates_where_no_entry_agrees_and_elects_plus_at_a_zero_sum():
    base = {"w": torch.zeros(3, dtype=torch.float64)}
    models = [{"w": torch.tensor([1.0, 2.0, 0.0])}, {"w": torch.tensor([-1.0, -1.0, 0.0])}]
    got = ties([TaskVector({"w": m["w"].double()}, base) for m in models], density=1.0)["w"]
    assert got.tolist() == [1.0, 2.0, 0.0]  # Σ = 0 elects +; Σ = 1 elects +; no entry at all: 0


@pytest.mark.parametrize("elect_sign", [False, True])
@pytest.mark.parametrize("weights", [None, [4, 3, 2, 1]])
def test_dare_is_drop_rescale_then_mean_or_disjoint_mean(elect_sign, weights):
    _, _, tvs = setup()
    density, seed = 0.3, 11
    p = np.full(4, 0.25) if weights is None else np.array(weights) / 10
    got = dare(tvs, density, seed, elect_sign, weights)
    for name in SHAPES:
        values = taus(tvs, name).reshape(4, -1)
        n = values.shape[1]
        masks = np.stack(
            [keep_mask(seed, name, t, slice(0, n), density, torch.device("cpu")).numpy() for t in range(4)]
        )
        dropped = values * masks / density
        expected = disjoint_mean(dropped, p) if elect_sign else np.tensordot(p, dropped, 1)
        np.testing.assert_allclose(got[name].numpy().reshape(-1), expected, rtol=1e-12, atol=1e-15)


def test_dare_draws_are_seeded_and_independent_of_chunking_and_threads(monkeypatch):
    _, _, tvs = setup()
    monkeypatch.setattr("fedmerge.merging.rule.available_cores", lambda: 1)
    whole = dare(tvs, 0.4, seed=5)
    monkeypatch.setattr("fedmerge.merging.tensors.CHUNK", 3)
    chunked = dare(tvs, 0.4, seed=5)
    monkeypatch.setattr("fedmerge.merging.rule.available_cores", lambda: 4)  # chunks taken by 4 threads in turn
    threaded = dare(tvs, 0.4, seed=5)
    other = dare(tvs, 0.4, seed=6)
    assert all(torch.equal(whole[k], chunked[k]) and torch.equal(whole[k], threaded[k]) for k in SHAPES)
    assert not torch.equal(whole["w"], other["w"])


WORD = 1 << 32


def lowbias32(x: int) -> int:
    x ^= x >> 16
    x = x * 0x7FEB352D % WORD
    x ^= x >> 15
    x = x * 0x846CA68B % WORD
    return x ^ (x >> 16)


def test_the_draws_are_their_formula_computed_on_python_integers():
    """Position j's bits are h(h(j mod 2³² ⊕ k₁) ⊕ ⌊j / 2³²⌋ ⊕ k₂), h = lowbias32: torch's int32 arithmetic wraps as
    the formula needs, across 2³¹ and 2³² too; j is kept when those bits are below round(k·2³²)."""
    k1, k2 = key = stream_key(5, 1, 3, "w")
    for start in (0, 70_000, 2**31 - 4, 2**32 - 4, 3 * 2**32 + 5):
        s = slice(start, start + 9)
        want = [lowbias32(lowbias32(j % WORD ^ k1) ^ (j // WORD) ^ k2) for j in range(s.start, s.stop)]
        assert [b % WORD for b in random_bits(key, s, torch.device("cpu")).tolist()] == want, start
        kept = keep_mask(5, "w", 3, s, 0.3, torch.device("cpu"), draw=1)
        assert kept.tolist() == [bits < round(0.3 * WORD) for bits in want]


class OpDevices(TorchDispatchMode):
    """Records the device of every tensor that a torch operation returns."""

    def __init__(self):
        super().__init__()
        self.devices = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.devices |= {t.device.type for t in tree_leaves(out) if isinstance(t, torch.Tensor)}
        return out


@pytest.mark.parametrize("elect_sign", [False, True])
def test_the_drops_are_drawn_on_the_merges_device(elect_sign):
    """meta (a device that holds no values) stands in for a GPU: no operation of the draws runs elsewhere (no draw
    on the CPU copied over)."""
    with OpDevices() as ops:
        mask = keep_mask(0, "w", 1, slice(5, 200_000), 0.3, torch.device("meta"))
    assert mask.device.type == "meta" and ops.devices == {"meta"}
    rule = DareRule(0.3, 1, elect_sign)
    rule.present_clients(3)
    rule.prepare([{}] * 3, [], torch.device("meta"))
    values, out = torch.empty(3, 1000, device="meta"), torch.empty(1000, device="meta")
    with OpDevices() as ops:
        rule.merge_chunk("w", slice(0, 1000), values, out)
    assert ops.devices == {"meta"}


def test_the_drops_of_clients_seeds_rounds_tensors_and_positions_are_independent():
    n, k = 1 << 20, 0.3
    mask = lambda seed, name, client, draw=0: keep_mask(seed, name, client, slice(0, n), k, torch.device("cpu"), draw)
    first = mask(0, "w", 0)
    others = [
        mask(0, "w", 1),
        mask(1, "w", 0),
        mask(0, "w", 0, draw=1),
        mask(0, "b", 0),
        first.roll(1),
        first.roll(1 << 16),
    ]
    sigma = np.sqrt(k * k * (1 - k * k) / n)
    for other in others:  # both kept with probability k²
        assert abs(float((first & other).double().mean()) - k * k) < 5 * sigma


@pytest.mark.cuda
def test_the_drops_on_cuda_equal_the_cpus():
    for start in (0, 2**31 - 1000, 2**32 - 1000, 5 * 2**32):
        s = slice(start, start + 5000)
        on_gpu = keep_mask(2, "w", 1, s, 0.3, torch.device("cuda"), draw=4)
        on_cpu = keep_mask(2, "w", 1, s, 0.3, torch.device("cpu"), draw=4)
        assert on_gpu.device.type == "cuda" and torch.equal(on_gpu.cpu(), on_cpu), start


def test_dare_keeps_a_share_density_of_entries_and_is_unbiased():
    n, density = 200_000, 0.2
    kept = keep_mask(0, "w", 0, slice(0, n), density, torch.device("cpu"))
    sigma = np.sqrt(n * density * (1 - density))
    assert abs(int(kept.sum()) - n * density) < 5 * sigma
    _, _, tvs = setup(3)
    mean = sum(dare(tvs, 0.5, seed)["w"] for seed in range(400)) / 400  # E[DARE] = FedAvg
    target = fedavg(tvs)["w"]
    scale = float(torch.stack([tv["w"] for tv in tvs]).abs().max())
    assert float((mean - target).abs().max()) < 0.25 * scale and float((mean - target).abs().mean()) < 0.05 * scale


def test_density_one_makes_dare_linear_fedavg_and_ties_the_untrimmed_disjoint_mean():
    _, _, tvs = setup()
    got, want = dare(tvs, 1.0), fedavg(tvs)
    assert all(torch.allclose(got[k], want[k], rtol=1e-12) for k in SHAPES)
    got, want = ties(tvs, 1.0), dare(tvs, 1.0, elect_sign=True)
    assert all(torch.allclose(got[k], want[k], rtol=1e-12) for k in SHAPES)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: TiesRule(0), r"'TIES density' must be a number in \(0, 1\], got 0"),
        (lambda: TiesRule(1.5), r"'TIES density' must be a number in \(0, 1\], got 1.5"),
        (lambda: DareRule(0.5, seed=-1), "'DARE seed' must be an integer ≥ 0, got -1"),
    ],
)
def test_bad_parameters_are_refused(make, message):
    with pytest.raises(FedmergeError, match=message):
        make()


@pytest.mark.parametrize(
    "name, rule",
    [
        ("ties", TiesRule(0.3)),
        ("dare-linear", DareRule(0.3, 2, False, clients=[1, 2, 3, 4], draw=1)),  # drops by client id and round
        ("dare-ties", DareRule(0.3, 2, True, clients=[1, 2, 3, 4], draw=1)),
    ],
)
def test_each_is_a_flower_strategy_that_merges_like_its_rule(name, rule):
    base, models, _ = setup()
    strategy = STRATEGIES[name](server_lr=1.5, density=0.3, **({"seed": 2} if name != "ties" else {}))
    numpy = lambda tensors: {k: v.numpy() for k, v in tensors.items()}
    replies = [reply(i + 1, numpy(m), num_examples=10) for i, m in enumerate(models)]
    arrays, _ = strategy.merge_replies(1, replies, arrays_record(numpy(base)))
    expected = merged_model(rule, base, models, 1.5)
    for key in SHAPES:
        np.testing.assert_allclose(arrays[key].numpy(), expected[key].numpy(), rtol=1e-12)
    assert strategy.rounds[0].rule["rule"] == name


def test_dare_strategies_drop_anew_each_round_whatever_the_order_replies_arrive_in():
    base, models, _ = setup()
    numpy = lambda tensors: {k: v.numpy() for k, v in tensors.items()}
    replies = [reply(i + 1, numpy(m), num_examples=10) for i, m in enumerate(models)]
    merge = lambda r, order: STRATEGIES["dare-linear"](density=0.5).merge_replies(r, order, arrays_record(numpy(base)))[
        0
    ]
    first, again, reordered, second = merge(1, replies), merge(1, replies), merge(1, replies[::-1]), merge(2, replies)
    assert np.array_equal(first["w"].numpy(), again["w"].numpy())
    np.testing.assert_allclose(first["w"].numpy(), reordered["w"].numpy(), rtol=1e-12)
    assert not np.array_equal(first["w"].numpy(), second["w"].numpy())


def test_the_merged_model_is_theta_plus_beta_delta():
    base, models, tvs = setup()
    merged = dict(iter_merged_model(TiesRule(0.2), base, models, 0.7))
    delta = ties(tvs, 0.2)
    for k in SHAPES:
        assert torch.allclose(merged[k], base[k] + 0.7 * delta[k], rtol=1e-12)


def test_an_exactly_cancelling_sum_elects_plus_as_in_16_bit_checkpoints():
    base = {"w": torch.zeros(1)}
    taus = [-0.004150390625, 0.00732421875, -0.003173828125]  # bfloat16-exact values summing to exactly 0
    got = ties([TaskVector({"w": torch.tensor([t])}, base) for t in taus], density=1.0)["w"]
    assert got.item() == 0.00732421875  # + elected: only the positive entry agrees


def test_ties_on_a_model_of_nan_leaves_the_verdict_to_the_non_finite_check():
    base, models, _ = setup(3)
    models[1]["w"] = torch.full_like(models[1]["w"], float("nan"))
    norms = np.zeros(3)
    merged = dict(iter_merged_model(TiesRule(0.2), base, models, squared_norms=norms))  # no crash in the threshold
    assert not np.isfinite(norms[1]) and np.all(np.isfinite(norms[[0, 2]]))
    assert set(merged) == set(SHAPES)
