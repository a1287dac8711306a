"""CCLIP: θ ← θ + β · v_L, centered clipping of the task vectors.

Karimireddy, He, Jaggi, "Learning from History for Byzantine Robust Optimization", ICML 2021.
v_0 = center, v_{l+1} = v_l + Σ_t p_t clip(τ_t − v_l, ρ), clip(x, ρ) = x · min(1, ρ/‖x‖) over the whole
update. The center is 0 in the first round and, with ``center="previous"``, the previous round's Δ after.
"""

from fedmerge.merging.rules.cclip import METHOD, CClipRule
from fedmerge.strategies.base import MethodStrategy


class CClip(MethodStrategy):
    """Centered clipping.

    Parameters
    ----------
    radius : float (default 0)
        ρ. 0 (or None) picks, each round, the median of the clients' distances to the center.
    iterations : int (default 1)
        L, the clipping iterations.
    center : "previous" | "zero" (default "previous")
        v_0 after the first round: the previous round's Δ (the paper's momentum center) or 0.
    **kwargs
        As :class:`fedmerge.strategies.base.MergingStrategy`.
    """

    method = METHOD

    def __init__(self, **kwargs) -> None:
        if kwargs.get("radius", 0) is None:
            kwargs["radius"] = 0.0  # None, as before: the median distance
        super().__init__(**kwargs)
        self._previous: dict | None = None
        self._current: dict = {}

    def build_rule(self, replies, weights):
        self._current = {}
        center = self._previous if self.params["center"] == "previous" else None
        return CClipRule(self.params["radius"], self.params["iterations"], center, weights)

    def observe_update(self, name, delta):
        if delta.is_floating_point():
            self._current[name] = delta

    def merge_replies(self, server_round, replies, global_arrays):
        arrays, metrics = super().merge_replies(server_round, replies, global_arrays)
        if arrays is not None:
            self._previous = self._current
        return arrays, metrics
