"""Server optimizers (FedAvgM; Reddi et al. 2021's FedAdam, FedYogi, FedAdagrad) on any rule's Δ: equal to Flower's
strategies over several rounds on the same clients, what each is in one shot, their state kept over rounds and only
for the rounds merged, and of the TIES update against NumPy."""

import logging

import numpy as np
import pytest
from flwr.app import Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvgM, FedYogi
from flwr.supercore.task_identity import TaskIdentity

from fedmerge import contract
from fedmerge.errors import FedmergeError
from fedmerge.simulations.spec import Spec
from fedmerge.strategies import FedAvg, Median, Ties
from fedmerge.strategies.server_optimizer import ServerOptimizer
from replies import InProcessGrid, arrays_record, reply
from test_strategies import SHAPES, as_numpy, federation, model

ROUNDS = 4


@pytest.fixture
def server_app(monkeypatch):
    """Flower's task identity, which a running ServerApp has and server messages need."""
    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


def drifting_clients() -> ClientApp:
    """Client t moves θ a third of the way to its own target and adds a step drawn from (t, round): replies that depend
    on the model sent, as training does, so that two strategies agree over rounds only if every round agrees."""
    app = ClientApp()

    @app.train()
    def train(message, context):
        arrays, config = contract.received(message.content)
        t, r = context.node_id - 1, int(config["server-round"])
        target, noise = np.random.default_rng([t]), np.random.default_rng([t, r])
        trained = {
            k: a.numpy() + (target.normal(size=a.shape) - a.numpy()) / 3 + 0.1 * noise.normal(size=a.shape)
            for k, a in arrays.items()
        }
        metrics = contract.train_reply_metrics(num_examples=10 * (t + 1), num_steps=5, lr_sum=0.5, client_id=t)
        return Message(
            RecordDict(
                {
                    "arrays": arrays_record({k: v.astype(np.float32) for k, v in trained.items()}),
                    "metrics": MetricRecord(metrics),
                }
            ),
            reply_to=message,
        )

    return app


def trajectory(strategy, clients=3):
    """The global model after each round of ``strategy`` on :func:`drifting_clients`, from the same θ0."""
    models = []
    base = arrays_record(model(np.random.default_rng(0)))
    strategy.start(
        grid=InProcessGrid(drifting_clients(), clients),
        initial_arrays=base,
        num_rounds=ROUNDS,
        evaluate_fn=lambda r, arrays: models.append(as_numpy(arrays)) if r else None,
    )
    return models


FLOWER = {
    "momentum": (
        lambda: FedAvgM(server_learning_rate=0.7, server_momentum=0.8, fraction_evaluate=0.0),
        {"server_lr": 0.7, "server_momentum": 0.8},
    ),
    "adam": (
        lambda: FedAdam(eta=0.05, beta_1=0.8, beta_2=0.95, tau=1e-2, fraction_evaluate=0.0),
        {"server_lr": 0.05, "server_beta_1": 0.8, "server_beta_2": 0.95, "server_tau": 1e-2},
    ),
    "yogi": (
        lambda: FedYogi(eta=0.05, beta_1=0.8, beta_2=0.95, tau=1e-2, fraction_evaluate=0.0),
        {"server_lr": 0.05, "server_beta_1": 0.8, "server_beta_2": 0.95, "server_tau": 1e-2},
    ),
    "adagrad": (lambda: FedAdagrad(eta=0.1, tau=1e-2, fraction_evaluate=0.0), {"server_lr": 0.1, "server_tau": 1e-2}),
}


@pytest.mark.parametrize("name", FLOWER)
def test_each_equals_flowers_strategy_over_several_rounds_on_the_same_clients(server_app, name):
    make_flower, options = FLOWER[name]
    theirs = trajectory(make_flower())
    ours = trajectory(FedAvg(server_optimizer=name, weighting="num-examples", **options))
    plain = trajectory(FedAvg(weighting="num-examples", server_lr=options["server_lr"]))
    assert len(ours) == len(theirs) == ROUNDS
    for r in range(ROUNDS):
        for key in SHAPES:
            np.testing.assert_allclose(
                ours[r][key], theirs[r][key], rtol=2e-5, atol=2e-6, err_msg=f"round {r + 1} {key}"
            )
    assert not np.allclose(ours[-1]["fc.weight"], plain[-1]["fc.weight"], atol=1e-4)  # the optimizer did something


# -- one shot -------------------------------------------------------------------------------------------------------
def one_round(base, replies, **options):
    merged, _ = FedAvg(**options).merge_replies(1, replies, arrays_record(base))
    return as_numpy(merged)


def test_one_shot_fedavgm_is_fedavg_with_beta_eta():
    base, _, replies = federation(4)
    momentum = one_round(base, replies, server_optimizer="momentum", server_momentum=0.9, server_lr=0.6)
    plain = one_round(base, replies, server_lr=0.6)
    for key in SHAPES:
        np.testing.assert_array_equal(momentum[key], plain[key])


