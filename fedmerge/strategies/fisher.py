"""Fisher merging as a Flower strategy: θ ← θ + β·Δ, Δ the τ_t averaged per coordinate with weights p_t (F_t + ε).

Matena & Raffel, "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022. Each client sends its diagonal Fisher
F_t at its trained weights (the reply's ``fisher`` record, asked for in every train message: fedmerge's ClientApp
computes it, docs/client-contract.md says how yours can).
"""

from fedmerge.merging.rules.fisher import METHOD
from fedmerge.strategies.client_statistics import StatisticsStrategy


class FisherMerging(StatisticsStrategy):
    """Fisher-weighted averaging of the clients' parameters.

    Parameters
    ----------
    floor : float (default 1e-6)
        ε added to every Fisher entry (a parameter no client's data reaches is the weighted mean).
    examples : int (default 256)
        How many of its training examples each client's Fisher averages over (sent in the train message).
    **kwargs
        As :class:`fedmerge.strategies.base.MergingStrategy`.
    """

    method = METHOD
