"""One experiment on a Flower grid: one-shot merging and multi-round federated learning on the same clients.

Runs inside the ServerApp. The one-shot round trains every client once; every strategy then merges those
same replies (choosing λ, and ρ for FedGMA and CCLIP, on the validation splits). Each multi-round run is
the strategy's own ``start()`` from θ0, with the clients splitting their local steps over the rounds.
"""

import math
import threading
import time
from collections.abc import Callable, Sequence

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from torch.utils.data import Dataset, Subset

from fedmerge import contract
from fedmerge.clients.settings import corruptions
from fedmerge.clients.trainer import full_gradient
from fedmerge.devices import resolve_device
from fedmerge.errors import FedmergeError
from fedmerge.merging import METHODS, TaskVector, apply_update
from fedmerge.merging.lora import adapted_layers
from fedmerge.merging.diagnostics import cosine_similarities, dissimilarity, norms
from fedmerge.merging.tensors import gram_matrix
from fedmerge.simulations import evaluation
from fedmerge.simulations.spec import Spec
from fedmerge.simulations.watched_grid import RunStopped, WatchedGrid
from fedmerge.strategies.arrays import RecordTensors
from fedmerge.tasks import Federation, load_suite

Progress = Callable[[str], None]
ZETA2_EXAMPLES = 10_000
"""At most this many training examples per task go into the ζ² diagnostic."""


