"""Trimmed mean: θ ← θ + β · Δ, Δ_j the mean of τ_t,j without the ⌊β_trim·T⌋ largest and smallest.

Yin et al., "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates", ICML 2018.
With server learning rate 1 this is Flower's FedTrimmedAvg (its ``beta`` is the share trimmed at each end).
"""

from fedmerge.merging.rules.trimmed_mean import METHOD
from fedmerge.strategies.base import MethodStrategy


class TrimmedMean(MethodStrategy):
    """Coordinate-wise trimmed mean of the task vectors (unweighted).

    Parameters
    ----------
    beta : float (default 0.2)
        The share of clients trimmed at each end per coordinate, in [0, 0.5): ⌊beta·T⌋ values dropped each side
        (Flower's FedTrimmedAvg ``beta``; the server learning rate is ``server_lr``).
    **kwargs
        As :class:`fedmerge.strategies.base.MergingStrategy`.
    """

    method = METHOD
