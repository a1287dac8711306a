"""The merging core against the reference math of DESIGN.md, exactly."""

from collections.abc import Mapping
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fedmerge import FedmergeError
from fedmerge.merging import (
    METHODS,
    CClipRule,
    DareRule,
    FedAvgRule,
    FedGMARule,
    FedNovaRule,
    MeanDirectionRule,
    MedianRule,
    OnDevice,
    TaskVector,
    TiesRule,
    cclip,
    chi_square,
    effective_weights,
    fedavg,
    fedgma,
    fednova,
    iter_merge,
    iter_merged_model,
    mean_direction,
    median,
    merge,
    merged_model,
    scaling_to_server_lr,
    server_lr_to_scaling,
)
from fedmerge.merging import diagnostics, tensors
from fedmerge.merging.rules.median import selection_network
from fedmerge.merging.tensors import gram_matrix

SHAPES = {"w": (17, 9), "b": (9,), "scale": ()}


def random_model(gen, dtype=torch.float32):
    return {k: torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for k, s in SHAPES.items()}


def setup(num_clients=5, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    base = random_model(gen, dtype)
    models = [random_model(gen, dtype) for _ in range(num_clients)]
    return base, models, [TaskVector(m, base) for m in models]


def stacked(task_vectors, name):
    return np.stack([tv[name].double().numpy() for tv in task_vectors])


def assert_close(a, b, tol=1e-5):
    for k in a:
        np.testing.assert_allclose(
            np.asarray(a[k], dtype=np.float64), np.asarray(b[k], dtype=np.float64), atol=tol, rtol=tol
        )


def task_arithmetic(base, models, scaling):
    """θ0 + λ Σ_t τ_t, written out directly."""
    return {k: base[k] + scaling * sum(m[k] - base[k] for m in models) for k in base}


@pytest.mark.parametrize("scaling", [0.05, 0.3, 1.0])
def test_task_arithmetic_is_one_round_of_fedavg_with_beta_lambda_t(scaling):
    base, models, _ = setup()
    beta = scaling_to_server_lr(scaling, len(models))
    assert server_lr_to_scaling(beta, len(models)) == pytest.approx(scaling)
    assert_close(merged_model(FedAvgRule(), base, models, server_lr=beta), task_arithmetic(base, models, scaling))


def test_lambda_one_over_t_is_the_average_of_the_finetuned_models():
    base, models, _ = setup()
    merged = merged_model(FedAvgRule(), base, models, server_lr=scaling_to_server_lr(1 / len(models), len(models)))
    assert_close(merged, {k: sum(m[k] for m in models) / len(models) for k in base})


def test_fedavg_weights_are_normalised_example_counts():
    _, _, tvs = setup(3)
    counts = [10, 30, 60]
    got = fedavg(tvs, weights=counts)
    assert_close(got, {k: np.tensordot(np.array(counts) / 100, stacked(tvs, k), 1) for k in SHAPES})


@pytest.mark.parametrize("normalize_by", ["steps", "lr-sum"])
def test_fednova_with_equal_effective_steps_is_fedavg(normalize_by):
    _, _, tvs = setup()
    got = fednova(tvs, num_steps=[7] * 5, lr_sums=[0.3] * 5, normalize_by=normalize_by)
    assert_close(got, fedavg(tvs))


def test_fednova_matches_its_formula():
    _, _, tvs = setup(4)
    a = np.array([1.0, 2.0, 5.0, 10.0])
    p = np.array([1, 1, 2, 4]) / 8
    got = fednova(tvs, num_steps=a, weights=[1, 1, 2, 4])
    want = {k: (p @ a) * np.tensordot(p / a, stacked(tvs, k), 1) for k in SHAPES}
    assert_close(got, want)


def test_identical_clients_give_that_clients_model_back_under_every_rule():
    gen = torch.Generator().manual_seed(3)
    base, client = random_model(gen), random_model(gen)
    models = [client] * 4
    rules = [
        FedAvgRule(),
        FedNovaRule([3, 3, 3, 3]),
        FedGMARule(0.7),
        MedianRule(),
        MedianRule("lower"),
        CClipRule(radius=1e6),
        CClipRule(radius=None, iterations=3),
    ]
    for rule in rules:
        assert_close(merged_model(rule, base, models), client, tol=1e-6)


@pytest.mark.parametrize("threshold", [0.0, -0.5])
def test_fedgma_with_nonpositive_threshold_is_fedavg(threshold):
    _, _, tvs = setup()
    assert_close(fedgma(tvs, threshold), fedavg(tvs))


def test_fedgma_matches_its_formula():
    _, _, tvs = setup(5)
    for k in SHAPES:
        x = stacked(tvs, k)
        agreement = np.abs(np.sign(x).mean(0))
        mask = np.where(agreement >= 0.6, 1.0, agreement)
        np.testing.assert_allclose(fedgma(tvs, 0.6)[k].numpy(), mask * x.mean(0), atol=1e-6)


def test_cclip_with_radius_above_every_norm_is_fedavg():
    _, _, tvs = setup()
    largest = max(np.sqrt(sum((stacked([tv], k) ** 2).sum() for k in SHAPES)) for tv in tvs)
    assert_close(cclip(tvs, radius=largest * 1.0001), fedavg(tvs))


def test_cclip_matches_the_iteration_written_out():
    _, _, tvs = setup(4)
    gen = torch.Generator().manual_seed(9)
    center = {k: 0.1 * torch.randn(s, generator=gen) for k, s in SHAPES.items()}
    radius, iterations = 1.5, 3
    v = {k: center[k].double().numpy() for k in SHAPES}
    for _ in range(iterations):
        step = {k: np.zeros_like(v[k]) for k in SHAPES}
        for tv in tvs:
            d = {k: tv[k].double().numpy() - v[k] for k in SHAPES}
            norm = np.sqrt(sum((d[k] ** 2).sum() for k in SHAPES))
            for k in SHAPES:
                step[k] += d[k] * min(1.0, radius / norm) / len(tvs)
        v = {k: v[k] + step[k] for k in SHAPES}
    assert_close(cclip(tvs, radius, iterations, center), v)


@pytest.mark.parametrize("num_clients", [1, 2, 3, 4, 7, 8, 9, 16, 33])
def test_median_is_numpys_median_and_lower_is_torchs(num_clients):
    _, _, tvs = setup(num_clients, seed=num_clients)
    true, lower = median(tvs), median(tvs, even="lower")
    for k in SHAPES:
        x = stacked(tvs, k)
        np.testing.assert_allclose(true[k].numpy(), np.median(x, axis=0), atol=1e-6)
        want_lower = torch.from_numpy(x).median(dim=0).values.numpy()
        np.testing.assert_allclose(lower[k].numpy(), want_lower, atol=1e-6)


def test_median_network_is_pruned_below_a_full_sort():
    assert len(selection_network(8, (3, 4))) < 19  # Batcher's full network for 8 inputs has 19 comparators


def test_low_precision_tensors_keep_their_dtype_and_accumulate_in_float32():
    base, models, lazy = setup(6, dtype=torch.bfloat16)
    tvs = [{k: tv[k].to(torch.bfloat16) for k in SHAPES} for tv in lazy]
    reference = {k: stacked(tvs, k).mean(0) for k in SHAPES}  # float64 mean of the bf16 task vectors
    for rule_result in (fedavg(tvs), fednova(tvs, num_steps=[1] * 6), cclip(tvs, 1e9)):
        for k in SHAPES:
            assert rule_result[k].dtype == torch.bfloat16
            # one rounding to bf16 at the end, not one per client
            np.testing.assert_allclose(rule_result[k].double().numpy(), reference[k], rtol=2**-8, atol=1e-6)
    merged = merged_model(FedAvgRule(), base, models)
    assert all(t.dtype == torch.bfloat16 for t in merged.values())


def test_integer_buffers_are_merged_as_integers():
    base = {"w": torch.zeros(3), "num_batches_tracked": torch.tensor(100)}
    models = [{"w": torch.ones(3), "num_batches_tracked": torch.tensor(100 + k)} for k in (10, 20, 31)]
    for rule in (FedAvgRule(), MedianRule(), CClipRule(1e9), FedGMARule(0.5), FedNovaRule([1, 2, 3])):
        merged = merged_model(rule, base, models)
        assert merged["num_batches_tracked"].dtype == torch.int64
    assert int(merged_model(FedAvgRule(), base, models)["num_batches_tracked"]) == 120
    assert int(merged_model(MedianRule(), base, models)["num_batches_tracked"]) == 120


def quadratic_task_vectors(centers, theta, lrs, steps):
    """Gradient descent on L_t = ½‖θ − c_t‖²: τ_t = (1 − (1 − η_t)^K_t)(c_t − θ) (DESIGN.md)."""
    tvs = []
    for c, lr, k in zip(centers, lrs, steps):
        x = theta.clone()
        for _ in range(k):
            x -= lr * (x - c)
        tvs.append({"theta": x - theta})
    return tvs


def cosine(a, b):
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_on_quadratics_fedavg_follows_sum_a_t_while_fednova_lr_sum_follows_the_uniform_objective():
    gen = np.random.default_rng(0)
    centers = [torch.from_numpy(gen.normal(size=20)) for _ in range(4)]
    theta = torch.zeros(20, dtype=torch.float64)
    lrs, steps = [0.001, 0.002, 0.001, 0.004], [5, 10, 40, 20]
    tvs = quadratic_task_vectors(centers, theta, lrs, steps)
    a = [1 - (1 - lr) ** k for lr, k in zip(lrs, steps)]
    weighted = sum(at * (c - theta) for at, c in zip(a, centers)).numpy()
    uniform = (sum(centers) / 4 - theta).numpy()

    avg = fedavg(tvs)["theta"].numpy()
    np.testing.assert_allclose(avg, weighted / 4, rtol=1e-9)  # exactly Σ a_t (c_t − θ) / T
    nova = fednova(tvs, lr_sums=[lr * k for lr, k in zip(lrs, steps)], normalize_by="lr-sum")["theta"].numpy()
    assert cosine(nova, uniform) > 0.9999
    assert cosine(avg, uniform) < 0.97


def test_chi_square_is_zero_iff_effective_steps_are_equal():
    p = np.full(4, 0.25)
    assert chi_square(p, effective_weights(p, [3, 3, 3, 3])) == 0.0
    assert chi_square(p, effective_weights(p, [3, 3, 3, 3.3])) > 0
    assert chi_square(p, effective_weights(p, [1, 2, 4, 8])) > 0.3


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda tvs: fedavg(tvs, weights=[1, 2]), "got 2 client weights for 5 clients"),
        (lambda tvs: fedavg(tvs, weights=[1, -1, 1, 1, 1]), "non-negative"),
        (lambda tvs: fednova(tvs, normalize_by="steps"), "needs num_steps"),
        (lambda tvs: fednova(tvs, num_steps=[1, 2, 0, 4, 5]), r"client 2 \(counting from 0\) has 0.0"),
        (lambda tvs: fednova(tvs, lr_sums=[1, 2, 3], normalize_by="lr-sum"), "got 3 values"),
        (lambda tvs: fednova(tvs, num_steps=[1] * 5, normalize_by="epochs"), "normalize_by must be one of"),
        (lambda tvs: fedgma(tvs, 1.5), "at most 1"),
        (lambda tvs: median(tvs, even="upper"), "even-count rule"),
        (lambda tvs: cclip(tvs, radius=-1.0), "radius"),
        (lambda tvs: cclip(tvs, radius=1.0, iterations=0), "iterations"),
        (lambda tvs: fedavg([]), "at least one task vector"),
    ],
)
def test_bad_parameters_name_the_culprit(call, message):
    _, _, tvs = setup()
    with pytest.raises(FedmergeError, match=message):
        call(tvs)


