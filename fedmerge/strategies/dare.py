"""DARE as Flower strategies: θ ← θ + β·Δ, Δ the mean (DareLinear) or TIES's disjoint mean (DareTies) of the
clients' updates after random drops.

Yu et al., "Language Models are Super Mario", ICML 2024. Each round draws new drops, and a client's drops
depend on its client id, not on the order its reply arrived in.
"""

from fedmerge.merging.rules.dare import LINEAR, TIES, DareRule
from fedmerge.strategies.base import MethodStrategy


class _Dare(MethodStrategy):
    elect_sign = False

    def merge_replies(self, server_round, replies, global_arrays):
        self._round = server_round
        return super().merge_replies(server_round, replies, global_arrays)

    def build_rule(self, replies, weights):
        clients = [r.node_id if r.client_id is None else r.client_id for r in replies]
        return DareRule(
            **self.params, elect_sign=self.elect_sign, weights=weights, clients=clients, draw=getattr(self, "_round", 0)
        )


class DareLinear(_Dare):
    """DARE: each entry of τ_t kept with probability k (``density``) and rescaled by 1/k, then the weighted mean.

    Parameters
    ----------
    density : float (default 0.2)
        k, the share of entries kept.
    seed : int (default 0)
        The drops' seed (an experiment adds its run's seed).
    **kwargs
        As :class:`fedmerge.strategies.base.MergingStrategy`.
    """

    method = LINEAR


class DareTies(_Dare):
    """DARE's drops and rescaling, then TIES's elected sign and disjoint mean; parameters as :class:`DareLinear`."""

    method = TIES
    elect_sign = True
