"""Mean direction: the clients' update directions averaged, at their mean length.

With ‖τ_t‖ each task vector's norm over all merged tensors and ā = Σ_t p_t ‖τ_t‖:
Δ = ā · Σ_t p_t τ_t / ‖τ_t‖. Every client enters with a unit direction and the update keeps the mean length.

It is FedNova's normalised average (Wang et al. 2020) with the update's own norm in place of FedNova's a_t, the
client's local work: where updates grow in proportion to the work (‖τ_t‖ ∝ Σ_k η_t^(k)) the two agree; where the
most-trained clients' updates saturate, FedNova divides their updates by work that did not move them and this rule
does not. It needs no metric from the clients. fedmerge's own proposal, made in its findings (docs/findings.md):
not a published method.
"""

from collections.abc import Sequence

import numpy as np
import torch

from fedmerge.merging.method import Method
from fedmerge.merging.rule import Rule, merge
from fedmerge.merging.tensors import Tensors, squared_norms, weighted_sum_into


class MeanDirectionRule(Rule):
    """The p-weighted mean of τ_t / ‖τ_t‖, times the p-weighted mean norm (norms measured in a first pass)."""

    name = "mean-direction"

    def __init__(self, weights: Sequence[float] | None = None) -> None:
        super().__init__(weights)
        self.coeffs: np.ndarray | None = None
        self.norms: np.ndarray | None = None

    def prepare(self, task_vectors, names, device) -> None:
        super().prepare(task_vectors, names, device)
        with np.errstate(invalid="ignore"):  # non-finite inputs: the driver's norms flag them
            self.norms = np.sqrt(np.maximum(squared_norms(task_vectors, names, device), 0.0))
        mean_length = float(np.dot(self.p, self.norms))
        self.coeffs = mean_length * self.p / np.where(self.norms > 0, self.norms, 1.0)  # a zero τ_t adds 0

    def merge_chunk(self, name, s, values, out):
        weighted_sum_into(out, values, self.coeffs)

    def params(self) -> dict:
        return {"rule": self.name, "norms": None if self.norms is None else [float(n) for n in self.norms]}


def mean_direction(task_vectors: Sequence[Tensors], weights: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """Δ = (Σ_t p_t ‖τ_t‖) · Σ_t p_t τ_t / ‖τ_t‖."""
    return merge(MeanDirectionRule(weights), task_vectors)


METHOD = Method(
    "mean-direction",
    MeanDirectionRule,
    "the mean of the unit task vectors τ_t/‖τ_t‖ at their mean length: FedNova's "
    "normalisation by each update's own norm instead of the client's work (fedmerge's findings, not a published method)",
)
