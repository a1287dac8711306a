"""Flower Message-API strategies whose aggregation is a fedmerge merging rule.

Each is a drop-in for any ServerApp: ``strategy.start(grid=grid, initial_arrays=arrays, num_rounds=R)``.
Replies follow the client contract in :mod:`fedmerge.contract`.
"""

from fedmerge.strategies.base import MergingStrategy, MethodStrategy
from fedmerge.strategies.cclip import CClip
from fedmerge.strategies.dare import DareLinear, DareTies
from fedmerge.strategies.fedavg import FedAvg
from fedmerge.strategies.fedgma import FedGMA
from fedmerge.strategies.fednova import FedNova
from fedmerge.strategies.mean_direction import MeanDirection
from fedmerge.strategies.median import Median
from fedmerge.strategies.round_record import RoundRecord
from fedmerge.strategies.ties import Ties

STRATEGIES: dict[str, type[MethodStrategy]] = {
    strategy.method.name: strategy
    for strategy in (FedAvg, FedNova, FedGMA, Median, CClip, Ties, DareLinear, DareTies, MeanDirection)
}
"""One strategy per merging method, by the method's name."""

__all__ = [
    "STRATEGIES", "CClip", "DareLinear", "DareTies", "FedAvg", "FedGMA", "FedNova", "MeanDirection", "Median",
    "MergingStrategy", "MethodStrategy", "RoundRecord", "Ties",
]