# --- the entrance check: names, shapes and dtypes, naming the client and the tensor ------------------------


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda m: m.update(w=torch.zeros(18, 9)),
            r"client 1: tensor 'w' has shape \(18, 9\) but the base's has \(17, 9\)",
        ),
        (
            lambda m: m.update(w=torch.zeros(9, 17)),
            r"client 1: tensor 'w' has shape \(9, 17\) but the base's has \(17, 9\)",
        ),
        (
            lambda m: m.update(b=torch.zeros(9, dtype=torch.float64)),
            r"client 1: tensor 'b' is torch.float64 but the base's is torch.float32",
        ),
        (lambda m: m.pop("b"), r"client 1 lacks tensor 'b'"),
        (lambda m: m.update(extra=torch.zeros(2)), r"client 1 has tensor 'extra', which is not among the base's"),
    ],
)
def test_every_entrance_refuses_clients_that_do_not_fit_the_base(edit, message):
    base, models, _ = setup(3)
    edit(models[1])
    tvs = [TaskVector(m, base) for m in models]
    for call in (
        lambda: merged_model(FedAvgRule(), base, models),
        lambda: fedavg(tvs),
        lambda: median(tvs),
        lambda: list(iter_merge(CClipRule(1.0), tvs)),
    ):
        with pytest.raises(FedmergeError, match=message):
            call()


