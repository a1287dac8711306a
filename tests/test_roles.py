"""Shared, private and statistics tensors: the rules merge the shared ones only; each client's head stays as it
trained it and travels only to and from its client; BatchNorm statistics are never merged as task vectors.

Clients run the real ClientApp code in this process (:class:`replies.InProcessGrid`); one run goes through Ray."""

import json
import sys
import textwrap

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord
from safetensors.torch import load_file

from fedmerge.clients.app import client_app
from fedmerge.simulations import evaluation
from fedmerge.simulations.experiment import Experiment
from fedmerge.simulations.spec import Spec
from fedmerge.merging import METHODS
from fedmerge.simulations.statistics import local_reestimate
from fedmerge.strategies import STRATEGIES
from fedmerge.tasks import load_suite
from replies import InProcessGrid

CLIENTS = 3
TRAINING = {"optimizer": "momentum", "lr": 0.05, "steps": {"linear": [20, 60]}, "batch_size": 32}


def clients_of(name: str) -> int:
    """How many clients a strategy merges here: the one number it takes (SLERP: two), else CLIENTS."""
    return METHODS[name].num_clients or CLIENTS


@pytest.fixture
def server_app(monkeypatch):
    """Flower's task identity, which a running ServerApp has and server messages need."""
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


def setup(suite_options=None, suite="digits", clients=CLIENTS, **spec):
    strategies = [name for name in STRATEGIES if clients_of(name) == clients]
    spec = Spec.from_dict(
        {
            "name": "roles",
            "suite": suite,
            "clients": clients,
            "strategies": strategies,
            "suite_options": suite_options or {},
            "training": TRAINING,
            **spec,
        }
    )
    fed = load_suite(spec.suite, clients, spec.suite_options, spec.seed)
    base = ArrayRecord({name: fed.pretrained[name] for name in fed.trained_names})
    return spec, fed, base


class RecordingGrid(InProcessGrid):
    """Keeps every reply too."""

    def __init__(self, app, num_nodes):
        super().__init__(app, num_nodes)
        self.replies = []

    def send_and_receive(self, messages, *, timeout=None):
        replies = super().send_and_receive(messages, timeout=timeout)
        self.replies += replies
        return replies


def one_shot(spec, fed, base):
    """Every client trained once from θ0 by the real ClientApp, in client-id order; and the grid."""
    grid = RecordingGrid(client_app(spec.to_flat()), spec.clients)
    sender = spec.build_strategy("fedavg", private=fed.private_names, statistics=fed.statistics_names)
    asked = {key: 16 for name in spec.strategies for key in METHODS[name].statistics}  # Fisher, Gram matrices
    replies = grid.send_and_receive(sender.configure_train(1, base, ConfigRecord({"num-rounds": 1, **asked}), grid))
    assert not any(reply.has_error() for reply in replies), [r.error.reason for r in replies if r.has_error()]
    return sorted(replies, key=lambda r: r.content["metrics"]["client-id"]), grid


def tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(array.numpy()) for name, array in record.items()}


def client_of(reply) -> int:
    return reply.content["metrics"]["client-id"]


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_each_client_keeps_its_own_head_under_every_rule_one_shot_and_over_rounds(name, server_app):
    training = {**TRAINING, "optimizer": "sgd"} if name == "scaffold" else TRAINING  # SCAFFOLD's option II: SGD steps
    spec, fed, base = setup(clients=clients_of(name), training=training)
    clients = spec.clients
    heads = fed.private_names
    assert set(heads.values()) == set(range(clients)) and not set(heads) & set(fed.shared_names)
    replies, _ = one_shot(spec, fed, base)
    merged, _ = spec.build_strategy(name, server_lr=2.5, private=heads).merge_replies(1, replies, base)
    for reply in replies:
        own = tensors(reply.content["arrays"])
        for head in (n for n, owner in heads.items() if owner == client_of(reply)):
            assert torch.equal(tensors(merged)[head], own[head]) and not torch.equal(own[head], fed.pretrained[head])

    strategy = spec.build_strategy(name, private=heads)
    grid = RecordingGrid(client_app(spec.to_flat()), clients)
    result = strategy.start(grid=grid, initial_arrays=base, num_rounds=2, train_config=ConfigRecord({"num-rounds": 2}))
    first, second = grid.replies[:clients], grid.replies[clients:]
    for reply in second:  # the model of round 2 carries each client's head as it sent it in round 2
        own = tensors(reply.content["arrays"])
        for head in (n for n, owner in heads.items() if owner == client_of(reply)):
            assert torch.equal(tensors(result.arrays)[head], own[head])
    by_node = {r.metadata.src_node_id: tensors(r.content["arrays"]) for r in first}
    for message in grid.sent[clients:]:  # round 2 starts each client from its own head of round 1
        node, sent = message.metadata.dst_node_id, tensors(message.content["arrays"])
        client = strategy.clients_by_node[node]
        own_heads = [n for n, owner in heads.items() if owner == client]
        assert set(sent) == {*fed.shared_names, *own_heads}
        assert all(torch.equal(sent[head], by_node[node][head]) for head in own_heads)


