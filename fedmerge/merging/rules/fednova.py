"""FedNova: normalised averaging that removes the objective inconsistency of unequal local work.

Wang et al., "Tackling the Objective Inconsistency Problem in Heterogeneous Federated Optimization",
NeurIPS 2020. With a_t client t's effective steps (its step count, or Σ_k η_t^(k), the sum of its
learning rates) and ā = Σ_t p_t a_t:  Δ = ā · Σ_t p_t τ_t / a_t.  Equal a_t give FedAvg.
"""

from collections.abc import Sequence

import numpy as np
import torch

from fedmerge.errors import FedmergeError
from fedmerge.options import Option, choice, positive_float
from fedmerge.merging.method import Method, Param
from fedmerge.merging.rule import Rule, merge
from fedmerge.merging.tensors import Tensors, weighted_sum_into
from fedmerge.merging.weights import positive_per_client

NORMALIZE_BY = ("steps", "lr-sum")
DEFAULT_NORMALIZE_BY = "steps"
"""FedNova's a_t by default, everywhere (strategies, experiments, ``fedmerge merge`` and ``fedmerge evaluate``): the
local step count, FedNova's own definition. Chosen by the rule docs/findings.md states and computes on held-out
recipes and seeds (the first of steps, lr-sum whose paired difference to FedAvg is never significantly negative,
else steps): neither passed there, so FedNova's own a_t stands."""


def effective_steps(
    normalize_by: str | None, num_steps: Sequence[float] | None, lr_sums: Sequence[float] | None
) -> Sequence[float]:
    """a_t for ``normalize_by`` = ``steps`` (the step counts) or ``lr-sum`` (Σ_k η_t^(k)); None: whichever of the
    two is given (exactly one)."""
    if normalize_by is None:
        if (num_steps is None) == (lr_sums is None):
            raise FedmergeError(
                "FedNova needs the clients' effective steps a_t one way: num_steps (local step counts) "
                "or lr_sums (sums of learning rates), one value per client."
            )
        normalize_by = "steps" if num_steps is not None else "lr-sum"
    if normalize_by not in NORMALIZE_BY:
        raise FedmergeError(f"normalize_by must be one of {NORMALIZE_BY}, got {normalize_by!r}.")
    values = num_steps if normalize_by == "steps" else lr_sums
    if values is None:
        what = "num_steps" if normalize_by == "steps" else "lr_sums"
        raise FedmergeError(f"FedNova with normalize_by={normalize_by!r} needs {what}: give one value per client.")
    return values


class FedNovaRule(Rule):
    """Average τ_t / a_t, rescaled by ā."""

    name = "fednova"

    def __init__(self, effective_steps: Sequence[float], weights: Sequence[float] | None = None) -> None:
        super().__init__(weights)
        if effective_steps is None:
            raise FedmergeError(
                "FedNova needs each client's effective steps a_t (its step count or its sum of learning "
                "rates); method 'mean-direction' normalises by the updates' own norms instead."
            )
        self.effective_steps = effective_steps
        self.coeffs: np.ndarray | None = None

    def present_clients(self, num_clients: int) -> np.ndarray:
        positive_per_client(self.effective_steps, num_clients, "effective steps (a_t)")
        return super().present_clients(num_clients)

    def prepare(self, task_vectors, names, device) -> None:
        super().prepare(task_vectors, names, device)
        a = positive_per_client(self.per_client(self.effective_steps), len(task_vectors), "effective steps (a_t)")
        self.coeffs = float(np.dot(self.p, a)) * self.p / a

    def merge_chunk(self, name, s, values, out):
        weighted_sum_into(out, values, self.coeffs)

    def linear_coefficients(self):
        return self.coeffs

    def params(self) -> dict:
        return {"rule": self.name, "effective_steps": [float(a) for a in self.effective_steps]}


def fednova(
    task_vectors: Sequence[Tensors],
    *,
    num_steps: Sequence[float] | None = None,
    lr_sums: Sequence[float] | None = None,
    normalize_by: str | None = None,
    weights: Sequence[float] | None = None,
) -> dict[str, torch.Tensor]:
    """Δ = ā · Σ_t p_t τ_t / a_t with a_t the step counts (``steps``) or learning-rate sums (``lr-sum``); without
    ``normalize_by``, whichever of ``num_steps`` and ``lr_sums`` is given."""
    return merge(FedNovaRule(effective_steps(normalize_by, num_steps, lr_sums), weights), task_vectors)


def _given_steps(weights, steps=None, lr_sums=None) -> FedNovaRule:
    """FedNova over models whose a_t are given, one value per model (``fedmerge merge``)."""
    try:
        return FedNovaRule(effective_steps(None, steps, lr_sums), weights)
    except FedmergeError:
        raise FedmergeError(
            "method 'fednova' needs the models' effective steps a_t, one way: steps (--steps, local step "
            "counts) or lr_sums (--lr-sums, sums of learning rates), one value per model."
        ) from None


METHOD = Method(
    "fednova",
    FedNovaRule,
    "the mean of τ_t / a_t rescaled by ā, a_t each client's effective steps (Wang et al. 2020)",
    params=(
        Param(
            "normalize_by",
            Option(
                DEFAULT_NORMALIZE_BY,
                "a_t from each reply's num-steps (steps) or its sum of learning rates (lr-sum)",
                choice(*NORMALIZE_BY),
            ),
            scope="strategy",
        ),
        Param(
            "steps", Option(None, "each model's local step count a_t", positive_float), scope="merge", per_model=True
        ),
        Param(
            "lr_sums",
            Option(None, "each model's sum of learning rates Σ_k η_t^(k) as a_t (instead of --steps)", positive_float),
            scope="merge",
            per_model=True,
        ),
    ),
    make=_given_steps,
    linear=True,
)
