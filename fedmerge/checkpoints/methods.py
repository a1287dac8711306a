"""Merging methods for ``fedmerge merge``: the registry's records (:data:`fedmerge.merging.METHODS`), each
method's parameters taken by the flags its record names, plus ``task-arithmetic``.

``task-arithmetic`` and ``fedavg`` are the same rule (Δ = Σ_t p_t τ_t); Task Arithmetic is uniform and is
usually given its scaling λ, FedAvg may weight the models. Options a method does not use are refused
rather than ignored, and everything is checked against the number of models before any file is read.
"""

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from fedmerge.errors import FedmergeError
from fedmerge.merging import METHODS, Method, Param, Rule, client_weights, find_method, scaling_to_server_lr

TASK_ARITHMETIC = dataclasses.replace(
    METHODS["fedavg"], name="task-arithmetic", weighted=False,
    summary="Task Arithmetic: θ + λ·Σ_t τ_t, the uniform mean of the task vectors scaled (Ilharco et al. 2023)",
)
MERGE_METHODS: dict[str, Method] = {TASK_ARITHMETIC.name: TASK_ARITHMETIC, **METHODS}


def merge_method(name: str) -> Method:
    """The record of a ``fedmerge merge`` method, ``task-arithmetic`` included."""
    return MERGE_METHODS[name] if name == TASK_ARITHMETIC.name else find_method(name)


def flags() -> dict[str, list[tuple[Method, Param]]]:
    """Every ``fedmerge merge`` flag of a method parameter, with the methods (and their parameter) using it."""
    found: dict[str, list[tuple[Method, Param]]] = {}
    for method in MERGE_METHODS.values():
        for param in method.scoped("merge").values():
            found.setdefault(param.cli_flag, []).append((method, param))
    return found


def params_from_flags(method: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """The method's parameters from flag values (``--rho`` → FedGMA's threshold or CCLIP's radius); a flag the
    method does not use is refused, naming the methods that do."""
    record = merge_method(method)
    by_flag = {param.cli_flag: param.name for param in record.scoped("merge").values()}
    params = {}
    for flag, value in given.items():
        if value is None:
            continue
        if flag not in by_flag:
            users = [repr(name) for name in sorted({m.name for m, _ in flags()[flag]})]
            which = users[0] if len(users) == 1 else f"{', '.join(users[:-1])} or {users[-1]}"
            raise FedmergeError(f"{flag} is only used by method{'s' if len(users) > 1 else ''} {which}, not {method!r}; "
                                "drop it.")
        params[by_flag[flag]] = value
    return params


def build_rule(method: str, num_models: int, weights: Sequence[float] | None = None, **params) -> Rule:
    """The rule of ``method`` over ``num_models`` task vectors, its parameters (named as in its record, e.g.
    ``density``, ``threshold``; per-model ones with one value per model) and ``weights`` checked."""
    record = merge_method(method)
    if weights is not None and not record.weighted:
        users = ", ".join(m.name for m in MERGE_METHODS.values() if m.weighted)
        raise FedmergeError(f"weights (--weights) are only used by methods {users}, not {method!r}; drop them.")
    if weights is not None:
        client_weights(weights, num_models, "model")
    label = {name: p.cli_flag for name, p in record.scoped("merge").items()}
    resolved = record.resolve({k: v for k, v in params.items() if v is not None}, "merge", lambda p: label[p.name])
    for name, param in record.scoped("merge").items():
        if param.per_model and resolved[name] is not None:
            values = list(resolved[name])
            if len(values) != num_models:
                raise FedmergeError(f"{label[name]} needs one value per model: {num_models} models, {len(values)} values.")
            resolved[name] = [param.option.check(label[name], v) for v in values]
    return record.build(weights, **resolved)


def per_model_params(method: str) -> list[str]:
    """The names of the method's parameters that hold one value per model."""
    return [name for name, p in merge_method(method).scoped("merge").items() if p.per_model]


def resolve_server_lr(num_models: int, scaling: float | None = None, server_lr: float | None = None) -> float:
    """β, the server learning rate: given, or from Task Arithmetic's λ as β = λ·T; 1 (the mean) if neither."""
    if scaling is not None and server_lr is not None:
        raise FedmergeError(
            f"give scaling λ (--scaling) or server_lr β (--server-lr), not both: β = λ·T = {scaling} × {num_models}."
        )
    if scaling is not None:
        beta = scaling_to_server_lr(scaling, num_models)
    else:
        beta = 1.0 if server_lr is None else server_lr
    if not math.isfinite(beta) or beta == 0:
        raise FedmergeError(f"the server learning rate β must be a finite non-zero number, got {beta!r}.")
    return float(beta)
