"""Merging methods by name: each maps onto a rule of :mod:`fedmerge.merging`, the one implementation of it.

``task-arithmetic`` and ``fedavg`` are the same rule (Δ = Σ_t p_t τ_t); Task Arithmetic is uniform and is
usually given its scaling λ, FedAvg may weight the models. Options a method does not use are refused
rather than ignored, and everything is checked against the number of models before any file is read.
"""

import math
from collections.abc import Sequence

from fedmerge.errors import FedmergeError
from fedmerge.merging import (
    CClipRule, FedAvgRule, FedGMARule, FedNovaRule, MedianRule, Rule, client_weights, scaling_to_server_lr,
)
from fedmerge.merging.weights import positive_per_client

METHODS = ("task-arithmetic", "fedavg", "fednova", "fedgma", "median", "cclip")
WEIGHTED = ("fedavg", "fednova", "fedgma", "cclip")
FEDGMA_DEFAULT_RHO = 0.5


def _refuse(option: str, value, method: str, used_by: Sequence[str]) -> None:
    if value is not None and method not in used_by:
        raise FedmergeError(
            f"{option} is only used by method {' or '.join(repr(m) for m in used_by)}, not {method!r}; drop it."
        )


def build_rule(
    method: str,
    num_models: int,
    *,
    weights: Sequence[float] | None = None,
    steps: Sequence[float] | None = None,
    lr_sums: Sequence[float] | None = None,
    rho: float | None = None,
    iterations: int | None = None,
    even: str | None = None,
) -> Rule:
    """The rule of ``method`` over ``num_models`` task vectors, its options checked.

    Parameters
    ----------
    weights : per-model weights p_t (normalised to sum 1); for fedavg, fednova, fedgma, cclip.
    steps, lr_sums : FedNova's effective steps a_t: local step counts, or sums of learning rates (one of them).
    rho : FedGMA's sign-agreement threshold (default 0.5) or CCLIP's clipping radius (default, or 0 as in
        experiment specs: the median task-vector norm).
    iterations : CCLIP's clipping iterations L (default 1).
    even : Median's rule for an even number of models, "mean" (default) or "lower".
    """
    if method not in METHODS:
        raise FedmergeError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}.")
    _refuse("weights (--weights)", weights, method, WEIGHTED)
    _refuse("steps (--steps)", steps, method, ("fednova",))
    _refuse("lr_sums (--lr-sums)", lr_sums, method, ("fednova",))
    _refuse("rho (--rho)", rho, method, ("fedgma", "cclip"))
    _refuse("iterations (--iterations)", iterations, method, ("cclip",))
    _refuse("even (--even)", even, method, ("median",))
    if weights is not None:
        client_weights(weights, num_models, "model")
    if method in ("task-arithmetic", "fedavg"):
        return FedAvgRule(weights)
    if method == "fednova":
        if (steps is None) == (lr_sums is None):
            raise FedmergeError(
                "method 'fednova' needs the models' effective steps a_t: give either steps (--steps, local step "
                "counts) or lr_sums (--lr-sums, sums of learning rates), one value per model."
            )
        what = "steps (--steps)" if steps is not None else "lr_sums (--lr-sums)"
        effective = positive_per_client(steps if steps is not None else lr_sums, num_models, what, "model")
        return FedNovaRule(effective.tolist(), weights)
    if method == "fedgma":
        return FedGMARule(FEDGMA_DEFAULT_RHO if rho is None else rho, weights)
    if method == "median":
        return MedianRule("mean" if even is None else even)
    return CClipRule(rho or None, 1 if iterations is None else iterations, None, weights)


def resolve_server_lr(num_models: int, scaling: float | None = None, server_lr: float | None = None) -> float:
    """β, the server learning rate: given, or from Task Arithmetic's λ as β = λ·T; 1 (the mean) if neither."""
    if scaling is not None and server_lr is not None:
        raise FedmergeError(
            f"give scaling λ (--scaling) or server_lr β (--server-lr), not both: β = λ·T = {scaling} × {num_models}."
        )
    if scaling is not None:
        beta = scaling_to_server_lr(scaling, num_models)
    else:
        beta = 1.0 if server_lr is None else server_lr
    if not math.isfinite(beta) or beta == 0:
        raise FedmergeError(f"the server learning rate β must be a finite non-zero number, got {beta!r}.")
    return float(beta)
