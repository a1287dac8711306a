"""The machinery every fedmerge strategy shares, on top of Flower's FedAvg.

Flower's FedAvg gives sampling, message construction and federated evaluation. This class replaces its
``aggregate_train``: check the replies against the global model sent in ``configure_train``, read them as
task vectors τ_t = θ_t − θ, run the strategy's merging rule tensor by tensor, and apply θ + β·Δ.
"""

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from logging import INFO

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log as flwr_log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from fedmerge import contract
from fedmerge.devices import resolve_device
from fedmerge.errors import FedmergeError
from fedmerge.merging import OnDevice, Rule, TaskVector, apply_update, chi_square, effective_weights, iter_merge
from fedmerge.merging.lora import DenseUpdate, adapted_layers, fold, stacked_delta
from fedmerge.merging.method import Method
from fedmerge.merging.rules.fednova import DEFAULT_NORMALIZE_BY
from fedmerge.strategies.arrays import RecordTensors, to_array
from fedmerge.strategies.replies import ClientReply, Exclusion, check_replies, non_finite_tensor
from fedmerge.strategies.roles import STATISTICS_RULES, TensorRoles, assemble, subset
from fedmerge.strategies.round_record import RoundRecord
from fedmerge.strategies.server_optimizer import ServerOptimizer, State

log = logging.getLogger("fedmerge")
"""Warnings about left-out clients; the summary goes through Flower's logger, which has a handler."""

WEIGHTINGS = ("uniform", "num-examples")
A_T_KEYS = {"steps": contract.NUM_STEPS, "lr-sum": contract.LR_SUM}
"""FedNova's normalisers → the reply metric that gives a_t."""
LORA_MODES = ("factors", "stack", "dense")

MetricsAggregator = Callable[[list[RecordDict], str], MetricRecord]