def test_plain_task_vectors_are_checked_against_the_first_and_names_against_the_base():
    _, _, lazy = setup(3)
    tvs = [{k: tv[k] for k in SHAPES} for tv in lazy]
    tvs[2]["w"] = tvs[2]["w"].T.contiguous()
    with pytest.raises(FedmergeError, match=r"client 2: tensor 'w' has shape \(9, 17\) but client 0's has \(17, 9\)"):
        fedavg(tvs)
    with pytest.raises(FedmergeError, match="tensor 'nope' was asked for"):
        list(iter_merge(FedAvgRule(), lazy, ["w", "nope"]))


class Described(Mapping):
    """A mapping that describes its tensors by ``specs`` and must not be read (as a checkpoint is); its ``in``
    is Mapping's, which reads the tensor."""

    def __init__(self, tensors):
        self.tensors = dict(tensors)
        self.specs = {k: SimpleNamespace(shape=tuple(v.shape), dtype=v.dtype) for k, v in tensors.items()}
        self.reads = 0

    def __getitem__(self, name):
        self.reads += 1
        return self.tensors[name]

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self):
        return len(self.tensors)


def test_the_check_reads_metadata_only():
    base, models, _ = setup(2)
    models = [Described(m) for m in models]
    list(iter_merge(FedAvgRule(), [TaskVector(m, base) for m in models]))
    assert [m.reads for m in models] == [len(SHAPES)] * 2  # each tensor read once, by the merge itself
    models[1].specs["b"].shape = (10,)
    with pytest.raises(FedmergeError, match=r"client 1: tensor 'b' has shape \(10,\)"):
        merged_model(FedAvgRule(), base, models)


