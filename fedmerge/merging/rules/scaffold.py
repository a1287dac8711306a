"""SCAFFOLD: FedAvg of the clients' updates, their local steps corrected by control variates kept over rounds.

Karimireddy, Kale, Mohri, Reddi, Stich, Suresh, "SCAFFOLD: Stochastic Controlled Averaging for Federated Learning",
ICML 2020, Algorithm 1 with option II. Each client i of the round's S (of N) takes its local steps
y ← y − η_k (g_i(y) − c_i + c) from x and keeps c_i⁺ = c_i − c + (x − y_i) / Σ_k η_k; the server takes

    x ← x + β · Σ_i p_i Δy_i                      (Δy_i = y_i − x = τ_i: FedAvg's rule, β the paper's η_g)
    c ← c + (|S|/N) · Σ_i p_i Δc_i,   Δc_i = c_i⁺ − c_i = −c − τ_i / a_i   (a_i = Σ_k η_k, the reply's lr-sum)

With uniform p_i = 1/|S| that is the paper's (1/N) Σ_{i∈S} Δc_i. Δc_i follows from the reply's update and lr-sum, so a
reply carries nothing beyond FedAvg's (the client keeps c_i; :mod:`fedmerge.clients.scaffold`).

The rule is therefore FedAvg's: SCAFFOLD differs from FedAvg in the clients' steps and in c, over rounds. One round from
c = c_i = 0 (one-shot merging) takes plain local steps and is FedAvg (Task Arithmetic's λ, β = λ·T).
"""

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from fedmerge.merging.method import Method
from fedmerge.merging.rule import merge
from fedmerge.merging.rules.fedavg import FedAvgRule
from fedmerge.merging.tensors import Tensors


def next_control(
    control: Mapping[str, torch.Tensor],
    task_vectors: Sequence[Tensors],
    p: Sequence[float],
    lr_sums: Sequence[float],
    share: float,
) -> dict[str, torch.Tensor]:
    """c + share · Σ_i p_i (−c − τ_i / a_i) for every tensor of the task vectors (c absent: 0), share = |S|/N.

    ``p`` are the clients' weights (summing to 1), ``lr_sums`` their a_i; the result is float32 or wider, where the
    task vectors live."""
    q = np.asarray(p, dtype=np.float64) / np.asarray(lr_sums, dtype=np.float64)
    mean = merge(FedAvgRule(q), task_vectors)  # Σ_i q_i τ_i / Σ_i q_i
    updated = {}
    for name, value in mean.items():
        value = value.to(torch.promote_types(value.dtype, torch.float32))
        c = control.get(name)
        pulled = -share * float(q.sum()) * value
        updated[name] = pulled if c is None else (1 - share) * c.to(value) + pulled
    return updated


METHOD = Method(
    "scaffold",
    FedAvgRule,
    "FedAvg of updates from local steps corrected by control variates, kept over "
    "rounds; one shot: FedAvg (Karimireddy et al. 2020)",
    linear=True,
)
