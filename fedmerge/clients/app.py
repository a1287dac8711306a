"""The fedmerge ClientApp: fine-tune the received model on this client's task and reply per the contract.

The same app serves simulation and real deployments. It reads the run's flat config (suite, seed,
``training.*`` client table; see :mod:`fedmerge.config`) and its own row by ``partition-id`` from the
node config; a deployed SuperNode may override its own settings there too
(``--node-config "partition-id=0 num-partitions=2 lr=0.01 steps=200"``).
"""

import json
from collections.abc import Mapping, Sequence
from functools import lru_cache, partial
from typing import NamedTuple

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from fedmerge import contract
from fedmerge.clients.corruption import corrupt
from fedmerge.clients.merging_statistics import requested
from fedmerge.clients.scaffold import ControlVariates, take_control
from fedmerge.clients.settings import client_seed, client_table, corruptions, with_node_overrides, with_proximal_mu
from fedmerge.clients.statistics import estimate_statistics
from fedmerge.clients.trainer import TrainConfig, total_steps, train
from fedmerge.config import unflatten
from fedmerge.clients.packing import answer_packed, is_packed
from fedmerge.errors import FedmergeError
from fedmerge.tasks import Federation, load_suite

ROUND_KEYS = ("num-rounds", "same-compute")
"""Config keys the server adds to each train message: R, and whether K_t is split over the R rounds."""


def round_steps(total: int, server_round: int, num_rounds: int, same_compute: bool) -> tuple[int, int]:
    """(first step, steps) of round r: K_t split evenly over R rounds, or all K_t steps every round."""
    if not same_compute:
        return 0, total
    first = (server_round - 1) * total // num_rounds
    return first, server_round * total // num_rounds - first


def client_device(engine: Mapping) -> str:
    """Where this client trains: the GPU Ray gave it (``engine.client_gpus`` > 0), else the CPU."""
    wants_gpu = float(engine.get("client_gpus", 0) or 0) > 0
    return "cuda" if wants_gpu and torch.cuda.is_available() else "cpu"


def release_gpu_memory() -> None:
    """Hand cached GPU memory back: a Ray worker otherwise keeps it after its client is done."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Run(NamedTuple):
    """What every client of a run shares, made once per process: the nested config, the federation, every
    client's training settings and corruption."""

    config: dict
    fed: Federation
    settings: list[TrainConfig]
    corruptions: list[tuple[str, float]]


@lru_cache(maxsize=4)
def _run(key: str) -> Run:
    config = unflatten(json.loads(key))
    num_clients, seed, training = int(config["clients"]), int(config["seed"]), config.get("training", {})
    fed = load_suite(config["suite"], num_clients, config.get("suite_options", {}), seed)
    return Run(config, fed, client_table(training, num_clients, seed), corruptions(training, num_clients))


def _client(run_config: Mapping, node_config: Mapping):
    """(this run's shared part, this client's id, its task, its training settings); the shared part is made once
    per process and run config, so that a call's cost does not grow with the number of clients."""
    run = _run(json.dumps(dict(run_config), sort_keys=True))
    client_id = int(node_config["partition-id"])
    num_clients = int(run.config["clients"])
    if "num-partitions" in node_config and int(node_config["num-partitions"]) != num_clients:
        raise FedmergeError(
            f"node config says num-partitions={node_config['num-partitions']} but the run has clients={num_clients}."
        )
    return run, client_id, run.fed.tasks[client_id], with_node_overrides(run.settings[client_id], node_config)


