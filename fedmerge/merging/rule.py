"""The shape of a merging rule and the driver that runs one over task vectors, tensor by tensor."""

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from fedmerge.errors import FedmergeError
from fedmerge.merging.tensors import Tensors, TaskVector, apply_update
from fedmerge.merging.weights import client_weights


class Rule:
    """A merging rule: an optional first pass over whole task vectors, then one function per tensor.

    Subclasses set ``name`` and implement :meth:`merge_tensor`; rules that need global quantities (norms)
    override :meth:`prepare`. ``weights`` are raw client weights (e.g. example counts), ``None`` for
    uniform.
    """

    name = "rule"

    def __init__(self, weights: Sequence[float] | None = None) -> None:
        self.weights = weights
        self.p: np.ndarray | None = None

    def prepare(self, task_vectors: Sequence[Tensors], names: Sequence[str]) -> None:
        """First pass, before any tensor is merged. Resolves p_t; subclasses may add more."""
        self.p = client_weights(self.weights, len(task_vectors))

    def merge_tensor(self, name: str, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Δ for one floating tensor from the T clients' task-vector tensors (accumulation dtype)."""
        raise NotImplementedError

    def merge_integer(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Δ for an integer buffer (a counter): the p-weighted mean, rounded, as int64."""
        stacked = torch.stack([t.to(torch.float64) for t in tensors])
        p = torch.as_tensor(self.p, dtype=torch.float64).view(-1, *([1] * (stacked.dim() - 1)))
        return torch.round((stacked * p).sum(0)).to(torch.int64)

    def params(self) -> dict:
        """The rule's parameters, for results and checkpoint metadata."""
        return {"rule": self.name}


def iter_merge(
    rule: Rule, task_vectors: Sequence[Tensors], names: Sequence[str] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, Δ)`` tensor by tensor; Δ is in the accumulation dtype (int64 for integer buffers)."""
    if not task_vectors:
        raise FedmergeError("nothing to merge: give at least one task vector (one client).")
    names = list(task_vectors[0]) if names is None else list(names)
    rule.prepare(task_vectors, names)
    for name in names:
        tensors = [tv[name] for tv in task_vectors]
        if tensors[0].is_floating_point():
            yield name, rule.merge_tensor(name, tensors)
        else:
            yield name, rule.merge_integer(tensors)


def merge(rule: Rule, task_vectors: Sequence[Tensors]) -> dict[str, torch.Tensor]:
    """Δ = the rule over the task vectors, each tensor returned in the first task vector's dtype."""
    first = task_vectors[0] if task_vectors else {}
    return {name: delta.to(first[name].dtype) for name, delta in iter_merge(rule, task_vectors)}


def iter_merged_model(
    rule: Rule,
    base: Tensors,
    finetuned: Sequence[Tensors],
    server_lr: float = 1.0,
    names: Sequence[str] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, θ + β·Δ)`` tensor by tensor, with Δ the rule over τ_t = θ_t − θ, in θ's dtypes."""
    task_vectors = [TaskVector(model, base) for model in finetuned]
    for name, delta in iter_merge(rule, task_vectors, names):
        yield name, apply_update(base[name], delta, server_lr)


def merged_model(
    rule: Rule, base: Tensors, finetuned: Sequence[Tensors], server_lr: float = 1.0
) -> dict[str, torch.Tensor]:
    """θ + β·Δ as a dict; see :func:`iter_merged_model`."""
    return dict(iter_merged_model(rule, base, finetuned, server_lr))