# --- boolean and integer buffers --------------------------------------------------------------------


def test_boolean_buffers_take_the_majority_under_every_rule_and_a_tie_keeps_the_base():
    base = {"w": torch.zeros(2), "mask": torch.tensor([False, True, False, True])}
    votes = [[True, False, False, True], [True, False, True, False], [False, False, True, True]]
    models = [{"w": torch.full((2,), float(k)), "mask": torch.tensor(v)} for k, v in enumerate(votes)]
    rules = [FedAvgRule(), FedNovaRule([1, 1, 1]), FedGMARule(0.5), MedianRule(), CClipRule(1e9), CClipRule()]
    for rule in rules:
        merged = merged_model(rule, base, models)
        assert merged["mask"].tolist() == [True, False, True, True], rule.name
    tie = merged_model(MedianRule(), base, models[:2])["mask"]  # two models: two votes against one base
    assert tie.tolist() == [True, False, False, True]
    assert median([{"mask": torch.tensor(v)} for v in votes])["mask"].tolist() == [True, False, True, True]


def test_a_boolean_stays_boolean_under_a_large_server_lr():
    base = {"mask": torch.tensor([True, False])}
    models = [{"mask": torch.tensor([False, True])}] * 3
    assert merged_model(FedAvgRule(), base, models, server_lr=3.0)["mask"].tolist() == [False, True]


def test_median_of_an_even_count_of_integers_follows_the_even_rule():
    base = {"count": torch.tensor([100, 100])}
    models = [{"count": torch.tensor([110, 101])}, {"count": torch.tensor([120, 102])}]
    assert merged_model(MedianRule(), base, models)["count"].tolist() == [115, 102]  # 1.5 rounds to even
    assert merged_model(MedianRule("lower"), base, models)["count"].tolist() == [110, 101]


# --- a client of weight 0 is absent ------------------------------------------------------------------


def poisoned(num_clients=4):
    """Clients whose last one holds a NaN, with weight 0."""
    base, models, _ = setup(num_clients)
    models[-1]["w"][3, 4] = float("nan")
    return base, models, [1.0] * (num_clients - 1) + [0.0]


@pytest.mark.parametrize(
    "make_rule",
    [
        lambda w: FedAvgRule(w),
        lambda w: FedNovaRule([1, 2, 3, 4][: len(w)], w),
        lambda w: FedGMARule(0.6, w),
        lambda w: CClipRule(None, 2, None, w),
        lambda w: CClipRule(0.5, 1, None, w),
        lambda w: TiesRule(0.3, w),
        lambda w: DareRule(0.5, 3, False, w),
        lambda w: DareRule(0.5, 3, True, w),
    ],
)
def test_a_client_of_weight_zero_is_absent_under_every_weighted_rule(make_rule):
    base, models, weights = poisoned()
    norms = np.zeros(4)
    merged = dict(iter_merged_model(make_rule(weights), base, models, squared_norms=norms))
    without = merged_model(make_rule(weights[:-1]), base, models[:-1])
    assert_close(merged, without, tol=0)
    assert norms[-1] == 0.0 and np.all(norms[:-1] > 0)


