"""Krum and Multi-Krum: the updates nearest their nearest neighbours.

Blanchard, El Mhamdi, Guerraoui, Stainer, "Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent",
NeurIPS 2017. With f malicious clients assumed among T > 2f + 2, update t's score is the sum of its squared distances
to its T − f − 2 nearest others, s(t) = Σ_{u ∈ N_t} ‖τ_t − τ_u‖². Krum takes the update of least score, Δ = τ_t*;
Multi-Krum averages the m of least score, Δ = Σ_{t ∈ S} p_t τ_t / Σ_{t ∈ S} p_t (uniform p is the paper's;
``weighting="num-examples"`` is Flower's MultiKrum). Equal scores go to the client given first; m = T is FedAvg.

The distances need no whole update in memory: one pass computes the task vectors' Gram matrix G (T² numbers), and
‖τ_t − τ_u‖² = G_tt + G_uu − 2 G_tu; a second pass writes Δ as a weighted sum of the selected task vectors.
"""

from collections.abc import Sequence

import numpy as np
import torch

from fedmerge.errors import FedmergeError
from fedmerge.merging.method import Method, Param
from fedmerge.merging.rule import Rule, merge
from fedmerge.merging.tensors import Tensors, gram_matrix, weighted_sum_into
from fedmerge.options import Option, non_negative_int

CANDIDATES = 5  # values of a count searched one-shot, at most


def squared_distances(gram: np.ndarray) -> np.ndarray:
    """D[t, u] = ‖τ_t − τ_u‖² from the Gram matrix (0 on the diagonal; rounding below 0 clipped)."""
    norms = np.diag(gram)
    distances = np.maximum(norms[:, None] + norms[None, :] - 2.0 * gram, 0.0)
    np.fill_diagonal(distances, 0.0)
    return distances


def krum_scores(distances: np.ndarray, malicious: int) -> np.ndarray:
    """Each update's score: the sum of its squared distances to its T − f − 2 nearest others, kept within 1..T − 1
    (as Flower keeps it: only Bulyan's last selections, over few updates, reach the bounds)."""
    count = len(distances)
    others = distances[~np.eye(count, dtype=bool)].reshape(count, count - 1)
    return np.sort(others, axis=1)[:, : max(1, count - malicious - 2)].sum(axis=1)


