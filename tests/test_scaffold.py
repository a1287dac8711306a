"""SCAFFOLD (Karimireddy et al. 2020): the server's control variate update against NumPy; the strategy and fedmerge's
ClientApp over rounds on the quadratic suite against an independent SCAFFOLD; convergence where FedAvg drifts; the
clients' c_t kept in their node's Context.state by client, also with several clients per call; one shot is FedAvg."""

import json
import threading

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity
from safetensors.torch import load_file

from fedmerge import contract
from fedmerge.clients.app import client_app, local_training
from fedmerge.errors import FedmergeError
from fedmerge.merging import TaskVector
from fedmerge.merging.rules.scaffold import next_control
from fedmerge.simulations.runner import run
from fedmerge.simulations.spec import Spec
from fedmerge.simulations.watched_grid import WatchedGrid
from fedmerge.strategies import FedAvg, Scaffold
from fedmerge.tasks import load_suite
from replies import InProcessGrid, arrays_record, reply
from test_strategies import SHAPES, federation

LR = 0.1
STEPS = [2, 5, 10, 40]


@pytest.fixture
def server_app(monkeypatch):
    """Flower's task identity, which a running ServerApp has and server messages need."""
    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


class StatefulGrid(InProcessGrid):
    """As :class:`InProcessGrid`, each node keeping its Context (and so its state) across rounds, as Flower does."""

    def __init__(self, app, num_nodes):
        super().__init__(app, num_nodes)
        self.contexts = {node: Context(1, node, {"partition-id": node - 1}, RecordDict(), {}) for node in self.node_ids}

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for message in messages:
            self.sent.append(message)
            try:
                replies.append(self.client_app(message, self.contexts[message.metadata.dst_node_id]))
            except Exception as error:
                replies.append(Message(Error(code=0, reason=repr(error)), reply_to=message))
        return replies


class LocalRuntime(Grid):
    """Flower's side of a simulation with ``real`` nodes, in this process: push runs the ClientApp with the node's own
    Context, pull returns the replies. Under a :class:`WatchedGrid` packing several clients per call."""

    def __init__(self, app, real):
        self.app, self.contexts, self.replies = app, {node: Context(1, node, {}, RecordDict(), {}) for node in real}, {}

    def get_node_ids(self):
        return list(self.contexts)[::-1]  # not sorted: placement must not depend on the order nodes are listed

    def push_messages(self, messages):
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = message.object_id  # as Flower's grids do
            self.replies[message.object_id] = self.app(message, self.contexts[message.metadata.dst_node_id])
            ids.append(message.object_id)
        return ids

    def pull_messages(self, message_ids):
        return [self.replies.pop(i) for i in message_ids if i in self.replies]

    def send_and_receive(self, messages, *, timeout=None):
        raise NotImplementedError  # the WatchedGrid around it pushes and pulls

    def set_run(self, run):
        raise NotImplementedError

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        raise NotImplementedError


def quadratic(clients=len(STEPS), **spec):
    spec = Spec.from_dict(
        {
            "name": "scaffold",
            "suite": "quadratic",
            "clients": clients,
            "strategies": ["fedavg", "scaffold"],
            "suite_options": {"noise": 0.0, "zeta2": 4.0, "dim": 5},
            "same_compute": False,
            "training": {"lr": LR, "steps": STEPS[:clients], "batch_size": 64},
            **spec,
        }
    )
    fed = load_suite(spec.suite, spec.clients, spec.suite_options, spec.seed)
    return spec, fed, ArrayRecord({name: fed.pretrained[name] for name in fed.trained_names})


def run_rounds(strategy, grid, base, rounds):
    """The global θ after each round."""
    thetas = []
    strategy.start(
        grid=grid,
        initial_arrays=base,
        num_rounds=rounds,
        train_config=ConfigRecord({"num-rounds": rounds, "same-compute": False}),
        evaluate_fn=lambda r, arrays: thetas.append(arrays["theta"].numpy().astype(np.float64)) if r else None,
    )
    return thetas


def numpy_scaffold(centers, steps, sampled, beta, num_clients):
    """Algorithm 1 of the paper (option II), full-batch on L_i = ½‖θ − c_i‖², uniform weights; x after each round."""
    x, c = np.zeros(centers.shape[1]), np.zeros(centers.shape[1])
    own = np.zeros_like(centers)
    history = []
    for clients in sampled:
        dy, dc = [], []
        for i in clients:
            y = x.copy()
            for _ in range(steps[i]):
                y -= LR * ((y - centers[i]) - own[i] + c)
            updated = own[i] - c + (x - y) / (steps[i] * LR)
            dy.append(y - x), dc.append(updated - own[i])
            own[i] = updated
        x = x + beta * np.mean(dy, axis=0)
        c = c + len(clients) / num_clients * np.mean(dc, axis=0)
        history.append(x.copy())
    return history


