"""SLERP, the Karcher mean and Model Stock against their rules written out here in NumPy on whole tensors; their
strategies (SLERP's two clients), `fedmerge merge` and their refusals."""

import os

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from safetensors.torch import load_file, save_file

from fedmerge import contract
from fedmerge.checkpoints import merge_checkpoints
from fedmerge.cli import main
from fedmerge.errors import FedmergeError
from fedmerge.merging import METHODS, TaskVector, iter_merged_model, merge, merged_model
from fedmerge.merging.rules.karcher import KarcherRule
from fedmerge.merging.rules.model_stock import ModelStockRule
from fedmerge.merging.rules.slerp import SlerpRule
from fedmerge.strategies import Karcher, ModelStock, Slerp
from replies import InProcessGrid, arrays_record, reply

SHAPES = {"w": (23, 11), "b": (11,), "scale": ()}


def setup(num_clients=3, seed=0, spread=0.3):
    """A base and fine-tunes that share part of their update (so Model Stock's cosines are positive)."""
    gen = torch.Generator().manual_seed(seed)
    randn = lambda shape: torch.randn(shape, generator=gen, dtype=torch.float64)
    base = {k: randn(s) for k, s in SHAPES.items()}
    shared = {k: randn(s) for k, s in SHAPES.items()}
    models = [{k: base[k] + spread * (shared[k] + randn(s)) for k, s in SHAPES.items()} for _ in range(num_clients)]
    return base, models


def flat(tensors: dict, name: str) -> np.ndarray:
    return tensors[name].numpy().reshape(-1)


def slerp_paper(t: float, v0: np.ndarray, v1: np.ndarray) -> np.ndarray:
    """Shoemake's slerp of two whole vectors; the straight line where they are within 0.9995 of colinear."""
    cos = np.clip(v0 @ v1 / (np.linalg.norm(v0) * np.linalg.norm(v1)), -1.0, 1.0)
    if abs(cos) > 0.9995:
        return (1 - t) * v0 + t * v1
    omega = np.arccos(cos)
    return (np.sin((1 - t) * omega) * v0 + np.sin(t * omega) * v1) / np.sin(omega)


def karcher_paper(vectors: list[np.ndarray], p: np.ndarray, max_iter: int = 10, tol: float = 1e-5) -> np.ndarray:
    """The Riemannian mean of the directions, on whole vectors: gradient steps along the sphere from the normalised
    mean (log map Σ a_t θ_t'/sin θ_t' (e_t − cos θ_t' u), exp map), at the p-weighted mean norm."""
    norms = np.array([np.linalg.norm(v) for v in vectors])
    valid = [t for t in range(len(vectors)) if norms[t] > tol]
    if not valid:
        return np.zeros_like(vectors[0])
    a = p[valid] / p[valid].sum()
    units = [vectors[t] / norms[t] for t in valid]
    u = sum(w * e for w, e in zip(a, units))
    u = units[0].copy() if np.linalg.norm(u) < tol else u / np.linalg.norm(u)
    for _ in range(max_iter):
        tangent = np.zeros_like(u)
        for w, e in zip(a, units):
            cos = np.clip(u @ e, -1.0, 1.0)
            angle = np.arccos(cos)
            if angle >= tol:
                tangent += w * angle / np.sin(angle) * (e - cos * u)
        size = np.linalg.norm(tangent)
        if size < tol:
            break
        u = np.cos(size) * u + np.sin(size) * tangent / size
        if np.linalg.norm(u) > tol:
            u = u / np.linalg.norm(u)
    return (p @ norms) * u