class MergingStrategy(FlowerFedAvg):
    """Base of fedmerge's strategies: a Flower strategy whose aggregation is a fedmerge merging rule.

    Parameters
    ----------
    server_lr : float (default 1.0)
        β in θ ← θ + β·Δ, Δ being the rule's mean-scale update. Task Arithmetic's λ over T clients is
        β = λ·T (:func:`fedmerge.merging.scaling_to_server_lr`).
    weighting : "uniform" | "num-examples" (default "uniform")
        p_t: equal weights (Task Arithmetic) or proportional to each reply's ``weighted_by_key`` metric.
    fraction_evaluate : float (default 0.0)
        As in Flower's FedAvg, but off by default: the client contract (and fedmerge's ClientApp) only
        trains. Set it above 0 for a ClientApp that answers ``evaluate`` messages.
    weighted_by_key : str (default "num-examples")
        The metric giving p_t when ``weighting="num-examples"``; also passed to the metric aggregators.
    train_metrics_aggr_fn : callable or None (default None)
        ``(list[RecordDict], weighted_by_key) -> MetricRecord`` over the accepted replies; its output is
        added to the round's metrics (its keys win). None: the round's per-client metrics only.
    device : "cpu" | "cuda" | "cuda:N" | "auto" (default "cpu")
        Where the rule runs. Replies arrive and the new model leaves as CPU arrays (Flower's wire); with a
        GPU each tensor is copied there, merged, and copied back.
    lora : "factors" | "stack" | "dense" (default "factors")
        How LoRA adapters (peft's ``….lora_A/B.<adapter>.weight``, and ``….lora_embedding_A/B.<adapter>`` whose ΔW
        is transposed) are merged: as any other tensors, A and B apart (cheap; not the merge of the clients' B·A);
        ``stack``: Σ_t c_t·s·B_t A_t from the stacked factors, exact for the weighted-sum rules (FedAvg, FedNova by
        steps or Σ lr); or ``dense``: the rule over each layer's dense update s·(B_t A_t − B A), exact for every
        rule; both refuse other LoRA tensors (DoRA's magnitudes, ...). Both fold the result into
        ``….base_layer.weight`` (which the arrays must then carry), B restarting at 0 (:mod:`fedmerge.merging.lora`).
    lora_scaling : float (default 1.0)
        s = α/r of the adapters, for ``lora="dense"``.
    private : mapping or None (default None)
        Tensor name → the client id (a reply's ``client-id``) that alone trains it, e.g. each client's own head.
        Private tensors are never merged and β never scales them: the new model carries each as its owner's reply
        had it. A node receives the shared tensors and, once a reply has told its client id (or
        :attr:`clients_by_node` says), its own private ones; its reply carries the shared tensors and its own.
    statistics : "auto" | sequence of names (default "auto")
        The normalisation statistics (BatchNorm's running mean and variance and its counter): not task vectors,
        never merged by the rule. "auto": the tensors named ``….running_mean``, ``….running_var`` or
        ``….num_batches_tracked``.
    clients_per_round : int (default 0)
        Partial participation: each round trains this many clients, drawn from ``sample_seed`` and the round
        number (the same clients for every strategy given the same seed and round), among the clients whose node
        is known (:attr:`clients_by_node`), else among the nodes; 0 samples as Flower's FedAvg does
        (``fraction_train``, every node by default). The draw is recorded in each round's ``sampled``.
    sample_seed : int (default 0)
        The seed of those draws.
    statistics_rule : "keep" | "average" (default "keep")
        The new model's statistics: the current model's (re-estimate them for the merged weights on the clients'
        data with :func:`fedmerge.strategies.statistics.reestimate`), or the p-weighted mean of the clients'.
    server_optimizer : "sgd" | "momentum" | "adam" | "yogi" | "adagrad" (default "sgd")
        θ ← θ + β·u with u the rule's Δ (sgd), or a server optimizer's step from it, −Δ being its gradient: FedAvgM,
        FedAdam, FedYogi, FedAdagrad of any rule, their state kept over rounds, β their learning rate η
        (:mod:`fedmerge.strategies.server_optimizer`). Shared tensors only: private tensors and statistics never move
        by it.
    server_momentum, server_beta_1, server_beta_2, server_tau : float (default 0.9, 0.9, 0.99, 1e-3)
        μ of ``momentum``; β1, β2 of ``adam`` and ``yogi``; τ of ``adam``, ``yogi`` and ``adagrad``. Set for another
        optimizer, refused.
    fraction_train, min_train_nodes, min_evaluate_nodes, min_available_nodes, arrayrecord_key,
    configrecord_key, evaluate_metrics_aggr_fn
        As in Flower's FedAvg.

    After each round, :attr:`rounds` holds a :class:`RoundRecord` with per-client metadata (one per round,
    empty rounds included); :meth:`record_for` finds a round's.
    """

    weighted = True
    """Whether the rule uses p_t (the median does not: ``weighting`` is then moot)."""

    def __init__(
        self,
        *,
        server_lr: float = 1.0,
        weighting: str = "uniform",
        fraction_train: float = 1.0,
        fraction_evaluate: float = 0.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        weighted_by_key: str = contract.NUM_EXAMPLES,
        arrayrecord_key: str = contract.ARRAYS,
        configrecord_key: str = contract.CONFIG,
        train_metrics_aggr_fn: MetricsAggregator | None = None,
        evaluate_metrics_aggr_fn: MetricsAggregator | None = None,
        device: str = "cpu",
        lora: str = "factors",
        lora_scaling: float = 1.0,
        private: Mapping[str, int] | None = None,
        statistics: str | Sequence[str] = "auto",
        statistics_rule: str = "keep",
        clients_per_round: int = 0,
        sample_seed: int = 0,
        server_optimizer: str = "sgd",
        server_momentum: float = 0.9,
        server_beta_1: float = 0.9,
        server_beta_2: float = 0.99,
        server_tau: float = 1e-3,
    ) -> None:
        if lora not in LORA_MODES:
            raise FedmergeError(f"lora must be one of {LORA_MODES}, got {lora!r}.")
        if not (math.isfinite(lora_scaling) and lora_scaling > 0):
            raise FedmergeError(f"lora_scaling (s = α/r) must be a positive number, got {lora_scaling!r}.")
        self.lora, self.lora_scaling = lora, float(lora_scaling)
        if not (math.isfinite(server_lr) and server_lr > 0):
            raise FedmergeError(f"server_lr (β) must be a positive number, got {server_lr!r}.")
        if weighting not in WEIGHTINGS:
            raise FedmergeError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}.")
        if statistics_rule not in STATISTICS_RULES:
            raise FedmergeError(f"statistics_rule must be one of {STATISTICS_RULES}, got {statistics_rule!r}.")
        if isinstance(clients_per_round, bool) or not isinstance(clients_per_round, int) or clients_per_round < 0:
            raise FedmergeError(
                f"clients_per_round must be an integer ≥ 0 (0: Flower's sampling), got {clients_per_round!r}."
            )
        self.clients_per_round, self.sample_seed = clients_per_round, int(sample_seed)
        self.sampled: dict[int, list[int]] = {}
        """round → the clients (or nodes, where unknown) drawn to train in it."""
        self.roles = TensorRoles.of(private, statistics)
        self.statistics_rule = statistics_rule
        self.server_optimizer = ServerOptimizer(
            server_optimizer, server_momentum, server_beta_1, server_beta_2, server_tau
        )
        self.optimizer_state: dict[str, State] = {}
        """tensor name → the server optimizer's state after the last merged round."""
        self.clients_by_node: dict[int, int] = {}
        """node id → client id, from the replies (or set by the caller): which private tensors a node gets."""
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=min_available_nodes,
            weighted_by_key=weighted_by_key,
            arrayrecord_key=arrayrecord_key,
            configrecord_key=configrecord_key,
            train_metrics_aggr_fn=train_metrics_aggr_fn,
            evaluate_metrics_aggr_fn=evaluate_metrics_aggr_fn,
        )
        self.train_metrics_aggr_fn = train_metrics_aggr_fn  # Flower's default would average per-client lists
        self.server_lr = float(server_lr)
        self.weighting = weighting
        self.device = resolve_device(device, "device")
        self.rounds: list[RoundRecord] = []
        self._global_arrays: ArrayRecord | None = None

    def record_for(self, server_round: int) -> RoundRecord | None:
        """The record of round ``server_round`` (the latest, if merged twice); None if it was never merged."""
        return next((r for r in reversed(self.rounds) if r.server_round == server_round), None)

    # -- what subclasses define ---------------------------------------------------------------------
    def build_rule(self, replies: Sequence[ClientReply], weights: Sequence[float] | None) -> Rule:
        """The merging rule for this round's accepted replies."""
        raise NotImplementedError

    def required_metrics(self) -> tuple[str, ...]:
        """Contract keys every reply must carry, positive, for this strategy."""
        return (self.weighted_by_key,) if self._by_key else ()

    def rule_params(self) -> dict:
        """The rule's own parameters, for the summary (subclasses add theirs)."""
        return {}

    def statistics_request(self) -> dict[str, int]:
        """The statistics for merging this strategy asks of every client beside its weights (Fisher merging's,
        RegMean's): contract key → training examples, added to each train message's config; every reply must then
        carry them (:data:`fedmerge.contract.MERGING_STATISTICS`)."""
        return {}

    def effective_steps_key(self, replies: Sequence[ClientReply]) -> str | None:
        """Which metric gives a_t for the diagnostics w_t and χ²(p‖w): FedNova's default normaliser's, else the
        other's, when every reply reports it."""
        default = A_T_KEYS[DEFAULT_NORMALIZE_BY]
        for key in (default, *(k for k in A_T_KEYS.values() if k != default)):
            if all(isinstance(r.metrics.get(key), (int, float)) and r.metrics[key] > 0 for r in replies):
                return key
        return None

    def observe_update(self, name: str, delta: torch.Tensor) -> None:
        """Called with each tensor's Δ as it is produced (CCLIP keeps it as the next center)."""

    @property
    def _by_key(self) -> bool:
        return self.weighted and self.weighting == "num-examples"

    def _weighted_by(self) -> str:
        """What p_t really is, for the summary."""
        if self._by_key:
            return f"'{self.weighted_by_key}' (p_t ∝ {self.weighted_by_key})"
        why = "" if self.weighted else f" ({type(self).__name__} is unweighted)"
        evaluate = f"; '{self.weighted_by_key}' weighs evaluate metrics only" if self.fraction_evaluate > 0 else ""
        return f"nothing: uniform p_t = 1/T{why}{evaluate}"

    # -- Flower's hooks -----------------------------------------------------------------------------
    def summary(self) -> None:
        """Log the configuration through Flower's logger, as Flower's strategies do (``start`` calls it)."""
        params = "".join(f", {k}={v!r}" for k, v in self.rule_params().items())
        flwr_log(INFO, "\t├──> Merging: %s%s", type(self).__name__, params)
        flwr_log(INFO, "\t│\t└── Server learning rate: β = %g (θ ← θ + β·Δ, Δ mean-scale)", self.server_lr)
        if self.server_optimizer.name != "sgd":
            flwr_log(
                INFO, "\t│\t└── Server optimizer: %s (θ ← θ + β·u, u its step from Δ)", self.server_optimizer.params()
            )
        flwr_log(INFO, "\t├──> Sampling:")
        flwr_log(INFO, "\t│\t├──Fraction: train (%.2f) | evaluate (%.2f)", self.fraction_train, self.fraction_evaluate)
        flwr_log(
            INFO, "\t│\t├──Minimum nodes: train (%d) | evaluate (%d)", self.min_train_nodes, self.min_evaluate_nodes
        )
        flwr_log(INFO, "\t│\t└──Minimum available nodes: %d", self.min_available_nodes)
        flwr_log(INFO, "\t└──> Keys in records:")
        flwr_log(INFO, "\t\t├── Weighted by: %s", self._weighted_by())
        flwr_log(INFO, "\t\t├── ArrayRecord key: '%s'", self.arrayrecord_key)
        flwr_log(INFO, "\t\t└── ConfigRecord key: '%s'", self.configrecord_key)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the global model sent (``aggregate_train`` never receives it), then as FedAvg, or to the clients
        drawn for this round (``clients_per_round``); the config asks for the statistics the rule needs."""
        self._global_arrays = arrays
        config.update(self.statistics_request())
        if not self.clients_per_round:
            return super().configure_train(server_round, arrays, config, grid)
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, self._draw(server_round, grid), MessageType.TRAIN)

    def _draw(self, server_round: int, grid: Grid) -> list[int]:
        """This round's ``clients_per_round`` nodes, drawn from (``sample_seed``, round) by client id where every
        node's client is known, else by node id; the draw is kept in :attr:`sampled`."""
        nodes, _ = sample_nodes(grid, self.min_available_nodes, self.min_available_nodes)
        if self.clients_per_round > len(nodes):
            raise FedmergeError(
                f"clients_per_round = {self.clients_per_round} but only {len(nodes)} nodes are connected."
            )
        known = all(node in self.clients_by_node for node in nodes)
        ids = sorted(self.clients_by_node[node] for node in nodes) if known else sorted(nodes)
        rng = np.random.default_rng([self.sample_seed, server_round])
        # indices, not the ids themselves: NumPy would turn Flower's 64-bit node ids into floats
        chosen = sorted(ids[int(i)] for i in rng.choice(len(ids), self.clients_per_round, replace=False))
        self.sampled[server_round] = chosen
        by_client = {client: node for node, client in self.clients_by_node.items()}
        return [by_client[i] for i in chosen] if known else chosen

    def arrays_for(self, node_id: int, arrays: ArrayRecord) -> ArrayRecord:
        """What node ``node_id`` is sent of ``arrays``: all but the other clients' private tensors."""
        if not self.roles.private:
            return arrays
        return subset(arrays, self.roles.for_client(arrays, self.clients_by_node.get(node_id)))

    def _construct_messages(self, record: RecordDict, node_ids: list[int], message_type: str) -> Iterable[Message]:
        """One message per node, each carrying only the tensors its client needs (:meth:`arrays_for`)."""
        if not self.roles.private:
            return super()._construct_messages(record, node_ids, message_type)
        arrays, config = record[self.arrayrecord_key], record[self.configrecord_key]
        return [
            Message(
                RecordDict({self.arrayrecord_key: self.arrays_for(node, arrays), self.configrecord_key: config}),
                dst_node_id=node,
                message_type=message_type,
            )
            for node in node_ids
        ]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """θ + β·Δ with Δ this strategy's rule over the task vectors from the model sent this round."""
        if self._global_arrays is None:
            raise FedmergeError("aggregate_train was called before configure_train: start the strategy with start().")
        return self.merge_replies(server_round, replies, self._global_arrays)

    def merge_replies(
        self, server_round: int, replies: Iterable[Message], global_arrays: ArrayRecord
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Merge training replies into θ + β·Δ, θ being the ``global_arrays`` the clients trained from.

        Usable outside a Flower run, e.g. to merge the same one-shot replies under several strategies.
        Returns the new arrays (None if no reply was usable) and the round's metrics; appends the round's
        :class:`RoundRecord` to :attr:`rounds`, also when no reply was usable (with its exclusions).
        """
        accepted, excluded = check_replies(
            replies, global_arrays, self.required_metrics(), self.roles, tuple(self.statistics_request())
        )
        self.clients_by_node.update({r.node_id: r.client_id for r in accepted})
        unmerged = [name for name in global_arrays if name not in set(self.roles.merged(global_arrays))]
        bad = {
            id(r): name
            for r in accepted
            if (name := non_finite_tensor(r.arrays, [n for n in unmerged if n in r.arrays]))
        }
        excluded += [
            Exclusion(r.node_id, f"non-finite values in tensor '{bad[id(r)]}'", r.client_id)
            for r in accepted
            if id(r) in bad
        ]
        accepted = [r for r in accepted if id(r) not in bad]
        while accepted:
            arrays, rule, squared_norms, optimizer_state = self._merge(accepted, global_arrays, server_round)
            # A non-finite ‖τ_t‖² flags a client; the exact check confirms it (a norm can overflow).
            flagged = [r for r, sq in zip(accepted, squared_norms) if not math.isfinite(sq)]
            bad = {id(r): name for r in flagged if (name := non_finite_tensor(r.arrays)) is not None}
            if not bad:
                break
            excluded += [
                Exclusion(r.node_id, f"non-finite values in tensor '{bad[id(r)]}'", r.client_id)
                for r in accepted
                if id(r) in bad
            ]
            accepted = [r for r in accepted if id(r) not in bad]
        for exclusion in excluded:
            who = f"node {exclusion.node_id}" if exclusion.client_id is None else f"client {exclusion.client_id}"
            log.warning("round %d: %s left out: %s", server_round, who, exclusion.reason)
        if not accepted:
            log.warning("round %d: no usable reply; the global model is unchanged.", server_round)
            self.rounds.append(RoundRecord.empty(server_round, self.server_lr, _excluded(excluded)))
            self.rounds[-1].sampled = self.sampled.get(server_round)
            return None, self.rounds[-1].to_metrics()
        self.optimizer_state.update(optimizer_state)
        self.rounds.append(self._record(server_round, rule, accepted, squared_norms, excluded))
        self.rounds[-1].sampled = self.sampled.get(server_round)
        metrics = self.rounds[-1].to_metrics()
        if self.train_metrics_aggr_fn is not None:
            metrics.update(self.train_metrics_aggr_fn([r.content for r in accepted], self.weighted_by_key))
        return arrays, metrics

    def _merge(self, accepted: Sequence[ClientReply], global_arrays: ArrayRecord, server_round: int):
        """One pass of the rule over the accepted replies: new arrays, the rule used, each ‖τ_t‖² (over the merged
        tensors) and the server optimizer's new state (kept if the pass is the round's last)."""
        optimizer_state: dict[str, State] = {}
        step = partial(self._server_step, server_round=server_round, new_state=optimizer_state)
        weights = [r.metrics[self.weighted_by_key] for r in accepted] if self._by_key else None
        rule = self.build_rule(accepted, weights)
        shared = self.roles.merged(global_arrays)
        base = OnDevice(RecordTensors(subset(global_arrays, shared)), self.device)
        models = [OnDevice(RecordTensors(subset(r.arrays, shared)), self.device) for r in accepted]
        layers = adapted_layers(shared, only_factors=True) if self.lora != "factors" else []
        folded = {layer.weight: layer for layer in layers}
        if self.lora == "dense" and layers:
            task_vectors = [DenseUpdate(model, base, layers, self.lora_scaling) for model in models]
            names = list(task_vectors[0])
        else:
            task_vectors = [TaskVector(model, base) for model in models]
            stacked = {name for layer in layers for name in (layer.weight, layer.a, layer.b)}
            names = [name for name in shared if name not in stacked]
        squared_norms = np.zeros(len(accepted))
        if self.lora == "stack" and layers:
            merged = self._stack(rule, task_vectors, names, models, base, layers, squared_norms, step)
        else:
            merged = {}
            for name, delta in iter_merge(rule, task_vectors, names, squared_norms):
                delta = step(name, delta)
                made = (
                    fold(base, folded[name], delta, self.lora_scaling, self.server_lr)
                    if name in folded
                    else {name: apply_update(base[name], delta, self.server_lr)}
                )
                merged.update({key: to_array(value) for key, value in made.items()})
        present = [accepted[t] for t in rule.present]  # those of weight > 0: rule.p is theirs
        arrays = assemble(global_arrays, merged, present, self.roles, self.statistics_rule, rule.p)
        return arrays, rule, squared_norms, optimizer_state

    def _server_step(self, name: str, delta: torch.Tensor, server_round: int, new_state: dict) -> torch.Tensor:
        """What β multiplies for tensor ``name``: the rule's Δ (seen by :meth:`observe_update`), or the server
        optimizer's step from it, whose state for the round goes into ``new_state``."""
        self.observe_update(name, delta)
        if self.server_optimizer.name == "sgd" or not delta.is_floating_point():
            return delta
        direction, new_state[name] = self.server_optimizer.step(delta, self.optimizer_state.get(name), server_round)
        return direction

    def _stack(self, rule, task_vectors, names, models, base, layers, squared_norms, step) -> dict:
        """``lora="stack"``: the other tensors through the rule (its first pass fixes c_t), then each adapted layer
        as Σ_t c_t·s·B_t A_t from the stacked factors, folded. The layers' norms are their factors' changes."""
        merged = {}
        for name, delta in iter_merge(rule, task_vectors, names, squared_norms):
            merged[name] = to_array(apply_update(base[name], step(name, delta), self.server_lr))
        coefficients = rule.linear_coefficients()
        if coefficients is None:
            raise FedmergeError(
                f"lora='stack' is exact only for rules that are weighted sums (fedavg, fednova by steps "
                f"or lr-sum), not {rule.name!r}; use lora='dense', exact for every rule."
            )
        present = [models[t] for t in rule.present]
        for layer in layers:
            for t, model in zip(rule.present, present):
                squared_norms[t] += sum(
                    float(((model[n].double() - base[n].double()) ** 2).sum()) for n in (layer.a, layer.b)
                )
            delta = step(layer.weight, stacked_delta(present, base, layer, self.lora_scaling, coefficients))
            merged.update(
                {k: to_array(v) for k, v in fold(base, layer, delta, self.lora_scaling, self.server_lr).items()}
            )
        return merged

    def _record(self, server_round, rule, accepted, squared_norms, excluded) -> RoundRecord:
        record = RoundRecord(
            server_round=server_round,
            rule=rule.params(),
            server_lr=self.server_lr,
            client_ids=[r.client_id for r in accepted],
            node_ids=[r.node_id for r in accepted],
            weights=[float(p) for p in rule.p],
            task_vector_norms=[float(np.sqrt(sq)) for sq in squared_norms],
            excluded=_excluded(excluded),
        )
        key = self.effective_steps_key(accepted)
        if key is not None:
            a = np.array([float(r.metrics[key]) for r in accepted])
            w = effective_weights(rule.p, a)
            record.effective_steps_key = key
            record.effective_weights = [float(x) for x in w]
            record.chi_square = chi_square(rule.p, w)
        losses = [r.metrics.get(contract.TRAIN_LOSS) for r in accepted]
        if all(isinstance(x, (int, float)) for x in losses):
            record.train_losses = [float(x) for x in losses]
        return record


class MethodStrategy(MergingStrategy):
    """A strategy whose rule is a merging method's record (:mod:`fedmerge.merging.registry`).

    The method's parameters are keyword arguments, defaulted and checked by the record (e.g. ``density=0.2``
    for TIES); every other keyword is :class:`MergingStrategy`'s. Each round's rule is built from them and
    the replies' weights.
    """

    method: Method

    def __init__(self, **kwargs) -> None:
        declared = self.method.scoped("strategy")
        given = {key: kwargs.pop(key) for key in list(kwargs) if key in declared}
        self.params = self.method.resolve(given, "strategy", lambda p: f"{type(self).__name__}.{p.name}")
        super().__init__(**kwargs)

    @property
    def weighted(self) -> bool:
        return self.method.weighted

    def __getattr__(self, name: str):
        params = self.__dict__.get("params", {})
        if name in params:
            return params[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def rule_params(self) -> dict:
        return dict(self.params)

    def build_rule(self, replies, weights) -> Rule:
        return self.method.build(weights, **self.params)


def _excluded(exclusions: Sequence[Exclusion]) -> list[dict]:
    return [{"node_id": e.node_id, "client_id": e.client_id, "reason": e.reason} for e in exclusions]