def test_weight_zero_is_absent_for_fedgma_sign_agreement_and_cclip_median_radius():
    base, models, _ = setup(4)
    models[3] = {k: 2 * base[k] - models[0][k] for k in SHAPES}  # opposite to client 0 everywhere
    rule = CClipRule(weights=[1, 1, 1, 0])
    merged_model(rule, base, models)
    norms = [np.sqrt(sum(float(((models[t][k] - base[k]).double() ** 2).sum()) for k in SHAPES)) for t in range(3)]
    assert rule.radius_used == pytest.approx(np.median(norms)) and list(rule.present) == [0, 1, 2]
    gma = fedgma([TaskVector(m, base) for m in models], 0.9, weights=[1, 1, 1, 0])
    assert_close(gma, fedgma([TaskVector(m, base) for m in models[:3]], 0.9), tol=0)


# --- devices: every buffer the core makes follows its inputs -----------------------------------------
# No GPU here or in CI. Two CPU checks stand in for it: float64 inputs give float64 outputs on the inputs'
# device, and with the default device set to "meta" (a device that holds no values) any buffer the core
# made without naming its inputs' device lands on meta and fails against the CPU inputs, just as a
# CPU-made buffer fails against CUDA inputs. The CUDA tests below compare with the CPU where a GPU is.

DEVICE_SHAPES = {"w": (70, 90), "b": (90,), "scale": ()}  # "w" spans several chunks (CHUNK patched to 1000)


def device_models(num_clients, dtype=torch.float32, device="cpu"):
    """A base and fine-tunes with floating tensors, an integer counter and a boolean mask, on ``device``."""
    gen = torch.Generator().manual_seed(num_clients)

    def model(k):
        tensors = {n: torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for n, s in DEVICE_SHAPES.items()}
        tensors["count"] = torch.tensor([100 + 3 * k, 7])
        tensors["mask"] = torch.rand(5, generator=gen) > 0.5
        return {n: t.to(device) for n, t in tensors.items()}

    return model(0), [model(k + 1) for k in range(num_clients)]


def device_rules(num_clients, center=None):
    """Every rule, each with options that take it down all of its code paths."""
    weights = list(range(1, num_clients + 1))
    return {
        "fedavg": FedAvgRule(weights),
        "fednova": FedNovaRule([2.0**k for k in range(num_clients)], weights),
        "mean-direction": MeanDirectionRule(weights),
        "fedgma": FedGMARule(0.6, weights),
        "median": MedianRule(),
        "median-lower": MedianRule("lower"),
        "cclip": CClipRule(None, 2, center, weights),
        "cclip-radius": CClipRule(0.5, 1, None, weights),
        "ties": TiesRule(0.3, weights),
        "ties-dense": TiesRule(1.0, weights),
        "dare-linear": DareRule(0.4, 7, False, weights),
        "dare-ties": DareRule(0.4, 7, True, weights),
    }


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr("fedmerge.merging.tensors.CHUNK", 1000)
    monkeypatch.setattr("fedmerge.merging.tensors.DEVICE_CHUNK", 1000)


@pytest.mark.parametrize("num_clients", [4, 33])  # 33: Median sorts instead of its selection network
@pytest.mark.parametrize("rule_name", list(device_rules(4)))
def test_float64_inputs_give_float64_outputs_on_the_inputs_device(small_chunks, num_clients, rule_name):
    base, models = device_models(num_clients, torch.float64)
    center = {n: 0.1 * (models[0][n] - base[n]) for n in DEVICE_SHAPES}
    rule = device_rules(num_clients, center)[rule_name]
    norms = np.zeros(num_clients)
    merged = dict(iter_merged_model(rule, base, models, 0.7, squared_norms=norms))
    for name, tensor in merged.items():
        assert tensor.device == base[name].device and tensor.dtype == base[name].dtype, name
    deltas = fedavg([TaskVector(m, base) for m in models])
    assert all(d.dtype == torch.float64 for n, d in deltas.items() if n in DEVICE_SHAPES)
    assert np.all(norms > 0)