@pytest.mark.parametrize("name", ["adam", "yogi", "adagrad"])
def test_one_shot_adaptive_steps_are_their_normalised_steps(name):
    """From zero state one round is a coordinate-wise normalised step of Δ (written here in NumPy)."""
    base, clients, replies = federation(4, seed=3)
    beta, b1, b2, tau = 0.3, 0.85, 0.97, 1e-3
    options = {
        "server_lr": beta,
        "server_tau": tau,
        **({"server_beta_1": b1, "server_beta_2": b2} if name != "adagrad" else {}),
    }
    ours = one_round(base, replies, server_optimizer=name, **options)
    for key in SHAPES:
        delta = np.mean([c[key].astype(np.float64) - base[key] for c in clients], axis=0)
        if name == "adam":
            step = np.sqrt(1 - b2**2) / (1 - b1**2) * (1 - b1) * delta / (np.sqrt(1 - b2) * np.abs(delta) + tau)
        elif name == "yogi":
            step = (1 - b1) * delta / (np.sqrt(1 - b2) * np.abs(delta) + tau)
        else:
            step = delta / (np.abs(delta) + tau)
        np.testing.assert_allclose(ours[key], base[key] + beta * step, rtol=1e-5, atol=1e-6)


def test_one_shot_adam_and_adagrad_tend_to_a_sign_step_as_tau_vanishes():
    base, clients, replies = federation(4, seed=5)
    adam = one_round(base, replies, server_optimizer="adam", server_lr=0.2, server_tau=1e-9)
    adagrad = one_round(base, replies, server_optimizer="adagrad", server_lr=0.2, server_tau=1e-9)
    for key in SHAPES:
        sign = np.sign(np.mean([c[key] - base[key] for c in clients], axis=0))
        np.testing.assert_allclose(adam[key] - base[key], 0.2 * np.sqrt(1.99) / 1.9 * sign, atol=1e-5)
        np.testing.assert_allclose(adagrad[key] - base[key], 0.2 * sign, atol=1e-5)


# -- any rule's Δ, state over rounds --------------------------------------------------------------------------------
def numpy_adam(deltas, beta, b1, b2, tau):
    """Flower's FedAdam step over a list of per-round Δ (NumPy)."""
    m = v = 0.0
    steps = []
    for r, delta in enumerate(deltas, start=1):
        m = b1 * m + (1 - b1) * delta
        v = b2 * v + (1 - b2) * delta**2
        steps.append(beta * np.sqrt(1 - b2 ** (r + 1)) / (1 - b1 ** (r + 1)) * m / (np.sqrt(v) + tau))
    return steps


def test_fedadam_of_the_ties_update_over_rounds_is_adam_on_ties_deltas():
    """The optimizer takes the rule's Δ whatever the rule: Adam of TIES, two rounds, against NumPy's Adam on the Δ that
    TIES alone gives from the same models."""
    rng = np.random.default_rng(7)
    theta = model(rng)
    adam = Ties(density=0.5, server_optimizer="adam", server_lr=0.1)
    for r in (1, 2):
        clients = [{k: v + rng.normal(size=v.shape).astype(np.float32) for k, v in theta.items()} for _ in range(3)]
        replies = [reply(t + 1, c, num_examples=5, client_id=t) for t, c in enumerate(clients)]
        ties_alone, _ = Ties(density=0.5).merge_replies(r, replies, arrays_record(theta))
        deltas_r = {k: ties_alone[k].numpy().astype(np.float64) - theta[k] for k in theta}
        merged, _ = adam.merge_replies(r, replies, arrays_record(theta))
        if r == 1:
            history = {k: [d] for k, d in deltas_r.items()}
        else:
            for k in theta:
                history[k].append(deltas_r[k])
        for k in theta:
            expected = theta[k] + numpy_adam(history[k], 0.1, 0.9, 0.99, 1e-3)[-1]
            np.testing.assert_allclose(merged[k].numpy(), expected, rtol=1e-5, atol=1e-6)
        theta = as_numpy(merged)


def test_the_state_moves_only_with_the_rounds_merged():
    """A round left without usable replies keeps the state; a client left out for non-finite weights leaves the state
    as the clean replies alone would (the merge pass that found it does not count)."""
    base, clients, replies = federation(3, seed=2)
    bad = dict(clients[2], **{"fc.weight": np.full(SHAPES["fc.weight"], np.nan, np.float32)})
    poisoned = replies[:2] + [reply(102, bad, num_examples=50, client_id=2)]
    clean, dirty = (FedAvg(server_optimizer="yogi", server_lr=0.1) for _ in range(2))
    for strategy, given in ((clean, replies[:2]), (dirty, poisoned)):
        strategy.merge_replies(1, given, arrays_record(base))
        state = {k: {n: t.clone() for n, t in s.items()} for k, s in strategy.optimizer_state.items()}
        assert strategy.merge_replies(2, [], arrays_record(base))[0] is None
        assert all(np.array_equal(strategy.optimizer_state[k][n], state[k][n]) for k in state for n in state[k])
    for key in SHAPES:
        for part in ("m", "v"):
            np.testing.assert_array_equal(clean.optimizer_state[key][part], dirty.optimizer_state[key][part])


