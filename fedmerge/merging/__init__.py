"""The merging core: one rule per file over task vectors (name → tensor mappings). No Flower, no files.

Every rule returns a mean-scale update Δ; the new model is θ + β·Δ (β, the server learning rate, is 1 by
default; Task Arithmetic's λ is β = λ·T, see :mod:`fedmerge.merging.scale`).
"""

from fedmerge.merging.cclip import CClipRule, cclip
from fedmerge.merging.fedavg import FedAvgRule, fedavg
from fedmerge.merging.fedgma import FedGMARule, fedgma
from fedmerge.merging.fednova import FedNovaRule, effective_steps, fednova
from fedmerge.merging.median import MedianRule, median
from fedmerge.merging.rule import Rule, iter_merge, iter_merged_model, merge, merged_model
from fedmerge.merging.scale import scaling_to_server_lr, server_lr_to_scaling
from fedmerge.merging.tensors import OnDevice, TaskVector, apply_update
from fedmerge.merging.weights import chi_square, client_weights, effective_weights

__all__ = [
    "CClipRule", "FedAvgRule", "FedGMARule", "FedNovaRule", "MedianRule", "OnDevice", "Rule", "TaskVector",
    "apply_update", "cclip", "chi_square", "client_weights", "effective_steps", "effective_weights",
    "fedavg", "fedgma", "fednova", "iter_merge", "iter_merged_model", "median", "merge", "merged_model",
    "scaling_to_server_lr", "server_lr_to_scaling",
]
