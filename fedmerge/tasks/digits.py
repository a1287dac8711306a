"""The ``digits`` suite: scikit-learn's 8×8 handwritten digits (shipped with the package), a distinct task
and head per client.

``kind="transforms"``: client t classifies all ten digits under its own input transform (identity,
rotations, flips, transpose, inversion, then random pixel permutations). ``kind="labels"``: client t
classifies the digits of its own group of labels (the ten labels shuffled and split into T groups).
"""

import numpy as np
import torch

from fedmerge.errors import FedmergeError
from fedmerge.tasks import classification
from fedmerge.tasks.federation import Federation
from fedmerge.tasks.models import mlp
from fedmerge.options import Option, boolean, choice, positive_int
from fedmerge.tasks.partition import split_indices
from fedmerge.tasks.transforms import task_transforms

VERSION = 1
NUM_CLASSES = 10
EVAL_FRACTION = 0.3  # of the 1797 images, evaluation pool; the rest is the training pool

OPTIONS = {
    "kind": Option(
        "transforms",
        "transforms (an input transform per client) | labels (a label group per client)",
        choice("transforms", "labels"),
    ),
    "hidden": Option(64, "width of the MLP's two hidden layers", positive_int),
    "heads": classification.HEADS_OPTION,
    "batch_norm": Option(
        False, "a BatchNorm before each hidden ReLU (its statistics are handled as server.statistics says)", boolean
    ),
    **classification.pretrain_options(0.3, 40),
}
DESCRIPTION = "scikit-learn 8×8 digits, a distinct task and head per client (input transforms or label groups); MLP."


def images() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1797 digits as flattened images scaled to [−1, 1] (so a sign flip inverts them) and labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return torch.from_numpy(data.data / 8.0 - 1.0).float(), torch.from_numpy(data.target).long()


def label_filter(labels: np.ndarray):
    """A task maker keeping the examples whose label is in ``labels``."""
    keep = torch.from_numpy(labels)

    def make(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = torch.isin(y, keep)
        return x[mask], y[mask]

    return make


def build(num_clients: int, options: dict, seed: int) -> Federation:
    """The federation for resolved ``options`` (see :data:`OPTIONS`)."""
    x, y = images()
    pool_index, eval_index = split_indices(len(y), 1 - EVAL_FRACTION, seed)
    pool, evaluation = (x[pool_index], y[pool_index]), (x[eval_index], y[eval_index])
    if options["kind"] == "transforms":
        makers = [(t.name, lambda x, y, t=t: (t(x), y)) for t in task_transforms((8, 8), num_clients, seed)]
    else:
        if num_clients > NUM_CLASSES:
            raise FedmergeError(
                f"digits with kind='labels' has {NUM_CLASSES} labels to share, not enough for {num_clients} "
                "clients; use at most 10 clients or kind='transforms'."
            )
        groups = np.array_split(np.random.default_rng([seed, 3]).permutation(NUM_CLASSES), num_clients)
        makers = [("labels-" + "".join(map(str, sorted(g))), label_filter(g)) for g in groups]
    key = {
        "suite": "digits",
        "version": VERSION,
        "seed": seed,
        "heads": num_clients,
        "kind": options["kind"],
        **{k: options[k] for k in ("hidden", "pretrain_fraction", "pretrain_steps", "pretrain_lr")},
        **({"batch_norm": True} if options["batch_norm"] else {}),
    }
    return classification.multitask(
        "digits",
        pool,
        evaluation,
        makers,
        options,
        seed,
        lambda: mlp(x.shape[1], options["hidden"], NUM_CLASSES, num_clients, options["batch_norm"]),
        key,
    )
