"""Bulyan: θ ← θ + β · Δ, Krum's selection of T − 2f updates, then the coordinate-wise mean nearest the median.

El Mhamdi, Guerraoui, Rouault, "The Hidden Vulnerability of Distributed Learning in Byzantium", ICML 2018.
θ = T − 2f updates chosen by Krum over those left, again and again; Δ_j = the mean of the β = θ − 2f selected
τ_t,j nearest their median. ``selection="multi-krum"`` chooses the θ of least Krum score in one pass: with β = 1
that is Flower's Bulyan strategy. A round with T < 4f + 3 replies is refused (Flower's skips the round).
"""

from fedmerge.merging.rules.bulyan import METHOD
from fedmerge.strategies.base import MethodStrategy


class Bulyan(MethodStrategy):
    """Bulyan over Krum (unweighted).

    Parameters
    ----------
    num_malicious_nodes : int (default 0)
        f, the malicious clients assumed; a round needs T ≥ 4f + 3 replies.
    selection : "recursive" | "multi-krum" (default "recursive")
        Krum again and again over the updates left (the paper's; Flower's legacy ``aggregate_bulyan``), or the
        T − 2f of least Krum score in one pass (Flower's Message-API ``Bulyan``).
    **kwargs
        As :class:`fedmerge.strategies.base.MergingStrategy`.
    """

    method = METHOD
