"""Iso-C and Iso-CTS as Flower strategies: θ ← θ + β·Δ, Δ per matrix the summed updates with a flat spectrum.

Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces", ICML 2025. β is
the paper's α; on matrices Δ is on the scale of Σ_t τ_t, not of their mean.
"""

from fedmerge.merging.rules.isotropic import ISO_C, ISO_CTS
from fedmerge.strategies.base import MethodStrategy


class IsoC(MethodStrategy):
    """Isotropic merging in the common subspace (unweighted): per 2-D tensor, Σ_t τ_t's singular directions with
    their mean singular value; other tensors the mean.

    Parameters
    ----------
    **kwargs
        As :class:`fedmerge.strategies.base.MergingStrategy`.
    """

    method = ISO_C


class IsoCTS(MethodStrategy):
    """Isotropic merging in the common and task-specific subspaces (unweighted).

    Parameters
    ----------
    common_fraction : float (default 0.8)
        f, the share of each matrix's rank given to Σ_t τ_t's top directions; the rest is split evenly among the
        clients' own top directions outside them.
    **kwargs
        As :class:`fedmerge.strategies.base.MergingStrategy`.
    """

    method = ISO_CTS
