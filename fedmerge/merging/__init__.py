"""The merging core: one rule per file over task vectors (name → tensor mappings). No Flower, no files.

Each rule's file (in :mod:`fedmerge.merging.rules`) ends with its method's record (:mod:`fedmerge.merging.method`);
:data:`METHODS` holds them all by name (:mod:`fedmerge.merging.registry`).

Every rule returns a mean-scale update Δ; the new model is θ + β·Δ (β, the server learning rate, is 1 by
default). A method's own λ means what its paper means (:mod:`fedmerge.merging.scale`): β = λ·T for Task Arithmetic's
convention, β = λ for TIES's, and β alone for the methods that define none.
"""

from fedmerge.merging.method import Method, Param
from fedmerge.merging.registry import METHODS, find_method
from fedmerge.merging.rule import Rule, iter_merge, iter_merged_model, merge, merged_model
from fedmerge.merging.rules.breadcrumbs import BreadcrumbsRule, breadcrumbs
from fedmerge.merging.rules.bulyan import BulyanRule, bulyan
from fedmerge.merging.rules.cclip import CClipRule, cclip
from fedmerge.merging.rules.dare import DareRule, dare
from fedmerge.merging.rules.della import DellaRule, della
from fedmerge.merging.rules.fedavg import FedAvgRule, fedavg
from fedmerge.merging.rules.fedexp import FedExPRule, fedexp
from fedmerge.merging.rules.fedgma import FedGMARule, fedgma
from fedmerge.merging.rules.fisher import FisherRule, fisher_merge
from fedmerge.merging.rules.fednova import FedNovaRule, effective_steps, fednova
from fedmerge.merging.rules.isotropic import IsoCRule, IsoCtsRule, iso_c, iso_cts
from fedmerge.merging.rules.karcher import KarcherRule, karcher
from fedmerge.merging.rules.krum import KrumRule, MultiKrumRule, krum, multi_krum
from fedmerge.merging.rules.mean_direction import MeanDirectionRule, mean_direction
from fedmerge.merging.rules.median import MedianRule, median
from fedmerge.merging.rules.model_stock import ModelStockRule, model_stock
from fedmerge.merging.rules.regmean import RegMeanRule, regmean
from fedmerge.merging.rules.slerp import SlerpRule, slerp
from fedmerge.merging.rules.ties import TiesRule, ties
from fedmerge.merging.rules.trimmed_mean import TrimmedMeanRule, trimmed_mean
from fedmerge.merging.rules.tsv import TsvRule, tsv
from fedmerge.merging.scale import scaling_to_server_lr, server_lr_to_scaling
from fedmerge.merging.tensors import OnDevice, TaskVector, apply_update
from fedmerge.merging.weights import chi_square, client_weights, effective_weights

__all__ = [
    "METHODS",
    "BreadcrumbsRule",
    "BulyanRule",
    "CClipRule",
    "DareRule",
    "DellaRule",
    "FedAvgRule",
    "FedExPRule",
    "FedGMARule",
    "FedNovaRule",
    "KarcherRule",
    "KrumRule",
    "MeanDirectionRule",
    "MedianRule",
    "Method",
    "ModelStockRule",
    "MultiKrumRule",
    "OnDevice",
    "Param",
    "Rule",
    "SlerpRule",
    "TaskVector",
    "TiesRule",
    "TrimmedMeanRule",
    "apply_update",
    "breadcrumbs",
    "bulyan",
    "cclip",
    "chi_square",
    "client_weights",
    "dare",
    "della",
    "effective_steps",
    "effective_weights",
    "fedavg",
    "fedexp",
    "fedgma",
    "fednova",
    "find_method",
    "iter_merge",
    "iter_merged_model",
    "karcher",
    "krum",
    "mean_direction",
    "median",
    "merge",
    "merged_model",
    "model_stock",
    "multi_krum",
    "scaling_to_server_lr",
    "server_lr_to_scaling",
    "slerp",
    "ties",
    "trimmed_mean",
    "FisherRule",
    "IsoCRule",
    "IsoCtsRule",
    "RegMeanRule",
    "TsvRule",
    "fisher_merge",
    "iso_c",
    "iso_cts",
    "regmean",
    "tsv",
]
