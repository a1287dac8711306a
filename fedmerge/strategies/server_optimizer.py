"""Server optimizers: θ ← θ + β·u_r, the step direction u_r made from the rule's update Δ_r and state kept over rounds.

Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar, McMahan, "Adaptive Federated Optimization", ICLR 2021
(FedAdagrad, FedAdam, FedYogi); Hsu, Qi, Brown, "Measuring the Effects of Non-Identical Data Distribution for
Federated Visual Classification", 2019 (FedAvgM). Each treats −Δ_r as the round's gradient: Δ_r is any rule's
mean-scale update (FedAvg's in those papers; TIES's, the median's, ... here), and β (``server_lr``) is the server
learning rate η. Per tensor, from zero state, as Flower's FedAvgM, FedAdam, FedYogi and FedAdagrad compute it:

- ``sgd``: u = Δ (θ + β·Δ, fedmerge's default);
- ``momentum`` (FedAvgM): v_r = μ·v_{r−1} + Δ_r; u = v_r;
- ``adam``: m_r = β1·m_{r−1} + (1 − β1)·Δ_r, v_r = β2·v_{r−1} + (1 − β2)·Δ_r²;
  u = √(1 − β2^(r+1)) / (1 − β1^(r+1)) · m_r / (√v_r + τ) (Flower's bias correction, with r + 1; the paper has none);
- ``yogi``: m_r as adam's, v_r = v_{r−1} − (1 − β2)·Δ_r²·sign(v_{r−1} − Δ_r²); u = m_r / (√v_r + τ);
- ``adagrad``: v_r = v_{r−1} + Δ_r²; u = Δ_r / (√v_r + τ) (no momentum, as Flower's FedAdagrad).

r is the server round. One round (one-shot merging) from zero state: sgd and momentum give θ + β·Δ (FedAvgM is FedAvg
with β = η); adam gives θ + β·√(1 − β2²)/(1 − β1²)·(1 − β1)·Δ / (√(1 − β2)·|Δ| + τ), i.e. β·√(1 + β2)/(1 + β1)·sign(Δ)
where |Δ| ≫ τ; yogi θ + β·(1 − β1)·Δ / (√(1 − β2)·|Δ| + τ); adagrad θ + β·Δ / (|Δ| + τ), β·sign(Δ) where |Δ| ≫ τ:
the adaptive ones move every coordinate by about β whatever its size.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields

import torch

from fedmerge.errors import FedmergeError

OPTIMIZERS = ("sgd", "momentum", "adam", "yogi", "adagrad")
USES = {
    "sgd": (),
    "momentum": ("momentum",),
    "adam": ("beta_1", "beta_2", "tau"),
    "yogi": ("beta_1", "beta_2", "tau"),
    "adagrad": ("tau",),
}
"""The hyperparameters each optimizer reads."""

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ServerOptimizer:
    """A server optimizer and its hyperparameters (see the module's docstring for the updates).

    Parameters
    ----------
    name : "sgd" | "momentum" | "adam" | "yogi" | "adagrad" (default "sgd")
    momentum : float in [0, 1) (default 0.9)
        μ of ``momentum``.
    beta_1, beta_2 : floats in [0, 1) (default 0.9, 0.99)
        The moments' decay rates of ``adam`` and ``yogi``.
    tau : float > 0 (default 1e-3)
        τ, the adaptivity of ``adam``, ``yogi`` and ``adagrad``.

    A hyperparameter the optimizer does not read, set away from its default, is refused.
    """

    name: str = "sgd"
    momentum: float = 0.9
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise FedmergeError(f"server_optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.name!r}.")
        for field in fields(self)[1:]:
            value = getattr(self, field.name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not (ok and (value > 0 if field.name == "tau" else 0 <= value < 1)):
                bounds = "a number > 0" if field.name == "tau" else "a number in [0, 1)"
                raise FedmergeError(f"server_{field.name} must be {bounds}, got {value!r}.")
            if field.name not in USES[self.name] and value != field.default:
                users = [name for name, used in USES.items() if field.name in used]
                raise FedmergeError(
                    f"server_{field.name} = {value!r} has no effect with server_optimizer = "
                    f"{self.name!r} (only {' and '.join(users)} read it); drop it, or choose "
                    f"{' or '.join(users)}."
                )

    def params(self) -> dict:
        """The optimizer and the hyperparameters it reads (for records and summaries)."""
        return {"optimizer": self.name, **{name: getattr(self, name) for name in USES[self.name]}}

    def step(
        self, delta: torch.Tensor, state: Mapping[str, torch.Tensor] | None, server_round: int
    ) -> tuple[torch.Tensor, State]:
        """u_r for one floating tensor's Δ_r, in its dtype, and the tensor's new state, from its state after the
        previous round (None at first); the state is kept in float32 or wider, where Δ_r lives."""
        if self.name == "sgd":
            return delta, {}
        direction, state = STEPS[self.name](
            self, delta.to(torch.promote_types(delta.dtype, torch.float32)), state or {}, server_round
        )
        return direction.to(delta.dtype), state


def _momentum(o: ServerOptimizer, d: torch.Tensor, state: Mapping, r: int) -> tuple[torch.Tensor, State]:
    v = o.momentum * state["v"] + d if "v" in state else d.clone()
    return v, {"v": v}


def _adagrad(o: ServerOptimizer, d: torch.Tensor, state: Mapping, r: int) -> tuple[torch.Tensor, State]:
    v = state.get("v", 0.0) + d * d
    return d / (v.sqrt() + o.tau), {"v": v}


def _adam(o: ServerOptimizer, d: torch.Tensor, state: Mapping, r: int) -> tuple[torch.Tensor, State]:
    m = o.beta_1 * state.get("m", 0.0) + (1 - o.beta_1) * d
    v = o.beta_2 * state.get("v", 0.0) + (1 - o.beta_2) * d * d
    scale = math.sqrt(1 - o.beta_2 ** (r + 1)) / (1 - o.beta_1 ** (r + 1))
    return scale * m / (v.sqrt() + o.tau), {"m": m, "v": v}


def _yogi(o: ServerOptimizer, d: torch.Tensor, state: Mapping, r: int) -> tuple[torch.Tensor, State]:
    m = o.beta_1 * state.get("m", 0.0) + (1 - o.beta_1) * d
    v = state.get("v", 0.0)
    v = v - (1 - o.beta_2) * d * d * torch.sign(v - d * d)
    return m / (v.sqrt() + o.tau), {"m": m, "v": v}


STEPS = {"momentum": _momentum, "adagrad": _adagrad, "adam": _adam, "yogi": _yogi}
