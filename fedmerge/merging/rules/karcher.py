"""The Karcher mean: the Riemannian mean of the models' weights on the sphere, per tensor, rescaled.

Karcher, "Riemannian center of mass and mollifier smoothing", Comm. Pure Appl. Math. 1977; mergekit's ``karcher``
merges models with it. Per tensor, each model's weights θ_t (flattened) are split into a norm n_t = ‖θ_t‖ and a
direction e_t = θ_t / n_t. The mean direction u minimises Σ_t a_t d(u, e_t)² on the unit sphere, d the angle, with
a_t = p_t over the models of norm above ``tol`` (renormalised); it is found by Riemannian gradient steps from the
normalised mean of the e_t:

    θ_t' = arccos⟨u, e_t⟩,   g = Σ_t a_t θ_t' / sin θ_t' · (e_t − ⟨u, e_t⟩ u),
    u ← cos‖g‖ · u + sin‖g‖ · g / ‖g‖,  renormalised,

leaving out of g the terms with θ_t' < tol (e_t at u) and with θ_t' > π − tol (e_t opposite u, where no direction
leads from u to it), until ‖g‖ < tol or ``max_iter`` steps. The merged tensor is (Σ_t p_t n_t)·u, the mean norm along
the mean direction (0 where every model's norm is below ``tol``), and Δ = (Σ_t p_t n_t)·u − θ.

u stays in the span of the e_t, so the iteration runs on its T coefficients with the Gram matrix of the θ_t, exactly
(:class:`~fedmerge.merging.rules.slerp.WeightsRule`). mergekit's runs the same steps on whole tensors in float32; there
an opposite e_t adds exactly 0 to g in a one-entry tensor, as here, and rounding noise times θ_t'/sin θ_t' ≈ 10¹⁶ in a
larger one.
"""

from collections.abc import Sequence

import numpy as np

from fedmerge.merging.method import Method, Param
from fedmerge.merging.rule import merge
from fedmerge.merging.rules.slerp import WeightsRule
from fedmerge.options import Option, positive_float, positive_int


def karcher_coefficients(gram: np.ndarray, p: np.ndarray, max_iter: int, tol: float) -> np.ndarray:
    """c_t of the merged tensor Σ_t c_t θ_t = (Σ_t p_t n_t)·u, from G_st = ⟨θ_s, θ_t⟩ and the weights p."""
    norms = np.sqrt(np.maximum(np.diag(gram), 0.0))
    coefficients = np.zeros(len(p))
    valid = np.flatnonzero(norms > tol)
    if not valid.size:
        return coefficients
    a = p[valid] / p[valid].sum()
    units = gram[np.ix_(valid, valid)] / np.outer(norms[valid], norms[valid])  # ⟨e_s, e_t⟩

    def length(v: np.ndarray) -> float:  # ‖Σ_t v_t e_t‖
        return float(np.sqrt(max(v @ units @ v, 0.0)))

    u = a / length(a) if length(a) >= tol else np.eye(len(valid))[0]
    for _ in range(max_iter):
        cos = np.clip(units @ u, -1.0, 1.0)
        angle = np.arccos(cos)
        near = (angle < tol) | (angle > np.pi - tol)  # at u, or opposite it (no direction from u: a scalar's −1)
        step = np.where(near, 0.0, a * angle / np.where(near, 1.0, np.sin(angle)))
        tangent = step - (step @ cos) * u  # Σ_t step_t (e_t − ⟨u, e_t⟩ u)
        size = length(tangent)
        if size < tol:
            break
        u = np.cos(size) * u + np.sin(size) * tangent / size
        if length(u) > tol:
            u = u / length(u)
    coefficients[valid] = float(p @ norms) * u / norms[valid]
    return coefficients


class KarcherRule(WeightsRule):
    """The p-weighted Karcher mean of the models' directions, at their p-weighted mean norm."""

    name = "karcher"

    def __init__(self, max_iter: int = 10, tol: float = 1e-5, weights: Sequence[float] | None = None) -> None:
        super().__init__(weights)
        self.max_iter = positive_int("Karcher max_iter", max_iter)
        self.tol = positive_float("Karcher tol", tol)

    def combination(self, gram):
        return karcher_coefficients(gram, self.p, self.max_iter, self.tol)

    def params(self) -> dict:
        return {"rule": self.name, "max_iter": self.max_iter, "tol": self.tol}


def karcher(task_vectors, max_iter: int = 10, tol: float = 1e-5, weights: Sequence[float] | None = None):
    """Δ = the Karcher mean of the models θ_t − θ (task vectors of one base θ) at their mean norm."""
    return merge(KarcherRule(max_iter, tol, weights), task_vectors)


METHOD = Method(
    "karcher",
    KarcherRule,
    "the Karcher mean: the models' weights averaged on the sphere (their Riemannian mean "
    "direction at their mean norm), per tensor (mergekit's karcher)",
    params=(
        Param("max_iter", Option(10, "the most Riemannian gradient steps per tensor", positive_int)),
        Param(
            "tol",
            Option(
                1e-5,
                "the step norm that ends them; models of smaller norm are left out of the direction",
                positive_float,
            ),
        ),
    ),
    scale="mean",
    no_lambda="the Karcher mean (mergekit's karcher) defines no λ: it is a point among the models",
)
