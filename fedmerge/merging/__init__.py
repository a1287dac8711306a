"""The merging core: one rule per file over task vectors (name → tensor mappings). No Flower, no files.

Each rule's file (in :mod:`fedmerge.merging.rules`) ends with its method's record (:mod:`fedmerge.merging.method`);
:data:`METHODS` holds them all by name (:mod:`fedmerge.merging.registry`).

Every rule returns a mean-scale update Δ; the new model is θ + β·Δ (β, the server learning rate, is 1 by
default; Task Arithmetic's λ is β = λ·T, see :mod:`fedmerge.merging.scale`).
"""

from fedmerge.merging.method import Method, Param
from fedmerge.merging.registry import METHODS, find_method
from fedmerge.merging.rule import Rule, iter_merge, iter_merged_model, merge, merged_model
from fedmerge.merging.rules.cclip import CClipRule, cclip
from fedmerge.merging.rules.dare import DareRule, dare
from fedmerge.merging.rules.fedavg import FedAvgRule, fedavg
from fedmerge.merging.rules.fedgma import FedGMARule, fedgma
from fedmerge.merging.rules.fednova import FedNovaRule, effective_steps, fednova
from fedmerge.merging.rules.mean_direction import MeanDirectionRule, mean_direction
from fedmerge.merging.rules.median import MedianRule, median
from fedmerge.merging.rules.ties import TiesRule, ties
from fedmerge.merging.scale import scaling_to_server_lr, server_lr_to_scaling
from fedmerge.merging.tensors import OnDevice, TaskVector, apply_update
from fedmerge.merging.weights import chi_square, client_weights, effective_weights

__all__ = [
    "METHODS", "CClipRule", "DareRule", "FedAvgRule", "FedGMARule", "FedNovaRule", "MeanDirectionRule", "MedianRule",
    "Method", "OnDevice", "Param", "Rule", "TaskVector", "TiesRule", "apply_update", "cclip", "chi_square", "client_weights",
    "dare", "effective_steps", "effective_weights", "fedavg", "fedgma", "fednova", "find_method", "iter_merge",
    "iter_merged_model", "mean_direction", "median", "merge", "merged_model", "scaling_to_server_lr",
    "server_lr_to_scaling", "ties",
]
