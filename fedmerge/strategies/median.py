"""Median: θ ← θ + β · median_t τ_t, coordinate-wise.

Yin et al., "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates", ICML 2018.
With β = 1 and ``even="mean"`` this is Flower's FedMedian, computed several times faster.
"""

from fedmerge.merging.rules.median import METHOD
from fedmerge.strategies.base import MethodStrategy


class Median(MethodStrategy):
    """Coordinate-wise median of the task vectors (unweighted).

    Parameters
    ----------
    even : "mean" | "lower" (default "mean")
        For an even number of clients: average the two middle values (NumPy, Flower's FedMedian) or take
        the lower one (``torch.median``, the paper's code).
    **kwargs
        As :class:`fedmerge.strategies.base.MergingStrategy`.
    """

    method = METHOD
