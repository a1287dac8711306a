"""Mean direction: θ ← θ + β · ā Σ_t p_t τ_t / ‖τ_t‖, ā = Σ_t p_t ‖τ_t‖ (:mod:`fedmerge.merging.rules.mean_direction`)."""

from fedmerge.merging.rules.mean_direction import METHOD
from fedmerge.strategies.base import MethodStrategy


class MeanDirection(MethodStrategy):
    """The clients' unit update directions averaged, at their mean length; needs no metric from the clients.

    Parameters
    ----------
    **kwargs
        As :class:`fedmerge.strategies.base.MergingStrategy`.
    """

    method = METHOD
