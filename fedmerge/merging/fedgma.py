"""FedGMA: gradient-masked averaging keeps the coordinates on whose sign the clients agree.

Tenison et al., "Gradient Masked Averaging for Federated Learning", TMLR 2023. With the sign agreement
A_j = |Σ_t sign(τ_t,j)| / T and the mask m_j = 1 if A_j ≥ ρ else A_j:  Δ = m ⊙ Σ_t p_t τ_t.
ρ ≤ 0 gives FedAvg.
"""

from collections.abc import Sequence

import torch

from fedmerge.errors import FedmergeError
from fedmerge.merging.rule import Rule, merge
from fedmerge.merging.tensors import Tensors, chunks, flat, weighted_sum


class FedGMARule(Rule):
    """The weighted mean, damped coordinate-wise by the clients' sign agreement."""

    name = "fedgma"

    def __init__(self, threshold: float = 0.5, weights: Sequence[float] | None = None) -> None:
        super().__init__(weights)
        if not threshold <= 1:
            raise FedmergeError(f"FedGMA's threshold ρ must be at most 1, got {threshold}.")
        self.threshold = threshold

    def merge_tensor(self, name: str, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        out = weighted_sum(tensors, self.p)
        if self.threshold <= 0:
            return out
        flats, flat_out = flat(tensors), out.view(-1)
        for s in chunks(flat_out.numel()):
            agreement = torch.sign(flats[0][s]).to(out.dtype)
            for x in flats[1:]:
                agreement.add_(torch.sign(x[s]))
            agreement.abs_().div_(len(tensors))
            mask = torch.where(agreement >= self.threshold, 1.0, agreement)
            flat_out[s].mul_(mask)
        return out

    def params(self) -> dict:
        return {"rule": self.name, "threshold": self.threshold}


def fedgma(
    task_vectors: Sequence[Tensors], threshold: float = 0.5, weights: Sequence[float] | None = None
) -> dict[str, torch.Tensor]:
    """Δ = m ⊙ Σ_t p_t τ_t with the sign-agreement mask m of threshold ρ (``threshold``)."""
    return merge(FedGMARule(threshold, weights), task_vectors)
