"""Flower Message-API strategies whose aggregation is a fedmerge merging rule.

Each is a drop-in for any ServerApp: ``strategy.start(grid=grid, initial_arrays=arrays, num_rounds=R)``.
Replies follow the client contract in :mod:`fedmerge.contract`.
"""

from fedmerge.strategies.base import MergingStrategy
from fedmerge.strategies.cclip import CClip
from fedmerge.strategies.fedavg import FedAvg
from fedmerge.strategies.fedgma import FedGMA
from fedmerge.strategies.fednova import FedNova
from fedmerge.strategies.median import Median
from fedmerge.strategies.round_record import RoundRecord

STRATEGIES = {"fedavg": FedAvg, "fednova": FedNova, "fedgma": FedGMA, "median": Median, "cclip": CClip}

__all__ = ["STRATEGIES", "CClip", "FedAvg", "FedGMA", "FedNova", "Median", "MergingStrategy", "RoundRecord"]
