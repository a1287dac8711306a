"""FedExP: its step against the paper's formula written here in NumPy, in the strategies' round records, through
``fedmerge merge``, and on real one-shot replies beside the λ the search chooses on validation."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord
from safetensors.torch import load_file, save_file

from fedmerge.cli import main
from fedmerge.clients.app import client_app
from fedmerge.errors import FedmergeError
from fedmerge.merging import METHODS
from fedmerge.merging.rule import merge
from fedmerge.merging.rules.fedexp import FedExPRule
from fedmerge.simulations.experiment import Experiment
from fedmerge.simulations.spec import Spec
from fedmerge.strategies import FedExP
from fedmerge.tasks import load_suite
from replies import InProcessGrid, arrays_record, reply

SHAPES = {"w": (4, 5), "b": (6,)}


def paper_step(x: np.ndarray, p: np.ndarray, epsilon: float) -> float:
    """Jhunjhunwala et al. 2023: η = max(1, Σ_t p_t‖τ_t‖² / (2(‖Σ_t p_t τ_t‖² + ε))), τ_t the rows of x."""
    mean = p @ x
    return max(1.0, float(np.sum(p * np.sum(x * x, axis=1)) / (2 * (np.sum(mean * mean) + epsilon))))


def task_vectors(x: np.ndarray) -> list[dict[str, torch.Tensor]]:
    out = []
    for row in x:
        out.append({"w": torch.tensor(row[:20].reshape(4, 5)), "b": torch.tensor(row[20:])})
    return out


def flat(delta) -> np.ndarray:
    return np.concatenate([delta["w"].numpy().ravel(), delta["b"].numpy().ravel()])


@pytest.mark.parametrize("weights", [None, [1, 4, 2, 9, 3]])
@pytest.mark.parametrize("spread", [0.1, 1.0, 5.0])
def test_the_step_and_update_are_the_papers(weights, spread):
    rng = np.random.default_rng(int(spread * 10))
    x = rng.normal(1.0, spread, size=(5, 26))
    p = np.full(5, 0.2) if weights is None else np.asarray(weights, float) / sum(weights)
    rule = FedExPRule(1e-3, weights)
    delta = flat(merge(rule, task_vectors(x)))
    step = pytest.approx(paper_step(x, p, 1e-3), rel=1e-12)
    assert rule.params() == {"rule": "fedexp", "epsilon": 1e-3, "step": step}
    np.testing.assert_allclose(delta, paper_step(x, p, 1e-3) * (p @ x), rtol=1e-12, atol=1e-12)
    assert (rule.step > 1) == (spread == 5.0)  # only updates that disagree enough step further than FedAvg


def test_agreeing_updates_take_fedavgs_step_and_opposite_ones_a_finite_nothing():
    x = np.tile(np.arange(26.0), (3, 1))
    rule = FedExPRule()
    np.testing.assert_allclose(flat(merge(rule, task_vectors(x))), x[0], rtol=1e-15)
    assert rule.step == 1.0
    opposite = np.stack([x[0], -x[0]])
    rule = FedExPRule(epsilon=0.5)
    np.testing.assert_array_equal(flat(merge(rule, task_vectors(opposite))), np.zeros(26))
    assert rule.step == pytest.approx(np.sum(x[0] ** 2) / (2 * 0.5))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: FedExP(epsilon=0), "'FedExP.epsilon' must be a positive number"),
        (lambda: FedExP(epsilon=float("nan")), "'FedExP.epsilon' must be a positive number"),
        (lambda: FedExPRule(epsilon=-1.0), "FedExP's epsilon ε must be a positive number, got -1.0"),
    ],
)
def test_a_bad_epsilon_is_refused(make, message):
    with pytest.raises(FedmergeError, match=message):
        make()


def test_its_record_has_no_lambda_and_its_own_step():
    record = METHODS["fedexp"]
    assert record.own_step and record.no_lambda.startswith("its paper") and record.tuned is None and record.weighted
    assert not any(METHODS[name].own_step for name in METHODS if name != "fedexp")


def test_each_round_records_its_step_and_server_lr_multiplies_it():
    rng = np.random.default_rng(0)
    base = {name: rng.normal(size=shape) for name, shape in SHAPES.items()}
    strategy = FedExP(server_lr=0.5, weighting="num-examples")
    for server_round, spread in ((1, 3.0), (2, 0.5)):
        x = rng.normal(0.3, spread, size=(4, 26))
        examples = [10, 20, 30, 40]
        replies = [
            reply(
                t + 1,
                {"w": base["w"] + row[:20].reshape(4, 5), "b": base["b"] + row[20:]},
                num_examples=examples[t],
                client_id=t,
            )
            for t, row in enumerate(x)
        ]
        merged, _ = strategy.merge_replies(server_round, replies, arrays_record(base))
        p = np.asarray(examples, float) / sum(examples)
        step = paper_step(x, p, 1e-3)
        assert strategy.record_for(server_round).rule["step"] == pytest.approx(step, rel=1e-12)
        got = np.concatenate([merged["w"].numpy().ravel(), merged["b"].numpy().ravel()])
        expected = np.concatenate([base["w"].ravel(), base["b"].ravel()]) + 0.5 * step * (p @ x)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
        base = {"w": merged["w"].numpy(), "b": merged["b"].numpy()}


def test_fedmerge_merge_applies_the_step_and_refuses_scaling(tmp_path, capsys):
    g = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(4, 5, generator=g), "b": torch.randn(6, generator=g)}
    models = [{n: v + torch.randn(v.shape, generator=g) for n, v in base.items()} for _ in range(4)]
    save_file(base, tmp_path / "base.safetensors")
    paths = []
    for t, model in enumerate(models):
        paths.append(str(tmp_path / f"m{t}.safetensors"))
        save_file(model, paths[-1])
    out = tmp_path / "merged.safetensors"
    command = ["merge", "--base", str(tmp_path / "base.safetensors"), "--models", *paths, "--method", "fedexp"]
    assert main([*command, "--epsilon", "0.01", "--weights", "1", "2", "3", "4", "--out", str(out)]) == 0
    x = np.stack([np.concatenate([(m[n] - base[n]).double().numpy().ravel() for n in SHAPES]) for m in models])
    p = np.arange(1, 5) / 10
    expected = np.concatenate([base[n].double().numpy().ravel() for n in SHAPES]) + paper_step(x, p, 0.01) * (p @ x)
    merged = load_file(out)
    got = np.concatenate([merged[n].double().numpy().ravel() for n in SHAPES])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    capsys.readouterr()
    assert main([*command, "--scaling", "0.5", "--out", str(tmp_path / "other.safetensors"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--scaling: method 'fedexp' has no λ of its own: its paper (Jhunjhunwala et al. 2023) sets" in err


# -- on real replies: FedExP's step beside the λ searched on validation ---------------------------------------------
@pytest.fixture
def server_app(monkeypatch):
    """Flower's task identity, which a running ServerApp has and server messages need."""
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


