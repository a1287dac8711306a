"""FedProx (Li et al. 2020): the proximal term μ/2‖w − w_global‖² in the clients' local objective, a training option.

The trainer against an independent plain-torch loop that puts the term into the loss; on the quadratic suite against
the closed form; the ClientApp's reply says μ; Flower's FedProx strategy's μ reaches fedmerge's clients."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from flwr.serverapp.strategy import FedProx as FlowerFedProx
from flwr.supercore.task_identity import TaskIdentity

from fedmerge import contract
from fedmerge.clients.app import client_app, local_training
from fedmerge.clients.trainer import TrainConfig, train
from fedmerge.errors import FedmergeError
from fedmerge.simulations.spec import Spec
from fedmerge.strategies import STRATEGIES, FedAvg
from fedmerge.tasks import load_suite
from replies import InProcessGrid, reply
from test_trainer import make_model, make_task, weights


@pytest.fixture
def server_app(monkeypatch):
    """Flower's task identity, which a running ServerApp has and server messages need."""
    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


def plain_fedprox(model, task, optimizer, lr, steps, mu, grad_clip=None, weight_decay=0.0):
    """Full-batch local training on loss + μ/2·Σ‖w − w_global‖², written with torch's optimizers alone."""
    anchor = [p.detach().clone() for p in model.parameters()]
    params = list(model.parameters())
    if optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.SGD(
            params, lr=lr, momentum=0.9 if optimizer == "momentum" else 0.0, weight_decay=weight_decay
        )
    x, y = task.train.tensors
    for _ in range(steps):
        opt.zero_grad()
        proximal = sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))
        (F.cross_entropy(model(x, task.head), y) + mu / 2 * proximal).backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()


@pytest.mark.parametrize(
    "optimizer, grad_clip, weight_decay",
    [
        ("sgd", None, 0.0),
        ("momentum", None, 0.01),
        ("adamw", None, 0.01),
        ("sgd", 0.05, 0.0),
    ],
)
def test_the_local_update_with_mu_is_an_independent_plain_torch_fedprox(optimizer, grad_clip, weight_decay):
    mu, lr, steps = 0.7, 0.05, 12
    config = TrainConfig(
        optimizer=optimizer,
        lr=lr,
        steps=steps,
        batch_size=1000,
        prox_mu=mu,
        grad_clip=grad_clip,
        weight_decay=weight_decay,
    )
    ours, theirs, plain = make_model(), make_model(), make_model()
    train(ours, make_task(), F.cross_entropy, config)
    plain_fedprox(theirs, make_task(), optimizer, lr, steps, mu, grad_clip, weight_decay)
    train(plain, make_task(), F.cross_entropy, TrainConfig(**{**config.__dict__, "prox_mu": 0.0}))
    for name, value in weights(ours).items():
        torch.testing.assert_close(value, weights(theirs)[name], rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(value, weights(plain)[name]) for name, value in weights(ours).items())


def test_a_large_mu_pins_the_client_near_the_global_model():
    start = torch.cat([p.detach().flatten() for p in make_model().parameters()])
    distances = []
    for mu in (0.0, 1.0, 10.0, 90.0):  # lr·μ < 2: the proximal pull itself is stable
        model = make_model()
        train(model, make_task(), F.cross_entropy, TrainConfig(lr=0.02, steps=40, batch_size=1000, prox_mu=mu))
        distances.append(float((torch.cat([p.detach().flatten() for p in model.parameters()]) - start).norm()))
    assert distances == sorted(distances, reverse=True) and distances[-1] < 0.05 * distances[0]


def test_on_the_quadratic_suite_the_update_is_the_closed_form():
    """∇(½‖θ − c‖² + μ/2‖θ − θ0‖²) = (1 + μ)θ − c − μθ0: K steps of η from θ0 give τ = (1 − (1 − η(1 + μ))^K)(c − θ0)/(1 + μ)."""
    fed = load_suite("quadratic", 2, {"noise": 0.0, "dim": 6}, 0)
    task, c = fed.tasks[1], fed.optimum()["tasks"][1].double()
    mu, lr, steps = 3.0, 0.1, 7
    model = fed.model_from({"theta": torch.zeros(6)}, "cpu")
    train(model, task, fed.loss, TrainConfig(lr=lr, steps=steps, batch_size=64, prox_mu=mu), head=task.head)
    expected = (1 - (1 - lr * (1 + mu)) ** steps) * c / (1 + mu)
    np.testing.assert_allclose(model.theta.detach().double().numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)


def test_frozen_parameters_and_other_heads_stay_where_they_are():
    model = make_model(heads=3)
    model.heads[0].weight.requires_grad_(False)
    before = weights(model)
    train(model, make_task(head=1), F.cross_entropy, TrainConfig(lr=0.05, steps=5, prox_mu=2.0, weight_decay=0.1))
    after = weights(model)
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(("heads.0.", "heads.2.")))


@pytest.mark.parametrize("mu", [-0.1, float("nan"), "1"])
def test_a_bad_mu_is_refused_naming_the_option(mu):
    with pytest.raises(FedmergeError, match="training option 'prox_mu' must be a non-negative number"):
        TrainConfig(prox_mu=mu)


