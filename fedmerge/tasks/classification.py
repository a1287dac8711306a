"""Builders shared by the classification suites: label-skewed clients, or one distinct task per client.

Both hold part of the training pool out for pretraining θ0 (never a client's training data) and split
the evaluation pool into validation and test halves.
"""

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from fedmerge.tasks.federation import Federation, Task, TaskList
from fedmerge.tasks.models import MultiHeadNet
from fedmerge.options import Option, choice, fraction, non_negative_int, positive_float
from fedmerge.tasks.partition import label_partition, label_proportions, matching_subset, split_indices
from fedmerge.tasks.pretrain import pretrain


def pretrain_options(fraction_default: float, steps_default: int, lr_default: float = 1e-3) -> dict[str, Option]:
    """The options every classification suite shares (θ0's pretraining and the val / test split), with
    the suite's defaults."""
    return {
        "pretrain_fraction": Option(
            fraction_default, "share of the training pool held out to pretrain θ0 (no client sees it)", fraction
        ),
        "pretrain_steps": Option(
            steps_default, "Adam steps of pretraining (batch 64 per head); 0 keeps the random init", non_negative_int
        ),
        "pretrain_lr": Option(lr_default, "Adam learning rate of pretraining", positive_float),
        "val_fraction": Option(0.5, "share of the evaluation pool used for validation (the rest is test)", fraction),
    }


IN_MEMORY_EVAL_BATCH = 4096
"""The built-in suites' models are small and their data in memory: evaluate in large batches."""

# A task maker turns (inputs, labels) into the task's (inputs, labels): a transform or a label filter.
TaskMaker = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _subset(x: torch.Tensor, y: torch.Tensor, index: np.ndarray) -> TensorDataset:
    index = torch.from_numpy(index)
    return TensorDataset(x[index], y[index])


def _federation(
    suite: str,
    tasks: list[Task],
    options: dict,
    seed: int,
    model_fn: Callable[[], nn.Module],
    pretrain_sets: Sequence[tuple[TensorDataset, int]],
    cache_key: dict,
    global_test: TensorDataset | None = None,
) -> Federation:
    def pretrain_fn(model: nn.Module) -> dict[str, torch.Tensor]:
        return pretrain(model, pretrain_sets, F.cross_entropy, options["pretrain_steps"], options["pretrain_lr"], seed)

    return Federation(
        suite=suite,
        tasks=tasks,
        options=options,
        seed=seed,
        metric="accuracy",
        model_fn=model_fn,
        loss_fn=F.cross_entropy,
        theta0=pretrain_fn,
        cache_key=cache_key,
        global_test=global_test,
        eval_batch_size=IN_MEMORY_EVAL_BATCH,
    )


def label_skewed(
    suite: str,
    pool: tuple[torch.Tensor, torch.Tensor],
    evaluation: tuple[torch.Tensor, torch.Tensor],
    num_clients: int,
    options: dict,
    seed: int,
    model_fn: Callable[[], nn.Module],
    cache_key: dict,
) -> Federation:
    """Clients share one task and one head; their training data is a label partition of the pool.

    Parameters
    ----------
    pool : (inputs, labels) for training; ``pretrain_fraction`` of it is held out for θ0, the rest is
        partitioned by ``options["partition"]`` (see :func:`~fedmerge.tasks.partition.label_partition`).
    evaluation : (inputs, labels) split into global val / test; each client's val / test is the largest
        subset following its training label distribution (``options["client_eval"] = "matched"``), or the whole
        global val / test (``"global"``).
    cache_key : what determines θ0 (the partition does not: θ0 sees only held-out data).
    """
    x, y = pool
    held_out, rest = split_indices(len(y), options["pretrain_fraction"], seed)
    labels = y.numpy()
    num_classes = max(int(labels.max()), int(evaluation[1].max())) + 1
    parts = label_partition(labels[rest], num_clients, options, seed)
    val_index, test_index = split_indices(len(evaluation[1]), options["val_fraction"], seed + 1)
    val, test = (_subset(*evaluation, val_index), _subset(*evaluation, test_index))

    def task(client: int) -> Task:  # made when asked for: a worker holds the clients it trains
        train_index = rest[parts[client]]
        proportions = label_proportions(labels[train_index], num_classes)
        if options.get("client_eval", "matched") == "global":
            own_val, own_test = val, test
        else:
            own_val = _subset(*val.tensors, matching_subset(val.tensors[1].numpy(), proportions, seed + 2 + client))
            own_test = _subset(*test.tensors, matching_subset(test.tensors[1].numpy(), proportions, seed + 2 + client))
        return Task(name=f"{suite}:client-{client}", train=_subset(x, y, train_index), val=own_val, test=own_test)

    tasks = TaskList(len(parts), task)
    return _federation(suite, tasks, options, seed, model_fn, [(_subset(x, y, held_out), 0)], cache_key, test)


HEADS = ("private", "frozen")
HEADS_OPTION = Option(
    "private",
    "each client's own head: private (trained by its client alone, never merged; the "
    "merged model keeps each client's) | frozen (θ0's for every client, as the paper's CLIP heads)",
    choice(*HEADS),
)


def multitask(
    suite: str,
    pool: tuple[torch.Tensor, torch.Tensor],
    evaluation: tuple[torch.Tensor, torch.Tensor],
    makers: Sequence[tuple[str, TaskMaker]],
    options: dict,
    seed: int,
    model_fn: Callable[[], MultiHeadNet],
    cache_key: dict,
) -> Federation:
    """Client t's task is ``makers[t]`` applied to the pool (less the held-out part), with head t.

    θ0 is pretrained on the held-out part under every task's maker, each through its own head, so every
    head starts trained. ``options["heads"]`` makes head t private to client t, or freezes every head at θ0's.
    Returns a federation without a global test set.
    """
    x, y = pool
    held_out, rest = split_indices(len(y), options["pretrain_fraction"], seed)
    val_index, test_index = split_indices(len(evaluation[1]), options["val_fraction"], seed + 1)
    splits = {
        "pretrain": (x[held_out], y[held_out]),
        "train": (x[rest], y[rest]),
        "val": (evaluation[0][val_index], evaluation[1][val_index]),
        "test": (evaluation[0][test_index], evaluation[1][test_index]),
    }
    tasks, pretrain_sets = [], []
    private = options["heads"] == "private"
    for head, (name, make) in enumerate(makers):
        data = {split: TensorDataset(*make(*tensors)) for split, tensors in splits.items()}
        tasks.append(
            Task(
                f"{suite}:{name}",
                data["train"],
                data["val"],
                data["test"],
                head=head,
                private=MultiHeadNet.head_names(head) if private else (),
            )
        )
        pretrain_sets.append((data["pretrain"], head))

    def heads_as_asked() -> nn.Module:
        model = model_fn()
        model.heads.requires_grad_(private)
        return model

    return _federation(suite, tasks, options, seed, heads_as_asked, pretrain_sets, cache_key)
