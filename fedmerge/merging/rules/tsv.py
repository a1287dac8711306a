"""TSV-M: each task vector's top singular vectors, decorrelated across tasks, summed per layer.

Gargiulo, Crisostomi, Bucarelli, Scardapane, Silvestri, Rodolà, "Task Singular Vectors: Reducing Task Interference in
Model Merging", CVPR 2025. For each 2-D tensor (a layer's matrix, m × n, r = min(m, n)), with T task vectors
τ_t = U_t Σ_t V_tᵀ (thin SVD) and k = ⌊r/T⌋ (at least 1: the paper assumes T ≤ r):

    U = [U_1[:, :k] … U_T[:, :k]],   Σ = diag(σ_1[:k] … σ_T[:k]),   V = [V_1[:, :k] … V_T[:, :k]],
    Δ = U_⊥ Σ V_⊥ᵀ,   U_⊥ = P_U Q_Uᵀ and V_⊥ = P_V Q_Vᵀ the polar factors of U = P_U S_U Q_Uᵀ and V = P_V S_V Q_Vᵀ,

each task keeping its r/T most important directions, the directions of different tasks made orthogonal (the nearest
orthonormal frames: Procrustes) so that they no longer interfere. Every other tensor is the mean of the τ_t. The merged
model is θ0 + α·Δ: α is TSV-M's own λ (``scale`` "mean", β = λ; 1 in the paper and FusionBench). On matrices Δ sums
the tasks' parts, so it is on the scale of Σ_t τ_t rather than of their mean; over rounds, β = 1 takes that whole sum.

Memory, per matrix: one client's τ_t and its SVD at a time, and the r kept columns of U and V
(:mod:`fedmerge.merging.spectral`: spectra cut to their numerical rank).
"""

import torch

from fedmerge.merging.method import Method
from fedmerge.merging.rule import merge
from fedmerge.merging.spectral import MatrixRule, joined, low_rank_into, orthonormalised, spectrum, top


class TsvRule(MatrixRule):
    """Task Singular Vectors merging (TSV-M), unweighted."""

    name = "tsv-m"

    def merge_whole(self, name, clients, out):
        k = max(1, min(clients.shape) // len(clients))
        u, s, vh = joined([top(spectrum(clients[t]), k) for t in range(len(clients))])  # one τ_t and SVD at a time
        low_rank_into(out, orthonormalised(u), s, orthonormalised(vh))


def tsv(task_vectors) -> dict[str, torch.Tensor]:
    """Δ of TSV-M over the task vectors."""
    return merge(TsvRule(), task_vectors)


METHOD = Method(
    "tsv-m",
    TsvRule,
    "TSV-M: per matrix, each task vector's top r/T singular directions, made orthogonal across tasks "
    "and summed; other tensors the mean (Gargiulo et al. 2025)",
    weighted=False,
    scale="mean",
)
