"""The local trainer: a client's optimizer, learning-rate schedule and steps, in plain torch (no Flower).

A client's schedule runs over its total K_t steps; :func:`train` runs any contiguous chunk of it, so K_t
split into R rounds of K_t / R steps follows the same learning rates as one-shot training.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedmerge.errors import FedmergeError
from fedmerge.tasks import Task
from fedmerge.threads import single_threaded

OPTIMIZERS = ("sgd", "momentum", "adamw")
SCHEDULES = ("constant", "cosine")
MOMENTUM = 0.9
CHUNK = 4096  # examples per forward pass in full_gradient

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _check_number(name: str, value, integer: bool = False, positive: bool = True) -> None:
    """Raise unless ``value`` is a finite number, > 0 (``positive``) or ≥ 0, integral if ``integer``."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (value > 0 if positive else value >= 0) and (not integer or value == int(value))
    if not ok:
        kind = ("a positive " if positive else "a non-negative ") + ("integer" if integer else "number")
        raise FedmergeError(f"training option {name!r} must be {kind}, got {value!r}.")


@dataclass
class TrainConfig:
    """A client's local training hyperparameters.

    Parameters
    ----------
    optimizer : "sgd" | "momentum" (SGD, momentum 0.9) | "adamw".
    lr : peak learning rate η.
    schedule : "constant" | "cosine" (cosine decay to 0 over the steps after warm-up).
    warmup_steps : linear warm-up steps (either schedule): step k < W uses η·(k+1)/W.
    steps : K_t, the client's total local steps; or
    epochs : passes over the client's train set (K_t = ceil(epochs · ceil(n / batch_size))). Give exactly one.
    batch_size : minibatch size (a batch ≥ the train set is full-batch gradient descent).
    weight_decay : L2 penalty for sgd / momentum, decoupled weight decay for adamw.
    grad_clip : clip the global gradient norm to this value; None for no clipping.
    seed : seeds the minibatch order.

    Raises :class:`FedmergeError` naming the field and the fix on a bad value.
    """

    optimizer: str = "sgd"
    lr: float = 0.05
    schedule: str = "constant"
    warmup_steps: int = 0
    steps: int | None = 100
    epochs: float | None = None
    batch_size: int = 32
    weight_decay: float = 0.0
    grad_clip: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise FedmergeError(f"training option 'optimizer' must be one of {', '.join(OPTIMIZERS)}; got {self.optimizer!r}.")
        if self.schedule not in SCHEDULES:
            raise FedmergeError(f"training option 'schedule' must be one of {', '.join(SCHEDULES)}; got {self.schedule!r}.")
        _check_number("lr", self.lr)
        _check_number("batch_size", self.batch_size, integer=True)
        if (self.steps is None) == (self.epochs is None):
            raise FedmergeError(
                f"give exactly one of the training options 'steps' and 'epochs' (got steps={self.steps!r}, "
                f"epochs={self.epochs!r}); set the other to None."
            )
        if self.steps is not None:
            _check_number("steps", self.steps, integer=True)
        if self.epochs is not None:
            _check_number("epochs", self.epochs)
        if self.grad_clip is not None:
            _check_number("grad_clip", self.grad_clip)
        _check_number("warmup_steps", self.warmup_steps, integer=True, positive=False)
        _check_number("weight_decay", self.weight_decay, positive=False)
        _check_number("seed", self.seed, integer=True, positive=False)


@dataclass
class TrainResult:
    """What a call to :func:`train` did: steps taken, Σ of their learning rates, mean loss, train-set size."""

    num_steps: int
    lr_sum: float
    train_loss: float
    num_examples: int


def total_steps(config: TrainConfig, num_examples: int) -> int:
    """K_t: ``config.steps``, or ``ceil(epochs · ceil(num_examples / batch_size))``."""
    if config.steps is not None:
        return int(config.steps)
    return max(1, math.ceil(config.epochs * math.ceil(num_examples / config.batch_size)))


