"""TIES-merging as a Flower strategy: θ ← θ + β·Δ, Δ the disjoint mean of the trimmed, sign-elected updates.

Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023.
"""

from fedmerge.merging.rules.ties import METHOD
from fedmerge.strategies.base import MethodStrategy


class Ties(MethodStrategy):
    """Trim each update to its top-k% magnitudes, elect each coordinate's sign, average the agreeing entries.

    Parameters
    ----------
    density : float (default 0.2)
        k, the share of each update's entries kept (per tensor).
    **kwargs
        As :class:`fedmerge.strategies.base.MergingStrategy`.
    """

    method = METHOD
