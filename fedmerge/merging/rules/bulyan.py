"""Bulyan: Krum's selection, then per coordinate the mean of the values nearest the median.

El Mhamdi, Guerraoui, Rouault, "The Hidden Vulnerability of Distributed Learning in Byzantium", ICML 2018. With f
malicious clients assumed among T ≥ 4f + 3: select θ = T − 2f updates by Krum applied again and again to those
left (:mod:`fedmerge.merging.rules.krum`), then per coordinate j average the β = θ − 2f selected values nearest
their median, Δ_j = (1/β) Σ_{t ∈ M_j} τ_t,j with M_j = argmin_{|M| = β} Σ_{t ∈ M} |τ_t,j − median_s τ_s,j|.

Details the paper leaves open, settled as Flower does where Flower settles them: the median of an even θ averages
the two middle values (NumPy's, Flower's); Krum over the last few left (|R| − f − 2 < 1) scores by the nearest other
(Flower's ``aggregate_bulyan``). Where values on both sides of the median are equally far at the β-th place, M_j is
not unique: the places left are shared equally among those tied values (the mean over every M_j the paper allows;
Flower takes whichever ``argpartition`` puts first). ``selection="multi-krum"`` selects the θ updates of least
Krum score in one pass instead, as Flower's Message-API ``Bulyan`` strategy does.
"""

from collections.abc import Sequence

import numpy as np
import torch

from fedmerge.errors import FedmergeError
from fedmerge.merging.method import Method, Param
from fedmerge.merging.rule import Rule, merge
from fedmerge.merging.rules.krum import (
    check_count,
    finite_count,
    krum_scores,
    least,
    malicious,
    require_clients,
    spread,
    squared_distances,
)
from fedmerge.merging.rules.median import MedianRule
from fedmerge.merging.tensors import Tensors, gram_matrix
from fedmerge.options import Option, choice


def recursive_selection(distances: np.ndarray, malicious: int, count: int) -> list[int]:
    """``count`` updates chosen one at a time, each Krum's choice among those left R (|R| − f − 2 neighbours)."""
    left = list(range(len(distances)))
    chosen = []
    for _ in range(count):
        best = left[int(least(krum_scores(distances[np.ix_(left, left)], malicious), 1)[0])]
        chosen.append(best)
        left.remove(best)
    return chosen


def one_pass_selection(distances: np.ndarray, malicious: int, count: int) -> list[int]:
    """The ``count`` updates of least Krum score."""
    return [int(t) for t in least(krum_scores(distances, malicious), count)]


SELECTIONS = {"recursive": recursive_selection, "multi-krum": one_pass_selection}


def nearest_mean_into(out: torch.Tensor, values: torch.Tensor, center: torch.Tensor, keep: int) -> torch.Tensor:
    """out_j = the mean of the ``keep`` values of column j nearest ``center_j``; values tied at the ``keep``-th
    distance share the places left equally."""
    distance = (values - center).abs_()
    bound = torch.kthvalue(distance, keep, dim=0).values
    inside, tied = distance < bound, distance == bound
    total = torch.where(inside, values, 0.0).sum(0)
    tied_mean = torch.where(tied, values, 0.0).sum(0) / tied.sum(0)
    return out.copy_(total.add_(tied_mean.mul_(keep - inside.sum(0))).div_(keep))


class BulyanRule(Rule):
    """Krum's selection of θ = T − 2f updates, then the coordinate-wise mean of the β = θ − 2f nearest the median."""

    name = "bulyan"

    def __init__(self, num_malicious_nodes: int = 0, selection: str = "recursive") -> None:
        super().__init__(None)
        if selection not in SELECTIONS:
            raise FedmergeError(f"Bulyan's selection must be one of {', '.join(SELECTIONS)}, got {selection!r}.")
        self.malicious = check_count("Bulyan", "num_malicious_nodes f", num_malicious_nodes)
        self.selection = selection
        self.selected: list[int] | None = None
        self.median = MedianRule("mean")

    def prepare(self, task_vectors, names, device) -> None:
        super().prepare(task_vectors, names, device)
        num_clients = len(task_vectors)
        require_clients("Bulyan", num_clients, self.malicious, 4)
        with np.errstate(invalid="ignore", over="ignore"):  # non-finite inputs: the driver's norms flag them
            distances = squared_distances(gram_matrix(task_vectors, names, device))
        self.selected = SELECTIONS[self.selection](distances, self.malicious, num_clients - 2 * self.malicious)

    def merge_chunk(self, name, s, values, out):
        selected = values[self.selected]  # a copy, kept: the median overwrites the rows it is given
        center = torch.empty_like(out)
        self.median.merge_chunk(name, s, selected.clone(), center)
        nearest_mean_into(out, selected, center, len(self.selected) - 2 * self.malicious)

    def params(self) -> dict:
        chosen = {} if self.selected is None else {"selected": [int(self.present[t]) for t in self.selected]}
        return {"rule": self.name, "num_malicious_nodes": self.malicious, "selection": self.selection, **chosen}


def bulyan(
    task_vectors: Sequence[Tensors],
    num_malicious_nodes: int = 0,
    selection: str = "recursive",
) -> dict[str, torch.Tensor]:
    """Δ = Bulyan over the task vectors, f = ``num_malicious_nodes``."""
    return merge(BulyanRule(num_malicious_nodes, selection), task_vectors)


METHOD = Method(
    "bulyan",
    BulyanRule,
    "Krum's selection of T − 2f task vectors, then per coordinate the mean of the T − 4f "
    "nearest their median (El Mhamdi et al. 2018)",
    params=(
        malicious("Bulyan needs T ≥ 4f + 3"),
        Param(
            "selection",
            Option(
                "recursive",
                "how the T − 2f updates are chosen: Krum again and again over those left (recursive, the paper's) "
                "or the least Krum scores of one pass (multi-krum, Flower's Bulyan strategy)",
                choice(*SELECTIONS),
            ),
        ),
    ),
    weighted=False,
    tuned="num_malicious_nodes",
    grid=lambda norms: spread(0, (finite_count(norms) - 3) // 4),
    scale="mean",
    no_lambda="its paper (El Mhamdi et al. 2018) defines no λ, and with f = 0 it is the mean",
)
