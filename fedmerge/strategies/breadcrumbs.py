"""Model Breadcrumbs as Flower strategies: θ ← θ + β·Δ, Δ the mean (Breadcrumbs) or TIES's disjoint mean
(BreadcrumbsTies) of the clients' updates, each without its largest and smallest magnitudes.

Davari & Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks", ECCV 2024. Over rounds,
each round masks that round's updates.
"""

from fedmerge.merging.rules.breadcrumbs import METHOD, TIES
from fedmerge.strategies.base import MethodStrategy


class Breadcrumbs(MethodStrategy):
    """Per tensor, each update keeps the ⌊k·n⌋ entries below its ⌊γ·n⌋ largest in magnitude; then the weighted mean.

    Parameters
    ----------
    density : float (default 0.2)
        k, the share of each update's entries kept (per tensor).
    gamma : float (default 0.01)
        γ, the share of its largest magnitudes dropped as outliers.
    **kwargs
        As :class:`fedmerge.strategies.base.MergingStrategy`.
    """

    method = METHOD


class BreadcrumbsTies(MethodStrategy):
    """Breadcrumbs' masks, then TIES's elected sign and disjoint mean; parameters as :class:`Breadcrumbs`."""

    method = TIES
