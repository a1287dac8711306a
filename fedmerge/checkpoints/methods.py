"""Merging methods for ``fedmerge merge``: the registry's records (:data:`fedmerge.merging.METHODS`), each
method's parameters taken by the flags its record names, plus ``task-arithmetic``.

``task-arithmetic`` and ``fedavg`` are the same rule (Δ = Σ_t p_t τ_t); Task Arithmetic is uniform and is
usually given its scaling λ, FedAvg may weight the models. Options a method does not use are refused
rather than ignored, and everything is checked against the number of models before any file is read.

``--scaling λ`` is each method's own λ (:meth:`~fedmerge.merging.Method.server_lr`), refused for the methods
that have none (``Method.no_lambda``); :func:`resolve_scale` gives the β applied and says why.
"""

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from fedmerge.errors import FedmergeError
from fedmerge.merging import METHODS, Method, Param, Rule, client_weights, find_method
from fedmerge.merging.client_statistics import FISHER, GRAMS
from fedmerge.merging.scale import CONVENTIONS

TASK_ARITHMETIC = dataclasses.replace(
    METHODS["fedavg"],
    name="task-arithmetic",
    weighted=False,
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
            raise FedmergeError(
                f"{flag} is only used by method{'s' if len(users) > 1 else ''} {which}, not {method!r}; drop it."
            )
        params[by_flag[flag]] = value
    return params


def build_rule(
    method: str,
    num_models: int,
    weights: Sequence[float] | None = None,
    statistics: Sequence[Mapping] | None = None,
    labels: Sequence[str] | None = None,
    **params,
) -> Rule:
    """The rule of ``method`` over ``num_models`` task vectors, its parameters (named as in its record, e.g.
    ``density``, ``threshold``; per-model ones with one value per model) and ``weights`` checked; ``statistics``, one
    per model (named by ``labels`` in messages), for the methods that need them (:attr:`Method.statistics`)."""
    record = merge_method(method)
    check_statistics(record, num_models, statistics)
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
                raise FedmergeError(
                    f"{label[name]} needs one value per model: {num_models} models, {len(values)} values."
                )
            resolved[name] = [param.option.check(label[name], v) for v in values]
    if not record.statistics:
        return record.build(weights, **resolved)
    return record.build(weights, dict.fromkeys(record.statistics, statistics), labels=labels, **resolved)


STATISTICS_FILES = {FISHER: "diagonal Fisher", GRAMS: "linear layers' input Gram matrices"}
"""What a ``--statistics`` file of each kind holds (:attr:`Method.statistics`), for messages."""


def check_statistics(record: Method, num_models: int, statistics: Sequence | None) -> None:
    """A method needing client statistics has one statistics file per model; the other methods none."""
    if not record.statistics:
        if statistics is not None:
            users = ", ".join(repr(m.name) for m in MERGE_METHODS.values() if m.statistics)
            raise FedmergeError(
                f"--statistics (statistics) is only used by methods {users}, not {record.name!r}; drop it."
            )
        return
    what = " and ".join(STATISTICS_FILES[key] for key in record.statistics)
    if statistics is None:
        raise FedmergeError(
            f"method {record.name!r} merges by each model's {what}, which a checkpoint does not hold: give "
            "--statistics with one safetensors file per model, in the order of --models, made on that model's training "
            "data by "
            "fedmerge.clients.merging_statistics (see docs/merging-checkpoints.md, Methods that need statistics)."
        )
    if len(statistics) != num_models:
        raise FedmergeError(f"--statistics needs one file per model: {num_models} models, {len(statistics)} files.")


def per_model_params(method: str) -> list[str]:
    """The names of the method's parameters that hold one value per model."""
    return [name for name, p in merge_method(method).scoped("merge").items() if p.per_model]


@dataclasses.dataclass(frozen=True)
class Scale:
    """The server learning rate β of a merge over ``num_models`` models, and how it was given: ``scaling`` (the
    method's own λ), ``server_lr`` or ``default`` (β = 1)."""

    method: Method
    num_models: int
    server_lr: float
    given: str

    @property
    def scaling(self) -> float | None:
        """The method's own λ of β; None for a method without one (``Method.no_lambda``)."""
        return self.method.scaling(self.server_lr, self.num_models)

    @property
    def convention(self) -> str:
        """What the method's own λ multiplies, in words."""
        return "none (ambiguous; see server_lr)" if self.scaling is None else CONVENTIONS[self.method.scale]

    def record(self) -> dict:
        """The fields of a merge's metadata."""
        return {
            "server_lr": self.server_lr,
            "server_lr_from": self.given,
            "scaling": self.scaling,
            "scale": None if self.scaling is None else self.method.scale,
            "scaling_convention": self.convention,
        }

    def __str__(self) -> str:
        name, beta, scaling = self.method.name, self.server_lr, self.scaling
        if self.given == "scaling":
            product = f"λ·T = {beta:g} (T = {self.num_models})" if self.method.scale == "sum" else f"λ = {beta:g}"
            return f"{name}: λ = {scaling:g} ({self.convention}) → β = {product}"
        how = "--server-lr" if self.given == "server_lr" else "the default: neither --scaling nor --server-lr"
        own = "" if scaling is None else f"; λ = {scaling:g} ({self.convention})"
        return f"{name}: β = {beta:g} ({how}; θ + β·Δ, Δ the rule's mean-scale update){own}"


def resolve_scale(method: str, num_models: int, scaling: float | None = None, server_lr: float | None = None) -> Scale:
    """β: from the method's own λ (``scaling``; :meth:`Method.server_lr`), or given, or 1 (θ + Δ) if neither."""
    record = merge_method(method)
    if scaling is not None and server_lr is not None:
        raise FedmergeError("give scaling λ (--scaling) or server_lr β (--server-lr), not both.")
    given = "scaling" if scaling is not None else "server_lr" if server_lr is not None else "default"
    try:
        beta = record.server_lr(scaling, num_models) if scaling is not None else 1.0 if server_lr is None else server_lr
    except FedmergeError as error:
        raise FedmergeError(
            f"--scaling: {str(error).replace('Give the server learning rate β', 'Give --server-lr β')}"
        ) from None
    if not math.isfinite(beta) or beta == 0:
        raise FedmergeError(f"the server learning rate β must be a finite non-zero number, got {beta!r}.")
    return Scale(record, num_models, float(beta), given)
