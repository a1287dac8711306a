"""Flower's differential-privacy wrappers around fedmerge's strategies: server-side fixed and adaptive clipping, and
client-side clipping with Flower's mods on fedmerge's ClientApp (``train_mods``), around FedAvg and Median.

Each run's merged updates are clipped (their norms, as the strategy records them, within the round's clipping norm),
the model is the rule over the clipped updates (computed here in NumPy from the clients' raw updates), and the noise
is the Gaussian mechanism's."""

import math

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
)
from flwr.supercore.task_identity import TaskIdentity

from fedmerge import contract
from fedmerge.clients.app import client_app
from fedmerge.simulations.spec import Spec
from fedmerge.strategies import FedAvg, Median
from fedmerge.tasks import load_suite
from replies import InProcessGrid

CLIENTS, CLIP = 3, 0.05
RULES = {"fedavg": (FedAvg, lambda x: x.mean(0)), "median": (Median, lambda x: np.median(x, axis=0))}
WRAPPERS = {
    "server-fixed": (lambda inner, z: DifferentialPrivacyServerSideFixedClipping(inner, z, CLIP, CLIENTS), None),
    "client-fixed": (
        lambda inner, z: DifferentialPrivacyClientSideFixedClipping(inner, z, CLIP, CLIENTS),
        fixedclipping_mod,
    ),
    "server-adaptive": (
        lambda inner, z: DifferentialPrivacyServerSideAdaptiveClipping(inner, z, CLIENTS, initial_clipping_norm=CLIP),
        None,
    ),
    "client-adaptive": (
        lambda inner, z: DifferentialPrivacyClientSideAdaptiveClipping(inner, z, CLIENTS, initial_clipping_norm=CLIP),
        adaptiveclipping_mod,
    ),
}


@pytest.fixture
def server_app(monkeypatch):
    """Flower's task identity, which a running ServerApp has and server messages need."""
    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


@pytest.fixture(scope="module")
def setup():
    spec = Spec.from_dict(
        {
            "name": "dp",
            "suite": "mnist1d",
            "clients": CLIENTS,
            "strategies": ["fedavg"],
            "training": {"lr": 0.1, "steps": [3, 6, 9], "batch_size": 32},
        }
    )
    fed = load_suite(spec.suite, CLIENTS, spec.suite_options, spec.seed)
    return spec, ArrayRecord({name: fed.pretrained[name] for name in fed.trained_names})


def flat(arrays) -> np.ndarray:
    return np.concatenate([arrays[name].numpy().astype(np.float64).ravel() for name in arrays])


def start(strategy, spec, base, mods=(), rounds=2):
    """``strategy`` run for ``rounds`` on fedmerge's ClientApp (with ``mods`` around its training): the models after each
    round and the clipping norm each round used."""
    grid = InProcessGrid(client_app(spec.to_flat(), train_mods=mods), CLIENTS)
    models, clips = [], []

    def evaluate(server_round, arrays):  # before round r + 1: the norm it will clip to
        clips.append(getattr(strategy, "clipping_norm", None))
        if server_round:
            models.append(flat(arrays))

    strategy.start(
        grid=grid,
        initial_arrays=base,
        num_rounds=rounds,
        train_config=ConfigRecord({"num-rounds": rounds}),
        evaluate_fn=evaluate,
    )
    return models, clips[:rounds]


def raw_updates(spec, base):
    """Each client's first-round update, unclipped (the clients are deterministic)."""
    grid = InProcessGrid(client_app(spec.to_flat()), CLIENTS)
    messages = FedAvg(min_available_nodes=CLIENTS).configure_train(1, base, ConfigRecord({"num-rounds": 2}), grid)
    replies = sorted(grid.send_and_receive(messages), key=lambda r: r.content[contract.METRICS][contract.CLIENT_ID])
    return np.stack([flat(r.content[contract.ARRAYS]) for r in replies]) - flat(base)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("wrapper", WRAPPERS)
def test_each_wrapper_clips_the_updates_a_rule_merges(server_app, setup, wrapper, rule):
    spec, base = setup
    make, mod = WRAPPERS[wrapper]
    strategy, merge = RULES[rule]
    inner = strategy(min_available_nodes=CLIENTS, min_train_nodes=CLIENTS)
    dp = make(inner, 0.0)
    models, clips = start(dp, spec, base, mods=[mod] if mod else [])
    assert len(inner.rounds) == 2 and all(len(r.client_ids) == CLIENTS for r in inner.rounds)
    raw = raw_updates(spec, base)
    norms = np.linalg.norm(raw, axis=1)
    assert norms.min() > 2 * CLIP  # so that every update is clipped
    clipped = raw * np.minimum(1.0, CLIP / norms)[:, None]
    np.testing.assert_allclose(models[0], flat(base) + merge(clipped), rtol=1e-5, atol=1e-6)
    for record, clip in zip(inner.rounds, clips):
        assert max(record.task_vector_norms) <= clip * (1 + 1e-5) and min(record.task_vector_norms) >= clip * (1 - 1e-5)
    if "adaptive" in wrapper:  # every update clipped in round 1: the norm shrinks by exp(−0.2·(1 − 0.5))
        assert clips == pytest.approx([CLIP, CLIP * math.exp(-0.2 * 0.5)])


@pytest.mark.parametrize("wrapper", ["server-fixed", "client-fixed"])
def test_the_noise_is_the_gaussian_mechanisms(server_app, setup, wrapper):
    """σ = z·C/m on every coordinate of the new model, on top of the rule's θ + β·Δ."""
    spec, base = setup
    make, mod = WRAPPERS[wrapper]
    mods = [mod] if mod else []
    noiseless, _ = start(make(FedAvg(min_available_nodes=CLIENTS), 0.0), spec, base, mods, rounds=1)
    np.random.seed(0)  # Flower draws the noise from NumPy's global generator
    noisy, _ = start(make(FedAvg(min_available_nodes=CLIENTS), 2.0), spec, base, mods, rounds=1)
    noise = noisy[0] - noiseless[0]
    assert np.std(noise) == pytest.approx(2.0 * CLIP / CLIENTS, rel=0.05) and abs(np.mean(noise)) < 0.05 * np.std(noise)


def test_the_clipping_mods_wrap_training_only(server_app, setup):
    """A statistics query carries no clipping norm: the mods, around training only, leave it alone."""
    spec, base = setup
    app = client_app(spec.to_flat(), train_mods=[fixedclipping_mod])
    query = Message(
        RecordDict({"arrays": base, "config": ConfigRecord({contract.QUERY: contract.STATISTICS})}),
        dst_node_id=1,
        message_type=MessageType.QUERY,
    )
    answer = app(query, Context(1, 1, {"partition-id": 0}, RecordDict(), {}))
    assert not answer.has_error() and answer.content[contract.METRICS][contract.CLIENT_ID] == 0
