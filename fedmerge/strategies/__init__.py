"""Flower Message-API strategies whose aggregation is a fedmerge merging rule.

Each is a drop-in for any ServerApp: ``strategy.start(grid=grid, initial_arrays=arrays, num_rounds=R)``.
Replies follow the client contract in :mod:`fedmerge.contract`.
"""

from fedmerge.merging.registry import METHODS
from fedmerge.strategies.base import MergingStrategy, MethodStrategy, strategy_for
from fedmerge.strategies.cclip import CClip
from fedmerge.strategies.dare import DareLinear, DareTies
from fedmerge.strategies.fedavg import FedAvg
from fedmerge.strategies.fedgma import FedGMA
from fedmerge.strategies.fednova import FedNova
from fedmerge.strategies.median import Median
from fedmerge.strategies.round_record import RoundRecord

_WRITTEN = {"fedavg": FedAvg, "fednova": FedNova, "fedgma": FedGMA, "median": Median, "cclip": CClip,
            "dare-linear": DareLinear, "dare-ties": DareTies}
STRATEGIES: dict[str, type[MethodStrategy]] = {name: _WRITTEN.get(name) or strategy_for(m) for name, m in METHODS.items()}
"""One strategy per merging method; those without a class of their own (TIES) are made from the record."""

Ties = STRATEGIES["ties"]

__all__ = [
    "STRATEGIES", "CClip", "DareLinear", "DareTies", "FedAvg", "FedGMA", "FedNova", "Median", "MergingStrategy",
    "MethodStrategy", "RoundRecord", "Ties",
]
