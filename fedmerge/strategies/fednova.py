"""FedNova: θ ← θ + β · ā Σ_t p_t τ_t / a_t, normalising away unequal local work.

Wang et al., "Tackling the Objective Inconsistency Problem in Heterogeneous Federated Optimization",
NeurIPS 2020. a_t is the client's ``num-steps`` or its ``lr-sum`` (Σ_k η_t^(k)), ā = Σ_t p_t a_t.
"""

from fedmerge.merging.rules.fednova import METHOD, FedNovaRule
from fedmerge.strategies.base import A_T_KEYS, MethodStrategy


class FedNova(MethodStrategy):
    """Normalised averaging.

    Parameters
    ----------
    normalize_by : "steps" | "lr-sum" (default :data:`fedmerge.merging.rules.fednova.DEFAULT_NORMALIZE_BY`)
        a_t from the reply's ``num-steps`` or ``lr-sum``. ``lr-sum`` corrects both unequal step counts and
        unequal learning rates, ``steps`` only the former; both assume an update grows in proportion to the
        work. :class:`~fedmerge.strategies.MeanDirection` normalises by the update's own norm instead.
    **kwargs
        As :class:`fedmerge.strategies.base.MergingStrategy` (``server_lr``, ``weighting``, sampling).
    """

    method = METHOD

    def required_metrics(self):
        return (*super().required_metrics(), A_T_KEYS[self.normalize_by])

    def effective_steps_key(self, replies):
        return A_T_KEYS[self.normalize_by]

    def build_rule(self, replies, weights):
        return FedNovaRule([float(r.metrics[A_T_KEYS[self.normalize_by]]) for r in replies], weights)
