"""The local trainer: a client's optimizer, learning-rate schedule and steps, in plain torch (no Flower).

A client's schedule runs over its total K_t steps; :func:`train` runs any contiguous chunk of it, so K_t
split into R rounds of K_t / R steps follows the same learning rates as one-shot training.
"""

import math
import warnings
from collections.abc import Callable, Mapping
from contextlib import closing, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from fedmerge.errors import FedmergeError
from fedmerge.tasks import Task, forward
from fedmerge.tasks.loading import eval_batches, train_batches
from fedmerge.threads import single_threaded

OPTIMIZERS = ("sgd", "momentum", "adamw")
SCHEDULES = ("constant", "cosine")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # autocast dtype
MOMENTUM = 0.9
CHUNK = 4096  # examples per forward pass in full_gradient, by default

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
    precision : "fp32" | "bf16" | "fp16": autocast of the forward pass and loss to that dtype (the weights
        keep their dtype); fp16 adds torch's gradient scaler and is meant for GPUs: on the CPU use bf16.
    num_workers : DataLoader worker processes reading a lazy train set (0: in the client's process).
    pin_memory : pin batches bound for a GPU (faster host-to-device copies).
    seed : seeds the minibatch order and the model's own randomness (dropout).
    prox_mu : FedProx's μ ≥ 0 (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020): the local
        objective is the task's loss + μ/2·‖w − w_global‖² over the trainable parameters, w_global the weights a call
        to :func:`train` starts from (the model the server sent); 0: plain local training.

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
    precision: str = "fp32"
    num_workers: int = 0
    pin_memory: bool = False
    prox_mu: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise FedmergeError(
                f"training option 'optimizer' must be one of {', '.join(OPTIMIZERS)}; got {self.optimizer!r}."
            )
        if self.schedule not in SCHEDULES:
            raise FedmergeError(
                f"training option 'schedule' must be one of {', '.join(SCHEDULES)}; got {self.schedule!r}."
            )
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
        if self.steps is not None:
            check_warmup(self, self.steps)
        _check_number("weight_decay", self.weight_decay, positive=False)
        _check_number("seed", self.seed, integer=True, positive=False)
        if self.precision not in PRECISIONS:
            raise FedmergeError(
                f"training option 'precision' must be one of {', '.join(PRECISIONS)}; got {self.precision!r}."
            )
        _check_number("num_workers", self.num_workers, integer=True, positive=False)
        if not isinstance(self.pin_memory, bool):
            raise FedmergeError(f"training option 'pin_memory' must be true or false, got {self.pin_memory!r}.")
        _check_number("prox_mu", self.prox_mu, positive=False)


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


def check_warmup(config: TrainConfig, total: int) -> None:
    """The warm-up must end before the client's ``total`` steps do (a cosine schedule has no steps left else)."""
    if config.warmup_steps >= total:
        raise FedmergeError(
            f"training option 'warmup_steps' ({config.warmup_steps}) must be smaller than the client's total "
            f"steps ({total}); lower warmup_steps or raise steps / epochs."
        )


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


def chunk_seeds(seed: int, first_step: int) -> tuple[int, int]:
    """The seeds of a chunk starting at ``first_step``: (minibatch order, the model's own randomness)."""
    first, second = np.random.SeedSequence([seed, first_step]).generate_state(2)
    return int(first), int(second)


def _autocast(precision: str, device: torch.device):
    """Autocast to ``precision``'s dtype on ``device`` (none for fp32); FedmergeError where torch refuses it."""
    if PRECISIONS[precision] is None:
        return nullcontext()
    try:
        with warnings.catch_warnings(
            record=True
        ) as refused:  # torch warns, and disables autocast, for a dtype it lacks
            warnings.simplefilter("always")
            context = torch.autocast(device.type, dtype=PRECISIONS[precision])
    except RuntimeError as error:
        refused = [error]
    if refused:
        fix = "fp16 needs a GPU; use precision = 'bf16' on the CPU" if precision == "fp16" else "use precision = 'fp32'"
        reason = getattr(refused[0], "message", refused[0])
        raise FedmergeError(
            f"training option 'precision' = {precision!r} is not available on {device.type} ({reason}); {fix}."
        )
    return context


def train(
    model: nn.Module,
    task: Task,
    loss_fn: LossFn,
    config: TrainConfig,
    first_step: int = 0,
    num_steps: int | None = None,
    head: int | None = None,
    correction: Mapping[str, torch.Tensor] | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``task.train`` for steps [first_step, first_step + num_steps) of the schedule.

    Parameters
    ----------
    loss_fn : mean loss over a batch, ``loss_fn(forward(model, x, head), y)``.
    first_step, num_steps : the chunk of the client's K_t = :func:`total_steps` steps to run (default: from
        ``first_step`` to the end). The optimizer is fresh each call; minibatches come from a local generator
        and the model's own randomness (dropout) from torch's RNG seeded by (``config.seed``, ``first_step``),
        so a call is reproducible and the global RNG is left as it was.
    head : model head to train; default ``task.head`` (None: the model is called as ``model(x)``).
    correction : parameter name → a tensor added to that parameter's gradient at every step (SCAFFOLD's c − c_t,
        :mod:`fedmerge.clients.scaffold`); names of other tensors (buffers, frozen parameters) are ignored. With ``config.prox_mu`` = μ > 0, μ·(w − w_global) is added too (FedProx's
        proximal term, w_global the weights this call starts from). Both are added before ``grad_clip`` clips.

    Trains on the model's device (batches follow it) with ``config.precision``; only parameters with
    ``requires_grad`` move. Runs single-threaded (:mod:`fedmerge.threads`). Minibatches are drawn without
    replacement and drop the ragged tail of each pass (:func:`fedmerge.tasks.loading.train_batches`). With
    fp16 a step whose gradients overflow is skipped, as torch's gradient scaler does; its rate still counts
    in ``lr_sum``. Returns a :class:`TrainResult` for those steps.
    """
    num_examples = len(task.train)
    total = total_steps(config, num_examples)
    check_warmup(config, total)
    num_steps = total - first_step if num_steps is None else num_steps
    if not (0 <= first_step and num_steps >= 1 and first_step + num_steps <= total):
        raise FedmergeError(
            f"steps [{first_step}, {first_step + num_steps}) are outside the client's schedule of {total} steps; "
            "give 0 ≤ first_step < first_step + num_steps ≤ total steps."
        )
    head = task.head if head is None else head
    device = next(model.parameters()).device
    autocast = _autocast(config.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
    optimizer = _optimizer(config, model)
    add_terms = _gradient_terms(model, config.prox_mu, correction)
    order_seed, model_seed = chunk_seeds(config.seed, first_step)
    batches = train_batches(
        task.train,
        config.batch_size,
        order_seed,
        num_workers=config.num_workers,
        pin_memory=config.pin_memory,
        device=device,
    )
    model.train()
    lr_sum, loss_sum = 0.0, torch.zeros((), dtype=torch.float64, device=device)
    with single_threaded(), closing(batches), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.default_generator.manual_seed(model_seed)
        if device.type == "cuda":
            torch.cuda.manual_seed(model_seed)  # the model's own randomness (dropout) on its GPU
        for step in range(first_step, first_step + num_steps):
            lr = learning_rate(config, step, total)
            for group in optimizer.param_groups:
                group["lr"] = lr
            try:
                inputs, targets = next(batches)
            except FedmergeError as error:
                raise FedmergeError(f"task {task.name!r}, its train split: {error}") from None
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                loss = loss_fn(forward(model, inputs, head), targets)
            scaler.scale(loss).backward()
            if config.grad_clip is not None or add_terms is not None:
                scaler.unscale_(optimizer)
            if add_terms is not None:
                add_terms()
            if config.grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            lr_sum += lr
            loss_sum += loss.detach()
    return TrainResult(
        num_steps=num_steps, lr_sum=lr_sum, train_loss=float(loss_sum) / num_steps, num_examples=num_examples
    )


def _gradient_terms(
    model: nn.Module, mu: float, correction: Mapping[str, torch.Tensor] | None
) -> Callable[[], None] | None:
    """A function adding to the gradient of each trainable parameter FedProx's μ·(w − w_global), w_global its value
    now, and ``correction[name]`` (also where the step gave it no gradient); None when there is neither."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    correction = {name: value for name, value in (correction or {}).items() if name in params}
    for name, value in correction.items():
        if value.shape != params[name].shape:
            raise FedmergeError(
                f"the gradient correction of {name!r} has shape {tuple(value.shape)}, but the parameter "
                f"has {tuple(params[name].shape)}; send one in the parameter's shape."
            )
        correction[name] = value.to(params[name].device, params[name].dtype)
    if not mu and not correction:
        return None
    anchors = {name: p.detach().clone() for name, p in params.items()} if mu else {}

    @torch.no_grad()
    def add() -> None:
        for name, p in params.items():
            if p.grad is None and name not in correction:
                continue  # no part in this step (another task's head): it stays where it is, and so μ·(w − w_global) = 0
            grad = torch.zeros_like(p) if p.grad is None else p.grad
            if name in correction:
                grad.add_(correction[name])
            if mu:
                grad.add_(p - anchors[name], alpha=mu)
            p.grad = grad

    return add


def full_gradient(
    model: nn.Module, dataset: Dataset, loss_fn: LossFn, head: int | None = None, batch_size: int = CHUNK
) -> dict[str, torch.Tensor]:
    """∇L at the model's current weights: the gradient of the mean loss over all of ``dataset``, on the model's
    device, ``batch_size`` examples per forward pass.

    Returns one tensor per named parameter (zeros where the loss does not depend on it, e.g. other heads or
    frozen parameters). The model is called as ``forward(model, x, head)``; its weights and ``.grad`` fields
    are left as they were.
    """
    params = dict(model.named_parameters())
    grads = {name: torch.zeros_like(p) for name, p in params.items()}
    names = [name for name, p in params.items() if p.requires_grad]
    device = next(model.parameters()).device
    for inputs, targets in eval_batches(dataset, batch_size, device=device):
        loss = loss_fn(forward(model, inputs, head), targets)
        weight = len(targets) / len(dataset)
        parts = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
        for name, part in zip(names, parts):
            if part is not None:
                grads[name] += weight * part.detach()
    return grads
