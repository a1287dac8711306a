"""DELLA as a Flower strategy: θ ← θ + β·Δ, Δ TIES's disjoint mean of the clients' updates after MagPrune's drops.

Deep et al., "DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based Sampling", 2024. As
DARE's strategies, each round draws new drops, and a client's drops depend on its client id, not on the order its
reply arrived in.
"""

from fedmerge.merging.rules.della import METHOD, DellaRule
from fedmerge.strategies.dare import _Dare


class Della(_Dare):
    """Each entry of τ_t kept with probability k ± ε by its magnitude's rank in its row, rescaled by 1/q; then TIES's
    elected sign and disjoint mean.

    Parameters
    ----------
    density : float (default 0.2)
        k, the mean share of entries kept.
    epsilon : float (default 0.15)
        ε: keep probabilities from k − ε (a row's smallest magnitude) to k + ε (its largest).
    seed : int (default 0)
        The drops' seed (an experiment adds its run's seed).
    **kwargs
        As :class:`fedmerge.strategies.base.MergingStrategy`.
    """

    method = METHOD

    def build_rule(self, replies, weights):
        clients = [r.node_id if r.client_id is None else r.client_id for r in replies]
        return DellaRule(**self.params, weights=weights, clients=clients, draw=getattr(self, "_round", 0))