class Experiment:
    """Everything one spec asks for, run on ``grid``; :meth:`run` returns the results as plain data.

    :meth:`merge_one_shot` is the part after the one-shot round, on given replies: with ``grid`` None it is
    all that can run (``fedmerge evaluate``).

    ``progress`` is called with a short message after each client's reply, merge and round; setting
    ``stop`` ends the run promptly (:class:`~fedmerge.simulations.watched_grid.RunStopped`).
    """

    def __init__(self, spec: Spec, grid: Grid | None, progress: Progress | None = None, timeout: float = 3600.0,
                 stop: threading.Event | None = None) -> None:
        self.spec = spec
        self.progress = progress or (lambda message: None)
        self.stop = stop or threading.Event()
        self.grid = None if grid is None else WatchedGrid(grid, self.stop, on_reply=self._client_done)
        self.timeout = timeout
        self.timings: dict[str, float] = {}
        self.device: torch.device | None = None  # the server's: resolved when the work starts
        self.lora_scaling = 1.0  # s = α/r of the suite's LoRA adapters, for server.lora = "dense"

    def run(self) -> dict:
        spec = self.spec
        start = time.perf_counter()
        fed = load_suite(spec.suite, spec.clients, spec.suite_options, spec.seed)
        travel = fed.trained_names  # only what trains travels, and with exact LoRA merging the adapted base weights
        if spec.server["lora"] != "factors":
            weights, self.lora_scaling = _exact_lora(fed, spec.suite, spec.server["lora"])
            travel = [name for name in fed.pretrained if name in {*travel, *weights}]
        base = ArrayRecord({name: fed.pretrained[name] for name in travel})
        self.device = resolve_device(spec.engine["server_device"], "engine.server_device")
        self.timings["suite"] = time.perf_counter() - start

        replies = self._one_shot_replies(base)
        results = self.merge_one_shot(fed, base, replies)
        own_test = _own(fed, results["clients"], "test")
        for rounds in sorted(r for r in spec.rounds if r > 1):
            for name in spec.strategies:
                started = time.perf_counter()
                run, results["models"][f"{name}-r{rounds}"] = self._multi_round(fed, name, base, rounds, own_test)
                results["runs"].append(run)
                self.timings[f"{name}/{rounds}"] = time.perf_counter() - started
        results["timings"] = {k: round(v, 3) for k, v in self.timings.items()}
        return results

    def merge_one_shot(self, fed: Federation, base: ArrayRecord, replies: Sequence[Message],
                       settings: Sequence[dict] | None = None) -> dict:
        """Everything after the one-shot round, on the given training ``replies`` (client-id order) from θ0
        ``base``: each client's own val/test figures, the diagnostics, θ0's test figures, and, if ``spec.rounds``
        holds 1, every strategy's merge of those same replies with λ (and ρ) chosen on validation.

        No Grid is needed (``fedmerge evaluate`` builds the replies from checkpoints). ``settings`` describes
        each client in the results (default: its row of the spec's training table). Returns the results as
        plain data, ``runs`` holding the one-shot runs and ``models`` their merged models.
        """
        spec = self.spec
        if self.device is None:
            self.device = resolve_device(spec.engine["server_device"], "engine.server_device")
        clients = self._clients(fed, replies, settings)
        own_val, own_test = _own(fed, clients, "val"), _own(fed, clients, "test")
        optimum = fed.optimum()
        results = {
            "suite": {
                "name": fed.suite, "options": fed.options, "metric": fed.metric, "tasks": [t.name for t in fed.tasks],
                **({"optimum": {"theta": optimum["theta"].tolist(), "tasks": [c.tolist() for c in optimum["tasks"]]}}
                   if optimum is not None else {}),
            },
            "pretrained": evaluation.evaluate(fed, base, "test", own_test, self.device),
            "clients": clients,
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
        """The spec's strategy ``name``, with the suite's LoRA scaling."""
        return self.spec.build_strategy(name, lora_scaling=self.lora_scaling, **overrides)

    def _one_shot_replies(self, base: ArrayRecord) -> list[Message]:
        started = time.perf_counter()
        sender = self._strategy("fedavg")
        messages = sender.configure_train(1, base, self._round_config(1), self.grid)
        replies = list(self.grid.send_and_receive(messages, timeout=self.timeout))
        replies.sort(key=lambda r: r.content[contract.METRICS][contract.CLIENT_ID])
        self.timings["client_training"] = time.perf_counter() - started
        return replies

    def _client_done(self, reply: Message) -> None:
        metrics = reply.content[contract.METRICS]
        who = f"client {metrics[contract.CLIENT_ID]}" if contract.CLIENT_ID in metrics else f"node {reply.metadata.src_node_id}"
        self.progress(f"{who} trained ({metrics.get(contract.NUM_STEPS, '?')} steps)")

    def _clients(self, fed: Federation, replies: Sequence[Message], settings: Sequence[dict] | None = None) -> list[dict]:
        if settings is None:
            configs = self.spec.client_configs()
            corrupted = corruptions(self.spec.training, self.spec.clients)
            settings = [{**vars(configs[t]), "corruption": corrupted[t][0], "corruption_scale": corrupted[t][1]}
                        for t in range(self.spec.clients)]
        clients = []
        for reply in replies:
            metrics = dict(reply.content[contract.METRICS])
            t = int(metrics[contract.CLIENT_ID])
            own_model = fed.model_from(evaluation.state_dict(reply.content[contract.ARRAYS]), self.device)
            clients.append({
                "id": t,
                "task": fed.tasks[t].name,
                "settings": settings[t],
                "reply": metrics,
                "own": {split: fed.evaluate(own_model, fed.tasks[t], split) for split in ("val", "test")},
            })
        return clients

    def _diagnostics(self, fed: Federation, base: ArrayRecord, replies: Sequence[Message]) -> dict:
        """Task-vector norms and cosines, and ζ² from every task's gradient at θ0 (over its whole training set,
        or a seeded sample of :data:`ZETA2_EXAMPLES` where it is larger: the server reads every task here)."""
        started = time.perf_counter()
        base_tensors = RecordTensors(base)
        names = list(base)
        task_vectors = [TaskVector(RecordTensors(r.content[contract.ARRAYS]), base_tensors) for r in replies]
        gram = gram_matrix(task_vectors, names)
        model = fed.model_from(evaluation.state_dict(base), self.device)  # θ0: the suite's, or a given base
        gradients = [full_gradient(model, _sample(task.train, ZETA2_EXAMPLES, self.spec.seed), fed.loss, task.head,
                                   fed.eval_batch_size) for task in fed.tasks]
        p = [1.0 / len(gradients)] * len(gradients)
        self.task_vector_norms = norms(gram).tolist()
        diagnostics = {
            "task_vector_norms": self.task_vector_norms,
            "cosine_similarity": cosine_similarities(gram).tolist(),
            "zeta2": dissimilarity(gram_matrix(gradients, list(gradients[0])), p),
        }
        self.timings["diagnostics"] = time.perf_counter() - started
        return diagnostics

    def _one_shot(self, fed, name, base, replies, own_val, own_test) -> tuple[dict, dict]:
        """Merge the one-shot replies, choosing λ (and ρ) on validation; test figures and model at the choice."""
        spec, num_clients = self.spec, len(replies)
        method, candidates = METHODS[name], [{}]
        if spec.select and method.tuned is not None:
            candidates = [{method.tuned: rho} for rho in method.grid(self.task_vector_norms)]
        scalings = evaluation.SCALING_GRID if spec.select else (spec.server["server_lr"] / num_clients,)
        selection, best = [], None
        for options in candidates:
            strategy = self._strategy(name, server_lr=1.0, **options)
            merged, _ = strategy.merge_replies(1, replies, base)
            if merged is None:
                reasons = "; ".join(e["reason"] for e in strategy.rounds[-1].excluded)
                raise FedmergeError(f"{name}: no client's update could be merged ({reasons}).")
            for scaling in scalings:
                self._check_stopped()
                arrays = _scaled(base, merged, scaling * num_clients)
                val = evaluation.evaluate(fed, arrays, "val", own_val, self.device)
                entry = {"scaling": scaling, **options, **({"rho": options[method.tuned]} if options else {}),
                         "val_score": evaluation.score(val)}
                selection.append(entry)
                if best is None or entry["val_score"] > best[0]["val_score"]:
                    best = (entry, arrays, strategy.rounds[-1])
        chosen, arrays, record = best
        test = evaluation.evaluate(fed, arrays, "test", own_test, self.device)
        self.progress(f"{name}: one-shot merged (λ={chosen['scaling']:g})")
        return {
            "strategy": name,
            "rounds": 1,
            "selected": {**chosen, "server_lr": chosen["scaling"] * num_clients},
            "selection": selection,
            "history": [{"round": 1, **test, "aggregation": record.to_dict()}],
            "final": test,
        }, fed.complete(evaluation.state_dict(arrays))

    # -- multi-round federated learning -------------------------------------------------------------
    def _multi_round(self, fed, name, base, rounds, own_test) -> tuple[dict, dict]:
        """R rounds of the strategy from θ0; per-round test figures and the final model."""
        strategy = self._strategy(name)
        history = []

        def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            self._check_stopped()
            summary = evaluation.evaluate(fed, arrays, "test", own_test, self.device)
            history.append({"round": server_round, **summary})
            if server_round:
                self.progress(f"{name}: round {server_round}/{rounds}")
            return MetricRecord({k: v for k, v in summary.items() if isinstance(v, float)})

        result = strategy.start(
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
        server_lr = self.spec.server["server_lr"]
        return {
            "strategy": name,
            "rounds": rounds,
            "selected": {"server_lr": server_lr},  # λ means nothing over several rounds
            "history": history,
            "final": history[-1],
        }, fed.complete(evaluation.state_dict(result.arrays))

    def _check_stopped(self) -> None:
        if self.stop.is_set():
            raise RunStopped("the run was stopped")

    def _round_config(self, rounds: int) -> ConfigRecord:
        return ConfigRecord({"num-rounds": rounds, "same-compute": self.spec.same_compute})


def _own(fed: Federation, clients: Sequence[dict], split: str) -> list[float] | None:
    """Each client's own accuracy on ``split`` (what normalised accuracy divides by); None for loss suites."""
    return [c["own"][split].get("accuracy") for c in clients] if fed.metric == "accuracy" else None


def _sample(data: Dataset, size: int, seed: int) -> Dataset:
    """``data`` itself, or a seeded random subset of ``size`` examples of it."""
    if len(data) <= size:
        return data
    return Subset(data, torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:size].tolist())


def _scaled(base: ArrayRecord, merged: ArrayRecord, server_lr: float) -> ArrayRecord:
    """θ0 + β·Δ from θ0 and the β = 1 result θ0 + Δ."""
    base_tensors, delta = RecordTensors(base), TaskVector(RecordTensors(merged), RecordTensors(base))
    return ArrayRecord({name: apply_update(base_tensors[name], delta[name], server_lr) for name in base})


def _exact_lora(fed: Federation, suite: str, mode: str) -> tuple[list[str], float]:
    """For server.lora = "stack" or "dense": the adapted layers' base weights (they travel too) and s = α/r."""
    layers = adapted_layers(list(fed.pretrained))
    config = getattr(fed.model_fn(), "peft_config", {}).get("default")
    if not layers or config is None:
        raise FedmergeError(f"server.lora = {mode!r} merges LoRA adapters, but suite {suite!r}'s model has none; give it "
                            "adapters (causal-lm: suite_options.lora_r) or use server.lora = \"factors\".")
    if config.rank_pattern or config.alpha_pattern:
        raise FedmergeError(f"server.lora = {mode!r} takes one α/r for every adapter; the suite's LoRA config sets "
                            "rank_pattern or alpha_pattern.")
    return [layer.weight for layer in layers], config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)
