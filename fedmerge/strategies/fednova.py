"""FedNova: θ ← θ + β · ā Σ_t p_t τ_t / a_t, normalising away unequal local work.

Wang et al., "Tackling the Objective Inconsistency Problem in Heterogeneous Federated Optimization",
NeurIPS 2020. a_t is the client's ``num-steps`` or its ``lr-sum`` (Σ_k η_t^(k)), ā = Σ_t p_t a_t.
"""

from fedmerge import contract
from fedmerge.merging import FedNovaRule
from fedmerge.merging.fednova import NORMALIZE_BY
from fedmerge.errors import FedmergeError
from fedmerge.strategies.base import MergingStrategy

_KEY = {"steps": contract.NUM_STEPS, "lr-sum": contract.LR_SUM}


class FedNova(MergingStrategy):
    """Normalised averaging.

    Parameters
    ----------
    normalize_by : "steps" | "lr-sum" (default "lr-sum")
        a_t from the reply's ``num-steps`` or ``lr-sum``. ``lr-sum`` corrects both unequal step counts
        and unequal learning rates; ``steps`` only the former.
    **kwargs
        As :class:`fedmerge.strategies.base.MergingStrategy` (``server_lr``, ``weighting``, sampling).
    """

    def __init__(self, *, normalize_by: str = "lr-sum", **kwargs) -> None:
        if normalize_by not in NORMALIZE_BY:
            raise FedmergeError(f"FedNova's normalize_by must be one of {NORMALIZE_BY}, got {normalize_by!r}.")
        super().__init__(**kwargs)
        self.normalize_by = normalize_by

    def rule_params(self):
        return {"normalize_by": self.normalize_by}

    def required_metrics(self):
        return (*super().required_metrics(), _KEY[self.normalize_by])

    def effective_steps_key(self, replies):
        return _KEY[self.normalize_by]

    def build_rule(self, replies, weights):
        key = _KEY[self.normalize_by]
        return FedNovaRule([float(r.metrics[key]) for r in replies], weights)
