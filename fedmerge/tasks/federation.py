"""A federation: one task per client, a model builder, the loss, evaluation and the pretrained base θ0."""

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.utils.data import Dataset, default_collate

from fedmerge.errors import FedmergeError
from fedmerge.tasks.cache import load_or_build
from fedmerge.tasks.weights import load_weights


def statistics_names(model: nn.Module) -> list[str]:
    """The state-dict names of ``model``'s running normalisation statistics: the running mean, variance and batch
    counter of every BatchNorm / InstanceNorm layer that tracks them."""
    found = []
    for prefix, module in model.named_modules():
        if isinstance(module, _NormBase) and module.track_running_stats:
            found += [
                f"{prefix}.{name}" if prefix else name
                for name, buffer in module.named_buffers(recurse=False)
                if buffer is not None
            ]
    return found


def forward(model: nn.Module, inputs: Any, head: int | None = None) -> torch.Tensor:
    """The model's output for a batch: ``model(inputs)``, or ``model(inputs, head)`` for multi-head models."""
    return model(inputs) if head is None else model(inputs, head)


@dataclass(frozen=True, eq=False)
class Task:
    """One client's task: its train / val / test data and, for multi-head models, the head it uses.

    Each split is a map-style :class:`torch.utils.data.Dataset` of ``(input, target)`` pairs, loaded lazily
    where the data is large (an image folder); a :class:`~torch.utils.data.TensorDataset` is the in-memory
    fast path. ``head`` None means the model is called as ``model(x)``; an int ``h`` as ``model(x, h)``.
    For label-skewed suites ``val`` and ``test`` follow the client's label distribution unless the suite says
    otherwise.

    ``private`` names the state-dict entries only this client trains (its own head, FedPer's personalised
    layers): they are never merged; the merged model carries them as this client trained them, and only this
    client receives and sends them. Every other trained tensor is shared by all clients and merged.
    """

    name: str
    train: Dataset
    val: Dataset
    test: Dataset
    head: int | None = None
    private: tuple[str, ...] = ()

    def split(self, name: str) -> Dataset:
        """The ``train``, ``val`` or ``test`` set."""
        if name not in ("train", "val", "test"):
            raise FedmergeError(f"split must be 'train', 'val' or 'test', got {name!r}.")
        return getattr(self, name)


class TaskList(Sequence[Task]):
    """``count`` tasks, each made by ``make(t)`` the first time it is asked for, then kept: a process holds only the
    clients it asks for (a Ray worker, the ones it trains), whatever the number of clients. Give it as
    :attr:`Federation.tasks` where building every task up front would cost memory or time."""

    def __init__(self, count: int, make: Callable[[int], Task]) -> None:
        self.count, self.make = count, make
        self.made: dict[int, Task] = {}
        self.check: Callable[[int, Task], None] = lambda t, task: None

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[t] for t in range(*index.indices(self.count))]
        t = range(self.count)[index]
        if t not in self.made:
            task = self.make(t)
            self.check(t, task)
            self.made[t] = task
        return self.made[t]


Theta0 = Callable[[nn.Module], Mapping[str, torch.Tensor]] | str | Path | None
"""Where θ0 comes from: a function that pretrains the fresh model and returns its state dict, a weights file
(``.safetensors``, or ``.pt``/``.bin`` read with ``weights_only``), or None: the model's own weights as
``model_fn`` built them (e.g. ``AutoModel.from_pretrained(directory)`` or torchvision weights it loads)."""


