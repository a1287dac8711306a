"""The ``mnist1d`` suite: MNIST-1D signals (Greydanus 2020), generated locally and cached, with an MLP.

Clients are a label partition of the training pool (``iid``, ``dirichlet``, ``pathological``), or, with
``partition="tasks"``, each client classifies the signals under its own transform (identity, reversal,
negation, shifts, then random permutations) with its own head.
"""

import numpy as np
import torch

from fedmerge.tasks import classification
from fedmerge.tasks.cache import load_or_build
from fedmerge.tasks.federation import Federation
from fedmerge.tasks.models import mlp
from fedmerge.options import Option, choice, positive_int
from fedmerge.tasks.partition import PARTITION_OPTIONS, PARTITIONS
from fedmerge.tasks.transforms import task_transforms

VERSION = 1
NUM_CLASSES = 10

OPTIONS = {
    "partition": Option(
        "dirichlet",
        "iid | dirichlet | pathological (label skew) | tasks (a transform and head per client)",
        choice(*PARTITIONS, "tasks"),
    ),
    **PARTITION_OPTIONS,
    "num_samples": Option(5000, "signals generated (80% training pool, 20% evaluation pool)", positive_int),
    "hidden": Option(64, "width of the MLP's two hidden layers", positive_int),
    "heads": Option(
        "private", "partition=tasks: " + classification.HEADS_OPTION.help, classification.HEADS_OPTION.check
    ),
    **classification.pretrain_options(0.25, 300),
}
DESCRIPTION = "MNIST-1D signals (40 features, 10 classes), label-skewed clients or a transform per client; MLP."


def signals(num_samples: int) -> dict[str, torch.Tensor]:
    """MNIST-1D's default data set with ``num_samples`` signals (its own fixed seed), cached on disk."""

    def build() -> dict[str, torch.Tensor]:
        from mnist1d.data import get_dataset_args, make_dataset

        args = get_dataset_args()
        args.num_samples = num_samples
        data = make_dataset(args)
        return {
            "x": torch.from_numpy(np.asarray(data["x"], dtype=np.float32)),
            "y": torch.from_numpy(np.asarray(data["y"], dtype=np.int64)),
            "x_test": torch.from_numpy(np.asarray(data["x_test"], dtype=np.float32)),
            "y_test": torch.from_numpy(np.asarray(data["y_test"], dtype=np.int64)),
        }

    return load_or_build("data", {"dataset": "mnist1d", "num_samples": num_samples}, build)


def build(num_clients: int, options: dict, seed: int) -> Federation:
    """The federation for resolved ``options`` (see :data:`OPTIONS`)."""
    data = signals(options["num_samples"])
    pool, evaluation = (data["x"], data["y"]), (data["x_test"], data["y_test"])
    tasks = options["partition"] == "tasks"
    num_heads = num_clients if tasks else 1
    key = {
        "suite": "mnist1d",
        "version": VERSION,
        "seed": seed,
        "heads": num_heads,
        **{k: options[k] for k in ("num_samples", "hidden", "pretrain_fraction", "pretrain_steps", "pretrain_lr")},
    }

    def model_fn() -> torch.nn.Module:
        return mlp(data["x"].shape[1], options["hidden"], NUM_CLASSES, num_heads)

    if not tasks:
        return classification.label_skewed("mnist1d", pool, evaluation, num_clients, options, seed, model_fn, key)
    transforms = task_transforms((data["x"].shape[1],), num_clients, seed)
    makers = [(t.name, lambda x, y, t=t: (t(x), y)) for t in transforms]
    return classification.multitask("mnist1d", pool, evaluation, makers, options, seed, model_fn, key)