def model_stock_paper(taus: list[np.ndarray]) -> np.ndarray:
    """Jang et al.: t = k·cos θ / (1 + (k − 1)·cos θ), cos θ the mean pairwise cosine; Δ = t·mean τ."""
    k = len(taus)
    cosines = [
        taus[i] @ taus[j] / (np.linalg.norm(taus[i]) * np.linalg.norm(taus[j]))
        for i in range(k)
        for j in range(i + 1, k)
    ]
    cos = np.mean(cosines)
    return k * cos / (1 + (k - 1) * cos) * np.mean(taus, axis=0)


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
def test_slerp_is_shoemakes_formula_per_tensor(t):
    base, models = setup(2)
    merged = merged_model(SlerpRule(t), base, models)
    for name in SHAPES:
        expected = slerp_paper(t, flat(models[0], name), flat(models[1], name))
        np.testing.assert_allclose(flat(merged, name), expected, rtol=1e-12, atol=1e-12, err_msg=name)
    ends = {0.0: models[0], 1.0: models[1]}
    if t in ends:
        assert all(torch.allclose(merged[k], ends[t][k], rtol=1e-12, atol=1e-14) for k in SHAPES)


def test_slerp_of_nearly_colinear_tensors_is_the_straight_line():
    base, models = setup(1)
    near = {k: 1.2 * v + 1e-6 * torch.ones_like(v) for k, v in models[0].items()}
    merged = merged_model(SlerpRule(0.25), base, [models[0], near])
    for name in SHAPES:
        np.testing.assert_allclose(
            flat(merged, name), 0.75 * flat(models[0], name) + 0.25 * flat(near, name), rtol=1e-12
        )


def test_slerp_keeps_the_norm_of_equal_norm_models_and_halves_their_angle():
    base, (a, b) = setup(2)
    b = {k: v * (a[k].norm() / v.norm()) for k, v in b.items()}
    middle = merged_model(SlerpRule(0.5), base, [a, b])["w"]
    cos = lambda x, y: float((x * y).sum() / (x.norm() * y.norm()))
    assert float(middle.norm()) == pytest.approx(float(a["w"].norm()), rel=1e-12)
    assert cos(middle, a["w"]) == pytest.approx(cos(middle, b["w"]), rel=1e-12)


@pytest.mark.parametrize("weights", [None, [1, 2, 5]])
@pytest.mark.parametrize("max_iter", [1, 10, 100])
def test_karcher_is_the_riemannian_mean_of_whole_tensors(weights, max_iter):
    base, models = setup(3, spread=1.5)  # far apart: several steps to converge
    p = np.full(3, 1 / 3) if weights is None else np.array(weights) / sum(weights)
    merged = merged_model(KarcherRule(max_iter, weights=weights), base, models)
    for name in SHAPES:
        expected = karcher_paper([flat(m, name) for m in models], p, max_iter)
        np.testing.assert_allclose(flat(merged, name), expected, rtol=1e-9, atol=1e-12, err_msg=name)


def test_karcher_of_two_equal_norm_models_is_their_slerp_midpoint_and_leaves_out_zero_models():
    base, (a, b) = setup(2)
    b = {k: v * (a[k].norm() / v.norm()) for k, v in b.items()}
    mean, middle = merged_model(KarcherRule(100, 1e-12), base, [a, b]), merged_model(SlerpRule(0.5), base, [a, b])
    assert all(torch.allclose(mean[k], middle[k], rtol=1e-9) for k in SHAPES)
    zero = {k: torch.zeros_like(v) for k, v in a.items()}
    merged = merged_model(KarcherRule(), base, [a, zero])  # the direction of a, at half its norm
    assert all(torch.allclose(merged[k], a[k] / 2, rtol=1e-12) for k in SHAPES)


def test_model_stock_is_the_papers_interpolation_ratio_per_tensor():
    base, models = setup(4)
    tvs = [TaskVector(m, base) for m in models]
    got = merge(ModelStockRule(), tvs)
    for name in SHAPES:
        expected = model_stock_paper([tv[name].numpy().reshape(-1) for tv in tvs])
        np.testing.assert_allclose(got[name].numpy().reshape(-1), expected, rtol=1e-12, atol=1e-15, err_msg=name)


