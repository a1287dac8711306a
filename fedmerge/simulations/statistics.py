"""Normalisation statistics re-estimated in this process, where there is no grid of clients (``fedmerge evaluate``).

Each task's client work is run here with the same code its ClientApp runs
(:func:`fedmerge.clients.statistics.estimate_statistics`), and the estimates are combined as the server combines
the clients' replies (:func:`fedmerge.strategies.statistics.combine`): the same numbers as through the grid.
"""

from collections.abc import Sequence

from flwr.app import ArrayRecord

from fedmerge.clients.statistics import estimate_statistics
from fedmerge.clients.trainer import TrainConfig
from fedmerge.strategies.arrays import to_array
from fedmerge.strategies.statistics import combine
from fedmerge.tasks import Federation


def local_reestimate(
    fed: Federation, arrays: ArrayRecord, names: Sequence[str], configs: Sequence[TrainConfig], device=None
) -> ArrayRecord:
    """``arrays`` with the statistics ``names`` re-estimated on every task's training data (client t's batches of
    ``configs[t].batch_size``)."""
    model = fed.model_from(arrays.to_torch_state_dict(), device)
    parts = [
        estimate_statistics(model, task.train, config.batch_size, task.head, names, config.seed)
        for task, config in zip(fed.tasks, configs)
    ]
    combined = combine(parts, names)
    return ArrayRecord(
        {name: to_array(combined[name]) if name in combined else array for name, array in arrays.items()}
    )
