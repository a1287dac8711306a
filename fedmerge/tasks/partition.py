"""Label partitions with flwr-datasets' partitioners, and per-client evaluation sets that follow them.

The partitioners run offline on a local :class:`datasets.Dataset` holding only each example's index and
label; they return index lists into the caller's tensors.
"""

import os

import numpy as np

from fedmerge.errors import FedmergeError
from fedmerge.options import Option, choice, positive_float, positive_int

PARTITIONS = ("iid", "dirichlet", "pathological")

PARTITION_OPTIONS = {
    "alpha": Option(0.5, "Dirichlet concentration α > 0 (partition=dirichlet); smaller is more skewed", positive_float),
    "classes_per_client": Option(2, "labels per client (partition=pathological)", positive_int),
    "min_partition_size": Option(10, "smallest client train set a Dirichlet draw may give", positive_int),
    "client_eval": Option(
        "matched",
        "each client's val/test sets: matched (the largest subset of the evaluation pool "
        "following its training label distribution: personalised, small under strong skew) | global "
        "(the whole val/test pool: the federation's objective, every client on the same examples)",
        choice("matched", "global"),
    ),
}


def label_partition(labels: np.ndarray, num_clients: int, options: dict, seed: int) -> list[np.ndarray]:
    """Indices of each client's examples under ``options["partition"]``.

    Parameters
    ----------
    labels : int array of the pool's labels.
    num_clients : number of partitions.
    options : resolved suite options: ``partition`` and the entries of :data:`PARTITION_OPTIONS`.
    seed : seeds the partitioner.

    Returns one sorted int64 index array per client. Raises :class:`FedmergeError` when the partitioner
    cannot satisfy the request (too many clients or classes for the pool).
    """
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner

    num_classes = int(labels.max()) + 1
    kind = options["partition"]
    if kind == "pathological" and options["classes_per_client"] > num_classes:
        raise FedmergeError(
            f"option 'classes_per_client' is {options['classes_per_client']} but the data has {num_classes} "
            f"classes; give at most {num_classes}."
        )
    if kind == "iid":
        partitioner = IidPartitioner(num_partitions=num_clients)
    elif kind == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions=num_clients,
            partition_by="label",
            alpha=options["alpha"],
            min_partition_size=options["min_partition_size"],
            self_balancing=False,
            seed=seed,
        )
    else:
        partitioner = PathologicalPartitioner(
            num_partitions=num_clients,
            partition_by="label",
            num_classes_per_partition=options["classes_per_client"],
            seed=seed,
        )
    partitioner.dataset = Dataset.from_dict({"index": np.arange(len(labels)), "label": labels.astype(np.int64)})
    try:
        parts = [
            np.sort(np.asarray(partitioner.load_partition(i)["index"], dtype=np.int64)) for i in range(num_clients)
        ]
    except ValueError as error:
        raise FedmergeError(
            f"cannot make a {kind!r} partition of {len(labels)} examples into {num_clients} clients ({error}); "
            "use fewer clients, a larger 'alpha' or a smaller 'min_partition_size'."
        ) from error
    for client, part in enumerate(parts):
        if len(part) == 0:
            raise FedmergeError(
                f"the {kind!r} partition left client {client} without training data; use fewer clients."
            )
    return parts


def matching_subset(labels: np.ndarray, proportions: np.ndarray, seed: int) -> np.ndarray:
    """The largest subset of ``labels`` whose class proportions are ``proportions`` (up to rounding).

    Classes absent from ``labels`` are skipped.

    Used to give each client validation and test sets with its own label distribution. Returns sorted
    indices; the examples taken from each class are a ``seed``-shuffled prefix.
    """
    counts = np.bincount(labels, minlength=len(proportions))[: len(proportions)]
    present = (proportions > 0) & (counts > 0)
    size = np.min(counts[present] / proportions[present])
    rng = np.random.default_rng(seed)
    chosen = [np.zeros(0, dtype=np.int64)]
    for label in np.flatnonzero(present):
        members = rng.permutation(np.flatnonzero(labels == label))
        chosen.append(members[: int(np.round(proportions[label] * size))])
    return np.sort(np.concatenate(chosen))


def label_proportions(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Class frequencies of ``labels``."""
    return np.bincount(labels, minlength=num_classes) / len(labels)


def split_indices(n: int, fraction_first: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A ``seed``-shuffled split of ``range(n)`` into a first part of ``fraction_first`` and the rest."""
    order = np.random.default_rng(seed).permutation(n)
    cut = int(round(n * fraction_first))
    return np.sort(order[:cut]), np.sort(order[cut:])
