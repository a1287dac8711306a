"""Fisher merging: each parameter the average of the clients' values weighted by their diagonal Fisher information.

Matena & Raffel, "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022. With F_t client t's diagonal Fisher
at its trained weights θ_t (:data:`fedmerge.contract.FISHER`: the mean over a sample of its training data of the
squared gradient of log p(y | x), y drawn from the model) and λ_t the models' weights (here p_t):

    θ*_j = Σ_t λ_t (F_t,j + ε) θ_t,j / Σ_t λ_t (F_t,j + ε),

ε a floor (FusionBench's ``minimal_fisher_weight``, 1e-6) so that a parameter no client's data reaches is the
weighted mean. θ* being a weighted average per coordinate, Δ = θ* − θ = Σ_t λ_t (F_t + ε) τ_t / Σ_t λ_t (F_t + ε), chunk by
chunk: each chunk of the clients' Fishers is read beside their τ_t's (where they lie: a reply's arrays, a file), so
the driver's scratch memory doubles (T chunks of Fisher per worker beside T of τ). Tensors the Fisher records do not
cover (buffers) are the weighted mean of the τ_t. Equal Fishers give FedAvg.

The paper merges the models themselves and defines no λ: β = 1 gives θ* (``Method.no_lambda``). FusionBench's
optional normalisation of each model's Fisher by its norm is not the paper's and is not done.
"""

from collections.abc import Sequence

import torch

from fedmerge.merging.client_statistics import EXAMPLES, FISHER, check_count, check_finite, client_labels, covered
from fedmerge.merging.method import Method, Param
from fedmerge.merging.rule import Rule, merge
from fedmerge.merging.tensors import Tensors, coefficients, read_into, source, weighted_sum_into
from fedmerge.options import Option, positive_float

WHAT = "diagonal Fisher"


class FisherRule(Rule):
    """Fisher-weighted averaging of the clients' parameters.

    ``fisher``: each client's diagonal Fisher (name → tensor in the parameter's shape); ``labels`` name them in
    messages (default ``client t``).
    """

    name = "fisher"

    def __init__(
        self,
        fisher: Sequence[Tensors],
        floor: float = 1e-6,
        weights: Sequence[float] | None = None,
        labels: Sequence[str] | None = None,
    ) -> None:
        super().__init__(weights)
        self.fisher, self.labels = fisher, labels
        self.floor = positive_float("Fisher floor", floor)
        self.covered: set[str] = set()
        self.who: list[str] = []
        self.sources: list = []

    def present_clients(self, num_clients: int):
        check_count(self.fisher, num_clients, "the diagonal Fishers")
        return super().present_clients(num_clients)

    def prepare(self, task_vectors, names, device) -> None:
        super().prepare(task_vectors, names, device)
        self.who = client_labels(self.labels, self.present)
        self.covered = covered(self.per_client(self.fisher), self.who, task_vectors, names, WHAT, lambda shape: shape)

    def prepare_tensor(self, name, found, dtype, device, pool) -> None:
        self.sources = [source(f, name) for f in self.per_client(self.fisher)] if name in self.covered else []

    def merge_chunk(self, name, s, values, out):
        if not self.sources:
            weighted_sum_into(out, values, self.p)
            return
        fisher = torch.empty_like(values)
        for row, src in zip(fisher, self.sources):
            read_into(src, s, row)
        check_finite(fisher, self.who, WHAT, name)
        p = coefficients(tuple(map(float, self.p)), values.dtype, values.device).view(-1, 1)
        fisher.add_(self.floor).mul_(p)  # λ_t (F_t + ε)
        torch.div((values * fisher).sum(0), fisher.sum(0), out=out)

    def params(self) -> dict:
        return {"rule": self.name, "floor": self.floor}


def fisher_merge(
    task_vectors, fisher: Sequence[Tensors], floor: float = 1e-6, weights: Sequence[float] | None = None
) -> dict[str, torch.Tensor]:
    """Δ of Fisher merging: the task vectors averaged with weights p_t (F_t + ε), per coordinate."""
    return merge(FisherRule(fisher, floor, weights), task_vectors)


METHOD = Method(
    "fisher",
    FisherRule,
    "Fisher merging: each parameter the clients' values averaged with their diagonal Fisher as "
    "weights (Matena & Raffel 2022); each client sends its Fisher",
    params=(
        Param(
            "floor",
            Option(
                1e-6,
                "ε added to every Fisher entry, so that a parameter no client's data reaches is the weighted mean",
                positive_float,
            ),
        ),
        EXAMPLES,
    ),
    statistics=(FISHER,),
    scale="mean",
    no_lambda="Fisher merging (Matena & Raffel 2022) averages the models themselves and defines no λ",
)
