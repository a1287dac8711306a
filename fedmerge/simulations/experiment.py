"""One experiment on a Flower grid: one-shot merging and multi-round federated learning on the same clients.

Runs inside the ServerApp. The one-shot round trains every client once; every strategy then merges those
same replies (choosing its own λ, and ρ or the density where the spec leaves them open, on the validation
splits). Each multi-round run is the strategy's own ``start()`` from θ0, with the clients splitting their local
steps over the rounds.

Rules merge the suite's shared tensors only (:attr:`Federation.shared_names`): each client's private tensors
(its head) stay as it trained them, and normalisation statistics are handled as ``server.statistics`` says
(re-estimated by the clients for every merged model that is scored, by default).
"""

import dataclasses
import math
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.serverapp import Grid
from torch.utils.data import Dataset, Subset

from fedmerge import contract
from fedmerge.clients.settings import corruptions
from fedmerge.clients.trainer import full_gradient
from fedmerge.devices import resolve_device
from fedmerge.errors import FedmergeError
from fedmerge.merging import METHODS, TaskVector, apply_update
from fedmerge.merging.lora import adapted_layers, has_adapters
from fedmerge.merging.diagnostics import cosine_similarities, dissimilarity
from fedmerge.merging.scale import search_grid
from fedmerge.merging.tensors import gram_matrix, squared_norms
from fedmerge.simulations import evaluation
from fedmerge.simulations.spec import Spec
from fedmerge.simulations.statistics import local_reestimate
from fedmerge.simulations.watched_grid import RunStopped, WatchedGrid, failure_reason
from fedmerge.strategies.arrays import RecordTensors, to_array
from fedmerge.strategies.roles import subset
from fedmerge.strategies.statistics import reestimate
from fedmerge.tasks import Federation, load_suite

Progress = Callable[[str], None]
ZETA2_EXAMPLES = 10_000
"""At most this many training examples per task go into the ζ² diagnostic."""


