"""FedNova: θ ← θ + β · ā Σ_t p_t τ_t / a_t, normalising away unequal local work.

Wang et al., "Tackling the Objective Inconsistency Problem in Heterogeneous Federated Optimization",
NeurIPS 2020. a_t is the client's ``num-steps`` or its ``lr-sum`` (Σ_k η_t^(k)), or ‖τ_t‖, ā = Σ_t p_t a_t.
"""

from fedmerge import contract
from fedmerge.merging.fednova import METHOD, FedNovaRule
from fedmerge.strategies.base import MethodStrategy

_KEY = {"steps": contract.NUM_STEPS, "lr-sum": contract.LR_SUM}


class FedNova(MethodStrategy):
    """Normalised averaging.

    Parameters
    ----------
    normalize_by : "steps" | "lr-sum" | "norm" (default "lr-sum")
        a_t from the reply's ``num-steps`` or ``lr-sum``, or the norm ‖τ_t‖ of its update. ``lr-sum`` corrects
        both unequal step counts and unequal learning rates, ``steps`` only the former; both assume an
        update grows in proportion to the work. ``norm`` (the mean direction at the mean length) needs no
        metric and stays fair to clients whose updates saturate (docs/findings.md, claim 7).
    **kwargs
        As :class:`fedmerge.strategies.base.MergingStrategy` (``server_lr``, ``weighting``, sampling).
    """

    method = METHOD

    def required_metrics(self):
        key = _KEY.get(self.normalize_by)
        return (*super().required_metrics(), *([key] if key else []))

    def effective_steps_key(self, replies):
        return _KEY.get(self.normalize_by) or super().effective_steps_key(replies)

    def build_rule(self, replies, weights):
        key = _KEY.get(self.normalize_by)
        return FedNovaRule(None if key is None else [float(r.metrics[key]) for r in replies], weights)
