"""FedAvg = Task Arithmetic: θ ← θ + β · Σ_t p_t τ_t.

McMahan et al., AISTATS 2017. One round from a pretrained θ0 with β = λ·T is Task Arithmetic with
scaling λ (Ilharco et al., ICLR 2023); β = 1 with uniform p is the average of the fine-tuned models.
"""

from fedmerge.merging.rules.fedavg import METHOD
from fedmerge.strategies.base import MethodStrategy


class FedAvg(MethodStrategy):
    """Federated Averaging over task vectors, with a server learning rate β (see :class:`MergingStrategy`)."""

    method = METHOD
