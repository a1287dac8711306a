"""SLERP: spherical linear interpolation between two models' weights, per tensor.

Shoemake, "Animating Rotation with Quaternion Curves", SIGGRAPH 1985; mergekit's ``slerp`` merges two models
with it. Per tensor, with θ_1 and θ_2 the two models' weights (flattened), Ω the angle between them
(cos Ω = ⟨θ_1, θ_2⟩ / ‖θ_1‖‖θ_2‖) and t ∈ [0, 1]:

    slerp(θ_1, θ_2; t) = sin((1 − t)Ω) / sin Ω · θ_1 + sin(tΩ) / sin Ω · θ_2,

and (1 − t)·θ_1 + t·θ_2 where |cos Ω| > 0.9995, nearly (anti)parallel, where the quotients lose their precision
(mergekit's threshold). t = 0 gives the first model, t = 1 the second (in a Flower strategy, the clients in client-id
order). Δ = slerp(θ_1, θ_2; t) − θ, so θ + Δ (β = 1) is the interpolated model: the base θ is only where the update
starts from.

Such rules combine the models' weights, not only their task vectors: per tensor, coefficients c_t found from the Gram
matrix G_st = ⟨θ_s, θ_t⟩ (one pass over the tensor in float64 before its chunks merge) give Σ_t c_t θ_t, written
chunk by chunk as θ + Δ with Δ = Σ_t c_t τ_t + (Σ_t c_t − 1)·θ (:class:`WeightsRule`; the Karcher mean is another).
"""

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from fedmerge.errors import FedmergeError
from fedmerge.merging.method import Method, Param
from fedmerge.merging.rule import Rule, merge
from fedmerge.merging.tensors import TaskVector, Term, gram_matrix, read_into, weighted_sum_into
from fedmerge.options import Option

COLINEAR = 0.9995  # |cos Ω| above which SLERP interpolates linearly (mergekit's DOT_THRESHOLD)
TINY_NORM = 1e-8  # a tensor of smaller norm is not normalised before its angle is measured (mergekit's eps)


def tensor_gram(found: Sequence[Term], name: str, device, of_weights: bool = False) -> np.ndarray:
    """G_st = ⟨x_s, x_t⟩ over tensor ``name`` of every client's term: its τ_t, or (``of_weights``) its model's
    weights θ_t; accumulated in float64 a chunk at a time on ``device``, each base read once per chunk."""
    bases: dict[int, dict] = {}

    def view(term: Term):
        if of_weights or term.base is None:
            return {name: term.value}
        return TaskVector({name: term.value}, bases.setdefault(id(term.base), {name: term.base}))

    return gram_matrix([view(term) for term in found], [name], device)


class WeightsRule(Rule):
    """A rule whose merged tensor is Σ_t c_t θ_t, with c found per tensor by :meth:`combination` from the models'
    Gram matrix. The clients must be task vectors of one base θ (:class:`~fedmerge.merging.tensors.TaskVector`)."""

    def __init__(self, weights: Sequence[float] | None = None) -> None:
        super().__init__(weights)
        self.coefficients: np.ndarray | None = None
        self.base = None

    def prepare(self, task_vectors, names, device) -> None:
        super().prepare(task_vectors, names, device)
        if not all(isinstance(v, TaskVector) for v in task_vectors) or len({id(v.base) for v in task_vectors}) > 1:
            raise FedmergeError(
                f"{self.name} combines the models' weights θ_t, not their updates alone: give each "
                "model with the one base θ it was fine-tuned from (TaskVector(model, base)); LoRA's "
                "lora='dense' hands a rule the updates only."
            )

    def prepare_tensor(self, name, found, dtype, device, pool) -> None:
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):  # non-finite inputs: the norms flag them
            self.coefficients = self.combination(tensor_gram(found, name, device, of_weights=True))
        self.base = found[0].base

    def combination(self, gram: np.ndarray) -> np.ndarray:
        """c_t of the merged tensor Σ_t c_t θ_t, from G_st = ⟨θ_s, θ_t⟩."""
        raise NotImplementedError

    def merge_chunk(self, name, s, values, out):
        weighted_sum_into(out, values, self.coefficients)
        base = read_into(self.base, s, values[0])  # the rows are spent: θ's chunk there
        out.add_(base, alpha=float(self.coefficients.sum()) - 1.0)


def slerp_coefficients(gram: np.ndarray, t: float) -> np.ndarray:
    """(c_1, c_2) of slerp(θ_1, θ_2; t) = c_1·θ_1 + c_2·θ_2, from the 2×2 Gram matrix of θ_1, θ_2."""
    norms = np.sqrt(np.diag(gram))
    norms = np.where(norms > TINY_NORM, norms, 1.0)
    cos = float(np.clip(gram[0, 1] / (norms[0] * norms[1]), -1.0, 1.0))
    if not abs(cos) <= COLINEAR:  # nearly colinear (or not finite): linear interpolation
        return np.array([1.0 - t, t])
    omega = math.acos(cos)
    return np.array([math.sin((1.0 - t) * omega), math.sin(t * omega)]) / math.sin(omega)


class SlerpRule(WeightsRule):
    """Spherical interpolation at t from the first model to the second (unweighted)."""

    name = "slerp"

    def __init__(self, t: float = 0.5) -> None:
        super().__init__(None)
        self.t = interpolation("SLERP t", t)

    def prepare(self, task_vectors, names, device) -> None:
        if len(task_vectors) != 2:
            raise FedmergeError(
                f"SLERP interpolates between exactly two models, got {len(task_vectors)}: give two "
                "(t = 0 is the first, t = 1 the second), or use karcher, the spherical mean of any "
                "number of models."
            )
        super().prepare(task_vectors, names, device)

    def combination(self, gram):
        return slerp_coefficients(gram, self.t)

    def params(self) -> dict:
        return {"rule": self.name, "t": self.t}


def slerp(task_vectors, t: float = 0.5):
    """Δ = slerp(θ_1, θ_2; t) − θ of two task vectors θ_t − θ (:class:`~fedmerge.merging.tensors.TaskVector`)."""
    return merge(SlerpRule(t), task_vectors)


def interpolation(name: str, value: Any) -> float:
    """A number in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise FedmergeError(f"option {name!r} must be a number in [0, 1], got {value!r}.")
    return float(value)


METHOD = Method(
    "slerp",
    SlerpRule,
    "SLERP: the two models' weights interpolated along the arc between them, per tensor, at t "
    "(Shoemake 1985; mergekit's slerp)",
    params=(
        Param("t", Option(0.5, "t, the position on the arc from the first model (0) to the second (1)", interpolation)),
    ),
    weighted=False,
    tuned="t",
    grid=lambda norms: [0.1, 0.3, 0.5, 0.7, 0.9],
    scale="mean",
    no_lambda="SLERP (Shoemake 1985, mergekit's slerp) defines no λ: t places the model on the arc between the two",
    num_clients=2,
)
