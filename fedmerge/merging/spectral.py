"""What the spectral rules share (TSV-M, Iso-C, Iso-CTS): each 2-D tensor merged whole through SVDs, the rest by the
mean, as their papers do.

Each matrix is merged from whole tensors read one client at a time (:meth:`~fedmerge.merging.rule.Rule.merge_whole`);
vectors, scalars and tensors of more dimensions (biases, norms, convolution kernels) are averaged chunk by chunk.
Decompositions run in the accumulation dtype (float32, float64 for float64 inputs) on the merge's device.

A matrix's spectrum is its numerical rank's: singular values at or below NumPy's ``matrix_rank`` tolerance,
σ_max·max(m, n)·ε, are left out with their vectors. For the full-rank task vectors of fine-tuning this changes
nothing; for rank-deficient ones (LoRA's dense updates, a tensor a client left unchanged) the singular vectors of
a zero singular value, which an SVD picks arbitrarily, would otherwise enter the orthogonalisations, and
isotropic scaling would raise them to the mean singular value.
"""

import torch

from fedmerge.merging.rule import Rule
from fedmerge.merging.tensors import weighted_sum_into


def spectrum(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, σ, Vᵀ) of ``matrix``'s thin SVD, cut to its numerical rank (σ descending)."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    if s.numel() == 0:
        return u, s, vh
    rank = int((s > s[0] * max(matrix.shape) * torch.finfo(s.dtype).eps).sum())
    return u[:, :rank], s[:rank], vh[:rank]


def top(parts: tuple[torch.Tensor, torch.Tensor, torch.Tensor], k: int) -> tuple[torch.Tensor, ...]:
    """The first ``k`` singular triplets of (U, σ, Vᵀ), copied, so that the rest of the SVD can be freed."""
    u, s, vh = parts
    return u[:, :k].clone(), s[:k].clone(), vh[:k].clone()


def joined(parts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triplets (U_i, σ_i, V_iᵀ) side by side: ([U_1 … U_n], [σ_1 … σ_n], [V_1ᵀ; …; V_nᵀ])."""
    us, ss, vhs = zip(*parts)
    return torch.cat(us, dim=1), torch.cat(ss), torch.cat(vhs, dim=0)


def orthonormalised(matrix: torch.Tensor) -> torch.Tensor:
    """The polar factor P·Qᵀ of ``matrix`` = P·S·Qᵀ (thin SVD): the matrix of orthonormal columns (rows, when it is
    wide) nearest to it in Frobenius norm (an empty matrix as it is)."""
    if matrix.numel() == 0:
        return matrix
    p, _, qh = torch.linalg.svd(matrix, full_matrices=False)
    return p @ qh


def low_rank_into(out: torch.Tensor, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> torch.Tensor:
    """out = U·diag(σ)·Vᵀ (zero for an empty spectrum)."""
    return torch.mm(u * s, vh, out=out) if s.numel() else out.zero_()


class MatrixRule(Rule):
    """An unweighted rule merging each 2-D floating tensor whole (:meth:`merge_whole`, the subclass's) and every other
    floating tensor by the mean of the τ_t."""

    def __init__(self) -> None:
        super().__init__(None)

    def merges_whole(self, name, shape) -> bool:
        return len(shape) == 2

    def merge_chunk(self, name, s, values, out):
        weighted_sum_into(out, values, self.p)
