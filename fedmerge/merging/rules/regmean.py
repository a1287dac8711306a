"""RegMean: each linear layer the weights that best reproduce every client's layer on that client's inputs.

Jin, Ren, Preotiuc-Pietro, Cheng, "Dataless Knowledge Fusion by Merging Weights of Language Models", ICLR 2023. For a
linear layer y = W x (W: out × in) and G_t = X_tᵀ X_t the Gram matrix of its inputs on client t's data
(:data:`fedmerge.contract.GRAMS`), min_W Σ_t ‖X_t Wᵀ − X_t W_tᵀ‖² has the closed form W = (Σ_t W_t G_t)(Σ_t G_t)⁻¹.
The paper regularises it by shrinking the off-diagonal entries of each Gram by α ∈ [0, 1],
G̃_t = α·G_t + (1 − α)·diag(G_t) (α = 1: none; α = 0: per input feature, the average weighted by its energy). As Σ_t G̃_t
multiplies θ back to itself, the update is

    Δ = (Σ_t λ_t τ_t G̃_t)(Σ_t λ_t G̃_t)⁺,

λ_t the models' weights (here p_t; uniform in the paper) and ⁺ the pseudo-inverse, which is the inverse where the
inputs span every feature, and leaves the columns of features no client's inputs reach unchanged. A client's G_t is
the mean over its inputs' rows (the paper's code and FusionBench), so with ``weighting="num-examples"`` Σ_t p_t G_t is the
Gram of all the clients' data. Every other tensor (biases, norms, embeddings) is the weighted mean of the τ_t. Equal
Grams give FedAvg.

Each layer is merged whole, one client's τ_t and G̃_t at a time: memory holds Σ_t λ_t G̃_t, Σ_t λ_t τ_t G̃_t and one
client's pair. The paper merges the models themselves and defines no λ (β = 1 gives its W); α is searched beside β
one-shot unless given.
"""

from collections.abc import Sequence

import torch

from fedmerge.merging.client_statistics import EXAMPLES, GRAMS, check_count, check_finite, client_labels, covered
from fedmerge.merging.method import Method, Param
from fedmerge.merging.rule import Rule, merge
from fedmerge.merging.rules.slerp import interpolation
from fedmerge.merging.tensors import Tensors, read_whole, source, weighted_sum_into
from fedmerge.options import Option

WHAT = "input Gram matrices"


def shrunk(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """G̃ = α·G + (1 − α)·diag(G), in place."""
    diagonal = gram.diagonal().clone()
    gram.mul_(alpha).diagonal().copy_(diagonal)
    return gram


class RegMeanRule(Rule):
    """Regression mean of each linear layer; the weighted mean of every other tensor.

    ``grams``: each client's input Gram matrices, name of a linear layer's weight → in × in; ``labels`` name them in
    messages (default ``client t``).
    """

    name = "regmean"

    def __init__(
        self,
        grams: Sequence[Tensors],
        alpha: float = 0.9,
        weights: Sequence[float] | None = None,
        labels: Sequence[str] | None = None,
    ) -> None:
        super().__init__(weights)
        self.grams, self.labels = grams, labels
        self.alpha = interpolation("RegMean alpha", alpha)
        self.layers: set[str] = set()
        self.who: list[str] = []

    def present_clients(self, num_clients: int):
        check_count(self.grams, num_clients, "the Gram matrices")
        return super().present_clients(num_clients)

    def prepare(self, task_vectors, names, device) -> None:
        super().prepare(task_vectors, names, device)
        self.who = client_labels(self.labels, self.present)
        self.layers = covered(
            self.per_client(self.grams),
            self.who,
            task_vectors,
            names,
            WHAT,
            lambda shape: (shape[1], shape[1]) if len(shape) == 2 else None,
        )

    def merges_whole(self, name, shape) -> bool:
        return name in self.layers

    def merge_whole(self, name, clients, out):
        rows, columns = clients.shape
        total = torch.zeros(columns, columns, dtype=clients.dtype, device=clients.device)  # Σ_t λ_t G̃_t
        product = torch.zeros(rows, columns, dtype=clients.dtype, device=clients.device)  # Σ_t λ_t τ_t G̃_t
        for t, (grams, p) in enumerate(zip(self.per_client(self.grams), self.p)):
            gram = read_whole(source(grams, name), clients.dtype, clients.device)
            check_finite(gram[None], self.who[t : t + 1], WHAT, name)
            shrunk(gram, self.alpha).mul_(float(p))
            total += gram
            product.addmm_(clients[t], gram)
        torch.mm(product, torch.linalg.pinv(total, hermitian=True), out=out)

    def merge_chunk(self, name, s, values, out):
        weighted_sum_into(out, values, self.p)

    def params(self) -> dict:
        return {"rule": self.name, "alpha": self.alpha}


def regmean(
    task_vectors, grams: Sequence[Tensors], alpha: float = 0.9, weights: Sequence[float] | None = None
) -> dict[str, torch.Tensor]:
    """Δ of RegMean: each linear layer's closed form from the clients' input Grams, the weighted mean elsewhere."""
    return merge(RegMeanRule(grams, alpha, weights), task_vectors)


ALPHAS = (0.1, 0.3, 0.5, 0.7, 0.9)  # searched one-shot beside β: the paper's and FusionBench's values lie among them
METHOD = Method(
    "regmean",
    RegMeanRule,
    "RegMean: each linear layer the least-squares fit of every client's layer on its inputs, "
    "from the Gram matrices each client sends (Jin et al. 2023); other tensors the mean",
    params=(
        Param(
            "alpha",
            Option(
                0.9,
                "α, the factor on each Gram's off-diagonal entries, in [0, 1] (1: the plain "
                "closed form; smaller: closer to the mean)",
                interpolation,
            ),
        ),
        EXAMPLES,
    ),
    statistics=(GRAMS,),
    tuned="alpha",
    grid=lambda norms: list(ALPHAS),
    scale="mean",
    no_lambda="RegMean (Jin et al. 2023) solves for the merged weights themselves and defines no λ",
)
