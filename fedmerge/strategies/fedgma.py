"""FedGMA: θ ← θ + β · m ⊙ Σ_t p_t τ_t, m damping coordinates on whose sign the clients disagree.

Tenison et al., "Gradient Masked Averaging for Federated Learning", TMLR 2023. A_j = |Σ_t sign(τ_t,j)|/T,
m_j = 1 if A_j ≥ ρ else A_j. ρ ≤ 0 gives FedAvg.
"""

from fedmerge.merging.rules.fedgma import METHOD
from fedmerge.strategies.base import MethodStrategy


class FedGMA(MethodStrategy):
    """Gradient-masked averaging.

    Parameters
    ----------
    threshold : float (default 0.5)
        ρ: coordinates whose sign agreement reaches ρ keep their full average; others are scaled by it.
    **kwargs
        As :class:`fedmerge.strategies.base.MergingStrategy`.
    """

    method = METHOD
