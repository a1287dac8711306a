"""Model Stock: the mean of the fine-tunes, pulled toward the base by the angle between them, per layer.

Jang, Yun, Han, "Model Stock: All we need is just a few fine-tuned models", ECCV 2024. Per tensor, with k fine-tunes
and cos θ the mean, over pairs s < t, of the cosine between their task vectors τ_s and τ_t, the merged weights are
t·θ̄ + (1 − t)·θ with θ̄ the mean of the fine-tunes and

    t = k·cos θ / (1 + (k − 1)·cos θ),

so Δ = t · (1/k) Σ_t τ_t. Fine-tunes that agree (cos θ → 1) give their mean (t → 1); orthogonal ones give the base
(t = 0). The denominator is ≥ 0 (the mean pairwise cosine of k directions is at least −1/(k − 1)) and 0 only where the
unit task vectors sum to 0: there t = 0 (the base), as mergekit does. A zero task vector has cosine 0 with every
other. Unweighted; at least two fine-tunes.

mergekit's ``model_stock`` (per tensor, as here) clamps the product of the two norms at 1e-6 before dividing, which
shrinks the cosine of task vectors that small; here the cosine is exact.
"""

import numpy as np

from fedmerge.errors import FedmergeError
from fedmerge.merging.method import Method
from fedmerge.merging.rule import Rule, merge
from fedmerge.merging.rules.slerp import tensor_gram
from fedmerge.merging.tensors import weighted_sum_into

SINGULAR = 1e-6  # |1 + (k − 1)·cos θ| below which t is 0 (mergekit's)


def interpolation_ratio(gram: np.ndarray) -> float:
    """t = k·cos θ / (1 + (k − 1)·cos θ) from the Gram matrix G_st = ⟨τ_s, τ_t⟩ of k task vectors."""
    k = len(gram)
    norms = np.sqrt(np.maximum(np.diag(gram), 0.0))
    products = np.outer(norms, norms)
    cosines = np.clip(np.divide(gram, products, out=np.zeros_like(gram), where=products > 0), -1.0, 1.0)
    cos = float(cosines[np.triu_indices(k, 1)].mean())
    denominator = 1.0 + (k - 1) * cos
    return 0.0 if abs(denominator) < SINGULAR else k * cos / denominator


class ModelStockRule(Rule):
    """The mean task vector scaled by Model Stock's t, found per tensor from the angles between the task vectors."""

    name = "model-stock"

    def __init__(self) -> None:
        super().__init__(None)
        self.ratios: dict[str, float] = {}

    def prepare(self, task_vectors, names, device) -> None:
        if len(task_vectors) < 2:
            raise FedmergeError(
                f"Model Stock needs at least two fine-tuned models (the angle between their task "
                f"vectors sets its t), got {len(task_vectors)}."
            )
        super().prepare(task_vectors, names, device)

    def prepare_tensor(self, name, found, dtype, device, pool) -> None:
        with np.errstate(invalid="ignore", over="ignore"):  # non-finite inputs: the driver's norms flag them
            self.ratios[name] = interpolation_ratio(tensor_gram(found, name, device))

    def merge_chunk(self, name, s, values, out):
        weighted_sum_into(out, values, self.ratios[name] * self.p)

    def params(self) -> dict:
        return {"rule": self.name, "t": dict(self.ratios)}


def model_stock(task_vectors):
    """Δ = t · (1/k) Σ_t τ_t with Model Stock's t per tensor."""
    return merge(ModelStockRule(), task_vectors)


METHOD = Method(
    "model-stock",
    ModelStockRule,
    "Model Stock: the mean of the fine-tunes interpolated toward the base by t = "
    "k·cos θ / (1 + (k − 1)·cos θ), θ the angle between their task vectors, per tensor (Jang et al. 2024)",
    weighted=False,
    scale="mean",
    no_lambda="its paper (Jang et al. 2024) defines no λ: the angle between the fine-tunes sets its step t itself",
)