@pytest.mark.parametrize("num_clients", [4, 33])
@pytest.mark.parametrize("rule_name", list(device_rules(4)))
def test_no_buffer_is_made_on_the_default_device(small_chunks, monkeypatch, num_clients, rule_name):
    monkeypatch.setattr("fedmerge.merging.rule.available_cores", lambda: 1)  # the device context is per thread
    base, models = device_models(num_clients)
    center = {n: 0.1 * (models[0][n] - base[n]) for n in DEVICE_SHAPES}
    plain = [{n: m[n] - base[n] for n in DEVICE_SHAPES} for m in models]
    tensors.coefficients.cache_clear()  # no coefficients made on the CPU by an earlier test
    with torch.device("meta"):
        assert torch.empty(1).device.type == "meta"
        got = merged_model(device_rules(num_clients, center)[rule_name], base, models, 0.7)
        gram_norms = diagnostics.norms(gram_matrix(plain, list(DEVICE_SHAPES)))
    expected = merged_model(device_rules(num_clients, center)[rule_name], base, models, 0.7)
    assert all(t.device.type == "cpu" for t in got.values())
    assert_close(got, expected, tol=0)
    want = [np.sqrt(sum(float((p[n].double() ** 2).sum()) for n in DEVICE_SHAPES)) for p in plain]
    np.testing.assert_allclose(gram_norms, want, rtol=1e-6)


def test_on_device_reads_a_tensor_once_and_describes_it_without_reading():
    base, _, _ = setup(1)
    described = Described(base)
    tensors = OnDevice(described, "cpu")
    assert "w" in tensors and "nope" not in tensors and tensors.specs is described.specs and described.reads == 0
    assert tensors["w"] is tensors["w"] and described.reads == 1


def test_a_cclip_center_may_hold_the_floating_tensors_only():
    base, models = device_models(3)
    center = {n: 0.1 * (models[0][n] - base[n]) for n in DEVICE_SHAPES}  # as the CClip strategy keeps Δ
    full = {**center, "count": torch.zeros(2, dtype=torch.int64), "mask": torch.zeros(5, dtype=torch.bool)}
    assert_close(
        merged_model(CClipRule(None, 2, center), base, models),
        merged_model(CClipRule(None, 2, full), base, models),
        tol=0,
    )


@pytest.mark.parametrize(
    "view",
    [
        torch.arange(60.0).reshape(3, 4, 5).permute(2, 0, 1),
        torch.arange(20.0).reshape(4, 5).T,
        torch.arange(5.0).expand(7, 5),
        torch.arange(120.0).reshape(4, 5, 6)[:, ::2, 1:],
        torch.arange(8.0).reshape(2, 1, 4).expand(2, 3, 4),
        torch.arange(30.0).reshape(5, 6)[1:4],
    ],
    ids=["permuted", "transposed", "expanded", "strided", "expanded-3d", "rows"],
)
def test_a_flat_slice_of_a_strided_tensor_is_its_row_major_elements(view):
    flat = view.reshape(-1)
    for start in range(flat.numel() + 1):
        for stop in range(start, flat.numel() + 1):
            out = tensors.copy_flat(view, slice(start, stop), torch.full((stop - start,), -1.0))
            assert torch.equal(out, flat[start:stop]), (start, stop)


@pytest.fixture
def read_devices(monkeypatch):
    """The device each chunk is read onto, in order: every pass of the core reads its chunks through read_into."""
    seen = []
    read_into = tensors.read_into
    monkeypatch.setattr(tensors, "read_into", lambda src, s, out: seen.append(out.device) or read_into(src, s, out))
    return seen


@pytest.mark.parametrize("rule_name", list(device_rules(4)))
def test_every_pass_runs_on_the_device_asked_for_not_where_the_inputs_live(small_chunks, read_devices, rule_name):
    """meta (a device that holds no values) stands in for a GPU beside CPU inputs: every chunk of every pass up to
    the first result that must come back to the CPU (CCLIP's Gram matrix, mean-direction's norms, TIES's
    thresholds, the merged chunks' norms) is read onto it, none onto the CPU."""
    base, models = device_models(4)
    center = {n: 0.1 * (models[0][n] - base[n]) for n in DEVICE_SHAPES}
    plain = [{n: m[n] - base[n] for n in DEVICE_SHAPES} for m in models]
    with pytest.raises((NotImplementedError, RuntimeError), match="meta"):  # no value comes back from meta
        list(iter_merge(device_rules(4, center)[rule_name], plain, device="meta"))
    assert read_devices and set(read_devices) == {torch.device("meta")}