def local_training(
    run_config: Mapping, node_config: Mapping, content: RecordDict, state: RecordDict | None = None
) -> RecordDict:
    """Train this client for one round on a train message's arrays (its ``content``); the reply's content.

    The reply carries back the tensors received (the shared ones the clients train) and this client's private
    tensors (from θ0 when they were not sent), as CPU arrays, and the statistics for merging the message's config
    asks for (:func:`fedmerge.clients.merging_statistics.requested`: Fisher merging's, RegMean's), each an
    ArrayRecord. ``state`` is the node's ``Context.state``, where SCAFFOLD's control variates persist across rounds
    (:mod:`fedmerge.clients.scaffold`).
    """
    run, client_id, task, settings = _client(run_config, node_config)
    config, fed = run.config, run.fed
    content, control = take_control(content)
    arrays, round_config = contract.received(content)
    settings = with_proximal_mu(settings, round_config)
    controls = (
        None if control is None else ControlVariates.load(control, round_config, state, client_id, settings.optimizer)
    )
    first, steps = round_steps(
        total_steps(settings, len(task.train)),
        int(round_config["server-round"]),
        int(round_config.get("num-rounds", 1)),
        bool(round_config.get("same-compute", True)),
    )
    received = arrays.to_torch_state_dict()
    model = fed.model_from(received, client_device(config.get("engine", {})))
    try:
        result = train(
            model,
            task,
            fed.loss,
            settings,
            first_step=first,
            num_steps=steps,
            head=task.head,
            correction=None if controls is None else controls.correction(),
        )
        sent_back = {*received, *task.private}
        trained = {name: tensor.cpu() for name, tensor in model.state_dict().items() if name in sent_back}
        statistics = requested(
            model,
            fed,
            task,
            round_config,
            sent_back,
            settings.batch_size,  # Fisher's, RegMean's
            client_seed(int(config["seed"]), client_id) + int(round_config["server-round"]),
        )
    finally:  # out of memory included: the Ray worker must not keep the GPU memory of a finished client
        del model
        release_gpu_memory()
    if controls is not None:
        controls.keep(state, received, trained, result.lr_sum)
    kind, scale = run.corruptions[client_id]
    seed = client_seed(int(config["seed"]), client_id) + int(round_config["server-round"])
    weights = corrupt(trained, received, kind, scale, seed)
    metrics = contract.train_reply_metrics(
        num_examples=result.num_examples,
        num_steps=result.num_steps,
        lr_sum=result.lr_sum,
        train_loss=result.train_loss,
        client_id=client_id,
        **remedy_metrics(settings, controls),
    )
    return RecordDict({contract.ARRAYS: ArrayRecord(weights), contract.METRICS: MetricRecord(metrics), **statistics})


def remedy_metrics(settings: TrainConfig, controls: ControlVariates | None) -> dict[str, float]:
    """What a reply says of the federated remedies its client applied: FedProx's μ, SCAFFOLD's control variates."""
    return {
        **({contract.PROX_MU: settings.prox_mu} if settings.prox_mu else {}),
        **({contract.CONTROL_APPLIED: 1} if controls is not None else {}),
    }


def local_statistics(run_config: Mapping, node_config: Mapping, content: RecordDict) -> RecordDict:
    """Re-estimate the received model's normalisation statistics on this client's training data; the reply's
    content (the statistics, and how many batches they average)."""
    run, client_id, task, settings = _client(run_config, node_config)
    config, fed = run.config, run.fed
    arrays, query = contract.received(content)
    if query.get(contract.QUERY) != contract.STATISTICS:
        raise FedmergeError(
            f"a query message must ask for {contract.QUERY} = {contract.STATISTICS!r}, got "
            f"{query.get(contract.QUERY)!r}."
        )
    received = arrays.to_torch_state_dict()
    names = [name for name in received if name in set(fed.statistics_names)]
    model = fed.model_from(received, client_device(config.get("engine", {})))
    try:
        statistics, batches = estimate_statistics(
            model, task.train, settings.batch_size, task.head, names, settings.seed
        )
    finally:
        del model
        release_gpu_memory()
    metrics = {contract.NUM_BATCHES: batches, contract.CLIENT_ID: client_id}
    return RecordDict({contract.ARRAYS: ArrayRecord(statistics), contract.METRICS: MetricRecord(metrics)})


def client_app(run_config: Mapping | None = None, train_mods: Sequence[Mod] = ()) -> ClientApp:
    """A ClientApp reading ``run_config`` if given (``run_simulation``), else the run's own config: it trains
    (``train`` messages) and re-estimates normalisation statistics (``query`` messages).

    ``train_mods`` wrap the training calls only (Flower's ``@app.train(mods=...)``), e.g. Flower's client-side
    clipping for differential privacy, ``fixedclipping_mod`` or ``adaptiveclipping_mod``: they need one client per
    call (``engine.clients_per_call = 1``) and the reply to carry exactly the tensors received (no private tensors).
    """
    app = ClientApp()

    def answer(work, message: Message, context: Context) -> Message:
        config = context.run_config if run_config is None else run_config
        if is_packed(message.content):  # several clients in one call (simulation, engine.clients_per_call)
            done = answer_packed(
                message.content, lambda client, content: one(work, config, {"partition-id": client}, content)
            )
            return Message(content=done, reply_to=message)
        return Message(content=one(work, config, context.node_config, message.content), reply_to=message)

    def one(work, config: Mapping, node_config: Mapping, content: RecordDict) -> RecordDict:
        try:
            return work(config, node_config, content)
        except Exception as error:  # the server sees only this text: say which client, and what was raised
            who = node_config.get("partition-id", "?")
            raise FedmergeError(f"client {who}: {type(error).__name__}: {error}") from error

    @app.train(mods=list(train_mods))
    def _train(message: Message, context: Context) -> Message:
        return answer(partial(local_training, state=context.state), message, context)

    @app.query()
    def _query(message: Message, context: Context) -> Message:
        return answer(local_statistics, message, context)

    return app


app = client_app()
"""For ``flwr run`` and deployments: ``clientapp = "fedmerge.clients.app:app"``."""