class Experiment:
    """Everything one spec asks for, run on ``grid``; :meth:`run` returns the results as plain data.

    :meth:`merge_one_shot` is the part after the one-shot round, on given replies: with ``grid`` None it is
    all that can run (``fedmerge evaluate``).

    ``progress`` is called with a short message after each client's reply, merge and round; setting
    ``stop`` ends the run promptly (:class:`~fedmerge.simulations.watched_grid.RunStopped`). ``on_partial(results,
    pending)`` is called with the results so far after the one-shot merges and after each multi-round run but the
    last (``pending`` names the runs still to come), so that they can be written before the rest runs; it may take
    the final models out of ``results["models"]``.
    """

    def __init__(
        self,
        spec: Spec,
        grid: Grid | None,
        progress: Progress | None = None,
        stop: threading.Event | None = None,
        on_partial: Callable[[dict, list[str]], None] | None = None,
    ) -> None:
        self.spec = spec
        self.progress = progress or (lambda message: None)
        self.on_partial = on_partial or (lambda results, pending: None)
        self.stop = stop or threading.Event()
        self.grid = (
            None
            if grid is None
            else WatchedGrid(
                grid,
                self.stop,
                on_reply=self._client_done,
                max_failed_share=spec.server["max_failed_share"],
                clients_per_call=spec.engine["clients_per_call"],
                num_clients=spec.clients,
            )
        )
        self.timeout = spec.engine["stall_timeout"]  # seconds without any reply (a round may take longer)
        self.failed: list[dict] = []  # clients whose one-shot round failed (within server.max_failed_share)
        self.timings: dict[str, float] = {}
        self.device: torch.device | None = None  # the server's: resolved when the work starts
        self.lora_scaling = 1.0  # s = α/r of the suite's LoRA adapters, for server.lora = "dense"
        self.fed: Federation | None = None
        self.clients_by_node: dict[int, int] = {}  # learnt from the one-shot replies

    def run(self) -> dict:
        spec = self.spec
        start = time.perf_counter()
        fed = self.fed = load_suite(spec.suite, spec.clients, spec.suite_options, spec.seed)
        travel, self.lora_scaling = travelling(fed, spec)
        base = ArrayRecord({name: fed.pretrained[name] for name in travel})
        self.device = resolve_device(spec.engine["server_device"], "engine.server_device")
        self.timings["suite"] = time.perf_counter() - start

        replies = self._one_shot_replies(base)
        results = self.merge_one_shot(fed, base, replies)
        own_test = _own(fed, results["clients"], "test")
        pending = [
            f"{name}-r{rounds}" for rounds in sorted(r for r in spec.rounds if r > 1) for name in spec.strategies
        ]
        for key in list(pending):
            if results["runs"]:
                results["timings"] = {k: round(v, 3) for k, v in self.timings.items()}
                self.on_partial(results, list(pending))
            name, rounds = key.rsplit("-r", 1)
            started = time.perf_counter()
            run, results["models"][key] = self._multi_round(fed, name, base, int(rounds), own_test)
            results["runs"].append(run)
            pending.remove(key)
            self.timings[f"{name}/{rounds}"] = time.perf_counter() - started
        results["timings"] = {k: round(v, 3) for k, v in self.timings.items()}
        return results

    def merge_one_shot(
        self, fed: Federation, base: ArrayRecord, replies: Sequence[Message], settings: Sequence[dict] | None = None
    ) -> dict:
        """Everything after the one-shot round, on the given training ``replies`` (client-id order) from θ0
        ``base``: each client's own val/test figures, the diagnostics, θ0's test figures, and, if ``spec.rounds``
        holds 1, every strategy's merge of those same replies with λ (and ρ) chosen on validation.

        No Grid is needed (``fedmerge evaluate`` builds the replies from checkpoints). ``settings`` describes
        each client in the results (default: its row of the spec's training table). Returns the results as
        plain data, ``runs`` holding the one-shot runs and ``models`` their merged models.
        """
        spec = self.spec
        self.fed = fed
        if self.device is None:
            self.device = resolve_device(spec.engine["server_device"], "engine.server_device")
        self.clients_by_node = {
            r.metadata.src_node_id: int(r.content[contract.METRICS][contract.CLIENT_ID]) for r in replies
        }
        clients = self._clients(fed, replies, settings)
        own_val, own_test = _own(fed, clients, "val"), _own(fed, clients, "test")
        optimum = fed.optimum()
        pretrained = evaluation.evaluate(fed, base, "test", own_test, self.device)
        for client, theta0 in zip(clients, (pretrained["tasks"][c["id"]] for c in clients)):
            own = client["own"]["test"].get("accuracy")
            if own is not None and theta0.get("accuracy") is not None:
                client["own_above_theta0"] = own > theta0["accuracy"]
        results = {
            "suite": {
                "name": fed.suite,
                "options": fed.options,
                "metric": fed.metric,
                "tasks": [t.name for t in fed.tasks],
                **(
                    {"optimum": {"theta": optimum["theta"].tolist(), "tasks": [c.tolist() for c in optimum["tasks"]]}}
                    if optimum is not None
                    else {}
                ),
            },
            "tensors": {
                "shared": len(fed.shared_names),
                "private": len(fed.private_names),
                "statistics": len(fed.statistics_names),
            },
            "statistics": spec.server["statistics"] if fed.statistics_names else None,
            "lora": spec.server["lora"] if has_adapters(list(base)) else None,
            "pretrained": pretrained,
            "clients": clients,
            **({"failed": self.failed} if self.failed else {}),
            "diagnostics": self._diagnostics(fed, base, replies),
            "runs": [],
            "models": {},
        }
        for name in spec.strategies:
            if 1 in spec.rounds:
                started = time.perf_counter()
                run, results["models"][f"{name}-r1"] = self._one_shot(fed, name, base, replies, own_val, own_test)
                results["runs"].append(run)
                self.timings[f"{name}/1"] = time.perf_counter() - started
        return results

    # -- the one-shot round -------------------------------------------------------------------------
    def _strategy(self, name: str, **overrides):
        """The spec's strategy ``name``, with the suite's LoRA scaling and tensor roles, knowing the nodes' clients."""
        strategy = self.spec.build_strategy(
            name,
            lora_scaling=self.lora_scaling,
            private=self.fed.private_names,
            statistics=self.fed.statistics_names,
            **overrides,
        )
        strategy.clients_by_node.update(self.clients_by_node)
        return strategy

    def _one_shot_replies(self, base: ArrayRecord) -> list[Message]:
        started = time.perf_counter()
        sender = self._strategy("fedavg")
        messages = sender.configure_train(1, base, self._one_shot_config(), self.grid)
        answers = list(self.grid.send_and_receive(messages, timeout=self.timeout))
        self.failed = [
            {"node_id": r.metadata.src_node_id, "reason": failure_reason(r)} for r in answers if r.has_error()
        ]
        replies = sorted(
            (r for r in answers if not r.has_error()), key=lambda r: r.content[contract.METRICS][contract.CLIENT_ID]
        )
        self.timings["client_training"] = time.perf_counter() - started
        return replies

    def _one_shot_config(self) -> ConfigRecord:
        """The one-shot round's config, asking the clients for the statistics every strategy merging its replies needs
        beside their weights (Fisher merging's, RegMean's)."""
        config = self._round_config(1)
        for name in self.spec.strategies if 1 in self.spec.rounds else ():
            config.update(self._strategy(name).statistics_request())
        return config

    def _with_statistics(self, arrays: ArrayRecord, strategy) -> ArrayRecord:
        """``arrays`` with normalisation statistics as ``server.statistics`` says: re-estimated by the clients for
        these weights (``reestimate``; in this process when there is no grid, with the same code), else as the
        strategy left them (``average``: the clients' mean; ``theta0``: θ0's)."""
        names = self.fed.statistics_names
        if not names or self.spec.server["statistics"] != "reestimate":
            return arrays
        if self.grid is None:
            return local_reestimate(self.fed, arrays, names, self.spec.client_configs(), self.device)
        return reestimate(self.grid, strategy, arrays, names, self.clients_by_node, self.timeout)

    def _client_done(self, reply: Message) -> None:
        if reply.metadata.message_type != MessageType.TRAIN:
            return  # a statistics query: not a unit of the progress display
        if reply.has_error():
            self.progress(f"node {reply.metadata.src_node_id} failed (tolerated): {failure_reason(reply)}")
            return
        metrics = reply.content[contract.METRICS]
        who = (
            f"client {metrics[contract.CLIENT_ID]}"
            if contract.CLIENT_ID in metrics
            else f"node {reply.metadata.src_node_id}"
        )
        self.progress(f"{who} trained ({metrics.get(contract.NUM_STEPS, '?')} steps)")

    def _clients(
        self, fed: Federation, replies: Sequence[Message], settings: Sequence[dict] | None = None
    ) -> list[dict]:
        if settings is None:
            configs = self.spec.client_configs()
            corrupted = corruptions(self.spec.training, self.spec.clients)
            settings = [
                {**vars(configs[t]), "corruption": corrupted[t][0], "corruption_scale": corrupted[t][1]}
                for t in range(self.spec.clients)
            ]
        clients = []
        for reply in replies:
            metrics = dict(reply.content[contract.METRICS])
            t = int(metrics[contract.CLIENT_ID])
            own_model = fed.model_from(evaluation.state_dict(reply.content[contract.ARRAYS]), self.device)
            clients.append(
                {
                    "id": t,
                    "task": fed.tasks[t].name,
                    "settings": settings[t],
                    "reply": metrics,
                    "own": {split: fed.evaluate(own_model, fed.tasks[t], split) for split in ("val", "test")},
                }
            )
        return clients

    def _diagnostics(self, fed: Federation, base: ArrayRecord, replies: Sequence[Message]) -> dict:
        """Every replying client's task-vector norm; the pairwise cosines and ζ² (from the gradient at θ0 of each task,
        over its whole training set or a seeded sample of :data:`ZETA2_EXAMPLES`: the server reads those tasks here)
        over the replying clients, or a seeded sample of ``spec.diagnostics_clients`` of them (their ids in
        ``sample``), so that their cost and size do not grow with the number of clients. Merged tensors only."""
        started = time.perf_counter()
        names = self._strategy("fedavg").roles.merged(base)  # the merged tensors only: no head, no statistics
        base_tensors = RecordTensors(subset(base, names))
        task_vectors = [
            TaskVector(RecordTensors(subset(r.content[contract.ARRAYS], names)), base_tensors) for r in replies
        ]
        self.task_vector_norms = np.sqrt(np.maximum(squared_norms(task_vectors, names), 0.0)).tolist()
        cap = self.spec.diagnostics_clients
        picked = (
            sorted(np.random.default_rng([self.spec.seed, 11]).choice(len(replies), cap, replace=False).tolist())
            if cap and len(replies) > cap
            else list(range(len(replies)))
        )
        gram = gram_matrix([task_vectors[i] for i in picked], names)
        model = fed.model_from(evaluation.state_dict(base), self.device)  # θ0: the suite's, or a given base
        tasks = [fed.tasks[int(replies[i].content[contract.METRICS][contract.CLIENT_ID])] for i in picked]
        gradients = [
            full_gradient(
                model, _sample(task.train, ZETA2_EXAMPLES, self.spec.seed), fed.loss, task.head, fed.eval_batch_size
            )
            for task in tasks
        ]
        diagnostics = {
            "tensors": len(names),
            "task_vector_norms": self.task_vector_norms,
            "cosine_similarity": cosine_similarities(gram).tolist(),
            "zeta2": dissimilarity(
                gram_matrix(gradients, [n for n in gradients[0] if n in set(names)]),
                [1.0 / len(gradients)] * len(gradients),
            ),
            **(
                {"sample": [int(replies[i].content[contract.METRICS][contract.CLIENT_ID]) for i in picked]}
                if len(picked) < len(replies)
                else {}
            ),
        }
        self.timings["diagnostics"] = time.perf_counter() - started
        return diagnostics

    def _one_shot(self, fed, name, base, replies, own_val, own_test) -> tuple[dict, dict]:
        """Merge the one-shot replies, choosing the method's own λ (and its tuned parameter, unless the spec gives
        it) on validation; test figures and model at the choice. A candidate whose outputs are not finite is never
        chosen over one whose are."""
        spec, num_clients = self.spec, len(replies)
        method = METHODS[name]
        searched = spec.select and method.tuned is not None and method.tuned not in spec.strategy.get(name, {})
        if searched:
            candidates = [{method.tuned: value} for value in method.grid(self.task_vector_norms)]
        else:  # the value given, or the method's default
            candidates = [{method.tuned: spec.strategy_options(name)[method.tuned]} if method.tuned else {}]
        beta = spec.server["server_lr"]
        searched_scale = spec.select and not method.own_step  # FedExP's own step is its point: β as given
        scales = (
            search_grid(num_clients, method.scale) if searched_scale else [(method.scaling(beta, num_clients), beta)]
        )
        if method.no_lambda:
            scales = [(None, server_lr) for _, server_lr in scales]  # no λ of its own: β alone
        selection, best = [], None
        for options in candidates:
            strategy = self._strategy(name, server_lr=1.0, **options)
            merged, _ = strategy.merge_replies(1, replies, base)
            if merged is None:
                reasons = "; ".join(e["reason"] for e in strategy.rounds[-1].excluded)
                raise FedmergeError(f"{name}: no client's update could be merged ({reasons}).")
            shared = set(strategy.roles.merged(base))
            for scaling, server_lr in scales:
                self._check_stopped()
                arrays = self._with_statistics(_scaled(base, merged, server_lr, shared), strategy)
                val = evaluation.evaluate(fed, arrays, "val", own_val, self.device)
                entry = {"scaling": scaling, "server_lr": server_lr, **options, "val_score": evaluation.score(val)}
                if val.get("diverged"):
                    entry["diverged"] = True
                selection.append(entry)
                if best is None or entry["val_score"] > best[0]["val_score"]:
                    best = (entry, arrays, dataclasses.replace(strategy.rounds[-1], server_lr=server_lr))
        chosen, arrays, record = best
        test = evaluation.evaluate(fed, arrays, "test", own_test, self.device)
        diverged = sum(1 for entry in selection if entry.get("diverged"))
        self.progress(
            f"{name}: one-shot merged (β={chosen['server_lr']:g})"
            + (f"; {diverged} of {len(selection)} candidates gave non-finite outputs" if diverged else "")
        )
        return {
            "strategy": name,
            "rounds": 1,
            "selected": {**chosen, "scale": method.scale, **({"tuned": method.tuned} if method.tuned else {})},
            "searched": {
                **({"server_lr": [b for _, b in scales]} if spec.select else {}),
                **({"scaling": [s for s, _ in scales]} if spec.select and not method.no_lambda else {}),
                **({method.tuned: [c[method.tuned] for c in candidates]} if searched else {}),
            },
            "selection": selection,
            "history": [{"round": 1, **test, "aggregation": record.to_dict()}],
            "final": test,
        }, fed.complete(evaluation.state_dict(arrays))

    # -- multi-round federated learning -------------------------------------------------------------
    def _multi_round(self, fed, name, base, rounds, own_test) -> tuple[dict, dict]:
        """R rounds of the strategy from θ0; per-round test figures and the final model (its statistics handled
        as every scored model's)."""
        strategy = self._strategy(name)
        history, scored, clock = [], {}, [time.perf_counter()]

        def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            seconds = time.perf_counter() - clock[0]  # this round's training and merge (not the evaluation)
            self._check_stopped()
            record = strategy.record_for(server_round)
            if server_round and (record is None or not record.client_ids):
                reasons = "; ".join(e["reason"] for e in record.excluded) if record else "no reply"
                raise FedmergeError(
                    f"{name}, round {server_round}/{rounds}: no client's update could be merged "
                    f"({reasons}); a federation without clients cannot go on."
                )
            if server_round:
                arrays = self._with_statistics(arrays, strategy)
            scored["arrays"] = arrays
            summary = evaluation.evaluate(fed, arrays, "test", own_test, self.device)
            history.append(
                {"round": server_round, **({"seconds": round(seconds, 4)} if server_round else {}), **summary}
            )
            if server_round:
                self.progress(f"{name}: round {server_round}/{rounds}")
            clock[0] = time.perf_counter()
            return MetricRecord({k: v for k, v in summary.items() if isinstance(v, float) and math.isfinite(v)})

        strategy.start(
            grid=self.grid,
            initial_arrays=base,
            num_rounds=rounds,
            timeout=self.timeout,
            train_config=self._round_config(rounds),
            evaluate_fn=evaluate_fn,
        )
        for entry in history[1:]:
            record = strategy.record_for(entry["round"])
            if record is not None:
                entry["aggregation"] = record.to_dict()
        tuned = METHODS[name].tuned
        return {
            "strategy": name,
            "rounds": rounds,
            "selected": {
                "server_lr": self.spec.server["server_lr"],  # λ means nothing over several rounds
                **({"tuned": tuned, tuned: self.spec.strategy_options(name)[tuned]} if tuned else {}),
            },
            "history": history,
            "final": history[-1],
        }, fed.complete(evaluation.state_dict(scored["arrays"]))

    def _check_stopped(self) -> None:
        if self.stop.is_set():
            raise RunStopped("the run was stopped")

    def _round_config(self, rounds: int) -> ConfigRecord:
        return ConfigRecord({"num-rounds": rounds, "same-compute": self.spec.same_compute})