def learning_rate(config: TrainConfig, step: int, total: int) -> float:
    """η at ``step`` (0-based, global over the client's ``total`` steps).

    Warm-up: η·(step+1)/W for step < W. Then ``constant``: η; ``cosine``: η·½(1 + cos(π·(step − W)/(total − W))),
    which is η at step W and stays positive up to the last step, total − 1.
    """
    warmup = config.warmup_steps
    if step < warmup:
        return config.lr * (step + 1) / warmup
    if config.schedule == "constant":
        return config.lr
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def _optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    momentum = MOMENTUM if config.optimizer == "momentum" else 0.0
    return torch.optim.SGD(params, lr=config.lr, momentum=momentum, weight_decay=config.weight_decay)


def _batches(num_examples: int, batch_size: int, generator: torch.Generator):
    """Endless minibatch indices: shuffled passes over the data; ``None`` (the whole set) if it fits in one batch."""
    if batch_size >= num_examples:
        while True:
            yield None
    while True:
        order = torch.randperm(num_examples, generator=generator)
        for start in range(0, num_examples - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


def batch_seed(seed: int, first_step: int) -> int:
    """The minibatch generator's seed for a chunk starting at ``first_step``."""
    return int(np.random.SeedSequence([seed, first_step]).generate_state(1)[0])


def train(
    model: nn.Module,
    task: Task,
    loss_fn: LossFn,
    config: TrainConfig,
    first_step: int = 0,
    num_steps: int | None = None,
    head: int | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``task.train`` for steps [first_step, first_step + num_steps) of the schedule.

    Parameters
    ----------
    loss_fn : mean loss over a batch, ``loss_fn(model(x, head), y)``.
    first_step, num_steps : the chunk of the client's K_t = :func:`total_steps` steps to run (default: from
        ``first_step`` to the end). The optimizer is fresh each call; minibatches come from a local generator
        seeded by (``config.seed``, ``first_step``), so a call is reproducible and the global RNG is untouched.
    head : model head to train; default ``task.head``.

    Runs single-threaded (:mod:`fedmerge.threads`). Minibatches are drawn without replacement and
    drop the ragged tail of each pass. Returns a :class:`TrainResult` for those steps.
    """
    x, y = task.train.tensors
    total = total_steps(config, len(x))
    if config.warmup_steps >= total:
        raise FedmergeError(
            f"training option 'warmup_steps' ({config.warmup_steps}) must be smaller than the client's total "
            f"steps ({total}); lower warmup_steps or raise steps / epochs."
        )
    num_steps = total - first_step if num_steps is None else num_steps
    if not (0 <= first_step and num_steps >= 1 and first_step + num_steps <= total):
        raise FedmergeError(
            f"steps [{first_step}, {first_step + num_steps}) are outside the client's schedule of {total} steps; "
            "give 0 ≤ first_step < first_step + num_steps ≤ total steps."
        )
    head = task.head if head is None else head
    optimizer = _optimizer(config, model)
    batches = _batches(len(x), config.batch_size, torch.Generator().manual_seed(batch_seed(config.seed, first_step)))
    model.train()
    lr_sum, loss_sum = 0.0, 0.0
    with single_threaded():
        for step in range(first_step, first_step + num_steps):
            lr = learning_rate(config, step, total)
            for group in optimizer.param_groups:
                group["lr"] = lr
            index = next(batches)
            xb, yb = (x, y) if index is None else (x[index], y[index])
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb, head), yb)
            loss.backward()
            if config.grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            lr_sum += lr
            loss_sum += float(loss.detach())
    return TrainResult(num_steps=num_steps, lr_sum=lr_sum, train_loss=loss_sum / num_steps, num_examples=len(x))


def full_gradient(model: nn.Module, dataset: TensorDataset, loss_fn: LossFn, head: int = 0) -> dict[str, torch.Tensor]:
    """∇L at the model's current weights: the gradient of the mean loss over all of ``dataset``.

    Returns one tensor per named parameter (zeros where the loss does not depend on it, e.g. other heads).
    The model's weights and ``.grad`` fields are left as they were.
    """
    x, y = dataset.tensors
    params = dict(model.named_parameters())
    grads = {name: torch.zeros_like(p) for name, p in params.items()}
    names = [name for name, p in params.items() if p.requires_grad]
    for start in range(0, len(x), CHUNK):
        target = y[start : start + CHUNK]
        loss = loss_fn(model(x[start : start + CHUNK], head), target)
        weight = len(target) / len(x)
        parts = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
        for name, part in zip(names, parts):
            if part is not None:
                grads[name] += weight * part.detach()
    return grads
