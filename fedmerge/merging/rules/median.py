"""Coordinate-wise median of the task vectors.

Yin et al., "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates", ICML 2018.
Δ_j = median_t τ_t,j. With an even number of clients the true median averages the two middle values
(NumPy's rule and Flower's FedMedian, ``even="mean"``); ``even="lower"`` takes the lower one, as
``torch.median`` and the paper's code do.

For up to ``NETWORK_MAX_CLIENTS`` clients the median is computed by a selection network: Batcher's
odd–even merge sort pruned to the comparators the middle positions depend on, run as element-wise
min/max over cache-sized chunks. That costs a few element-wise passes instead of a sort.
"""

from collections.abc import Sequence
from functools import lru_cache

import torch

from fedmerge.errors import FedmergeError
from fedmerge.options import Option, choice
from fedmerge.merging.method import Method, Param
from fedmerge.merging.rule import Rule, merge
from fedmerge.merging.tensors import Tensors, stacked

EVEN_RULES = ("mean", "lower")
NETWORK_MAX_CLIENTS = 32


def _batcher_comparators(n: int) -> list[tuple[int, int]]:
    """Comparators (i, j), i < j, of Batcher's odd–even merge sort on the next power of two ≥ n.

    Comparators touching padded positions ≥ n are dropped: padding with +∞ makes them no-ops.
    """
    size = 1 << max(n - 1, 0).bit_length()
    pairs = []
    p = 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return [(i, j) for i, j in pairs if j < n]


@lru_cache(maxsize=None)
def selection_network(n: int, positions: tuple[int, ...]) -> tuple[tuple[int, int, bool, bool], ...]:
    """The sorting network pruned to what the sorted ``positions`` need.

    Each step is ``(i, j, keep_min, keep_max)``: write min(x_i, x_j) to i if ``keep_min`` and the max to
    j if ``keep_max``. Found by walking the network backwards from the wanted outputs.
    """
    needed = set(positions)
    steps = []
    for i, j in reversed(_batcher_comparators(n)):
        keep_min, keep_max = i in needed, j in needed
        if keep_min or keep_max:
            steps.append((i, j, keep_min, keep_max))
            needed |= {i, j}
    return tuple(reversed(steps))


def _middle_positions(n: int, even: str) -> tuple[int, ...]:
    if n % 2 or even == "lower":
        return ((n - 1) // 2,)
    return (n // 2 - 1, n // 2)


class MedianRule(Rule):
    """The coordinate-wise median (unweighted)."""

    name = "median"

    def __init__(self, even: str = "mean") -> None:
        super().__init__(None)
        if even not in EVEN_RULES:
            raise FedmergeError(f"Median's even-count rule must be one of {EVEN_RULES}, got {even!r}.")
        self.even = even

    def merge_chunk(self, name, s, values, out):
        n = len(values)
        positions = _middle_positions(n, self.even)
        if n > NETWORK_MAX_CLIENTS:
            values = list(torch.sort(values, dim=0).values)
        else:
            values = list(values)
            spare = [torch.empty_like(values[0]), torch.empty_like(values[0])]
            for i, j, keep_min, keep_max in selection_network(n, positions):
                lo, hi = values[i], values[j]
                if keep_min:
                    values[i] = torch.minimum(lo, hi, out=spare.pop())
                if keep_max:
                    values[j] = torch.maximum(lo, hi, out=spare.pop())
                spare += [lo] if keep_min else []
                spare += [hi] if keep_max else []
        if len(positions) == 1:
            out.copy_(values[positions[0]])
        else:
            torch.add(values[positions[0]], values[positions[1]], out=out).mul_(0.5)

    def merge_integer(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """The median, by the same even-count rule, rounded: for booleans the majority (a tie keeps the base)."""
        ranked = torch.sort(stacked(tensors, torch.int64), dim=0).values[
            list(_middle_positions(len(tensors), self.even))
        ]
        return torch.round(ranked.to(torch.float64).mean(0)).to(torch.int64)

    def params(self) -> dict:
        return {"rule": self.name, "even": self.even}


def median(task_vectors: Sequence[Tensors], even: str = "mean") -> dict[str, torch.Tensor]:
    """Δ_j = median_t τ_t,j; ``even`` = ``mean`` (true median) or ``lower`` for an even client count."""
    return merge(MedianRule(even), task_vectors)


METHOD = Method(
    "median",
    MedianRule,
    "the coordinate-wise median of the task vectors, unweighted (Yin et al. 2018)",
    params=(
        Param(
            "even",
            Option(
                "mean",
                "with an even number of clients: average the two middle values (mean) or take the lower (lower)",
                choice(*EVEN_RULES),
            ),
        ),
    ),
    weighted=False,
    scale="mean",
    no_lambda="its paper (Yin et al. 2018) defines no λ, and the median of two models is their mean",
)