@dataclass(eq=False)
class Federation:
    """What a suite returns: T tasks (index = client id = Flower partition id) and everything to train them.

    Parameters
    ----------
    tasks : one :class:`Task` per client (a list, or a :class:`TaskList` that makes each when asked for).
    model_fn : builds a fresh model (its random initialisation is drawn from the run's seed).
    loss_fn : ``loss_fn(output, target)``, the mean loss over a batch (default: cross-entropy).
    metric : ``"accuracy"`` (classification: top-1 of ``output.argmax(1)``) or ``"loss"``.
    theta0 : where the pretrained base comes from (:data:`Theta0`).
    cache_key : if given, θ0 is cached on disk under this key (put everything that changes it in it).
    global_test : the whole test set (label-skewed suites), else None.
    eval_batch_size, eval_num_workers : batch size and DataLoader worker processes of evaluation and of the
        λ/ρ selection (memory is pinned when evaluating on a GPU).
    optimum_fn : suites that know their optima (quadratic) return ``{"theta": ..., "tasks": [...]}``.
    evaluate_fn : for suites scored by other means than the loss and ``output.argmax(1)`` (generation):
        ``evaluate_fn(model, data, head)`` with the model in eval mode on its device, gradients off, returns
        ``{"loss": ...}`` plus ``"accuracy"`` (in [0, 1]) when ``metric`` is ``"accuracy"``. None: the default.
    suite, options, seed : filled in by :func:`fedmerge.tasks.load_suite`.

    ``pretrained`` is θ0's state dict (made on first access, then read from the cache when keyed).
    """

    tasks: Sequence[Task]
    model_fn: Callable[[], nn.Module]
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy
    metric: str = "accuracy"
    theta0: Theta0 = None
    cache_key: dict | None = None
    global_test: Dataset | None = None
    eval_batch_size: int = 256
    eval_num_workers: int = 0
    optimum_fn: Callable[[], dict[str, Any]] | None = field(default=None, repr=False)
    evaluate_fn: Callable[[nn.Module, Dataset, int | None], Mapping[str, float]] | None = field(
        default=None, repr=False
    )
    suite: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0

    def build_model(self) -> nn.Module:
        """A fresh model, its initial weights drawn from the federation's seed (global RNG left as it was)."""
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(self.seed)  # the CPU's, where models are built (no CUDA call)
            try:
                return self.model_fn()
            except FedmergeError:
                raise
            except Exception as error:  # the suite's model_fn is broken: say so, without a traceback
                raise FedmergeError(f"model_fn failed: {type(error).__name__}: {error}") from None

    @cached_property
    def pretrained(self) -> dict[str, torch.Tensor]:
        """θ0's state dict on the CPU: made once (:data:`Theta0`), then read from the cache when keyed."""
        if self.cache_key is None:
            return self._make_theta0()
        return load_or_build("pretrained", self.cache_key, self._make_theta0)

    def _make_theta0(self) -> dict[str, torch.Tensor]:
        model = self.build_model()
        if callable(self.theta0):
            try:
                state = self.theta0(model)
            except FedmergeError:
                raise
            except Exception as error:  # the suite's own pretraining failed: say so, without a traceback
                raise FedmergeError(f"making θ0 failed: {type(error).__name__}: {error}") from None
        elif self.theta0 is not None:
            state = load_weights(self.theta0)
        else:
            state = model.state_dict()
        try:
            model.load_state_dict(state)
        except (RuntimeError, TypeError, AttributeError) as error:  # another architecture: torch names the tensors
            source = self.theta0 if isinstance(self.theta0, (str, Path)) else "the suite's theta0"
            raise FedmergeError(f"θ0 from {source} does not fit the suite's model: {error}") from None
        return {name: t.detach().cpu().contiguous().clone() for name, t in model.state_dict().items()}

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The suite's training loss: the mean over the batch."""
        return self.loss_fn(output, target)

    def model_from(
        self, model_or_state_dict: nn.Module | Mapping[str, torch.Tensor], device: str | torch.device | None = None
    ) -> nn.Module:
        """The model itself, or a fresh model on ``device`` (default CPU) loaded with the given state dict.

        A state dict may hold a subset of the model's tensors (what the clients train): the others keep θ0.
        """
        if isinstance(model_or_state_dict, nn.Module):
            return model_or_state_dict
        model = self.build_model()
        model.load_state_dict(self.complete(model_or_state_dict))
        return model.to(device) if device is not None else model

    @cached_property
    def _layout(self) -> tuple[list[str], set[str], set[str]]:
        """The model's state-dict names, those of its frozen parameters, and its normalisation statistics."""
        model = self.build_model()
        names = list(model.state_dict())
        frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
        return names, frozen, set(statistics_names(model)) & set(names)

    @property
    def trained_names(self) -> list[str]:
        """The state-dict entries the clients train and send: all but the frozen parameters
        (``requires_grad=False``), which stay at θ0 everywhere and never travel."""
        names, frozen, _ = self._layout
        return [name for name in names if name not in frozen]

    @cached_property
    def private_names(self) -> dict[str, int]:
        """Each private tensor's owner: name → the client whose :attr:`Task.private` names it."""
        owners: dict[str, int] = {}
        names, frozen, _ = self._layout
        for t, task in enumerate(self.tasks):
            for name in task.private:
                if name not in names:
                    raise FedmergeError(
                        f"task {t} ({task.name}) names {name!r} as private, but the model has no such "
                        f"tensor; give state-dict names (e.g. {names[-1]!r})."
                    )
                if name in frozen:
                    raise FedmergeError(
                        f"task {t} ({task.name}) names {name!r} as private, but it is frozen "
                        "(requires_grad=False): frozen tensors stay θ0's for every client; make it "
                        "trainable or leave it out of Task.private."
                    )
                if owners.setdefault(name, t) != t:
                    raise FedmergeError(
                        f"tensor {name!r} is private to task {owners[name]} and to task {t}; a private "
                        "tensor belongs to one client (shared tensors are simply left out of Task.private)."
                    )
        return owners

    @property
    def statistics_names(self) -> list[str]:
        """The shared normalisation statistics (BatchNorm's running mean and variance and its counter): trained
        buffers, but not task vectors: never merged by a rule (see ``server.statistics``)."""
        _, _, statistics = self._layout
        return [name for name in self.trained_names if name in statistics and name not in self.private_names]

    @property
    def shared_names(self) -> list[str]:
        """What the rules merge: the trained tensors that are neither private nor normalisation statistics."""
        excluded = {*self.private_names, *self.statistics_names}
        return [name for name in self.trained_names if name not in excluded]

    def complete(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A whole state dict from the trained entries ``state``: the frozen rest is θ0's (made only if needed)."""
        missing = [name for name in self._layout[0] if name not in state]
        return {**{name: self.pretrained[name] for name in missing}, **state}

    @torch.no_grad()
    def evaluate(
        self, model_or_state_dict: nn.Module | Mapping[str, torch.Tensor], task: Task, split: str = "test"
    ) -> dict[str, float]:
        """``{"loss": mean loss}`` on the task's split, plus ``"accuracy"`` for classification suites.

        The model is run with the task's head, in eval mode (its mode is restored afterwards). A model whose
        outputs (or loss) are not finite is not scored: ``{"loss": nan, "accuracy": nan, "diverged": True}``.
        """
        try:
            return self.evaluate_data(model_or_state_dict, task.split(split), task.head)
        except FedmergeError as error:
            raise FedmergeError(f"task {task.name!r}, its {split} split: {error}") from None

    @torch.no_grad()
    def evaluate_data(
        self, model_or_state_dict: nn.Module | Mapping[str, torch.Tensor], data: Dataset, head: int | None = None
    ) -> dict[str, float]:
        """As :meth:`evaluate`, on any data set (e.g. :attr:`global_test`) through ``head``, on the model's device."""
        from fedmerge.tasks.loading import eval_batches

        model = self.model_from(model_or_state_dict)
        was_training = model.training
        model.eval()
        diverged = {"loss": math.nan, **({"accuracy": math.nan} if self.metric == "accuracy" else {}), "diverged": True}
        if self.evaluate_fn is not None:  # the suite's own scoring (e.g. exact match after generation)
            try:
                result = dict(self.evaluate_fn(model, data, head))
            finally:
                model.train(was_training)
            return result if math.isfinite(result.get("loss", 0.0)) else diverged
        device = next(model.parameters()).device
        loss, correct, count = 0.0, 0, 0
        batches = eval_batches(
            data, self.eval_batch_size, num_workers=self.eval_num_workers, pin_memory=True, device=device
        )
        try:
            for x, y in batches:
                output = forward(model, x, head)
                batch_loss = float(self.loss_fn(output, y))
                if not (math.isfinite(batch_loss) and bool(torch.isfinite(output).all())):
                    return diverged
                loss += batch_loss * len(y)
                if self.metric == "accuracy":
                    correct += int((output.argmax(1) == y).sum())
                count += len(y)
        finally:
            model.train(was_training)
        result = {"loss": loss / count}
        if self.metric == "accuracy":
            result["accuracy"] = correct / count
        return result

    def check_fits(self) -> None:
        """Make θ0, then run two examples of every task's splits through it and the loss: a dataset that does
        not fit the model fails here, naming the task and split, not inside a client hours later."""
        model = self.model_from(self.pretrained).eval()
        for t, task in enumerate(self.tasks):
            for split in ("train", "val", "test"):
                data = task.split(split)
                try:
                    x, y = default_collate([data[i] for i in range(min(2, len(data)))])
                    with torch.no_grad():
                        self.loss_fn(forward(model, x, task.head), y)
                except Exception as error:
                    raise FedmergeError(
                        f"task {t} ({task.name}): its {split} data does not fit the model and loss "
                        f"({type(error).__name__}: {error})."
                    ) from None

    def optimum(self) -> dict[str, Any] | None:
        """Quadratic suite: ``{"theta": optimum of the uniform objective, "tasks": per-task optima}``; else None."""
        return None if self.optimum_fn is None else self.optimum_fn()
