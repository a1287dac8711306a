"""CCLIP: θ ← θ + β · v_L, centered clipping of the task vectors.

Karimireddy, He, Jaggi, "Learning from History for Byzantine Robust Optimization", ICML 2021.
v_0 = center, v_{l+1} = v_l + Σ_t p_t clip(τ_t − v_l, ρ), clip(x, ρ) = x · min(1, ρ/‖x‖) over the whole
update. The center is 0 in the first round and, with ``center="previous"``, the previous round's Δ after.
"""

from fedmerge.errors import FedmergeError
from fedmerge.merging import CClipRule
from fedmerge.strategies.base import MergingStrategy

CENTERS = ("previous", "zero")


class CClip(MergingStrategy):
    """Centered clipping.

    Parameters
    ----------
    radius : float or None (default None)
        ρ. None picks, each round, the median of the clients' distances to the center.
    iterations : int (default 1)
        L, the clipping iterations.
    center : "previous" | "zero" (default "previous")
        v_0 after the first round: the previous round's Δ (the paper's momentum center) or 0.
    **kwargs
        As :class:`fedmerge.strategies.base.MergingStrategy`.
    """

    def __init__(self, *, radius: float | None = None, iterations: int = 1, center: str = "previous", **kwargs) -> None:
        CClipRule(radius, iterations)  # validates ρ and L
        if center not in CENTERS:
            raise FedmergeError(f"CCLIP's center must be one of {CENTERS}, got {center!r}.")
        super().__init__(**kwargs)
        self.radius = radius
        self.iterations = iterations
        self.center = center
        self._previous: dict | None = None
        self._current: dict = {}

    def rule_params(self):
        return {"radius": self.radius, "iterations": self.iterations, "center": self.center}

    def build_rule(self, replies, weights):
        self._current = {}
        center = self._previous if self.center == "previous" else None
        return CClipRule(self.radius, self.iterations, center, weights)

    def observe_update(self, name, delta):
        if delta.is_floating_point():
            self._current[name] = delta

    def merge_replies(self, server_round, replies, global_arrays):
        arrays, metrics = super().merge_replies(server_round, replies, global_arrays)
        if arrays is not None:
            self._previous = self._current
        return arrays, metrics
