"""DELLA: drop each task-vector entry with a probability that falls with its magnitude's rank, rescale, elect signs.

Deep, Bhardwaj, Poria, "DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based Sampling",
2024 (MagPrune). Within each row of τ_t (a matrix's row, a higher tensor's slice along its first axis, a vector
whole), rank the n entries by magnitude, r = 0 the smallest; entry j is kept with probability

    q_j = k − ε + 2ε · r_j / (n − 1)          (q = k in a row of one entry)

so the row keeps a share k on average and its largest entries most often (density k, mergekit's ε, the half-width:
ε < min(k, 1 − k)); a kept entry is rescaled by 1/q_j (the paper's 1/(1 − p_j), p_j the drop probability), so
E[τ̃_t] = τ_t. Then TIES's elected sign and disjoint mean over the τ̃_t (:func:`~fedmerge.merging.rules.ties.disjoint_mean_into`),
λ multiplying Δ. ε = 0 is DARE-TIES with the same draws; density 1 keeps every entry.

The draws are DARE's (:mod:`fedmerge.merging.rules.dare`): position j of a tensor is kept when its 32 random bits,
hashed from (seed, round, client, tensor name, j), fall below round(q_j·2³²). Ties in magnitude rank by position. A row
is ranked whole: a chunk reads the rest of the rows it cuts from the client's tensor. mergekit's ``della`` ranks along
a tensor's second axis (the same rows for matrices, not for tensors of three axes or more) and rescales each τ̃_t to
τ_t's L1 norm instead of by 1/q_j (``rescale: true``, its default).
"""

from collections.abc import Sequence

import torch

from fedmerge.errors import FedmergeError
from fedmerge.merging.method import Method, Param
from fedmerge.merging.rule import Rule, merge
from fedmerge.merging.rules.dare import SEED, WORD, random_bits, stream_key
from fedmerge.merging.rules.ties import disjoint_mean_into
from fedmerge.merging.tensors import Term, read_chunk
from fedmerge.options import Option, non_negative_float, non_negative_int, proportion


def row_length(shape: torch.Size) -> int:
    """The entries per row ranked together: a matrix's (or a higher tensor's) trailing size, a vector's all."""
    return shape[1:].numel() if len(shape) >= 2 else shape.numel()


def keep_probabilities(magnitude: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """q = k − ε + 2ε · r / (n − 1) of each entry of the rows of ``magnitude`` (m, n), r its rank in its row by
    magnitude (0 the smallest, ties by position), in float64."""
    m, n = magnitude.shape
    if n == 1:
        return torch.full((m, 1), density, dtype=torch.float64, device=magnitude.device)
    order = torch.argsort(magnitude, dim=1, stable=True)
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=order.device).expand(m, n))
    return ranks.to(torch.float64).mul_(2 * epsilon / (n - 1)).add_(density - epsilon)


class DellaRule(Rule):
    """MagPrune's magnitude-ranked drops and rescaling, then TIES's elected sign and disjoint mean."""

    name = "della"

    def __init__(
        self,
        density: float = 0.2,
        epsilon: float = 0.15,
        seed: int = 0,
        weights: Sequence[float] | None = None,
        clients: Sequence[int] | None = None,
        draw: int = 0,
    ) -> None:
        super().__init__(weights)
        self.density = proportion("DELLA density", density)
        self.epsilon = non_negative_float("DELLA epsilon", epsilon)
        if self.density < 1 and not self.epsilon < min(self.density, 1 - self.density):
            raise FedmergeError(
                f"DELLA keeps entries with probabilities k ± ε, which must lie in (0, 1): density k = "
                f"{self.density:g} needs epsilon ε < {min(self.density, 1 - self.density):g}, got "
                f"{self.epsilon:g}."
            )
        self.seed = non_negative_int("DELLA seed", seed)
        self.clients = clients  # each client's identity in the draws (default: its position)
        self.draw = draw  # a round's number: each round drops other entries
        self.found: list[Term] = []

    def prepare_tensor(self, name, found, dtype, device, pool) -> None:
        self.found = found

    def merge_chunk(self, name, s, values, out):
        if self.density < 1:
            for t, term, row in zip(self.present, self.found, values):
                client = int(t) if self.clients is None else int(self.clients[t])
                keep = self._probabilities(term, s, row)
                bits = random_bits(stream_key(self.seed, self.draw, client, name), s, row.device).to(torch.int64)
                kept = (bits & (WORD - 1)) < keep.mul(WORD).round_().clamp_(max=WORD - 1).to(torch.int64)
                row.mul_(kept).div_(keep.to(row.dtype))
        disjoint_mean_into(out, values, self.p)

    def _probabilities(self, term: Term, s: slice, row: torch.Tensor) -> torch.Tensor:
        """q_j of the positions of ``s``, from the whole rows they lie in: ``row`` (τ_t's chunk) and the rest of its
        first and last rows, read from the client's tensor."""
        n = row_length(term.shape)
        start, stop = s.start - s.start % n, s.stop + (-s.stop) % n
        rows = torch.empty(stop - start, dtype=row.dtype, device=row.device)
        rows[s.start - start : s.stop - start] = row
        for part in (slice(start, s.start), slice(s.stop, stop)):
            if part.stop > part.start:
                where = rows[part.start - start : part.stop - start]
                read_chunk([term], part, where.view(1, -1), torch.empty_like(where))
        keep = keep_probabilities(rows.abs_().view(-1, n), self.density, self.epsilon)
        return keep.view(-1)[s.start - start : s.stop - start]

    def params(self) -> dict:
        return {"rule": self.name, "density": self.density, "epsilon": self.epsilon, "seed": self.seed}


def della(
    task_vectors, density: float = 0.2, epsilon: float = 0.15, seed: int = 0, weights: Sequence[float] | None = None
) -> dict[str, torch.Tensor]:
    """Δ of DELLA (MagPrune's drops with density k and half-width ε, the draws' ``seed``; TIES's disjoint mean)."""
    return merge(DellaRule(density, epsilon, seed, weights), task_vectors)


DELLA_DENSITIES = (0.2, 0.3, 0.5, 0.7)  # searched one-shot: k ± ε in (0, 1) for ε up to mergekit's default 0.15
METHOD = Method(
    "della",
    DellaRule,
    "DELLA: entries dropped at random, the small ones more often, rescaled by 1/q, then TIES's "
    "elected sign and disjoint mean (Deep et al. 2024)",
    params=(
        Param("density", Option(0.2, "k, the mean share of each row's entries kept, in (0, 1]", proportion)),
        Param(
            "epsilon",
            Option(
                0.15,
                "ε, keep probabilities from k − ε (the smallest magnitude in a row) to k + ε "
                "(the largest); ε < min(k, 1 − k)",
                non_negative_float,
            ),
        ),
        SEED,
    ),
    tuned="density",
    grid=lambda norms: list(DELLA_DENSITIES),
    scale="mean",
)
