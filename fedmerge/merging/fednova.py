"""FedNova: normalised averaging that removes the objective inconsistency of unequal local work.

Wang et al., "Tackling the Objective Inconsistency Problem in Heterogeneous Federated Optimization",
NeurIPS 2020. With a_t client t's effective steps (its step count, or Σ_k η_t^(k), the sum of its
learning rates) and ā = Σ_t p_t a_t:  Δ = ā · Σ_t p_t τ_t / a_t.  Equal a_t give FedAvg.
"""

from collections.abc import Sequence

import numpy as np
import torch

from fedmerge.errors import FedmergeError
from fedmerge.merging.rule import Rule, merge
from fedmerge.merging.tensors import Tensors, weighted_sum_into
from fedmerge.merging.weights import positive_per_client

NORMALIZE_BY = ("steps", "lr-sum")


def effective_steps(
    normalize_by: str, num_steps: Sequence[float] | None, lr_sums: Sequence[float] | None
) -> Sequence[float]:
    """a_t for ``normalize_by`` = ``steps`` (the step counts) or ``lr-sum`` (Σ_k η_t^(k))."""
    if normalize_by not in NORMALIZE_BY:
        raise FedmergeError(f"normalize_by must be one of {NORMALIZE_BY}, got {normalize_by!r}.")
    values = num_steps if normalize_by == "steps" else lr_sums
    if values is None:
        what = "num_steps" if normalize_by == "steps" else "lr_sums"
        raise FedmergeError(f"FedNova with normalize_by={normalize_by!r} needs {what}: give one value per client.")
    return values


class FedNovaRule(Rule):
    """Average τ_t / a_t, rescaled by ā."""

    name = "fednova"

    def __init__(self, effective_steps: Sequence[float], weights: Sequence[float] | None = None) -> None:
        super().__init__(weights)
        self.effective_steps = effective_steps
        self.coeffs: np.ndarray | None = None

    def present_clients(self, num_clients: int) -> np.ndarray:
        positive_per_client(self.effective_steps, num_clients, "effective steps (a_t)")
        return super().present_clients(num_clients)

    def prepare(self, task_vectors, names) -> None:
        super().prepare(task_vectors, names)
        a = positive_per_client(self.per_client(self.effective_steps), len(task_vectors), "effective steps (a_t)")
        self.coeffs = float(np.dot(self.p, a)) * self.p / a

    def merge_chunk(self, name, s, values, out):
        weighted_sum_into(out, values, self.coeffs)

    def params(self) -> dict:
        return {"rule": self.name, "effective_steps": [float(a) for a in self.effective_steps]}


def fednova(
    task_vectors: Sequence[Tensors],
    *,
    num_steps: Sequence[float] | None = None,
    lr_sums: Sequence[float] | None = None,
    normalize_by: str = "steps",
    weights: Sequence[float] | None = None,
) -> dict[str, torch.Tensor]:
    """Δ = ā · Σ_t p_t τ_t / a_t with a_t the step counts (``steps``) or learning-rate sums (``lr-sum``)."""
    a = effective_steps(normalize_by, num_steps, lr_sums)
    return merge(FedNovaRule(a, weights), task_vectors)
