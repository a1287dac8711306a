"""Model Breadcrumbs: keep each task vector's middle band of magnitudes, then add (or elect signs as TIES does).

Davari, Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks", ECCV 2024. Per tensor
of n entries, the mask m_t drops the ⌊γ·n⌋ entries of τ_t largest in magnitude (the outliers) and the smallest, and
keeps the next ⌊k·n⌋ (density k, at least one; fewer outliers dropped when γ + k > 1), ties at either threshold
broken by position, lowest first, as TIES's. ``breadcrumbs``: Δ = Σ_t p_t m_t ⊙ τ_t, so θ0 + λ·Σ_t m_t ⊙ τ_t is the
paper's merge with its λ (Task Arithmetic's convention). ``breadcrumbs-ties``: TIES's elected sign and disjoint mean
over the m_t ⊙ τ_t (:func:`~fedmerge.merging.rules.ties.disjoint_mean_into`), mergekit's ``breadcrumbs_ties`` with
``normalize: true``, λ multiplying Δ (TIES's convention). Density 1 keeps every entry (γ unused), as in mergekit.

The thresholds are found before the tensor's chunks merge, from one client's whole τ_t at a time; each chunk then
keeps the entries among the top ⌊γ·n⌋ + ⌊k·n⌋ that are not among the top ⌊γ·n⌋ (:func:`~fedmerge.merging.rules.ties.trim`
twice).
"""

from collections.abc import Sequence

import torch

from fedmerge.merging.method import Method, Param
from fedmerge.merging.rule import Rule, merge
from fedmerge.merging.rules.ties import DENSITIES, DENSITY, disjoint_mean_into, trim
from fedmerge.merging.tensors import Term, weighted_sum_into
from fedmerge.options import Option, proportion, share

NOTHING = (float("inf"), -1)  # the cutoff of a top-0: no magnitude is above +∞ or at it


def top_cutoff(magnitude: torch.Tensor, count: int) -> tuple[float, int]:
    """The cutoff keeping the ``count`` largest of the flat ``magnitude`` (ties by position, lowest first): the
    threshold, and the last position kept among the entries equal to it."""
    if count == 0:
        return NOTHING
    threshold = torch.kthvalue(magnitude, magnitude.numel() - count + 1).values
    above = int((magnitude > threshold).sum())
    tied = torch.nonzero(magnitude == threshold).view(-1)
    return float(threshold), int(tied[count - above - 1])


class BreadcrumbsRule(Rule):
    """Mask out each τ_t's largest and smallest magnitudes, then the weighted mean or TIES's disjoint mean."""

    name = "breadcrumbs"

    def __init__(
        self,
        density: float = 0.2,
        gamma: float = 0.01,
        elect_sign: bool = False,
        weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__(weights)
        self.density = proportion("Breadcrumbs density", density)
        self.gamma = share("Breadcrumbs gamma", gamma)
        self.elect_sign = elect_sign
        self.name = "breadcrumbs-ties" if elect_sign else "breadcrumbs"
        self.bands: list[tuple[tuple[float, int], tuple[float, int]]] = []

    def prepare_tensor(self, name, found, dtype, device, pool) -> None:
        """Each client's two cutoffs on this tensor, (outliers and kept, outliers), from its whole τ_t (the clients
        in parallel)."""
        self.bands = [] if self.density >= 1 else list(pool.map(lambda term: self._band(term, dtype, device), found))

    def _band(self, term: Term, dtype: torch.dtype, device: torch.device):
        magnitude = term.whole(dtype, device).abs_().nan_to_num_(0.0, 0.0, 0.0).view(-1)  # non-finite: norms flag it
        n = magnitude.numel()
        keep = max(1, int(self.density * n))
        outliers = min(int(self.gamma * n), n - keep)
        return top_cutoff(magnitude, outliers + keep), top_cutoff(magnitude, outliers)

    def merge_chunk(self, name, s, values, out):
        if self.bands:
            outliers = values.clone()
            trim(values, s, [upper for upper, _ in self.bands])
            trim(outliers, s, [top for _, top in self.bands])
            values.sub_(outliers)  # x − x = 0 exactly where an entry is among the outliers, x − 0 = x in the band
        if self.elect_sign:
            disjoint_mean_into(out, values, self.p)
        else:
            weighted_sum_into(out, values, self.p)

    def params(self) -> dict:
        return {"rule": self.name, "density": self.density, "gamma": self.gamma}


def breadcrumbs(
    task_vectors,
    density: float = 0.2,
    gamma: float = 0.01,
    elect_sign: bool = False,
    weights: Sequence[float] | None = None,
) -> dict[str, torch.Tensor]:
    """Δ of Model Breadcrumbs with density k, outlier share γ, then the mean or (``elect_sign``) TIES's disjoint mean."""
    return merge(BreadcrumbsRule(density, gamma, elect_sign, weights), task_vectors)


GAMMA = Param(
    "gamma",
    Option(
        0.01, "γ, the share of each task vector's largest magnitudes dropped as outliers, in [0, 1) (per tensor)", share
    ),
)
METHOD = Method(
    "breadcrumbs",
    BreadcrumbsRule,
    "Model Breadcrumbs: each task vector without its largest (γ) and smallest "
    "magnitudes, k kept, then added as Task Arithmetic adds them (Davari & Belilovsky 2023)",
    params=(DENSITY, GAMMA),
    tuned="density",
    grid=lambda norms: list(DENSITIES),
    make=lambda weights, **params: BreadcrumbsRule(**params, elect_sign=False, weights=weights),
)
TIES = Method(
    "breadcrumbs-ties",
    BreadcrumbsRule,
    "Model Breadcrumbs' masks, then TIES's elected sign and disjoint mean",
    params=(DENSITY, GAMMA),
    tuned="density",
    grid=lambda norms: list(DENSITIES),
    scale="mean",
    make=lambda weights, **params: BreadcrumbsRule(**params, elect_sign=True, weights=weights),
)
