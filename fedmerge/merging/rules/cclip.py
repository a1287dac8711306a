"""CCLIP: centered clipping, robust averaging around a center.

Karimireddy, He, Jaggi, "Learning from History for Byzantine Robust Optimization", ICML 2021.
v_0 = center (0 for one round; the previous round's Δ across rounds);
v_{l+1} = v_l + Σ_t p_t clip(τ_t − v_l, ρ), clip(x, ρ) = x · min(1, ρ/‖x‖), with ‖·‖ the L2 norm over
the whole update (all tensors), for L iterations; Δ = v_L. L = 1, center 0 and ρ ≥ max‖τ_t‖ give FedAvg.
Without a radius, ρ is the median of the clients' distances to the center, ‖τ_t − v_0‖.

Every v_l is a linear combination of the center and the task vectors, so one pass computing their Gram
matrix gives every norm of every iteration exactly (for L = 1 its diagonal and first column, O(T)); a second
pass writes Δ as that combination.
"""

from collections.abc import Callable, Sequence

import numpy as np
import torch

from fedmerge.errors import FedmergeError
from fedmerge.options import Option, choice, non_negative_float, positive_int
from fedmerge.merging.method import Method, Param
from fedmerge.merging.rule import Rule, merge
from fedmerge.merging.tensors import (
    Tensors,
    gram_matrix,
    products_with_first,
    read_into,
    source,
    weighted_sum_into,
)
from fedmerge.merging.validate import check_center


def clipping_coefficients(
    diagonal: np.ndarray,
    gram_times: Callable[[np.ndarray], np.ndarray],
    p: np.ndarray,
    radius: float | None,
    iterations: int,
    has_center: bool,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Run the L iterations in the span of the basis [center,] τ_1..τ_T, given its Gram matrix G as its diagonal and
    ``gram_times(v)`` = G·v: ‖τ_t − v‖² = G_tt − 2(Gv)_t + vᵀGv for every client at once, O(T²) per iteration (O(T)
    for the first, whose v is 0 or the center alone).

    Returns the coefficients of Δ = v_L over that basis, the last iteration's clip factors and ρ.
    """
    offset = 1 if has_center else 0
    v = np.zeros(len(diagonal))
    if has_center:
        v[0] = 1.0

    def distances(v: np.ndarray) -> np.ndarray:
        gv = gram_times(v)
        return np.sqrt(np.maximum(diagonal[offset:] - 2 * gv[offset:] + v @ gv, 0.0))

    if radius is None:
        radius = float(np.median(distances(v)))
    factors = np.ones(len(p))
    for _ in range(iterations):
        norm = distances(v)
        factors = np.where(norm <= radius, 1.0, radius / np.where(norm > 0, norm, 1.0))
        w = p * factors  # v ← v + Σ_t w_t (τ_t − v)
        v = v * (1.0 - w.sum())
        v[offset:] += w
    return v, factors, radius


class CClipRule(Rule):
    """Iterated centered clipping of the task vectors with radius ρ."""

    name = "cclip"

    def __init__(
        self,
        radius: float | None = None,
        iterations: int = 1,
        center: Tensors | None = None,
        weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__(weights)
        if radius is not None and not (np.isfinite(radius) and radius >= 0):
            raise FedmergeError(
                f"CCLIP's radius ρ must be a positive number (0 or None: the median norm), got {radius}."
            )
        if int(iterations) != iterations or iterations < 1:
            raise FedmergeError(f"CCLIP's iterations L must be a positive integer, got {iterations}.")
        self.radius = float(radius) if radius else None
        self.iterations = int(iterations)
        self.center = center
        self.coeffs: np.ndarray | None = None
        self.clip_factors: np.ndarray | None = None
        self.radius_used: float | None = None

    def prepare(self, task_vectors, names, device) -> None:
        super().prepare(task_vectors, names, device)
        if self.center is not None:
            check_center(self.center, task_vectors, names)
        basis = ([self.center] if self.center is not None else []) + list(task_vectors)
        if self.iterations == 1:  # v_0 is 0 or the center: G's diagonal and first column suffice, O(T)
            diagonal, first = products_with_first(basis, names, device)
            gram_times = (lambda v: first * v[0]) if self.center is not None else (lambda v: np.zeros_like(v))
        else:
            gram = gram_matrix(basis, names, device)
            diagonal, gram_times = np.diag(gram), gram.__matmul__
        with np.errstate(invalid="ignore", over="ignore"):  # non-finite inputs: the driver's norms flag them
            self.coeffs, self.clip_factors, self.radius_used = clipping_coefficients(
                diagonal, gram_times, self.p, self.radius, self.iterations, self.center is not None
            )

    def merge_chunk(self, name, s, values, out):
        if self.center is None:
            weighted_sum_into(out, values, self.coeffs)
        else:
            weighted_sum_into(out, values, self.coeffs[1:])
            center = read_into(source(self.center, name), s, values[0])  # the rows are spent: the center's chunk there
            out.add_(center, alpha=float(self.coeffs[0]))

    def params(self) -> dict:
        return {
            "rule": self.name,
            "radius": self.radius if self.radius_used is None else self.radius_used,
            "iterations": self.iterations,
        }


def cclip(
    task_vectors: Sequence[Tensors],
    radius: float | None = None,
    iterations: int = 1,
    center: Tensors | None = None,
    weights: Sequence[float] | None = None,
) -> dict[str, torch.Tensor]:
    """Δ = v_L of centered clipping with radius ρ (``radius``; None: the median distance to the center),
    L ``iterations`` and ``center`` (0 if None)."""
    return merge(CClipRule(radius, iterations, center, weights), task_vectors)


CENTERS = ("previous", "zero")
RADII = 5  # ρ candidates searched one-shot


def radius_grid(task_vector_norms: Sequence[float]) -> list[float]:
    """CCLIP's ρ grid: evenly spaced between the smallest and the largest finite task-vector norm."""
    finite = [n for n in task_vector_norms if np.isfinite(n)] or [1.0]
    low, high = min(finite), max(finite)
    step = (high - low) / (RADII - 1)
    return sorted({max(low + k * step, 1e-12) for k in range(RADII)})


METHOD = Method(
    "cclip",
    CClipRule,
    "centered clipping: the mean of the task vectors clipped to radius ρ around a center (Karimireddy et al. 2021)",
    params=(
        Param(
            "radius",
            Option(
                0.0,
                "ρ, the clipping radius in the L2 norm over the whole task vector (0: the median "
                "of the clients' distances to the center)",
                non_negative_float,
            ),
            flag="--rho",
        ),
        Param("iterations", Option(1, "L, the clipping iterations", positive_int)),
        Param(
            "center",
            Option(
                "previous", "v_0 after the first round: the previous round's Δ (previous) or 0 (zero)", choice(*CENTERS)
            ),
            scope="strategy",
        ),
    ),
    tuned="radius",
    grid=radius_grid,
    scale="mean",
    no_lambda="its paper (Karimireddy et al. 2021) defines no λ, and with a radius above every ‖τ_t‖ it is the mean",
    make=lambda weights, radius=0.0, iterations=1: CClipRule(radius, iterations, None, weights),
)
