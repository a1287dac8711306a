"""Krum and Multi-Krum: θ ← θ + β · Δ, Δ the update(s) nearest their T − f − 2 nearest others.

Blanchard et al., "Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS 2017.
s(t) = Σ_{u ∈ N_t} ‖τ_t − τ_u‖² over the T − f − 2 updates nearest τ_t; Krum: Δ = τ_t* of least score; Multi-Krum:
Δ = Σ_{t ∈ S} p_t τ_t / Σ_{t ∈ S} p_t over the m of least score. With β = 1 these are Flower's Krum and (with
``weighting="num-examples"``) MultiKrum; unlike Flower's, they refuse T ≤ 2f + 2 rather than score by fewer
neighbours, and ``num_nodes_to_select=0`` means T − f.
"""

from fedmerge.merging.rules.krum import KRUM, MULTI
from fedmerge.strategies.base import MethodStrategy


class Krum(MethodStrategy):
    """The update of least Krum score (unweighted).

    Parameters
    ----------
    num_malicious_nodes : int (default 0)
        f, the malicious clients assumed; a round needs T ≥ 2f + 3 replies.
    **kwargs
        As :class:`fedmerge.strategies.base.MergingStrategy`.
    """

    method = KRUM


class MultiKrum(MethodStrategy):
    """The p-weighted mean of the m updates of least Krum score.

    Parameters
    ----------
    num_malicious_nodes : int (default 0)
        f, the malicious clients assumed; a round needs T ≥ 2f + 3 replies.
    num_nodes_to_select : int (default 0)
        m, the updates averaged; 0: T − f, all but the f assumed malicious. m = 1 is Krum.
    **kwargs
        As :class:`fedmerge.strategies.base.MergingStrategy` (``weighting="num-examples"`` weighs the m as Flower's
        MultiKrum does).
    """

    method = MULTI
