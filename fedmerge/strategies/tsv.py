"""TSV-M as a Flower strategy: θ ← θ + β·Δ, Δ per matrix the clients' top singular directions made orthogonal.

Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging", CVPR 2025. β is TSV-M's α
(1 in the paper); on matrices Δ is on the scale of Σ_t τ_t, not of their mean.
"""

from fedmerge.merging.rules.tsv import METHOD
from fedmerge.strategies.base import MethodStrategy


class TSVM(MethodStrategy):
    """Task Singular Vectors merging (unweighted): per 2-D tensor, each update's top r/T singular directions,
    orthogonalised across clients and summed; other tensors the mean.

    Parameters
    ----------
    **kwargs
        As :class:`fedmerge.strategies.base.MergingStrategy`.
    """

    method = METHOD
