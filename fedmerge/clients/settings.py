"""Each client's training settings: one row of the run's client table, or a SuperNode's node config.

In the table every training option (the fields of :class:`TrainConfig` but ``seed``) is one of
- a scalar: every client uses it;
- a list: one value per client, in client-id order;
- a spread: ``{geometric = [low, high]}`` or ``{linear = [low, high]}``, T values from low to high
  (rounded for integer options), e.g. a geometric spread of step counts or learning rates; numeric
  options only.
"""

from collections.abc import Mapping
from dataclasses import fields, replace

import numpy as np

from fedmerge import contract
from fedmerge.clients.corruption import check_corruption
from fedmerge.clients.trainer import TrainConfig
from fedmerge.errors import FedmergeError

CORRUPTION_KEYS = ("corruption", "corruption_scale")
"""Robustness studies: ``corruption`` = none | sign-flip | noise, ``corruption_scale`` > 0 (see corruption.py)."""
TRAINING_KEYS = tuple(f.name for f in fields(TrainConfig) if f.name != "seed") + CORRUPTION_KEYS
INTEGER_KEYS = ("steps", "warmup_steps", "batch_size", "num_workers")
CHOICE_KEYS = ("optimizer", "schedule", "precision", "pin_memory", "corruption")  # no spreads
SPREADS = ("geometric", "linear")


def is_spread(value) -> bool:
    """Whether ``value`` is a spread (``{geometric = [low, high]}`` or ``{linear = [low, high]}``), a value, not a table."""
    return isinstance(value, Mapping) and len(value) == 1 and next(iter(value)) in SPREADS


def _spread(key: str, spec: Mapping, num_clients: int) -> list:
    if not is_spread(spec):
        raise FedmergeError(
            f"training option '{key}': a table must be {{geometric = [low, high]}} or {{linear = [low, high]}}, "
            f"got {dict(spec)!r}."
        )
    if key in CHOICE_KEYS:
        raise FedmergeError(
            f"training option '{key}' takes one value or a list of one per client, not a {next(iter(spec))} spread."
        )
    kind, bounds = next(iter(spec.items()))
    if not (
        isinstance(bounds, list) and len(bounds) == 2 and all(isinstance(b, (int, float)) and b > 0 for b in bounds)
    ):
        raise FedmergeError(
            f"training option '{key}': {kind} needs [low, high] with two positive numbers, got {bounds!r}."
        )
    low, high = bounds
    if num_clients == 1:
        values = np.array([low], dtype=float)
    elif kind == "geometric":
        values = np.geomspace(low, high, num_clients)
    else:
        values = np.linspace(low, high, num_clients)
    return [int(round(v)) for v in values] if key in INTEGER_KEYS else [float(v) for v in values]


def per_client(key: str, value, num_clients: int) -> list:
    """The option's value for each of the ``num_clients`` clients."""
    if key not in TRAINING_KEYS:
        raise FedmergeError(f"unknown training option '{key}'; the options are {', '.join(TRAINING_KEYS)}.")
    if isinstance(value, Mapping):
        return _spread(key, value, num_clients)
    if isinstance(value, list):
        if len(value) != num_clients:
            raise FedmergeError(
                f"training option '{key}' lists {len(value)} values for {num_clients} clients; "
                f"give one per client, or a single value for all."
            )
        return list(value)
    return [value] * num_clients


def client_table(training: Mapping, num_clients: int, seed: int) -> list[TrainConfig]:
    """Every client's validated :class:`TrainConfig` (client t's minibatch seed derives from ``seed`` and t)."""
    columns = {
        key: per_client(key, value, num_clients) for key, value in training.items() if key not in CORRUPTION_KEYS
    }
    if "epochs" in columns and "steps" not in columns:
        columns["steps"] = [None] * num_clients
    varies = any(isinstance(value, (list, Mapping)) for value in training.values())
    table = []
    for t in range(num_clients):
        row = {key: _none_if_zero(key, column[t]) for key, column in columns.items()}
        try:
            table.append(TrainConfig(**row, seed=client_seed(seed, t)))
        except FedmergeError as error:
            raise FedmergeError(f"client {t}: {error}" if varies else str(error)) from None
    return table


def corruptions(training: Mapping, num_clients: int) -> list[tuple[str, float]]:
    """Each client's (corruption, scale); ("none", 1.0) unless the table says otherwise."""
    kinds = per_client("corruption", training.get("corruption", "none"), num_clients)
    scales = per_client("corruption_scale", training.get("corruption_scale", 1.0), num_clients)
    for t, (kind, scale) in enumerate(zip(kinds, scales)):
        try:
            check_corruption(kind, scale)
        except FedmergeError as error:
            raise FedmergeError(f"client {t}: {error}") from None
    return list(zip(kinds, scales))


def client_seed(seed: int, client_id: int) -> int:
    """Client ``client_id``'s own seed within a run seeded ``seed``."""
    return seed * 100_003 + client_id


def _none_if_zero(key: str, value):
    """``grad_clip = 0`` means no clipping (TOML has no None)."""
    return None if key == "grad_clip" and value == 0 else value


def with_node_overrides(config: TrainConfig, node_config: Mapping) -> TrainConfig:
    """A deployed SuperNode's own settings (``--node-config "lr=0.01 steps=200"``) over the table's row."""
    overrides = {
        key: _none_if_zero(key, node_config[key])
        for key in TRAINING_KEYS
        if key in node_config and key not in CORRUPTION_KEYS
    }
    if "steps" in overrides and "epochs" not in overrides:
        overrides["epochs"] = None
    if "epochs" in overrides and "steps" not in overrides:
        overrides["steps"] = None
    if not overrides:
        return config
    values = {f.name: getattr(config, f.name) for f in fields(TrainConfig)}
    values.update(overrides)
    try:
        return TrainConfig(**values)
    except FedmergeError as error:
        raise FedmergeError(f"node config: {error}") from None


def with_proximal_mu(config: TrainConfig, round_config: Mapping) -> TrainConfig:
    """FedProx's μ as a train message gives it (Flower's FedProx strategy sends ``proximal-mu``) over the table's
    ``prox_mu``; the row itself without one."""
    if contract.PROXIMAL_MU not in round_config:
        return config
    try:
        return replace(config, prox_mu=round_config[contract.PROXIMAL_MU])
    except FedmergeError as error:
        raise FedmergeError(f"the server's '{contract.PROXIMAL_MU}': {error}") from None
