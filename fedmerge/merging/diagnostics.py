"""Diagnostics over task vectors or gradients, from their Gram matrix (see :func:`tensors.gram_matrix`)."""

import numpy as np


def norms(gram: np.ndarray) -> np.ndarray:
    """‖v_i‖ for each vector."""
    return np.sqrt(np.clip(np.diag(gram), 0.0, None))


def cosine_similarities(gram: np.ndarray) -> np.ndarray:
    """cos(v_i, v_j); 0 where a vector is zero."""
    n = norms(gram)
    scale = np.outer(n, n)
    return np.divide(gram, scale, out=np.zeros_like(gram), where=scale > 0)


def dissimilarity(gram: np.ndarray, p: np.ndarray) -> float:
    """ζ² = Σ_t p_t ‖g_t − ḡ‖² with ḡ = Σ_t p_t g_t, i.e. Σ_t p_t G_tt − pᵀGp (gradients' Gram matrix G)."""
    p = np.asarray(p, dtype=np.float64)
    return float(max(p @ np.diag(gram) - p @ gram @ p, 0.0))