def test_what_travels_is_the_shared_tensors_and_the_clients_own_only(server_app):
    for clients in (3, 6):
        spec = Spec.from_dict({"name": "travel", "suite": "digits", "clients": clients, "training": {"steps": 2}})
        fed = load_suite("digits", clients, {}, 0)
        base = ArrayRecord({name: fed.pretrained[name] for name in fed.trained_names})
        grid = RecordingGrid(client_app(spec.to_flat()), clients)
        strategy = spec.build_strategy("fedavg", private=fed.private_names)
        strategy.start(grid=grid, initial_arrays=base, num_rounds=2, train_config=ConfigRecord({"num-rounds": 2}))
        shared = set(fed.shared_names)
        assert all(
            set(m.content["arrays"]) == shared for m in grid.sent[:clients]
        )  # whose node is whose: not known yet
        for reply in grid.replies:
            own = {n for n, owner in fed.private_names.items() if owner == client_of(reply)}
            assert set(reply.content["arrays"]) == shared | own and len(own) == 2  # not growing with the clients


def test_a_reply_with_another_clients_head_is_refused_naming_it(server_app):
    from fedmerge.errors import FedmergeError

    spec, fed, base = setup()
    replies, _ = one_shot(spec, fed, base)
    replies[0].content["arrays"]["heads.1.weight"] = base["heads.1.weight"]
    with pytest.raises(
        FedmergeError,
        match=r"reply has tensor 'heads.1.weight', which is not among the shared and "
        r"client 0's own",
    ):
        spec.build_strategy("fedavg", private=fed.private_names).merge_replies(1, replies, base)


HEADS_ONLY = '''
"""digits with the encoder frozen: the clients train their private heads alone."""
from fedmerge.options import resolve
from fedmerge.tasks import digits


def build(num_clients, options, seed):
    fed = digits.build(num_clients, resolve("digits", digits.OPTIONS, options), seed)
    make = fed.model_fn

    def model_fn():
        model = make()
        model.encoder.requires_grad_(False)
        return model

    fed.model_fn = model_fn
    return fed
'''


def test_private_heads_alone_give_every_rule_normalized_accuracy_one_exactly(tmp_path, monkeypatch, server_app):
    (tmp_path / "heads_only.py").write_text(textwrap.dedent(HEADS_ONLY))
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    spec, fed, base = setup(suite="heads_only:build")
    assert fed.shared_names == [] and len(fed.private_names) == 2 * CLIENTS
    replies, _ = one_shot(spec, fed, base)
    results = Experiment(spec, None).merge_one_shot(fed, base, replies)
    assert [run["strategy"] for run in results["runs"]] == list(spec.strategies)
    for run in results["runs"]:
        assert run["final"]["mean_normalized_accuracy"] == 1.0, run["strategy"]
        assert all(task["normalized_accuracy"] == 1.0 for task in run["final"]["tasks"])
    load_suite.cache_clear()


