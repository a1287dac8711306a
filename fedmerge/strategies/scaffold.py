"""SCAFFOLD: θ ← θ + β · Σ_t p_t τ_t from local steps corrected by control variates, c kept over rounds.

Karimireddy, Kale, Mohri, Reddi, Stich, Suresh, "SCAFFOLD: Stochastic Controlled Averaging for Federated Learning",
ICML 2020, Algorithm 1 with option II. Each round the server sends its control variate c with the model (an extra
ArrayRecord under :data:`fedmerge.contract.CONTROL`, its run named by :data:`fedmerge.contract.CONTROL_RUN` in the
config); each client takes the steps y ← y − η_k (g_k − c_t + c) and keeps its own c_t
(:mod:`fedmerge.clients.scaffold`); the server merges the updates by FedAvg's rule and moves c by the clients' Δc_t = −c − τ_t / lr-sum
(:func:`fedmerge.merging.rules.scaffold.next_control`). Merging replies of clients that were sent no c (one-shot
merging) is FedAvg.
"""

import uuid

import torch
from flwr.app import ArrayRecord

from fedmerge import contract
from fedmerge.merging import OnDevice, TaskVector
from fedmerge.merging.rules.scaffold import METHOD, next_control
from fedmerge.strategies.arrays import RecordTensors, array_view, to_array
from fedmerge.strategies.base import MethodStrategy
from fedmerge.strategies.roles import subset


class Scaffold(MethodStrategy):
    """SCAFFOLD over rounds; FedAvg's rule, β (``server_lr``) being the paper's global step size η_g.

    Parameters
    ----------
    **kwargs
        As :class:`fedmerge.strategies.base.MergingStrategy`.

    :attr:`control` holds c for the shared floating tensors (a name absent: 0), on the CPU. Every reply must report
    ``lr-sum``, and ``control-applied`` in a round whose messages carried c (the client took SCAFFOLD's steps).
    """

    method = METHOD

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.control: dict[str, torch.Tensor] = {}
        self.run_id = uuid.uuid4().hex
        """Names this strategy's run to the clients, whose c_t of another run count as 0."""
        self._num_clients: int | None = None  # N, the clients a round's are sampled from
        self._sent_round: int | None = None
        self._controlled = False
        self._merged = None  # (the accepted replies, the rule) of the latest pass

    def configure_train(self, server_round, arrays, config, grid):
        """As FedAvg's, each message carrying c."""
        config[contract.CONTROL_RUN] = self.run_id
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._num_clients, self._sent_round = len(list(grid.get_node_ids())), server_round
        control = {name: self.control.get(name) for name in self._controlled_names(arrays)}
        record = {
            name: to_array(torch.zeros_like(array_view(arrays[name]), dtype=torch.float32) if c is None else c)
            for name, c in control.items()
        }
        for message in messages:
            message.content[contract.CONTROL] = ArrayRecord(record)
        return messages

    def required_metrics(self) -> tuple[str, ...]:
        controlled = (contract.CONTROL_APPLIED,) if self._controlled else ()
        return (*super().required_metrics(), contract.LR_SUM, *controlled)

    def build_rule(self, replies, weights):
        rule = super().build_rule(replies, weights)
        self._merged = (replies, rule)
        return rule

    def merge_replies(self, server_round, replies, global_arrays):
        """FedAvg's merge; then c ← c + (|S|/N) Σ_t p_t Δc_t over the replies merged."""
        self._controlled = self._sent_round == server_round
        arrays, metrics = super().merge_replies(server_round, replies, global_arrays)
        if arrays is not None:
            self.control = self._next_control(global_arrays)
        return arrays, metrics

    def _next_control(self, global_arrays) -> dict[str, torch.Tensor]:
        replies, rule = self._merged
        present = [replies[t] for t in rule.present]
        names = self._controlled_names(global_arrays)
        base = OnDevice(RecordTensors(subset(global_arrays, names)), self.device)
        task_vectors = [
            TaskVector(OnDevice(RecordTensors(subset(r.arrays, names)), self.device), base) for r in present
        ]
        share = min(1.0, len(present) / (self._num_clients or len(present)))
        lr_sums = [float(r.metrics[contract.LR_SUM]) for r in present]
        updated = next_control(self.control, task_vectors, rule.p, lr_sums, share)
        return {name: value.cpu() for name, value in updated.items()}

    def _controlled_names(self, arrays) -> list[str]:
        """The tensors with a control variate: the merged floating ones."""
        return [name for name in self.roles.merged(arrays) if array_view(arrays[name]).is_floating_point()]
