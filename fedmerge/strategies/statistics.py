"""Normalisation statistics re-estimated by the clients for a merged model, and combined exactly on the server.

A merge leaves the model's BatchNorm statistics as they were (:class:`~fedmerge.strategies.base.MergingStrategy`
never merges them as task vectors). :func:`reestimate` sends the merged model to the clients in ``query``
messages (``query = "statistics"``, :mod:`fedmerge.contract`); each re-estimates the statistics on its training
data in one pass (:func:`fedmerge.clients.statistics.estimate_statistics`) and replies with them and its batch
count B_t; :func:`combine` averages them weighted by B_t, which is exactly one pass over all the clients' batches
(the counter becomes Σ_t B_t). Use it in a ServerApp's ``evaluate_fn`` before scoring a merged model.
"""

from collections.abc import Iterable, Mapping, Sequence

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedmerge import contract
from fedmerge.errors import FedmergeError
from fedmerge.strategies.arrays import array_view, to_array
from fedmerge.strategies.roles import weighted_mean


def query_messages(strategy, arrays: ArrayRecord, node_ids: Iterable[int]) -> list[Message]:
    """One ``query`` message per node asking it to re-estimate the statistics of ``arrays`` (each node sent what
    ``strategy`` would send it to train: shared tensors and its own private ones)."""
    config = ConfigRecord({contract.QUERY: contract.STATISTICS})
    return [
        Message(
            RecordDict({contract.ARRAYS: strategy.arrays_for(node, arrays), contract.CONFIG: config}),
            dst_node_id=node,
            message_type=MessageType.QUERY,
        )
        for node in node_ids
    ]


def combine(parts: Sequence[tuple[Mapping[str, torch.Tensor], int]], names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The statistics ``names`` of the clients' (statistics, batch count) ``parts``, averaged weighted by the
    batch counts; a counter becomes the batches in all."""
    if not parts:
        raise FedmergeError("no client re-estimated the statistics; the merged model's statistics are unknown.")
    total = sum(batches for _, batches in parts)
    combined = {}
    for name in names:
        values = [statistics[name] for statistics, _ in parts]
        if values[0].is_floating_point():
            combined[name] = weighted_mean(values, [batches / total for _, batches in parts])
        else:  # the batch counter
            combined[name] = values[0].new_full(values[0].shape, total)
    return combined


def _unpack(reply: Message, names: Sequence[str]) -> tuple[dict[str, torch.Tensor], int]:
    """A statistics reply's (statistics, batch count), checked."""
    node = reply.metadata.src_node_id
    if reply.has_error():
        raise FedmergeError(f"node {node} could not re-estimate the statistics: {reply.error.reason}")
    arrays = next(iter(reply.content.array_records.values()))
    count = dict(next(iter(reply.content.metric_records.values()))).get(contract.NUM_BATCHES)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise FedmergeError(
            f"node {node}: a statistics reply needs '{contract.NUM_BATCHES}', a positive int, got "
            f"{count!r} (docs/client-contract.md)."
        )
    missing = [name for name in names if name not in arrays]
    if missing:
        raise FedmergeError(
            f"node {node}: its statistics reply lacks {missing[0]!r}; reply with every statistic received."
        )
    return {name: array_view(arrays[name]) for name in names}, count


def reestimate(
    grid: Grid,
    strategy,
    arrays: ArrayRecord,
    names: Sequence[str],
    node_ids: Iterable[int],
    timeout: float | None = None,
) -> ArrayRecord:
    """``arrays`` with the statistics ``names`` re-estimated by the clients on ``node_ids`` (see the module)."""
    if not names:
        return arrays
    replies = grid.send_and_receive(query_messages(strategy, arrays, node_ids), timeout=timeout)
    combined = combine([_unpack(reply, names) for reply in replies], names)
    return ArrayRecord(
        {name: to_array(combined[name]) if name in combined else array for name, array in arrays.items()}
    )
