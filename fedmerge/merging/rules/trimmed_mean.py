"""Coordinate-wise trimmed mean of the task vectors.

Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates",
ICML 2018. For β ∈ [0, 1/2), per coordinate j drop the b = ⌊β·T⌋ largest and the b smallest τ_t,j and average the
T − 2b left: Δ_j = (1/(T − 2b)) Σ_{k=b+1}^{T−b} τ_(k),j, τ_(k),j the k-th smallest. ⌊β·T⌋ is Flower's FedTrimmedAvg's
and SciPy's ``trim_mean``'s count. Unweighted; β = 0 (or b = 0) is the mean.
"""

from collections.abc import Sequence

import torch

from fedmerge.errors import FedmergeError
from fedmerge.merging.method import Method, Param
from fedmerge.merging.rule import Rule, merge
from fedmerge.merging.tensors import Tensors
from fedmerge.options import Option

FRACTIONS = (0.0, 0.1, 0.2, 0.3, 0.4)  # β searched one-shot (those trimming the same count once)


def trim_fraction(name: str, value) -> float:
    """β: a number in [0, 0.5)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 0.5:
        raise FedmergeError(
            f"option {name!r} must be a number in [0, 0.5) (the share trimmed at each end), got {value!r}."
        )
    return float(value)


def trimmed_count(beta: float, num_clients: int) -> int:
    """b = ⌊β·T⌋, the values dropped at each end (as Flower and SciPy count them)."""
    return int(beta * num_clients)


class TrimmedMeanRule(Rule):
    """Per coordinate, the mean of the task vectors' values without the b largest and b smallest."""

    name = "trimmed-mean"

    def __init__(self, beta: float = 0.2) -> None:
        super().__init__(None)
        self.beta = trim_fraction("TrimmedMeanRule.beta", beta)
        self.cut: int | None = None

    def prepare(self, task_vectors, names, device) -> None:
        super().prepare(task_vectors, names, device)
        self.cut = trimmed_count(self.beta, len(task_vectors))

    def merge_chunk(self, name, s, values, out):
        kept = torch.sort(values, dim=0).values[self.cut : len(values) - self.cut] if self.cut else values
        torch.mean(kept, dim=0, out=out)

    def params(self) -> dict:
        return {"rule": self.name, "beta": self.beta, **({} if self.cut is None else {"trimmed": self.cut})}


def trimmed_mean(task_vectors: Sequence[Tensors], beta: float = 0.2) -> dict[str, torch.Tensor]:
    """Δ_j = the mean of τ_t,j without the ⌊β·T⌋ largest and smallest."""
    return merge(TrimmedMeanRule(beta), task_vectors)


def beta_grid(task_vector_norms: Sequence[float]) -> list[float]:
    """The β of :data:`FRACTIONS` that trim different counts of T clients (the first of each count)."""
    chosen: dict[int, float] = {}
    for beta in FRACTIONS:
        chosen.setdefault(trimmed_count(beta, len(task_vector_norms)), beta)
    return list(chosen.values())


METHOD = Method(
    "trimmed-mean",
    TrimmedMeanRule,
    "the coordinate-wise mean of the task vectors without the ⌊β·T⌋ largest and "
    "smallest values, unweighted (Yin et al. 2018)",
    params=(
        Param(
            "beta",
            Option(
                0.2,
                "β, the share of clients trimmed at each end per coordinate, in [0, 0.5) "
                "(Flower's FedTrimmedAvg beta; not the server learning rate)",
                trim_fraction,
            ),
        ),
    ),
    weighted=False,
    tuned="beta",
    grid=beta_grid,
    scale="mean",
    no_lambda="its paper (Yin et al. 2018) defines no λ, and with β = 0 it is the mean",
)
