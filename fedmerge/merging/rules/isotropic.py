"""Isotropic merging: the summed task matrix with a flat spectrum (Iso-C), and with task-specific directions added to
its common subspace (Iso-CTS).

Marczak, Magistri, Cygert, Twardowski, Bagdanov, van de Weijer, "No Task Left Behind: Isotropic Model Merging with
Common and Task-Specific Subspaces", ICML 2025. Per 2-D tensor (m × n, r = min(m, n)), with Δ_TA = Σ_t τ_t = U Σ Vᵀ:

- **Iso-C**: Δ = σ̄·U Vᵀ, σ̄ the mean of the singular values of Δ_TA: its directions kept, its spectrum made flat, so
  that the directions few tasks share are no longer drowned by the dominant ones.
- **Iso-CTS**: the common subspace is Δ_TA's top k directions, k = ⌊f·r⌋ for the common fraction f, then moved so that
  r − k splits evenly: k = r − T·round((r − k)/T). Each task contributes the top s = (r − k)/T directions of its τ_t
  projected off that subspace, τ̄_t = τ_t − U_k U_kᵀ τ_t = Ū_t Σ̄_t V̄_tᵀ. With U = [U_k, Ū_1[:, :s] … Ū_T[:, :s]], V
  likewise, and σ̄ the mean of all the singular values kept (Σ_k's and every Σ̄_t[:s]'s): Δ = σ̄·U_⊥ V_⊥ᵀ, U_⊥ and
  V_⊥ the polar factors of U and V (orthonormal frames).

Every other tensor is the mean of the τ_t. The merged model is θ0 + α·Δ: α is the method's own λ (``scale`` "mean",
β = λ), chosen on validation as in the paper. On matrices Δ is on the scale of Σ_t τ_t, not of their mean; over rounds,
β = 1 takes that whole sum. The common-subspace fraction f is searched beside λ one-shot unless given (0.8 in the
paper and FusionBench). Memory, per matrix: Δ_TA and its SVD, then one client's τ_t and SVD at a time with the r kept
columns of U and V (spectra cut to their numerical rank: :mod:`fedmerge.merging.spectral`).
"""

import torch

from fedmerge.merging.method import Method, Param
from fedmerge.merging.rule import merge
from fedmerge.merging.spectral import MatrixRule, joined, low_rank_into, orthonormalised, spectrum, top
from fedmerge.options import Option, proportion


def summed(clients) -> torch.Tensor:
    """Σ_t τ_t, the clients' whole tensors read one at a time."""
    total = clients[0]
    for t in range(1, len(clients)):
        total += clients[t]
    return total


def flat(out: torch.Tensor, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> torch.Tensor:
    """out = σ̄·U Vᵀ, σ̄ the mean of σ."""
    return low_rank_into(out, u, s.mean().expand_as(s), vh)


class IsoCRule(MatrixRule):
    """Isotropic merging in the common subspace (Iso-C), unweighted."""

    name = "iso-c"

    def merge_whole(self, name, clients, out):
        flat(out, *spectrum(summed(clients)))


def common_size(rank: int, num_clients: int, fraction: float) -> int:
    """k, the common subspace's dimension: ⌊f·r⌋, moved so that r − k splits into T equal parts (Python's round, as
    the paper's code)."""
    return rank - round((rank - int(rank * fraction)) / num_clients) * num_clients


class IsoCtsRule(MatrixRule):
    """Isotropic merging in the common and task-specific subspaces (Iso-CTS), unweighted."""

    name = "iso-cts"

    def __init__(self, common_fraction: float = 0.8) -> None:
        super().__init__()
        self.common_fraction = proportion("Iso-CTS common_fraction", common_fraction)

    def merge_whole(self, name, clients, out):
        rank, count = min(clients.shape), len(clients)
        common = common_size(rank, count, self.common_fraction)
        per_task = (rank - common) // count
        parts = [top(spectrum(summed(clients)), common)]
        shared = parts[0][0]  # U_k
        for t in range(count):  # one τ_t and SVD at a time
            tau = clients[t]
            parts.append(top(spectrum(tau.sub_(shared @ (shared.T @ tau))), per_task))
        u, s, vh = joined(parts)
        flat(out, orthonormalised(u), s, orthonormalised(vh))

    def params(self) -> dict:
        return {"rule": self.name, "common_fraction": self.common_fraction}


def iso_c(task_vectors) -> dict[str, torch.Tensor]:
    """Δ of Iso-C over the task vectors."""
    return merge(IsoCRule(), task_vectors)


def iso_cts(task_vectors, common_fraction: float = 0.8) -> dict[str, torch.Tensor]:
    """Δ of Iso-CTS over the task vectors with common-subspace fraction f (``common_fraction``)."""
    return merge(IsoCtsRule(common_fraction), task_vectors)


COMMON_FRACTIONS = (0.5, 0.6, 0.7, 0.8, 0.9)  # searched one-shot beside λ: the paper's 0.8 and its neighbours
ISO_C = Method(
    "iso-c",
    IsoCRule,
    "Iso-C: per matrix, the summed task vectors' singular directions with a flat spectrum (their "
    "mean singular value); other tensors the mean (Marczak et al. 2025)",
    weighted=False,
    scale="mean",
)
ISO_CTS = Method(
    "iso-cts",
    IsoCtsRule,
    "Iso-CTS: Iso-C over the summed task vectors' top directions and each task's own top "
    "directions outside them, made orthogonal; other tensors the mean (Marczak et al. 2025)",
    params=(
        Param(
            "common_fraction",
            Option(
                0.8,
                "f, the share of each matrix's rank given to the common subspace, in "
                "(0, 1] (the rest split evenly among the clients)",
                proportion,
            ),
        ),
    ),
    weighted=False,
    scale="mean",
    tuned="common_fraction",
    grid=lambda norms: list(COMMON_FRACTIONS),
)
