"""A federation: one task per client, a model builder, the loss, evaluation and the pretrained base θ0."""

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedmerge.errors import FedmergeError
from fedmerge.tasks.cache import load_or_build

EVAL_BATCH = 4096


@dataclass(frozen=True, eq=False)
class Task:
    """One client's task: its train / val / test data and the model head it uses.

    ``train.tensors`` is ``(inputs, targets)``. For label-skewed suites ``val`` and ``test`` follow the
    client's label distribution (subsets of the federation's global sets).
    """

    name: str
    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    head: int = 0

    def split(self, name: str) -> TensorDataset:
        """The ``train``, ``val`` or ``test`` set."""
        if name not in ("train", "val", "test"):
            raise FedmergeError(f"split must be 'train', 'val' or 'test', got {name!r}.")
        return getattr(self, name)


@dataclass(eq=False)
class Federation:
    """What a suite builds: T tasks (index = client id = Flower partition id) and everything to train on them.

    Attributes
    ----------
    suite : the suite's name.
    tasks : one :class:`Task` per client.
    options : the resolved suite options (defaults filled in).
    seed : the seed everything was drawn from.
    metric : ``"accuracy"`` for classification suites, ``"loss"`` for regression (quadratic).
    global_test : the whole test set (label-skewed suites), else ``None``.
    pretrained : θ0's state dict (computed on first access, cached on disk when ``cache_key`` is set).
    """

    suite: str
    tasks: list[Task]
    options: dict[str, Any]
    seed: int
    metric: str
    model_fn: Callable[[], nn.Module]
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    pretrain_fn: Callable[[nn.Module], dict[str, torch.Tensor]]
    cache_key: dict | None = None
    global_test: TensorDataset | None = None
    optimum_fn: Callable[[], dict[str, Any]] | None = field(default=None, repr=False)

    def build_model(self) -> nn.Module:
        """A fresh model, its initial weights drawn from the federation's seed (global RNG left as it was)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return self.model_fn()

    @cached_property
    def pretrained(self) -> dict[str, torch.Tensor]:
        """θ0: pretrained once on held-out data (never a client's train data), then read from the cache."""
        if self.cache_key is None:
            return self.pretrain_fn(self.build_model())
        return load_or_build("pretrained", self.cache_key, lambda: self.pretrain_fn(self.build_model()))

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The suite's training loss: the mean over the batch."""
        return self.loss_fn(output, target)

    def model_from(self, model_or_state_dict: nn.Module | Mapping[str, torch.Tensor]) -> nn.Module:
        """The model itself, or a fresh model loaded with the given state dict."""
        if isinstance(model_or_state_dict, nn.Module):
            return model_or_state_dict
        model = self.build_model()
        model.load_state_dict(dict(model_or_state_dict))
        return model

    @torch.no_grad()
    def evaluate(
        self, model_or_state_dict: nn.Module | Mapping[str, torch.Tensor], task: Task, split: str = "test"
    ) -> dict[str, float]:
        """``{"loss": mean loss}`` on the task's split, plus ``"accuracy"`` for classification suites.

        The model is run with the task's head, in eval mode (its mode is restored afterwards).
        """
        return self.evaluate_data(model_or_state_dict, task.split(split), task.head)

    @torch.no_grad()
    def evaluate_data(
        self, model_or_state_dict: nn.Module | Mapping[str, torch.Tensor], data: TensorDataset, head: int = 0
    ) -> dict[str, float]:
        """As :meth:`evaluate`, on any data set (e.g. :attr:`global_test`) through ``head``."""
        model = self.model_from(model_or_state_dict)
        was_training = model.training
        model.eval()
        x, y = data.tensors
        loss, correct = 0.0, 0
        for start in range(0, len(x), EVAL_BATCH):
            output = model(x[start : start + EVAL_BATCH], head)
            target = y[start : start + EVAL_BATCH]
            loss += float(self.loss_fn(output, target)) * len(target)
            if self.metric == "accuracy":
                correct += int((output.argmax(1) == target).sum())
        model.train(was_training)
        result = {"loss": loss / len(x)}
        if self.metric == "accuracy":
            result["accuracy"] = correct / len(x)
        return result

    def optimum(self) -> dict[str, Any] | None:
        """Quadratic suite: ``{"theta": optimum of the uniform objective, "tasks": per-task optima}``; else None."""
        return None if self.optimum_fn is None else self.optimum_fn()