def test_model_stock_of_agreeing_updates_is_their_mean_and_of_orthogonal_ones_the_base():
    base = {"w": torch.zeros(4, dtype=torch.float64)}
    same = [{"w": torch.tensor([1.0, 2.0, 0.0, 0.0], dtype=torch.float64)}] * 3
    assert torch.allclose(merged_model(ModelStockRule(), base, same)["w"], same[0]["w"], rtol=1e-12)
    orthogonal = [{"w": torch.eye(4, dtype=torch.float64)[t]} for t in range(3)]
    assert torch.equal(merged_model(ModelStockRule(), base, orthogonal)["w"], base["w"])
    opposite = [
        {"w": torch.tensor([1.0, 0, 0, 0], dtype=torch.float64)},
        {"w": torch.tensor([-1.0, 0, 0, 0], dtype=torch.float64)},
    ]
    assert torch.equal(merged_model(ModelStockRule(), base, opposite)["w"], base["w"])  # 1 + (k − 1)·cos θ = 0: t = 0
    with_zero = [same[0], {"w": torch.zeros(4, dtype=torch.float64)}]  # cos θ = 0 with a zero update
    assert torch.equal(merged_model(ModelStockRule(), base, with_zero)["w"], base["w"])


@pytest.mark.parametrize(
    "make, count, message",
    [
        (
            lambda: SlerpRule(),
            3,
            r"SLERP interpolates between exactly two models, got 3: give two \(t = 0 is the first, "
            r"t = 1 the second\), or use karcher, the spherical mean of any number of models\.",
        ),
        (lambda: SlerpRule(), 1, "SLERP interpolates between exactly two models, got 1"),
        (
            lambda: ModelStockRule(),
            1,
            r"Model Stock needs at least two fine-tuned models \(the angle between their task "
            r"vectors sets its t\), got 1\.",
        ),
    ],
)
def test_a_wrong_number_of_models_is_refused(make, count, message):
    base, models = setup(count)
    with pytest.raises(FedmergeError, match=message):
        merged_model(make(), base, models)


@pytest.mark.parametrize("rule", [SlerpRule(), KarcherRule()])
def test_rules_of_the_models_weights_refuse_updates_alone(rule):
    base, models = setup(2)
    updates = [{k: m[k] - base[k] for k in SHAPES} for m in models]
    with pytest.raises(
        FedmergeError,
        match=rf"{rule.name} combines the models' weights θ_t, not their updates alone: "
        r"give each model with the one base θ it was fine-tuned from",
    ):
        merge(rule, updates)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: SlerpRule(1.5), r"'SLERP t' must be a number in \[0, 1\], got 1.5"),
        (lambda: SlerpRule(True), r"'SLERP t' must be a number in \[0, 1\], got True"),
        (lambda: KarcherRule(0), "'Karcher max_iter' must be a positive integer, got 0"),
        (lambda: KarcherRule(10, 0.0), "'Karcher tol' must be a positive number, got 0.0"),
    ],
)
def test_bad_parameters_are_refused(make, message):
    with pytest.raises(FedmergeError, match=message):
        make()


def test_the_records():
    slerp, karcher, stock = METHODS["slerp"], METHODS["karcher"], METHODS["model-stock"]
    assert slerp.tuned == "t" and slerp.grid([]) == [0.1, 0.3, 0.5, 0.7, 0.9] and not slerp.weighted
    assert karcher.tuned is None and karcher.weighted and stock.tuned is None and not stock.weighted
    assert {p.name: p.option.default for p in karcher.params} == {"max_iter": 10, "tol": 1e-5} and not stock.params
    for method in (slerp, karcher, stock):
        assert method.no_lambda and method.scaling(1.0, 2) is None
        with pytest.raises(FedmergeError, match=f"method {method.name!r} has no λ of its own"):
            method.server_lr(1.0, 2)


