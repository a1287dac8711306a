"""TIES-merging: trim each task vector, elect each coordinate's sign, average the entries that agree.

Yadav, Tam, Choshen, Raffel, Bansal, "TIES-Merging: Resolving Interference When Merging Models", NeurIPS
2023. Per tensor, τ̂_t keeps the ⌊k·n⌋ entries of τ_t largest in magnitude (density k; at least one; ties at
the threshold broken by position, lowest first) and zeroes the rest; γ_j = +1 if Σ_t p_t τ̂_t,j ≥ 0 else −1
(a zero sum elects +, as mergekit does); the disjoint mean Δ_j = Σ_t p_t τ̂_t,j [sign τ̂_t,j = γ_j] /
Σ_t p_t [sign τ̂_t,j = γ_j], and 0 where no entry agrees. Density 1 skips the trimming.

The trimming is per tensor, as in mergekit (the paper's code trims the whole flattened model); its
threshold is found before the tensor's chunks are merged, from one client's whole τ_t at a time.
"""

from collections.abc import Sequence

import torch

from fedmerge.merging.method import Method, Param
from fedmerge.merging.rule import Rule, merge
from fedmerge.merging.tensors import Term, coefficients
from fedmerge.options import Option, proportion


def disjoint_mean_into(out: torch.Tensor, values: torch.Tensor, p: Sequence[float]) -> torch.Tensor:
    """TIES's elected sign and disjoint mean of the rows of ``values`` (T, n) with weights ``p``, into ``out``.
    ``values`` is overwritten.

    Equal weights drop out of both the sign and the mean, so then the rows are summed as they are: entries
    that cancel exactly (common in 16-bit checkpoints) elect +, as the rule says, instead of a sign left by
    rounding each p_t·τ_t. Unequal weights multiply each row first (not a matrix product, whose fused
    multiply-adds would not cancel p·x against p·(−x)).
    """
    weights = None if len(set(p)) == 1 else coefficients(tuple(map(float, p)), values.dtype, values.device).view(-1, 1)
    if weights is not None:
        values.mul_(weights)
    elected = torch.where(values.sum(0) >= 0, 1.0, -1.0).to(values.dtype)
    agree = torch.sign(values).eq_(elected).to(values.dtype)  # (T, n): 1 where the entry's sign is the elected one
    total = agree.sum(0) if weights is None else (agree * weights).sum(0)
    torch.div(values.mul_(agree).sum(0), total, out=out)
    return out.masked_fill_(total == 0, 0.0)


class TiesRule(Rule):
    """Trim, elect sign, disjoint mean."""

    name = "ties"

    def __init__(self, density: float = 0.2, weights: Sequence[float] | None = None) -> None:
        super().__init__(weights)
        self.density = proportion("TIES density", density)
        self.cutoffs: list[tuple[float, int]] = []

    def prepare_tensor(self, name, found, dtype, device, pool) -> None:
        """Each client's magnitude threshold on this tensor, and the last position kept among ties at it (the
        clients in parallel, each reading its whole τ_t)."""
        self.cutoffs = (
            [] if self.density >= 1 else list(pool.map(lambda term: self._cutoff(term, dtype, device), found))
        )

    def _cutoff(self, term: Term, dtype: torch.dtype, device: torch.device) -> tuple[float, int]:
        magnitude = term.whole(dtype, device).abs_().nan_to_num_(0.0, 0.0, 0.0).view(-1)  # non-finite: norms flag it
        keep = max(1, int(self.density * magnitude.numel()))
        threshold = torch.kthvalue(magnitude, magnitude.numel() - keep + 1).values
        above = int((magnitude > threshold).sum())
        tied = torch.nonzero(magnitude == threshold).view(-1)
        return float(threshold), int(tied[keep - above - 1])

    def merge_chunk(self, name, s, values, out):
        if self.cutoffs:
            trim(values, s, self.cutoffs)
        disjoint_mean_into(out, values, self.p)

    def params(self) -> dict:
        return {"rule": self.name, "density": self.density}


def trim(values: torch.Tensor, s: slice, cutoffs: Sequence[tuple[float, int]]) -> None:
    """Zero each row's entries below its threshold, and those at it past its last kept position."""
    position = torch.arange(s.start, s.stop, device=values.device)
    for row, (threshold, last) in zip(values, cutoffs):
        magnitude = row.abs()
        row.mul_((magnitude > threshold) | ((magnitude == threshold) & (position <= last)))


def ties(task_vectors, density: float = 0.2, weights: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """Δ of TIES-merging with density k (``density``) and weights p."""
    return merge(TiesRule(density, weights), task_vectors)


DENSITIES = (0.1, 0.2, 0.3, 0.5)  # searched one-shot beside λ (the TIES paper's top-k of 10-30%, and a denser one)
DENSITY = Param(
    "density", Option(0.2, "k, the share of each task vector's entries kept, in (0, 1] (per tensor)", proportion)
)
METHOD = Method(
    "ties",
    TiesRule,
    "TIES-merging: the top-k% of each task vector, an elected sign, the disjoint mean (Yadav et al. 2023)",
    params=(DENSITY,),
    tuned="density",
    grid=lambda norms: list(DENSITIES),
    scale="mean",
)