# -- the server's update of c ---------------------------------------------------------------------------------------
def test_next_control_is_the_papers_update_written_in_numpy():
    rng = np.random.default_rng(0)
    base = {k: rng.normal(size=s) for k, s in SHAPES.items()}
    models = [{k: v + rng.normal(size=v.shape) for k, v in base.items()} for _ in range(3)]
    control = {
        k: torch.from_numpy(rng.normal(size=s)) for k, s in SHAPES.items() if k != "conv.bias"
    }  # conv.bias: c = 0
    p, lr_sums, share = [0.2, 0.3, 0.5], [0.4, 1.0, 2.5], 3 / 8
    tensors = lambda d: {k: torch.from_numpy(v) for k, v in d.items()}
    ours = next_control(control, [TaskVector(tensors(m), tensors(base)) for m in models], p, lr_sums, share)
    for key in SHAPES:
        c = control[key].numpy() if key in control else np.zeros(SHAPES[key])
        delta_c = [-c - (m[key] - base[key]) / a for m, a in zip(models, lr_sums)]
        np.testing.assert_allclose(ours[key].numpy(), c + share * sum(w * d for w, d in zip(p, delta_c)), rtol=1e-10)


# -- the strategy and fedmerge's ClientApp over rounds ---------------------------------------------------------------
@pytest.mark.parametrize("per_round, beta", [(0, 1.0), (2, 0.8)])
def test_over_rounds_it_is_an_independent_scaffold_on_the_quadratic_suite(server_app, per_round, beta):
    """Every client's c_t persists in its node's state between the rounds it is sampled in; |S|/N < 1 when sampled."""
    spec, fed, base = quadratic(server={"clients_per_round": per_round, "server_lr": beta})
    strategy = spec.build_strategy("scaffold")
    ours = run_rounds(strategy, StatefulGrid(client_app(spec.to_flat()), spec.clients), base, 6)
    sampled = [record.client_ids for record in strategy.rounds]
    assert per_round == 0 or {len(s) for s in sampled} == {per_round} and len({tuple(s) for s in sampled}) > 1
    centers = np.stack([c.numpy().astype(np.float64) for c in fed.optimum()["tasks"]])
    theirs = numpy_scaffold(centers, STEPS, sampled, beta, spec.clients)
    np.testing.assert_allclose(np.stack(ours), np.stack(theirs), rtol=1e-5, atol=1e-6)


def test_it_converges_where_fedavg_drifts_with_unequal_local_steps(server_app):
    """Quadratic tasks with unequal K_t: FedAvg's fixed point is Σ α_t c_t / Σ α_t with α_t = 1 − (1 − η)^K_t, away from
    the optimum c̄; SCAFFOLD's corrected steps all pull toward c̄ and reach it."""
    spec, fed, base = quadratic()
    optimum = fed.optimum()
    centers = np.stack([c.numpy() for c in optimum["tasks"]])
    alpha = 1 - (1 - LR) ** np.array(STEPS)
    drifted = (alpha[:, None] * centers).sum(0) / alpha.sum()
    errors = {}
    for name in ("fedavg", "scaffold"):
        theta = run_rounds(spec.build_strategy(name), StatefulGrid(client_app(spec.to_flat()), spec.clients), base, 40)[
            -1
        ]
        errors[name] = np.linalg.norm(theta - optimum["theta"].numpy())
        if name == "fedavg":
            np.testing.assert_allclose(theta, drifted, atol=1e-4)
    assert errors["scaffold"] < 1e-4 < 0.1 < errors["fedavg"]


def test_one_shot_scaffold_is_fedavg():
    base, _, replies = federation(4)
    ours, _ = Scaffold(server_lr=1.7).merge_replies(1, replies, arrays_record(base))
    plain, _ = FedAvg(server_lr=1.7).merge_replies(1, replies, arrays_record(base))
    for key in SHAPES:
        np.testing.assert_array_equal(ours[key].numpy(), plain[key].numpy())


# -- the clients' state ---------------------------------------------------------------------------------------------
def test_several_clients_per_call_keep_each_clients_c_on_one_node_and_give_the_same_numbers(server_app):
    """engine.clients_per_call = 2 packs two clients per call on N/2 nodes: each client always goes to the same node,
    whose state holds its own c_t, whatever order the clients are drawn in (FedAvg's sampling shuffles them)."""
    spec, fed, base = quadratic(server={"clients_per_round": 3})
    alone = run_rounds(spec.build_strategy("scaffold"), StatefulGrid(client_app(spec.to_flat()), spec.clients), base, 5)
    runtime = LocalRuntime(client_app(spec.to_flat()), real=[501, 502])
    packed = WatchedGrid(runtime, threading.Event(), clients_per_call=2, num_clients=spec.clients)
    strategy = spec.build_strategy("scaffold")
    np.testing.assert_allclose(np.stack(run_rounds(strategy, packed, base, 5)), np.stack(alone), rtol=1e-6, atol=1e-7)
    kept = {
        node: sorted(int(key.split("/")[1]) for key in context.state.array_records)
        for node, context in runtime.contexts.items()
    }
    assert kept == {501: [0, 1], 502: [2, 3]}