def test_no_name_of_the_merging_package_shadows_one_of_its_modules():
    import importlib
    import pkgutil
    import types

    import fedmerge.merging as package
    import fedmerge.merging.rules.cclip as module

    for name in (m.name for m in pkgutil.iter_modules(package.__path__)):
        assert isinstance(getattr(package, name, package), types.ModuleType), name  # a module, or not yet imported
    rules = importlib.import_module("fedmerge.merging.rules")
    assert {m.name for m in pkgutil.iter_modules(rules.__path__)} >= {
        "cclip",
        "dare",
        "fedavg",
        "fedgma",
        "fednova",
        "mean_direction",
        "median",
        "ties",
    }
    assert module.__name__ == "fedmerge.merging.rules.cclip" and module.cclip is package.cclip
    assert all(not isinstance(getattr(package, name), types.ModuleType) for name in package.__all__)


def on(device, tensors, dtype=None):
    return {n: t.to(device, dtype) for n, t in tensors.items()}


@pytest.mark.cuda
@pytest.mark.parametrize("chunk", [1000, None], ids=["small-chunks", "device-chunks"])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12), (torch.bfloat16, 2**-7)])
@pytest.mark.parametrize("num_clients", [4, 33])
@pytest.mark.parametrize("rule_name", list(device_rules(4)))
def test_every_rule_on_cuda_equals_the_cpu(monkeypatch, rule_name, num_clients, dtype, tol, chunk):
    if chunk:
        monkeypatch.setattr("fedmerge.merging.tensors.CHUNK", chunk)
        monkeypatch.setattr("fedmerge.merging.tensors.DEVICE_CHUNK", chunk)
    base, models = device_models(num_clients, dtype)
    center = {n: 0.1 * (models[0][n] - base[n]).float() for n in DEVICE_SHAPES}
    cpu_norms, cuda_norms = np.zeros(num_clients), np.zeros(num_clients)
    want = dict(
        iter_merged_model(device_rules(num_clients, center)[rule_name], base, models, 0.7, squared_norms=cpu_norms)
    )
    rule = device_rules(num_clients, on("cuda", center))[rule_name]
    got = dict(
        iter_merged_model(rule, on("cuda", base), [on("cuda", m) for m in models], 0.7, squared_norms=cuda_norms)
    )
    assert all(t.device.type == "cuda" and t.dtype == want[n].dtype for n, t in got.items())
    assert_close(on("cpu", got, torch.float64), on("cpu", want, torch.float64), tol=tol)
    assert torch.equal(got["count"].cpu(), want["count"]) and torch.equal(got["mask"].cpu(), want["mask"])
    np.testing.assert_allclose(cuda_norms, cpu_norms, rtol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("rule_name", list(device_rules(4)))
def test_a_cuda_base_with_cpu_clients_and_plain_task_vectors_on_cuda(rule_name):
    base, models = device_models(5)
    center = {n: 0.1 * (models[0][n] - base[n]) for n in DEVICE_SHAPES}
    want = merged_model(device_rules(5, center)[rule_name], base, models, 0.7)
    mixed = merged_model(device_rules(5, on("cuda", center))[rule_name], on("cuda", base), models, 0.7)
    assert all(t.device.type == "cuda" for t in mixed.values())  # Δ is made where θ lives
    assert_close(on("cpu", mixed), want)
    tvs = [{n: m[n] - base[n] for n in DEVICE_SHAPES} for m in models]
    got = merge(device_rules(5, on("cuda", center))[rule_name], [on("cuda", tv) for tv in tvs])
    assert all(t.device.type == "cuda" for t in got.values())
    assert_close(on("cpu", got), merge(device_rules(5, center)[rule_name], tvs))


@pytest.mark.parametrize(
    "center, message",
    [
        ({"w": torch.zeros(3)}, r"the center lacks tensor 'b' or holds it in another shape"),
        (
            {"w": torch.zeros(2), "b": torch.zeros(1)},
            r"the center lacks tensor 'w' or holds it in another shape than the model's \(3,\)",
        ),
    ],
)
def test_a_cclip_center_of_another_model_is_refused_naming_the_tensor(center, message):
    base = {"w": torch.zeros(3), "b": torch.zeros(1)}
    clients = [{"w": torch.randn(3), "b": torch.randn(1)} for _ in range(3)]
    with pytest.raises(FedmergeError, match=message):
        merged_model(CClipRule(radius=1.0, center=center), base, clients)


def test_a_non_finite_server_lr_is_refused_instead_of_an_all_nan_model():
    base = {"w": torch.zeros(3)}
    with pytest.raises(FedmergeError, match=r"server_lr \(β\) must be a finite number, got nan"):
        merged_model(FedAvgRule(), base, [{"w": torch.ones(3)}], server_lr=float("nan"))


def test_mean_direction_is_the_mean_unit_direction_at_the_mean_length():
    _, _, tvs = setup(4)
    p = np.array([1, 1, 2, 4]) / 8
    norms = np.sqrt([sum(float((tv[k].double() ** 2).sum()) for k in SHAPES) for tv in tvs])
    got = mean_direction(tvs, weights=[1, 1, 2, 4])
    for k in SHAPES:
        expected = np.dot(p, norms) * np.tensordot(p / norms, stacked(tvs, k), 1)
        np.testing.assert_allclose(got[k].double().numpy(), expected, rtol=1e-5, atol=1e-6)
    rule = MeanDirectionRule()
    merge(rule, tvs)
    assert rule.params()["norms"] == pytest.approx(norms, rel=1e-5)


def test_fednova_needs_its_effective_steps_and_points_to_mean_direction():
    with pytest.raises(FedmergeError, match="mean-direction"):
        FedNovaRule(None)


def test_mean_direction_counts_a_zero_update_at_its_length_zero():
    base = {"w": torch.zeros(2, dtype=torch.float64)}
    models = [{"w": torch.zeros(2, dtype=torch.float64)}, {"w": torch.tensor([0.1, 0.0], dtype=torch.float64)}]
    got = mean_direction([TaskVector(m, base) for m in models])["w"]
    assert torch.allclose(got, torch.tensor([0.025, 0.0], dtype=torch.float64))  # mean length 0.05 × mean direction


@pytest.mark.parametrize("clients", [1, 4, 20, 21, 10_000])
def test_the_one_shot_grid_is_each_methods_own_lambda_and_reaches_the_mean_at_every_t(clients):
    from fedmerge.merging.scale import PAPER_GRID, search_grid

    for method in METHODS.values():
        grid = search_grid(clients, method.scale)
        betas = [beta for _, beta in grid]
        assert betas == sorted(set(betas)) and min(betas) <= 1.0 <= max(betas), method.name  # β = 1 always tried
        own = {round(scaling, 12) for scaling, _ in grid}
        assert set(PAPER_GRID) <= own, method.name  # the paper's grid in the method's own λ
        assert all(
            beta == pytest.approx(scaling_to_server_lr(scaling, clients, method.scale)) for scaling, beta in grid
        )
    assert len(search_grid(20, "sum")) == len(PAPER_GRID) and len(search_grid(21, "sum")) > len(PAPER_GRID)
    assert METHODS["ties"].server_lr(1.0, 8) == 1.0 and METHODS["fedavg"].server_lr(0.3, 8) == pytest.approx(2.4)


@pytest.mark.parametrize("name", list(METHODS))
def test_the_public_functions_refuse_a_non_finite_client_naming_it(name):
    """merge, merged_model and iter_merge: one NaN must never become an all-NaN (or a silently NaN) model."""
    gen = torch.Generator().manual_seed(5)
    base = random_model(gen)
    clients = METHODS[name].num_clients or 4
    models = [random_model(gen) for _ in range(clients)]
    models[-1]["w"][3, 1] = float("nan")
    statistics = {
        "fisher": [{k: v.abs() for k, v in random_model(gen).items() if v.is_floating_point()}] * clients,
        "grams": [{"w": torch.eye(models[0]["w"].shape[1], dtype=models[0]["w"].dtype)}] * clients,
    }
    rule = lambda: METHODS[name].build(
        None,
        {k: statistics[k] for k in METHODS[name].statistics},
        **METHODS[name].resolve({"steps": list(range(1, clients + 1))} if name == "fednova" else {}, "merge"),
    )
    message = rf"client {clients - 1}: tensor 'w' holds NaN or infinite values; nothing was merged"
    with pytest.raises(FedmergeError, match=message):
        merged_model(rule(), base, models)
    with pytest.raises(FedmergeError, match=message):
        merge(rule(), [TaskVector(m, base) for m in models])
    with pytest.raises(FedmergeError, match=message):
        dict(iter_merge(rule(), [TaskVector(m, base) for m in models]))
    norms = np.zeros(clients)  # a caller who reads the norms handles the client itself
    dict(iter_merge(rule(), [TaskVector(m, base) for m in models], squared_norms=norms))
    assert not np.isfinite(norms[-1]) and np.isfinite(norms[:-1]).all()