def test_on_digits_replies_fedexp_takes_its_own_step_beside_the_searched_lambda(server_app):
    clients = 4
    spec = Spec.from_dict(
        {
            "name": "fedexp",
            "suite": "digits",
            "clients": clients,
            "strategies": ["fedavg", "fedexp"],
            "training": {"optimizer": "momentum", "lr": 0.05, "steps": [10, 20, 40, 80], "batch_size": 32},
        }
    )
    fed = load_suite(spec.suite, clients, spec.suite_options, spec.seed)
    base = ArrayRecord({name: fed.pretrained[name] for name in fed.trained_names})
    grid = InProcessGrid(client_app(spec.to_flat()), clients)
    sender = spec.build_strategy("fedavg", private=fed.private_names, statistics=fed.statistics_names)
    replies = grid.send_and_receive(sender.configure_train(1, base, ConfigRecord({"num-rounds": 1}), grid))
    assert not any(r.has_error() for r in replies)
    replies = sorted(replies, key=lambda r: r.content["metrics"]["client-id"])

    results = Experiment(spec, None).merge_one_shot(fed, base, replies)
    runs = {run["strategy"]: run for run in results["runs"]}
    fedavg, fedexp = runs["fedavg"], runs["fedexp"]
    assert len(fedavg["selection"]) == 40 and len(fedexp["selection"]) == 1  # its own step: no λ grid
    assert fedexp["selected"]["server_lr"] == 1.0 and fedexp["selected"]["scaling"] is None

    names = fed.shared_names
    x = np.stack(
        [
            np.concatenate(
                [(r.content["arrays"][n].numpy().astype(np.float64) - base[n].numpy()).ravel() for n in names]
            )
            for r in replies
        ]
    )
    step = fedexp["history"][0]["aggregation"]["rule"]["step"]
    assert step == pytest.approx(paper_step(x, np.full(clients, 1 / clients), 1e-3), rel=1e-6)
    searched = fedavg["selected"]["server_lr"]  # β = λ·T of the λ chosen on validation
    print(
        f"FedExP's step η = {step:.3f} (β = η, validation score {fedexp['selected']['val_score']:.4f}); "
        f"the searched λ = {fedavg['selected']['scaling']:g} gives β = {searched:g} "
        f"(validation score {fedavg['selected']['val_score']:.4f})"
    )
    load_suite.cache_clear()