def test_a_c_kept_for_another_run_counts_as_zero(server_app):
    """An experiment runs several strategies on the same nodes: a second SCAFFOLD run starts from c_t = 0."""
    spec, _, base = quadratic()
    grid = StatefulGrid(client_app(spec.to_flat()), spec.clients)
    first = run_rounds(spec.build_strategy("scaffold"), grid, base, 3)
    again = run_rounds(spec.build_strategy("scaffold"), grid, base, 3)
    np.testing.assert_array_equal(np.stack(first), np.stack(again))


def test_a_client_takes_scaffold_steps_with_sgd_only_and_needs_its_state():
    spec, fed, base = quadratic(clients=2)
    content = lambda: RecordDict(
        {
            "arrays": base,
            "config": ConfigRecord({"server-round": 1}),
            contract.CONTROL: ArrayRecord({"theta": torch.zeros(5)}),
        }
    )
    done = local_training(spec.to_flat(), {"partition-id": 1}, content(), RecordDict())
    assert done[contract.METRICS][contract.CONTROL_APPLIED] == 1
    with pytest.raises(FedmergeError, match="needs the node's Context.state"):
        local_training(spec.to_flat(), {"partition-id": 1}, content())
    momentum, _, _ = quadratic(clients=2, training={"optimizer": "momentum", "lr": LR, "steps": 3})
    with pytest.raises(
        FedmergeError, match="client 0 trains with optimizer = 'momentum'; set training.optimizer = \"sgd\""
    ):
        local_training(momentum.to_flat(), {"partition-id": 0}, content(), RecordDict())


def test_an_experiment_of_scaffold_rounds_with_another_optimizer_is_refused_before_it_starts():
    with pytest.raises(
        FedmergeError,
        match="'scaffold' over rounds needs plain SGD steps.*client 1 trains with "
        "optimizer = 'momentum'.*or run scaffold one-shot only",
    ):
        quadratic(clients=2, rounds=[1, 3], training={"optimizer": ["sgd", "momentum"], "lr": LR, "steps": 3})
    quadratic(clients=2, rounds=[1], training={"optimizer": "momentum", "lr": LR, "steps": 3})  # one shot: FedAvg


def test_a_reply_without_control_applied_is_refused_in_a_controlled_round(server_app):
    """A ClientApp that ignores the control variate it was sent would merge as plain FedAvg while c moves: refused."""
    base, clients, _ = federation(2)
    strategy = Scaffold()
    grid = InProcessGrid(client_app({}), 2)
    messages = list(strategy.configure_train(1, arrays_record(base), ConfigRecord(), grid))
    assert all(set(m.content.array_records) == {"arrays", contract.CONTROL} for m in messages)
    assert all(m.content["config"][contract.CONTROL_RUN] == strategy.run_id for m in messages)
    plain = [reply(t + 1, clients[t], num_examples=5, lr_sum=1.0, client_id=t) for t in range(2)]
    with pytest.raises(FedmergeError, match="node 1: reply's metrics lack 'control-applied'"):
        strategy.merge_replies(1, plain, arrays_record(base))


@pytest.mark.slow
def test_a_real_simulation_keeps_c_over_rounds_with_one_or_two_clients_per_call(tmp_path):
    """Through Flower's simulation runtime (Ray): the same numbers with clients packed two per call, and SCAFFOLD ends
    nearer the optimum than FedAvg."""
    base = {
        "name": "scaffold",
        "suite": "quadratic",
        "clients": 4,
        "strategies": ["fedavg", "scaffold"],
        "rounds": [1, 8],
        "same_compute": False,
        "suite_options": {"noise": 0.0, "zeta2": 4.0},
        "training": {"lr": LR, "steps": STEPS, "batch_size": 64},
    }
    finals = []
    for k in (1, 2):
        out = run(
            Spec.from_dict({**base, "engine": {"clients_per_call": k}}),
            tmp_path,
            run_dir=tmp_path / f"k{k}",
            show_progress=False,
        )
        finals.append(
            {
                name: load_file(out / "models" / f"{name}-r8.safetensors")["theta"].numpy()
                for name in ("fedavg", "scaffold")
            }
        )
        results = json.loads((out / "results.json").read_text())
    for name in finals[0]:
        np.testing.assert_allclose(finals[1][name], finals[0][name], rtol=1e-6)
    optimum = np.array(results["suite"]["optimum"]["theta"])
    assert np.linalg.norm(finals[0]["scaffold"] - optimum) < 0.5 * np.linalg.norm(finals[0]["fedavg"] - optimum)


@pytest.mark.cuda
def test_the_server_updates_c_on_the_gpu_as_on_the_cpu():
    base, _, replies = federation(3, lr_sums=[0.5, 1.0, 2.0])
    controls = []
    for device in ("cpu", "cuda"):
        strategy, theta = Scaffold(device=device), arrays_record(base)
        for server_round in (1, 2):
            theta, _ = strategy.merge_replies(server_round, replies, theta)
        controls.append({name: c.numpy() for name, c in strategy.control.items()})
    for key in SHAPES:
        np.testing.assert_allclose(controls[1][key], controls[0][key], rtol=1e-5, atol=1e-7)
