"""FedNova: normalised averaging that removes the objective inconsistency of unequal local work.

Wang et al., "Tackling the Objective Inconsistency Problem in Heterogeneous Federated Optimization",
NeurIPS 2020. With a_t client t's effective steps (its step count, or Σ_k η_t^(k), the sum of its
learning rates) and ā = Σ_t p_t a_t:  Δ = ā · Σ_t p_t τ_t / a_t.  Equal a_t give FedAvg.
"""

from collections.abc import Sequence

import numpy as np
import torch

from fedmerge.errors import FedmergeError
from fedmerge.options import Option, boolean, choice, positive_float
from fedmerge.merging.method import Method, Param
from fedmerge.merging.rule import Rule, merge
from fedmerge.merging.tensors import Tensors, gram_matrix, weighted_sum_into
from fedmerge.merging.weights import positive_per_client

NORMALIZE_BY = ("steps", "lr-sum", "norm")


def effective_steps(
    normalize_by: str, num_steps: Sequence[float] | None, lr_sums: Sequence[float] | None
) -> Sequence[float]:
    """a_t for ``normalize_by`` = ``steps`` (the step counts), ``lr-sum`` (Σ_k η_t^(k)) or ``norm`` (None: the
    rule measures ‖τ_t‖ itself)."""
    if normalize_by not in NORMALIZE_BY:
        raise FedmergeError(f"normalize_by must be one of {NORMALIZE_BY}, got {normalize_by!r}.")
    if normalize_by == "norm":
        return None
    values = num_steps if normalize_by == "steps" else lr_sums
    if values is None:
        what = "num_steps" if normalize_by == "steps" else "lr_sums"
        raise FedmergeError(f"FedNova with normalize_by={normalize_by!r} needs {what}: give one value per client.")
    return values


class FedNovaRule(Rule):
    """Average τ_t / a_t, rescaled by ā.

    ``effective_steps`` None makes a_t = ‖τ_t‖, the task vector's own norm (measured in a first pass): then
    Δ = (Σ_t p_t ‖τ_t‖) · Σ_t p_t τ_t / ‖τ_t‖, the mean direction at the mean length, which stays fair to
    clients whose updates saturate (docs/findings.md, claim 7).
    """

    name = "fednova"

    def __init__(self, effective_steps: Sequence[float] | None, weights: Sequence[float] | None = None) -> None:
        super().__init__(weights)
        self.effective_steps = effective_steps
        self.coeffs: np.ndarray | None = None

    def present_clients(self, num_clients: int) -> np.ndarray:
        if self.effective_steps is not None:
            positive_per_client(self.effective_steps, num_clients, "effective steps (a_t)")
        return super().present_clients(num_clients)

    def prepare(self, task_vectors, names) -> None:
        super().prepare(task_vectors, names)
        if self.effective_steps is None:
            with np.errstate(invalid="ignore"):  # non-finite inputs: the driver's norms flag them
                self.measured = np.sqrt(np.maximum(np.diag(gram_matrix(task_vectors, names)), 0.0))
            mean_length = float(np.dot(self.p, self.measured))
            self.coeffs = mean_length * self.p / np.where(self.measured > 0, self.measured, 1.0)  # 0/1: a zero τ_t adds 0
            return
        a = positive_per_client(self.per_client(self.effective_steps), len(task_vectors), "effective steps (a_t)")
        self.coeffs = float(np.dot(self.p, a)) * self.p / a

    def merge_chunk(self, name, s, values, out):
        weighted_sum_into(out, values, self.coeffs)

    def linear_coefficients(self):
        return None if self.effective_steps is None else self.coeffs  # by norm: the norms need every tensor

    def params(self) -> dict:
        steps = self.effective_steps if self.effective_steps is not None else getattr(self, "measured", None)
        return {"rule": self.name, "effective_steps": None if steps is None else [float(a) for a in steps],
                **({"normalize_by": "norm"} if self.effective_steps is None else {})}


def fednova(
    task_vectors: Sequence[Tensors],
    *,
    num_steps: Sequence[float] | None = None,
    lr_sums: Sequence[float] | None = None,
    normalize_by: str = "steps",
    weights: Sequence[float] | None = None,
) -> dict[str, torch.Tensor]:
    """Δ = ā · Σ_t p_t τ_t / a_t with a_t the step counts (``steps``), learning-rate sums (``lr-sum``) or the
    task vectors' norms (``norm``)."""
    a = effective_steps(normalize_by, num_steps, lr_sums)
    return merge(FedNovaRule(a, weights), task_vectors)


def _given_steps(weights, steps=None, lr_sums=None, by_norm=None) -> FedNovaRule:
    """FedNova over models whose a_t are given, one value per model, or are their norms (``fedmerge merge``)."""
    if (steps is not None) + (lr_sums is not None) + bool(by_norm) != 1:
        raise FedmergeError(
            "method 'fednova' needs the models' effective steps a_t, one way: steps (--steps, local step counts) or "
            "lr_sums (--lr-sums, sums of learning rates), one value per model, or by_norm (--by-norm: a_t = ‖τ_t‖)."
        )
    return FedNovaRule(None if by_norm else steps if steps is not None else lr_sums, weights)


METHOD = Method(
    "fednova", FedNovaRule, "the mean of τ_t / a_t rescaled by ā, a_t each client's effective steps (Wang et al. 2020)",
    params=(
        Param("normalize_by", Option("lr-sum", "a_t from each reply's num-steps (steps), its sum of learning rates "
                                     "(lr-sum), or the norm of its task vector ‖τ_t‖ (norm)", choice(*NORMALIZE_BY)),
              scope="strategy"),
        Param("steps", Option(None, "each model's local step count a_t", positive_float), scope="merge", per_model=True),
        Param("lr_sums", Option(None, "each model's sum of learning rates Σ_k η_t^(k) as a_t (instead of --steps)",
                                positive_float), scope="merge", per_model=True),
        Param("by_norm", Option(None, "a_t = ‖τ_t‖, each model's task-vector norm (instead of --steps or --lr-sums)",
                                boolean), scope="merge"),
    ),
    make=_given_steps,
)