def numpy(tensors):
    return {k: v.numpy() for k, v in tensors.items()}


@pytest.mark.parametrize(
    "strategy, rule, count",
    [
        (Slerp(t=0.3, server_lr=1.5), SlerpRule(0.3), 2),
        (Karcher(max_iter=3, server_lr=1.5, weighting="num-examples"), KarcherRule(3, weights=[10, 20, 30]), 3),
        (ModelStock(server_lr=1.5), ModelStockRule(), 3),
    ],
)
def test_each_is_a_flower_strategy_that_merges_like_its_rule(strategy, rule, count):
    base, models = setup(count)
    replies = [reply(i + 1, numpy(m), num_examples=10 * (i + 1), client_id=i) for i, m in enumerate(models)]
    arrays, _ = strategy.merge_replies(
        1, replies[::-1], arrays_record(numpy(base))
    )  # in client-id order whatever comes
    expected = merged_model(rule, base, models, 1.5)
    for key in SHAPES:
        np.testing.assert_allclose(arrays[key].numpy(), expected[key].numpy(), rtol=1e-12, atol=1e-14)
    assert strategy.rounds[0].rule["rule"] == rule.name


@pytest.fixture
def server_app(monkeypatch):
    """Flower's task identity, which a running ServerApp has and server messages need."""
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


def test_the_slerp_strategy_refuses_a_round_of_other_than_two_clients_before_it_starts(server_app):
    arrays = arrays_record({"w": np.zeros(3, np.float32)})
    assert len(Slerp().configure_train(1, arrays, ConfigRecord(), InProcessGrid(None, 2))) == 2
    with pytest.raises(
        FedmergeError,
        match=r"SLERP interpolates between exactly two clients, but round 1 would train 3: "
        r"run it with two clients \(or set fraction_train so that two train\), or "
        r"use karcher, the spherical mean of any number of clients\.",
    ):
        Slerp(min_available_nodes=3).configure_train(1, arrays, ConfigRecord(), InProcessGrid(None, 3))
    base, models = setup(3)
    replies = [reply(i + 1, numpy(m), client_id=i) for i, m in enumerate(models)]
    with pytest.raises(FedmergeError, match="SLERP interpolates between exactly two models, got 3"):
        Slerp().merge_replies(1, replies, arrays_record(numpy(base)))


def scaled_app():
    """A ClientApp whose client c returns its received model scaled by 1 + c and shifted by c (other directions and
    norms), with its client id."""
    app = ClientApp()

    @app.train()
    def train(message, context):
        arrays, _ = contract.received(message.content)
        client = context.node_id - 1
        trained = ArrayRecord({k: torch.from_numpy(a.numpy() * (1 + client) + client) for k, a in arrays.items()})
        metrics = contract.train_reply_metrics(num_examples=1, num_steps=1, lr_sum=0.1, client_id=client)
        return Message(RecordDict({"arrays": trained, "metrics": MetricRecord(metrics)}), reply_to=message)

    return app


@pytest.mark.parametrize(
    "strategy, rule, count",
    [(Slerp(t=0.3), SlerpRule(0.3), 2), (Karcher(), KarcherRule(), 3), (ModelStock(), ModelStockRule(), 3)],
)
def test_over_rounds_each_round_merges_the_models_sent_back(server_app, strategy, rule, count):
    start = {"w": np.linspace(-1.0, 2.0, 6)}
    strategy.min_available_nodes = count
    result = strategy.start(grid=InProcessGrid(scaled_app(), count), initial_arrays=arrays_record(start), num_rounds=2)
    theta = {"w": torch.from_numpy(start["w"])}
    for _ in range(2):
        theta = merged_model(rule, theta, [{"w": theta["w"] * (1 + c) + c} for c in range(count)])
    np.testing.assert_allclose(result.arrays["w"].numpy(), theta["w"].numpy(), rtol=1e-12)
    assert [r.client_ids for r in strategy.rounds] == [list(range(count))] * 2


