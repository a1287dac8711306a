"""FedGMA: gradient-masked averaging keeps the coordinates on whose sign the clients agree.

Tenison et al., "Gradient Masked Averaging for Federated Learning", TMLR 2023. With the sign agreement
A_j = |Σ_t sign(τ_t,j)| / T and the mask m_j = 1 if A_j ≥ ρ else A_j:  Δ = m ⊙ Σ_t p_t τ_t.
ρ ≤ 0 gives FedAvg.
"""

from collections.abc import Sequence

import torch

from fedmerge.errors import FedmergeError
from fedmerge.options import Option, at_most
from fedmerge.merging.method import Method, Param
from fedmerge.merging.rule import Rule, merge
from fedmerge.merging.tensors import Tensors, weighted_sum_into


class FedGMARule(Rule):
    """The weighted mean, damped coordinate-wise by the clients' sign agreement."""

    name = "fedgma"

    def __init__(self, threshold: float = 0.5, weights: Sequence[float] | None = None) -> None:
        super().__init__(weights)
        if not threshold <= 1:
            raise FedmergeError(f"FedGMA's threshold ρ must be at most 1, got {threshold}.")
        self.threshold = threshold

    def merge_chunk(self, name, s, values, out):
        weighted_sum_into(out, values, self.p)
        if self.threshold <= 0:
            return
        agreement = torch.sign(values).mean(0).abs_()
        out.mul_(torch.where(agreement >= self.threshold, 1.0, agreement))

    def params(self) -> dict:
        return {"rule": self.name, "threshold": self.threshold}


def fedgma(
    task_vectors: Sequence[Tensors], threshold: float = 0.5, weights: Sequence[float] | None = None
) -> dict[str, torch.Tensor]:
    """Δ = m ⊙ Σ_t p_t τ_t with the sign-agreement mask m of threshold ρ (``threshold``)."""
    return merge(FedGMARule(threshold, weights), task_vectors)


THRESHOLDS = tuple(round(0.1 * k, 1) for k in range(1, 10))  # the paper's search grid for ρ
METHOD = Method(
    "fedgma",
    FedGMARule,
    "the mean, damped where the clients' signs disagree (Tenison et al. 2022)",
    params=(
        Param(
            "threshold",
            Option(0.5, "ρ, the sign-agreement threshold, at most 1 (≤ 0: fedavg)", at_most(1.0)),
            flag="--rho",
        ),
    ),
    tuned="threshold",
    grid=lambda norms: list(THRESHOLDS),
)
