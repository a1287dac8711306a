"""FedExP: θ ← θ + β · η · Σ_t p_t τ_t, the server step η chosen each round from the updates.

Jhunjhunwala, Wang, Joshi, "FedExP: Speeding Up Federated Averaging via Extrapolation", ICLR 2023.
η = max(1, Σ_t p_t ‖τ_t‖² / (2 (‖Σ_t p_t τ_t‖² + ε))); β (``server_lr``, 1 by default) multiplies on top. Each
round's η is in its :class:`~fedmerge.strategies.round_record.RoundRecord` (``rule["step"]``).
"""

from fedmerge.merging.rules.fedexp import METHOD
from fedmerge.strategies.base import MethodStrategy


class FedExP(MethodStrategy):
    """FedAvg extrapolated by FedExP's step.

    Parameters
    ----------
    epsilon : float (default 0.001)
        ε, keeping η finite where the mean update vanishes.
    **kwargs
        As :class:`fedmerge.strategies.base.MergingStrategy`.
    """

    method = METHOD