def _own(fed: Federation, clients: Sequence[dict], split: str) -> list[float | None] | None:
    """Each task's client's own accuracy on ``split`` (what normalised accuracy divides by; None for a client whose
    one-shot round failed); None for loss suites."""
    if fed.metric != "accuracy":
        return None
    own = [None] * len(fed.tasks)
    for client in clients:
        own[client["id"]] = client["own"][split].get("accuracy")
    return own


def _sample(data: Dataset, size: int, seed: int) -> Dataset:
    """``data`` itself, or a seeded random subset of ``size`` examples of it."""
    if len(data) <= size:
        return data
    return Subset(data, torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:size].tolist())


def _scaled(base: ArrayRecord, merged: ArrayRecord, server_lr: float, shared: set[str]) -> ArrayRecord:
    """θ0 + β·Δ on the ``shared`` tensors from θ0 and the β = 1 result θ0 + Δ; the others (private tensors,
    statistics) as the merge left them."""
    base_tensors, delta = RecordTensors(base), TaskVector(RecordTensors(merged), RecordTensors(base))
    return ArrayRecord(
        {
            name: to_array(apply_update(base_tensors[name], delta[name], server_lr)) if name in shared else merged[name]
            for name in base
        }
    )


def travelling(fed: Federation, spec: Spec) -> tuple[list[str], float]:
    """What travels between server and clients (the trained tensors; with server.lora = "stack" or "dense" on a
    model with LoRA adapters, their layers' base weights too, which the merge folds the update into) and s = α/r.
    Raises :class:`FedmergeError` when the adapters cannot be merged so (checked before any client trains)."""
    mode = spec.server["lora"]
    layers = adapted_layers(list(fed.pretrained), only_factors=True) if mode != "factors" else []
    if not layers:
        return fed.trained_names, 1.0
    config = getattr(fed.model_fn(), "peft_config", {}).get("default")
    if config is None:
        raise FedmergeError(
            f"server.lora = {mode!r}: suite {spec.suite!r}'s model has LoRA-named tensors but no peft "
            'config to read α/r from; build the model with peft, or use server.lora = "factors".'
        )
    if config.rank_pattern or config.alpha_pattern:
        raise FedmergeError(
            f"server.lora = {mode!r} takes one α/r for every adapter; the suite's LoRA config sets "
            'rank_pattern or alpha_pattern: use server.lora = "factors" or one rank and alpha.'
        )
    folded = {layer.weight for layer in layers}
    scaling = config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)
    return [name for name in fed.pretrained if name in {*fed.trained_names, *folded}], scaling