def test_private_tensors_and_statistics_never_move_by_the_optimizer():
    rng = np.random.default_rng(1)
    base = {
        "shared": rng.normal(size=5).astype(np.float32),
        "head": np.zeros(3, np.float32),
        "bn.running_mean": np.zeros(2, np.float32),
    }
    clients = [
        {
            "shared": base["shared"] + 1.0,
            "head": np.full(3, 0.5 + t, np.float32),
            "bn.running_mean": np.full(2, t, np.float32),
        }
        for t in range(2)
    ]
    replies = [
        reply(t + 1, {k: v for k, v in c.items() if k != "head" or t == 0}, num_examples=1, client_id=t)
        for t, c in enumerate(clients)
    ]
    merged, _ = Median(
        private={"head": 0}, server_optimizer="adagrad", server_lr=0.5, statistics_rule="average"
    ).merge_replies(1, replies, arrays_record(base))
    np.testing.assert_allclose(merged["shared"].numpy(), base["shared"] + 0.5 * 1.0 / (1.0 + 1e-3), rtol=1e-6)
    np.testing.assert_array_equal(merged["head"].numpy(), clients[0]["head"])
    np.testing.assert_allclose(merged["bn.running_mean"].numpy(), [0.5, 0.5])


# -- checks ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options, message",
    [
        (
            {"server_optimizer": "nesterov"},
            "server_optimizer must be one of sgd, momentum, adam, yogi, adagrad, got 'nesterov'",
        ),
        ({"server_optimizer": "adam", "server_beta_1": 1.0}, r"server_beta_1 must be a number in \[0, 1\), got 1.0"),
        ({"server_optimizer": "adagrad", "server_tau": 0}, "server_tau must be a number > 0, got 0"),
        (
            {"server_optimizer": "momentum", "server_beta_2": 0.9},
            r"server_beta_2 = 0.9 has no effect with server_optimizer = 'momentum' \(only adam and yogi read it\); drop it, "
            "or choose adam or yogi",
        ),
        (
            {"server_momentum": 0.5},
            r"server_momentum = 0.5 has no effect with server_optimizer = 'sgd' \(only momentum",
        ),
    ],
)
def test_bad_optimizer_settings_are_refused_naming_them(options, message):
    with pytest.raises(FedmergeError, match=message):
        FedAvg(**options)


def test_the_spec_keys_reach_every_strategy_and_are_checked():
    spec = Spec.from_dict(
        {
            "suite": "quadratic",
            "strategies": ["fedavg", "ties"],
            "server": {"server_optimizer": "yogi", "server_beta_1": 0.5, "server_lr": 0.01},
        }
    )
    for name in ("fedavg", "ties"):
        assert spec.build_strategy(name).server_optimizer == ServerOptimizer("yogi", beta_1=0.5)
    assert Spec.from_flat(spec.to_flat()) == spec
    with pytest.raises(FedmergeError, match=r"server_tau = 0.1 has no effect with server_optimizer = 'momentum'"):
        Spec.from_dict({"suite": "quadratic", "server": {"server_optimizer": "momentum", "server_tau": 0.1}})
    with pytest.raises(FedmergeError, match="option 'server.server_optimizer' must be one of"):
        Spec.from_dict({"suite": "quadratic", "server": {"server_optimizer": "lion"}})


def test_the_summary_names_the_optimizer(caplog):
    caplog.set_level(logging.INFO, logger="flwr")
    FedAvg(server_optimizer="adam", server_lr=0.01).summary()
    assert "Server optimizer: {'optimizer': 'adam', 'beta_1': 0.9, 'beta_2': 0.99, 'tau': 0.001}" in caplog.text


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["momentum", "adam", "yogi", "adagrad"])
def test_on_the_gpu_as_on_the_cpu(name):
    """The state lives where the merge runs; two rounds on CUDA give the CPU's models."""
    base, _, replies = federation(3)
    models = []
    for device in ("cpu", "cuda"):
        strategy, theta = FedAvg(server_optimizer=name, server_lr=0.1, device=device), arrays_record(base)
        for server_round in (1, 2):
            theta, _ = strategy.merge_replies(server_round, replies, theta)
        assert {s.device.type for state in strategy.optimizer_state.values() for s in state.values()} == {device}
        models.append(as_numpy(theta))
    for key in SHAPES:
        np.testing.assert_allclose(models[1][key], models[0][key], rtol=1e-5, atol=1e-6)