def checkpoints(tmp_path, num_models=3):
    """A float32/bfloat16/float16 base with an integer buffer and its fine-tunes, as safetensors files."""
    gen = torch.Generator().manual_seed(3)
    base = {
        "a.weight": torch.randn(12, 8, generator=gen),
        "b.weight": torch.randn(6, 8, generator=gen).to(torch.bfloat16),
        "c.bias": torch.randn(9, generator=gen).to(torch.float16),
        "steps": torch.tensor(4),
    }
    models = [
        {
            k: (v.float() + 0.3 * torch.randn(v.shape, generator=gen)).to(v.dtype) if v.is_floating_point() else v + t
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
    "options, rule, count, server_lr",
    [
        (dict(method="slerp", t=0.3), SlerpRule(0.3), 2, 1.0),
        (
            dict(method="karcher", weights=[1, 2, 3], max_iter=5, server_lr=0.5),
            KarcherRule(5, weights=[1, 2, 3]),
            3,
            0.5,
        ),
        (dict(method="model-stock"), ModelStockRule(), 3, 1.0),
    ],
)
def test_fedmerge_merge_equals_the_in_memory_rule(tmp_path, options, rule, count, server_lr):
    base, models, base_path, paths = checkpoints(tmp_path, count)
    out = merge_checkpoints(base_path, paths, tmp_path / "merged.safetensors", **options)
    merged, expected = load_file(out), merged_model(rule, base, models, server_lr)
    assert merged.keys() == expected.keys()
    assert all(merged[k].dtype == expected[k].dtype and torch.equal(merged[k], expected[k]) for k in expected)


def test_fedmerge_merge_refuses_what_these_methods_cannot_do(tmp_path, capsys):
    _, _, base_path, paths = checkpoints(tmp_path)
    out = tmp_path / "out"
    out.mkdir()

    def failing(*options) -> str:
        assert main(["merge", "--base", base_path, "--out", str(out / "m.safetensors"), "--quiet", *options]) == 2
        assert os.listdir(out) == []  # nothing written, no temporary left behind
        return capsys.readouterr().err

    assert "fedmerge: error: SLERP interpolates between exactly two models, got 3: give two" in failing(
        "--models", *paths, "--method", "slerp"
    )
    assert "fedmerge: error: --scaling: method 'karcher' has no λ of its own: the Karcher mean" in failing(
        "--models", *paths, "--method", "karcher", "--scaling", "1"
    )
    assert "fedmerge: error: weights (--weights) are only used by methods" in failing(
        "--models", *paths[:2], "--method", "slerp", "--weights", "1", "2"
    )
    assert "fedmerge: error: option '--t' must be a number in [0, 1], got 2.0." in failing(
        "--models", *paths[:2], "--method", "slerp", "--t", "2"
    )
    assert (
        main(
            [
                "merge",
                "--base",
                base_path,
                "--models",
                *paths[:2],
                "--method",
                "slerp",
                "--t",
                "0.25",
                "--out",
                str(out / "m.safetensors"),
                "--quiet",
            ]
        )
        == 0
    )
    assert "slerp: β = 1 (the default" in capsys.readouterr().err


@pytest.mark.cuda
@pytest.mark.parametrize(
    "make, count",
    [(lambda: SlerpRule(0.3), 2), (lambda: KarcherRule(weights=[1, 2, 3]), 3), (lambda: ModelStockRule(), 3)],
)
def test_on_cuda_as_on_the_cpu(make, count):
    base, models = setup(count)
    on_cpu = merged_model(make(), base, models, 0.8)
    on_gpu = dict(iter_merged_model(make(), base, models, 0.8, device="cuda"))
    for name in SHAPES:
        assert on_gpu[name].device.type == "cuda"
        torch.testing.assert_close(on_gpu[name].cpu(), on_cpu[name], rtol=1e-12, atol=1e-12)