def test_statistics_are_never_merged_and_reestimated_exactly(server_app):
    spec, fed, base = setup({"batch_norm": True})
    names = fed.statistics_names
    assert [n.rsplit(".", 1)[1] for n in names] == ["running_mean", "running_var", "num_batches_tracked"] * 2
    replies, _ = one_shot(spec, fed, base)
    for name in spec.strategies:
        strategy = spec.build_strategy(name, server_lr=3.0, private=fed.private_names, statistics=names)
        merged, _ = strategy.merge_replies(1, replies, base)
        assert all(torch.equal(tensors(merged)[n], fed.pretrained[n]) for n in names), name  # kept, not merged
        arrays = local_reestimate(fed, merged, names, spec.client_configs())
        assert all(bool((tensors(arrays)[n] >= 0).all()) for n in names if n.endswith("running_var")), name
    # the server's combination is one pass over every client's batches in turn (torch's own BatchNorm arithmetic)
    model = fed.model_from(merged.to_torch_state_dict())
    layers = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None
    model.train()
    batches = 0
    with torch.no_grad():
        for task, config in zip(fed.tasks, spec.client_configs()):
            x, _ = task.train.tensors
            for start in range(0, len(x) - config.batch_size + 1, config.batch_size):
                model(x[start : start + config.batch_size], task.head)
                batches += 1
    expected = model.state_dict()
    for name in names:
        got = tensors(arrays)[name]
        torch.testing.assert_close(got, expected[name].to(got.dtype), rtol=1e-5, atol=1e-6)
    assert int(tensors(arrays)[names[2]]) == batches


def test_average_takes_the_clients_statistics_weighted_mean(server_app):
    spec, fed, base = setup({"batch_norm": True}, server={"statistics": "average"})
    replies, _ = one_shot(spec, fed, base)
    merged, _ = spec.build_strategy("median", private=fed.private_names, statistics=fed.statistics_names).merge_replies(
        1, replies, base
    )
    for name in fed.statistics_names:
        mine = torch.stack([tensors(r.content["arrays"])[name].double() for r in replies]).mean(0)
        if name.endswith("num_batches_tracked"):
            assert int(tensors(merged)[name]) == round(float(mine))
        else:
            torch.testing.assert_close(tensors(merged)[name].double(), mine, rtol=1e-6, atol=1e-6)


def test_a_model_with_non_finite_outputs_is_marked_and_never_preferred():
    fed = load_suite("digits", CLIENTS, {}, 0)
    broken = {**fed.pretrained, "encoder.1.weight": torch.full_like(fed.pretrained["encoder.1.weight"], float("nan"))}
    result = fed.evaluate(broken, fed.tasks[0])
    assert result["diverged"] and np.isnan(result["accuracy"])  # not the 0.1 an argmax over NaNs would give
    arrays = ArrayRecord({name: broken[name] for name in fed.trained_names})
    summary = evaluation.evaluate(fed, arrays, "val", [0.9] * CLIENTS)
    assert summary["diverged"] == [task.name for task in fed.tasks] and evaluation.score(summary) == -np.inf


@pytest.fixture(scope="module")
def ray_run(tmp_path_factory):
    """One `fedmerge run` through Flower's simulation on Ray: private heads and BatchNorm statistics."""
    from fedmerge.simulations.runner import run

    out = tmp_path_factory.mktemp("roles")
    spec = Spec.from_dict(
        {
            "name": "roles",
            "suite": "digits",
            "clients": CLIENTS,
            "rounds": [1, 2],
            "strategies": ["fedavg", "median", "ties"],
            "suite_options": {"batch_norm": True},
            "strategy": {"ties": {"density": 0.3}},
            "training": TRAINING,
        }
    )
    return run(spec, out, run_dir=out / "run", show_progress=False)


@pytest.mark.slow
def test_through_ray_heads_stay_the_clients_and_statistics_are_reestimated(ray_run):
    results = json.loads((ray_run / "results.json").read_text())
    fed = load_suite("digits", CLIENTS, {"batch_norm": True}, 0)
    assert results["statistics"] == "reestimate" and results["tensors"] == {"shared": 8, "private": 6, "statistics": 6}
    models = {path.stem: load_file(path) for path in (ray_run / "models").iterdir()}
    one_shot_models = [models[f"{s}-r1"] for s in ("fedavg", "median", "ties")]
    for head in fed.private_names:  # every rule's one-shot model carries the same trained heads: the clients'
        assert all(torch.equal(m[head], one_shot_models[0][head]) for m in one_shot_models)
        assert not torch.equal(one_shot_models[0][head], fed.pretrained[head])
    for name, model in models.items():
        for stat in fed.statistics_names:
            if stat.endswith("running_var"):
                assert bool((model[stat] >= 0).all()), (name, stat)
            if stat.endswith("num_batches_tracked"):  # re-estimated on the clients' batches, not θ0's counter
                assert int(model[stat]) != int(fed.pretrained[stat]), (name, stat)
    ties = next(r for r in results["runs"] if r["strategy"] == "ties" and r["rounds"] == 1)
    assert ties["selected"]["density"] == 0.3 and "density" not in ties["searched"]  # given, so kept
