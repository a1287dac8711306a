"""Flower Message-API strategies whose aggregation is a fedmerge merging rule.

Each is a drop-in for any ServerApp: ``strategy.start(grid=grid, initial_arrays=arrays, num_rounds=R)``.
Replies follow the client contract in :mod:`fedmerge.contract`.
"""

from fedmerge.strategies.base import MergingStrategy, MethodStrategy
from fedmerge.strategies.breadcrumbs import Breadcrumbs, BreadcrumbsTies
from fedmerge.strategies.bulyan import Bulyan
from fedmerge.strategies.cclip import CClip
from fedmerge.strategies.dare import DareLinear, DareTies
from fedmerge.strategies.della import Della
from fedmerge.strategies.fedavg import FedAvg
from fedmerge.strategies.fedexp import FedExP
from fedmerge.strategies.fedgma import FedGMA
from fedmerge.strategies.fednova import FedNova
from fedmerge.strategies.fisher import FisherMerging
from fedmerge.strategies.isotropic import IsoC, IsoCTS
from fedmerge.strategies.karcher import Karcher
from fedmerge.strategies.krum import Krum, MultiKrum
from fedmerge.strategies.mean_direction import MeanDirection
from fedmerge.strategies.median import Median
from fedmerge.strategies.model_stock import ModelStock
from fedmerge.strategies.regmean import RegMean
from fedmerge.strategies.round_record import RoundRecord
from fedmerge.strategies.scaffold import Scaffold
from fedmerge.strategies.slerp import Slerp
from fedmerge.strategies.ties import Ties
from fedmerge.strategies.trimmed_mean import TrimmedMean
from fedmerge.strategies.tsv import TSVM

STRATEGIES: dict[str, type[MethodStrategy]] = {
    strategy.method.name: strategy
    for strategy in (
        FedAvg,
        FedExP,
        FedNova,
        FedGMA,
        Median,
        CClip,
        Krum,
        MultiKrum,
        Bulyan,
        TrimmedMean,
        Ties,
        DareLinear,
        DareTies,
        MeanDirection,
        Breadcrumbs,
        BreadcrumbsTies,
        Della,
        ModelStock,
        Slerp,
        Karcher,
        FisherMerging,
        RegMean,
        TSVM,
        IsoC,
        IsoCTS,
        Scaffold,
    )
}
"""One strategy per merging method, by the method's name."""

__all__ = [
    "STRATEGIES",
    "CClip",
    "DareLinear",
    "DareTies",
    "FedAvg",
    "FedGMA",
    "FedNova",
    "MeanDirection",
    "Median",
    "MergingStrategy",
    "MethodStrategy",
    "RoundRecord",
    "Ties",
    "Breadcrumbs",
    "BreadcrumbsTies",
    "Della",
    "Karcher",
    "ModelStock",
    "Slerp",
    "Bulyan",
    "FedExP",
    "Krum",
    "MultiKrum",
    "TrimmedMean",
    "FisherMerging",
    "IsoC",
    "IsoCTS",
    "RegMean",
    "TSVM",
    "Scaffold",
]
