"""FedAvg / Task Arithmetic: Δ = Σ_t p_t τ_t.

McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data", AISTATS
2017. Task Arithmetic (Ilharco et al., ICLR 2023) with scaling λ is one round of it with β = λ·T.
"""

from collections.abc import Sequence

import torch

from fedmerge.merging.method import Method
from fedmerge.merging.rule import Rule, merge
from fedmerge.merging.tensors import Tensors, weighted_sum_into


class FedAvgRule(Rule):
    """The p-weighted mean of the task vectors."""

    name = "fedavg"

    def merge_chunk(self, name, s, values, out):
        weighted_sum_into(out, values, self.p)

    def linear_coefficients(self):
        return self.p


def fedavg(task_vectors: Sequence[Tensors], weights: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """Δ = Σ_t p_t τ_t, with p from ``weights`` (e.g. example counts; ``None`` is uniform)."""
    return merge(FedAvgRule(weights), task_vectors)


METHOD = Method(
    "fedavg", FedAvgRule, "the p-weighted mean of the task vectors (FedAvg; Task Arithmetic when uniform)", linear=True
)
