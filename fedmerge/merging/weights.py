"""Client weights p_t, effective weights w_t and the objective mismatch χ²(p‖w)."""

from collections.abc import Sequence

import numpy as np

from fedmerge.errors import FedmergeError


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def client_weights(weights: Sequence[float] | None, num_clients: int, noun: str = "client") -> np.ndarray:
    """Normalise raw client weights (e.g. example counts) to p_t summing to 1; ``None`` is uniform.

    ``noun`` names a client in messages ("model" for checkpoints).
    """
    if weights is None:
        return np.full(num_clients, 1.0 / num_clients)
    p = np.asarray(weights, dtype=np.float64)
    if p.shape != (num_clients,):
        raise FedmergeError(
            f"got {_count(p.size, noun + ' weight')} for {_count(num_clients, noun)}; give one weight per {noun}."
        )
    if not np.all(np.isfinite(p)) or np.any(p < 0) or p.sum() <= 0:
        raise FedmergeError(f"{noun} weights must be finite, non-negative and not all zero, got {p.tolist()}.")
    return p / p.sum()


def positive_per_client(values: Sequence[float], num_clients: int, what: str, noun: str = "client") -> np.ndarray:
    """Check a per-client quantity (steps, learning-rate sums) is T finite positive numbers."""
    a = np.asarray(values, dtype=np.float64)
    if a.shape != (num_clients,):
        raise FedmergeError(
            f"got {_count(a.size, 'value')} of {what} for {_count(num_clients, noun)}; give one per {noun}."
        )
    bad = [i for i, v in enumerate(a) if not (np.isfinite(v) and v > 0)]
    if bad:
        raise FedmergeError(
            f"{what} must be positive for every {noun}; {noun} {bad[0]} (counting from 0) has {float(a[bad[0]])!r}."
        )
    return a


def effective_weights(p: np.ndarray, effective_steps: np.ndarray) -> np.ndarray:
    """w_t = p_t a_t / Σ_s p_s a_s: the weights that plain averaging really optimises."""
    pa = np.asarray(p, dtype=np.float64) * np.asarray(effective_steps, dtype=np.float64)
    return pa / pa.sum()


def chi_square(p: np.ndarray, w: np.ndarray) -> float:
    """χ²(p‖w) = Σ_t (p_t − w_t)² / w_t; zero iff every client took the same effective steps."""
    p = np.asarray(p, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    return float(np.sum((p - w) ** 2 / w))