def test_mu_is_per_client_like_the_other_training_options():
    spec = Spec.from_dict({"suite": "quadratic", "clients": 3, "training": {"prox_mu": [0.0, 0.1, 1.0]}})
    assert [c.prox_mu for c in spec.client_configs()] == [0.0, 0.1, 1.0]
    spread = Spec.from_dict({"suite": "quadratic", "clients": 3, "training": {"prox_mu": {"geometric": [0.01, 1.0]}}})
    assert [c.prox_mu for c in spread.client_configs()] == pytest.approx([0.01, 0.1, 1.0])
    with pytest.raises(FedmergeError, match="client 0: training option 'prox_mu'"):
        Spec.from_dict({"suite": "quadratic", "clients": 2, "training": {"prox_mu": [-1.0, 0.0]}})


# -- the ClientApp --------------------------------------------------------------------------------------------------
def quadratic_spec(**training):
    return Spec.from_dict(
        {
            "name": "prox",
            "suite": "quadratic",
            "clients": 3,
            "strategies": ["fedavg"],
            "suite_options": {"noise": 0.0},
            "training": {"lr": 0.1, "steps": 5, **training},
        }
    )


def train_message_content(spec, config=None):
    fed = load_suite(spec.suite, spec.clients, spec.suite_options, spec.seed)
    arrays = ArrayRecord({name: fed.pretrained[name] for name in fed.trained_names})
    return RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1, **(config or {})})})


def test_the_reply_says_which_mu_the_client_used_and_none_without_one():
    spec = quadratic_spec(prox_mu=[0.0, 0.5, 2.0])
    replies = [local_training(spec.to_flat(), {"partition-id": t}, train_message_content(spec)) for t in range(3)]
    metrics = [reply[contract.METRICS] for reply in replies]
    assert contract.PROX_MU not in metrics[0] and [m[contract.PROX_MU] for m in metrics[1:]] == [0.5, 2.0]
    norms = [float(np.linalg.norm(reply[contract.ARRAYS]["theta"].numpy())) for reply in replies]
    fed = load_suite(spec.suite, 3, spec.suite_options, spec.seed)
    for t, mu in ((1, 0.5), (2, 2.0)):  # each the closed form with its own μ
        c = fed.optimum()["tasks"][t].numpy()
        assert norms[t] == pytest.approx((1 - (1 - 0.1 * (1 + mu)) ** 5) * np.linalg.norm(c) / (1 + mu), rel=1e-5)


def test_flowers_fedprox_strategy_sets_mu_for_fedmerges_clients(server_app):
    """Flower's FedProx sends μ as ``proximal-mu``: fedmerge's ClientApp trains with it (over the table's), so that
    strategy gives what fedmerge's FedAvg gives on clients told μ by the training table."""
    mu = 0.8
    by_server, by_table = quadratic_spec(prox_mu=0.1), quadratic_spec(prox_mu=mu)
    fed = load_suite("quadratic", 3, by_server.suite_options, 0)
    base = ArrayRecord({name: fed.pretrained[name] for name in fed.trained_names})
    flower_grid = InProcessGrid(client_app(by_server.to_flat()), 3)
    flower = FlowerFedProx(proximal_mu=mu, min_available_nodes=3, min_train_nodes=3, fraction_evaluate=0.0)
    theirs = flower.start(grid=flower_grid, initial_arrays=base, num_rounds=2).arrays
    ours = (
        FedAvg(weighting="num-examples", min_available_nodes=3, min_train_nodes=3)
        .start(grid=InProcessGrid(client_app(by_table.to_flat()), 3), initial_arrays=base, num_rounds=2)
        .arrays
    )
    np.testing.assert_allclose(theirs["theta"].numpy(), ours["theta"].numpy(), rtol=1e-6)
    with pytest.raises(
        FedmergeError, match="the server's 'proximal-mu': training option 'prox_mu' must be a non-negative"
    ):
        local_training(
            by_server.to_flat(), {"partition-id": 0}, train_message_content(by_server, {"proximal-mu": -1.0})
        )


@pytest.mark.parametrize("name", ["fedavg", "median", "ties", "cclip", "fednova"])
def test_every_rule_merges_fedprox_clients(name):
    """μ is the clients' business: any rule merges their replies, the proximal updates of the closed form."""
    mus, steps = [0.0, 1.0, 4.0], [3, 6, 12]
    spec = quadratic_spec(prox_mu=mus, steps=steps)
    content = train_message_content(spec)
    done = [local_training(spec.to_flat(), {"partition-id": t}, content) for t in range(3)]
    replies = [
        reply(
            t + 1,
            {"theta": c[contract.ARRAYS]["theta"].numpy()},
            **{k.replace("-", "_"): v for k, v in c[contract.METRICS].items()},
        )
        for t, c in enumerate(done)
    ]
    strategy = STRATEGIES[name]()
    merged, _ = strategy.merge_replies(1, replies, content["arrays"])
    centers = load_suite("quadratic", 3, spec.suite_options, spec.seed).optimum()["tasks"]
    expected = [(1 - (1 - 0.1 * (1 + mu)) ** k) * float(c.norm()) / (1 + mu) for mu, k, c in zip(mus, steps, centers)]
    assert strategy.rounds[-1].task_vector_norms == pytest.approx(expected, rel=1e-5)
    assert merged is not None and np.isfinite(merged["theta"].numpy()).all()