def least(scores: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` updates of least score, best first; equal scores in the order given."""
    return np.argsort(scores, kind="stable")[:count]


def require_clients(title: str, num_clients: int, malicious: int, per_malicious: int) -> None:
    """Refuse fewer than ``per_malicious``·f + 3 clients (Krum: T ≥ 2f + 3, i.e. T > 2f + 2; Bulyan: T ≥ 4f + 3)."""
    need = per_malicious * malicious + 3
    if num_clients < need:
        most = (num_clients - 3) // per_malicious
        fix = f"lower num_malicious_nodes to at most {most} or merge" if most >= 0 else "merge"
        raise FedmergeError(
            f"{title} needs T ≥ {per_malicious}f + 3 clients (models): with num_malicious_nodes f = {malicious} that "
            f"is {need}, but {num_clients} were given; {fix} at least {need} clients."
        )


def check_count(title: str, name: str, value: int) -> int:
    """A count given to a rule directly: an integer ≥ 0."""
    if isinstance(value, bool) or int(value) != value or value < 0:
        raise FedmergeError(f"{title}'s {name} must be an integer ≥ 0, got {value!r}.")
    return int(value)


class MultiKrumRule(Rule):
    """The p-weighted mean of the m task vectors of least Krum score (m = 0: T − f)."""

    name = "multi-krum"
    title = "Multi-Krum"

    def __init__(
        self, num_malicious_nodes: int = 0, num_nodes_to_select: int = 0, weights: Sequence[float] | None = None
    ) -> None:
        super().__init__(weights)
        self.malicious = check_count(self.title, "num_malicious_nodes f", num_malicious_nodes)
        self.to_select = check_count(self.title, "num_nodes_to_select m", num_nodes_to_select)
        self.coeffs: np.ndarray | None = None
        self.selected: np.ndarray | None = None
        self.scores: np.ndarray | None = None

    def prepare(self, task_vectors, names, device) -> None:
        super().prepare(task_vectors, names, device)
        num_clients = len(task_vectors)
        require_clients("Krum", num_clients, self.malicious, 2)
        count = self.to_select or num_clients - self.malicious
        if count > num_clients:
            raise FedmergeError(
                f"{self.title} cannot select num_nodes_to_select m = {count} of {num_clients} clients "
                f"(models); give m ≤ {num_clients} (0: T − f, all but the f assumed malicious)."
            )
        with np.errstate(invalid="ignore", over="ignore"):  # non-finite inputs: the driver's norms flag them
            distances = squared_distances(gram_matrix(task_vectors, names, device))
            self.scores = krum_scores(distances, self.malicious)
        self.selected = least(self.scores, count)
        self.coeffs = np.zeros(num_clients)
        self.coeffs[self.selected] = self.p[self.selected] / self.p[self.selected].sum()

    def merge_chunk(self, name, s, values, out):
        weighted_sum_into(out, values, self.coeffs)

    def params(self) -> dict:
        chosen = (
            {}
            if self.selected is None
            else {"selected": [int(self.present[t]) for t in self.selected], "scores": [float(x) for x in self.scores]}
        )
        return {
            "rule": self.name,
            "num_malicious_nodes": self.malicious,
            "num_nodes_to_select": self.to_select,
            **chosen,
        }


class KrumRule(MultiKrumRule):
    """The task vector of least Krum score (Multi-Krum with m = 1, as in Flower)."""

    name = "krum"
    title = "Krum"

    def __init__(self, num_malicious_nodes: int = 0) -> None:
        super().__init__(num_malicious_nodes, 1)


def krum(task_vectors: Sequence[Tensors], num_malicious_nodes: int = 0) -> dict[str, torch.Tensor]:
    """Δ = the τ_t of least Krum score, f = ``num_malicious_nodes``."""
    return merge(KrumRule(num_malicious_nodes), task_vectors)


def multi_krum(
    task_vectors: Sequence[Tensors],
    num_malicious_nodes: int = 0,
    num_nodes_to_select: int = 0,
    weights: Sequence[float] | None = None,
) -> dict[str, torch.Tensor]:
    """Δ = the p-weighted mean of the m = ``num_nodes_to_select`` τ_t of least Krum score (0: T − f)."""
    return merge(MultiKrumRule(num_malicious_nodes, num_nodes_to_select, weights), task_vectors)


def spread(low: int, high: int) -> list[int]:
    """At most :data:`CANDIDATES` integers evenly spread from ``low`` to ``high`` (both included; [low] if empty)."""
    if high <= low:
        return [low]
    return sorted({round(low + k * (high - low) / (CANDIDATES - 1)) for k in range(CANDIDATES)})


def finite_count(task_vector_norms: Sequence[float]) -> int:
    """T as the one-shot search sees it: the clients whose update is finite."""
    return sum(1 for norm in task_vector_norms if np.isfinite(norm))


def malicious(requirement: str) -> Param:
    """The parameter f, its help ending with the method's ``requirement`` on T."""
    return Param(
        "num_malicious_nodes",
        Option(
            0,
            f"f, the number of malicious clients assumed (Flower's num_malicious_nodes); {requirement}",
            non_negative_int,
        ),
    )


KRUM = Method(
    "krum",
    KrumRule,
    "the task vector of least sum of squared distances to its T − f − 2 nearest others (Blanchard et al. 2017)",
    params=(malicious("Krum needs T ≥ 2f + 3"),),
    weighted=False,
    tuned="num_malicious_nodes",
    grid=lambda norms: spread(0, (finite_count(norms) - 3) // 2),
    scale="mean",
    no_lambda="its paper (Blanchard et al. 2017) defines no λ, and its update is one client's own τ_t",
)
SELECT = Param(
    "num_nodes_to_select",
    Option(
        0,
        "m, the updates averaged (Flower's num_nodes_to_select); 0: T − f, all but the f assumed malicious",
        non_negative_int,
    ),
)
MULTI = Method(
    "multi-krum",
    MultiKrumRule,
    "the p-weighted mean of the m task vectors of least Krum score (Blanchard et al. "
    "2017; uniform p is the paper's, num-examples Flower's MultiKrum)",
    params=(malicious("Krum's scores need T ≥ 2f + 3"), SELECT),
    tuned="num_nodes_to_select",
    grid=lambda norms: spread(1, finite_count(norms)),
    scale="mean",
    no_lambda="its paper (Blanchard et al. 2017) defines no λ, and with m = T it is the mean",
)
