"""FedExP: the mean update, extrapolated by a server step chosen from the updates themselves.

Jhunjhunwala, Wang, Joshi, "FedExP: Speeding Up Federated Averaging via Extrapolation", ICLR 2023.
η = max(1, Σ_t p_t ‖τ_t‖² / (2 (‖Σ_t p_t τ_t‖² + ε))) with ‖·‖ over the whole update; Δ = η · Σ_t p_t τ_t. The
more the clients' updates disagree, the further FedExP steps along their mean; η = 1 (FedAvg) when they agree.
A λ without validation data: the one-shot search applies it as it is (``Method.own_step``), and each round's η is
in the rule's parameters (``step``).

The two norms come from one pass computing the task vectors' Gram matrix G: Σ_t p_t ‖τ_t‖² = Σ_t p_t G_tt and
‖Σ_t p_t τ_t‖² = pᵀGp; a second pass writes Δ.

The paper's code adds ε times the number of sampled clients and decays ε by 0.998² a round, and evaluates the mean
of the last two iterates; this rule keeps the paper's formula with a fixed ε (one round: the same model).
"""

from collections.abc import Sequence

import numpy as np
import torch

from fedmerge.errors import FedmergeError
from fedmerge.merging.method import Method, Param
from fedmerge.merging.rule import Rule, merge
from fedmerge.merging.tensors import Tensors, gram_matrix, weighted_sum_into
from fedmerge.options import Option, positive_float


def fedexp_step(gram: np.ndarray, p: np.ndarray, epsilon: float) -> float:
    """η = max(1, Σ_t p_t G_tt / (2 (pᵀGp + ε))) from the Gram matrix G of the task vectors."""
    spread = float(p @ np.diag(gram))
    mean_norm = max(float(p @ gram @ p), 0.0)
    return max(1.0, spread / (2.0 * (mean_norm + epsilon)))


class FedExPRule(Rule):
    """η · Σ_t p_t τ_t, η the FedExP step of these task vectors."""

    name = "fedexp"

    def __init__(self, epsilon: float = 1e-3, weights: Sequence[float] | None = None) -> None:
        super().__init__(weights)
        if not (np.isfinite(epsilon) and epsilon > 0):
            raise FedmergeError(f"FedExP's epsilon ε must be a positive number, got {epsilon!r}.")
        self.epsilon = float(epsilon)
        self.step: float | None = None

    def prepare(self, task_vectors, names, device) -> None:
        super().prepare(task_vectors, names, device)
        with np.errstate(invalid="ignore", over="ignore"):  # non-finite inputs: the driver's norms flag them
            self.step = fedexp_step(gram_matrix(task_vectors, names, device), self.p, self.epsilon)

    def merge_chunk(self, name, s, values, out):
        weighted_sum_into(out, values, self.step * self.p)

    def params(self) -> dict:
        return {"rule": self.name, "epsilon": self.epsilon, **({} if self.step is None else {"step": self.step})}


def fedexp(
    task_vectors: Sequence[Tensors], epsilon: float = 1e-3, weights: Sequence[float] | None = None
) -> dict[str, torch.Tensor]:
    """Δ = η · Σ_t p_t τ_t with FedExP's step η."""
    return merge(FedExPRule(epsilon, weights), task_vectors)


METHOD = Method(
    "fedexp",
    FedExPRule,
    "the p-weighted mean of the task vectors times FedExP's step η = max(1, Σ p_t‖τ_t‖² / "
    "(2(‖Σ p_t τ_t‖² + ε))), chosen from the updates (Jhunjhunwala et al. 2023)",
    params=(
        Param(
            "epsilon",
            Option(
                1e-3,
                "ε in FedExP's step, keeping it finite where the mean update vanishes (the paper's 0.001)",
                positive_float,
            ),
        ),
    ),
    scale="mean",
    own_step=True,
    no_lambda="its paper (Jhunjhunwala et al. 2023) sets the server step itself, from the updates; that is its point",
)
