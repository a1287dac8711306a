"""Unpack and check training replies against the global model the server sent.

A reply that failed is left out of the round and recorded (so is one with non-finite weights: the merge
pass flags it through its norm and :func:`non_finite_tensor` confirms; and one whose statistics for merging hold
non-finite values). A reply that breaks the client contract (keys, shapes, dtypes, a metric or the statistics the
rule needs) stops the round with a :class:`FedmergeError` naming the node and the tensor or key.
"""

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from flwr.app import ArrayRecord, Message, RecordDict

from fedmerge import contract
from fedmerge.errors import FedmergeError
from fedmerge.merging.validate import check_like, describe
from fedmerge.strategies.arrays import RecordTensors, array_view
from fedmerge.strategies.roles import TensorRoles

CONTRACT_DOC = "see docs/client-contract.md"


@dataclass
class ClientReply:
    """One accepted reply: who sent it, its trained weights, its metrics and its whole content; ``statistics``, the
    statistics for merging it carries (:data:`fedmerge.contract.MERGING_STATISTICS`), by key."""

    node_id: int
    arrays: ArrayRecord
    metrics: dict
    content: RecordDict
    statistics: dict[str, ArrayRecord] = field(default_factory=dict)

    @property
    def client_id(self) -> int:
        """The client's own id if it reported one, else its node id."""
        return int(self.metrics.get(contract.CLIENT_ID, self.node_id))


@dataclass
class Exclusion:
    """A client left out of a round, and why (``client_id`` when its reply said, else None)."""

    node_id: int
    reason: str
    client_id: int | None = None


def non_finite_tensor(arrays: ArrayRecord, names: Iterable[str] | None = None) -> str | None:
    """The name of the first tensor (of ``names``, default all) holding NaN or ±inf, if any."""
    for name in arrays if names is None else names:
        values = array_view(arrays[name])
        if values.is_floating_point() and not bool(torch.isfinite(values).all()):
            return name
    return None


def _check_metric(node_id: int, metrics: dict, key: str) -> None:
    value = metrics.get(key)
    if value is None:
        raise FedmergeError(
            f"node {node_id}: reply's metrics lack '{key}', which this strategy needs; "
            f"report it in the reply's MetricRecord ({CONTRACT_DOC})."
        )
    if isinstance(value, list) or not math.isfinite(value) or value <= 0:
        raise FedmergeError(f"node {node_id}: metric '{key}' must be a positive number, got {value!r}.")


def _records(node_id: int, content: RecordDict, required_statistics: Sequence[str]) -> tuple[ArrayRecord, dict, dict]:
    """A reply's weights (its one ArrayRecord that is no statistics record), metrics and statistics records."""
    weights = [record for key, record in content.array_records.items() if key not in contract.MERGING_STATISTICS]
    if len(weights) != 1 or len(content.metric_records) != 1:
        raise FedmergeError(
            f"node {node_id}: a train reply must carry exactly one ArrayRecord and one MetricRecord, got {len(weights)} "
            f"and {len(content.metric_records)}, besides the statistics for merging asked for (ArrayRecords under "
            f"{', '.join(repr(k) for k in contract.MERGING_STATISTICS)}) ({CONTRACT_DOC})."
        )
    statistics = {
        key: content.array_records[key] for key in contract.MERGING_STATISTICS if key in content.array_records
    }
    missing = [key for key in required_statistics if key not in statistics]
    if missing:
        raise FedmergeError(
            f"node {node_id}: the reply lacks its '{missing[0]}' record, the statistics this strategy "
            f"merges by; the train message asked for it (config '{missing[0]}'): send it as an "
            f"ArrayRecord under '{missing[0]}' ({CONTRACT_DOC})."
        )
    return weights[0], dict(next(iter(content.metric_records.values()))), statistics


def check_replies(
    replies: Iterable[Message],
    global_arrays: ArrayRecord,
    required_metrics: Sequence[str],
    roles: TensorRoles,
    required_statistics: Sequence[str] = (),
) -> tuple[list[ClientReply], list[Exclusion]]:
    """Split replies into accepted ones (ordered by client id) and exclusions; raise on a contract breach.

    A reply holds the global model's tensors, less the other clients' private ones (``roles``), and the statistics
    records ``required_statistics`` names; one whose statistics hold NaN or ±inf is left out."""
    accepted, excluded = [], []
    described = describe(RecordTensors(global_arrays))
    for message in replies:
        node_id = message.metadata.src_node_id
        if message.has_error():
            excluded.append(Exclusion(node_id, f"client failed: {message.error.reason}"))
            continue
        content = message.content
        arrays, metrics, statistics = _records(node_id, content, required_statistics)
        client = metrics.get(contract.CLIENT_ID)
        if roles.private and not isinstance(client, int):
            raise FedmergeError(
                f"node {node_id}: the reply lacks its '{contract.CLIENT_ID}' (an int), which tells whose "
                f"private tensors it carries ({CONTRACT_DOC})."
            )
        expected = {name: described[name] for name in roles.for_client(described, client)}
        if roles.private:
            check_like(
                f"node {node_id}'s reply",
                RecordTensors(arrays),
                expected,
                f"the shared and client {client}'s own",
                f"a client sends back the shared tensors it received and its own private ones ({CONTRACT_DOC})",
            )
        else:
            check_like(
                f"node {node_id}'s reply",
                RecordTensors(arrays),
                expected,
                "the global model's",
                f"a client sends back exactly the tensors it received, as received ({CONTRACT_DOC})",
            )
        for key in required_metrics:
            _check_metric(node_id, metrics, key)
        bad = {key: name for key in required_statistics if (name := non_finite_tensor(statistics[key]))}
        if bad:
            key = next(iter(bad))
            excluded.append(
                Exclusion(
                    node_id,
                    f"non-finite values in its '{key}' statistics, tensor '{bad[key]}'",
                    client if isinstance(client, int) else None,
                )
            )
            continue
        accepted.append(ClientReply(node_id, arrays, metrics, content, statistics))
    accepted.sort(key=lambda r: (r.client_id, r.node_id))
    for first, second in zip(accepted, accepted[1:]):
        if first.client_id == second.client_id:
            raise FedmergeError(
                f"nodes {first.node_id} and {second.node_id} both reply as client {first.client_id}: two "
                f"SuperNodes with one '{contract.CLIENT_ID}' (partition-id) would be merged as two "
                "clients of one client's data; give each node its own partition-id."
            )
    return accepted, excluded
