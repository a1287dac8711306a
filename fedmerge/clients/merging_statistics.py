"""Statistics for merging a client computes after training, when a train message asks: its diagonal Fisher (Fisher
merging) and its linear layers' input Gram matrices (RegMean), over a seeded sample of its training data.

Both run on the trained model in eval mode (no dropout; normalisation layers use their running statistics), on its
device, and leave its weights, gradients and mode as they were. Plain torch: a deployed ClientApp of your own can call
:func:`fisher_diagonal` and :func:`input_grams` on its model (docs/client-contract.md).
"""

from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager

import torch
from flwr.app import ArrayRecord
from torch import nn
from torch.utils.data import Dataset, Subset

from fedmerge import contract
from fedmerge.errors import FedmergeError
from fedmerge.tasks import Federation, Task, forward
from fedmerge.tasks.loading import eval_batches, gather
from fedmerge.threads import single_threaded

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def sample(data: Dataset, examples: int, seed: int) -> list[int]:
    """``examples`` indices of ``data`` drawn without replacement from ``seed`` (all of them, shuffled, if it holds
    fewer)."""
    return torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:examples].tolist()


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """The model in eval mode, single-threaded, its mode restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with single_threaded():
            yield
    finally:
        model.train(was_training)


def fisher_diagonal(
    model: nn.Module,
    data: Dataset,
    names: Collection[str],
    examples: int,
    seed: int = 0,
    head: int | None = None,
    loss: LossFn | None = None,
) -> dict[str, torch.Tensor]:
    """The diagonal Fisher of the parameters ``names`` at the model's weights, over a seeded sample of ``examples`` of
    ``data`` (Matena & Raffel 2022):

        F_j = (1/N) Σ_n E_y[(∂ log p(y | x_n) / ∂θ_j)²],

    with ``loss`` None the model is a classifier (outputs of shape (1, C), logits) and the expectation is exact over y
    ~ softmax(logits): Σ_c p_c·(∂ log p_c / ∂θ_j)², one backward pass per class and example. With a ``loss``, the
    empirical Fisher: y the example's own target and log p(y | x) = −loss(output, y). Parameters the loss does not
    reach get zeros. Returns float32 tensors on the model's device, in the parameters' shapes.
    """
    params = {name: p for name, p in model.named_parameters() if name in names and p.requires_grad}
    fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    if not params:
        return fisher
    device = next(model.parameters()).device
    chosen = sample(data, examples, seed)

    def add(objective: torch.Tensor, weight: float, keep: bool) -> None:
        grads = torch.autograd.grad(objective, list(params.values()), retain_graph=keep, allow_unused=True)
        for total, grad in zip(fisher.values(), grads):
            if grad is not None:
                total.add_(grad.float().square(), alpha=weight)

    with evaluating(model):
        for index in chosen:
            inputs, target = gather(data, [index], device=device)
            output = forward(model, inputs, head)
            if loss is not None:
                add(loss(output, target), 1.0, False)
                continue
            if output.dim() != 2 or output.shape[0] != 1:
                raise FedmergeError(
                    f"the model's outputs have shape {tuple(output.shape)}, not (examples, classes): "
                    "the Fisher of a classifier needs logits; give a loss for the empirical Fisher."
                )
            log_probs = torch.log_softmax(output.float(), dim=-1)[0]
            probs = log_probs.detach().exp().tolist()
            for c, p in enumerate(probs):
                add(log_probs[c], p, c < len(probs) - 1)
    return {name: total.div_(len(chosen)) for name, total in fisher.items()}


@torch.no_grad()
def input_grams(
    model: nn.Module,
    data: Dataset,
    names: Collection[str],
    examples: int,
    seed: int = 0,
    head: int | None = None,
    batch_size: int = 32,
) -> dict[str, torch.Tensor]:
    """XᵀX / n for the input X (n rows: examples × positions) of every :class:`torch.nn.Linear` whose weight is among
    ``names``, over a seeded sample of ``examples`` of ``data``, under the weight's name (in × in, float32, on the
    model's device). A layer the data never reaches (another client's head) gets zeros."""
    layers = {
        name: module
        for prefix, module in model.named_modules()
        if isinstance(module, nn.Linear)
        for name in [f"{prefix}.weight" if prefix else "weight"]
        if name in names
    }
    grams = {
        name: torch.zeros(layer.in_features, layer.in_features, device=layer.weight.device)
        for name, layer in layers.items()
    }
    rows = dict.fromkeys(layers, 0)

    def hook(name: str):
        def record(module, inputs, output) -> None:
            x = inputs[0].detach().reshape(-1, module.in_features).float()
            grams[name].addmm_(x.T, x)
            rows[name] += x.shape[0]

        return record

    handles = [layer.register_forward_hook(hook(name)) for name, layer in layers.items()]
    device = next(model.parameters()).device
    try:
        with evaluating(model):
            for inputs, _ in eval_batches(Subset(data, sample(data, examples, seed)), batch_size, device=device):
                forward(model, inputs, head)
    finally:
        for handle in handles:
            handle.remove()
    return {name: gram.div_(max(rows[name], 1)) for name, gram in grams.items()}


def requested(
    model: nn.Module, fed: Federation, task: Task, config: Mapping, names: Collection[str], batch_size: int, seed: int
) -> dict[str, ArrayRecord]:
    """The statistics a train message's ``config`` asks for (:data:`fedmerge.contract.MERGING_STATISTICS`, each key
    giving the number of examples), over the tensors ``names`` the reply sends back, as CPU ArrayRecords by key.

    A classification suite scored by its outputs' argmax gets the model's Fisher (exact over the classes); a suite
    scored otherwise (a loss, its own ``evaluate_fn``) the empirical Fisher of its loss."""
    found = {}
    for key in (k for k in contract.MERGING_STATISTICS if k in config):
        examples = config[key]
        if isinstance(examples, bool) or not isinstance(examples, int) or examples < 1:
            raise FedmergeError(
                f"the train message's config '{key}' must be a positive number of examples, got {examples!r}."
            )
        if key == contract.FISHER:
            classifier = fed.metric == "accuracy" and fed.evaluate_fn is None
            loss = None if classifier else fed.loss
            stats = fisher_diagonal(model, task.train, names, examples, seed, task.head, loss)
        else:
            stats = input_grams(model, task.train, names, examples, seed, task.head, batch_size)
        found[key] = ArrayRecord({name: tensor.cpu() for name, tensor in stats.items()})
    return found
